"""Mask adherence: does a generated image put its nuclei where its condition mask says?

Each generated image is segmented (by default with :func:`synthgen.data.nuclei.segment_nuclei`,
the same rule that made the training masks; pass a user's segmenter instead) and compared with
its condition mask:

- **Dice** of the nucleus foreground (pixels);
- **object F1**: a predicted and a condition nucleus match when their IoU is at least 0.5
  (one-to-one, as in the segmentation literature); precision = matched / predicted,
  recall = matched / condition objects.

The same score for the same conditions generated *without* the mask branch is the baseline:
the branch works when its score is far above the baseline's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from synthgen.config import SAMPLING


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Foreground Dice of two label maps (1.0 when both are empty)."""
    p, t = np.asarray(pred) > 0, np.asarray(target) > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


def match_objects(pred: np.ndarray, target: np.ndarray, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """(matched, predicted objects, target objects) with one-to-one matching at IoU >= threshold.

    With a threshold >= 0.5 each object can overlap at most one partner by that much, so the
    matching is unique; below 0.5 the best pairs are chosen by the Hungarian algorithm.
    """
    from scipy.optimize import linear_sum_assignment

    pred, target = np.asarray(pred), np.asarray(target)
    p_ids, t_ids = np.unique(pred[pred > 0]), np.unique(target[target > 0])
    if len(p_ids) == 0 or len(t_ids) == 0:
        return 0, len(p_ids), len(t_ids)
    # contingency table of overlaps
    pi = np.searchsorted(p_ids, pred[(pred > 0) & (target > 0)])
    ti = np.searchsorted(t_ids, target[(pred > 0) & (target > 0)])
    inter = np.zeros((len(p_ids), len(t_ids)))
    np.add.at(inter, (pi, ti), 1)
    p_area = np.array([(pred == i).sum() for i in p_ids], float)
    t_area = np.array([(target == i).sum() for i in t_ids], float)
    iou = inter / (p_area[:, None] + t_area[None, :] - inter)
    rows, cols = linear_sum_assignment(-iou)
    return int((iou[rows, cols] >= iou_threshold).sum()), len(p_ids), len(t_ids)


def mask_adherence(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    segmenter: Callable[[np.ndarray], np.ndarray] | None = None,
    iou_threshold: float = 0.5,
) -> dict:
    """Adherence of generated ``images`` (uint8 (H, W, 3) each) to their condition ``masks``.

    Returns:
        ``dice`` (mean over images), ``object_precision``, ``object_recall``, ``object_f1``
        (pooled over all objects), ``num_images`` and per-image ``dice_per_image``.
    """
    from synthgen.data.nuclei import segment_nuclei
    from synthgen.errors import MaskError

    segmenter = segmenter or segment_nuclei
    if len(images) != len(masks):
        raise MaskError(f"mask_adherence: {len(images)} images but {len(masks)} masks")
    dices, matched, n_pred, n_true = [], 0, 0, 0
    for img, m in zip(images, masks, strict=True):
        img = np.asarray(img)
        if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
            img = img.transpose(1, 2, 0)
        m = np.asarray(m)
        if m.shape != img.shape[:2]:
            raise MaskError(f"mask_adherence: mask {m.shape} and image {img.shape[:2]} differ in size")
        pred = segmenter(img)
        dices.append(dice(pred, m))
        k, p, t = match_objects(pred, m, iou_threshold)
        matched, n_pred, n_true = matched + k, n_pred + p, n_true + t
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"dice": float(np.mean(dices)) if dices else float("nan"), "object_precision": precision,
            "object_recall": recall, "object_f1": f1, "num_images": len(dices), "dice_per_image": dices}


def adherence_study(pipe, masks: np.ndarray, embeddings=None, seeds: Sequence[int] | None = None,
                    num_inference_steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance, batch_size: int = 32,
                    segmenter: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Mask adherence of a mask-guided pipeline beside its baseline (the same denoiser, embeddings
    and seeds without the mask branch).

    Args:
        pipe: a :class:`~synthgen.pipelines.generate.SynthPipeline` with a ``controlnet``.
        masks: (N, H, W) condition label maps.
        embeddings: (N, tokens, dim) conditions (e.g. of the real tiles the masks came from);
            None samples from the masks alone (null embedding), and the baseline is then the
            unconditional model.

    Returns:
        ``{"controlnet": {...}, "baseline": {...}, "dice_gain": ..., "object_f1_gain": ...}`` with
        the scores of :func:`mask_adherence` (per-image lists dropped), and ``images``: the
        generated uint8 arrays of both arms (drop it before writing JSON).
    """
    masks = np.asarray(masks)
    seeds = list(range(len(masks))) if seeds is None else list(seeds)
    kw = dict(seeds=seeds, num_inference_steps=num_inference_steps, batch_size=batch_size, output_type="np")
    if embeddings is not None:
        guided = pipe(embeddings=embeddings, masks=masks, guidance_scale=guidance_scale, **kw).images
        plain = pipe(embeddings=embeddings, guidance_scale=guidance_scale, **kw).images
    else:
        guided = pipe(masks=masks, **kw).images
        null = pipe.transformer.null_conditions(len(masks))
        plain = pipe(embeddings=null.get("embeddings"), class_labels=null.get("class_labels"), guidance_scale=1.0,
                     **kw).images
    out = {}
    for name, imgs in (("controlnet", guided), ("baseline", plain)):
        rep = mask_adherence(imgs, masks, segmenter)
        rep.pop("dice_per_image")
        out[name] = rep
    out["dice_gain"] = out["controlnet"]["dice"] - out["baseline"]["dice"]
    out["object_f1_gain"] = out["controlnet"]["object_f1"] - out["baseline"]["object_f1"]
    out["images"] = {"controlnet": guided, "baseline": plain}
    return out
