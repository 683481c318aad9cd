"""``synthgen splits``: a split file -> one tile table per split."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import mpp_option


@click.command("splits")
@click.argument("split_file", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Folder for train.csv, val.csv, test.csv (tile tables with source/label/group columns, "
                   "each with its private .slides.json) and summary.json.")
@mpp_option("Resolution of the tiles in microns per pixel.", default=0.5)
@click.option("--size", type=click.IntRange(min=1), default=128, show_default=True, help="Tile side in pixels.")
@click.option("--train-overlap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Overlap of neighbouring training tiles in pixels (validation and test tiles never overlap).")
@click.option("--masked-only", is_flag=True,
              help="Keep only the images with a label map in the mask column; their tiles then carry the "
                   "mask into `synthgen cache` (data for the mask branch).")
def splits(split_file, out, mpp, size, train_overlap, masked_only):
    """Tile every image of SPLIT_FILE into disjoint train / val / test tile tables.

    SPLIT_FILE is a CSV with one row per source image or slide region: path (relative to the
    CSV), source, label, group (the unit that never crosses splits), mpp, split, roi, min_tissue,
    and optionally mask (a label map on the image's pixel grid); see synthgen/data/splits.py.
    The default family's is recipes/data/default_v2.csv.

    Examples:

      synthgen splits recipes/data/default_v2.csv -o runs/data/v2 --train-overlap 64

      synthgen splits recipes/data/default_v2.csv -o runs/data/v2_masks --train-overlap 64 --masked-only
    """
    import json

    from synthgen.data.splits import build_split_tables

    if train_overlap >= size:
        raise click.BadParameter(f"must be smaller than --size {size}", param_hint="--train-overlap")
    tables = build_split_tables(split_file, out, mpp=mpp, size=size, train_overlap=train_overlap,
                                masked_only=masked_only)
    counts = json.loads((Path(out) / "summary.json").read_text())["tiles"]
    for split, path in tables.items():
        by_source = ", ".join(f"{k} {v}" for k, v in counts[split].items())
        click.echo(f"{split}: {sum(counts[split].values())} tiles ({by_source}) -> {path}")
