"""Paired stains for virtual staining: stain names, registration, aligned patch pairs, datasets.

- Stain registry: canonical names (``he``, ``ki67``, ``her2``, ``panck``...) with aliases,
  matched case- and punctuation-insensitively by :func:`resolve_stain`.
- Registration of consecutive sections, always as a 3x3 affine matrix that maps *moving* pixel
  coordinates ``(x, y, 1)`` to *fixed* pixel coordinates:

  * from landmarks (ANHIR CSV files): least-squares affine fit, residual error in pixels;
  * from intensities when there are no landmarks: both images become tissue density, a
    saturating optical density (so H&E and IHC look alike: tissue dense, glass zero); a coarse
    search over rotations with a centre-of-mass and phase-correlation start, then Adam on the
    six affine parameters, coarse to fine, maximising the normalised cross-correlation (NCC) of
    the densities (bilinear sampling with its analytic gradient, in numpy: no torch thread pool
    to fight over on a busy CPU).

- :func:`warp_to` resamples the moving image into the fixed frame; :func:`patch_grid` and
  :func:`cut_pairs` cut aligned patch pairs where both images hold tissue.
- :class:`PairedStainDataset` serves patch pairs from DeepLIIF strips (registered to a few
  pixels by DeepLIIF, aligned here by phase correlation), registered consecutive sections, and
  paired folders in the BCI layout (``HE/<split>``, ``IHC/<split>``) or the pix2pix / MIST
  layout (``<split>A``, ``<split>B``).

Images are uint8 RGB arrays (H, W, 3); the dataset yields uint8 (3, H, W) tensors like
:mod:`synthgen.data.datasets`.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from synthgen.data.slides import IMAGE_SUFFIXES
from synthgen.errors import RegistrationError, SlideError, StainError

# -- stain registry ------------------------------------------------------------------------
# canonical name -> aliases (matched after lower-casing and dropping everything but a-z, 0-9)
STAINS: dict[str, tuple[str, ...]] = {
    "he": ("H&E", "HE", "H and E", "hematoxylin-eosin", "haematoxylin and eosin", "hematoxylin and eosin"),
    "hematoxylin": ("haematoxylin", "H", "hema", "hematoxylin only"),
    "ki67": ("Ki-67", "MKI67", "MIB-1", "MIB1"),
    "her2": ("HER-2", "HER2/neu", "ERBB2", "c-erbB-2"),
    "er": ("ER", "estrogen receptor", "oestrogen receptor", "ESR1", "ER-alpha"),
    "pr": ("PR", "PgR", "progesterone receptor"),
    "panck": ("PanCK", "pan-CK", "pancytokeratin", "pan-cytokeratin", "cytokeratin", "AE1/AE3"),
    "cd31": ("CD-31", "PECAM-1", "PECAM1"),
    "cd3": ("CD-3",),
    "cd8": ("CD-8",),
    "p53": ("TP53",),
}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_key(a): canon for canon, aliases in STAINS.items() for a in (canon, *aliases)}


def resolve_stain(name: str) -> str:
    """Canonical name of a stain: ``"Ki-67"`` -> ``"ki67"``, ``"PanCytokeratin"`` -> ``"panck"``.

    Raises:
        StainError: unknown name (the message lists the known names).
    """
    canon = _ALIASES.get(_key(str(name)))
    if canon is None:
        raise StainError(f"unknown stain {name!r}; known stains: {', '.join(STAINS)} "
                         "(aliases such as 'H&E', 'Ki-67', 'PanCytokeratin', 'HER2/neu' work too)")
    return canon


# -- landmarks and affine fit ---------------------------------------------------------------
def read_landmarks(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Landmarks of an ANHIR CSV file: point ids and (N, 2) float ``(x, y)`` pixel coordinates.

    ANHIR files have a header ``,X,Y`` and an index column; a file with only ``X,Y`` columns
    gets its row numbers as ids.

    Raises:
        RegistrationError: missing file, no X/Y columns, non-numeric values.
    """
    path = Path(path)
    if not path.is_file():
        raise RegistrationError(f"{path}: no such landmark file")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise RegistrationError(f"{path}: empty landmark file")
    header = [h.strip().lower() for h in rows[0]]
    if "x" not in header or "y" not in header:
        raise RegistrationError(f"{path}: landmark file needs X and Y columns (header: {rows[0]})")
    ix, iy = header.index("x"), header.index("y")
    id_col = next((i for i, h in enumerate(header) if i not in (ix, iy)), None)
    ids, xy = [], []
    for n, row in enumerate(rows[1:]):
        if not any(c.strip() for c in row):
            continue
        try:
            xy.append((float(row[ix]), float(row[iy])))
        except (ValueError, IndexError) as e:
            raise RegistrationError(f"{path}: line {n + 2} is not a landmark ({row}): {e}") from None
        ids.append(row[id_col].strip() if id_col is not None else str(n))
    return ids, np.asarray(xy, dtype=np.float64).reshape(-1, 2)


