"""Slides -> tile table: tissue detection, grid tiles, content-hash slide keys."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from synthgen.config import ConfigError
from synthgen.errors import SynthgenError

log = logging.getLogger("synthgen")


@dataclass(frozen=True)
class TileJob:
    """What ``synthgen tile`` (and a recipe's ``tile:`` step) does.

    ``inputs``: slide or image files, or folders of them. ``roi``: (x0, y0, x1, y1) as fractions of
    the slide. ``keep_names``: slide keys are file names instead of content hashes. ``skip_errors``:
    a slide that cannot be read is reported and skipped instead of stopping the job. ``preview``: a
    folder for one thumbnail per slide with the kept tiles outlined.
    """

    inputs: Sequence[str | Path]
    out: Path
    mpp: float = 0.5
    size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    slide_mpp: float | None = None
    mask_mpp: float | None = None
    roi: tuple[float, ...] | None = None
    keep_names: bool = False
    skip_errors: bool = False
    preview: Path | None = None


@dataclass
class TileResult:
    out: Path
    num_tiles: int
    num_slides: int
    skipped: list[str] = field(default_factory=list)  # one message per skipped slide


def tile(job: TileJob, progress: bool = True, on_skip: Callable[[str], None] | None = None) -> TileResult:
    """Tile every slide of ``job.inputs`` and write the table (and its ``.slides.json``) to ``job.out``.

    Raises:
        ConfigError: an invalid tile spec, or no slide files among the inputs.
        SynthgenError: a slide cannot be read (unless ``skip_errors``), two files share a slide
            key, or no slide gave a tile.
    """
    from tqdm.auto import tqdm

    from synthgen.data.slides import Slide, slide_key
    from synthgen.data.tiling import TileSpec, find_slides, tile_slide, write_tile_table

    try:
        spec = TileSpec(mpp=job.mpp, size=job.size, overlap=job.overlap, min_tissue=job.min_tissue,
                        mask_mpp=job.mask_mpp, roi=tuple(job.roi) if job.roi else None)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    paths = find_slides([Path(p) for p in job.inputs])
    if not paths:
        raise ConfigError(f"no slide or image files found in {', '.join(map(str, job.inputs))}")
    tiles, slides, skipped = [], {}, []
    for path in tqdm(paths, desc="tiling", unit="slide", disable=not progress or len(paths) < 2):
        try:
            with Slide(path, mpp=job.slide_mpp) as s:
                key = slide_key(path, hashed=not job.keep_names)
                if key in slides and slides[key]["path"] != str(path.resolve()):
                    raise SynthgenError(f"{path}: same slide key {key} as {slides[key]['path']} (duplicate file?)")
                found = tile_slide(s, spec, key)
                if job.preview is not None:
                    write_preview(s, spec, found, Path(job.preview) / f"{key}.png")
        except SynthgenError as e:
            if not job.skip_errors:
                raise
            skipped.append(str(e))
            if on_skip is not None:
                on_skip(str(e))
            continue
        tiles += found
        slides[key] = {"path": str(path.resolve()), **s.info()}
        log.info("%s: %d tiles", key, len(found))
    if not tiles:
        raise SynthgenError("no tiles from any input slide")
    write_tile_table(tiles, job.out, slides)
    return TileResult(Path(job.out), len(tiles), len(slides), skipped)


def write_preview(slide, spec, tiles, path: Path) -> None:
    """Thumbnail with the kept tiles outlined, for a quick visual check."""
    from PIL import Image, ImageDraw

    tmpp = max(slide.mpp, max(slide.dimensions) * slide.mpp / 1024)  # longest side ~1024 px
    img = Image.fromarray(slide.thumbnail(tmpp))
    draw = ImageDraw.Draw(img)
    f = slide.mpp / tmpp
    side = spec.size * spec.mpp / tmpp
    for t in tiles:
        draw.rectangle([t.x * f, t.y * f, t.x * f + side, t.y * f + side], outline=(0, 160, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
