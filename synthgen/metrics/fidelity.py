"""Fidelity of a synthetic image set against a real one, in any encoder's feature space.

- Frechet distance (Heusel et al. 2017): distance between Gaussians fitted to the features;
  with Inception features it is FID, with a pathology encoder it is what PixCell reports.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, averaged
  over random subsets; unbiased, so usable on small sets.
- Precision, recall, density, coverage (Kynkaanniemi et al. 2019; Naeem et al. 2020): k-NN
  manifold estimates of how much of the synthetic set is realistic and how much of the real
  set is covered.
- Bootstrap confidence intervals by resampling both sets with replacement.

All functions take feature matrices (N, D); :func:`extract_features` turns images into them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2)).

    A stable estimate needs more samples than feature dimensions; with fewer, the covariances
    are singular and the value is biased upwards (still 0 for identical sets).
    """
    import warnings

    from scipy import linalg

    a, b = _np(real), _np(fake)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular products are handled below
        covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise (as in the reference implementation)
        eps = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real)))


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 100, num_subsets: int = 50,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel inception distance: mean and std over subsets of the unbiased MMD^2 estimate with
    k(x, y) = (x.y / d + 1)^3."""
    a, b = _np(real), _np(fake)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = generator or torch.Generator().manual_seed(0)
    d = a.shape[1]
    vals = []
    for _ in range(num_subsets):
        x = a[torch.randperm(len(a), generator=g)[:m].numpy()]
        y = b[torch.randperm(len(b), generator=g)[:m].numpy()]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-nearest-neighbour balls (Naeem et al. 2020)."""
    r, f = torch.as_tensor(_np(real)), torch.as_tensor(_np(fake))
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples in each set")
    rr, ff, rf = torch.cdist(r, r), torch.cdist(f, f), torch.cdist(r, f)
    r_rad = rr.kthvalue(k + 1, dim=1).values  # k-th neighbour, excluding the point itself
    f_rad = ff.kthvalue(k + 1, dim=1).values
    inside_real = rf <= r_rad[:, None]  # (R, F): fake j inside real i's ball
    precision = inside_real.any(0).float().mean()
    recall = (rf <= f_rad[None, :]).any(1).float().mean()
    density = inside_real.float().sum(0).mean() / k
    coverage = (rf.min(1).values <= r_rad).float().mean()
    return {"precision": float(precision), "recall": float(recall), "density": float(density),
            "coverage": float(coverage)}


def bootstrap(metric: Callable[[torch.Tensor, torch.Tensor], float], real: torch.Tensor, fake: torch.Tensor,
              n: int = 100, level: float = 0.95, generator: torch.Generator | None = None) -> tuple[float, float, float]:
    """(value on the full sets, lower, upper): a bias-corrected percentile interval from ``n``
    resamples of both sets.

    Resampling with replacement duplicates items, which shrinks a set's spread and biases a
    Frechet distance upward (on 40 items in 16 dimensions the plain percentile interval lay wholly
    above the full-set value). The percentiles are therefore shifted by the bootstrap estimate of
    the bias, mean(resampled) - value (Efron & Tibshirani 1993, ch. 10), so the interval describes
    the spread around the full-set value.
    """
    g = generator or torch.Generator().manual_seed(0)
    value = metric(real, fake)
    vals = []
    for _ in range(n):
        ri = torch.randint(0, len(real), (len(real),), generator=g)
        fi = torch.randint(0, len(fake), (len(fake),), generator=g)
        vals.append(metric(real[ri], fake[fi]))
    lo, hi = np.quantile(vals, [(1 - level) / 2, 1 - (1 - level) / 2])
    bias = float(np.mean(vals)) - float(value)
    return float(value), float(lo - bias), float(hi - bias)


def fidelity_report(real: torch.Tensor, fake: torch.Tensor, real_labels=None, fake_labels=None, k: int = 5,
                    n_bootstrap: int = 100, seed: int = 0, min_per_class: int = 10) -> dict:
    """All metrics with bootstrap intervals, overall and per class when both sets carry labels
    (classes with fewer than ``min_per_class`` items in either set are left out)."""
    def one(r, f) -> dict:
        g = torch.Generator().manual_seed(seed)
        out = {}
        fd, lo, hi = bootstrap(frechet_distance, r, f, n_bootstrap, generator=g)
        out["fd"] = {"value": fd, "ci95": [lo, hi]}
        km, ks = kid(r, f, generator=torch.Generator().manual_seed(seed))
        out["kid"] = {"value": km, "std": ks}
        if len(r) > k and len(f) > k:
            out.update({name: {"value": v} for name, v in prdc(r, f, k).items()})
        out["n_real"], out["n_fake"] = len(r), len(f)
        return out

    report = {"overall": one(real, fake)}
    if real_labels is not None and fake_labels is not None:
        rl, fl = torch.as_tensor(real_labels), torch.as_tensor(fake_labels)
        report["per_class"] = {int(c): one(real[rl == c], fake[fl == c])
                               for c in sorted(set(rl.tolist()) & set(fl.tolist()))
                               if (rl == c).sum() >= min_per_class and (fl == c).sum() >= min_per_class}
    return report


@torch.no_grad()
def extract_features(encoder, dataset, batch_size: int = 64, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (N, D) of every ``image`` of a dataset (tokens flattened), and its labels if any."""
    from torch.utils.data import DataLoader

    feats, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        feats.append(encoder(batch["image"]).reshape(len(batch["image"]), -1).float().cpu())
        if "label" in batch:
            labels.append(torch.as_tensor(batch["label"]))
    return torch.cat(feats), (torch.cat(labels) if labels else None)


def _np(x) -> np.ndarray:
    return (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64))
