"""Tissue detection on a thumbnail and grid tiling at a physical resolution.

The tissue mask follows the usual recipe of WSI toolkits (CLAM, tiatoolbox): Otsu threshold on
the saturation channel of a low-resolution thumbnail, removal of small objects, hole filling.
Tiles are laid on a regular grid in level-0 pixels and kept when their tissue fraction is high
enough. The table of tiles never holds a file name: slides are named by :func:`slide_key`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from synthgen._io import atomic_path, atomic_write_text
from synthgen.data.slides import Slide, slide_key
from synthgen.errors import SynthgenError, TissueError

TILE_COLUMNS = ("slide_key", "x", "y", "mpp", "size", "tissue_fraction")


@dataclass(frozen=True)
class TileSpec:
    """How to cut tiles from a slide.

    Args:
        mpp: output resolution in microns per pixel (0.5 is about 20x, 0.25 about 40x).
        size: tile side in output pixels.
        overlap: overlap between neighbouring tiles, in output pixels (stride = size - overlap).
        min_tissue: keep tiles whose tissue fraction is at least this (0 keeps every tile).
        mask_mpp: resolution of the tissue-detection thumbnail; None picks a resolution where
            a tile spans at least 8 thumbnail pixels, capped at 8 um/px.
        min_object_um2: tissue fragments smaller than this area (square microns) are dropped.
        roi: keep only tiles inside this box (x0, y0, x1, y1), given as fractions of the slide's
            width and height; e.g. (0, 0, 0.67, 1) for training and (0.67, 0, 1, 1) held out.
        align_to_roi: lay the grid from the roi's top-left corner instead of the slide's, so that a
            narrow box (a region split) is filled from its edge.
    """

    mpp: float = 0.5
    size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    mask_mpp: float | None = None
    min_object_um2: float = 5_000.0
    roi: tuple[float, float, float, float] | None = None
    align_to_roi: bool = False

    def __post_init__(self):
        _check(self.mpp > 0 and math.isfinite(self.mpp), "mpp", self.mpp, "a positive number of microns per pixel")
        _check(isinstance(self.size, int) and self.size > 0, "size", self.size, "a positive integer")
        _check(isinstance(self.overlap, int) and 0 <= self.overlap < self.size, "overlap", self.overlap,
               f"an integer in [0, size={self.size})")
        _check(0.0 <= self.min_tissue <= 1.0, "min_tissue", self.min_tissue, "a fraction in [0, 1]")
        _check(self.mask_mpp is None or self.mask_mpp > 0, "mask_mpp", self.mask_mpp, "a positive number or None")
        _check(self.min_object_um2 >= 0, "min_object_um2", self.min_object_um2, "a non-negative area")
        _check(self.roi is None or (len(self.roi) == 4 and 0 <= self.roi[0] < self.roi[2] <= 1
                                    and 0 <= self.roi[1] < self.roi[3] <= 1),
               "roi", self.roi, "(x0, y0, x1, y1) fractions with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    def thumbnail_mpp(self, slide_mpp: float) -> float:
        if self.mask_mpp is not None:
            return max(self.mask_mpp, slide_mpp)
        return max(slide_mpp, min(8.0, self.size * self.mpp / 8.0))


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"TileSpec.{field} = {value!r}: must be {allowed}")


def tissue_mask(rgb: np.ndarray, mpp: float, min_object_um2: float = 5_000.0) -> np.ndarray:
    """Boolean tissue mask of a thumbnail.

    Args:
        rgb: (H, W, 3) uint8 thumbnail.
        mpp: its resolution, used to convert ``min_object_um2`` to pixels.
        min_object_um2: smallest tissue fragment kept, in square microns; holes smaller than
            this inside tissue are filled.

    Returns:
        (H, W) bool array, True on tissue.
    """
    from skimage import color, filters, morphology

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"tissue_mask expects an (H, W, 3) RGB array, got shape {rgb.shape}")
    sat = color.rgb2hsv(rgb)[..., 1]
    sat = filters.median(sat, morphology.disk(2)) if min(sat.shape) > 8 else sat
    gray = rgb.mean(axis=2)
    if sat.max() - sat.min() < 0.02:  # uniform image: Otsu would split noise
        return np.zeros(sat.shape, bool)
    thr = filters.threshold_otsu(sat)
    # Saturated and not background-white nor pen/black-ish: dark pixels with low value are kept out.
    mask = (sat > max(thr, 0.05)) & (gray < 245) & (gray > 15)
    min_px = int(min_object_um2 / (mpp * mpp))
    if min_px > 1:
        mask = morphology.remove_small_objects(mask, max_size=min_px)
        mask = morphology.remove_small_holes(mask, max_size=min_px)
    return mask



@dataclass(frozen=True)
class Tile:
    """One tile: level-0 top-left corner, resolution, size and tissue fraction."""

    slide_key: str
    x: int
    y: int
    mpp: float
    size: int
    tissue_fraction: float


def tile_slide(slide: Slide, spec: TileSpec, key: str | None = None) -> list[Tile]:
    """Grid tiles of one slide with at least ``spec.min_tissue`` tissue.

    Args:
        slide: an open slide.
        spec: resolution, size, overlap and tissue threshold.
        key: the slide key written in each tile (default: hashed key of the file).

    Returns:
        Tiles in row-major order.

    Raises:
        TissueError: no tissue was detected on the slide, or no tile reaches ``min_tissue``.
    """
    key = key if key is not None else slide_key(slide.path)
    tmpp = spec.thumbnail_mpp(slide.mpp)
    thumb = slide.thumbnail(tmpp)
    mask = tissue_mask(thumb, tmpp, spec.min_object_um2)
    if spec.min_tissue > 0 and not mask.any():
        raise TissueError(f"{slide.path}: no tissue detected (thumbnail at {tmpp:.3g} um/px is blank or uniform)")
    # Integral image of the mask gives each tile's tissue fraction in O(1).
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    tile_l0 = spec.size * spec.mpp / slide.mpp  # tile side in level-0 pixels
    stride_l0 = spec.stride * spec.mpp / slide.mpp
    W0, H0 = slide.dimensions
    rx0, ry0, rx1, ry1 = (0.0, 0.0, 1.0, 1.0) if spec.roi is None else spec.roi
    f = slide.mpp / tmpp  # level-0 px -> thumbnail px
    tiles = []
    ox, oy = (math.ceil(rx0 * W0), math.ceil(ry0 * H0)) if spec.align_to_roi else (0, 0)
    ny = int((H0 - oy - tile_l0) // stride_l0) + 1 if H0 - oy >= tile_l0 else 0
    nx = int((W0 - ox - tile_l0) // stride_l0) + 1 if W0 - ox >= tile_l0 else 0
    for j in range(ny):
        y = oy + int(round(j * stride_l0))
        y0, y1 = int(math.floor(y * f)), max(int(math.floor(y * f)) + 1, int(math.ceil((y + tile_l0) * f)))
        y1 = min(y1, mask.shape[0])
        for i in range(nx):
            x = ox + int(round(i * stride_l0))
            x0, x1 = int(math.floor(x * f)), max(int(math.floor(x * f)) + 1, int(math.ceil((x + tile_l0) * f)))
            x1 = min(x1, mask.shape[1])
            area = (y1 - y0) * (x1 - x0)
            frac = 0.0 if area <= 0 else float(
                integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
            inside = rx0 * W0 <= x and x + tile_l0 <= rx1 * W0 and ry0 * H0 <= y and y + tile_l0 <= ry1 * H0
            if inside and frac >= spec.min_tissue:
                tiles.append(Tile(key, x, y, spec.mpp, spec.size, round(frac, 4)))
    if not tiles:
        raise TissueError(
            f"{slide.path}: no {spec.size} px tile at {spec.mpp} um/px has tissue fraction >= {spec.min_tissue} "
            f"(slide is {W0}x{H0} px at {slide.mpp:.4g} um/px; tissue covers {mask.mean():.1%} of it)"
        )
    return tiles


# -- the tile table ----------------------------------------------------------------------
def write_tile_table(tiles: Iterable[Tile], path: str | os.PathLike, slides: dict[str, dict] | None = None) -> Path:
    """Write tiles as CSV (or Parquet for a ``.parquet`` path), atomically.

    Args:
        tiles: the tiles.
        path: output table.
        slides: optional ``{slide_key: {"path": ..., "mpp": ...}}``; written beside the table as
            ``<table>.slides.json`` so that datasets can reopen the slides. That side file holds
            local paths: keep it private, it is never part of an export.

    Returns:
        The table path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(t) for t in tiles]
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            pa, pq = _pyarrow()
            pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema(pa)), tmp)
        else:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=TILE_COLUMNS)
                w.writeheader()
                w.writerows(rows)
    if slides is not None:
        atomic_write_text(slides_json_path(path), json.dumps(slides, indent=1, sort_keys=True))
    return path


