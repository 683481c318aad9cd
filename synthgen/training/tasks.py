"""What each model type needs from the one training loop.

A task is an ``nn.Module`` whose ``forward(batch, generator)`` returns the loss, so that
accelerate's DDP/FSDP wrapper sees every trainable parameter through one forward call. Its
``net`` is the model that is saved, averaged by EMA and sampled from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from synthgen import seeding
from synthgen._io import atomic_write_text
from synthgen.config import SAMPLING, ConfigError, TrainConfig
from synthgen.errors import SynthgenError

log = logging.getLogger("synthgen.training")


def image_dataset(cfg: TrainConfig) -> Dataset:
    """Images from ``data.tiles`` (a tile table) or ``data.images`` (a folder), as crops of
    ``data.crop`` px when it is set."""
    from synthgen.data.datasets import CropViews, ImageListDataset, PatchDataset

    if cfg.data.tiles:
        ds = PatchDataset(cfg.data.tiles)
    elif cfg.data.images:
        ds = ImageListDataset.from_folder(cfg.data.images, size=cfg.data.size)
    else:
        raise ConfigError(f"data: task {cfg.task!r} needs data.tiles (a tile table) or data.images (a folder)")
    if cfg.data.crop:
        ds = CropViews(ds, cfg.data.crop, cfg.data.crop_stride, dihedral=cfg.data.dihedral)
    return ds


def save_grid(images_uint8: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """(B, 3, H, W) uint8 -> one PNG grid."""
    import numpy as np
    from PIL import Image

    b, _, h, w = images_uint8.shape
    ncol = min(nrow, b)
    rows = (b + ncol - 1) // ncol
    grid = np.full((rows * h, ncol * w, 3), 255, np.uint8)
    for i, img in enumerate(images_uint8.cpu().permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, ncol)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


class Task(nn.Module):
    net: nn.Module
    step: int = 0  # the optimisation step being computed; the training loop sets it

    def aux_parameters(self) -> list[nn.Parameter]:
        """Trained parameters that are not part of ``net`` (not saved, not averaged); e.g. a
        discriminator."""
        return []

    def dataset(self) -> Dataset:
        raise NotImplementedError

    def save(self, net: nn.Module, path: Path) -> None:
        net.save_pretrained(path)

    @torch.no_grad()
    def preview(self, net: nn.Module, path: Path, batch: dict | None = None) -> bool:
        """Write a PNG grid from fixed seeds and the conditions of ``batch``; False when there is
        nothing to show."""
        return False


# -- denoiser ------------------------------------------------------------------------------
class DenoiserTask(Task):
    """Latent diffusion denoiser on cached (or on-the-fly) latents and condition embeddings.

    With ``data.use_labels`` / ``data.use_source`` a new model is conditioned on the cache's class
    and source ids too (``num_classes`` / ``num_sources`` and the names from the cache, unless
    ``model.overrides`` sets them). Unlabelled items (label -1) train the null class. Guidance
    dropout replaces all conditions together with ``objective.cfg_dropout`` and each one alone
    with ``objective.cfg_dropout_embeddings`` / ``_labels`` / ``_sources``.
    """

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from synthgen.training.objectives import DiffusionObjective

        self.cfg = cfg
        self.objective = DiffusionObjective(cfg.objective)
        self._frozen: dict = {}  # VAE / encoder / base model: a plain dict keeps them out of parameters and checkpoints
        try:
            self.net = self._build()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: cannot build the {cfg.task} model ({e})") from e

    def _build(self) -> nn.Module:
        from synthgen.models.denoiser import Denoiser
        from synthgen.models.presets import denoiser_config

        m = self.cfg.model
        if m.pretrained:
            net = self._pretrained_denoiser()
            if m.sample_size and m.sample_size != net.config.sample_size:
                net = net.resized(m.sample_size)
            changed = sorted(k for k, v in m.overrides.items()
                             if k not in ("refine_channels", "refine_depth") and net.config.get(k, v) != v)
            if changed:
                raise ConfigError(f"model.overrides: {changed} differ from the pretrained denoiser's config and cannot "
                                  "change it (only refine_channels / refine_depth, which add a refiner)")
            if m.overrides.get("refine_channels") and not net.config.refine_channels:
                net = Denoiser.with_refiner(net, **m.overrides)
            self._check_names(net)
        else:
            if self.cfg.lora.rank:
                raise ConfigError("lora.rank: LoRA fine-tunes a pretrained denoiser; set model.pretrained")
            net = Denoiser(**denoiser_config(m.preset, **{**self._cache_conditions(), **m.overrides}))
        if self.cfg.lora.rank:
            try:
                from peft import LoraConfig, inject_adapter_in_model
            except ImportError as e:
                raise ConfigError("lora.rank: LoRA needs peft: pip install 'synthgen[lora]'") from e

            net.requires_grad_(False)  # only the injected low-rank matrices train
            lora = LoraConfig(r=self.cfg.lora.rank, lora_alpha=self.cfg.lora.alpha or self.cfg.lora.rank,
                              init_lora_weights="gaussian", target_modules=list(self.cfg.lora.target_modules))
            net = inject_adapter_in_model(lora, net)
        return net

    def _pretrained_denoiser(self) -> nn.Module:
        """The denoiser of ``model.pretrained``: a pipeline folder (its ``transformer``) or a model folder."""
        from synthgen.loading import component_subfolder
        from synthgen.models.denoiser import Denoiser

        path = self.cfg.model.pretrained
        return Denoiser.from_pretrained(path, subfolder=component_subfolder(path, "transformer"))

    def _cache_names(self) -> tuple[list | None, list | None]:
        d = self.cfg.data
        if not d.cache or not (d.use_labels or d.use_source):
            return None, None
        from synthgen.data.cache import CacheDataset

        c = CacheDataset(d.cache)
        return (c.classes if d.use_labels else None), (c.sources if d.use_source else None)

    def _cache_conditions(self) -> dict:
        """Class / source conditioning of a new denoiser, from the cache's names."""
        classes, sources = self._cache_names()
        if self.cfg.data.use_source and self.cfg.data.cache and not sources:
            raise ConfigError(f"data.use_source: the cache {self.cfg.data.cache} has no source names (cache a "
                              "labelled tile table from `synthgen splits`)")
        out = {}
        if classes:
            out.update(num_classes=len(classes), class_names=list(classes))
        if sources:
            out.update(num_sources=len(sources), source_names=list(sources))
        return out

    def _check_names(self, net) -> None:
        """A pretrained denoiser must name its ids as the cache does."""
        classes, sources = self._cache_names()
        for what, have, want in (("class", net.config.class_names, classes), ("source", net.config.source_names, sources)):
            if have is not None and want is not None and list(have) != list(want):
                raise ConfigError(f"data.cache: the cache's {what} names {list(want)} differ from the pretrained "
                                  f"model's {list(have)}")

    @property
    def vae(self):
        if "vae" not in self._frozen and self.cfg.data.vae:
            from synthgen.loading import component_subfolder
            from synthgen.models.vae import VAE

            sub = component_subfolder(self.cfg.data.vae, "vae")
            self._frozen["vae"] = VAE.from_pretrained(self.cfg.data.vae, subfolder=sub).eval().requires_grad_(False)
        return self._frozen.get("vae")

    def dataset(self) -> Dataset:
        d = self.cfg.data
        if d.cache:
            from synthgen.data.cache import CacheDataset

            keys = ["latents"] + ([d.embedding_key] if self.net.config.use_embeddings else [])
            keys += (["label"] if d.use_labels else []) + (["source"] if d.use_source else [])
            return CacheDataset(d.cache, keys=keys)
        if not (d.vae and (d.encoder or not self.net.config.use_embeddings)):
            raise ConfigError("data.cache: missing; without a feature cache the denoiser needs data.vae and "
                              "data.encoder to encode images on the fly (run `synthgen cache` first for speed)")
        if d.tiles and (d.use_labels or d.use_source) and not d.crop:
            from synthgen.data.cache import LabelledTiles

            return LabelledTiles(d.tiles)
        return image_dataset(self.cfg)

    def _encoder_fn(self):
        if "encoder" not in self._frozen:
            from synthgen.encoders.load import load_encoder

            enc = load_encoder(self.cfg.data.encoder)
            if isinstance(enc, nn.Module):
                enc.requires_grad_(False)
            self._frozen["encoder"] = enc
        return self._frozen["encoder"]

    @property
    def denoiser(self) -> nn.Module:
        """The denoiser whose conditions batches feed (the trained net here)."""
        return self.net

    def conditions(self, batch: dict, device) -> tuple[torch.Tensor, dict]:
        d, cfg = self.cfg.data, self.denoiser.config
        if "latents" in batch:
            x0 = batch["latents"].to(device)
            emb = batch.get(d.embedding_key)
        else:  # on the fly: the VAE posterior is sampled (as diffusers' examples do)
            with torch.no_grad():
                x0 = self.vae.to(device).encode(batch["image"].to(device), sample=True)
                enc = self._encoder_fn()
                emb = enc.to(device)(batch["image"].to(device)) if cfg.use_embeddings else None
        conds = {}
        if cfg.use_embeddings:
            conds["embeddings"] = emb.to(device, torch.float32)
        if cfg.num_classes:
            if "label" not in batch:
                raise ConfigError("data.use_labels: the denoiser is class-conditional but batches carry no 'label'")
            conds["class_labels"] = torch.as_tensor(batch["label"]).to(device)  # -1 (unlabelled): the null class
        if cfg.num_sources and d.use_source:  # without data.use_source: the null source (an adapted pipeline)
            if "source" not in batch:
                raise ConfigError("data.use_source: the denoiser is source-conditional but batches carry no 'source'")
            conds["source_labels"] = torch.as_tensor(batch["source"]).to(device)
        return x0.float(), conds

    def _drops(self, n: int, conds: dict, generator: torch.Generator, device) -> dict | torch.Tensor | None:
        """Guidance-dropout masks: all conditions with ``cfg_dropout``, then each alone with its own
        probability (no extra draws when those are 0, so older configs train exactly as before)."""
        o = self.cfg.objective
        each = {"embeddings": o.cfg_dropout_embeddings, "class_labels": o.cfg_dropout_labels,
                "source_labels": o.cfg_dropout_sources,
                "source_latents": getattr(o, "cfg_dropout_image", 0.0)}  # stain_denoiser only
        if not (o.cfg_dropout > 0 or any(each[k] > 0 for k in conds if k in each)):
            return None
        every = (torch.rand(n, generator=generator) < o.cfg_dropout) if o.cfg_dropout > 0 else torch.zeros(n, dtype=torch.bool)
        if not any(each[k] > 0 for k in conds if k in each):
            return every.to(device)
        drops = {}
        for key in ("embeddings", "class_labels", "source_labels", "text", "source_latents"):
            if key in conds:
                q = each.get(key, 0.0)
                alone = (torch.rand(n, generator=generator) < q) if q > 0 else torch.zeros(n, dtype=torch.bool)
                drops[key] = (every | alone).to(device)
        return drops

    def model(self, net) -> nn.Module:
        """What the objective and the sampler call: the trained net itself."""
        return net

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = next(self.net.parameters()).device
        x0, conds = self.conditions(batch, device)
        model = self.model(self.net)
        drop = self._drops(len(x0), conds, generator, device)
        if drop is not None:
            conds = model.drop_conditions(drop, **conds)
        return self.objective.loss(model, x0, conds, generator)

    @torch.no_grad()
    def preview(self, net, path: Path, batch: dict | None = None) -> bool:
        """Samples for the first items' conditions, fixed seeds 0..n-1, decoded when a VAE is set."""
        from synthgen.models.vae import to_uint8

        if batch is None or self.vae is None:
            return False
        device = next(net.parameters()).device
        _, conds = self.conditions(batch, device)
        n = len(batch["latents"]) if "latents" in batch else len(batch["image"])
        was_training = net.training
        net.eval()
        z, nrow = self._preview_latents(net, conds, n)
        net.train(was_training)
        save_grid(to_uint8(self.vae.to(device).decode(z)), path, nrow=nrow)
        return True

    def _preview_latents(self, net, conds: dict, n: int) -> tuple[torch.Tensor, int]:
        """The preview's latents (seeds 0..n-1) and images per grid row: 20 guided steps."""
        from synthgen.sampling import make_scheduler, sample_latents

        o = self.cfg.objective
        sched = make_scheduler(o.kind, "dpm++" if o.kind != "flow" else "flow-euler", o.num_train_timesteps,
                               o.beta_schedule)
        gens = seeding.generators(range(n))
        return sample_latents(self.model(net), sched, conds, gens, num_steps=SAMPLING.steps,
                              guidance_scale=SAMPLING.guidance if conds else 1.0), 8

    def save(self, net, path: Path) -> None:
        if self.cfg.lora.rank:
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            path.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(net).items()},
                      str(path / "lora_adapter.safetensors"))
            lo = self.cfg.lora  # what merge_lora needs to apply the adapter to the base weights alone
            atomic_write_text(path / "lora_config.json", json.dumps(
                {"rank": lo.rank, "alpha": lo.alpha or lo.rank, "target_modules": list(lo.target_modules),
                 "base": self.cfg.model.pretrained}, indent=1))
            merged = type(net).from_config(net.config)
            merged.load_state_dict(_merged_state_dict(net))
            merged.save_pretrained(path)
            return
        net.save_pretrained(path)


