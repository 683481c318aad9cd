"""``synthgen view``: a browsable HTML gallery of a generated dataset."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("view")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The page to write (.html), outside DATASET when it is an export; mask overlays go to a "
                   "<name>_files/ folder beside it.")
@click.option("--page-size", type=click.IntRange(min=1), default=120, show_default=True, help="Images per page.")
@click.option("--title", default=None, help="Page title [default: the dataset folder's name].")
def view(dataset, out, page_size, title):
    """Write a gallery of DATASET (a `synthgen generate` output or an imagefolder export): every
    image with its class, filter verdict, seed and condition, filters by class and verdict, paging,
    and mask overlays for mask-guided pairs. Open the page in a browser; it links the images by
    relative path (no server, no network), so keep it and the dataset where they are, or move
    both together. The view's filters are in the URL (#class=...&status=accepted&page=2&masks=1).
    """
    from synthgen.export.gallery import write_gallery

    r = write_gallery(dataset, out, page_size=page_size, title=title)
    verdicts = ", ".join(f"{s} {c}" for s, c in r["statuses"].items() if c)
    click.echo(f"{r['items']} items ({len(r['classes'])} class(es); {verdicts}"
               + (f"; {r['overlays']} mask overlays" if r["overlays"] else "") + f") -> {out}")
