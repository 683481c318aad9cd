"""The generation pipeline: one diffusers ``DiffusionPipeline`` folder holding the denoiser, the
VAE, the scheduler and (optionally) the image encoder, text encoder and tokenizer.

It samples from embeddings, from reference images (encoded on the fly), from class labels,
tissue-source labels or text, alone or jointly, with classifier-free guidance and one seed per
image, so any single image can be regenerated exactly from its seed and condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from synthgen import seeding
from synthgen.config import SAMPLING
from synthgen.pipelines.precision import autocast, resolve_dtype
from synthgen.sampling import CLIP_DENOISED, SAMPLERS, sample_latents, scheduler_for


@dataclass
class SynthOutput(BaseOutput):
    """Generated images and the seed of each (regenerate image i with ``seeds=[seeds[i]]``)."""

    images: list | np.ndarray | torch.Tensor
    seeds: list[int]


def check_fast_steps(steps) -> None:
    """A few-step variant's default step count is a whole number in 1-``SAMPLING.fast_steps``."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                              or not 1 <= steps <= SAMPLING.fast_steps):
        raise ValueError(f"fast_steps must be a whole number of steps in 1-{SAMPLING.fast_steps}, got {steps!r}")


def default_fast_steps(index) -> int:
    """The few-step variant's step count a pipeline's config (``model_index.json``) records, checked,
    else ``SAMPLING.fast_steps``."""
    check_fast_steps(index.get("fast_steps"))
    return index.get("fast_steps") or SAMPLING.fast_steps


