"""Nuclei masks for mask-guided generation: a pseudo-labeller, procedural layouts, augmentation.

- :func:`segment_nuclei`: the default nuclei segmenter for real H&E tiles (hematoxylin channel by
  colour deconvolution, Otsu threshold, hole filling, distance-transform watershed to split
  touching nuclei). It makes training pairs from any slide, and scores mask adherence of
  generated images with the same rule.
- :func:`procedural_nuclei`: random star-convex nuclei with density and size control, for
  layouts no real tile has.
- :func:`augment_mask`: dihedral flips, elastic deformation, removing and adding nuclei, applied
  identically to a paired image where there is one.

Masks are (H, W) int32 instance label maps (0 = background, 1..N = nuclei). Sizes are in
pixels of the mask; :func:`nucleus_diameter_px` converts a physical size at an mpp.
"""

from __future__ import annotations

import numpy as np

from synthgen.errors import MaskError

NUCLEUS_DIAMETER_UM = 7.0  # typical epithelial / lymphocyte nucleus, 5-10 um


def nucleus_diameter_px(mpp: float, diameter_um: float = NUCLEUS_DIAMETER_UM) -> float:
    """Typical nucleus diameter in pixels at ``mpp`` micrometres per pixel."""
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    return diameter_um / mpp


def _as_rgb(image) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:  # CHW tensor layout
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise MaskError(f"segment_nuclei: expected an RGB image (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise MaskError(f"segment_nuclei: expected uint8 RGB, got {arr.dtype}")
    return arr


def hematoxylin(image) -> np.ndarray:
    """Hematoxylin optical density (H, W) float of an RGB H&E/IHC image (Ruifrok-Johnston deconvolution)."""
    from skimage.color import rgb2hed

    return rgb2hed(_as_rgb(image))[..., 0]


def segment_nuclei(
    image,
    diameter: float = NUCLEUS_DIAMETER_UM,
    threshold: float | None = None,
    min_fraction: float = 0.15,
    max_fraction: float = 6.0,
) -> np.ndarray:
    """Instance mask of the nuclei of an H&E tile.

    Args:
        image: uint8 RGB, (H, W, 3) or (3, H, W).
        diameter: expected nucleus diameter in pixels (``nucleus_diameter_px(mpp)``); the
            default suits 1 um/px. Sets smoothing, the minimum object size and the watershed
            seed spacing.
        threshold: hematoxylin optical density above which a pixel is nuclear; default Otsu's
            threshold of the tile, floored at a fixed density so a tile without nuclei stays
            empty instead of splitting stroma in two.
        min_fraction: objects smaller than this fraction of a nucleus' area are dropped.
        max_fraction: objects larger than this many nuclei after splitting are dropped (dark
            debris, folds, pigment: not nuclei).

    Returns:
        (H, W) int32 instance labels.
    """
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    h = gaussian(hematoxylin(image), sigma=max(diameter / 8, 0.5))
    if threshold is None:
        threshold = max(threshold_otsu(h), 0.05) if np.ptp(h) > 0 else np.inf
    fg = ndi.binary_fill_holes(h > threshold)
    area = np.pi * diameter**2 / 4
    fg = remove_small_objects(fg, max_size=max(int(min_fraction * area), 1))
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    seeds = peak_local_max(dist, min_distance=max(int(diameter / 3), 1), labels=ndi.label(fg)[0],
                           exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    labels = watershed(-dist, markers, mask=fg)
    # objects without a seed (tiny, flat) keep their connected component
    rest = ndi.label(fg & (labels == 0))[0]
    labels = np.where(rest > 0, rest + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    too_big = np.nonzero(sizes > max_fraction * area)[0]
    labels[np.isin(labels, too_big[too_big > 0])] = 0
    return _relabel(labels)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive ids 1..N in raster order of first appearance."""
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape).astype(np.int32)
    return out if ids[0] == 0 else out + 1


def star_convex_polygon(center, radius: float, rng: np.random.Generator, irregularity: float = 0.15,
                        elongation: float = 0.3, vertices: int = 16) -> np.ndarray:
    """Vertices (V, 2) as (x, y) of a random star-convex shape: an ellipse of mean radius ``radius``
    and random orientation whose radial function is perturbed by a few low harmonics."""
    theta = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    e = rng.uniform(0, elongation)
    phi = rng.uniform(0, np.pi)
    r = radius * (1 + e * np.cos(2 * (theta - phi)))
    for k in (3, 4, 5):
        r *= 1 + irregularity / k * rng.standard_normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.3 * radius, None)
    return np.stack([center[0] + r * np.cos(theta), center[1] + r * np.sin(theta)], axis=1)


def procedural_nuclei(
    size: int | tuple[int, int],
    density: float = 0.25,
    diameter: float = NUCLEUS_DIAMETER_UM,
    diameter_std: float = 0.15,
    elongation: float = 0.3,
    seed: int | np.random.Generator | None = None,
    max_tries: int = 20,
) -> np.ndarray:
    """A random layout of non-overlapping star-convex nuclei.

    Args:
        size: mask side (or (height, width)) in pixels.
        density: fraction of the area covered by nuclei (0.25: a cellular region; stroma ~0.1,
            lymphocyte aggregates ~0.4). Reached within rounding unless the nuclei cannot fit.
        diameter: mean nucleus diameter in pixels; ``diameter_std`` its relative spread.
        elongation: up to this relative ellipticity (0: round).
        seed: int or numpy Generator.
        max_tries: placement attempts per nucleus before giving up on it.

    Returns:
        (H, W) int32 instance labels.
    """
    from skimage.draw import polygon as draw_polygon

    if not 0 <= density < 0.9:
        raise ValueError(f"density is a covered-area fraction in [0, 0.9), got {density}")
    if diameter <= 1:
        raise ValueError(f"diameter must be > 1 px, got {diameter}")
    h, w = (size, size) if isinstance(size, int) else size
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = np.zeros((h, w), np.int32)
    target = density * h * w
    covered, label, failures = 0, 0, 0
    while covered < target and failures < max_tries:
        r = max(diameter / 2 * (1 + diameter_std * rng.standard_normal()), 0.75)
        cx, cy = rng.uniform(-r / 2, w + r / 2), rng.uniform(-r / 2, h + r / 2)
        poly = star_convex_polygon((cx, cy), r, rng, elongation=elongation)
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=(h, w))
        # keep a one-pixel gap so instances stay separable
        if len(rr) == 0 or _touches(out, rr, cc):
            failures += 1
            continue
        label += 1
        out[rr, cc] = label
        covered += len(rr)
        failures = 0
    return out


def _touches(out: np.ndarray, rr: np.ndarray, cc: np.ndarray) -> bool:
    h, w = out.shape
    for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        r, c = np.clip(rr + dr, 0, h - 1), np.clip(cc + dc, 0, w - 1)
        if out[r, c].any():
            return True
    return False


def augment_mask(
    mask: np.ndarray,
    image: np.ndarray | None = None,
    seed: int | np.random.Generator | None = None,
    dihedral: bool = True,
    elastic: float = 0.0,
    remove: float = 0.0,
    add: float = 0.0,
    diameter: float = NUCLEUS_DIAMETER_UM,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Randomly transform an instance mask (and its image identically).

    Args:
        mask: (H, W) instance labels.
        image: optional paired (H, W, C) image; it gets the same geometric transform. Removing
            or adding nuclei changes only the mask (the image no longer matches it then, which
            is the point: the mask becomes a new condition).
        dihedral: random flip and 90-degree rotation.
        elastic: displacement amplitude in pixels of a smooth random field (0: off).
        remove: fraction of nuclei to delete.
        add: new procedural nuclei, as a fraction of the current count, placed in free space.
        diameter: nucleus size (px) of added nuclei and the smoothness scale of the field.

    Returns:
        (mask, image) after the transform (image None when not given).
    """
    from scipy import ndimage as ndi

    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise MaskError(f"augment_mask: expected an (H, W) integer label map, got {mask.dtype} {mask.shape}")
    if image is not None and np.asarray(image).shape[:2] != mask.shape:
        raise MaskError(f"augment_mask: image {np.asarray(image).shape[:2]} and mask {mask.shape} differ in size")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mask = mask.astype(np.int32)
    if dihedral:
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        mask = np.rot90(mask[:, ::-1] if flip else mask, k)
        if image is not None:
            image = np.rot90(image[:, ::-1] if flip else image, k)
    if elastic > 0:
        h, w = mask.shape
        sigma = max(diameter, 2.0)
        dy, dx = (ndi.gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in range(2))
        scale = elastic / max(np.abs(dy).max(), np.abs(dx).max(), 1e-8)
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = [yy + dy * scale, xx + dx * scale]
        mask = ndi.map_coordinates(mask, coords, order=0, mode="reflect")
        if image is not None:
            image = np.stack([ndi.map_coordinates(image[..., c].astype(np.float32), coords, order=1, mode="reflect")
                              for c in range(image.shape[-1])], -1).round().clip(0, 255).astype(np.asarray(image).dtype)
    ids = np.unique(mask[mask > 0])
    if remove > 0 and len(ids):
        drop = rng.choice(ids, size=int(round(remove * len(ids))), replace=False)
        mask = np.where(np.isin(mask, drop), 0, mask)
    if add > 0:
        n_new = int(round(add * max(len(ids), 1)))
        mask = _add_nuclei(mask, n_new, diameter, rng)
    return _relabel(np.ascontiguousarray(mask)), None if image is None else np.ascontiguousarray(image)


def _add_nuclei(mask: np.ndarray, n: int, diameter: float, rng: np.random.Generator) -> np.ndarray:
    from skimage.draw import polygon as draw_polygon

    mask = mask.copy()
    h, w = mask.shape
    label = int(mask.max())
    for _ in range(n * 20):
        if n == 0:
            break
        r = diameter / 2 * (1 + 0.15 * rng.standard_normal())
        poly = star_convex_polygon((rng.uniform(0, w), rng.uniform(0, h)), max(r, 0.75), rng)
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=(h, w))
        if len(rr) and not _touches(mask, rr, cc):
            label += 1
            mask[rr, cc] = label
            n -= 1
    return mask


def segmenter(diameter: float = NUCLEUS_DIAMETER_UM):
    """Batch form of :func:`segment_nuclei` for ``synthgen cache -e mask=synthgen.data.nuclei:segmenter``:
    uint8 (B, 3, H, W) tensor -> int32 (B, H, W) instance masks."""
    import torch

    def run(images: torch.Tensor) -> torch.Tensor:
        arr = images.cpu().numpy()
        return torch.from_numpy(np.stack([segment_nuclei(a, diameter=diameter) for a in arr]))

    return run
