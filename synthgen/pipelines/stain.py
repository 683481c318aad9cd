"""Virtual IHC: H&E (or hematoxylin) tiles -> IHC tiles of a target stain, PixCell's way.

1. the pipeline's image encoder embeds the source tile;
2. a :class:`~synthgen.models.stain.StainTranslator` turns that embedding into the embedding the
   matching IHC tile would have;
3. the denoiser, adapted to IHC images (a LoRA adapter merged into the base weights, or a full
   fine-tune), decodes the IHC embedding into an IHC tile.

**Structure-preserving mode** also gives the mask branch the nuclei of the source tile
(:func:`~synthgen.data.nuclei.segment_nuclei`), so nuclei stay where they are in the H&E; the
embedding-only mode keeps the tissue's character but not its layout.

**Spatial translators** (``stains/<name>/transformer`` with source channels, trained with
``task: stain_denoiser``; ``route="spatial"``) see the source tile itself: its VAE latents are concatenated to the
denoiser's input (InstructPix2Pix), so the whole layout (nuclei, stroma, glands, glass) carries
over, and the translated embedding sets the stain's character. Guidance on the source image
(``image_guidance_scale``) and on the embedding (``guidance_scale``) are separate.

A pipeline folder holds its stains as ``stains/<name>/translator`` plus ``stains/<name>/lora``
(``lora_adapter.safetensors`` + ``lora_config.json``) or ``stains/<name>/transformer``, and
optionally ``stains/<name>/vae``: a decoder fine-tuned on that stain over the same (frozen)
encoder, for a VAE that has only seen H&E colours.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import torch

from synthgen import seeding
from synthgen.config import SAMPLING
from synthgen.errors import StainError


def available_stains(pipeline_dir: str | os.PathLike) -> list[str]:
    root = Path(pipeline_dir) / "stains"
    if not root.is_dir():
        return []  # hidden folders are add_stain's work in progress (or an old copy it is replacing)
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "translator").is_dir())


@torch.no_grad()
def merge_lora(denoiser, lora_dir: str | os.PathLike):
    """A copy of ``denoiser`` with the LoRA adapter in ``lora_dir`` folded into its weights
    (W + alpha / rank * B A), as saved by ``synthgen train`` with ``lora.rank > 0``."""
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    cfg = json.loads((lora_dir / "lora_config.json").read_text())
    state = load_file(str(lora_dir / "lora_adapter.safetensors"))
    scale = cfg["alpha"] / cfg["rank"]
    out = copy.deepcopy(denoiser)
    params = dict(out.named_parameters())
    merged = 0
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        prefix = key.split(".lora_A.")[0]
        b = state[key.replace(".lora_A.", ".lora_B.")]
        name = f"{prefix}.weight"
        if name not in params:
            raise StainError(f"{lora_dir}: adapter targets {prefix}, which the base denoiser does not have")
        w = params[name]
        w += (scale * (b.float() @ a.float())).to(w.dtype)
        merged += 1
    if not merged:
        raise StainError(f"{lora_dir}: no LoRA weights in lora_adapter.safetensors")
    return out


def load_stain(pipeline_dir: str | os.PathLike, stain: str, route: str | None = None):
    """(IHC pipeline, translator) for ``stain`` from a pipeline folder's ``stains/``.

    Args:
        route: ``spatial`` (the denoiser that sees the source image, ``transformer/`` with source
            channels), ``embedding`` (PixCell's embedding-only route: ``lora/`` or a plain
            ``transformer/``), or None: embedding where the stain has it, else spatial. (The
            shipped spatial translators keep the layout better than the plain embedding route but
            not better than the embedding route with ``structure=True``: see the model card.)

    Raises:
        StainError: unknown stain name, no model for it in this pipeline (lists those there), or
            no model of the asked route.
    """
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.stain import StainTranslator
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.stains import resolve_stain

    name = resolve_stain(stain)
    folder = Path(pipeline_dir) / "stains" / name
    if not (folder / "translator").is_dir():
        have = available_stains(pipeline_dir)
        raise StainError(f"{pipeline_dir}: no virtual-{name} model (stains/{name}/translator); "
                         f"this pipeline has: {', '.join(have) or 'no stain models'}")
    if route not in (None, "spatial", "embedding"):
        raise StainError(f"route must be spatial or embedding, got {route!r}")
    pipe = SynthPipeline.from_pretrained(pipeline_dir)
    full = folder / "transformer"
    spatial_full = full.is_dir() and bool(Denoiser.load_config(full).get("source_channels"))
    if route == "spatial" and not spatial_full:
        raise StainError(f"{folder}: no spatial translator (transformer/ with source channels; train one with "
                         "task: stain_denoiser)")
    has_embedding = (folder / "lora").is_dir() or (full.is_dir() and not spatial_full)
    if route == "spatial" or (route is None and not has_embedding):
        transformer = Denoiser.from_pretrained(full)
    elif (folder / "lora").is_dir():
        transformer = merge_lora(pipe.transformer, folder / "lora")
    elif full.is_dir() and not spatial_full:
        transformer = Denoiser.from_pretrained(full)
    else:
        raise StainError(f"{folder}: needs lora/ (an adapter) or transformer/ (a fine-tuned denoiser)"
                         + (" for the embedding route" if route == "embedding" else ""))
    vae = pipe.vae
    if (folder / "vae").is_dir():
        from synthgen.models.vae import StrictAutoencoderKL

        vae = StrictAutoencoderKL.from_pretrained(folder / "vae")
    spatial = bool(transformer.config.get("source_channels", 0))  # the mask branch was trained on the base inputs
    ihc = SynthPipeline(transformer, vae, pipe.scheduler, image_encoder=pipe.image_encoder,
                        controlnet=None if spatial else pipe.controlnet, mpp=pipe.mpp)
    ihc.set_progress_bar_config(disable=True)
    return ihc, StainTranslator.from_pretrained(folder / "translator")


def install_stain(pipeline_dir: str | os.PathLike, stain: str, translator: str | os.PathLike,
                  lora: str | os.PathLike | None = None, transformer: str | os.PathLike | None = None,
                  vae: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Add a trained virtual stain to a pipeline folder as ``stains/<stain>/`` (what :func:`load_stain`
    reads), from the ``model`` folders of its training runs.

    Args:
        translator: a ``task: translator`` model trained for ``stain``.
        lora: a ``task: denoiser`` model trained with ``lora.rank > 0`` on the pipeline's denoiser
            (its ``lora_adapter.safetensors``; rank and alpha from ``lora_config.json`` or the
            run's ``config.json``), or ``transformer``: a fully fine-tuned denoiser. Both when the
            transformer is a spatial translator (``task: stain_denoiser``): the stain then has
            both routes (see :func:`load_stain`).
        vae: optional decoder fine-tuned on the stain (``model.freeze_encoder``).
        overwrite: replace a stain already there.

    Every part is loaded (and the adapter merged into the pipeline's denoiser) in a temporary
    folder beside the stains, which is renamed into place only when all parts check out: the
    stain's folder appears complete or not at all, and a replaced one stays until then.

    Raises:
        StainError: unknown stain, a translator not trained for it, neither or both of
            ``lora``/``transformer``, a part that does not load, or the stain exists already.
    """
    import shutil

    from synthgen._io import atomic_dir
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.stain import StainTranslator
    from synthgen.models.vae import StrictAutoencoderKL
    from synthgen.stains import resolve_stain

    name = resolve_stain(stain)
    pipeline_dir = Path(pipeline_dir)
    dest = pipeline_dir / "stains" / name
    if dest.exists() and not overwrite:
        raise StainError(f"{dest} exists: pass overwrite=True (--overwrite) to replace it")
    if lora is None and transformer is None:
        raise StainError("give the IHC denoiser: lora (an adapter run), transformer (a fine-tune or a spatial "
                         "translator), or both (an adapter and a spatial translator)")
    if lora is not None and transformer is not None:
        try:
            both_ok = bool(Denoiser.load_config(transformer).get("source_channels"))
        except OSError as e:
            raise StainError(f"{transformer}: not a denoiser model folder ({e})") from e
        if not both_ok:
            raise StainError("lora and transformer together: the transformer must be a spatial translator "
                             "(task: stain_denoiser); give one fine-tuned embedding-route denoiser or the other")
    try:
        tr = StainTranslator.from_pretrained(translator)
        tr.stain_ids(name)
    except ValueError as e:
        raise StainError(f"{translator}: {e}") from e
    except OSError as e:
        raise StainError(f"{translator}: not a StainTranslator model folder ({e})") from e
    (pipeline_dir / "stains").mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:  # the old folder is deleted only once the new one is in place
        shutil.copytree(translator, tmp / "translator", dirs_exist_ok=True)
        if lora is not None:
            lora = Path(lora)
            if not (lora / "lora_adapter.safetensors").is_file():
                raise StainError(f"{lora}: no lora_adapter.safetensors (train the denoiser with lora.rank > 0)")
            (tmp / "lora").mkdir()
            shutil.copy2(lora / "lora_adapter.safetensors", tmp / "lora")
            if (lora / "lora_config.json").is_file():
                shutil.copy2(lora / "lora_config.json", tmp / "lora")
            else:  # older runs: rank and alpha are in the run's training config
                run_cfg = lora.parent / "config.json"
                run = json.loads(run_cfg.read_text()).get("lora", {}) if run_cfg.is_file() else {}
                if not run.get("rank"):
                    raise StainError(f"{lora}: no lora_config.json, and no lora.rank in {run_cfg}")
                (tmp / "lora" / "lora_config.json").write_text(json.dumps(
                    {"rank": run["rank"], "alpha": run.get("alpha") or run["rank"]}))
            merge_lora(Denoiser.from_pretrained(pipeline_dir, subfolder="transformer"), tmp / "lora")
        if transformer is not None:
            Denoiser.from_pretrained(transformer)
            shutil.copytree(transformer, tmp / "transformer")
        if vae is not None:
            StrictAutoencoderKL.from_pretrained(vae)
            shutil.copytree(vae, tmp / "vae")
    return dest


