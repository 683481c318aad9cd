"""Write aligned stain pairs as pix2pix-style folders (``trainA/trainB/testA/testB``).

Virtual-staining models train from paired feature caches, and caches are built from image folders
(``synthgen cache DIR``); this module turns an aligned :class:`~synthgen.data.pairs.ImagePair`
(DeepLIIF panels, sections registered by landmarks or intensity) into such folders. Files of
the same name in ``...A`` (source stain) and ``...B`` (target stain) are the two stains of one
place, the layout :func:`synthgen.data.pairs.folder_pairs` reads back.

One section gives both splits through a spatial hold-out: a vertical band ``[x0, x1)`` of the
image (fractions of its width) is kept for testing, and training patches never overlap it, so
test patches share no pixel with training patches. Training patches can be multiplied by the
eight dihedral views (rotations and flips applied to both stains alike).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synthgen._io import atomic_save_png, atomic_write_text
from synthgen.data.pairs import ImagePair, StainError, patch_grid

__all__ = ["downsample_pair", "table_pairs", "write_pair_folders"]

TABLE_COLUMNS = ("stain", "name", "source", "target", "source_landmarks", "target_landmarks", "deepliif",
                 "downsample", "test")


def _dihedral(a: np.ndarray, k: int) -> np.ndarray:
    out = np.rot90(a, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def downsample_pair(pair: ImagePair, factor: int) -> ImagePair:
    """The pair at ``1/factor`` of its resolution (box filter; a pixel stays valid only when all the
    pixels it averages were), e.g. DeepLIIF's ~0.25 um/px panels to ~1 um/px with ``factor=4``."""
    if factor == 1:
        return pair
    if factor < 1:
        raise StainError(f"downsampling factor must be a positive integer, got {factor}")
    src, tgt = pair.load()
    h, w = (src.shape[0] // factor) * factor, (src.shape[1] // factor) * factor

    def box(a: np.ndarray) -> np.ndarray:
        a = a[:h, :w].reshape(h // factor, factor, w // factor, factor, *a.shape[2:])
        return a.mean((1, 3))

    valid = None if pair.valid is None else box(np.asarray(pair.valid, np.float32)) == 1.0
    reg = pair.registration
    if reg is not None:  # the same transform in the coordinates of the smaller images
        scale = np.diag([1.0 / factor, 1.0 / factor, 1.0])
        reg = dataclasses.replace(reg, matrix=scale @ reg.matrix @ np.linalg.inv(scale))
    return ImagePair(np.round(box(src.astype(np.float32))).astype(np.uint8),
                     np.round(box(tgt.astype(np.float32))).astype(np.uint8), pair.name, valid,
                     reg, (pair.origin[0] // factor, pair.origin[1] // factor))


def table_pairs(table: str | os.PathLike, stain: str) -> tuple[list[ImagePair], list[tuple[float, float] | None]]:
    """The aligned pairs of one target stain listed in a pair split file, with each one's test band.

    The CSV has the columns :data:`TABLE_COLUMNS`, one row per pair of images; relative paths are
    relative to the CSV. ``deepliif`` 1: ``source`` is a DeepLIIF strip (no ``target``); else the
    sections are registered (by the landmark files when both are given, else by intensity).
    ``downsample``: integer shrink factor. ``test``: empty (training only), ``all`` (a held-out
    image) or ``x0:x1`` (a held-out vertical band, fractions of the width).

    Raises:
        StainError: a missing column or file, a bad value (naming the row), or no row for ``stain``.
    """
    import csv

    from synthgen.data.pairs import deepliif_pair, register_sections, resolve_stain

    table = Path(table)
    want = resolve_stain(stain)
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in TABLE_COLUMNS if rows and c not in rows[0]]
    if missing or not rows:
        raise StainError(f"{table}: needs the columns {', '.join(TABLE_COLUMNS)}" + (f"; missing {', '.join(missing)}"
                                                                                   if missing else " and rows"))
    pairs, bands = [], []
    for i, row in enumerate(rows, start=2):
        where = f"{table}, line {i} ({row['name'] or row['source']})"
        if resolve_stain(row["stain"]) != want:
            continue
        files = {k: (table.parent / row[k]).resolve() if row[k] else None
                 for k in ("source", "target", "source_landmarks", "target_landmarks")}
        for key, f in files.items():
            if f is not None and not f.is_file():
                raise StainError(f"{where}: {key} {f} does not exist")
        test = (row["test"] or "").strip()
        try:
            factor = int(row["downsample"] or 1)
            band = None if not test else (0.0, 1.0) if test == "all" else tuple(float(v) for v in test.split(":"))
            if band is not None and not (len(band) == 2 and 0.0 <= band[0] < band[1] <= 1.0):
                raise ValueError
        except ValueError:
            raise StainError(f"{where}: downsample must be an integer and test empty, 'all' or x0:x1 with "
                             f"0 <= x0 < x1 <= 1; got {row['downsample']!r}, {test!r}") from None
        if row["deepliif"] in ("1", "true", "yes"):
            pair = deepliif_pair(files["source"])
        elif row["target"]:
            pair = register_sections(files["source"], files["target"], files["source_landmarks"],
                                     files["target_landmarks"])
        else:
            raise StainError(f"{where}: a pair of sections needs a target (or deepliif = 1 for a DeepLIIF strip)")
        pair = downsample_pair(pair, factor)
        pair.name = row["name"] or pair.name
        pairs.append(pair)
        bands.append(band)
    if not pairs:
        raise StainError(f"{table}: no pairs for stain {want!r}")
    return pairs, bands


def write_pair_folders(pairs: Sequence[ImagePair], out: str | os.PathLike, size: int, stride: int | None = None,
                       test_stride: int | None = None, min_tissue: float = 0.5,
                       holdout: tuple[float, float] | Sequence[tuple[float, float] | None] | None = None,
                       dihedral: bool = False) -> dict:
    """Cut aligned patch pairs and write them as ``out/{train,test}{A,B}/<name>_<x>_<y>[_v].png``.

    Args:
        pairs: aligned in-memory pairs (source, target already in one frame).
        out: output folder (created; existing files of the same names are replaced).
        size: patch side in pixels.
        stride: training patch stride (default ``size``); ``test_stride`` for test patches
            (default ``size``: non-overlapping test patches are closer to independent samples).
        min_tissue: tissue fraction each patch needs in both stains (see
            :func:`synthgen.data.pairs.patch_grid`).
        holdout: ``(x0, x1)`` fractions of the width: patches inside the band go to ``test``,
            patches that do not touch it to ``train``; None writes ``train`` only. A list gives
            one such band (or None) per pair, e.g. from :func:`table_pairs`.
        dihedral: write the eight rotations/flips of each training patch (suffix ``_0`` .. ``_7``).

    Returns:
        counts per split and the settings, also written to ``out/pairs.json``.

    Raises:
        StainError: a pair is not in memory, a band is not inside [0, 1], or no patch passes.
    """
    per_pair = isinstance(holdout, list)
    if per_pair and len(holdout) != len(pairs):
        raise StainError(f"{len(holdout)} holdout bands for {len(pairs)} pairs")
    for band in holdout if per_pair else [holdout]:
        if band is not None and not 0.0 <= band[0] < band[1] <= 1.0:
            raise StainError(f"holdout band must be two fractions 0 <= x0 < x1 <= 1 of the width, got {band}")
    out = Path(out)
    dirs = {d: out / d for d in ("trainA", "trainB", "testA", "testB")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    for k, pair in enumerate(pairs):
        pair_holdout = holdout[k] if per_pair else holdout
        if not (isinstance(pair.source, np.ndarray) and isinstance(pair.target, np.ndarray)):
            raise StainError(f"{pair.name}: write_pair_folders needs in-memory pairs (register or align them first)")
        W = pair.source.shape[1]
        band = None if pair_holdout is None else (int(round(pair_holdout[0] * W)), int(round(pair_holdout[1] * W)))
        train_valid = test_valid = pair.valid
        if band is not None:
            inside = np.zeros(pair.source.shape[:2], bool)
            inside[:, band[0] : band[1]] = True
            ok = np.ones_like(inside) if pair.valid is None else np.asarray(pair.valid, bool)
            train_valid, test_valid = ok & ~inside, ok & inside
        grids = {}
        if train_valid is None or np.asarray(train_valid).any():
            grids["train"] = patch_grid(pair.source, pair.target, size, stride, min_tissue, train_valid)
        if band is not None:
            grids["test"] = patch_grid(pair.source, pair.target, size, test_stride or size, min_tissue, test_valid)
        for split, corners in grids.items():
            for x, y in corners:
                a = pair.source[y : y + size, x : x + size]
                b = pair.target[y : y + size, x : x + size]
                views = range(8) if (dihedral and split == "train") else [None]
                for v in views:
                    name = f"{pair.name}_{x}_{y}" + ("" if v is None else f"_{v}") + ".png"
                    atomic_save_png(a if v is None else _dihedral(a, v), dirs[split + "A"] / name)
                    atomic_save_png(b if v is None else _dihedral(b, v), dirs[split + "B"] / name)
                    counts[split] += 1
    if counts["train"] + counts["test"] == 0:
        raise StainError(f"no {size} px patch passes min_tissue={min_tissue} "
                         "(lower it, or check the registration's valid region)")
    info = {"counts": counts, "size": size, "stride": stride or size, "test_stride": test_stride or size,
            "min_tissue": min_tissue, "holdout": None if not holdout or per_pair else list(holdout), "dihedral": dihedral,
            "pairs": [{"name": p.name, "holdout": list(b) if b else None, "registration": None if p.registration is None else p.registration.method,
                       "ncc": None if p.registration is None or math.isnan(p.registration.ncc) else p.registration.ncc,
                       "error_px": None if p.registration is None or math.isnan(p.registration.error_px)
                       else p.registration.error_px}
                      for p, b in zip(pairs, holdout if per_pair else [holdout] * len(pairs), strict=True)]}
    atomic_write_text(out / "pairs.json", json.dumps(info, indent=1))
    return info
