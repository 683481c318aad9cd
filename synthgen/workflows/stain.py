"""Virtual IHC of H&E tiles or of a slide region (``synthgen stain`` and a recipe's ``stain:`` step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from synthgen.config import SAMPLING, ConfigError

DEFAULT_PIPELINE = Path(__file__).resolve().parents[2] / "checkpoints" / "synthgen-small-cmu"


@dataclass(frozen=True)
class StainJob:
    """What ``synthgen stain`` does.

    ``to``: the target stain (any alias); ``pipeline``: a pipeline with ``stains/<to>/``; ``route``:
    ``spatial`` or ``embedding`` (None: embedding where the stain has it); ``structure``: the
    embedding route also keeps the source's nuclei (mask branch; tiles only); ``image_guidance``:
    spatial route, guidance on the source image; ``glass``: keep glass where the source is glass.
    A slide region is (``x``, ``y``, ``size``) read at ``mpp`` (default: the pipeline's scale).
    """

    to: str
    out: Path
    pipeline: Path = DEFAULT_PIPELINE
    route: str | None = None
    structure: bool = False
    image_guidance: float | None = None
    steps: int = SAMPLING.steps
    guidance: float = SAMPLING.guidance
    seed: int = 0
    glass: bool = True
    x: int = 0
    y: int = 0
    size: int = 512
    mpp: float | None = None
    slide_mpp: float | None = None


def load(job: StainJob):
    """(IHC pipeline, translator) of ``job``.

    Raises:
        StainError: unknown stain, or the pipeline has no model of the route.
        ConfigError: options that do not go together.
    """
    from synthgen.pipelines.stain import is_spatial, load_stain

    route = "embedding" if job.structure and job.route is None else job.route
    pipe, translator = load_stain(job.pipeline, job.to, route=route)
    if job.structure and is_spatial(pipe):
        raise ConfigError(f"structure (--structure): the spatial {job.to} translator sees the source image and keeps "
                          "its layout by itself; drop it or use the embedding route")
    if job.image_guidance is not None and not is_spatial(pipe):
        raise ConfigError(f"image guidance (--image-guidance) guides on the source image: it needs the spatial route "
                          f"(the {job.to} model loaded here is the embedding route, which does not see the source)")
    return pipe, translator


def stain_tiles(job: StainJob, tiles: np.ndarray, loaded=None) -> np.ndarray:
    """Virtual IHC (N, H, W, 3) uint8 of ``tiles`` (N, H, W, 3) uint8; tile i has item seed i of ``job.seed``."""
    from synthgen import seeding
    from synthgen.pipelines.stain import virtual_stain

    pipe, translator = loaded or load(job)
    return virtual_stain(pipe, translator, tiles, job.to, seeds=seeding.item_seeds(job.seed, len(tiles)),
                         num_inference_steps=job.steps, guidance_scale=job.guidance, structure=job.structure,
                         image_guidance_scale=job.image_guidance, glass=job.glass)


def to_model_scale(pipe, tiles: np.ndarray, mpp: float) -> np.ndarray:
    """``tiles`` (N, H, W, 3) uint8 read at ``mpp`` um/px, at the stain model's scale and tile size.

    They are resampled to :attr:`SynthPipeline.mpp` (:func:`~synthgen.data.datasets.resize_image`,
    as :class:`~synthgen.data.datasets.ImageListDataset` does) and centre-cropped to its tile size; tiles
    already at its scale, or a pipeline that records none, are taken as they are.

    Raises:
        ConfigError: tiles smaller than the model's tile at its scale.
    """
    from PIL import Image

    from synthgen.data.datasets import resize_image

    if pipe.mpp is None or abs(pipe.mpp - mpp) < 1e-6:
        return tiles
    side, f = pipe.image_size, mpp / pipe.mpp
    out = []
    for t in tiles:
        h, w = max(1, round(t.shape[0] * f)), max(1, round(t.shape[1] * f))
        if h < side or w < side:
            raise ConfigError(f"tiles of {t.shape[0]}x{t.shape[1]} px at {mpp:g} um/px are {h}x{w} px at the stain "
                              f"model's {pipe.mpp:g} um/px, smaller than its {side} px tiles")
        im = resize_image(Image.fromarray(t), (w, h))
        y, x = (h - side) // 2, (w - side) // 2
        out.append(np.asarray(im)[y : y + side, x : x + side])
    return np.stack(out)


def read_tile_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    """The images of ``folder`` (recursively) as one uint8 array, and their relative names as ``.png``."""
    from PIL import Image

    from synthgen.data.slides import IMAGE_SUFFIXES

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    if len({Image.open(f).size for f in files}) != 1:
        raise ConfigError(f"{folder}: images differ in size; virtual staining takes tiles of one size")
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return tiles, [str(f.relative_to(folder).with_suffix(".png")) for f in files]


def write_tiles(out: Path, names: Sequence[str], images: np.ndarray) -> None:
    from synthgen._io import atomic_save_png

    for name, im in zip(names, images, strict=True):
        dest = Path(out) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_png(im, dest)


def stain_folder(job: StainJob, folder: Path, loaded=None) -> int:
    """Virtual IHC of every tile of ``folder`` into ``job.out`` (same relative names, ``.png``)."""
    tiles, names = read_tile_folder(folder)
    write_tiles(job.out, names, stain_tiles(job, tiles, loaded))
    return len(names)


def stain_region(job: StainJob, source: Path, loaded=None) -> Path:
    """Virtual IHC of the region of slide or image ``source`` as a pyramidal TIFF ``job.out``
    (+ a PNG preview): window by window from the source's pixels (spatial route) or from the
    translated embeddings of its windows on one canvas (embedding route)."""
    from PIL import Image

    from synthgen import seeding
    from synthgen.data.slides import Slide
    from synthgen.pipelines.large_image import (
        generate_large,
        region_embeddings,
        write_pyramidal_tiff,
    )
    from synthgen.pipelines.stain import is_spatial, keep_glass, virtual_stain_region

    if job.structure:
        raise ConfigError("structure (--structure) works on tiles (a folder); a slide region uses the embedding route")
    pipe, translator = loaded or load(job)
    mpp = pipe.resolve_mpp(job.mpp)
    win = pipe.image_size
    with Slide(source, mpp=job.slide_mpp) as s:
        region = s.read(job.x, job.y, job.size, mpp)
    if is_spatial(pipe):  # window by window from the source's own pixels, blended over the overlaps
        image = virtual_stain_region(pipe, translator, region, job.to, seed=job.seed, num_inference_steps=job.steps,
                                     guidance_scale=job.guidance, image_guidance_scale=job.image_guidance,
                                     glass=job.glass)
    else:
        grid = region_embeddings(pipe, region, win // 2)
        flat = grid.flatten(0, 1)  # one draw per window, from the window's item seed
        emb = translator.translate(flat, job.to, generator=seeding.generators(seeding.item_seeds(job.seed, len(flat)), seeding.TRANSLATE))
        grid = emb.reshape(*grid.shape[:2], *emb.shape[1:])
        image = generate_large(pipe, grid, job.size, overlap=win // 2, seed=job.seed, guidance_scale=job.guidance,
                               num_inference_steps=job.steps)
        if job.glass:
            image = keep_glass(region, image)
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(out, image, mpp)
    Image.fromarray(image).save(out.with_suffix(".png"))
    return out
