"""``synthgen train``: a model from a training config."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from synthgen.cli.options import force_option


@click.command()
@click.argument("config", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, e.g. -o optim.lr=3e-4 -o steps=2000 (repeatable).")
@click.option("--resume", default=None, metavar="latest|PATH",
              help="Continue from the newest checkpoint in output_dir ('latest') or from a checkpoint folder. "
                   "Restores model, EMA, optimizer, LR schedule, RNG and data position.")
@click.option("--stop-at", type=click.IntRange(min=1), default=None, metavar="STEP",
              help="Checkpoint and stop at this step (for time-limited jobs); continue later with --resume latest.")
@click.option("--print-config", is_flag=True, help="Print the validated config (with defaults) and exit.")
@force_option()
def train(config, overrides, resume, stop_at, print_config, force):
    """Train a model (denoiser, controlnet, vae, ssl, prior or translator) from a YAML CONFIG.

    Runs on one process, or on many under `accelerate launch` / `torchrun` (DDP; FSDP through an
    accelerate config). Checkpoints go to OUTPUT_DIR/checkpoints every `checkpoint_every` steps;
    SIGTERM or Ctrl-C saves a checkpoint and exits with status 143/130, ready for --resume latest.
    The final model is written to OUTPUT_DIR/model in diffusers layout. See recipes/ for examples.
    """

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