class _PairedLatents(Dataset):
    """Item i of the target cache (latents, embedding) with the latents of item i of the source cache."""

    def __init__(self, target, source):
        self.target, self.source = target, source

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, i: int) -> dict:
        return {**self.target[i], "source_latents": self.source[i]["latents"]}


class StainDenoiserTask(DenoiserTask):
    """Image-to-image denoiser for virtual staining (InstructPix2Pix-style): the target stain's
    latents (and embedding) from ``data.target_cache``, the source stain's latents of the same
    places from ``data.cache`` (item i paired with item i), concatenated to the noisy input.

    ``model.pretrained`` is the denoiser to adapt: a plain one gets zero-initialised source
    channels (:meth:`~synthgen.models.denoiser.Denoiser.with_source_channels`), so training starts
    from the base model; a stain denoiser resumes as it is. The new input weights must train, so
    it is a full fine-tune (no LoRA). Guidance dropout: ``cfg_dropout`` drops both conditions,
    ``cfg_dropout_embeddings`` and ``cfg_dropout_image`` each alone (InstructPix2Pix: 5% each).
    """

    def _build(self) -> nn.Module:
        from synthgen.models.denoiser import Denoiser

        d, m = self.cfg.data, self.cfg.model
        if not m.pretrained:
            raise ConfigError("model.pretrained: task stain_denoiser adapts a trained denoiser (a pipeline folder or "
                              "a transformer folder)")
        if self.cfg.lora.rank:
            raise ConfigError("lora.rank: task stain_denoiser trains its new input channels fully; remove the lora "
                              "section")
        if not (d.cache and d.target_cache):
            raise ConfigError("data.cache / data.target_cache: task stain_denoiser trains on two feature caches of "
                              "the same pairs: the source stain's latents (cache) and the target stain's latents and "
                              "embeddings (target_cache), in the same order")
        net = self._pretrained_denoiser()
        return net if net.config.source_channels else Denoiser.with_source_channels(net)

    def dataset(self) -> Dataset:
        from synthgen.data.cache import CacheDataset

        d = self.cfg.data
        keys = ["latents"] + ([d.embedding_key] if self.net.config.use_embeddings else [])
        target, source = CacheDataset(d.target_cache, keys=keys), CacheDataset(d.cache, keys=["latents"])
        if len(target) != len(source):
            raise ConfigError(f"data.target_cache: {len(target)} items but data.cache has {len(source)}; the caches "
                              "must hold the same pairs in the same order")
        return _PairedLatents(target, source)

    def conditions(self, batch: dict, device) -> tuple[torch.Tensor, dict]:
        x0, conds = super().conditions(batch, device)
        conds["source_latents"] = batch["source_latents"].to(device, torch.float32)
        return x0, conds


