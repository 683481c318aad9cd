"""``synthgen run``: a recipe."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("run")
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