def matched_landmarks(moving: str | os.PathLike, fixed: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Points of two landmark files paired by id (ANHIR files may hold different numbers of points).

    Returns:
        ``(moving_xy, fixed_xy)``, both (N, 2), row i of one matching row i of the other.

    Raises:
        RegistrationError: fewer than 3 common ids.
    """
    mid, mxy = read_landmarks(moving)
    fid, fxy = read_landmarks(fixed)
    fpos = {k: i for i, k in enumerate(fid)}
    common = [(i, fpos[k]) for i, k in enumerate(mid) if k in fpos]
    if len(common) < 3:
        raise RegistrationError(f"{moving} and {fixed} share {len(common)} landmark ids; an affine fit needs 3")
    mi, fi = map(list, zip(*common, strict=True))
    return mxy[mi], fxy[fi]


def fit_affine(moving_xy: np.ndarray, fixed_xy: np.ndarray) -> np.ndarray:
    """Least-squares affine transform mapping ``moving_xy`` onto ``fixed_xy``.

    Args:
        moving_xy, fixed_xy: (N, 2) corresponding points, N >= 3, not all on one line.

    Returns:
        (3, 3) matrix ``A`` with ``A @ [x, y, 1]`` the fixed position of moving point ``(x, y)``.

    Raises:
        RegistrationError: too few, mismatched or collinear points.
    """
    src, dst = np.asarray(moving_xy, np.float64), np.asarray(fixed_xy, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
        raise RegistrationError(f"landmarks must be two (N, 2) arrays of the same shape, got {src.shape} and {dst.shape}")
    if len(src) < 3:
        raise RegistrationError(f"an affine fit needs at least 3 landmark pairs, got {len(src)}")
    X = np.hstack([src, np.ones((len(src), 1))])
    if np.linalg.matrix_rank(X - X.mean(0) * [1, 1, 0]) < 3:
        raise RegistrationError("landmarks are collinear (or repeated): the affine fit is undetermined")
    sol, *_ = np.linalg.lstsq(X, dst, rcond=None)  # (3, 2): [x y 1] @ sol = [x' y']
    return np.vstack([sol.T, [0.0, 0.0, 1.0]])


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map (N, 2) points with a (3, 3) or (2, 3) affine matrix."""
    m = _as3x3(matrix)
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    return xy @ m[:2, :2].T + m[:2, 2]


def landmark_errors(matrix: np.ndarray, moving_xy: np.ndarray, fixed_xy: np.ndarray) -> np.ndarray:
    """Per-landmark registration error in fixed pixels: ``|A(moving) - fixed|`` (TRE on held-out points)."""
    return np.linalg.norm(apply_affine(matrix, moving_xy) - np.asarray(fixed_xy, np.float64), axis=1)


def _as3x3(matrix) -> np.ndarray:
    m = np.asarray(matrix, np.float64)
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if m.shape != (3, 3):
        raise RegistrationError(f"an affine matrix is (2, 3) or (3, 3), got shape {m.shape}")
    return m


@dataclass(frozen=True)
class Registration:
    """Result of registering a moving image onto a fixed one.

    Attributes:
        matrix: (3, 3) affine, moving pixel ``(x, y, 1)`` -> fixed pixel.
        method: ``"landmarks"``, ``"intensity"`` or ``"translation"``.
        error_px: mean landmark residual of the fit in fixed pixels (landmarks; optimistic,
            see :func:`landmark_errors` for held-out points), NaN for intensity registration.
        ncc: normalised cross-correlation of the optical densities after registration, at the
            finest level optimised (intensity registration), NaN otherwise.
    """

    matrix: np.ndarray
    method: str
    error_px: float = math.nan
    ncc: float = math.nan


def register_landmarks(moving: str | os.PathLike | np.ndarray, fixed: str | os.PathLike | np.ndarray) -> Registration:
    """Affine registration from landmarks: two ANHIR CSV files, or two (N, 2) point arrays."""
    if isinstance(moving, (str, os.PathLike)) and isinstance(fixed, (str, os.PathLike)):
        mxy, fxy = matched_landmarks(moving, fixed)
    else:
        mxy, fxy = np.asarray(moving, np.float64), np.asarray(fixed, np.float64)
    m = fit_affine(mxy, fxy)
    return Registration(m, "landmarks", error_px=float(landmark_errors(m, mxy, fxy).mean()))


# -- intensity registration -----------------------------------------------------------------
def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean optical density over RGB, ``-log10(I / 255)``: glass ~0, stained tissue > 0."""
    x = np.asarray(rgb, dtype=np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"optical_density expects an (H, W, 3) RGB image, got shape {x.shape}")
    return (-np.log10((x + 1.0) / 256.0)).mean(-1)


TISSUE_OD_SCALE = 0.1  # optical density at which tissue_density reaches 1 - 1/e


def tissue_density(rgb: np.ndarray, scale: float = TISSUE_OD_SCALE) -> np.ndarray:
    """Saturating optical density ``1 - exp(-OD / scale)`` in [0, 1): the image registration works on.

    Glass is ~0 and any stained tissue approaches 1 whatever the stain, so an H&E section and a
    pale IHC section of the next slice look alike, while nuclei and fibres still give texture.
    On the ANHIR rat kidney (H&E vs PanCytokeratin) registering raw optical density misses by
    about 20 px (the stains' intensities disagree inside the tissue), this by about 5 px, the
    landmark fit's own residual.
    """
    return 1.0 - np.exp(-optical_density(rgb) / scale)


def register_intensity(
    fixed: np.ndarray,
    moving: np.ndarray,
    *,
    angles: Sequence[float] = tuple(range(-30, 31, 5)),
    levels: Sequence[int] | None = None,
    iterations: int = 100,
    lr: float = 0.01,
    init: np.ndarray | None = None,
) -> Registration:
    """Affine registration of two RGB images by maximising NCC of their tissue densities.

    Coarse to fine: at the coarsest level every angle in ``angles`` is tried (rotation about the
    tissue centres of mass plus a phase-correlation shift) and the best by NCC starts Adam on the
    six affine parameters; each finer level refines the previous result.

    Args:
        fixed, moving: uint8 RGB images (H, W, 3); sizes may differ.
        angles: rotations (degrees) tried at the coarsest level; ignored when ``init`` is given.
        levels: downsampling factors, coarse to fine (default: powers of 2 from a coarsest level
            about 96 px on the long side, halving up to twice while the long side stays within
            320 px: a 512 px tile is registered at 4x and 2x, a 1200 px section at 16x, 8x, 4x).
        iterations: Adam steps per level.
        lr: Adam learning rate (parameters are in units of half the fixed image's long side).
        init: optional (3, 3) moving -> fixed start matrix (e.g. from a few landmarks).

    Returns:
        :class:`Registration` with ``method="intensity"`` and the final NCC.

    Raises:
        RegistrationError: one of the images has no tissue (uniform optical density).
    """
    fod, mod = tissue_density(fixed), tissue_density(moving)
    for name, od, img in (("fixed", fod, fixed), ("moving", mod, moving)):
        if float(od.std()) < 1e-3:
            raise RegistrationError(f"{name} image {img.shape} has no contrast to register (blank?)")
    if levels is None:
        long_side = max(*fod.shape, *mod.shape)
        coarse = max(1, 2 ** round(math.log2(max(long_side / 96, 1))))
        levels = [f for f in (coarse, coarse // 2, coarse // 4) if f >= 1 and long_side / f <= 320] or [1]
    levels = [int(f) for f in levels]
    S = max(fod.shape) / 2.0
    cf = np.array([fod.shape[1] - 1, fod.shape[0] - 1], np.float64) / 2
    cm = np.array([mod.shape[1] - 1, mod.shape[0] - 1], np.float64) / 2

    geo = _Geometry(S, cf, cm)
    pyramid = {f: _Level(fod, mod, f) for f in levels}
    if init is not None:
        inv = np.linalg.inv(_as3x3(init))
    else:
        inv = _search_start(pyramid[levels[0]], geo, angles)
    p = geo.to_params(inv)
    ncc = math.nan
    for f in levels:
        level, adam = pyramid[f], _Adam(p, lr * f / levels[0])
        for k in range(iterations):
            ncc, grad = level.ncc(geo.from_params(p), geo, with_grad=True)
            # cosine-annealed step size (the parameters are normalised: S px per unit)
            p = adam.step(-grad, 0.5 * (1 + math.cos(math.pi * k / iterations)))
        ncc, _ = level.ncc(geo.from_params(p), geo)
    return Registration(np.linalg.inv(geo.from_params(p)), "intensity", ncc=float(ncc))


@dataclass(frozen=True)
class _Geometry:
    """The optimised parameters: the fixed -> moving map ``x_m = B x_f + t`` written as
    ``(x_m - cm) / S = B (x_f - cf) / S + d``, so that all six have comparable scales."""

    S: float
    cf: np.ndarray
    cm: np.ndarray

    def to_params(self, inv: np.ndarray) -> np.ndarray:
        B = inv[:2, :2]
        return np.concatenate([B.ravel(), (B @ self.cf + inv[:2, 2] - self.cm) / self.S])

    def from_params(self, p: np.ndarray) -> np.ndarray:
        B, d = p[:4].reshape(2, 2), p[4:]
        inv = np.eye(3)
        inv[:2, :2], inv[:2, 2] = B, self.cm + self.S * d - B @ self.cf
        return inv


class _Level:
    """One pyramid level: both tissue densities area-averaged by ``f`` and lightly smoothed, and
    the full-resolution coordinates of the fixed level's pixel centres."""

    def __init__(self, fod: np.ndarray, mod: np.ndarray, f: int):
        self.f, self.F, self.M = f, _downsample(fod, f), _downsample(mod, f)
        h, w = self.F.shape
        gx, gy = np.meshgrid((np.arange(w) + 0.5) * f - 0.5, (np.arange(h) + 0.5) * f - 0.5)
        self.X = np.stack([gx.ravel(), gy.ravel()], 1)
        self.Fv = self.F.ravel()
        self.Mp = np.pad(self.M, 1)  # zero border: samples outside the moving image read glass

    def sample(self, inv: np.ndarray):
        """Bilinear samples of the moving level at ``inv`` (fixed -> moving) of the fixed pixel
        centres, their derivatives along moving x and y (per full-resolution px), and the in-bounds mask."""
        q = ((self.X @ inv[:2, :2].T + inv[:2, 2]) + 0.5) / self.f - 0.5  # moving level coordinates
        hm, wm = self.M.shape
        inside = (q[:, 0] >= -0.5) & (q[:, 0] <= wm - 0.5) & (q[:, 1] >= -0.5) & (q[:, 1] <= hm - 0.5)
        qx, qy = np.clip(q[:, 0], -1, wm), np.clip(q[:, 1], -1, hm)
        x0, y0 = np.floor(qx).astype(np.int64), np.floor(qy).astype(np.int64)
        ax, ay = qx - x0, qy - y0
        x0, y0 = np.clip(x0 + 1, 0, wm), np.clip(y0 + 1, 0, hm)  # indices into the padded image
        m00, m01 = self.Mp[y0, x0], self.Mp[y0, x0 + 1]
        m10, m11 = self.Mp[y0 + 1, x0], self.Mp[y0 + 1, x0 + 1]
        top, bottom = m00 + ax * (m01 - m00), m10 + ax * (m11 - m10)
        v = top + ay * (bottom - top)
        dx = ((1 - ay) * (m01 - m00) + ay * (m11 - m10)) / self.f
        dy = (bottom - top) / self.f
        return v, np.stack([dx, dy], 1), inside.astype(np.float64)

    def ncc(self, inv: np.ndarray, geo: _Geometry, with_grad: bool = False):
        """NCC of fixed and warped moving over the in-bounds pixels, and its gradient in the
        parameters of ``geo`` (the mask is held fixed: it moves only at the image border)."""
        v, dv, w = self.sample(inv)
        n = max(w.sum(), 1.0)
        fc = (self.Fv - (self.Fv * w).sum() / n) * w
        mc = (v - (v * w).sum() / n) * w
        nf, nm = np.sqrt((fc * fc).sum()), np.sqrt((mc * mc).sum())
        if nf == 0 or nm == 0:
            return 0.0, np.zeros(6)
        ncc = float((fc * mc).sum() / (nf * nm))
        if not with_grad:
            return ncc, None
        g = fc / (nf * nm) - ncc * mc / (nm * nm)  # d ncc / d v_i (the centring terms sum to 0)
        G = g[:, None] * dv  # d ncc / d x_m, (N, 2)
        grad_B = G.T @ (self.X - geo.cf)  # x_m = B (x_f - cf) + cm + S d
        return ncc, np.concatenate([grad_B.ravel(), geo.S * G.sum(0)])


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    """Area average by ``f`` (cropping the remainder), then a Gaussian of 1 level pixel."""
    from skimage.filters import gaussian

    if f > 1:
        h, w = img.shape[0] // f, img.shape[1] // f
        img = img[: h * f, : w * f].reshape(h, f, w, f).mean((1, 3))
    return gaussian(img.astype(np.float64), sigma=1.0)


class _Adam:
    """Adam (Kingma & Ba 2015) on a parameter vector, with a step-size multiplier per step."""

    def __init__(self, p: np.ndarray, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps = p.astype(np.float64), lr, *betas, eps
        self.m, self.v, self.t = np.zeros_like(self.p), np.zeros_like(self.p), 0

    def step(self, grad: np.ndarray, scale: float = 1.0) -> np.ndarray:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad * grad
        mhat, vhat = self.m / (1 - self.b1**self.t), self.v / (1 - self.b2**self.t)
        self.p = self.p - self.lr * scale * mhat / (np.sqrt(vhat) + self.eps)
        return self.p


def _centre_of_mass(img: np.ndarray, f: int) -> np.ndarray:
    """Full-resolution (x, y) centre of a level's density above its glass level."""
    w = np.clip(img - np.percentile(img, 5), 0, None)
    ys, xs = np.indices(img.shape)
    total = w.sum() or 1.0
    return np.array([(xs * w).sum(), (ys * w).sum()]) / total * f + (f - 1) / 2


def _search_start(level: _Level, geo: _Geometry, angles) -> np.ndarray:
    """Best fixed -> moving start over rotations about the centres of mass, each with and without
    the phase-correlation shift of the rotated image, by NCC at the coarsest level."""
    from skimage.registration import phase_cross_correlation

    f = level.f
    cf_, cm_ = _centre_of_mass(level.F, f), _centre_of_mass(level.M, f)
    best, best_ncc = None, -np.inf
    for a in angles:
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        inv = np.eye(3)
        inv[:2, :2] = [[c, -s], [s, c]]
        inv[:2, 2] = cm_ - inv[:2, :2] @ cf_
        shifted = inv.copy()
        warped = level.sample(inv)[0].reshape(level.F.shape)
        (dy, dx), *_ = phase_cross_correlation(level.F, warped, normalization=None)
        shifted[:2, 2] = cm_ - inv[:2, :2] @ (cf_ + np.array([dx, dy]) * f)
        for cand in (inv, shifted):
            val, _ = level.ncc(cand, geo)
            if val > best_ncc:
                best, best_ncc = cand, val
    return best


def _ncc_np(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> float:
    n = max(w.sum(), 1.0)
    ac, bc = (a - (a * w).sum() / n) * w, (b - (b * w).sum() / n) * w
    den = np.sqrt((ac * ac).sum() * (bc * bc).sum())
    return float((ac * bc).sum() / den) if den > 0 else 0.0


# -- warping and patch pairs ----------------------------------------------------------------
def warp_to(fixed_shape: Sequence[int], moving_image: np.ndarray, affine: np.ndarray, *, order: int = 1,
            fill: float = 255) -> np.ndarray:
    """Resample ``moving_image`` into the fixed image's frame.

    Args:
        fixed_shape: the fixed image's shape (H, W[, C]); only H and W are used.
        moving_image: (H, W) or (H, W, C) array.
        affine: (3, 3) or (2, 3) moving -> fixed matrix (:attr:`Registration.matrix`).
        order: interpolation order (0 nearest, for masks and labels; 1 bilinear).
        fill: value outside the moving image (255: white glass for RGB images).

    Returns:
        Array of shape (fixed H, fixed W[, C]) and the moving image's dtype.
    """
    from skimage.transform import AffineTransform, warp

    inv = np.linalg.inv(_as3x3(affine))
    img = np.asarray(moving_image)
    out = warp(img.astype(np.float64), AffineTransform(matrix=inv), output_shape=tuple(fixed_shape[:2]),
               order=order, mode="constant", cval=float(fill), preserve_range=True)
    if img.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(img.dtype)


def valid_region(fixed_shape: Sequence[int], moving_shape: Sequence[int], affine: np.ndarray) -> np.ndarray:
    """(H, W) bool: fixed pixels whose source lies inside the moving image."""
    ones = np.ones(tuple(moving_shape[:2]), np.uint8)
    return warp_to(fixed_shape, ones, affine, order=0, fill=0).astype(bool)


GLASS_OD = 0.05  # optical density under which a pixel is glass (transmits more than 89% of white)


def patch_grid(source: np.ndarray, target: np.ndarray, size: int, stride: int | None = None,
               min_tissue: float = 0.5, valid: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of aligned patches worth pairing.

    A patch is kept when it lies inside ``valid`` (where the registered target has data) and at
    least ``min_tissue`` of its pixels are tissue in both images. Tissue is optical density above
    :data:`GLASS_OD`, a rule that holds for any stain; the saturation mask of
    :func:`synthgen.data.tiling.tissue_mask` is made for H&E and misses pale IHC (it finds 7% of
    the ANHIR PanCytokeratin kidney section against 53% of the H&E one).

    Args:
        source, target: (H, W, 3) uint8 images in the same frame (the target already warped).
        size: patch side in pixels; ``stride`` defaults to ``size``.
        min_tissue: tissue fraction threshold in [0, 1]; 0 keeps every patch inside ``valid``.
        valid: optional (H, W) bool mask of usable pixels.

    Raises:
        StainError: the images differ in size or are smaller than one patch.
    """
    if source.shape[:2] != target.shape[:2]:
        raise StainError(f"source {source.shape[:2]} and target {target.shape[:2]} differ in size: "
                         "warp the target to the source frame first (warp_to)")
    H, W = source.shape[:2]
    stride = stride or size
    if size > min(H, W):
        raise StainError(f"patch size {size} is larger than the images ({W}x{H})")
    ok = np.ones((H, W), bool) if valid is None else np.asarray(valid, bool)
    integral_valid = _integral(ok)
    if min_tissue > 0:
        integral_tissue = _integral((optical_density(source) > GLASS_OD) & (optical_density(target) > GLASS_OD) & ok)
    out = []
    for y in range(0, H - size + 1, stride):
        for x in range(0, W - size + 1, stride):
            if _box(integral_valid, x, y, size) < size * size:
                continue
            if min_tissue > 0 and _box(integral_tissue, x, y, size) < min_tissue * size * size:
                continue
            out.append((x, y))
    return out


def _integral(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _box(integral: np.ndarray, x: int, y: int, size: int) -> int:
    return int(integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x])


def cut_pairs(source: np.ndarray, target: np.ndarray, size: int, stride: int | None = None,
              min_tissue: float = 0.5, valid: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Aligned patch pairs ``(source_patch, target_patch, (x, y))`` at the corners of :func:`patch_grid`."""
    return [(source[y : y + size, x : x + size], target[y : y + size, x : x + size], (x, y))
            for x, y in patch_grid(source, target, size, stride, min_tissue, valid)]


# -- image pairs ----------------------------------------------------------------------------
def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A plain image file as uint8 RGB (H, W, 3).

    Raises:
        SlideError: missing or unreadable file (names it).
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise SlideError(f"{path}: cannot read image ({e})") from e


@dataclass
class ImagePair:
    """A source image and its target stain in the same pixel frame.

    ``source`` and ``target`` are uint8 RGB arrays, or file paths read when an item is asked for
    (paired folders). ``valid`` marks the pixels where a registered target has data;
    ``registration`` is how the target was brought into the pair's frame (None: already aligned);
    ``origin`` is the pair's top-left ``(x, y)`` in the source image it was cropped from.
    """

    source: np.ndarray | Path
    target: np.ndarray | Path
    name: str
    valid: np.ndarray | None = None
    registration: Registration | None = field(default=None, repr=False)
    origin: tuple[int, int] = (0, 0)

    def shape(self) -> tuple[int, int]:
        """(H, W) of the pair (read from the file header for paths)."""
        if isinstance(self.source, np.ndarray):
            return self.source.shape[:2]
        with Image.open(self.source) as im:
            return im.height, im.width

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        src = self.source if isinstance(self.source, np.ndarray) else read_rgb(self.source)
        tgt = self.target if isinstance(self.target, np.ndarray) else read_rgb(self.target)
        if src.shape != tgt.shape:
            raise StainError(f"{self.name}: source is {src.shape[1]}x{src.shape[0]} but target is "
                             f"{tgt.shape[1]}x{tgt.shape[0]}")
        return src, tgt


DEEPLIIF_PANELS = {"ki67_ihc": 0, "hematoxylin": 1, "dapi": 2, "lap2": 3, "ki67_if": 4, "segmentation": 5}


def deepliif_pair(path: str | os.PathLike, source_panel: int = 1, target_panel: int = 0, align: bool = True) -> ImagePair:
    """Split a DeepLIIF strip (six square panels side by side, see :data:`DEEPLIIF_PANELS`) into a pair.

    The default pair is the hematoxylin-only panel (source) and the Ki67 IHC panel (target). The
    panels come from one slide re-imaged after restaining and are registered only to within a few
    pixels (in the sample strips the IHC panel sits about 7 px off the others). With ``align``
    the residual translation is measured by phase correlation of the hematoxylin channels (the
    one stain both panels share), the target is shifted by it, and both panels are cropped to
    the rows and columns where they overlap (``origin`` says where the crop starts in the
    source panel; the other panels, e.g. the segmentation, line up with the source panel).

    Raises:
        StainError: the image is not a strip of six square panels.
    """
    strip = read_rgb(path)
    h, w = strip.shape[:2]
    if w != 6 * h:
        raise StainError(f"{path}: a DeepLIIF strip is six square panels side by side (width = 6 x height), "
                         f"this image is {w}x{h}")
    src, tgt = (np.ascontiguousarray(strip[:, i * h : (i + 1) * h]) for i in (source_panel, target_panel))
    if not align:
        return ImagePair(src, tgt, Path(path).stem)
    reg = register_translation(src, tgt)
    warped = warp_to(src.shape, tgt, reg.matrix)
    valid = valid_region(src.shape, tgt.shape, reg.matrix)  # a rectangle for a translation
    rows, cols = np.nonzero(valid.any(1))[0], np.nonzero(valid.any(0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.eye(3)
    crop[:2, 2] = (-x0, -y0)  # matrices refer to the cropped source frame
    return ImagePair(src[y0:y1, x0:x1].copy(), warped[y0:y1, x0:x1].copy(), Path(path).stem,
                     registration=Registration(crop @ reg.matrix, reg.method, ncc=reg.ncc), origin=(int(x0), int(y0)))


def register_translation(fixed: np.ndarray, moving: np.ndarray, channel: str = "hematoxylin",
                         upsample: int = 10) -> Registration:
    """Translation-only registration of two same-size RGB images by phase correlation.

    Args:
        fixed, moving: uint8 RGB (H, W, 3).
        channel: ``"hematoxylin"`` (colour deconvolution, for images that share the
            counterstain) or ``"od"`` (total optical density, :func:`optical_density`).
        upsample: sub-pixel precision 1/upsample px.

    Returns:
        :class:`Registration` (``method="translation"``, ``ncc`` of the chosen channel after the shift).
    """
    from skimage.color import rgb2hed
    from skimage.registration import phase_cross_correlation

    if fixed.shape != moving.shape:
        raise RegistrationError(f"translation registration needs same-size images, got {fixed.shape} and {moving.shape}")
    if channel == "hematoxylin":
        a, b = rgb2hed(fixed)[..., 0], rgb2hed(moving)[..., 0]
    elif channel == "od":
        a, b = optical_density(fixed), optical_density(moving)
    else:
        raise ValueError(f"channel must be 'hematoxylin' or 'od', got {channel!r}")
    (dy, dx), *_ = phase_cross_correlation(a, b, upsample_factor=upsample, normalization=None)
    m = np.eye(3)
    m[:2, 2] = (dx, dy)  # moving (x, y) lands at fixed (x + dx, y + dy)
    ncc = _ncc_np(a, warp_to(a.shape, b, m, fill=0), valid_region(a.shape, b.shape, m).astype(np.float64))
    return Registration(m, "translation", ncc=ncc)


def register_sections(source: str | os.PathLike | np.ndarray, target: str | os.PathLike | np.ndarray,
                      source_landmarks: str | os.PathLike | None = None,
                      target_landmarks: str | os.PathLike | None = None, **intensity_kw) -> ImagePair:
    """Register a target section (e.g. IHC) onto a consecutive source section (e.g. H&E).

    With both landmark files the affine fit is used, otherwise :func:`register_intensity`
    (``intensity_kw`` go to it). The target is warped into the source frame.
    """
    name = Path(source).stem if isinstance(source, (str, os.PathLike)) else "pair"
    src = read_rgb(source) if isinstance(source, (str, os.PathLike)) else np.asarray(source)
    tgt = read_rgb(target) if isinstance(target, (str, os.PathLike)) else np.asarray(target)
    if (source_landmarks is None) != (target_landmarks is None):
        raise RegistrationError("pass both source_landmarks and target_landmarks, or neither")
    if source_landmarks is not None:
        reg = register_landmarks(target_landmarks, source_landmarks)
    else:
        reg = register_intensity(src, tgt, **intensity_kw)
    warped = warp_to(src.shape, tgt, reg.matrix)
    return ImagePair(src, warped, name, valid_region(src.shape, tgt.shape, reg.matrix), reg)


def folder_pairs(root: str | os.PathLike, split: str = "train", layout: str | None = None) -> tuple[list[ImagePair], str]:
    """Image pairs of a paired folder, matched by file name (stem).

    Layouts:
        ``"bci"``: ``root/HE/<split>/*`` and ``root/IHC/<split>/*`` (the BCI dataset).
        ``"pix2pix"``: ``root/<split>A/*`` and ``root/<split>B/*`` (pix2pix, MIST's ``TrainValAB``).

    Args:
        root: dataset folder.
        split: ``train``, ``test``, ``val``...
        layout: one of the above; None detects it.

    Returns:
        ``(pairs, layout)``.

    Raises:
        StainError: no known layout, an empty folder, names on one side only, different sizes.
    """
    root = Path(root)
    candidates = {"bci": (root / "HE" / split, root / "IHC" / split),
                  "pix2pix": (root / f"{split}A", root / f"{split}B")}
    if layout is None:
        layout = next((k for k, (a, b) in candidates.items() if a.is_dir() and b.is_dir()), None)
        if layout is None:
            raise StainError(f"{root}: no paired folders for split {split!r}: expected HE/{split} + IHC/{split} "
                             f"(BCI) or {split}A + {split}B (pix2pix/MIST)")
    if layout not in candidates:
        raise StainError(f"unknown paired-folder layout {layout!r}; known: {', '.join(candidates)}")
    a_dir, b_dir = candidates[layout]
    sides = []
    for d in (a_dir, b_dir):
        if not d.is_dir():
            raise StainError(f"{d}: no such folder ({layout} layout)")
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise StainError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)})")
        by_stem: dict[str, Path] = {}
        for p in files:
            if p.stem in by_stem:
                raise StainError(f"{d}: {by_stem[p.stem].name} and {p.name} have the same name; cannot pair by name")
            by_stem[p.stem] = p
        sides.append(by_stem)
    a, b = sides
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        def some(names, side):
            return ", ".join(side[n].name for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        parts = [f"only in {a_dir}: {some(only_a, a)}" if only_a else "",
                 f"only in {b_dir}: {some(only_b, b)}" if only_b else ""]
        raise StainError("unpaired images (a pair needs the same file name on both sides); "
                         + "; ".join(p for p in parts if p))
    pairs = []
    for stem in sorted(a):
        sizes = []
        for path in (a[stem], b[stem]):
            try:
                with Image.open(path) as im:
                    sizes.append(im.size)
            except OSError as e:
                raise StainError(f"{path}: cannot read image ({e})") from e
        if sizes[0] != sizes[1]:
            raise StainError(f"{a[stem]} is {sizes[0][0]}x{sizes[0][1]} but {b[stem]} is {sizes[1][0]}x{sizes[1][1]}: "
                             "paired images must have the same size")
        pairs.append(ImagePair(a[stem], b[stem], stem))
    return pairs, layout


# -- dataset --------------------------------------------------------------------------------
def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    rgb = np.array(rgb) if not rgb.flags.writeable else np.ascontiguousarray(rgb)  # images read by Pillow are read-only
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class PairedStainDataset(Dataset):
    """Aligned patch pairs of a source stain (usually H&E) and a target stain.

    Every item is a dict: ``image`` (source, uint8 tensor 3 x H x W), ``target`` (same shape,
    the target stain at the same place), ``stain`` (canonical target stain name), ``index``.

    Args:
        pairs: aligned image pairs (:func:`deepliif_pair`, :func:`register_sections`,
            :func:`folder_pairs`).
        target_stain: stain of the targets (any alias, see :func:`resolve_stain`).
        source_stain: stain of the sources.
        size: patch side in pixels; None gives one item per whole pair (all pairs must then have
            the same size to batch).
        stride: patch stride (default ``size``).
        min_tissue: tissue fraction a patch needs in both images (in-memory pairs only; pairs
            read from files are not filtered, their images are read when an item is asked for).
        transform: optional ``transform(image, target) -> (image, target)`` on the uint8
            tensors, applied jointly (torchvision v2 transforms use the same random parameters
            for both).

    Raises:
        StainError: unknown stain, no pairs, no patch passing the filters.
    """

    def __init__(self, pairs: Sequence[ImagePair], target_stain: str, source_stain: str = "he",
                 size: int | None = 256, stride: int | None = None, min_tissue: float = 0.5,
                 transform: Callable | None = None):
        self.target_stain, self.source_stain = resolve_stain(target_stain), resolve_stain(source_stain)
        self.pairs = list(pairs)
        if not self.pairs:
            raise StainError("PairedStainDataset: no image pairs")
        self.size, self.transform = size, transform
        self.patches: list[tuple[int, int, int]] = []  # (pair index, x, y)
        for k, p in enumerate(self.pairs):
            if size is None:
                self.patches.append((k, 0, 0))
            elif isinstance(p.source, np.ndarray) and isinstance(p.target, np.ndarray):
                self.patches += [(k, x, y) for x, y in patch_grid(p.source, p.target, size, stride, min_tissue, p.valid)]
            else:
                H, W = p.shape()
                s = stride or size
                self.patches += [(k, x, y) for y in range(0, H - size + 1, s) for x in range(0, W - size + 1, s)]
        if not self.patches:
            raise StainError(f"PairedStainDataset: no {size} px patch of {len(self.pairs)} pair(s) passes "
                             f"min_tissue={min_tissue} (and lies where the registered target has data)")

    @classmethod
    def from_deepliif(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], size: int | None = 256,
                      stride: int | None = None, min_tissue: float = 0.0, **kw) -> PairedStainDataset:
        """Hematoxylin panel -> Ki67 IHC panel of DeepLIIF strips (a file, a folder, or a list of files)."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files = []
        for p in map(Path, paths):
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        if not files:
            raise StainError(f"no DeepLIIF strips in {', '.join(map(str, paths))}")
        kw.setdefault("target_stain", "ki67")
        kw.setdefault("source_stain", "hematoxylin")
        return cls([deepliif_pair(f) for f in files], size=size, stride=stride, min_tissue=min_tissue, **kw)

    @classmethod
    def from_sections(cls, source: str | os.PathLike, target: str | os.PathLike, target_stain: str,
                      source_landmarks: str | os.PathLike | None = None,
                      target_landmarks: str | os.PathLike | None = None, size: int | None = 256,
                      stride: int | None = None, min_tissue: float = 0.5, registration: dict | None = None,
                      **kw) -> PairedStainDataset:
        """Consecutive sections, registered by landmarks when given, else by intensity
        (``registration`` holds keyword arguments of :func:`register_intensity`)."""
        pair = register_sections(source, target, source_landmarks, target_landmarks, **(registration or {}))
        return cls([pair], target_stain, size=size, stride=stride, min_tissue=min_tissue, **kw)

    @classmethod
    def from_folders(cls, root: str | os.PathLike, split: str = "train", target_stain: str | None = None,
                     layout: str | None = None, size: int | None = None, stride: int | None = None,
                     **kw) -> PairedStainDataset:
        """Paired folders (see :func:`folder_pairs`); BCI targets default to HER2, other layouts
        need ``target_stain``. ``size=None`` gives whole images, else a grid of patches per image."""
        pairs, layout = folder_pairs(root, split, layout)
        if target_stain is None:
            if layout != "bci":
                raise StainError(f"{root}: pass target_stain= for a {layout} folder (known: {', '.join(STAINS)})")
            target_stain = "her2"
        return cls(pairs, target_stain, size=size, stride=stride, min_tissue=0.0, **kw)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        k, x, y = self.patches[i]
        src, tgt = self.pairs[k].load()
        if self.size is not None:
            src, tgt = src[y : y + self.size, x : x + self.size], tgt[y : y + self.size, x : x + self.size]
        image, target = _to_tensor(src), _to_tensor(tgt)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return {"image": image, "target": target, "stain": self.target_stain, "index": i}
