"""``synthgen generate``: a synthetic dataset from a pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from synthgen.cli.options import (
    class_option,
    force_option,
    guidance_option,
    mpp_option,
    seed_option,
    steps_option,
)
from synthgen.config import SAMPLING


@click.command()
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: images/, records/ and manifest.json. Rerunning the same command resumes.")
@click.option("-n", "--num-images", type=click.IntRange(min=1), required=True, help="Images to generate.")
@click.option("--mode", type=click.Choice(["variations", "prior", "interpolation", "class", "mask"]), default=None,
              help="variations: condition on real embeddings (from --cache or --images); prior: sample embeddings "
                   "of --class from --prior; interpolation: mix same-class embeddings from --cache; class: a "
                   "class-conditional model with no embeddings; mask: the --masks alone. [default: variations "
                   "with --cache/--images, mask with only --masks, else class]")
@click.option("--cache", "cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Feature cache whose embeddings (and labels) are the real bank for variations/interpolation/filter "
                   "[default with --class or --filter: PIPELINE/bank when it exists].")
@click.option("--embedding-key", default="emb", show_default=True, help="Name of the embeddings in the cache.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of reference images: variations of them (encoded with the pipeline's image encoder). "
                   "Tiles at the model's size are used as they are; others need --image-mpp.")
@mpp_option("Resolution (um/px) of the --images: they are resampled to the pipeline's scale and "
            "centre-cropped to its tile size.", name="--image-mpp")
@class_option("Class to generate (rare-class modes, class models): an id, or a class name of the prior/bank "
              "(e.g. TUMOR with the default pipeline).")
@click.option("--prior", "prior_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Embedding prior folder (for --mode prior) [default: PIPELINE/prior when it exists].")
@click.option("--filter", "use_filter", is_flag=True,
              help="Selective filter. Class check (with --class): re-encode each image and record whether it is "
                   "nearest to its class (needs labelled --cache, default: PIPELINE/bank). Realism check: reject "
                   "images whose hand-crafted features are far from every real reference tile (--realism-ref, "
                   "default: --images; skipped, and said so, without either). 'accepted' in manifest.json is "
                   "both checks.")
@click.option("--realism-ref", type=click.Path(exists=True, path_type=Path), default=None,
              help="Real tiles (image folder, resized to the model's tile size, or a tile table at the model's mpp) "
                   "for the --filter realism check; its threshold is calibrated on them [default: --images].")
@guidance_option()
@steps_option(None, help=f"Sampling steps [default: {SAMPLING.steps}; with --fast the variant's recorded count (fast_steps in "
                         f"model_index.json), else {SAMPLING.fast_steps}]. With "
                         "1-4 steps a pipeline's few-step variant (fast_transformer/) is used where it applies, as "
                         "with --fast.")
@click.option("--fast", is_flag=True,
              help="Sample with the pipeline's few-step variant (a consistency-distilled student with guidance "
                   "folded in; `synthgen add-fast`): 1-4 steps, one denoiser pass each; an error where it does "
                   "not apply (masks, --strength, --sampler, another --guidance than its folded one).")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="With --images: anchored variations (SDEdit). Each image starts from its reference's latent "
                   "noised this fraction of the way along the sampling trajectory: low values (0.1-0.4 with the "
                   "shipped models' linear noise schedule) keep the reference's coarse layout and re-draw its "
                   "detail; 1 starts from pure noise (only the reference's embedding is kept).")
@click.option("--sampler", type=click.Choice(["dpm++", "ddim", "euler"]), default=None,
              help="Override the pipeline's scheduler.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True,
              help="Compute precision (autocast): auto is bf16 on CPUs with native bf16 (AVX512-BF16, AMX) and on "
                   "CUDA, else fp32. Recorded in manifest.json; an image regenerates exactly at the same dtype.")
@seed_option()
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Condition masks (label-map PNGs, see `synthgen masks`) for a mask-guided pipeline: image i gets "
                   "mask i mod M; each mask is saved beside its image (segmentation pairs).")
@click.option("--controlnet", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Mask branch folder to use instead of the pipeline's own controlnet/.")
@force_option()
def generate(pipeline, out, num_images, mode, cache_dir, embedding_key, images_dir, image_mpp, label, prior_dir,
             use_filter, realism_ref, guidance, steps, fast, strength, sampler, dtype, seed, batch_size, masks_dir, controlnet,
             force):
    """Generate a synthetic dataset with PIPELINE (a SynthPipeline folder).

    Splits across processes under `accelerate launch` / `torchrun` (each writes its own share;
    rank 0 merges manifest.json). Every image's seed and condition are recorded, so any item can
    be regenerated alone. A second `synthgen generate` into the same OUT is refused while the
    first runs (OUT/.synthgen.lock; under torchrun / accelerate only rank 0 takes it).
    """

    from synthgen._io import OutputLock
    from synthgen.workflows.generate import GenerateJob, filter_summary
    from synthgen.workflows.generate import generate as run_generate

    job = GenerateJob(pipeline=pipeline, out=out, n=num_images, mode=mode, cache_dir=cache_dir,
                      embedding_key=embedding_key, images_dir=images_dir, image_mpp=image_mpp, label=label, prior_dir=prior_dir,
                      use_filter=use_filter, guidance=guidance, steps=steps, sampler=sampler, seed=seed,
                      batch_size=batch_size, masks_dir=masks_dir, controlnet=controlnet, realism_ref=realism_ref,
                      strength=strength, dtype=dtype, fast=fast)
    with OutputLock(out, "generate", force=force, enabled=int(os.environ.get("RANK", "0")) == 0):
        path = run_generate(job)
    if path is not None:
        click.echo(f"{num_images} images -> {out} (manifest: {path})")
        if use_filter:
            for line in filter_summary(json.loads(Path(path).read_text())):
                click.echo(line)
