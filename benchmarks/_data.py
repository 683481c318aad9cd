"""The held-out split of the bundled CC0 slide the default small pipeline was trained and
evaluated on: 64 px tiles at 1 um/px (overlap 32 px), left two thirds for training, right third
held out (as in ``checkpoints/synthgen-small-cmu/README.md``)."""

from __future__ import annotations

from pathlib import Path


def cmu_split(folder: Path) -> tuple[Path, Path]:
    """Write ``train.csv`` and ``holdout.csv`` tile tables into ``folder``; returns their paths."""
    from synthgen.assets import SAMPLE_SLIDE
    from synthgen.data.slides import Slide
    from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table

    out = []
    for name, roi in (("train", (0, 0, 0.67, 1)), ("holdout", (0.67, 0, 1, 1))):
        with Slide(SAMPLE_SLIDE) as s:
            tiles = tile_slide(s, TileSpec(mpp=1.0, size=64, overlap=32, roi=roi), key="cmu")
        out.append(write_tile_table(tiles, Path(folder) / f"{name}.csv", {"cmu": {"path": str(SAMPLE_SLIDE)}}))
    return out[0], out[1]


def v2_tables(folder: Path, masked_only: bool = False) -> Path:
    """``folder`` with the train / val / test tile tables of the v2 recipes (0.5 um/px, 128 px,
    training overlap 64, as ``synthgen splits ... --train-overlap 64``), built once if absent;
    ``masked_only``: only the images with expert nuclei masks (``--masked-only``)."""
    from synthgen.data.splits import DEFAULT_SPLIT_FILE, build_split_tables

    if not (Path(folder) / "test.csv").exists():
        build_split_tables(DEFAULT_SPLIT_FILE, folder, mpp=0.5, size=128, train_overlap=64, masked_only=masked_only,
                           progress=False)
    return Path(folder)


def v2_split(folder: Path, split: str = "test", mpp: float = 0.5, size: int = 128) -> Path:
    """The tile table of one split of the default family's data definition
    (``recipes/data/default_v2.csv``), written into ``folder``."""
    from synthgen.data.splits import DEFAULT_SPLIT_FILE, build_split_tables

    return build_split_tables(DEFAULT_SPLIT_FILE, folder, mpp=mpp, size=size, progress=False)[split]
