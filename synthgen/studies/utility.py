"""Utility of synthetic data: train a small classifier five ways, test on held-out real data.

Arms (the same classifier, schedule and seeds):
- ``real``: the real, imbalanced training set;
- ``classical``: real + classical augmentation (flips, 90-degree rotations, colour/stain jitter);
- ``oversample``: real + as many extra samples per class as the ``synthgen`` arm adds, drawn
  (with replacement) from that class's real images, + classical augmentation: the simple
  baseline synthetic data has to beat;
- ``synthgen``: real + synthetic samples per a :class:`~synthgen.augment.SynthPolicy`, +
  classical augmentation (so that it differs from ``oversample`` only in where the extra
  samples come from);
- ``synthetic_only``: synthetic samples of every class, no real image.

Reported per arm over several seeds: balanced accuracy, per-class F1 and recall, and the recall
of the rarest training class, each as mean with a 95% interval (t over seeds).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

ARMS = ("real", "classical", "oversample", "synthgen", "synthetic_only")


def small_cnn(num_classes: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.GroupNorm(8, 32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.GroupNorm(8, 64), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.GroupNorm(8, 128), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, num_classes))


def classical_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips, 90-degree rotations, brightness/contrast and per-channel (stain) jitter; x float [0, 1]."""
    out = torch.empty_like(x)
    for i in range(len(x)):
        img = torch.rot90(x[i], int(torch.randint(0, 4, (1,), generator=g)), dims=(1, 2))
        out[i] = img.flip(2) if torch.rand(1, generator=g) < 0.5 else img
    b = len(x)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - mean) * (1 + 0.3 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)) + mean
    out = out * (1 + 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)) + 0.1 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    return out.clamp(0, 1)


def _xy(batch):
    if isinstance(batch, dict):
        return batch["image"], batch["label"]
    return batch[0], batch[1]


def train_and_test(train: Dataset, test: Dataset, num_classes: int, seed: int, epochs: int = 10,
                   batch_size: int = 32, augment: bool = False) -> dict:
    """Fit :func:`small_cnn` on ``train`` and return per-class recall/F1 and balanced accuracy on ``test``."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed; the caller's global RNG untouched
        torch.manual_seed(seed)
        model = small_cnn(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        model.train()
        for batch in DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, drop_last=len(train) > batch_size):
            x, y = _xy(batch)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            if augment:
                x = classical_augment(x, g)
            loss = F.cross_entropy(model(x), torch.as_tensor(y).long())
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    preds, ys = [], []
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=64):
            x, y = _xy(batch)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            preds.append(model(x).argmax(1))
            ys.append(torch.as_tensor(y).long())
    p, y = torch.cat(preds).numpy(), torch.cat(ys).numpy()
    recall, f1 = [], []
    for c in range(num_classes):
        tp = int(((p == c) & (y == c)).sum())
        fn, fp = int(((p != c) & (y == c)).sum()), int(((p == c) & (y != c)).sum())
        r = tp / (tp + fn) if tp + fn else float("nan")
        pr = tp / (tp + fp) if tp + fp else 0.0
        recall.append(r)
        f1.append(2 * pr * r / (pr + r) if (pr + r) and not math.isnan(r) else 0.0)
    return {"recall": recall, "f1": f1, "balanced_accuracy": float(np.nanmean(recall))}


def _ci(values: Sequence[float]) -> dict:
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return {"mean": float(v.mean()), "ci95": [float(v.mean())] * 2}
    from scipy import stats

    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)]}


def utility_study(train: Dataset, test: Dataset, labels: Sequence[int], generator: Callable | None,
                  policy=None, arms: Sequence[str] = ARMS, seeds: Sequence[int] = (0, 1, 2), epochs: int = 10,
                  batch_size: int = 32) -> dict:
    """Run the arms over ``seeds`` and summarise (see module docstring).

    Args:
        train, test: datasets of (image, label) or dicts (uint8 or [0, 1] float images, same size).
        labels: the training labels.
        generator: a :class:`~synthgen.augment.PipelineGenerator` (or compatible callable) for
            the synthetic arms.
        policy: :class:`~synthgen.augment.SynthPolicy` for the ``synthgen`` arm (default: balance).
    """
    from synthgen.augment import SynthAugment, SynthPolicy

    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arm(s) {sorted(unknown)}; choose from {', '.join(ARMS)}")
    if generator is None and {"synthgen", "synthetic_only"} & set(arms):
        raise ValueError("the synthgen and synthetic_only arms need a generator")
    counts = Counter(int(v) for v in labels)
    num_classes = max(counts) + 1
    rare = min(counts, key=lambda c: (counts[c], c))
    policy = policy or SynthPolicy.balance(labels)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in seeds:
        for arm in arms:
            if arm in ("real", "classical"):
                data = train
            elif arm == "oversample":
                data = oversampled(train, labels, policy, seed)
            elif arm == "synthgen":
                data = SynthAugment(train, generator, policy, labels=labels, seed=seed)
            else:  # as many synthetic samples of each class as the largest real class
                top = max(counts.values())
                aug = SynthAugment(train, generator, SynthPolicy({c: top / n for c, n in counts.items()}),
                                   labels=labels, seed=seed)
                data = Subset(aug, np.nonzero(aug.is_synthetic)[0].tolist())
            data = _Strip(data)
            results[arm].append(train_and_test(data, test, num_classes, seed, epochs, batch_size,
                                               augment=arm in ("classical", "oversample", "synthgen")))
    summary = {}
    for arm, runs in results.items():
        summary[arm] = {
            "balanced_accuracy": _ci([r["balanced_accuracy"] for r in runs]),
            "rare_class_recall": _ci([r["recall"][rare] for r in runs]),
            "per_class_f1": [_ci([r["f1"][c] for r in runs]) for c in range(num_classes)],
            "per_class_recall": [_ci([r["recall"][c] for r in runs]) for c in range(num_classes)],
        }
    return {"rare_class": rare, "train_counts": dict(sorted(counts.items())), "seeds": list(seeds),
            "epochs": epochs, "arms": summary}


def oversampled(train: Dataset, labels: Sequence[int], policy, seed: int) -> Subset:
    """``train`` plus the real references of the synthgen arm's extra items, as they are (the
    ``oversample`` arm: the same sizes and draws as ``synthgen``, real images only)."""
    from synthgen.augment.synth_augment import synthetic_plan

    return Subset(train, list(range(len(labels))) + [ref for _, ref in synthetic_plan(labels, policy, seed)])


class _Strip(Dataset):
    """(image, label) from items that may carry an is_synthetic flag or be dicts."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):  # keeps SynthAugment's batched generation
        many = getattr(self.ds, "__getitems__", None)
        items = many(list(indices)) if many else [self.ds[i] for i in indices]
        out = []
        for item in items:
            x, y = _xy(item)
            if not isinstance(x, torch.Tensor):
                x = torch.from_numpy(np.array(x.convert("RGB"))).permute(2, 0, 1)
            out.append((x, int(y)))
        return out
