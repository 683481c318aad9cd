"""Encoder-free fidelity: a fixed, hand-crafted feature vector per H&E tile, its Frechet
distance, the reference scale measured in the same run, and a realism check for filtering.

An encoder FD says how far two sets are in a learned space, which can share the generator's
blind spots (the default pipeline is conditioned on, and filtered with, its own encoder). These
features need no model: what a pathologist's eye and a stain QC tool look at, computed per tile.

Feature vector (``FEATURE_NAMES``, 49 values, all size-robust: means, quantiles, normalised
histograms, per-area densities and frequency fractions, so a 64 px and a 256 px tile of the same
tissue give similar values):

- stain (15): Ruifrok-Johnston colour deconvolution (``skimage.color.rgb2hed``); for each of
  hematoxylin (H), eosin (E) and DAB (D) optical density: mean, std, 10th / 50th / 90th percentile;
- colour (11): coarse RGB histograms (4 bins of 64 levels per channel, fractions of pixels; the
  last bin of each channel is left out, being 1 minus the others) and HSV saturation mean / std;
- texture (17): uniform LBP (8 neighbours, radius 1) histogram of the grey image (10 bins, last
  left out) and GLCM contrast, homogeneity, energy, correlation at distances 1 and 2 px (grey
  quantised to 32 levels, 4 directions averaged, symmetric, normalised);
- nuclei (3): :func:`synthgen.data.nuclei.segment_nuclei` (hematoxylin, Otsu, watershed; the
  nucleus diameter ``diameter`` px, 7 at 1 um/px): nuclei per 1,000 px^2, mean nucleus area in
  px, nuclear area fraction;
- sharpness (3): log(1 + 10^4 x variance of the Laplacian), mean gradient magnitude (Sobel),
  and the high-frequency energy fraction: var(g - G_1 g) / var(g - G_8 g) of the grey image g,
  G_s a Gaussian blur of sigma s px (detail below ~1 px over detail below ~8 px).

Within-tile spreads (stds, GLCM correlation) grow a little with the tile side (by up to half a
real-set std from 64 to 128 px on the bundled slide), as a larger tile holds more kinds of
tissue: compare sets at one tile size and resolution.

Distances are taken after standardising every feature with the REAL set's mean and std, so no
feature's unit dominates.

Reference scale (:func:`encoder_free_report`): the real set is split into two random halves A
and B of equal size ``m``; every row is an FD between half A and a set of ``m`` images, so all
rows share the same (count-dependent) estimator bias:

- ``floor``: A vs B (two samples of the same distribution: the best a generator can do);
- ``synthetic``: A vs ``m`` synthetic images drawn without replacement;
- ``blurred``: A vs B blurred by a Gaussian of sigma ``BLUR_SIGMA`` = 1 px;
- ``color_shifted``: A vs B with its stains shifted in optical-density space (H x 0.7,
  E x 1.3: less hematoxylin, more eosin, ``COLOR_SHIFT``);

each averaged over ``n_splits`` random splits (with its std). ``fd`` is the FD of all synthetic
images against all real ones (more samples, so lower bias: not comparable with the rows above);
``ratio_to_floor`` is ``synthetic / floor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

STAIN_NAMES = ("H", "E", "D")
STAIN_STATS = ("mean", "std", "p10", "p50", "p90")
LBP_BINS = 10  # uniform LBP with P = 8: P + 2 codes
GLCM_PROPS = ("contrast", "homogeneity", "energy", "correlation")
GLCM_DISTANCES = (1, 2)
FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"{s}_{t}" for s in STAIN_NAMES for t in STAIN_STATS)
    + tuple(f"rgb_{c}_bin{b}" for c in "RGB" for b in range(3))
    + ("sat_mean", "sat_std")
    + tuple(f"lbp_{b}" for b in range(LBP_BINS - 1))
    + tuple(f"glcm_{p}_d{d}" for d in GLCM_DISTANCES for p in GLCM_PROPS)
    + ("nuclei_per_kpx", "nucleus_area_px", "nuclear_fraction")
    + ("log_laplacian_var", "gradient_mean", "high_freq_fraction")
)
BLUR_SIGMA = 1.0  # px: at 1 um/px about a sixth of a nucleus; visibly soft at 64 px
COLOR_SHIFT = (0.7, 1.3, 1.0)  # optical-density factors of H, E, D: a visible, lab-to-lab sized change
HIGH_FREQ_SIGMAS = (1.0, 8.0)  # px: fine band and detail band of the high-frequency fraction


# -- images in -------------------------------------------------------------------------------------

def as_hwc_list(images) -> list[np.ndarray]:
    """Images as a list of (H, W, 3) uint8 arrays.

    Args:
        images: a uint8 tensor (N, 3, H, W) or (3, H, W); a numpy array (N, H, W, 3) or (H, W, 3);
            or a sequence of any of these single images, of PIL images, or of dataset items
            (dicts with an ``image``); a dataset (``len`` and ``[i]["image"]``) works too.

    Returns:
        One (H, W, 3) uint8 array per image (sizes may differ).

    Raises:
        ValueError: an image that is not 3-channel uint8.
    """
    if isinstance(images, torch.Tensor | np.ndarray):
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        if arr.ndim == 3:
            return [_one(arr)]
        if arr.ndim != 4:
            raise ValueError(f"expected images (N, 3, H, W) or (N, H, W, 3), got shape {arr.shape}")
        return [_one(a) for a in arr]
    return [_one(images[i]) for i in range(len(images))]


def _one(im) -> np.ndarray:
    if isinstance(im, dict):
        im = im["image"]
    if isinstance(im, torch.Tensor):
        im = im.detach().cpu().numpy()
    arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:  # CHW
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (3, H, W) or (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images, got {arr.dtype}")
    if min(arr.shape[:2]) < 8:
        raise ValueError(f"image of {arr.shape[1]}x{arr.shape[0]} px is too small for texture features (>= 8 px)")
    return np.ascontiguousarray(arr)


# -- features --------------------------------------------------------------------------------------

def tile_features(rgb: np.ndarray, diameter: float = 7.0) -> np.ndarray:
    """The ``FEATURE_NAMES`` vector (float64, 49) of one (H, W, 3) uint8 RGB tile."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2gray, rgb2hed, rgb2hsv
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    from synthgen.data.nuclei import segment_nuclei

    hed = rgb2hed(rgb)
    stain = [v for c in range(3) for v in (hed[..., c].mean(), hed[..., c].std(),
                                           *np.percentile(hed[..., c], (10, 50, 90)))]
    hist = [np.bincount((rgb[..., c] // 64).ravel(), minlength=4)[:3] / rgb[..., c].size for c in range(3)]
    sat = rgb2hsv(rgb)[..., 1]
    colour = [*np.concatenate(hist), sat.mean(), sat.std()]

    grey = rgb2gray(rgb)  # float in [0, 1]
    grey8 = (grey * 255).round().astype(np.uint8)
    lbp = local_binary_pattern(grey8, 8, 1, method="uniform")
    lbp_hist = np.bincount(lbp.astype(np.int64).ravel(), minlength=LBP_BINS)[: LBP_BINS - 1] / lbp.size
    glcm = graycomatrix(grey8 // 8, GLCM_DISTANCES, [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32,
                        symmetric=True, normed=True)
    # correlation is undefined (nan) on a flat image: no co-variation, 0
    texture = [*lbp_hist, *(np.nan_to_num(graycoprops(glcm, p)[i].mean()) for i in range(len(GLCM_DISTANCES))
                            for p in GLCM_PROPS)]

    labels = segment_nuclei(rgb, diameter=diameter)
    n = int(labels.max())
    area = float((labels > 0).sum())
    nuclei = [1000.0 * n / labels.size, area / n if n else 0.0, area / labels.size]

    lap = ndi.laplace(grey)
    grad = np.hypot(ndi.sobel(grey, 0), ndi.sobel(grey, 1))
    sharp = [np.log1p(lap.var() * 1e4), grad.mean(), _high_freq_fraction(grey)]
    return np.asarray([*stain, *colour, *texture, *nuclei, *sharp], dtype=np.float64)


def _high_freq_fraction(grey: np.ndarray) -> float:
    """Share of the detail energy at scales up to ``HIGH_FREQ_SIGMAS[1]`` px that lies at scales
    up to ``HIGH_FREQ_SIGMAS[0]`` px: var(g - G_1 g) / var(g - G_8 g), G_s a Gaussian blur of sigma
    s. Both bands are fixed in pixels, so the value does not depend on the tile size (a plain FFT
    fraction does: a larger tile adds low frequencies)."""
    from scipy import ndimage as ndi

    fine, coarse = (grey - ndi.gaussian_filter(grey, s) for s in HIGH_FREQ_SIGMAS)
    total = coarse.var()
    return float(fine.var() / total) if total > 1e-12 else 0.0


def handcrafted_features(images, diameter: float = 7.0) -> np.ndarray:
    """Hand-crafted features (N, 49) of RGB uint8 tiles, in the order of ``FEATURE_NAMES``.

    Args:
        images: a uint8 tensor (N, 3, H, W), a numpy array (N, H, W, 3), or a list of single
            images / dataset items (see :func:`as_hwc_list`); sizes may differ (>= 8 px).
        diameter: typical nucleus diameter in pixels for the nuclei features (7 at 1 um/px;
            ``synthgen.data.nuclei.nucleus_diameter_px(mpp)`` for other resolutions).

    Returns:
        float64 array (N, 49).

    Raises:
        ValueError: no images, or an image that is not 3-channel uint8.
    """
    ims = as_hwc_list(images)
    if not ims:
        raise ValueError("handcrafted_features: no images")
    return np.stack([tile_features(im, diameter) for im in ims])


def standardize(feats: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(feats - mean) / std`` with the mean and std of ``reference`` (the real set); a feature
    constant over the reference keeps its raw offset (std taken as 1)."""
    mu, sd = reference.mean(0), reference.std(0)
    return (feats - mu) / np.where(sd > 1e-12, sd, 1.0)


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    from synthgen.metrics.fidelity import frechet_distance

    return frechet_distance(torch.from_numpy(a), torch.from_numpy(b))


def handcrafted_fd(real, synth, *, real_features: np.ndarray | None = None,
                   synth_features: np.ndarray | None = None) -> float:
    """Frechet distance of the hand-crafted features of ``synth`` against ``real``, both
    standardised with the real set's feature mean and std.

    Args:
        real, synth: image sets as for :func:`handcrafted_features` (ignored where their
            precomputed ``real_features`` / ``synth_features`` are given).

    Returns:
        The FD (0 for identical sets; grows with the number of features when the sets are
        smaller than 49 images, so compare values at equal counts: :func:`encoder_free_report`).
    """
    fr = handcrafted_features(real) if real_features is None else np.asarray(real_features, np.float64)
    fs = handcrafted_features(synth) if synth_features is None else np.asarray(synth_features, np.float64)
    return _frechet(standardize(fr, fr), standardize(fs, fr))


# -- references --------------------------------------------------------------------------------------

def blur(images, sigma: float = BLUR_SIGMA) -> list[np.ndarray]:
    """Gaussian-blurred copies (sigma in px, per channel) of RGB uint8 images."""
    from scipy import ndimage as ndi

    return [np.clip(ndi.gaussian_filter(im.astype(np.float64), (sigma, sigma, 0)).round(), 0, 255).astype(np.uint8)
            for im in as_hwc_list(images)]


def color_shift(images, factors: Sequence[float] = COLOR_SHIFT) -> list[np.ndarray]:
    """Stain-shifted copies: the H, E, D optical densities of the colour deconvolution scaled by
    ``factors`` and recomposed to RGB (a stain-intensity change as between labs or batches)."""
    from skimage.color import hed2rgb, rgb2hed

    f = np.asarray(factors, dtype=np.float64)
    return [np.clip(hed2rgb(rgb2hed(im) * f) * 255, 0, 255).round().astype(np.uint8) for im in as_hwc_list(images)]


def encoder_free_report(real, synth, seed: int = 0, n_splits: int = 10, *, diameter: float = 7.0,
                        real_features: np.ndarray | None = None,
                        synth_features: np.ndarray | None = None) -> dict:
    """Encoder-free FD of ``synth`` against ``real`` with its reference scale from the same run.

    The real set is split ``n_splits`` times into two random halves A and B of ``m`` images each
    (``m`` = half the real set, or the synthetic set's size if smaller); each row is the FD of
    half A against ``m`` images: B (``floor``), ``m`` synthetic images drawn without replacement
    (``synthetic``), B Gaussian-blurred (``blurred``, sigma ``BLUR_SIGMA`` px) and B stain-shifted
    (``color_shifted``, ``COLOR_SHIFT``). Features are standardised with the whole real set's
    mean and std. Equal counts in every row give every row the same estimator bias.

    Args:
        real, synth: image sets (see :func:`handcrafted_features`); ``real`` needs >= 4 images,
            ``synth`` >= 2.
        seed: seeds the splits and subsamples.
        n_splits: random splits averaged over.
        diameter: nucleus diameter in pixels (see :func:`handcrafted_features`).
        real_features, synth_features: precomputed features of the same images (skips their
            extraction; the blurred and shifted copies still need ``real``'s images).

    Returns:
        ``{"fd", "synthetic", "floor", "blurred", "color_shifted", "ratio_to_floor",
        "ratio_blurred", "ratio_color_shifted", "n_real", "n_synthetic", "n_per_half",
        "n_splits", "n_features", "blur_sigma_px", "color_shift", "seed"}``: ``fd`` is the FD of
        all synthetic against all real images; each row is ``{"mean", "std"}`` over splits;
        ratios are row means over the floor's mean.

    Raises:
        ValueError: fewer than 4 real or 2 synthetic images.
    """
    real_ims = as_hwc_list(real)
    fr = handcrafted_features(real_ims, diameter) if real_features is None else np.asarray(real_features, np.float64)
    fs = handcrafted_features(synth, diameter) if synth_features is None else np.asarray(synth_features, np.float64)
    if len(fr) < 4 or len(fs) < 2:
        raise ValueError(f"encoder-free FD needs >= 4 real and >= 2 synthetic images (got {len(fr)}, {len(fs)})")
    fb = handcrafted_features(blur(real_ims), diameter)
    fc = handcrafted_features(color_shift(real_ims), diameter)
    zr, zs, zb, zc = (standardize(f, fr) for f in (fr, fs, fb, fc))
    m = min(len(fr) // 2, len(fs))
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {"synthetic": [], "floor": [], "blurred": [], "color_shifted": []}
    for _ in range(n_splits):
        perm = rng.permutation(len(fr))
        a, b = perm[:m], perm[m : 2 * m]
        s = rng.choice(len(fs), m, replace=False)
        rows["floor"].append(_frechet(zr[a], zr[b]))
        rows["synthetic"].append(_frechet(zr[a], zs[s]))
        rows["blurred"].append(_frechet(zr[a], zb[b]))
        rows["color_shifted"].append(_frechet(zr[a], zc[b]))
    stats = {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in rows.items()}
    floor = stats["floor"]["mean"]

    def ratio(k: str) -> float:
        return stats[k]["mean"] / floor if floor > 0 else float("inf")

    return {"fd": _frechet(zr, zs), **stats, "ratio_to_floor": ratio("synthetic"), "ratio_blurred": ratio("blurred"),
            "ratio_color_shifted": ratio("color_shifted"), "n_real": len(fr), "n_synthetic": len(fs),
            "n_per_half": m, "n_splits": n_splits, "n_features": fr.shape[1], "blur_sigma_px": BLUR_SIGMA,
            "color_shift": dict(zip(STAIN_NAMES, COLOR_SHIFT, strict=True)), "seed": seed}


ROWS = (("synthetic", "synthetic"), ("floor", "real vs real (floor)"),
        ("blurred", f"real, Gaussian blur sigma {BLUR_SIGMA:g} px"),
        ("color_shifted", "real, stain shift (H x{:g}, E x{:g})".format(*COLOR_SHIFT[:2])))


def format_report(rep: dict) -> list[str]:
    """Printable lines of an :func:`encoder_free_report` result (one row per reference)."""
    lines = [f"encoder-free FD ({rep['n_features']} hand-crafted features, standardised on real; "
             f"{rep['n_per_half']} vs {rep['n_per_half']} images per row, mean +- std over {rep['n_splits']} splits):"]
    for key, label in ROWS:
        r = rep[key]
        x = f"   x{r['mean'] / rep['floor']['mean']:.2f} floor" if rep["floor"]["mean"] > 0 else ""
        lines.append(f"  {label:38s} {r['mean']:10.3f} +- {r['std']:.3f}{x}")
    lines.append(f"  all {rep['n_synthetic']} synthetic vs all {rep['n_real']} real: FD {rep['fd']:.3f}")
    return lines


# -- realism filter ----------------------------------------------------------------------------------

class RealismFilter:
    """Rejects generated images far from every real reference tile in the standardised
    hand-crafted feature space.

    The score of an image is its Euclidean distance to the nearest reference tile (features
    standardised with the references' mean and std). The threshold is calibrated on the
    references themselves: the ``quantile`` of their leave-one-out nearest-neighbour distances
    (each reference tile to its nearest other one), times ``margin``. Leave-one-out distances
    understate how far a new real tile lies from the references (a reference tile's nearest
    neighbour is often an adjacent or overlapping tile of the same region), hence the margin.

    Measured on the bundled CMU slide (64 px at 1 um/px), references from the left two thirds,
    real tiles of the held-out right third scored: the default (0.99, margin 1.5) accepts 94% of
    them (overlapping references, 389 tiles) or 91% (non-overlapping, 94 tiles), margin 1.0 only
    62% / 77%; a flat grey tile with a black-and-white blob scores about 5x the threshold.

    Args:
        quantile: quantile of the leave-one-out distances (0.99).
        margin: factor on that quantile (1.5).
        diameter: nucleus diameter in pixels for the features.

    Example:
        >>> f = RealismFilter().fit(real_tiles)          # uint8 (N, 3, H, W), N >= 2
        >>> keep = f.accept(generated)                   # bool (M,)
    """

    def __init__(self, quantile: float = 0.99, margin: float = 1.5, diameter: float = 7.0):
        if not 0 < quantile <= 1 or margin <= 0:
            raise ValueError(f"RealismFilter: need 0 < quantile <= 1 and margin > 0 (got {quantile}, {margin})")
        self.quantile, self.margin, self.diameter = quantile, margin, diameter
        self.reference: np.ndarray | None = None  # standardised features of the references
        self.threshold: float | None = None

    def fit(self, real_images=None, *, features: np.ndarray | None = None) -> RealismFilter:
        """Set the reference tiles (their images, or their precomputed ``features``) and calibrate
        the threshold; returns ``self``.

        Raises:
            ValueError: fewer than 2 reference tiles.
        """
        f = handcrafted_features(real_images, self.diameter) if features is None else np.asarray(features, np.float64)
        if len(f) < 2:
            raise ValueError(f"RealismFilter.fit needs >= 2 reference tiles (got {len(f)})")
        self._mu, sd = f.mean(0), f.std(0)
        self._sd = np.where(sd > 1e-12, sd, 1.0)
        self.reference = (f - self._mu) / self._sd
        d = _cdist(self.reference, self.reference)
        np.fill_diagonal(d, np.inf)
        self.loo = d.min(1)
        self.threshold = float(np.quantile(self.loo, self.quantile) * self.margin)
        return self

    def scores(self, images=None, *, features: np.ndarray | None = None) -> np.ndarray:
        """Distance (N,) of each image to its nearest reference tile (standardised features)."""
        if self.reference is None:
            raise RuntimeError("RealismFilter: call fit(real_images) first")
        f = handcrafted_features(images, self.diameter) if features is None else np.asarray(features, np.float64)
        return _cdist((f - self._mu) / self._sd, self.reference).min(1)

    def accept(self, images=None, *, features: np.ndarray | None = None) -> np.ndarray:
        """Bool (N,): image i is within the threshold of some reference tile."""
        return self.scores(images, features=features) <= self.threshold

    def __len__(self) -> int:
        return 0 if self.reference is None else len(self.reference)


def _cdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T, 0.0))