class ControlNetTask(DenoiserTask):
    """Mask branch (:class:`~synthgen.models.controlnet.MaskControlNet`) over a frozen pretrained
    denoiser, on a feature cache holding latents, embeddings and label maps (``data.mask_key``).

    ``model.pretrained`` is the base denoiser (a pipeline folder or its ``transformer`` folder);
    ``model.overrides`` may set ``num_layers`` (copied blocks) and ``mask_classes`` (0: instance maps).
    ``model.branch`` continues a trained branch (a pipeline folder's ``controlnet`` or a model folder)
    instead of copying the base's blocks, e.g. over a base trained further; its config is kept.
    """

    def _build(self) -> nn.Module:
        from synthgen.models.controlnet import MaskControlNet

        m, d = self.cfg.model, self.cfg.data
        if not m.pretrained:
            raise ConfigError("model.pretrained: the mask branch trains over a pretrained denoiser "
                              "(a pipeline folder or its transformer folder)")
        if self.cfg.lora.rank:
            raise ConfigError("lora.rank: task controlnet trains the branch fully; remove the lora section")
        if not d.cache:
            raise ConfigError("data.cache: task controlnet needs a feature cache with latents, embeddings and masks "
                              "(synthgen cache TILES -e latents=vae:... -e emb=... -e mask=synthgen.data.nuclei:segmenter)")
        base = self._pretrained_denoiser().eval().requires_grad_(False)
        self._frozen["base"] = base
        first = self.dataset()[0]
        if d.mask_key not in first:
            raise ConfigError(f"data.mask_key: the cache {d.cache} has no {d.mask_key!r} entry (build it with "
                              f"-e {d.mask_key}=synthgen.data.nuclei:segmenter, or cache a dataset with masks)")
        downscale = first[d.mask_key].shape[-1] // first["latents"].shape[-1]
        if not m.branch:
            return MaskControlNet.from_denoiser(base, downscale=downscale, **m.overrides)
        from synthgen.loading import component_subfolder

        if m.overrides:
            raise ConfigError(f"model.overrides: {sorted(m.overrides)} cannot change a continued branch "
                              f"(model.branch {m.branch}); remove them")
        net = MaskControlNet.from_pretrained(m.branch, subfolder=component_subfolder(m.branch, "controlnet"))
        want = {"downscale": downscale, "patch_size": base.config.patch_size,
                **{k: base.config[k] for k in ("num_attention_heads", "attention_head_dim", "cross_attention_dim")}}
        wrong = {k: (net.config[k], v) for k, v in want.items() if net.config[k] != v}
        if wrong or net.config.num_layers > base.config.num_layers:
            raise ConfigError(f"model.branch: {m.branch} does not fit the base {m.pretrained} or the cache "
                              f"({', '.join(f'{k} {a} vs {b}' for k, (a, b) in wrong.items()) or 'too many layers'})")
        return net

    def dataset(self) -> Dataset:
        from synthgen.data.cache import CacheDataset

        d = self.cfg.data
        keys = ["latents", d.embedding_key, d.mask_key] + (["label"] if d.use_labels else [])
        return CacheDataset(d.cache, keys=keys + (["source"] if d.use_source else []))

    @property
    def denoiser(self) -> nn.Module:
        return self._frozen["base"]

    def conditions(self, batch: dict, device) -> tuple[torch.Tensor, dict]:
        x0, conds = super().conditions(batch, device)
        conds["mask"] = batch[self.cfg.data.mask_key].to(device)
        return x0, conds

    def model(self, net) -> nn.Module:
        from synthgen.models.controlnet import ControlledDenoiser

        base = self._frozen["base"]
        return ControlledDenoiser(base.to(next(net.parameters()).device), net)


