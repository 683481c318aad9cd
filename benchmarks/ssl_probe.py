"""Linear probe of image encoders on the labelled tiles of the default family's data definition
(``recipes/data/default_v2.csv``, 128 px tiles at 0.5 um/px): a logistic regression on frozen
embeddings of the training split, scored on the test split, for two tasks:

- the Kather class of the tiles that have one (8 classes; the test split holds only ~29 such tiles,
  so its accuracies move in steps of ~3.4 points: read them with their intervals),
- the tissue source of every tile (6 sources: cmu, monuseg, consep, kather2016, kather2016_224,
  histolytics).

Beside each encoder, in the same run and on the same tiles: a trivial colour reference (mean and
std of R, G, B plus an 8-bin histogram per channel, 30 features) and an untrained network of the
first encoder's architecture (same seed, no training). An encoder's embedding of a tile is the mean
of its tokens. The regularisation C of each probe is chosen on the validation split (best accuracy,
ties to the stronger regularisation; C = 1 where it holds one class), then the probe is refit on
the training split and scored on the test split; the validation scores are reported too (use
them, not test, to choose models).

    python benchmarks/ssl_probe.py runs/ssl_v2/model --data runs/data/v2      # tables already built
    python benchmarks/ssl_probe.py runs/ssl_v2/model --compare checkpoints/synthgen-small-cmu/image_encoder
    python benchmarks/ssl_probe.py                     # shipped encoder; builds the v2 tables (slow)
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ENCODER = REPO / "checkpoints" / "synthgen-small-cmu" / "image_encoder"
C_GRID = (0.01, 0.1, 1.0, 10.0)
TRIVIAL = "trivial: colour mean/std + 8-bin RGB histograms"


def run(encoder: Path | str = DEFAULT_ENCODER, compare: Sequence[Path | str] = (), data: Path | None = None,
        limit: int | None = None, seed: int = 0) -> dict:
    """Probe scores of each encoder and of the references, with ``summary`` rows (first encoder
    over the first ``compare`` encoder, or over the trivial reference without one).

    Args:
        encoder, compare: SSL encoder folders, or encoder specs (``timm:...``; see ``synthgen cache --help``).
        data: a folder with ``train.csv``, ``val.csv`` and ``test.csv`` from ``synthgen splits``
            (default: built from ``recipes/data/default_v2.csv`` into a temporary folder).
        limit: at most this many tiles of each split, evenly spaced in table order (quick runs).
    """
    if data is not None:
        return _run(Path(data), (encoder, *compare), limit, seed)
    from synthgen.data.splits import DEFAULT_SPLIT_FILE, build_split_tables

    with tempfile.TemporaryDirectory() as tmp:
        build_split_tables(DEFAULT_SPLIT_FILE, tmp, mpp=0.5, size=128, train_overlap=64, progress=False)
        return _run(Path(tmp), (encoder, *compare), limit, seed)


def _load_split(table: Path, limit: int | None) -> tuple[torch.Tensor, list[dict]]:
    from synthgen.data.datasets import PatchDataset
    from synthgen.data.splits import read_tile_labels

    ds, labels = PatchDataset(table), read_tile_labels(table)
    idx = range(len(ds)) if not limit or limit >= len(ds) else np.linspace(0, len(ds) - 1, limit).round().astype(int)
    return torch.stack([ds[int(i)]["image"] for i in idx]), [labels[int(i)] for i in idx]


def colour_features(images: torch.Tensor, bins: int = 8) -> np.ndarray:
    """The trivial reference: per-channel mean and std and a ``bins``-bin histogram per channel."""
    x = images.float() / 255
    flat = x.flatten(2)
    hist = torch.stack([torch.stack([torch.histc(c, bins, 0, 1) for c in im]) for im in flat]) / flat.shape[-1]
    return torch.cat([flat.mean(-1), flat.std(-1), hist.flatten(1)], 1).numpy()


def _encoder(spec: Path | str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor], torch.nn.Module | None]:
    if Path(spec).is_dir():
        from synthgen.encoders.ssl import SSLEncoder

        net = SSLEncoder.from_pretrained(spec).eval()
        return str(spec), net, net
    from synthgen.encoders.load import load_encoder

    return str(spec), load_encoder(str(spec)), None


@torch.no_grad()
def embed(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Mean of the encoder's tokens for each image (N, dim)."""
    out = [fn(images[i : i + batch]).float() for i in range(0, len(images), batch)]
    out = torch.cat(out)
    return (out.mean(1) if out.ndim == 3 else out.flatten(1)).numpy()


