"""Memorisation audit: is any synthetic item a near-copy of a training item?

For each synthetic item the distance to its nearest real training item is divided by the
typical real-to-real nearest-neighbour distance (the median over the training set). A real
tile's closest other training tile sets the scale of "different tissue"; a synthetic item much
closer than that to some training tile is a near-copy. The check runs in an encoder's feature
space (robust to flips, small colour changes and noise, when the encoder is) and in pixel space
(small grey thumbnails, for exact copies); an item is flagged when either ratio is under the
threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _nn_dist(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False, chunk: int = 1024) -> torch.Tensor:
    out = []
    for i in range(0, len(a), chunk):
        d = torch.cdist(a[i : i + chunk], b)
        if exclude_self:
            idx = torch.arange(i, min(i + chunk, len(a)))
            d[torch.arange(len(idx)), idx] = float("inf")
        out.append(d.min(1).values)
    return torch.cat(out)


def thumbnails(images: torch.Tensor, size: int = 16) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> flattened grey thumbnails in [0, 1] for the pixel-space check."""
    x = images.float().mean(1, keepdim=True) / 255
    return F.adaptive_avg_pool2d(x, size).flatten(1)


def nearest_items(synth_feats: torch.Tensor, real_feats: torch.Tensor) -> torch.Tensor:
    """Index of each synthetic item's nearest real item (L2-normalised features): for a report
    that shows the closest pairs; the audit itself identifies no real item."""
    rf, sf = F.normalize(real_feats.float(), dim=-1), F.normalize(synth_feats.float(), dim=-1)
    return torch.cdist(sf, rf).argmin(dim=1)


def memorization_audit(synth_feats: torch.Tensor, real_feats: torch.Tensor, synth_pixels: torch.Tensor | None = None,
                       real_pixels: torch.Tensor | None = None, threshold: float = 0.5) -> dict:
    """Flag synthetic items that are near-copies of real training items.

    Args:
        synth_feats, real_feats: (N, D) encoder features (L2-normalised here).
        synth_pixels, real_pixels: optional (N, P) thumbnails (see :func:`thumbnails`).
        threshold: flag when nearest-real distance < threshold x median real-to-real distance.

    Returns:
        ``{"flagged": bool list, "ratio": feature ratios, "pixel_ratio": ..., "flagged_fraction",
        "threshold", "n_synthetic", "n_real"}``; no real item is identified in it.
    """
    if len(real_feats) < 2:
        raise ValueError("the audit needs at least 2 real training items")
    rf, sf = F.normalize(real_feats.float(), dim=-1), F.normalize(synth_feats.float(), dim=-1)
    scale = _nn_dist(rf, rf, exclude_self=True).median().clamp_min(1e-8)
    ratio = _nn_dist(sf, rf) / scale
    flagged = ratio < threshold
    report = {"ratio": [round(float(v), 4) for v in ratio]}
    if synth_pixels is not None and real_pixels is not None:
        pscale = _nn_dist(real_pixels.float(), real_pixels.float(), exclude_self=True).median().clamp_min(1e-8)
        pratio = _nn_dist(synth_pixels.float(), real_pixels.float()) / pscale
        flagged |= pratio < threshold
        report["pixel_ratio"] = [round(float(v), 4) for v in pratio]
    report.update({"flagged": flagged.tolist(), "flagged_fraction": float(flagged.float().mean()),
                   "threshold": threshold, "n_synthetic": len(sf), "n_real": len(rf),
                   "median_real_nn_distance": float(scale)})
    return report
