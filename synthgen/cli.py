"""The ``synthgen`` command. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from synthgen import __version__
from synthgen.config import SAMPLING
from synthgen.encoders.load import SPEC_HELP
from synthgen.errors import SynthgenError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="synthgen")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """synthgen: synthetic histopathology data you can train on and share.

    Typical flow: `synthgen tile` slides into a tile table, `synthgen cache` the latents and
    embeddings of those tiles, then train and generate. Run `synthgen COMMAND --help` for the
    options of each step.
    """
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("tiles.csv"), show_default=True,
              help="Tile table to write (.csv, or .parquet with the 'parquet' extra). A private side file "
                   "<out>.slides.json maps slide keys to the slide paths.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Resolution of the tiles in microns per pixel (0.5 ~ 20x, 0.25 ~ 40x).")
@click.option("--size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tile side in pixels at --mpp.")
@click.option("--overlap", type=click.IntRange(min=0), default=0, show_default=True,
              help="Overlap of neighbouring tiles in pixels at --mpp (stride = size - overlap).")
@click.option("--min-tissue", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Keep tiles whose tissue fraction is at least this.")
@click.option("--slide-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Level-0 resolution of the slides, for files without resolution metadata "
                   "(overrides the metadata when given).")
@click.option("--mask-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resolution of the tissue-detection thumbnail [default: a tile spans >= 8 px, at most 8 um/px].")
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


@cli.command()
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
@click.option("--image-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="For images: their resolution in um/px; with --mpp, resample them to --mpp (keeps the scale).")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="For images: resolution to resample them to (the model's, e.g. 1.0), with --image-mpp.")
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
@click.option("--force", is_flag=True,
              help="Take over the output folder's lock (.synthgen.lock) even when its owner looks alive (another "
                   "host, or a pid reused). A lock of a dead process on this host is taken over without it.")
def cache(source, out, encoders, slides_json, size, image_mpp, mpp, crop, crop_stride, dihedral, shard_size,
          batch_size, num_workers, dtype, force):
    """Encode SOURCE (a tile table from `synthgen tile`, an image folder, or a CSV of images with
    columns path[,label]) into a feature cache. Labels (ImageFolder sub-folders, CSV label column)
    and class names are kept.

    Writes sharded safetensors files with one tensor per encoder, atomically; a killed run
    resumes from the last finished shard. Training reads the cache instead of re-encoding.
    """
    from synthgen.encoders.load import load_encoder
    from synthgen.workflows.cache import CacheJob, is_image_csv
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
    if (image_mpp is None) != (mpp is None) or (mpp is not None and not (source.is_dir() or is_image_csv(source))):
        raise click.UsageError("--image-mpp and --mpp go together, for an image folder or CSV")
    if crop is None and (crop_stride or dihedral):
        raise click.UsageError("--crop-stride and --dihedral need --crop")
    job = CacheJob(source=source, out=out, encoders=specs, slides_json=slides_json, size=size, image_mpp=image_mpp,
                   mpp=mpp, crop=crop, crop_stride=crop_stride, dihedral=dihedral, shard_size=shard_size,
                   batch_size=batch_size, num_workers=num_workers, dtype=dtype, force=force)
    n = run_cache(job, loaded=fns)
    click.echo(f"{n} items cached -> {out}")


@cli.command()
@click.argument("config", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. -o optim.lr=3e-4 -o steps=2000 (repeatable).")
@click.option("--resume", default=None, metavar="latest|PATH",
              help="Continue from the newest checkpoint in output_dir ('latest') or from a checkpoint folder. "
                   "Restores model, EMA, optimizer, LR schedule, RNG and data position.")
@click.option("--stop-at", type=click.IntRange(min=1), default=None, metavar="STEP",
              help="Checkpoint and stop at this step (for time-limited jobs); continue later with --resume latest.")
@click.option("--print-config", is_flag=True, help="Print the validated config (with defaults) and exit.")
@click.option("--force", is_flag=True,
              help="Take over the output folder's lock (.synthgen.lock) even when its owner looks alive (another "
                   "host, or a pid reused). A lock of a dead process on this host is taken over without it.")
def train(config, overrides, resume, stop_at, print_config, force):
    """Train a model (denoiser, controlnet, vae, ssl, prior or translator) from a YAML CONFIG.

    Runs on one process, or on many under `accelerate launch` / `torchrun` (DDP; FSDP through an
    accelerate config). Checkpoints go to OUTPUT_DIR/checkpoints every `checkpoint_every` steps;
    SIGTERM or Ctrl-C saves a checkpoint and exits with status 143/130, ready for --resume latest.
    The final model is written to OUTPUT_DIR/model in diffusers layout. See recipes/ for examples.
    """
    import json

    from synthgen.config import load_train_config, to_dict

    cfg = load_train_config(config, list(overrides))
    if print_config:
        click.echo(json.dumps(to_dict(cfg), indent=1))
        return
    from synthgen.training.trainer import train as run_training

    result = run_training(cfg, resume=resume, stop_at=stop_at, force=force)
    if result.interrupted and stop_at is not None and result.step >= stop_at:
        click.echo(f"stopped at step {result.step} as asked; continue with: synthgen train {config or ''} --resume latest")
        return
    if result.interrupted:
        click.echo(f"interrupted at step {result.step}; checkpoint saved in {result.output_dir / 'checkpoints'}; "
                   f"continue with: synthgen train {config or ''} --resume latest", err=True)
        sys.exit(143)
    loss = "" if result.final_loss is None else f" (last loss {result.final_loss:.4f})"
    click.echo(f"trained {cfg.task} for {result.step} steps{loss} -> {result.output_dir / 'model'}")


@cli.command()
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
              help="Folder of reference images: variations of them (encoded with the pipeline's image encoder).")
@click.option("--class", "label", default=None, metavar="ID|NAME",
              help="Class to generate (rare-class modes, class models): an id, or a class name of the prior/bank "
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
@click.option("--guidance", type=float, default=SAMPLING.guidance, show_default=True, help="Classifier-free guidance scale.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampling steps [default: 20; 4 with --fast]. With 1-4 steps a pipeline's few-step variant "
                   "(fast_transformer/) is used where it applies, as with --fast.")
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
@click.option("--seed", type=int, default=0, show_default=True, help="Job seed: image i gets seed*1000000 + i.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Condition masks (label-map PNGs, see `synthgen masks`) for a mask-guided pipeline: image i gets "
                   "mask i mod M; each mask is saved beside its image (segmentation pairs).")
@click.option("--controlnet", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Mask branch folder to use instead of the pipeline's own controlnet/.")
@click.option("--force", is_flag=True,
              help="Take over the output folder's lock (.synthgen.lock) even when its owner looks alive (another "
                   "host, or a pid reused). A lock of a dead process on this host is taken over without it.")
def generate(pipeline, out, num_images, mode, cache_dir, embedding_key, images_dir, label, prior_dir, use_filter,
             realism_ref, guidance, steps, fast, strength, sampler, dtype, seed, batch_size, masks_dir, controlnet,
             force):
    """Generate a synthetic dataset with PIPELINE (a SynthPipeline folder).

    Splits across processes under `accelerate launch` / `torchrun` (each writes its own share;
    rank 0 merges manifest.json). Every image's seed and condition are recorded, so any item can
    be regenerated alone. A second `synthgen generate` into the same OUT is refused while the
    first runs (OUT/.synthgen.lock; under torchrun / accelerate only rank 0 takes it).
    """
    import json
    import os

    from synthgen._io import OutputLock
    from synthgen.workflows.generate import GenerateJob, filter_summary
    from synthgen.workflows.generate import generate as run_generate

    job = GenerateJob(pipeline=pipeline, out=out, n=num_images, mode=mode, cache_dir=cache_dir,
                      embedding_key=embedding_key, images_dir=images_dir, label=label, prior_dir=prior_dir,
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


@cli.command()
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Pyramidal TIFF to write (a PNG preview is written beside it).")
@click.option("--size", type=click.IntRange(min=8), default=512, show_default=True, help="Image side in pixels.")
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="Slide or image whose region (--x, --y, --size at --mpp) is re-synthesised: each window is "
                   "conditioned on the embedding of the matching real crop.")
@click.option("--x", type=int, default=0, show_default=True, help="Region left edge, level-0 pixels.")
@click.option("--y", type=int, default=0, show_default=True, help="Region top edge, level-0 pixels.")
@click.option("--slide-mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Level-0 resolution of --reference when its metadata has none.")
@click.option("--cache", "cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Without --reference: one embedding (of --class) from this cache conditions every window.")
@click.option("--embedding-key", default="emb", show_default=True)
@click.option("--class", "label", default=None, metavar="ID|NAME",
              help="Class id, or a class name of --cache (cache selection, class-conditional models).")
@click.option("--overlap", type=click.IntRange(min=0), default=None,
              help="Window overlap in pixels [default: half a window].")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resolution of the model's tiles: read --reference at it and write it into the TIFF "
                   "[default: the pipeline's recorded scale, else 1.0].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=SAMPLING.steps, show_default=True)
@click.option("--guidance", type=float, default=SAMPLING.guidance, show_default=True)
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


@cli.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Pipeline folder to write.")
@click.option("--denoiser", required=True, metavar="DIR|HUB_ID",
              help="Trained denoiser: OUTPUT_DIR/model of `synthgen train`, a folder or hub id in pipeline layout "
                   "(its transformer/ is used, e.g. StonyBrook-CVLab/PixCell-256), or a bare model folder.")
@click.option("--vae", required=True, metavar="DIR|HUB_ID",
              help="VAE: an AutoencoderKL folder, or a folder / hub id in pipeline layout (its vae/ is used, "
                   "e.g. stabilityai/stable-diffusion-3.5-large).")
@click.option("--encoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Image encoder folder (synthgen SSL encoder) used for reference images and the class filter.")
@click.option("--prediction", type=click.Choice(["epsilon", "v_prediction", "flow"]), default=None,
              help="What the denoiser predicts [default: read from the training run's config.json beside --denoiser].")
@click.option("--sampler", type=click.Choice(["dpm++", "ddim", "euler"]), default="dpm++", show_default=True)
@click.option("--controlnet", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Trained mask branch (OUTPUT_DIR/model of a `task: controlnet` run) for mask-guided generation.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Resolution (um/px) of the tiles the denoiser was trained on, recorded in the pipeline so that "
                   "`synthgen large` and `synthgen stain` read slides at it [default: the training cache's, when "
                   "it was cached from a tile table].")
def assemble(out, denoiser, vae, encoder, prediction, sampler, controlnet, mpp):
    """Put a trained denoiser, its VAE, image encoder and mask branch into one SynthPipeline folder."""
    import json

    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.controlnet import MaskControlNet
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.loading import component_subfolder
    from synthgen.models.vae import StrictAutoencoderKL
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.sampling import make_scheduler

    run_cfg = Path(denoiser).parent / "config.json"
    run = json.loads(run_cfg.read_text()) if run_cfg.exists() else {}
    objective = run.get("objective", {})
    prediction = prediction or objective.get("kind")
    if mpp is None:
        mpp = _cache_mpp(run.get("data", {}).get("cache"))
    if prediction is None:
        raise click.UsageError(f"no training config at {run_cfg}: pass --prediction (PixCell: epsilon)")
    scheduler = make_scheduler(prediction, sampler, objective.get("num_train_timesteps", 1000),
                               objective.get("beta_schedule", "linear"))
    pipe = SynthPipeline(Denoiser.from_pretrained(denoiser, subfolder=component_subfolder(denoiser, "transformer")),
                         StrictAutoencoderKL.from_pretrained(vae, subfolder=component_subfolder(vae, "vae")), scheduler,
                         image_encoder=SSLEncoder.from_pretrained(encoder) if encoder else None,
                         controlnet=MaskControlNet.from_pretrained(controlnet) if controlnet else None, mpp=mpp)
    pipe.save_pretrained(out)
    scale = f"{mpp:g} um/px" if mpp else "scale not recorded: pass --mpp"
    click.echo(f"pipeline ({prediction}, {sampler}, {scale}) -> {out}")


def _cache_mpp(cache_dir) -> float | None:
    """The resolution a training cache recorded (None when it has none or is gone)."""
    import json

    config = Path(cache_dir or "") / "config.json"
    if not cache_dir or not config.is_file():
        return None
    return json.loads(config.read_text()).get("mpp")


@cli.command("add-fast")
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("student", type=click.Path(exists=True, file_okay=False, path_type=Path))
def add_fast(pipeline, student):
    """Add STUDENT, a few-step model from `synthgen train` (task: consistency; its `model/`
    folder), to PIPELINE as its fast variant (fast_transformer/, fast_scheduler/): then
    `synthgen generate --fast` and calls with 1-4 steps sample with it."""
    from synthgen.pipelines.fast import add_fast_variant

    add_fast_variant(pipeline, student)
    click.echo(f"fast variant {student} -> {pipeline}/fast_transformer, fast_scheduler")


@cli.group("eval")
def eval_group():
    """Evaluate synthetic data: fidelity, utility, and one combined report."""


def _study_options(f):
    """Options of the utility study, shared by `eval utility` and `eval report`."""
    for opt in reversed([
        click.option("--mode", type=click.Choice(["variations", "variation", "class", "prior"]), default="variations",
                     show_default=True,
                     help="variations (or variation): condition on embeddings of real training images; class: class-conditional "
                          "model; prior: fresh samples of each class from an embedding prior (class sub-folder "
                          "names matched to the prior's class names, a leading '01_' ignored)."),
        click.option("--prior", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="--mode prior: the EmbeddingPrior folder (default: the pipeline's prior/)."),
        click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Repeats with different seeds."),
        click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True),
        click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Sampling steps."),
    ]):
        f = opt(f)
    return f


def _load_encoder(spec: str):
    from synthgen.encoders.load import load_encoder

    try:
        return load_encoder(spec)
    except SynthgenError as e:
        raise click.BadParameter(str(e), param_hint="--encoder") from e


@eval_group.command("fidelity")
@click.argument("real", type=click.Path(exists=True, path_type=Path))
@click.argument("synth", type=click.Path(exists=True, path_type=Path))
@click.option("-e", "--encoder", "encoder_spec", default=None, metavar="SPEC",
              help="Feature extractor: " + SPEC_HELP + ". Use a pathology encoder (e.g. timm:hf-hub:MahmoodLab/UNI2-h) "
                   "rather than Inception. Without it only the encoder-free FD is reported.")
@click.option("--size", type=click.IntRange(min=8), default=None, help="Resize images to this square size first.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours for precision/recall.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=100, show_default=True,
              help="Bootstrap resamples for the FD confidence interval.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the encoder-free FD's random real halves.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
def eval_fidelity(real, synth, encoder_spec, size, k, n_bootstrap, seed, json_out):
    """Frechet distance, KID, precision/recall/density/coverage of SYNTH against REAL, and the
    encoder-free FD (hand-crafted stain, colour, texture, nuclei and sharpness features) beside
    its real-vs-real floor and blurred / stain-shifted copies of the real set, measured in the
    same run.

    REAL and SYNTH are image folders (ImageFolder layout gives per-class results),
    `synthgen generate` outputs (labels read from manifest.json) or tile tables.
    """
    import json

    from synthgen.metrics.fidelity import extract_features, fidelity_report
    from synthgen.metrics.handcrafted import encoder_free_report, format_report
    from synthgen.workflows.datasets import image_set

    real_ds, synth_ds = image_set(real, size), image_set(synth, size)
    report = {}
    if encoder_spec:
        encoder = _load_encoder(encoder_spec)
        fr, lr = extract_features(encoder, real_ds)
        fs, ls = extract_features(encoder, synth_ds)
        report = fidelity_report(fr, fs, lr, ls, k=k, n_bootstrap=n_bootstrap)
        o = report["overall"]
        click.echo(f"real {o['n_real']}  synthetic {o['n_fake']}  ({encoder_spec})")
        click.echo(f"FD {o['fd']['value']:.4f} (95% CI {o['fd']['ci95'][0]:.4f}-{o['fd']['ci95'][1]:.4f})   "
                   f"KID {o['kid']['value']:.5f} +- {o['kid']['std']:.5f}")
        if "precision" in o:
            click.echo("precision {:.3f}  recall {:.3f}  density {:.3f}  coverage {:.3f}".format(
                *(o[m]["value"] for m in ("precision", "recall", "density", "coverage"))))
        for c, r in report.get("per_class", {}).items():
            click.echo(f"  class {c}: FD {r['fd']['value']:.4f}  KID {r['kid']['value']:.5f}  "
                       f"(n={r['n_real']}/{r['n_fake']})")
    else:
        click.echo(f"real {len(real_ds)}  synthetic {len(synth_ds)}  (no encoder: encoder-free FD only)")
    try:
        report["encoder_free"] = encoder_free_report(real_ds, synth_ds, seed=seed)
        for line in format_report(report["encoder_free"]):
            click.echo(line)
    except ValueError as e:
        report["encoder_free"] = {"skipped": f"could not compute: {e}"}
        click.echo(f"encoder-free FD: could not compute: {e}")
    if json_out:
        json_out.write_text(json.dumps(report, indent=1))


@eval_group.command("utility")
@click.argument("train_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("test_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="SynthPipeline folder generating the synthetic samples.")
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Image size for the classifier.")
@_study_options
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Also write the report here.")
def eval_utility(train_dir, test_dir, pipeline, mode, prior, size, seeds, epochs, steps, json_out):
    """Train-on-synthetic utility: a small classifier trained on real, real + classical augmentation,
    real + synthgen samples (classes balanced up to 1:3) and synthetic only, tested on TEST_DIR.

    TRAIN_DIR and TEST_DIR are ImageFolder layouts (one sub-folder per class).
    """
    import json

    rep = _utility(train_dir, test_dir, pipeline, mode, size, seeds, epochs, steps, prior)
    click.echo(f"rare class: {rep['classes'][rep['rare_class']]}; train counts "
               + ", ".join(f"{rep['classes'][c]} {n}" for c, n in rep["train_counts"].items()))
    for arm, r in rep["arms"].items():
        ba, rr = r["balanced_accuracy"], r["rare_class_recall"]
        click.echo(f"{arm:15s} balanced accuracy {ba['mean']:.3f} [{ba['ci95'][0]:.3f}, {ba['ci95'][1]:.3f}]   "
                   f"rare-class recall {rr['mean']:.3f} [{rr['ci95'][0]:.3f}, {rr['ci95'][1]:.3f}]")
    if json_out:
        json_out.write_text(json.dumps(rep, indent=1))


def _utility(train_dir: Path, test_dir: Path, pipeline: Path, mode: str, size: int, seeds: int, epochs: int,
             steps: int, prior: Path | None = None) -> dict:
    """The utility study on two ImageFolder layouts; the result carries the class names and the
    generator's mode (and prior)."""
    from synthgen.augment import PipelineGenerator
    from synthgen.data.datasets import ImageListDataset
    from synthgen.metrics.utility import utility_study

    train = ImageListDataset.from_folder(train_dir, size=size)
    test = ImageListDataset.from_folder(test_dir, size=size)
    if train.labels is None or test.labels is None or train.classes != test.classes:
        raise click.UsageError("TRAIN_DIR and TEST_DIR need the same class sub-folders")
    if prior is not None and mode != "prior":
        raise click.UsageError("--prior is for --mode prior")
    kw = {"classes": train.classes, "prior": prior} if mode == "prior" else {}
    gen = PipelineGenerator(str(pipeline), mode=mode, num_inference_steps=steps, **kw)
    rep = utility_study(train, test, train.labels, gen, seeds=tuple(range(seeds)), epochs=epochs)
    source = {"mode": gen.mode, **({"prior": str(gen.prior_source)} if mode == "prior" else {})}
    return {"classes": train.classes, "generator": source, **rep}


