"""The ``synthgen generate`` and ``synthgen large`` workflows: resolve the conditions (bank,
prior, class, masks), build the plan, run this process's share, merge the manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from synthgen.config import SAMPLING
from synthgen.errors import SynthgenError


@dataclass(frozen=True)
class GenerateJob:
    """What ``synthgen generate`` (and a recipe's ``generate:``, ``rare:`` and ``paired:`` steps) does.

    ``mode``: one of :data:`synthgen.config.GENERATION_MODES` (None: variations with a bank or
    images, else class). ``cache_dir``: real embeddings (default: the pipeline's ``bank/`` when a
    class, the filter or a bank mode needs one); ``images_dir``: reference tiles instead (at the model's size, or any size with their resolution
    ``image_mpp``: resampled to the pipeline's scale); ``label``:
    a class id or name; ``prior_dir``: default the pipeline's ``prior/``. ``use_filter``: the
    selective filter (class check with a labelled bank, realism check against ``realism_ref`` or
    ``images_dir``). ``masks_dir``: condition label maps (image i gets mask i mod M), written beside
    the images; ``controlnet`` replaces the pipeline's mask branch. ``steps`` None: the sampling
    default (the few-step variant's with ``fast``).
    """

    pipeline: Path
    out: Path
    n: int
    mode: str | None = None
    cache_dir: Path | None = None
    embedding_key: str = "emb"
    images_dir: Path | None = None
    image_mpp: float | None = None
    label: int | str | None = None
    prior_dir: Path | None = None
    use_filter: bool = False
    guidance: float = SAMPLING.guidance
    steps: int | None = None
    sampler: str | None = None
    seed: int = 0
    batch_size: int = 16
    masks_dir: Path | None = None
    controlnet: Path | None = None
    realism_ref: Path | None = None
    strength: float = 1.0
    dtype: str = "auto"
    fast: bool = False


def embedding_bank(cache_dir: Path, key: str = "emb"):
    """Embeddings, labels (or None) and class names (or None) of a feature cache."""
    from synthgen.data.cache import CacheDataset

    ds = CacheDataset(cache_dir)
    if key not in ds.keys:
        raise SynthgenError(f"{cache_dir}: cache has no {key!r} embeddings (has {', '.join(ds.keys)})")
    embs = torch.stack([ds[i][key] for i in range(len(ds))]).float()
    labels = torch.tensor([ds[i]["label"] for i in range(len(ds))]) if "label" in ds.keys else None
    return embs, labels, ds.classes


def class_embeddings(embs: torch.Tensor, labels: torch.Tensor | None, label: int | None) -> torch.Tensor:
    """The bank embeddings of class ``label`` (all of them for None).

    Raises:
        SynthgenError: a class asked of a bank without labels, or a class with no embeddings.
    """
    if label is None:
        return embs
    if labels is None:
        raise SynthgenError("the cache has no labels, so --class cannot select embeddings")
    embs = embs[labels == label]
    if len(embs) == 0:
        raise SynthgenError(f"--class {label}: the cache has no embeddings of this class")
    return embs


def resolve_class(value, names: list[str] | None, where: str) -> int | None:
    """A ``--class`` value (an id, or a class name of ``names``, case-insensitive) as a class id.

    Raises:
        SynthgenError: an unknown name or an id outside ``names``, listing the classes.
    """
    if value is None:
        return None
    listing = f"{where} has classes {', '.join(f'{i} {n}' for i, n in enumerate(names or []))}"
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        if names is not None and not 0 <= int(value) < len(names):
            raise SynthgenError(f"--class {value}: no such class id; {listing}")
        return int(value)
    if names is None:
        raise SynthgenError(f"--class {value!r}: {where} has no class names; give a class id")
    found = [i for i, n in enumerate(names) if n.lower() == str(value).lower()]
    if not found:
        raise SynthgenError(f"--class {value!r}: unknown class; {listing}")
    return found[0]


def model_licence(pipeline) -> str | None:
    """The text of ``PIPELINE/LICENSE`` (the licence its weights carry, from their training data),
    or None for a folder without one (e.g. a hub id)."""
    path = Path(pipeline) / "LICENSE"
    return path.read_text().strip() if path.is_file() else None


def pipeline_class_names(pipeline) -> list[str] | None:
    """The class names the pipeline's denoiser is conditioned on (``transformer/config.json``), or
    None (no names recorded, or a hub id)."""
    cfg = Path(pipeline) / "transformer" / "config.json"
    if not cfg.is_file():
        return None
    names = json.loads(cfg.read_text()).get("class_names")
    return list(names) if names else None


def shipped(pipeline, name: str) -> Path | None:
    """``PIPELINE/bank`` (labelled feature cache) or ``PIPELINE/prior`` (embedding prior) when shipped."""
    path = Path(pipeline) / name
    return path if path.is_dir() else None


def reference_tiles(pipe, images_dir: Path, image_mpp: float | None = None) -> torch.Tensor:
    """The reference tiles of ``images_dir`` as uint8 (N, 3, S, S) at the model's tile size S and scale.

    Tiles of the model's size are taken as they are. Others need their resolution ``image_mpp``:
    they are resampled to the pipeline's scale (:attr:`SynthPipeline.mpp`) and centre-cropped to S;
    without it they are refused, since resizing them would change the scale the model sees.

    Raises:
        SynthgenError: images of another size without ``image_mpp``, a pipeline without a recorded
            scale, or images too small at the model's scale.
    """
    from synthgen.data.datasets import ImageListDataset

    side = pipe.image_size
    if image_mpp is None:
        ds = ImageListDataset.from_folder(images_dir)
        if len(ds) == 0:
            raise SynthgenError(f"--images {images_dir}: no images")
        images = [ds[i]["image"] for i in range(len(ds))]
        sizes = sorted({tuple(im.shape[-2:]) for im in images})
        if sizes != [(side, side)]:
            scale = f" at {pipe.mpp:g} um/px" if pipe.mpp else ""
            raise SynthgenError(f"--images {images_dir}: images of {', '.join(f'{h}x{w}' for h, w in sizes)} px; the "
                                f"model takes {side}x{side} px tiles{scale}. Pass --image-mpp (their resolution) to "
                                "resample them to the model's scale, or tile them at it (synthgen tile)")
    else:
        if pipe.mpp is None:
            raise SynthgenError("--image-mpp: the pipeline records no scale to resample to (model_index.json has no "
                                "mpp; reassemble it with `synthgen assemble --mpp`)")
        ds = ImageListDataset.from_folder(images_dir, image_mpp=image_mpp, mpp=pipe.mpp)
        images = [ds[i]["image"] for i in range(len(ds))]
    out = []
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        if h < side or w < side:
            raise SynthgenError(f"--images {images_dir}: image {i} is {h}x{w} px at the model's scale, smaller than "
                                f"its {side} px tiles")
        y, x = (h - side) // 2, (w - side) // 2
        out.append(im[:, y : y + side, x : x + side])
    return torch.stack(out)


def build_plan(pipe, n: int, mode: str | None, bank, images_dir, label, prior, seed: int,
               image_mpp: float | None = None):
    """The generation plan. ``bank``: (embeddings, labels) or None; ``prior``: an EmbeddingPrior or None."""
    from synthgen import seeding
    from synthgen.pipelines.jobs import GenerationPlan
    from synthgen.pipelines.rare import interpolate_embeddings

    g = seeding.generator(seed)  # the plan's condition draws (bank picks, pairs); a prefix of n draws is that of fewer
    seeds = seeding.item_seeds(seed, n)
    mode = mode or ("variations" if (bank is not None or images_dir) else "class")
    labels = [label] * n
    if mode == "mask":  # the condition masks alone (null embedding); generate() attaches them
        return GenerationPlan(None, labels, seeds, "mask")
    if mode == "class":
        if not pipe.transformer.config.num_classes:
            raise SynthgenError("--mode class needs a class-conditional model; this one is conditioned on embeddings "
                                "(use --cache/--images for variations or --mode prior)")
        if label is None:
            raise SynthgenError("--mode class needs --class")
        return GenerationPlan(None, labels, seeds, "class")
    if mode == "prior":
        if prior is None or label is None:
            raise SynthgenError("--mode prior needs --prior PRIOR_DIR (or a pipeline with prior/) and --class")
        embs = prior.sample(torch.full((n,), label), generator=seeding.generators(seeds, seeding.PRIOR)).cpu()  # item i: its seed only
        return GenerationPlan(embs, labels, seeds, "prior")
    if images_dir is not None:

        images = reference_tiles(pipe, images_dir, image_mpp)
        refs = pipe.encode_images(images).cpu()
        pick = torch.randint(0, len(refs), (n,), generator=g)
        return GenerationPlan(refs[pick], labels, seeds, "variations", references=images,
                              reference_index=pick.tolist())
    if bank is None:
        raise SynthgenError(f"--mode {mode} needs --cache (the real embeddings) or --images")
    embs = class_embeddings(*bank, label)
    if mode == "interpolation":
        return GenerationPlan(interpolate_embeddings(embs, n, g), labels, seeds, "interpolation")
    return GenerationPlan(embs[torch.randint(0, len(embs), (n,), generator=g)], labels, seeds, "variations")


NO_REALISM_REFERENCE = ("no real reference images (give --realism-ref DIR|TILES.csv, or --images DIR; "
                        "the pipeline's bank holds embeddings, not images)")


def realism_reference(path, image_size: int):
    """The real tiles of a realism check: a tile table (read at its own mpp and size) or an image
    folder (resized to the model's ``image_size``, as ``--images`` references are).

    Raises:
        SynthgenError: fewer than 2 images.
    """
    from synthgen.data.datasets import ImageListDataset, PatchDataset

    path = Path(path)
    ds = PatchDataset(path) if path.is_file() else ImageListDataset.from_folder(path, size=image_size)
    if len(ds) < 2:
        raise SynthgenError(f"{path}: the realism check needs at least 2 real reference images (found {len(ds)})")
    return ds


def apply_realism(manifest_path, realism, reference: str) -> dict:
    """Score every image of a ``synthgen generate`` manifest with a fitted
    :class:`~synthgen.metrics.handcrafted.RealismFilter` and rewrite the manifest: each item gets
    ``realism_score`` and ``realistic`` (and ``class_accepted``: the class check's verdict, where
    it ran); ``accepted`` becomes class check passed (where it ran) and realistic; ``acceptance_rate`` is recomputed (the class check's own rate is kept as
    ``class_acceptance_rate``) and ``realism`` summarises the check. Returns the manifest."""
    import numpy as np
    from PIL import Image

    from synthgen._io import atomic_write_text

    manifest_path = Path(manifest_path)
    m = json.loads(manifest_path.read_text())
    items = m["items"]
    images = []
    for it in items:
        with Image.open(manifest_path.parent / it["file"]) as im:
            images.append(np.asarray(im.convert("RGB")))
    scores = realism.scores(images)
    class_ok = [it["accepted"] for it in items if it["accepted"] is not None]
    for it, score in zip(items, scores, strict=True):
        it["realism_score"] = float(score)
        it["realistic"] = bool(score <= realism.threshold)
        if it["accepted"] is not None:
            it["class_accepted"] = it["accepted"]
        it["accepted"] = it["realistic"] and it.get("class_accepted", True)
    m["realism"] = {"reference": reference, "n_reference": len(realism), "threshold": realism.threshold,
                    "quantile": realism.quantile, "margin": realism.margin, "checked": len(items),
                    "rejected": sum(not it["realistic"] for it in items),
                    # of those: the images the class check alone would have kept
                    "rejected_only_for_realism": sum(not it["realistic"] and it.get("class_accepted", True)
                                                     for it in items)}
    if class_ok:
        m["class_acceptance_rate"] = sum(class_ok) / len(class_ok)
    m["acceptance_rate"] = sum(it["accepted"] for it in items) / len(items)
    atomic_write_text(manifest_path, json.dumps(m, indent=1))
    return m


def filter_summary(manifest: dict) -> list[str]:
    """Printable lines on the selective filter of a ``synthgen generate`` manifest (none without one)."""
    n, r = manifest["num_items"], manifest.get("realism")
    ran = r is not None and "skipped" not in r
    class_rate = manifest.get("class_acceptance_rate") if ran else manifest.get("acceptance_rate")
    lines = [] if class_rate is None else [f"class filter: {round(class_rate * n)} of {n} nearest to their class"]
    if r is not None and not ran:
        lines.append(f"realism check skipped: {r['skipped']}")
    elif ran:
        passed = (f"{r['rejected_only_for_realism']} of them passed the class check; "
                  if class_rate is not None else "")
        lines.append(f"realism check: {r['rejected']} of {r['checked']} rejected as unrealistic ({passed}nearest "
                     f"real tile further than {r['threshold']:.3g} in standardised hand-crafted features; "
                     f"{r['n_reference']} reference tiles from {r['reference']})")
    if lines and "acceptance_rate" in manifest:
        lines.append(f"accepted: {round(manifest['acceptance_rate'] * n)} of {n}")
    return lines


def generate(job: GenerateJob) -> Path | None:
    """Run ``job`` (its share of it under ``accelerate launch``); returns the merged manifest's path
    on the main process, None on the others.

    Raises:
        SynthgenError: options that do not go together or data that does not fit (each names the option).
    """
    import hashlib

    from accelerate import PartialState

    from synthgen.pipelines.jobs import merge_manifest, run_plan
    from synthgen.pipelines.precision import dtype_name, resolve_dtype

    if job.strength < 1 and job.images_dir is None:
        raise SynthgenError("--strength below 1 (anchored variations) needs --images: the reference tiles to start from")
    mode, mask_files = _masks(job)
    if job.realism_ref is not None and not job.use_filter:
        raise SynthgenError("--realism-ref is the reference of the filter's realism check: add --filter")
    cache_dir, bank, prior, names, label = _conditions(job, mode)
    realism_source = (job.realism_ref if job.realism_ref is not None else job.images_dir) if job.use_filter else None
    state = PartialState(cpu=not torch.cuda.is_available())
    pipe = _load_pipeline(job, state.device, mask_files)
    steps = job.steps if job.steps is not None else pipe.default_fast_steps if job.fast else SAMPLING.steps
    why_not_fast = pipe.fast_unavailable(steps, job.guidance, masks=mask_files, strength=job.strength,
                                         sampler=job.sampler)
    if job.fast and why_not_fast:
        raise SynthgenError(f"--fast: {why_not_fast}")
    used_fast = why_not_fast is None
    plan = build_plan(pipe, job.n, mode, bank, job.images_dir, label, prior, job.seed, job.image_mpp)
    if mask_files is not None:
        plan.masks = [mask_files[i % len(mask_files)] for i in range(len(plan))]
    reference = realism_reference(realism_source, pipe.image_size) if realism_source is not None else None
    class_filter = encoder = None
    if job.use_filter and (label is not None or realism_source is None):
        from synthgen.pipelines.rare import ClassFilter

        if bank is None or label is None:
            raise SynthgenError("--filter needs --cache (with labels) and --class for its class check, or real "
                                "reference images (--realism-ref, or --images) for its realism check")
        if bank[1] is None:
            raise SynthgenError(f"{cache_dir}: --filter needs labels in the cache")
        if pipe.image_encoder is None:
            raise SynthgenError("--filter needs a pipeline with an image encoder")
        class_filter, encoder = ClassFilter(*bank), pipe.image_encoder
    run_plan(pipe, plan, job.out, rank=state.process_index, world=state.num_processes, guidance_scale=job.guidance,
             num_inference_steps=steps, batch_size=job.batch_size, class_filter=class_filter, encoder=encoder,
             progress=state.is_main_process, strength=job.strength, fast=used_fast)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    weights = Path(job.pipeline) / "transformer" / "diffusion_pytorch_model.safetensors"
    meta = {"model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else None,
            "mode": plan.kind, "class": label, "guidance_scale": job.guidance, "num_inference_steps": steps,
            "seed": job.seed, "fast_variant": used_fast,
            "sampler": type(pipe.fast_scheduler if used_fast else pipe.scheduler).__name__,
            "strength": job.strength, "dtype": dtype_name(resolve_dtype(job.dtype, pipe._execution_device))}
    if names and label is not None:
        meta["class_name"] = names[label]
    licence = model_licence(job.pipeline)
    if licence is not None:
        meta["model_licence"] = licence
    if job.use_filter and reference is None:
        meta["realism"] = {"skipped": NO_REALISM_REFERENCE}
    path = merge_manifest(job.out, len(plan), meta)
    if reference is not None:
        from synthgen.metrics.handcrafted import RealismFilter

        apply_realism(path, RealismFilter().fit(reference), str(realism_source))
    return path


def _masks(job: GenerateJob) -> tuple[str | None, list | None]:
    """The job's mode (``mask`` when masks are the only condition source) and its mask files."""
    mode = job.mode
    if job.masks_dir is None:
        if mode == "mask":
            raise SynthgenError("--mode mask needs --masks DIR")
        return mode, None
    from synthgen.data.masks import label_map_files

    files = label_map_files(job.masks_dir)
    if not files:
        raise SynthgenError(f"{job.masks_dir}: no label-map images (.png, .tif) for --masks")
    if mode is None and job.cache_dir is None and job.images_dir is None:
        mode = "mask"
    return mode, files


def _conditions(job: GenerateJob, mode: str | None):
    """(cache folder, bank (embeddings, labels) or None, prior or None, class names, class id): the
    pipeline's shipped ``bank/`` and ``prior/`` stand in for options not given."""
    prior_dir = job.prior_dir if job.prior_dir is not None or mode != "prior" else shipped(job.pipeline, "prior")
    cache_dir = job.cache_dir
    if cache_dir is None and job.images_dir is None and (job.label is not None or job.use_filter
                                                         or mode in ("variations", "interpolation")):
        cache_dir = shipped(job.pipeline, "bank")
    bank, names = None, None
    if cache_dir is not None:
        embs, bank_labels, names = embedding_bank(cache_dir, job.embedding_key)
        bank = (embs, bank_labels)
    prior = None
    if mode == "prior" and prior_dir is not None:
        from synthgen.models.prior import EmbeddingPrior

        prior = EmbeddingPrior.from_pretrained(prior_dir)
        prior_names = prior.config.get("class_names")
        if names and prior_names and list(names) != list(prior_names):
            raise SynthgenError(f"{prior_dir} and {cache_dir} name their classes differently "
                                f"({', '.join(prior_names)} vs {', '.join(names)})")
        names = prior_names or names
    where = "the prior" if prior is not None else "the cache"
    if names is None and job.label is not None:  # --images: the names the denoiser was trained with
        names, where = pipeline_class_names(job.pipeline), "the pipeline"
    label = resolve_class(job.label, names, where)
    if prior is not None and label is not None and not 0 <= label < prior.config.num_classes:
        raise SynthgenError(f"--class {label}: the prior has classes 0-{prior.config.num_classes - 1}")
    return cache_dir, bank, prior, names, label


def _load_pipeline(job: GenerateJob, device, mask_files):
    """The job's pipeline on ``device``, with its dtype, sampler and mask branch."""
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.sampling import scheduler_for

    pipe = SynthPipeline.from_pretrained(job.pipeline).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.inference_dtype = job.dtype
    pipe.scheduler = scheduler_for(pipe.scheduler, job.sampler)
    if job.controlnet is not None:
        from synthgen.models.controlnet import MaskControlNet

        pipe.register_modules(controlnet=MaskControlNet.from_pretrained(job.controlnet).to(device))
    if mask_files is not None and pipe.controlnet is None:
        raise SynthgenError(f"--masks: {job.pipeline} has no mask branch (controlnet/); pass --controlnet DIR "
                            "(train one with `synthgen train`, task: controlnet)")
    return pipe


@dataclass(frozen=True)
class LargeJob:
    """What ``synthgen large`` does: one ``size`` px image, re-synthesising the region (``x``, ``y``)
    of ``reference`` read at ``mpp`` (default: the pipeline's scale) window by window, or
    conditioned on one embedding (of class ``label``) of ``cache_dir``."""

    pipeline: Path
    out: Path
    size: int = 512
    reference: Path | None = None
    x: int = 0
    y: int = 0
    slide_mpp: float | None = None
    cache_dir: Path | None = None
    embedding_key: str = "emb"
    label: int | str | None = None
    overlap: int | None = None
    mpp: float | None = None
    seed: int = 0
    steps: int = SAMPLING.steps
    guidance: float = SAMPLING.guidance


def large(job: LargeJob) -> Path:
    """``synthgen large``: one large image as a pyramidal TIFF (+ PNG preview)."""
    from synthgen import seeding
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.large_image import (
        generate_large,
        region_embeddings,
        write_pyramidal_tiff,
    )

    label, size, seed = job.label, job.size, job.seed
    if job.reference is not None:
        label = resolve_class(label, pipeline_class_names(job.pipeline), "the pipeline")
    pipe = SynthPipeline.from_pretrained(job.pipeline)
    pipe.set_progress_bar_config(disable=True)
    mpp = pipe.resolve_mpp(job.mpp)
    ov_px = pipe.image_size // 2 if job.overlap is None else job.overlap
    if job.reference is not None:
        from synthgen.data.slides import Slide

        if pipe.image_encoder is None:
            raise SynthgenError("--reference needs a pipeline with an image encoder")
        with Slide(job.reference, mpp=job.slide_mpp) as s:
            grid = region_embeddings(pipe, s.read(job.x, job.y, size, mpp), ov_px)
    elif job.cache_dir is not None:
        embs, bank_labels, names = embedding_bank(job.cache_dir, job.embedding_key)
        label = resolve_class(label, names, "the cache")
        embs = class_embeddings(embs, bank_labels, label)
        grid = embs[int(torch.randint(0, len(embs), (1,), generator=seeding.generator(seed)))]
    else:
        raise SynthgenError("synthgen large needs --reference (a slide or image region to re-synthesise) or --cache")
    image = generate_large(pipe, grid, size, overlap=ov_px, seed=seed, guidance_scale=job.guidance,
                           num_inference_steps=job.steps, class_label=None if label is None else int(label))
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(out, image, mpp)
    from PIL import Image

    Image.fromarray(image).save(out.with_suffix(".png"))
    return out