class SynthPipeline(DiffusionPipeline):
    """Sample histopathology images from a conditioned latent diffusion model.

    Components (``save_pretrained`` / ``from_pretrained`` as one folder):
        transformer: :class:`~synthgen.models.denoiser.Denoiser`.
        vae: diffusers ``AutoencoderKL`` (its config holds the latent scale and shift).
        scheduler: a diffusers scheduler matching the training objective.
        image_encoder: optional, a model returning (B, tokens, dim) from raw images (the
            project's :class:`~synthgen.encoders.ssl.SSLEncoder`); other encoders (UNI via
            timm, ...) can be passed per call as ``image_encoder=``.
        text_encoder, tokenizer: optional transformers text model and its tokenizer.
        controlnet: optional :class:`~synthgen.models.controlnet.MaskControlNet`; then ``masks=``
            (label maps at image resolution) place the nuclei / regions of each image.
        fast_transformer, fast_scheduler: optional few-step variant: a consistency-distilled
            student of ``transformer`` with guidance folded in (``task: consistency``) and its
            ``LCMScheduler``; calls with ``num_inference_steps <= 4`` use it (see ``fast=``).
        fast_steps: the few-step variant's default step count (1-4), chosen on validation tiles and
            recorded by ``synthgen add-fast --steps``; ``--fast`` and ``SynthAugment`` use it
            (None: ``SAMPLING.fast_steps``).
        mpp: the resolution (micrometres per pixel) of the tiles the model was trained on, recorded
            in ``model_index.json`` by ``synthgen assemble``; commands that read slides or large
            images (``synthgen large``, ``synthgen stain``) read them at it by default.

    Example:
        >>> pipe = SynthPipeline.from_pretrained("checkpoints/pipeline")
        >>> out = pipe(images=reference_tiles, num_images_per_condition=4, guidance_scale=2.0, seeds=range(8))
        >>> out.images[0].save("synthetic.png")
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->controlnet->transformer->vae"
    inference_dtype = "auto"  # the default ``dtype=`` of a call; set per pipeline (``pipe.inference_dtype = "fp32"``)
    _optional_components = ["image_encoder", "text_encoder", "tokenizer", "controlnet", "fast_transformer",
                            "fast_scheduler"]
    FAST_MAX_STEPS = SAMPLING.fast_steps  # the few-step variant samples in 1-4 steps

    def __init__(self, transformer, vae, scheduler, image_encoder=None, text_encoder=None, tokenizer=None,
                 controlnet=None, fast_transformer=None, fast_scheduler=None, mpp: float | None = None,
                 fast_steps: int | None = None):
        super().__init__()
        if mpp is not None and not mpp > 0:
            raise ValueError(f"mpp must be a positive resolution in um/px, got {mpp}")
        check_fast_steps(fast_steps)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, image_encoder=image_encoder,
                              text_encoder=text_encoder, tokenizer=tokenizer, controlnet=controlnet,
                              fast_transformer=fast_transformer, fast_scheduler=fast_scheduler)
        self.register_to_config(mpp=None if mpp is None else float(mpp), fast_steps=fast_steps)

    @property
    def mpp(self) -> float | None:
        """Resolution of the training tiles in um/px (None: not recorded, e.g. a pipeline assembled
        before the scale was kept)."""
        return self.config.get("mpp")

    @property
    def default_fast_steps(self) -> int:
        """Steps the few-step variant samples with unless told (``fast_steps`` in the index)."""
        return default_fast_steps(self.config)

    def resolve_mpp(self, mpp: float | None, default: float = 1.0) -> float:
        """The resolution to read slides at: ``mpp`` when given, else the pipeline's, else ``default``."""
        return float(mpp if mpp is not None else self.mpp if self.mpp is not None else default)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load a pipeline folder or hub id (diffusers only loads components from imported modules)."""
        from pathlib import Path

        import synthgen.encoders.ssl  # noqa: F401
        import synthgen.models.controlnet  # noqa: F401
        import synthgen.models.denoiser  # noqa: F401
        import synthgen.models.vae  # noqa: F401
        from synthgen.loading import check_pipeline_folder

        if args and Path(args[0]).is_dir():  # a local folder: name a missing or broken component
            check_pipeline_folder(args[0])
        return super().from_pretrained(*args, **kwargs)

    # -- conditions ----------------------------------------------------------------------
    def _vae(self):
        from synthgen.models.vae import VAE

        return VAE(self.vae)

    @property
    def vae_scale(self) -> int:
        """Image pixels per latent pixel (the VAE owns it)."""
        return self._vae().downscale

    @property
    def image_size(self) -> int:
        """Side of the images the denoiser was trained on."""
        return self.transformer.config.sample_size * self.vae_scale

    def encode_images(self, images, image_encoder=None) -> torch.Tensor:
        """Reference images (uint8 tensor (B,3,H,W), numpy (B,H,W,3) or PIL list) -> embedding tokens."""
        enc = image_encoder or self.image_encoder
        if enc is None:
            raise ValueError("images= needs an image encoder: load a pipeline with one or pass image_encoder=")
        x = as_uint8_tensor(images)
        with torch.no_grad():
            return enc(x.to(self._execution_device)).float()

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, text_num_tokens, dim), as the model was trained (mean-pooled, normalised for 1 token)."""
        from synthgen.encoders.text import TextEncoder

        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("prompts= needs a pipeline with text_encoder and tokenizer")
        enc = TextEncoder(self.text_encoder, self.tokenizer, num_tokens=self.transformer.config.text_num_tokens)
        with torch.no_grad():
            return enc(list(prompts)).float()

    def _conditions(self, embeddings, images, class_labels, prompts, image_encoder, labels=None,
                    sources=None) -> tuple[dict, int]:
        cfg = self.transformer.config
        if labels is not None:
            if class_labels is not None:
                raise ValueError("give labels= or class_labels=, not both")
            if not cfg.num_classes:
                raise ValueError("this model is not class-conditional")
        conds: dict[str, torch.Tensor] = {}
        n = None
        if images is not None:
            if embeddings is not None:
                raise ValueError("give embeddings= or images=, not both")
            embeddings = self.encode_images(images, image_encoder)
        if embeddings is not None:
            if not cfg.use_embeddings:
                raise ValueError("this model is not conditioned on embeddings")
            emb = torch.as_tensor(embeddings, dtype=torch.float32)
            emb = emb[:, None] if emb.ndim == 2 else emb
            if not torch.isfinite(emb).all():
                bad = (~torch.isfinite(emb.flatten(1))).any(1).nonzero().flatten().tolist()
                raise ValueError(f"embeddings contain NaN/Inf (conditions {bad[:5]})")
            conds["embeddings"], n = emb, len(emb)
        if class_labels is not None:
            if not cfg.num_classes:
                raise ValueError("this model is not class-conditional")
            labels = torch.as_tensor(class_labels, dtype=torch.long).flatten()
            conds["class_labels"] = labels
            n = _same(n, len(labels), "class_labels")
        if prompts is not None:
            if not cfg.text_channels:
                raise ValueError("this model is not conditioned on text")
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            conds["text"] = self.encode_prompts(prompts)
            n = _same(n, len(prompts), "prompts")
        if labels is not None:
            conds["class_labels"] = _label_ids(labels, cfg.class_names, "labels", n)
            n = _same(n, len(conds["class_labels"]), "labels")
        if sources is not None:
            if not cfg.num_sources:
                raise ValueError("this model is not conditioned on sources")
            conds["source_labels"] = _label_ids(sources, cfg.source_names, "sources", n)
            n = _same(n, len(conds["source_labels"]), "sources")
        if n is not None:  # a condition not given is its learned null ("any"), as in guidance dropout
            for key, value in self.transformer.null_conditions(n).items():
                conds.setdefault(key, value)
        return conds, n

    # -- sampling ------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        embeddings: torch.Tensor | np.ndarray | None = None,
        images=None,
        class_labels=None,
        prompts: str | Sequence[str] | None = None,
        num_images_per_condition: int = 1,
        guidance_scale: float = SAMPLING.guidance,
        num_inference_steps: int = SAMPLING.steps,
        guidance_interval: tuple[float, float] | None = None,
        seeds: Sequence[int] | int | None = None,
        generator: torch.Generator | None = None,
        sampler: str | None = None,
        batch_size: int = 32,
        output_type: str = "pil",
        image_encoder=None,
        masks=None,
        controlnet_conditioning_scale: float | None = None,
        return_dict: bool = True,
        labels=None,
        sources=None,
        guide: Sequence[str] | None = None,
        clip_denoised: float | tuple | None = CLIP_DENOISED,
        strength: float = 1.0,
        source_images=None,
        image_guidance_scale: float | None = None,
        dtype: str | torch.dtype | None = None,
        fast: bool | None = None,
    ):
        """Generate ``num_images_per_condition`` images for each condition.

        Conditions combine: a model trained on embeddings, classes and sources takes all three
        jointly (``images=tiles, labels=["TUMOR", None], sources="kather2016"``). A condition the
        model knows but the call does not give is its learned null ("any"), e.g.
        ``pipe(sources=["consep"] * 8)`` samples colorectal tissue without a reference embedding.

        Args:
            embeddings: (N, tokens, dim) or (N, dim) condition embeddings.
            images: reference images, encoded with the image encoder (variations of them).
            class_labels: (N,) class ids (-1 for the unconditional/null class).
            prompts: N text prompts.
            labels: class names or ids, N of them or one for all (None, "" or -1: the null
                class, "any class"); the names are the model's ``class_names``. Instead of
                ``class_labels``.
            sources: tissue-source names or ids (the model's ``source_names``), N or one; a
                model with sources samples the null source ("any source") without them.
            guidance_scale: classifier-free guidance (1 = the conditional model alone). It pushes
                from the prediction with every condition at its learned null towards the one
                with all given conditions, jointly: eps = eps(null) + s (eps(emb, label, source)
                - eps(null)); a condition not given is null in both passes (no push).
            guide: the conditions guidance pushes towards (``embeddings``, ``labels``,
                ``sources``, ``prompts``; default: all). The others stay in both passes, so e.g.
                ``guide=["labels"]`` strengthens the class while following the embeddings at
                scale 1. A mask is always in both passes.
            guidance_interval: (lo, hi) fractions of the trajectory where guidance applies;
                outside it the unconditional pass is skipped (faster; see ``sample_latents``).
            seeds: one per output image (N x num_images_per_condition); default: drawn from
                ``generator`` (or 0, 1, 2, ...). Image i depends only on seeds[i] and its condition.
            sampler: override the scheduler: ``dpm++``, ``ddim``, ``euler`` (flow models use
                flow-matching Euler).
            batch_size: images per denoiser batch (results do not depend on it).
            output_type: ``pil``, ``np`` (uint8 (B,H,W,3)), ``pt`` (uint8 (B,3,H,W)) or ``latent``.
            masks: N label maps (N, H, W) at image resolution (instance nuclei maps, or semantic
                maps for a branch trained on them), one per condition; needs a ``controlnet``.
                Without other conditions the images are sampled from the mask alone (null
                embedding, no guidance).
            controlnet_conditioning_scale: strength of the mask branch (0: ignore the mask);
                default: the branch's recorded ``conditioning_scale`` (1 if it has none).
            clip_denoised: bound on every step's denoised latent estimate, in the VAE's normalised
                (unit-variance) units: c for [-c, c], or (lo, hi) per latent channel; None turns it
                off (the behaviour before it existed, which let a few seeds run off to latents
                decoded as grey patches with a black-and-white blob: BENCHMARKS.md).
            strength: with ``images``, anchored variations (SDEdit): each reference's VAE latent
                is noised ``strength`` of the way along the trajectory and denoised from there, so
                low values keep its layout and high values only its embedding's content; 1
                (default) starts from pure noise, as without it. The images must be
                ``image_size`` px.
            source_images: for a transformer with source channels (an image-to-image model such
                as a virtual-IHC translator): the N source images (``image_size`` px) whose VAE
                latents it sees at full resolution; each output keeps its source's layout.
            image_guidance_scale: guidance on the source image, separate from ``guidance_scale``
                on the other conditions (InstructPix2Pix; see ``sample_latents``). None keeps the
                source in both guidance passes.
            dtype: compute precision: ``auto`` (default: the pipeline's ``inference_dtype``,
                itself ``auto``: bfloat16 autocast on CPUs with native bf16 and on CUDA, else
                float32), ``bf16``, ``fp16`` or ``fp32``. Autocast covers the image encoder, the
                denoiser (attention included), the mask branch and the VAE decode; weights stay
                float32. An image regenerates exactly from its seed at the same dtype (BENCHMARKS.md
                gives the bf16 vs fp32 difference and speed).
            fast: use the few-step variant (``fast_transformer``, sampled with its LCMScheduler,
                one denoiser pass per step: its guidance is folded in). None (default): when the
                pipeline has one, ``num_inference_steps <= 4`` and the call is one it was
                distilled for (``guidance_scale`` equal to its folded scale, no masks, source
                images, ``strength``, ``sampler``, ``guide``, guidance intervals); otherwise the
                base model. True insists (an error when it cannot); False never uses it.

        Returns:
            :class:`SynthOutput` with ``images`` and ``seeds``.
        """
        from synthgen.models.vae import to_uint8

        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        if sampler is not None and sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        compute = resolve_dtype(self.inference_dtype if dtype is None else dtype, self._execution_device)
        why_not = self.fast_unavailable(num_inference_steps, guidance_scale, masks=masks, source_images=source_images,
                                        strength=strength, sampler=sampler, guide=guide,
                                        guidance_interval=guidance_interval, image_guidance_scale=image_guidance_scale)
        if fast and why_not:
            raise ValueError(f"fast=True: {why_not}")
        use_fast = fast is not False and why_not is None
        with autocast(compute, self._execution_device):
            model = self.fast_transformer if use_fast else self.transformer
            if use_fast:
                guidance_scale = 1.0  # folded into the student: one pass per step
            if masks is not None:
                mask_t, model = self._masks(masks)
                if all(c is None for c in (embeddings, images, class_labels, prompts, labels, sources)):
                    conds, n = self.transformer.null_conditions(len(mask_t)), len(mask_t)
                    guidance_scale = 1.0  # the condition is the null one: guidance would do nothing
                else:
                    conds, n = self._conditions(embeddings, images, class_labels, prompts, image_encoder, labels, sources)
                conds["mask"] = mask_t
                n = _same(n, len(mask_t), "masks")
                model.conditioning_scale = (controlnet_conditioning_scale if controlnet_conditioning_scale is not None
                                            else self.controlnet.config.get("conditioning_scale", 1.0))
            else:
                conds, n = self._conditions(embeddings, images, class_labels, prompts, image_encoder, labels, sources)
            if self.transformer.config.get("source_channels", 0):
                if source_images is None:
                    raise ValueError("this pipeline's transformer translates images: pass source_images= (the N source "
                                     f"tiles, {self.image_size} px)")
                conds["source_latents"] = self._latents_of(source_images, "source_images must be")
                n = _same(n, len(conds["source_latents"]), "source_images")
            elif source_images is not None:
                raise ValueError("source_images= needs a transformer with source channels (an image-to-image model)")
            if n is None:
                raise ValueError("give at least one condition (embeddings, images, class_labels or prompts)")
            guided = _guided_keys(guide)
            total = n * num_images_per_condition
            conds = {k: v.repeat_interleave(num_images_per_condition, dim=0) for k, v in conds.items()}
            init = None
            if strength != 1.0:
                if images is None:
                    raise ValueError("strength= needs images= (the references to start from)")
                init = self._latents_of(images, "strength= needs references of")
                init = init.repeat_interleave(num_images_per_condition, dim=0)
            seeds = _seeds(seeds, total, generator)
            scheduler = self.fast_scheduler if use_fast else scheduler_for(self.scheduler, sampler)
            device = self._execution_device
            vae = self._vae()
            outs, latents = [], []
            for lo in self.progress_bar(range(0, total, batch_size)):
                hi = min(total, lo + batch_size)
                gens = seeding.generators(seeds[lo:hi])
                part = {k: v[lo:hi].to(device) for k, v in conds.items()}
                z = sample_latents(model, scheduler, part, gens, num_inference_steps, guidance_scale,
                                   guidance_interval=guidance_interval, guide=guided, clip_denoised=clip_denoised,
                                   init_latents=None if init is None else init[lo:hi], strength=strength,
                                   image_guidance_scale=image_guidance_scale)
                if output_type == "latent":
                    latents.append(z.float().cpu())
                else:
                    outs.append(to_uint8(vae.decode(z)).cpu())
            if output_type == "latent":
                result = torch.cat(latents)
            else:
                imgs = torch.cat(outs)
                if output_type == "pt":
                    result = imgs
                else:
                    arr = imgs.permute(0, 2, 3, 1).numpy()
                    result = arr if output_type == "np" else self.numpy_to_pil(arr)
        self.maybe_free_model_hooks()
        return SynthOutput(images=result, seeds=[int(s) for s in seeds]) if return_dict else (result, seeds)

    def fast_unavailable(self, num_inference_steps: int, guidance_scale: float = SAMPLING.guidance, *, masks=None,
                         source_images=None, strength: float = 1.0, sampler=None, guide=None, guidance_interval=None,
                         image_guidance_scale=None) -> str | None:
        """Why the few-step variant cannot serve a call with these arguments (None: it can, and
        ``fast=None`` uses it)."""
        if self.fast_transformer is None or self.fast_scheduler is None:
            return "this pipeline has no few-step variant (fast_transformer/, fast_scheduler/; train one with " \
                   "`synthgen train`, task: consistency)"
        if num_inference_steps > self.FAST_MAX_STEPS:
            return f"the few-step variant samples in 1-{self.FAST_MAX_STEPS} steps, not {num_inference_steps}"
        folded = self.fast_transformer.config.get("distilled_guidance_scale")
        if folded is not None and abs(guidance_scale - folded) > 1e-6:
            return f"the few-step variant has guidance {folded:g} folded in, not {guidance_scale:g}"
        given = [name for name, v in (("masks", masks), ("source_images", source_images), ("sampler", sampler),
                                      ("guide", guide), ("guidance_interval", guidance_interval),
                                      ("image_guidance_scale", image_guidance_scale)) if v is not None]
        if strength != 1.0:
            given.append("strength")
        if given:
            return f"the few-step variant was distilled for plain guided sampling, without {', '.join(given)}"
        return None

    def _latents_of(self, images, what: str) -> torch.Tensor:
        """VAE latents (mean) of images at the model's size; ``what`` starts the size error."""
        x = as_uint8_tensor(images)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"{what} {self.image_size} px (the model's size), got {tuple(x.shape[-2:])}")
        with torch.no_grad():
            return self._vae().encode(x.to(self._execution_device)).float()

    def _masks(self, masks):
        """Label maps -> (int64 tensor (N, H, W), the mask-guided model)."""
        from synthgen.errors import MaskError
        from synthgen.models.controlnet import ControlledDenoiser

        if self.controlnet is None:
            raise ValueError("masks= needs a pipeline with a controlnet (a mask branch): train one with "
                             "`synthgen train` (task: controlnet) and add it with `synthgen assemble --controlnet`")
        if isinstance(masks, torch.Tensor):
            m = masks
        else:
            arrays = [np.asarray(x) for x in masks] if not isinstance(masks, np.ndarray) else masks
            if isinstance(arrays, list) and len({a.shape for a in arrays}) > 1:
                raise MaskError(f"masks have different sizes: {sorted({a.shape for a in arrays})}")
            m = torch.from_numpy(np.stack(arrays) if isinstance(arrays, list) else arrays)
        if m.ndim == 2:
            m = m[None]
        if m.is_floating_point():
            raise MaskError(f"masks must be integer label maps, got {m.dtype}")
        size = self.image_size
        if m.ndim != 3 or tuple(m.shape[1:]) != (size, size):
            raise MaskError(f"masks must be {size}x{size} label maps (this model's image size), "
                            f"got shape {tuple(m.shape)}")
        return m.long(), ControlledDenoiser(self.transformer, self.controlnet)

    @staticmethod
    def numpy_to_pil(images: np.ndarray):
        from PIL import Image

        return [Image.fromarray(im) for im in images]




