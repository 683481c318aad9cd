"""``synthgen tile``: slides -> tile table."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from synthgen.cli.options import mpp_option


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("tiles.csv"), show_default=True,
              help="Tile table to write (.csv, or .parquet with the 'parquet' extra). A private side file "
                   "<out>.slides.json maps slide keys to the slide paths.")
@mpp_option("Resolution of the tiles in microns per pixel (0.5 ~ 20x, 0.25 ~ 40x).", default=0.5)
@click.option("--size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tile side in pixels at --mpp.")
@click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Overlap of neighbouring tiles in pixels at --mpp (stride = size - overlap).")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Keep tiles whose tissue fraction is at least this.")
@mpp_option("Level-0 resolution of the slides, for files without resolution metadata "
            "(overrides the metadata when given).", name="--slide-mpp")
@mpp_option("Resolution of the tissue-detection thumbnail [default: a tile spans >= 8 px, at most 8 um/px].",
            name="--mask-mpp")
@click.option("--roi", default=None, metavar="X0,Y0,X1,Y1",
              help="Keep only tiles inside this box, in fractions of each slide's width and height "
                   "(e.g. 0,0,0.67,1 to train and 0.67,0,1,1 to hold out the right third).")
@click.option("--keep-names", is_flag=True,
              help="Use file names as slide keys instead of content hashes. File names can be patient "
                   "barcodes: only for data you may share by name.")
@click.option("--skip-errors", is_flag=True,
              help="Report unreadable slides and slides without tissue, and go on with the others "
                   "(exit status 1 if any was skipped).")
@click.option("--preview", type=click.Path(path_type=Path), default=None,
              help="Folder for one PNG per slide showing the kept tiles on the thumbnail.")
def tile(inputs, out, mpp, size, overlap, min_tissue, slide_mpp, mask_mpp, roi, keep_names, skip_errors, preview):
    """Detect tissue and cut INPUTS (slide files or folders of slides) into a tile table.

    The table has one row per tile: slide_key, x, y (level-0 pixels), mpp, size and
    tissue_fraction. Slide keys are content hashes, so file names never enter the table.

    Example: synthgen tile CMU-1-Small-Region.svs --mpp 1.0 --size 128 -o tiles.csv
    """
    from synthgen.config import ConfigError
    from synthgen.workflows.tile import TileJob
    from synthgen.workflows.tile import tile as run_tile

    try:
        box = tuple(float(v) for v in roi.split(",")) if roi else None
    except ValueError as e:
        raise click.BadParameter(f"{roi!r}: expected four numbers X0,Y0,X1,Y1", param_hint="--roi") from e
    job = TileJob(inputs=inputs, out=out, mpp=mpp, size=size, overlap=overlap, min_tissue=min_tissue,
                  slide_mpp=slide_mpp, mask_mpp=mask_mpp, roi=box, keep_names=keep_names, skip_errors=skip_errors,
                  preview=preview)
    try:
        result = run_tile(job, on_skip=lambda msg: click.echo(f"skipped: {msg}", err=True))
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
    click.echo(f"{result.num_tiles} tiles from {result.num_slides} slide(s) at {mpp} um/px, {size} px -> {out}")
    if result.skipped:
        click.echo(f"{len(result.skipped)} slide(s) skipped", err=True)
        sys.exit(1)