def _merged_state_dict(net) -> dict:
    """Base weights with the LoRA deltas folded in (W + B A alpha / r), under the base names."""
    import copy

    clone = copy.deepcopy(net)
    for module in clone.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    state = {}
    for k, v in clone.state_dict().items():
        if "lora_" in k:
            continue
        state[k.replace(".base_layer.", ".")] = v
    return state


# -- VAE -----------------------------------------------------------------------------------
class VAETask(Task):
    """Autoencoder with reconstruction (L1) + KL loss, optionally the sharpness terms (gradient,
    frequency and PatchGAN losses, see :mod:`synthgen.models.discriminator`); latents calibrated to
    unit variance at save."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from synthgen.models.vae import VAE

        self.cfg = cfg
        m = cfg.model
        if m.pretrained:
            from synthgen.loading import component_subfolder

            self.net = VAE.from_pretrained(m.pretrained, subfolder=component_subfolder(m.pretrained, "vae"))
        else:
            self.net = VAE.from_preset(m.preset, **m.overrides)
        if m.freeze_encoder:  # e.g. a decoder for another stain over the same latents
            if not m.pretrained:
                raise ConfigError("model.freeze_encoder: fine-tunes the decoder of a pretrained VAE; set model.pretrained")
            for name in ("encoder", "quant_conv"):
                part = getattr(self.net.model, name, None)
                if part is not None:
                    part.requires_grad_(False)
        o = cfg.objective
        self.disc = None
        if o.adversarial_weight > 0:
            from synthgen.models.discriminator import PatchDiscriminator

            self.disc = PatchDiscriminator(width=o.disc_width, num_layers=o.disc_layers)

    def aux_parameters(self) -> list[nn.Parameter]:
        return [] if self.disc is None else list(self.disc.parameters())

    def dataset(self) -> Dataset:
        return image_dataset(self.cfg)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        from synthgen.models.vae import vae_loss

        o = self.cfg.objective
        loss, parts = vae_loss(self.net, batch["image"], o.kl_weight, generator,
                               gradient_weight=o.gradient_weight, frequency_weight=o.frequency_weight,
                               return_images=self.disc is not None)
        if self.disc is not None:
            from synthgen.models.discriminator import generator_adversarial_loss, hinge_d_loss

            x, recon = parts["images"]
            # the discriminator trains from the start, on detached reconstructions
            loss = loss + hinge_d_loss(self.disc(x), self.disc(recon.detach()))
            if self.step >= o.adversarial_start:
                loss = loss + o.adversarial_weight * generator_adversarial_loss(self.disc, recon)
        return loss

    @torch.no_grad()
    def preview(self, net, path: Path, batch: dict | None = None) -> bool:
        from synthgen.models.vae import to_uint8

        if batch is None:
            return False
        images = batch["image"]
        recon = to_uint8(net.decode(net.encode(images))).cpu()
        save_grid(torch.cat([images.cpu(), recon]), path, nrow=len(images))
        return True

    def save(self, net, path: Path) -> None:
        """Calibrate the latent shift/scale on up to 512 training images, then save (a frozen encoder
        keeps its calibration: the latent space must not move)."""
        if self.cfg.model.freeze_encoder:
            net.save_pretrained(path)
            return
        ds = self.dataset()
        step = max(1, len(ds) // 512)
        images = torch.stack([ds[i]["image"] for i in range(0, len(ds), step)][:512])
        shift, scale = net.calibrate(images)
        log.info("VAE latents calibrated: shift %.4f, scale %.4f", shift, scale)
        net.save_pretrained(path)


# -- SSL encoder ---------------------------------------------------------------------------
class SSLTask(Task):
    """The default image encoder: SimCLR on two augmented views of each tile, or DINO
    (``objective.ssl_method: dino``: self-distillation from an EMA teacher, which is what is
    saved). Views: :func:`~synthgen.encoders.ssl.augment_views` with ``objective.hed_scale`` /
    ``hed_shift`` (stain jitter) and ``blur``."""

    preload_bytes = 2**30  # training images up to this size are read once and served from memory

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from synthgen.encoders.ssl import DINO, SSLEncoder
        from synthgen.models.presets import encoder_config

        self.cfg = cfg
        m, o = cfg.model, cfg.objective
        self.net = SSLEncoder.from_pretrained(m.pretrained) if m.pretrained else SSLEncoder(
            **encoder_config(m.preset, **m.overrides))
        self.dino = None
        if o.ssl_method == "dino":
            if cfg.ema_decay > 0:
                raise ConfigError("ema_decay: DINO's teacher is already an average of the student "
                                  "(objective.teacher_momentum); set ema_decay: 0")
            self.dino = DINO(self.net, o.dino_prototypes, o.teacher_temperature, o.temperature,
                             local_crops=o.local_crops)
        self._teacher_step = -1

    def aux_parameters(self) -> list[nn.Parameter]:
        return [] if self.dino is None else list(self.dino.head.parameters())

    def dataset(self) -> Dataset:
        """The training images, read once into memory when they fit in ``preload_bytes`` (a tile
        table is otherwise read from its slides again at every epoch), then cut into
        ``data.crop`` crops when that is set."""
        import dataclasses

        from torch.utils.data import StackDataset

        from synthgen.data.datasets import CropViews

        d = self.cfg.data
        base = image_dataset(dataclasses.replace(
            self.cfg, data=dataclasses.replace(d, crop=None, crop_stride=None, dihedral=False)))
        first = base[0]["image"]
        if len(base) * first.numel() * first.element_size() <= self.preload_bytes:
            images = [base[i]["image"] for i in range(len(base))]
            if all(im.shape == first.shape for im in images):
                log.info("SSL: %d training images read into memory", len(images))
                base = StackDataset(image=torch.stack(images))
        return CropViews(base, d.crop, d.crop_stride, dihedral=d.dihedral) if d.crop else base

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        import math

        from synthgen.encoders.ssl import simclr_loss

        o = self.cfg.objective
        augment = {"hed_scale": o.hed_scale, "hed_shift": o.hed_shift, "blur": o.blur}
        if self.dino is None:
            return simclr_loss(self.net, batch["image"], o.temperature, generator, augment=augment)
        if self.training and self._teacher_step != self.step:  # once per optimisation step
            # DINO's teacher momentum: cosine from teacher_momentum to 1 over training
            m = 1 - (1 - o.teacher_momentum) * (math.cos(math.pi * self.step / self.cfg.steps) + 1) / 2
            self.dino.update_teacher(self.net, m)
            self._teacher_step = self.step
        return self.dino.loss(self.net, batch["image"], generator, augment)

    def save(self, net, path: Path) -> None:
        (net if self.dino is None else self.dino.teacher).save_pretrained(path)


# -- embedding prior -------------------------------------------------------------------------
class PriorTask(Task):
    """Class-conditional flow-matching prior over the cached embeddings (needs labels)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from synthgen.models.prior import EmbeddingPrior

        self.cfg = cfg
        if not cfg.data.cache:
            raise ConfigError("data.cache: the embedding prior trains on a feature cache with embeddings and labels")
        from synthgen.data.cache import CacheDataset

        bank = CacheDataset(cfg.data.cache, keys=[cfg.data.embedding_key, "label"])
        embs = torch.stack([bank[i][cfg.data.embedding_key] for i in range(len(bank))]).float()
        labels = torch.tensor([bank[i]["label"] for i in range(len(bank))])
        self.bank = {cfg.data.embedding_key: embs, "label": labels}
        m = cfg.model
        if m.pretrained:
            self.net = EmbeddingPrior.from_pretrained(m.pretrained)
        else:
            names = bank.classes  # class names of the cache, when it was built with them
            kw = {"num_tokens": embs.shape[1], "dim": embs.shape[2],
                  "num_classes": len(names) if names else int(labels.max()) + 1, "class_names": names, **m.overrides}
            self.net = EmbeddingPrior(**kw)
            self.net.fit_normalization(embs)

    def dataset(self) -> Dataset:
        from torch.utils.data import StackDataset

        return StackDataset(**self.bank)  # the bank is small: read once, served from memory

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = next(self.net.parameters()).device
        emb = batch[self.cfg.data.embedding_key].to(device)
        return self.net.loss(emb, torch.as_tensor(batch["label"]), generator, self.cfg.objective.cfg_dropout)


