"""``synthgen assemble`` and ``synthgen add-fast``: trained parts -> one pipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import click

from synthgen.cli.options import mpp_option
from synthgen.config import SAMPLING


@click.command()
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
@mpp_option("Resolution (um/px) of the tiles the denoiser was trained on, recorded in the pipeline so that "
            "`synthgen large` and `synthgen stain` read slides at it [default: the training cache's, when "
            "it was cached from a tile table].")
def assemble(out, denoiser, vae, encoder, prediction, sampler, controlnet, mpp):
    """Put a trained denoiser, its VAE, image encoder and mask branch into one SynthPipeline folder."""

    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.loading import component_subfolder
    from synthgen.models.controlnet import MaskControlNet
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.vae import StrictAutoencoderKL
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.sampling import make_scheduler

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

    config = Path(cache_dir or "") / "config.json"
    if not cache_dir or not config.is_file():
        return None
    return json.loads(config.read_text()).get("mpp")

@click.command("add-fast")
@click.argument("pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("student", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--storage-dtype", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Precision the student's weights are stored in (loaded back as float32).")
@click.option("--steps", type=click.IntRange(1, SAMPLING.fast_steps), default=None,
              help="The variant's default step count, recorded in model_index.json (fast_steps) and used by "
                   "`synthgen generate --fast` and SynthAugment; choose it on validation tiles "
                   f"[default: {SAMPLING.fast_steps}].")
def add_fast(pipeline, student, storage_dtype, steps):
    """Add STUDENT, a few-step model from `synthgen train` (task: consistency; its `model/`
    folder), to PIPELINE as its fast variant (fast_transformer/, fast_scheduler/): then
    `synthgen generate --fast` and calls with 1-4 steps sample with it."""
    from synthgen.pipelines.fast import add_fast_variant

    add_fast_variant(pipeline, student, storage_dtype, steps)
    click.echo(f"fast variant {student} -> {pipeline}/fast_transformer, fast_scheduler"
               + (f" (default {steps} steps)" if steps else ""))
