"""Condition masks for mask-guided generation (pseudo-labels of real tiles, procedural layouts,
augmented variants) and the mask-adherence evaluation of a pipeline's mask branch: what
``synthgen masks ...`` and ``synthgen eval masks`` do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from synthgen.config import ConfigError


def _diameter(diameter: float | None, mpp: float) -> float:
    from synthgen.data.nuclei import nucleus_diameter_px

    return diameter if diameter is not None else nucleus_diameter_px(mpp)


@dataclass(frozen=True)
class NucleiJob:
    """Pseudo-label the nuclei of ``source``: an image folder (masks mirror its relative paths
    under ``out``) or a tile table (``out/images/`` and ``out/masks/``, a segmentation dataset).
    ``diameter``: mean nucleus diameter in px (default: 7 um at ``mpp``); ``overlay``: also write
    outlines on the images under ``out/overlays/``."""

    source: Path
    out: Path
    mpp: float = 1.0
    diameter: float | None = None
    overlay: bool = False


@dataclass(frozen=True)
class MasksResult:
    num_masks: int
    mean_nuclei: float
    mask_dir: Path
    diameter: float


def nuclei(job: NucleiJob, progress: bool = True) -> MasksResult:
    """Run a :class:`NucleiJob`. Raises ConfigError for a folder without images."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    from synthgen.data.masks import write_label_map
    from synthgen.data.nuclei import segment_nuclei
    from synthgen.data.slides import IMAGE_SUFFIXES

    source, out = Path(job.source), Path(job.out)
    d = _diameter(job.diameter, job.mpp)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)})")
        items = ((p.relative_to(source).with_suffix(".png"), lambda p=p: np.asarray(Image.open(p).convert("RGB")))
                 for p in files)
        total, mask_dir, image_dir = len(files), out, None
    else:
        from synthgen.data.datasets import PatchDataset

        ds = PatchDataset(source)
        items = ((Path(f"{i:06d}.png"), lambda i=i: ds[i]["image"].permute(1, 2, 0).numpy()) for i in range(len(ds)))
        total, mask_dir, image_dir = len(ds), out / "masks", out / "images"
    counts = []
    for rel, load in tqdm(items, total=total, desc="nuclei", unit="img", disable=not progress):
        img = load()
        mask = segment_nuclei(img, diameter=d)
        counts.append(int(mask.max()))
        (mask_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        write_label_map(mask_dir / rel, mask)
        if image_dir is not None:
            (image_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(image_dir / rel)
        if job.overlay:
            _save_overlay(img, mask, out / "overlays" / rel)
    return MasksResult(total, float(np.mean(counts)), mask_dir, d)


def _save_overlay(img, mask, path: Path) -> None:
    from PIL import Image
    from skimage.segmentation import find_boundaries

    ov = img.copy()
    ov[find_boundaries(mask, mode="inner")] = (0, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ov).save(path)


@dataclass(frozen=True)
class ProceduralJob:
    """``num`` random layouts of star-convex nuclei, ``size`` px, covering ``density`` of the area."""

    out: Path
    num: int
    size: int = 64
    density: float = 0.2
    mpp: float = 1.0
    diameter: float | None = None
    elongation: float = 0.3
    seed: int = 0


def procedural(job: ProceduralJob) -> MasksResult:
    import numpy as np

    from synthgen.data.masks import write_label_map
    from synthgen.data.nuclei import procedural_nuclei

    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(job.seed)
    d = _diameter(job.diameter, job.mpp)
    counts = []
    for i in range(job.num):
        mask = procedural_nuclei(job.size, job.density, d, elongation=job.elongation, seed=rng)
        counts.append(int(mask.max()))
        write_label_map(out / f"{i:06d}.png", mask)
    return MasksResult(job.num, float(np.mean(counts)), out, d)


@dataclass(frozen=True)
class AugmentMasksJob:
    """``copies`` variants of each label map in ``source``: flips / rotations, elastic warps of
    ``elastic`` px, a fraction ``remove`` of the nuclei removed and ``add`` new ones."""

    source: Path
    out: Path
    copies: int = 4
    elastic: float = 2.0
    remove: float = 0.1
    add: float = 0.1
    mpp: float = 1.0
    diameter: float | None = None
    seed: int = 0


def augment(job: AugmentMasksJob) -> MasksResult:
    """Run an :class:`AugmentMasksJob`. Raises ConfigError for a folder without label maps."""
    import numpy as np

    from synthgen.data.masks import label_map_files, read_label_map, write_label_map
    from synthgen.data.nuclei import augment_mask

    files = label_map_files(job.source)
    if not files:
        raise ConfigError(f"{job.source}: no label-map images (.png, .tif)")
    rng = np.random.default_rng(job.seed)
    d = _diameter(job.diameter, job.mpp)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = []
    for p in files:
        mask = read_label_map(p)
        for k in range(job.copies):
            aug, _ = augment_mask(mask, seed=rng, elastic=job.elastic, remove=job.remove, add=job.add, diameter=d)
            counts.append(int(aug.max()))
            write_label_map(out / f"{p.stem}-{k}.png", aug)
    return MasksResult(len(counts), float(np.mean(counts)), out, d)


@dataclass(frozen=True)
class MaskEvalJob:
    """Mask adherence of ``pipeline``'s mask branch beside the same model without it, on the first
    ``num`` label maps of ``pairs`` (``pairs/masks/``, with the real tiles they came from in
    ``pairs/images/`` when there: each mask is then generated with its tile's embedding)."""

    pipeline: Path
    pairs: Path
    num: int | None = None
    steps: int | None = None
    guidance: float | None = None
    json_out: Path | None = None
    grid: Path | None = None


def evaluate(job: MaskEvalJob) -> dict:
    """Run a :class:`MaskEvalJob`: the report (per arm Dice and object F1), also written to
    ``json_out`` and shown in ``grid`` when given. Raises ConfigError for missing masks or images."""
    import json

    import numpy as np
    from PIL import Image

    from synthgen.config import SAMPLING
    from synthgen.data.masks import read_label_map
    from synthgen.metrics.masks import adherence_study
    from synthgen.pipelines.generate import SynthPipeline

    pairs = Path(job.pairs)
    steps = SAMPLING.steps if job.steps is None else job.steps
    guidance = SAMPLING.guidance if job.guidance is None else job.guidance
    mask_dir = pairs / "masks" if (pairs / "masks").is_dir() else pairs
    files = sorted(mask_dir.glob("*.png"))[:job.num]
    if not files:
        raise ConfigError(f"{mask_dir}: no label-map PNGs")
    if (pairs / "images").is_dir():
        missing = [f.name for f in files if not (pairs / "images" / f.name).exists()]
        if missing:
            raise ConfigError(f"{pairs / 'images'}: no image for masks {', '.join(missing[:5])}")
    pipe = SynthPipeline.from_pretrained(job.pipeline)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.image_size
    masks = np.stack([read_label_map(f, size=(size, size)) for f in files])
    embeddings = None
    if (pairs / "images").is_dir():
        imgs = np.stack([np.asarray(Image.open(pairs / "images" / f.name).convert("RGB")) for f in files])
        embeddings = pipe.encode_images(imgs)
    rep = adherence_study(pipe, masks, embeddings, num_inference_steps=steps, guidance_scale=guidance)
    images = rep.pop("images")
    rep.update(pipeline=str(job.pipeline), pairs=str(pairs), condition="tile embedding" if embeddings is not None
               else "mask only", steps=steps, guidance=guidance)
    if job.json_out:
        from synthgen._io import atomic_write_text

        atomic_write_text(job.json_out, json.dumps(rep, indent=1))
    if job.grid:
        _pairs_grid(masks, images["controlnet"], images["baseline"], Path(job.grid))
    return rep


def _pairs_grid(masks, guided, plain, path: Path, rows: int = 8) -> None:
    """Rows of three: the condition mask's outlines, the mask-guided image, the baseline image."""
    import numpy as np
    from PIL import Image
    from skimage.segmentation import find_boundaries

    tiles = []
    for m, a, b in list(zip(masks, guided, plain, strict=True))[:rows]:
        outline = np.full(a.shape, 255, np.uint8)
        outline[m > 0] = (200, 200, 230)
        outline[find_boundaries(m, mode="inner")] = (40, 40, 160)
        tiles.append(np.concatenate([outline, a, b], 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = Image.fromarray(np.concatenate(tiles, 0))
    scale = max(1, 192 // masks.shape[-1])  # small tiles are upscaled (nearest) so nuclei are visible
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


@dataclass(frozen=True)
class ConditionMasksJob:
    """``n`` condition label maps for mask-guided generation in ``out`` (a recipe's ``paired:``
    step), from ``masks``: ``nuclei`` (pseudo-labels of the tiles of ``tiles``, those with at least
    3 nuclei, in a seeded order), ``procedural`` (``size`` px, ``density``) or a folder of label
    maps (all of them); then, with ``augment``, each map's variant. Nuclei are ``diameter_um``
    across at ``mpp``."""

    out: Path
    masks: str
    n: int
    tiles: Path | None = None
    mpp: float = 1.0
    size: int = 64
    diameter_um: float = 7.0
    density: float = 0.2
    augment: bool = False
    seed: int = 0


def condition_masks(job: ConditionMasksJob) -> Path:
    """Run a :class:`ConditionMasksJob` (``out`` is replaced); returns ``out``.

    Raises:
        ConfigError: a folder without label maps, or tiles without nuclei.
    """
    import shutil

    import numpy as np

    from synthgen.data.masks import label_map_files, read_label_map, write_label_map
    from synthgen.data.nuclei import augment_mask, procedural_nuclei, segment_nuclei

    d = job.diameter_um / job.mpp
    folder = Path(job.out)
    rng = np.random.default_rng(job.seed)
    if job.masks == "nuclei":
        from synthgen.data.datasets import PatchDataset

        ds = PatchDataset(job.tiles)
        masks = []
        for i in rng.permutation(len(ds)):  # tiles with some nuclei, in a seeded order
            m = segment_nuclei(ds[int(i)]["image"].numpy(), diameter=d)
            if m.max() >= 3:
                masks.append(m)
            if len(masks) == job.n:
                break
    elif job.masks == "procedural":
        masks = [procedural_nuclei(job.size, job.density, d, seed=rng) for _ in range(job.n)]
    else:
        files = label_map_files(job.masks)
        if not files:
            raise ConfigError(f"paired.masks: {job.masks} has no label maps (and is not 'nuclei' or 'procedural')")
        masks = [read_label_map(f) for f in files]
    if not masks:
        raise ConfigError("paired.masks: no tile of the tile step has nuclei to pseudo-label")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k, m in enumerate(masks):
        if job.augment:
            m, _ = augment_mask(m, seed=rng, elastic=2.0, remove=0.1, add=0.1, diameter=d)
        write_label_map(folder / f"{k:06d}.png", m)
    return folder
