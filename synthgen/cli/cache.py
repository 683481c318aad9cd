"""``synthgen cache``: tiles or images -> feature cache."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import force_option, mpp_option
from synthgen.encoders.load import SPEC_HELP
from synthgen.errors import SynthgenError


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Cache folder. Rerunning with the same options resumes; other options refuse.")
@click.option("-e", "--encoder", "encoders", multiple=True, required=True, metavar="NAME=SPEC",
              help="An encoder to cache under NAME; repeat for several (e.g. latents=vae:DIR and "
                   "emb=timm:hf-hub:MahmoodLab/UNI2-h). Training reads VAE latents from the name 'latents'. "
                   "SPEC is " + SPEC_HELP + ".")
@click.option("--slides", "slides_json", type=click.Path(exists=True, path_type=Path), default=None,
              help="JSON mapping slide keys to paths, when the table's .slides.json side file is elsewhere.")
@click.option("--size", type=click.IntRange(min=1), default=None,
              help="For a folder of images: resize every image to this square size (batches need equal sizes).")
@mpp_option("For images: their resolution in um/px; with --mpp, resample them to --mpp (keeps the scale).", name="--image-mpp")
@mpp_option("For images: resolution to resample them to (the model's, e.g. 1.0), with --image-mpp.")
@click.option("--crop", type=click.IntRange(min=1), default=None,
              help="Cache every crop of this size on a grid of --crop-stride instead of whole images.")
@click.option("--crop-stride", type=click.IntRange(min=1), default=None, help="Grid step of --crop [default: --crop].")
@click.option("--dihedral", is_flag=True, help="With --crop: also its 8 rotations/mirrors (a bank from few tiles).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1024, show_default=True, help="Items per shard file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="DataLoader worker processes reading images.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Storage dtype of the features.")
@force_option()
def cache(source, out, encoders, slides_json, size, image_mpp, mpp, crop, crop_stride, dihedral, shard_size,
          batch_size, num_workers, dtype, force):
    """Encode SOURCE (a tile table from `synthgen tile`, an image folder, or a CSV of images with
    columns path[,label]) into a feature cache. Labels (ImageFolder sub-folders, CSV label column)
    and class names are kept.

    Writes sharded safetensors files with one tensor per encoder, atomically; a killed run
    resumes from the last finished shard. Training reads the cache instead of re-encoding.
    """
    from synthgen.config import ConfigError
    from synthgen.encoders.load import load_encoder
    from synthgen.workflows.cache import CacheJob
    from synthgen.workflows.cache import cache as run_cache

    specs, fns = {}, {}
    for spec in encoders:
        name, sep, target = spec.partition("=")
        if not sep or not name or ":" not in target:
            raise click.BadParameter(f"{spec!r}: expected NAME=SPEC", param_hint="--encoder")
        try:
            fns[name] = load_encoder(target)
        except SynthgenError as e:
            raise click.BadParameter(str(e), param_hint="--encoder") from e
        specs[name] = target
    job = CacheJob(source=source, out=out, encoders=specs, slides_json=slides_json, size=size, image_mpp=image_mpp,
                   mpp=mpp, crop=crop, crop_stride=crop_stride, dihedral=dihedral, shard_size=shard_size,
                   batch_size=batch_size, num_workers=num_workers, dtype=dtype, force=force)
    try:
        n = run_cache(job, loaded=fns)
    except ConfigError as e:  # options that do not go together
        raise click.UsageError(str(e)) from e
    click.echo(f"{n} items cached -> {out}")
