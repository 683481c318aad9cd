"""One data definition: source images, their labels and their disjoint train / val / test split.

A *split file* is a CSV with one row per source image (or per region of a slide), the only place
that says which real data a model family sees and which it is judged on:

=============  ==============================================================================
column         meaning
=============  ==============================================================================
``path``       the image or slide file, relative to the split file's folder
``source``     dataset name (``cmu``, ``monuseg``, ``consep``, ``kather2016``, ...)
``label``      tissue class where known (Kather class), else empty
``group``      the unit that never crosses splits: slide, MoNuSeg image, CoNSeP image id
``mpp``        level-0 microns per pixel (overrides the file's metadata; empty: from the file)
``split``      ``train``, ``val`` or ``test``
``roi``        ``x0 y0 x1 y1`` fractions of the image kept for this row (empty: all of it); a
               slide that is the only one of its kind is split by region, and its group then
               appears in several splits with disjoint boxes
``min_tissue`` tiles need at least this tissue fraction (0 for curated tiles such as Kather's)
``mask``       optional column: a label map (e.g. expert nuclei instances) on the image's own
               pixel grid, relative like ``path``; empty where there is none
=============  ==============================================================================

:func:`build_split_tables` reads every row at one resolution into tiles of one size and writes a
tile table per split (``train.csv``, ``val.csv``, ``test.csv``) that :class:`PatchDataset` and
``synthgen cache`` read, with the labels as extra columns (``source``, ``label``, ``group``).
Mask files go into the table's ``.slides.json``; a table whose every image has one gives its items
a ``mask`` (read at the tile's scale), so its cache trains the mask branch
(``masked_only=True`` / ``synthgen splits --masked-only`` keeps only those images).
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from synthgen._io import atomic_write_text
from synthgen.data.tiling import TILE_COLUMNS, Tile, TileSpec, slides_json_path, tile_slide
from synthgen.errors import SynthgenError

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "source", "label", "group", "mpp", "split", "roi", "min_tissue")
LABEL_COLUMNS = ("source", "label", "group")

#: the default family's data definition (shipped with the package's recipes)
DEFAULT_SPLIT_FILE = Path(__file__).resolve().parents[2] / "recipes" / "data" / "default_v2.csv"


@dataclass(frozen=True)
class SourceImage:
    """One row of a split file (paths resolved)."""

    path: Path
    source: str
    label: str
    group: str
    mpp: float | None
    split: str
    roi: tuple[float, float, float, float] | None
    min_tissue: float
    mask: Path | None = None


def read_split_file(path: str | os.PathLike) -> list[SourceImage]:
    """Read and validate a split file.

    Raises:
        SynthgenError: a missing file or column, a bad value (named by row and column), an image
            that does not exist, or a group in two splits without disjoint regions.
    """
    path = Path(path)
    if not path.is_file():
        raise SynthgenError(f"{path}: no such split file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in SPLIT_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise SynthgenError(f"{path}: split file lacks column(s) {', '.join(missing)}")
        rows = list(reader)
    out = []
    for i, r in enumerate(rows, start=2):  # line numbers as an editor shows them
        where = f"{path}, line {i}"
        file = (path.parent / r["path"]).resolve()
        if not file.exists():
            raise SynthgenError(f"{where}: path: {file} does not exist")
        if r["split"] not in SPLITS:
            raise SynthgenError(f"{where}: split: {r['split']!r} is not one of {', '.join(SPLITS)}")
        try:
            mpp = float(r["mpp"]) if r["mpp"].strip() else None
            roi = tuple(float(v) for v in r["roi"].split()) if r["roi"].strip() else None
            min_tissue = float(r["min_tissue"]) if r["min_tissue"].strip() else 0.5
        except ValueError as e:
            raise SynthgenError(f"{where}: malformed mpp, roi or min_tissue ({e})") from e
        if mpp is not None and not mpp > 0:
            raise SynthgenError(f"{where}: mpp: must be a positive number of microns per pixel, got {mpp}")
        if roi is not None and not (len(roi) == 4 and 0 <= roi[0] < roi[2] <= 1 and 0 <= roi[1] < roi[3] <= 1):
            raise SynthgenError(f"{where}: roi: must be 'x0 y0 x1 y1' fractions with x0 < x1 and y0 < y1")
        if not 0 <= min_tissue <= 1:
            raise SynthgenError(f"{where}: min_tissue: must be a fraction in [0, 1], got {min_tissue}")
        if not r["group"].strip() or not r["source"].strip():
            raise SynthgenError(f"{where}: source and group must not be empty")
        mask = (path.parent / r["mask"]).resolve() if (r.get("mask") or "").strip() else None
        if mask is not None and not mask.is_file():
            raise SynthgenError(f"{where}: mask: {mask} does not exist")
        out.append(SourceImage(file, r["source"], r["label"], r["group"], mpp, r["split"], roi, min_tissue, mask))
    _check_disjoint(out, path)
    return out


def _check_disjoint(rows: list[SourceImage], path: Path) -> None:
    """A group may cross splits only by region, and its regions must not overlap."""
    by_group: dict[str, list[SourceImage]] = {}
    for r in rows:
        by_group.setdefault(r.group, []).append(r)
    for group, rs in by_group.items():
        if len({r.split for r in rs}) < 2:
            continue
        boxes = [(r.roi or (0.0, 0.0, 1.0, 1.0), r) for r in rs]
        for i, (a, ra) in enumerate(boxes):
            for b, rb in boxes[i + 1:]:
                overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                if ra.split != rb.split and (overlap or ra.path != rb.path):
                    raise SynthgenError(f"{path}: group {group!r} is in both {ra.split} and {rb.split} "
                                        "without disjoint regions of one image: splits would leak")


def build_split_tables(split_file: str | os.PathLike, out_dir: str | os.PathLike, *, mpp: float = 0.5,
                       size: int = 128, train_overlap: int = 0, masked_only: bool = False,
                       progress: bool = True) -> dict[str, Path]:
    """Tile every row of a split file at ``mpp`` into ``size`` px tiles, one table per split.

    Training tiles may overlap (``train_overlap`` pixels); validation and test tiles never do.
    ``masked_only`` keeps only the rows with a ``mask`` (tables for the mask branch).

    Returns:
        ``{split: table path}`` for the splits that received tiles.

    Raises:
        SynthgenError: the split file is invalid, or an image cannot be read.
    """
    from tqdm.auto import tqdm

    from synthgen.data.slides import Slide, slide_key

    rows = read_split_file(split_file)
    if masked_only:
        rows = [r for r in rows if r.mask is not None]
        if not rows:
            raise SynthgenError(f"{split_file}: no row has a mask (the mask column is empty or absent)")
    out_dir = Path(out_dir)
    tiles: dict[str, list[tuple[Tile, SourceImage]]] = {s: [] for s in SPLITS}
    slides: dict[str, dict] = {}
    for r in tqdm(rows, desc="tiling", unit="image", disable=not progress):
        overlap = train_overlap if r.split == "train" else 0
        spec = TileSpec(mpp=mpp, size=size, overlap=overlap, min_tissue=r.min_tissue, roi=r.roi,
                        align_to_roi=True)
        key = slide_key(r.path)
        with Slide(r.path, mpp=r.mpp) as s:
            try:
                found = tile_slide(s, spec, key)
            except SynthgenError:  # an image too small or without tissue at this scale gives no tiles
                found = []
            slides[key] = {"path": str(r.path), "mpp": s.mpp} | ({"mask": str(r.mask)} if r.mask else {})
        tiles[r.split] += [(t, r) for t in found]
    written = {}
    for split, items in tiles.items():
        if items:
            written[split] = write_labelled_table(items, out_dir / f"{split}.csv", slides)
    summary = {split: dict(Counter(r.source for _, r in items)) for split, items in tiles.items()}
    atomic_write_text(out_dir / "summary.json", json.dumps(
        {"split_file": str(Path(split_file).resolve()), "mpp": mpp, "size": size, "train_overlap": train_overlap,
         "masked_only": masked_only, "tiles": summary}, indent=1))
    return written


def write_labelled_table(items: list[tuple[Tile, SourceImage]], path: Path, slides: dict[str, dict]) -> Path:
    """A tile table (CSV) with the label columns after the tile columns, atomically, plus its
    ``.slides.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = {t.slide_key for t, _ in items}
    lines = [",".join(TILE_COLUMNS + LABEL_COLUMNS)]
    for t, r in items:
        lines.append(",".join(str(v) for v in (t.slide_key, t.x, t.y, t.mpp, t.size, t.tissue_fraction,
                                                r.source, r.label, r.group)))
    atomic_write_text(path, "\n".join(lines) + "\n")
    atomic_write_text(slides_json_path(path), json.dumps({k: slides[k] for k in sorted(keys)}, indent=1))
    return path


def read_tile_labels(table: str | os.PathLike) -> list[dict[str, str]]:
    """The label columns (``source``, ``label``, ``group``) of a table from :func:`build_split_tables`,
    row by row in table order.

    Raises:
        SynthgenError: the table has no label columns.
    """
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        if not set(LABEL_COLUMNS) <= set(reader.fieldnames or ()):
            raise SynthgenError(f"{table}: not a labelled tile table (no {', '.join(LABEL_COLUMNS)} columns)")
        return [{c: r[c] for c in LABEL_COLUMNS} for r in reader]