def _fit_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, c: float, seed: int) -> np.ndarray:
    """Multinomial logistic regression on standardised features (sklearn when installed)."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return _torch_logreg(xtr, ytr, xte, c, seed)
    return LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(xtr, ytr).predict(xte)


def _torch_logreg(xtr, ytr, xte, c, seed) -> np.ndarray:
    """The same objective as sklearn's (sum of log-losses + ||W||^2 / (2 C)), by L-BFGS."""
    torch.manual_seed(seed)
    classes = np.unique(ytr)
    y = torch.as_tensor(np.searchsorted(classes, ytr))
    x = torch.as_tensor(xtr, dtype=torch.float64)
    w = torch.zeros(x.shape[1], len(classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y, reduction="sum") + (w**2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return classes[(torch.as_tensor(xte, dtype=torch.float64) @ w + b).argmax(1).numpy()]


def scores(y: np.ndarray, pred: np.ndarray, seed: int = 0, n_boot: int = 1000) -> dict:
    """Accuracy (with a 95% percentile-bootstrap interval over tiles) and balanced accuracy
    (mean recall over the classes present in ``y``)."""
    correct = (y == pred).astype(float)
    rng = np.random.default_rng(seed)
    boot = correct[rng.integers(0, len(y), (n_boot, len(y)))].mean(1)
    recall = [correct[y == k].mean() for k in np.unique(y)]
    return {"n": int(len(y)), "classes": int(len(np.unique(y))), "accuracy": float(correct.mean()),
            "accuracy_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "balanced_accuracy": float(np.mean(recall))}


def probe(feats: dict[str, np.ndarray], y: dict[str, np.ndarray], seed: int = 0) -> dict:
    """C chosen on ``val`` (when it holds two classes or more; else 1), fit on ``train``, scores
    on ``val`` and ``test``."""
    best_c, best = 1.0, -1.0  # sklearn's default where the validation split cannot choose
    if "val" in feats and len(np.unique(y["val"])) > 1:
        for c in C_GRID:
            acc = float((_fit_predict(feats["train"], y["train"], feats["val"], c, seed) == y["val"]).mean())
            if acc > best + 1e-9:
                best_c, best = c, acc
    out = {"C": best_c, "train_n": int(len(y["train"]))}
    for split in ("val", "test"):
        if split in feats and len(y[split]):
            out[split] = scores(y[split], _fit_predict(feats["train"], y["train"], feats[split], best_c, seed), seed)
    return out


def _run(data: Path, specs: Sequence[Path | str], limit: int | None, seed: int) -> dict:
    splits = [s for s in ("train", "val", "test") if (data / f"{s}.csv").exists()]
    if "train" not in splits or "test" not in splits:
        raise FileNotFoundError(f"{data}: needs train.csv and test.csv (synthgen splits ... -o {data})")
    images, labels = {}, {}
    for s in splits:
        images[s], labels[s] = _load_split(data / f"{s}.csv", limit)
    encoders = [_encoder(s) for s in specs]
    feats: dict[str, dict[str, np.ndarray]] = {}
    for name, fn, _ in encoders:
        feats[name] = {s: embed(fn, images[s]) for s in splits}
    first_net = encoders[0][2]
    untrained = None
    if first_net is not None:
        torch.manual_seed(seed)
        untrained = f"untrained network, architecture of {encoders[0][0]} (seed {seed})"
        net = type(first_net)(**{k: v for k, v in first_net.config.items() if not k.startswith("_")}).eval()
        feats[untrained] = {s: embed(net, images[s]) for s in splits}
    feats[TRIVIAL] = {s: colour_features(images[s]) for s in splits}

    tasks = {}
    for task, key in (("kather_class", "label"), ("source", "source")):
        keep = {s: np.array([bool(r[key]) for r in labels[s]]) for s in splits}
        y = {s: np.array([r[key] for r in labels[s]])[keep[s]] for s in splits}
        tasks[task] = {name: probe({s: f[s][keep[s]] for s in splits}, y, seed) for name, f in feats.items()}
        tasks[task]["_counts"] = {s: {k: int((y[s] == k).sum()) for k in np.unique(y[s])} for s in splits}

    ours, ref = encoders[0][0], (encoders[1][0] if len(encoders) > 1 else TRIVIAL)
    summary = []
    for task, what in (("kather_class", "Kather class"), ("source", "tissue source")):
        for key, metric in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy")):
            a, b = tasks[task][ours]["test"], tasks[task][ref]["test"]
            summary.append({"measure": f"linear probe, {what} {metric}, test split ({a['n']} tiles, {a['classes']} classes)",
                            "reference": ref, "reference_value": b[key], "synthgen_value": a[key],
                            "ratio": a[key] / b[key] if b[key] else float("nan")})
    return {"data": str(data), "encoders": [e[0] for e in encoders], "references": [r for r in (untrained, TRIVIAL) if r],
            "tiles": {s: len(images[s]) for s in splits}, "tasks": tasks, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("encoder", nargs="?", default=str(DEFAULT_ENCODER), help="SSL encoder folder or encoder spec")
    ap.add_argument("--compare", nargs="*", default=(), help="more encoders, probed on the same tiles")
    ap.add_argument("--data", type=Path, default=None,
                    help="folder with train/val/test.csv from synthgen splits (default: build the v2 tables)")
    ap.add_argument("--limit", type=int, default=None, help="at most N tiles per split (evenly spaced)")
    ap.add_argument("--json", type=Path, default=None, help="write the full result here")
    args = ap.parse_args()
    r = run(args.encoder, tuple(args.compare), args.data, args.limit)
    print(f"tiles per split: {r['tiles']} ({r['data']})")
    for task, res in r["tasks"].items():
        print(f"\n{task}: test counts {res['_counts'].get('test')}")
        print(f"{'':58s} {'C':>5s} {'val acc':>7s} {'test acc':>8s} {'95% CI':>13s} {'test bal':>8s}")
        for name, m in res.items():
            if name.startswith("_"):
                continue
            v, t = m.get("val", {}), m["test"]
            ci = f"{t['accuracy_ci95'][0]:.2f}-{t['accuracy_ci95'][1]:.2f}"
            print(f"{name[-58:]:58s} {m['C']:5g} {v.get('accuracy', float('nan')):7.3f} {t['accuracy']:8.3f} "
                  f"{ci:>13s} {t['balanced_accuracy']:8.3f}")
    if args.json:
        import json

        args.json.write_text(json.dumps(r, indent=1))
    print(f"headline: ssl_probe_accuracy_vs_reference ratio={r['summary'][0]['ratio']:.4f}")


if __name__ == "__main__":
    main()
