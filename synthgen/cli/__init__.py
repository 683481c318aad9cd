"""The ``synthgen`` command: one module per command (tiatoolbox style), each parsing its options
into a job, calling one workflow (:mod:`synthgen.workflows`) or library function and printing the
result. :func:`main` turns synthgen's errors into one-line messages."""

from __future__ import annotations

import logging
import sys

import click

from synthgen import __version__
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


def _register() -> None:
    from synthgen.cli import (
        adapt,
        assemble,
        cache,
        evaluate,
        export,
        generate,
        large,
        masks,
        run,
        splits,
        stain,
        tile,
        train,
        view,
    )

    for command in (tile.tile, cache.cache, splits.splits, train.train, assemble.assemble, assemble.add_fast,
                    adapt.adapt, generate.generate, large.large, masks.masks_group, stain.stain, stain.pairs, stain.add_stain,
                    evaluate.eval_group, export.export, export.verify, view.view, run.run_recipe):
        cli.add_command(command)
    evaluate.eval_group.add_command(masks.eval_masks)
    evaluate.eval_group.add_command(stain.eval_stain)


_register()


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