class TranslatorTask(Task):
    """Stain translator (:class:`~synthgen.models.stain.StainTranslator`): source (H&E) embeddings
    from ``data.cache``, the matching target (IHC) embeddings from ``data.target_cache``, item i
    of one paired with item i of the other. The target stain is ``model.overrides.class_names``
    (one name: every pair; several: the target cache's labels index them)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        from synthgen.data.cache import CacheDataset
        from synthgen.models.stain import StainTranslator
        from synthgen.stains import resolve_stain

        self.cfg = cfg
        d, m = cfg.data, cfg.model
        if not (d.cache and d.target_cache):
            raise ConfigError("data.cache / data.target_cache: the translator trains on two feature caches of the "
                              "same pairs (source stain, target stain), in the same order")
        key = d.embedding_key
        src, tgt = CacheDataset(d.cache, keys=[key]), CacheDataset(d.target_cache)
        if len(src) != len(tgt):
            raise ConfigError(f"data.target_cache: {len(tgt)} items but data.cache has {len(src)}; the caches must "
                              "hold the same pairs in the same order")
        source = torch.stack([src[i][key] for i in range(len(src))]).float()
        target = torch.stack([tgt[i][key] for i in range(len(tgt))]).float()
        overrides = dict(m.overrides)
        names = overrides.pop("class_names", None) or overrides.pop("stains", None)
        if not names:
            raise ConfigError("model.overrides.class_names: name the target stain(s), e.g. [ki67]")
        try:
            names = [resolve_stain(n) for n in names]
        except SynthgenError as e:
            raise ConfigError(f"model.overrides.class_names: {e}") from e
        if len(names) > 1 and "label" not in tgt.keys:
            raise ConfigError("model.overrides.class_names: several stains need labels in data.target_cache")
        labels = (torch.tensor([tgt[i]["label"] for i in range(len(tgt))]) if len(names) > 1
                  else torch.zeros(len(tgt), dtype=torch.long))
        self.pairs = {"source": source, "target": target, "label": labels}
        if m.pretrained:
            self.net = StainTranslator.from_pretrained(m.pretrained)
        else:
            self.net = StainTranslator(num_tokens=target.shape[1], dim=target.shape[2], num_classes=len(names),
                                       class_names=names, **overrides)
            self.net.fit_normalization(target, source)

    def dataset(self) -> Dataset:
        from torch.utils.data import StackDataset

        return StackDataset(**self.pairs)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        device = next(self.net.parameters()).device
        return self.net.loss(batch["target"].to(device), torch.as_tensor(batch["label"]), generator,
                             self.cfg.objective.cfg_dropout, source=batch["source"].to(device))


TASKS = {"denoiser": DenoiserTask, "controlnet": ControlNetTask, "vae": VAETask, "ssl": SSLTask, "prior": PriorTask,
         "translator": TranslatorTask, "stain_denoiser": StainDenoiserTask}


def task_class(name: str) -> type[Task]:
    """The task of ``TrainConfig.task`` (the consistency task lives in its own module)."""
    if name == "consistency":
        from synthgen.training.distill import ConsistencyTask

        return ConsistencyTask
    return TASKS[name]