def keep_glass(source: np.ndarray, virtual: np.ndarray, feather: float = 1.5) -> np.ndarray:
    """``virtual`` (uint8 (H, W, 3)) with the glass of ``source`` (same size) kept as glass.

    The translator only ever saw tissue, so where a slide region is empty it invents tissue; real
    IHC leaves glass empty. Glass is where the source's optical density is under
    :data:`synthgen.data.pairs.GLASS_OD` (specks removed, holes under 16 px closed), filled with
    the source's own glass colour (its median); the edge is feathered over ``feather`` pixels.
    A region without glass comes back unchanged.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.morphology import remove_small_holes, remove_small_objects

    from synthgen.data.pairs import GLASS_OD
    from synthgen.data.registration import optical_density

    if source.shape != virtual.shape:
        raise StainError(f"source {source.shape} and virtual {virtual.shape} differ in size")
    glass = optical_density(source) < GLASS_OD
    glass = remove_small_holes(remove_small_objects(glass, max_size=15), max_size=15)
    if not glass.any():
        return virtual
    colour = np.median(source[glass], axis=0)
    alpha = gaussian_filter(glass.astype(np.float32), feather) if feather > 0 else glass.astype(np.float32)
    alpha = np.where(glass, np.maximum(alpha, 0.5), alpha)[..., None]  # glass pixels at least half glass
    out = virtual.astype(np.float32) * (1 - alpha) + colour[None, None, :] * alpha
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def is_spatial(pipe) -> bool:
    """Whether the IHC pipeline's denoiser sees the source image (a spatial translator)."""
    return bool(pipe.transformer.config.get("source_channels", 0))


