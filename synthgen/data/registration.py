"""Registration of two stains of one tissue, always as a 3x3 affine matrix that maps *moving*
pixel coordinates ``(x, y, 1)`` to *fixed* pixel coordinates:

- from landmarks (ANHIR CSV files): least-squares affine fit, residual error in pixels;
- from intensities when there are no landmarks: both images become tissue density, a saturating
  optical density (so H&E and IHC look alike: tissue dense, glass zero); a coarse search over
  rotations with a centre-of-mass and phase-correlation start, then Adam on the six affine
  parameters, coarse to fine, maximising the normalised cross-correlation (NCC) of the densities
  (bilinear sampling with its analytic gradient, in numpy: no torch thread pool to fight over on
  a busy CPU);
- translation only, by phase correlation, for images already registered to a few pixels
  (DeepLIIF panels).

:func:`warp_to` resamples the moving image into the fixed frame and :func:`valid_region` says
where it has data. Paired datasets built on these are in :mod:`synthgen.data.pairs`.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthgen.errors import RegistrationError


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


# -- translation only --------------------------------------------------------------------------
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