_GUIDE = {"embeddings": "embeddings", "images": "embeddings", "labels": "class_labels",
          "class_labels": "class_labels", "sources": "source_labels", "prompts": "text"}


def _guided_keys(guide) -> set[str] | None:
    if guide is None:
        return None
    guide = [guide] if isinstance(guide, str) else list(guide)
    bad = [g for g in guide if g not in _GUIDE]
    if bad:
        raise ValueError(f"guide: unknown condition(s) {', '.join(map(str, bad))}; choose from {', '.join(_GUIDE)}")
    return {_GUIDE[g] for g in guide}


def _label_ids(values, names, what: str, n: int | None) -> torch.Tensor:
    """Names or ids (None, "" or negative: the null id -1) -> int64 ids; a single value is
    repeated for ``n`` conditions."""
    if isinstance(values, torch.Tensor | np.ndarray):
        values = values.tolist()
    scalar = not isinstance(values, list | tuple)
    values = [values] * (n or 1) if scalar else list(values)
    index = {name: i for i, name in enumerate(names or [])}
    ids = []
    for v in values:
        if v is None or v == "":
            ids.append(-1)
        elif isinstance(v, str):
            if v not in index:
                known = f"one of {', '.join(index)}" if index else "ids: this model stores no names"
                raise ValueError(f"{what}: unknown name {v!r} (give {known})")
            ids.append(index[v])
        else:
            ids.append(int(v))
    return torch.tensor(ids, dtype=torch.long)


def _same(n, m, name):
    if n is not None and n != m:
        raise ValueError(f"{name} has {m} entries but the other conditions have {n}")
    return m


def _seeds(seeds, total: int, generator: torch.Generator | None) -> list[int]:
    if seeds is None:
        if generator is None:
            return list(range(total))
        return torch.randint(0, 2**31 - 1, (total,), generator=generator).tolist()
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != total:
        raise ValueError(f"{len(seeds)} seeds for {total} images (conditions x num_images_per_condition)")
    return [int(s) for s in seeds]


def as_uint8_tensor(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        x = images
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images if images.flags.writeable else images.copy())  # e.g. np.asarray(PIL image)
        x = x.permute(0, 3, 1, 2) if x.ndim == 4 and x.shape[-1] == 3 else x
    else:
        x = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
    if x.ndim == 3:
        x = x[None]
    return x.contiguous()
