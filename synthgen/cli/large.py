"""``synthgen large``: one image larger than a tile, as a pyramidal TIFF."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import (
    class_option,
    guidance_option,
    mpp_option,
    seed_option,
    steps_option,
)


@click.command()
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Pyramidal TIFF to write (a PNG preview is written beside it).")
@click.option("--size", type=click.IntRange(min=8), default=512, show_default=True, help="Image side in pixels.")
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="Slide or image whose region (--x, --y, --size at --mpp) is re-synthesised: each window is "
                   "conditioned on the embedding of the matching real crop.")
@click.option("--x", type=int, default=0, show_default=True, help="Region left edge, level-0 pixels.")
@click.option("--y", type=int, default=0, show_default=True, help="Region top edge, level-0 pixels.")
@mpp_option("Level-0 resolution of --reference when its metadata has none.", name="--slide-mpp")
@click.option("--cache", "cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Without --reference: one embedding (of --class) from this cache conditions every window.")
@click.option("--embedding-key", default="emb", show_default=True)
@class_option("Class id, or a class name of --cache (cache selection, class-conditional models).")
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help="Window overlap in pixels [default: half a window].")
@mpp_option("Resolution of the model's tiles: read --reference at it and write it into the TIFF "
            "[default: the pipeline's recorded scale, else 1.0].")
@seed_option("Seed of the canvas noise and the --cache embedding draw.")
@steps_option()
@guidance_option()
def large(pipeline, out, size, reference, x, y, slide_mpp, cache_dir, embedding_key, label, overlap, mpp, seed,
          steps, guidance):
    """Generate one image larger than the model's tile (overlapping windows, no seams) as a
    pyramidal TIFF that OpenSlide and QuPath open."""
    from synthgen.workflows.generate import LargeJob
    from synthgen.workflows.generate import large as run_large

    path = run_large(LargeJob(pipeline=pipeline, out=out, size=size, reference=reference, x=x, y=y,
                              slide_mpp=slide_mpp, cache_dir=cache_dir, embedding_key=embedding_key, label=label,
                              overlap=overlap, mpp=mpp, seed=seed, steps=steps, guidance=guidance))
    click.echo(f"{size}x{size} px -> {path} (+ {path.with_suffix('.png').name})")
