"""``synthgen adapt``: fine-tune a pipeline on a labelled dataset (all classes)."""

from __future__ import annotations

from pathlib import Path

import click

from synthgen.cli.options import mpp_option


@click.command("adapt")
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True, help="Adapted pipeline folder to write.")
@click.option("--pipeline", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Pipeline to adapt [default: the shipped checkpoints/synthgen-v2].")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Denoiser fine-tuning steps (about 1 s each on 2 CPU cores at batch 32, 128 px).")
@mpp_option("Resolution of the dataset's images in um/px (e.g. 0.25 for 40x, 0.5 for 20x): they are resampled to "
            "the pipeline's scale and cut into its tiles. Without it, every image must be one tile of the model.",
            name="--image-mpp")
@click.option("--prior-steps", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Training steps of the embedding prior rebuilt from the dataset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-5, show_default=True,
              help="Learning rate of the fine-tune.")
@click.option("--no-dihedral", is_flag=True, help="Cache each tile once instead of in its 8 rotations and mirrors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the tiles, cache and training checkpoints are kept [default: .OUT.adapt beside OUT]; "
                   "rerun the same command to resume.")
def adapt(dataset, out, pipeline, steps, image_mpp, prior_steps, batch_size, lr, no_dihedral, seed, work_dir):
    """Fine-tune PIPELINE on DATASET, all of its classes, so that a rare class and the common
    ones share the generator's look; then generate a class by name.

    DATASET is an ImageFolder (one sub-folder of images per class; the folder names become the
    pipeline's class names) or a CSV with path,label columns. The denoiser is fully fine-tuned,
    the embedding bank and prior are rebuilt from the dataset, and the pipeline is written at
    once. Interrupted? Run the same command again: it resumes from the work folder.

    Examples:

      synthgen adapt my_tiles/ -o runs/adapted --image-mpp 0.5

      synthgen generate runs/adapted --class TUMOR -n 64 -o runs/tumour
    """
    from synthgen.workflows.adapt import DEFAULT_BASE, AdaptJob
    from synthgen.workflows.adapt import adapt as run_adapt

    job = AdaptJob(dataset=dataset, out=out, pipeline=pipeline or DEFAULT_BASE, steps=steps, image_mpp=image_mpp,
                   prior_steps=prior_steps, batch_size=batch_size, lr=lr, dihedral=not no_dihedral, seed=seed,
                   work_dir=work_dir)
    summary = run_adapt(job)
    tiles = ", ".join(f"{c} {k}" for c, k in summary["tiles_per_class"].items())
    click.echo(f"adapted {summary['base']} on {len(summary['classes'])} classes ({tiles} tiles) -> {out}")
    click.echo(f"generate a class: synthgen generate {out} --class {summary['classes'][-1]} -n 16 -o OUT")