def read_tile_table(path: str | os.PathLike) -> list[Tile]:
    """Read a table written by :func:`write_tile_table`.

    Raises:
        SynthgenError: missing file or missing columns (names them).
    """
    path = Path(path)
    if not path.exists():
        raise SynthgenError(f"{path}: no such tile table")
    if path.suffix == ".parquet":
        _, pq = _pyarrow()
        rows = pq.read_table(path).to_pylist()
        cols = set(rows[0]) if rows else set(TILE_COLUMNS)
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            cols = set(reader.fieldnames or ())
    missing = [c for c in TILE_COLUMNS if c not in cols]
    if missing:
        raise SynthgenError(f"{path}: tile table lacks column(s) {', '.join(missing)}")
    try:
        return [Tile(str(r["slide_key"]), int(r["x"]), int(r["y"]), float(r["mpp"]), int(r["size"]),
                     float(r["tissue_fraction"])) for r in rows]
    except (TypeError, ValueError) as e:
        raise SynthgenError(f"{path}: malformed row in tile table ({e})") from e


def slides_json_path(table: str | os.PathLike) -> Path:
    table = Path(table)
    return table.with_name(table.name + ".slides.json")


def read_slides_json(table: str | os.PathLike) -> dict[str, dict]:
    side = slides_json_path(table)
    if not side.exists():
        raise SynthgenError(
            f"{side}: missing; it maps slide keys to slide files (written by `synthgen tile`). "
            "Pass slides={key: path} to the dataset instead."
        )
    return json.loads(side.read_text())


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise SynthgenError("Parquet tables need pyarrow: pip install 'synthgen[parquet]' (or use a .csv path)") from e
    return pa, pq


def _arrow_schema(pa):
    return pa.schema([("slide_key", pa.string()), ("x", pa.int64()), ("y", pa.int64()), ("mpp", pa.float64()),
                      ("size", pa.int64()), ("tissue_fraction", pa.float64())])


def find_slides(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into slide/image files (folders: known suffixes, sorted)."""
    from synthgen.data.slides import IMAGE_SUFFIXES, SLIDE_SUFFIXES

    out: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in SLIDE_SUFFIXES + IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out