def virtual_stain(pipe, translator, images, stain: str, seeds=None, num_inference_steps: int = SAMPLING.steps,
                  guidance_scale: float = SAMPLING.guidance, structure: bool = False, batch_size: int = 32,
                  image_guidance_scale: float | None = None, glass: bool = True) -> np.ndarray:
    """Virtual ``stain`` tiles (uint8 (B, H, W, 3)) for source tiles ``images`` (uint8 (B, 3, H, W)
    or (B, H, W, 3), at the model's tile size).

    Args:
        structure: also condition on the source tile's nuclei through the mask branch (embedding
            route only: a spatial translator keeps the whole layout by itself).
        seeds: one per image (the translator's and the denoiser's noise); default 0..B-1.
        image_guidance_scale: spatial translators: guidance on the source image (None: the
            source is kept in both guidance passes, guidance acts on the embedding alone).
        glass: where the source tile is glass, keep glass (:func:`keep_glass`): the models were
            trained on tissue and otherwise fill empty glass with stained tissue.
    """
    from synthgen.data.nuclei import segment_nuclei
    from synthgen.pipelines.generate import as_uint8_tensor

    x = as_uint8_tensor(images)
    size = pipe.image_size
    if tuple(x.shape[-2:]) != (size, size):
        raise StainError(f"source tiles must be {size}x{size} px (the model's tile size at its resolution), "
                         f"got {tuple(x.shape[-2:])}")
    seeds = seeding.item_seeds(0, len(x)) if seeds is None else [int(s) for s in seeds]
    src = pipe.encode_images(x)
    emb = translator.translate(src.cpu(), stain, generator=seeding.generators(seeds, seeding.TRANSLATE))  # a tile: its seed alone
    kw = {}
    if is_spatial(pipe):
        if structure:
            raise StainError("structure mode is for the embedding route; this stain's translator sees the source "
                             "image and keeps its layout without it")
        kw.update(source_images=x, image_guidance_scale=image_guidance_scale)
    elif structure:
        if pipe.controlnet is None:
            raise StainError("structure-preserving mode needs a pipeline with a mask branch (controlnet/)")
        kw["masks"] = np.stack([segment_nuclei(im) for im in x.permute(0, 2, 3, 1).numpy()])
    out = pipe(embeddings=emb, seeds=seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
               batch_size=batch_size, output_type="np", **kw).images
    if glass:
        src_np = x.permute(0, 2, 3, 1).numpy()
        out = np.stack([keep_glass(a, b) for a, b in zip(src_np, out, strict=True)])
    return out


