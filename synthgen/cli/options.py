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


def mpp_option(help: str = "Resolution of the images in um/px (sets the expected nucleus size).",  # noqa: A002
               default: float | None = None, name: str = "--mpp"):
    """A resolution in microns per pixel (``--mpp``, ``--image-mpp``, ``--slide-mpp``): positive."""
    return click.option(name, type=click.FloatRange(min=0, min_open=True), default=default,
                        show_default=default is not None, help=help)


def class_option(help: str):  # noqa: A002
    """``--class ID|NAME`` into the ``label`` parameter (a name is resolved by the command)."""
    return click.option("--class", "label", default=None, metavar="ID|NAME", help=help)


def audit_threshold_option():
    return click.option("--audit-threshold", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
                        help="Flag items nearer to a training item than this fraction of the median real-to-real distance.")


def run_workflow(fn, job):
    """``fn(job)``, with the workflow's bad-input errors (ConfigError) as usage errors (exit status 2,
    as the options' own)."""
    from synthgen.config import ConfigError

    try:
        return fn(job)
    except ConfigError as e:
        raise click.UsageError(str(e)) from e
