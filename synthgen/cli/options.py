"""Options several commands share, written once (names, types, defaults and help)."""

from __future__ import annotations

import click

from synthgen.config import SAMPLING


def steps_option(default: int | None = SAMPLING.steps, help: str = "Sampling steps."):  # noqa: A002
    return click.option("--steps", type=click.IntRange(min=1), default=default, show_default=default is not None,
                        help=help)


def guidance_option(help: str = "Classifier-free guidance scale."):  # noqa: A002
    return click.option("--guidance", type=float, default=SAMPLING.guidance, show_default=True, help=help)


def seed_option(help: str = "Job seed: item i gets seed*1000000 + i (synthgen.seeding)."):  # noqa: A002
    return click.option("--seed", type=int, default=0, show_default=True, help=help)


def force_option(what: str = "the output folder's lock (.synthgen.lock)"):
    return click.option("--force", is_flag=True,
                        help=f"Take over {what} even when its owner looks alive (another host, or a pid reused). "
                             "A lock of a dead process on this host is taken over without it.")