def virtual_stain_region(pipe, translator, region: np.ndarray, stain: str, seed: int = 0, overlap: int | None = None,
                         num_inference_steps: int = SAMPLING.steps, guidance_scale: float = SAMPLING.guidance,
                         image_guidance_scale: float | None = None, batch_size: int = 32,
                         progress: bool = True, glass: bool = True) -> np.ndarray:
    """Virtual ``stain`` of a large source image (uint8 (H, W, 3)) with a spatial translator:
    overlapping model-size windows (``overlap`` px, default half a window), each translated from
    its own source pixels with item seed ``window index`` of ``seed`` (:func:`synthgen.seeding.item_seeds`), blended with linear ramps over the
    overlaps (every window keeps its source's layout, so only colour needs blending); ``glass``
    as in :func:`virtual_stain`, decided once over the whole region.

    Raises:
        StainError: the pipeline is not a spatial translator, or the image is smaller than a window.
    """
    if not is_spatial(pipe):
        raise StainError("virtual_stain_region needs a spatial translator (stains/<name>/transformer with source "
                         "channels); the embedding route uses synthgen.pipelines.large_image.generate_large")
    win = pipe.image_size
    ov = win // 2 if overlap is None else int(overlap)
    h, w = region.shape[:2]
    if h < win or w < win or not 0 <= ov < win:
        raise StainError(f"region {h}x{w} px: needs at least one {win} px window and 0 <= overlap < {win}")
    step = win - ov

    def starts(n: int) -> list[int]:
        out = list(range(0, n - win + 1, step))
        return out if out[-1] == n - win else out + [n - win]

    corners = [(y, x) for y in starts(h) for x in starts(w)]
    ramp = np.minimum(np.arange(win) + 1, np.arange(win)[::-1] + 1).astype(np.float64)
    weight = np.minimum(np.minimum.outer(ramp, ramp), max(ov, 1))[..., None]  # flat inside, ramps in the overlaps
    acc, tot = np.zeros((h, w, 3)), np.zeros((h, w, 1))
    from tqdm.auto import tqdm

    for lo in tqdm(range(0, len(corners), batch_size), desc=f"virtual {stain}", disable=not progress, leave=False):
        part = corners[lo : lo + batch_size]
        tiles = np.stack([region[y : y + win, x : x + win] for y, x in part])
        out = virtual_stain(pipe, translator, tiles, stain, seeds=seeding.item_seeds(seed, len(part), start=lo),
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                            image_guidance_scale=image_guidance_scale, batch_size=batch_size, glass=False)
        for (y, x), im in zip(part, out, strict=True):
            acc[y : y + win, x : x + win] += im * weight
            tot[y : y + win, x : x + win] += weight
    out = np.clip(np.round(acc / tot), 0, 255).astype(np.uint8)
    return keep_glass(region, out) if glass else out