@eval_group.command("report")
@click.argument("real", type=click.Path(exists=True, path_type=Path))
@click.argument("synth", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Report folder: report.html, report.md, report.json, PNG plots and sample grids.")
@click.option("-e", "--encoder", "encoder_spec", default=None, metavar="SPEC",
              help="Feature extractor for fidelity and the privacy audit (both skipped without it): " + SPEC_HELP)
@click.option("--size", type=click.IntRange(min=8), default=None, help="Resize images to this square size first.")
@click.option("--k", type=click.IntRange(min=1), default=5, show_default=True, help="Neighbours for precision/recall.")
@click.option("--bootstrap", "n_bootstrap", type=click.IntRange(min=0), default=100, show_default=True,
              help="Bootstrap resamples for the FD confidence interval.")
@click.option("--audit-against", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training data of the generating model (tile table or image folder): run the memorisation audit.")
@click.option("--audit-threshold", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Flag items nearer to a training item than this fraction of the median real-to-real distance.")
@click.option("--utility-train", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Utility study: real training images (ImageFolder layout); with --utility-test and --pipeline.")
@click.option("--utility-test", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Utility study: held-out real test images (same class sub-folders).")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Utility study: SynthPipeline folder generating the synthetic samples.")
@click.option("--utility-size", type=click.IntRange(min=8), default=64, show_default=True,
              help="Utility study: image size for the classifier.")
@_study_options
@click.option("--utility-json", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Use a saved `synthgen eval utility --json` result instead of running the study.")
@click.option("--masks", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Mask-adherence results to include (`synthgen eval masks --json`, or any JSON of numbers).")
@click.option("--stain", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Stain-translation scores (JSON of numbers, any nesting) to include.")
def eval_report(real, synth, out, encoder_spec, size, k, n_bootstrap, audit_against, audit_threshold, utility_train,
                utility_test, pipeline, utility_size, mode, prior, seeds, epochs, steps, utility_json, masks, stain):
    """One report on SYNTH against REAL: fidelity, utility, privacy audit, mask adherence and stain
    scores, as OUT/report.md with PNG plots and a real-vs-synthetic sample grid, and the same as one
    self-contained page, OUT/report.html (images inlined; opens from the file system).

    REAL and SYNTH are read as in `eval fidelity`. Sections whose inputs are not given are
    skipped, and the report says which and why.
    """
    from synthgen.metrics.report import write_report
    from synthgen.workflows.datasets import image_set

    study = {"--utility-train": utility_train, "--utility-test": utility_test, "--pipeline": pipeline}
    given = [name for name, v in study.items() if v is not None]
    if given and len(given) < 3:
        raise click.UsageError(f"{', '.join(given)} need(s) {', '.join(n for n in study if n not in given)} too")
    if given and utility_json:
        raise click.UsageError("give either the utility study options or --utility-json, not both")
    if audit_against is not None and not encoder_spec:
        raise click.UsageError("--audit-against needs --encoder")
    encoder = _load_encoder(encoder_spec) if encoder_spec else None
    real_ds, synth_ds = image_set(real, size), image_set(synth, size)
    audit_ds = None
    if audit_against is not None:
        audit_ds = real_ds if audit_against == real else image_set(audit_against, size)
    utility = _utility(utility_train, utility_test, pipeline, mode, utility_size, seeds, epochs, steps, prior) if given \
        else utility_json
    rep = write_report(out, real_ds, synth_ds, encoder, utility=utility, audit_train=audit_ds,
                       audit_threshold=audit_threshold, masks=masks, stain=stain, k=k, n_bootstrap=n_bootstrap,
                       sources={"real": str(real), "synthetic": str(synth), "encoder": encoder_spec},
                       mask_pairs=_mask_pairs(synth))
    for name, reason in rep["skipped"].items():
        click.echo(f"skipped {name}: {reason}")
    free = rep["encoder_free"]
    if "skipped" in free:
        click.echo(f"encoder-free FD not computed: {free['skipped']}")
    else:
        from synthgen.metrics.handcrafted import format_report

        for line in format_report(free):
            click.echo(line)
    click.echo(f"report ({', '.join(rep['sections']) or 'samples only'}) -> {out / 'report.md'}, {out / 'report.html'}")


def _mask_pairs(folder: Path, n: int = 8) -> list | None:
    """The first ``n`` (image, condition mask) pairs of a mask-guided `synthgen generate` output."""
    import json

    manifest = folder / "manifest.json"
    if folder.is_file() or not manifest.exists():
        return None
    items = [it for it in json.loads(manifest.read_text())["items"] if "mask" in it][:n]
    if not items:
        return None
    import numpy as np
    from PIL import Image

    from synthgen.data.masks import read_label_map

    return [(np.asarray(Image.open(folder / it["file"]).convert("RGB")), read_label_map(folder / it["mask"]))
            for it in items]


@cli.command()
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Export folder (must not exist; written to a temporary folder and renamed when complete).")
@click.option("--format", "fmt", type=click.Choice(["imagefolder", "webdataset", "hf"]), default="imagefolder",
              show_default=True, help="ImageFolder PNGs, WebDataset tar shards, or a HuggingFace datasets parquet folder.")
@click.option("--class-names", default=None, metavar="A,B,...", help="Names of label ids 0, 1, ... for folders and features.")
@click.option("--drop-rejected", is_flag=True, help="Leave out items the class filter rejected.")
@click.option("--licence", default="CC-BY-4.0", show_default=True, help="Licence stated in DATASHEET.md.")
@click.option("--audit-against", type=click.Path(exists=True, path_type=Path), default=None,
              help="Training data of the generating model (tile table or image folder): run the memorisation audit "
                   "and gate the export on it.")
@click.option("--audit-encoder", default=None, metavar="SPEC",
              help="Encoder for the audit's feature space (e.g. ssl:checkpoints/synthgen-small-cmu/image_encoder).")
@click.option("--audit-threshold", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="Flag items nearer to a training item than this fraction of the median real-to-real distance.")
@click.option("--max-flagged", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Refuse the export when more than this fraction of items is flagged.")
@click.option("--allow-risk", is_flag=True, help="Export even when the audit flags too many items (recorded).")
@click.option("--drop-flagged", is_flag=True, help="Remove flagged items from the export.")
@click.option("--force", is_flag=True, help="Take over the lock (.OUT.lock beside OUT) of another export to OUT.")
def export(source, out, fmt, class_names, drop_rejected, licence, audit_against, audit_encoder, audit_threshold,
           max_flagged, allow_risk, drop_flagged, force):
    """Export SOURCE (a `synthgen generate` output) as a shareable dataset with manifest.json
    (per-item sha256, model hash, seeds, condition kinds) and DATASHEET.md. Images are re-encoded
    from pixels; no source names, metadata or embeddings are included."""
    from synthgen.export.writers import export_dataset
    from synthgen.workflows.audit import audit as run_audit

    names = class_names.split(",") if class_names else None
    audit = None
    if audit_against is not None:
        if not audit_encoder:
            raise click.UsageError("--audit-against needs --audit-encoder")
        audit = run_audit(source, audit_against, audit_encoder, audit_threshold)
        click.echo(f"audit: {sum(audit['flagged'])} of {len(audit['flagged'])} items flagged as near-copies "
                   f"(threshold {audit_threshold})")
    elif drop_flagged or allow_risk:
        raise click.UsageError("--drop-flagged and --allow-risk need --audit-against")
    path = export_dataset(source, out, fmt, class_names=names, drop_rejected=drop_rejected, licence=licence,
                          audit=audit, max_flagged=max_flagged, allow_risk=allow_risk, drop_flagged=drop_flagged,
                          force=force)
    click.echo(f"exported ({fmt}) -> {path}")


@cli.command()
@click.argument("export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(export_dir):
    """Re-check every checksum of an export against its manifest (exit status 1 on any problem)."""
    from synthgen.export.writers import verify_export

    result = verify_export(export_dir)
    for p in result["problems"]:
        click.echo(p, err=True)
    if not result["ok"]:
        click.echo(f"FAILED: {len(result['problems'])} problem(s) in {export_dir}", err=True)
        sys.exit(1)
    click.echo(f"OK: {result['checked']} file(s) match manifest.json")


@cli.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print the plan (which steps run, which are unchanged) and exit.")
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field, e.g. -o generate.n=100 -o output_dir=outputs/b (repeatable).")
def run_recipe(recipe, dry_run, overrides):
    """Run a RECIPE (YAML): tile -> cache -> train -> generate -> rare -> export -> evaluate.

    Steps whose configuration and inputs are unchanged since they last completed are skipped;
    a changed step and everything after it are redone; an interrupted step resumes.
    """
    from synthgen.recipes import load_recipe, run

    r = load_recipe(recipe, list(overrides))
    rows = run(r, dry_run=dry_run, echo=click.echo)
    if dry_run:
        for name, h, action in rows:
            click.echo(f"{name:9s} {action:4s}  ({h})")
        return
    click.echo(f"recipe {r.name!r} done -> {r.output_dir}")


def _register_groups() -> None:
    from synthgen.cli_data import splits
    from synthgen.cli_masks import eval_masks, masks_group
    from synthgen.cli_stain import add_stain, eval_stain, pairs, stain
    from synthgen.cli_view import view

    cli.add_command(splits)
    cli.add_command(masks_group)
    cli.add_command(stain)
    cli.add_command(pairs)
    cli.add_command(add_stain)
    cli.add_command(view)
    eval_group.add_command(eval_masks)
    eval_group.add_command(eval_stain)


_register_groups()


def os_error_message(e: OSError) -> str:
    """``FILE: problem`` for an OS error (``FILE -> OTHER`` for a rename), never a bare ``: ``."""
    what = e.strerror or str(e)
    if e.filename is None:
        return what
    where = str(e.filename) + (f" -> {e.filename2}" if getattr(e, "filename2", None) else "")
    return f"{where}: {what}"


def _error(message: str) -> None:
    """Print a one-line error (with the traceback when -v was given) and exit with status 1."""
    if logging.getLogger("synthgen").isEnabledFor(logging.INFO):  # -v: show where it came from
        import traceback

        traceback.print_exc()
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns synthgen errors, invalid values of config objects
    (``ValueError``) and OS errors into one-line messages; ``-v`` also prints the traceback."""
    try:
        cli.main(args=argv, prog_name="synthgen", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SynthgenError as e:
        _error(str(e))
    except ValueError as e:  # a config object's own range check (e.g. TileSpec): name it, no traceback
        _error(f"invalid value: {e}")
    except OSError as e:  # disk full, permission denied: name the file
        _error(os_error_message(e))


if __name__ == "__main__":
    main()
