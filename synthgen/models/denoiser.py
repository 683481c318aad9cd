"""Conditioned diffusion transformer: diffusers' PixArt transformer with PixCell's conditioning.

The backbone is :class:`diffusers.PixArtTransformer2DModel` unchanged (patch embedding,
adaLN-single blocks with self- and cross-attention, final modulation). What synthgen adds is
how the cross-attention sequence is built from conditions:

- **embedding tokens** (B, N, C) from an image encoder (UNI-style), with a sin-cos positional
  embedding when N > 1 (PixCell-1024 uses a 4x4 grid of crops: N = 16);
- **class labels** (B,) through a learned class table, one token (e.g. the Kather tissue class);
- **source labels** (B,) through a second learned table, one token (the dataset / tissue source
  a tile comes from: scanner, stain protocol and organ travel with it);
- **text tokens** (B, T, C_text) projected to C;
- **source latents** (B, C_s, H, W), concatenated to the noisy latents on the channel axis
  (InstructPix2Pix, Brooks et al. 2023): a spatial condition at full latent resolution, e.g. the
  H&E tile a virtual IHC tile must keep the layout of. Their null is zeros, as in
  InstructPix2Pix; :meth:`Denoiser.with_source_channels` adds them to a trained model with
  zero-initialised input weights, so the adapted model starts as the base model.

Optionally (``refine_channels`` > 0) a small residual **convolutional refiner** follows the
transformer's output: U-ViT (Bao et al. 2023) found that one 3x3 convolution after the
token-to-patch projection improves samples; here it is a short FiLM-conditioned conv stack that
sees the noisy latents beside the prediction, so detail finer than a patch and the seams between
patches are drawn by a convolution instead of a per-token linear map. Its last layer starts at
zero (:meth:`Denoiser.with_refiner` adds it to a trained model without changing its output).

The sequence is ``[embedding tokens, class token, source token, text tokens]`` (each part only
when the model has it). All tokens share PixArt's caption MLP. Each condition kind has its own
learned null value stored in the model (``caption_projection.uncond_embedding`` for embeddings,
as in PixCell; the extra last row of ``class_embedding`` and of ``source_embedding``;
``uncond_text``), so classifier-free guidance can drop each one independently and needs nothing
outside the weights. Label -1 means "unknown": it selects the null row, so unlabelled tiles train
the null class and only labelled tiles train the class rows. With only embedding tokens the
module names and the forward pass are exactly those of PixCell's ``PixCellTransformer2DModel``,
so its checkpoints load as they are (and configs without the newer fields load unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (pipelines look it up here)
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from torch import nn

from synthgen.loading import StrictLoadMixin

_LABEL_KEYS = ("class_labels", "source_labels")  # integer conditions: their nulls are ids, not values


def condition_pos_embed(dim: int, grid: int, base_size: int, interpolation_scale: float, phase: float) -> torch.Tensor:
    """2-D sin-cos embedding of a grid x grid token layout, (grid*grid, dim).

    PixCell's variant of the PixArt/MAE embedding: positions are scaled to ``base_size`` and
    shifted by ``phase``; the first half of the channels encodes the column, the second the row.
    """
    if dim % 4:
        raise ValueError(f"condition embedding dim {dim} must be divisible by 4 for a 2-D sin-cos embedding")
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base_size) / interpolation_scale
    gw, gh = torch.meshgrid(pos, pos, indexing="xy")  # gw varies along columns

    def one_d(d: int, p: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = torch.outer(p.reshape(-1).double() + phase, omega)
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1).float()


class ConditionProjection(PixArtAlphaTextProjection):
    """PixArt's caption MLP plus the learned null embedding used for guidance (PixCell layout)."""

    def __init__(self, in_features: int, hidden_size: int, num_tokens: int = 1):
        super().__init__(in_features=in_features, hidden_size=hidden_size, act_fn="gelu_tanh")
        self.uncond_embedding = nn.Parameter(torch.randn(num_tokens, in_features) / in_features**0.5)


class ConditionPosEmbed(nn.Module):
    """Adds a fixed sin-cos embedding to a square grid of condition tokens (PixCell's y_pos_embed)."""

    def __init__(self, num_tokens: int, dim: int, base_size: int, interpolation_scale: float = 2.0):
        super().__init__()
        grid = math.isqrt(num_tokens)
        if grid * grid != num_tokens:
            raise ValueError(f"caption_num_tokens={num_tokens} must be a square number (a grid of crops)")
        pe = condition_pos_embed(dim, grid, base_size, interpolation_scale, phase=base_size // num_tokens)
        self.register_buffer("y_pos_embed", pe.unsqueeze(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens + self.y_pos_embed).to(tokens.dtype)


class ConvRefiner(nn.Module):
    """Residual conv stack on the transformer's output: ``pred + f(x_t, pred, t)``.

    ``f`` is a 3x3 conv over ``[x_t, pred]``, ``depth`` pre-norm residual 3x3 conv blocks scaled and
    shifted by the timestep (FiLM), and a zero-initialised 3x3 conv out: at initialisation the
    refiner is the identity on ``pred``.
    """

    def __init__(self, in_channels: int, out_channels: int, width: int, depth: int = 2):
        super().__init__()
        groups = math.gcd(32, width)
        self.conv_in = nn.Conv2d(in_channels + out_channels, width, 3, padding=1)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width, 2 * width * depth)
        self.norms = nn.ModuleList([nn.GroupNorm(groups, width) for _ in range(depth)])
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(depth)])
        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, noisy: torch.Tensor, pred: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(torch.cat([noisy.to(pred.dtype), pred], 1))
        t = self.time_embedding(self.time_proj(timestep.reshape(-1)).to(h.dtype))
        for norm, conv, film in zip(self.norms, self.convs, t.chunk(len(self.convs), dim=1), strict=True):
            scale, shift = film[:, :, None, None].chunk(2, dim=1)
            h = h + conv(nn.functional.silu(norm(h) * (1 + scale) + shift))
        return pred + self.conv_out(nn.functional.silu(self.norm_out(h)))


class Denoiser(StrictLoadMixin, PixArtTransformer2DModel):
    """Latent diffusion transformer conditioned on embedding tokens, class labels and/or text.

    Configuration is that of ``PixArtTransformer2DModel`` plus:

    Args:
        caption_channels: width C of the condition tokens (the image encoder's embedding size).
        caption_num_tokens: number N of embedding tokens per image (a square: 1, 4, 16, ...).
        use_embeddings: condition on embedding tokens (False for class- or text-only models;
            ``caption_channels`` then only sets the width of the class/text tokens).
        num_classes: number of class labels (0: no class conditioning). Label ``num_classes``
            (or -1) is the null class used for guidance and for unlabelled tiles.
        num_sources: number of source labels (0: no source conditioning); ``num_sources`` or -1
            is the null source. A model with sources samples the null source when none is given.
        class_names, source_names: names of the class / source ids (stored in the config so
            that pipelines accept names; from the feature cache when training).
        text_channels: width of text-encoder tokens (None: no text conditioning).
        text_num_tokens: text tokens per prompt.
        source_channels: channels of the source latents concatenated to the input (0: none);
            ``in_channels`` stays the channels of the latents the model denoises.
        cond_interpolation_scale: scale of the embedding-token positional embedding (PixCell: 2).
        refine_channels: width of the convolutional refiner after the output (0: none, as PixArt).
        refine_depth: residual conv blocks in the refiner.

    Use ``save_pretrained`` / ``from_pretrained`` (diffusers layout; a local folder or a hub id,
    ``subfolder="transformer"`` for pipeline repositories). Loading is strict: missing or
    unexpected keys raise :class:`~synthgen.errors.CheckpointError` naming them.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = False,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        caption_num_tokens: int = 1,
        use_embeddings: bool = True,
        num_classes: int = 0,
        text_channels: int | None = None,
        text_num_tokens: int = 1,
        cond_interpolation_scale: float = 2.0,
        num_sources: int = 0,
        class_names: list[str] | None = None,
        source_names: list[str] | None = None,
        source_channels: int = 0,
        distilled_guidance_scale: float | None = None,
        refine_channels: int = 0,
        refine_depth: int = 2,
    ):
        # distilled_guidance_scale: set on a few-step student (task consistency): the guidance
        # scale folded into it, so it samples with one pass per step (recorded, not used here)
        if caption_channels is None:
            raise ValueError("Denoiser needs caption_channels (the width of the condition tokens)")
        inner = num_attention_heads * attention_head_dim
        if cross_attention_dim != inner:
            raise ValueError(f"cross_attention_dim ({cross_attention_dim}) must equal heads x head_dim ({inner})")
        if not (use_embeddings or num_classes or num_sources or text_channels or source_channels):
            raise ValueError("Denoiser needs at least one condition: embeddings, classes, sources, text or source latents")
        for what, names, n in (("class_names", class_names, num_classes), ("source_names", source_names, num_sources)):
            if names is not None and len(names) != n:
                raise ValueError(f"{what} has {len(names)} names for {n} ids")
        super().__init__(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels + source_channels, out_channels=out_channels or in_channels,
            num_layers=num_layers, dropout=dropout,
            norm_num_groups=norm_num_groups, cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias, sample_size=sample_size, patch_size=patch_size,
            activation_fn=activation_fn, num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention, norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps,
            interpolation_scale=interpolation_scale, use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels, attention_type=attention_type,
        )
        # PixArt's own decorated __init__ recorded the widened input; the config keeps the latents' channels
        self.register_to_config(in_channels=in_channels, out_channels=out_channels)
        self.caption_projection = ConditionProjection(caption_channels, inner, caption_num_tokens)
        if not use_embeddings:  # the null embedding is only meaningful for embedding tokens
            del self.caption_projection.uncond_embedding
        self.y_pos_embed = (
            ConditionPosEmbed(caption_num_tokens, caption_channels, sample_size // patch_size, cond_interpolation_scale)
            if use_embeddings and caption_num_tokens > 1 else None
        )
        self.class_embedding = nn.Embedding(num_classes + 1, caption_channels) if num_classes else None
        if self.class_embedding is not None:
            nn.init.normal_(self.class_embedding.weight, std=caption_channels**-0.5)
        self.source_embedding = nn.Embedding(num_sources + 1, caption_channels) if num_sources else None
        if self.source_embedding is not None:
            nn.init.normal_(self.source_embedding.weight, std=caption_channels**-0.5)
        if text_channels:
            self.text_projection = nn.Linear(text_channels, caption_channels)
            self.uncond_text = nn.Parameter(torch.randn(text_num_tokens, text_channels) / text_channels**0.5)
        else:
            self.text_projection = None
        self.refiner = (ConvRefiner(in_channels, out_channels or in_channels, refine_channels, refine_depth)
                        if refine_channels else None)

    # -- conditions ----------------------------------------------------------------------
    def null_conditions(self, batch_size: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        """The learned unconditional inputs, for classifier-free guidance."""
        cfg = self.config
        out: dict[str, torch.Tensor] = {}
        if cfg.use_embeddings:
            e = self.caption_projection.uncond_embedding
            out["embeddings"] = e.to(device or e.device, dtype or e.dtype).expand(batch_size, -1, -1)
        if cfg.num_classes:
            out["class_labels"] = torch.full((batch_size,), cfg.num_classes, dtype=torch.long, device=device)
        if cfg.num_sources:
            out["source_labels"] = torch.full((batch_size,), cfg.num_sources, dtype=torch.long, device=device)
        if cfg.text_channels:
            t = self.uncond_text
            out["text"] = t.to(device or t.device, dtype or t.dtype).expand(batch_size, -1, -1)
        if cfg.source_channels:  # zeros, broadcast over the latent grid (expand to (B, C_s, H, W) to concatenate)
            out["source_latents"] = torch.zeros(batch_size, cfg.source_channels, 1, 1, device=device,
                                                dtype=dtype or torch.float32)
        return out

    def drop_conditions(self, drop: torch.Tensor | Mapping[str, torch.Tensor],
                        **conditions: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Replace the conditions of the samples where ``drop`` (B,) is True by the null ones.

        ``drop`` is one mask for every condition, or a mapping condition name (``embeddings``,
        ``class_labels``, ``source_labels``, ``text``, ``source_latents``) -> mask, so that each condition is dropped
        independently (a condition the mapping does not name is kept). Used for guidance
        dropout in training and to build mixed conditional/unconditional batches at sampling time.
        """
        out = {}
        for key, value in conditions.items():
            if value is None:
                continue
            d = drop.get(key) if isinstance(drop, Mapping) else drop
            if d is None:
                out[key] = value
                continue
            d = d.bool()
            nv = self.null_conditions(len(d), device=d.device)[key]
            nv = nv if key in _LABEL_KEYS else nv.to(value.dtype)
            out[key] = torch.where(d.view(-1, *([1] * (value.ndim - 1))), nv, value)
        return out

    def condition_tokens(
        self,
        embeddings: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        batch_size: int | None = None,
        source_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Build the (B, L, caption_channels) sequence the caption MLP projects.

        A model with sources uses the null source for ``source_labels=None``.

        Raises:
            ValueError: a condition the model needs is missing or has the wrong shape.
        """
        cfg = self.config
        parts = []
        if cfg.use_embeddings:
            if embeddings is None:
                raise ValueError("this Denoiser is conditioned on embeddings: pass embeddings (B, N, C) "
                                 "(use null_conditions() for unconditional samples)")
            if embeddings.ndim == 2:
                embeddings = embeddings[:, None]
            want = (cfg.caption_num_tokens, cfg.caption_channels)
            if embeddings.ndim != 3 or tuple(embeddings.shape[1:]) != want:
                raise ValueError(f"embeddings must have shape (B, {want[0]}, {want[1]}), got {tuple(embeddings.shape)}")
            parts.append(self.y_pos_embed(embeddings) if self.y_pos_embed is not None else embeddings)
        if cfg.num_classes:
            if class_labels is None:
                raise ValueError(f"this Denoiser is conditioned on {cfg.num_classes} classes: pass class_labels (B,)")
            labels = torch.where(class_labels < 0, cfg.num_classes, class_labels.long())
            if (labels > cfg.num_classes).any():
                raise ValueError(f"class labels must be in [0, {cfg.num_classes}) (or -1/{cfg.num_classes} for null), "
                                 f"got max {int(labels.max())}")
            parts.append(self.class_embedding(labels)[:, None])
        if cfg.num_sources:
            ns = cfg.num_sources
            if source_labels is None:
                b = parts[0].shape[0] if parts else (text.shape[0] if text is not None else batch_size)
                if b is None:
                    raise ValueError(f"this Denoiser is conditioned on {ns} sources: pass source_labels (B,)")
                source_labels = torch.full((b,), ns, dtype=torch.long, device=self.source_embedding.weight.device)
            sources = torch.where(source_labels < 0, ns, source_labels.long())
            if (sources > ns).any():
                raise ValueError(f"source labels must be in [0, {ns}) (or -1/{ns} for null), got max {int(sources.max())}")
            parts.append(self.source_embedding(sources)[:, None])
        if cfg.text_channels:
            if text is None:
                raise ValueError("this Denoiser is conditioned on text: pass text (B, T, C_text)")
            if text.ndim != 3 or tuple(text.shape[1:]) != (cfg.text_num_tokens, cfg.text_channels):
                raise ValueError(f"text must have shape (B, {cfg.text_num_tokens}, {cfg.text_channels}), "
                                 f"got {tuple(text.shape)}")
            parts.append(self.text_projection(text))
        dtype = self.caption_projection.linear_1.weight.dtype
        return torch.cat([p.to(dtype) for p in parts], dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        embeddings: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        source_labels: torch.Tensor | None = None,
        source_latents: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
        **kwargs,
    ):
        """Predict noise / velocity for latents ``hidden_states`` (B, C, H, W) at ``timestep`` (B,).

        ``encoder_hidden_states`` is accepted as another name for ``embeddings`` so that code
        written for PixArt/PixCell transformers can call this model unchanged.
        """
        if embeddings is None:
            embeddings = encoder_hidden_states
        tokens = self.condition_tokens(embeddings, class_labels, text, source_labels=source_labels,
                                       batch_size=hidden_states.shape[0])
        cs = self.config.source_channels
        if cs:
            if source_latents is None:
                raise ValueError(f"this Denoiser is conditioned on source latents: pass source_latents (B, {cs}, H, W) "
                                 "(zeros for none)")
            b, _, h, w = hidden_states.shape
            if source_latents.ndim != 4 or source_latents.shape[1] != cs:
                raise ValueError(f"source_latents must have shape (B, {cs}, H, W), got {tuple(source_latents.shape)}")
            hidden_states = torch.cat([hidden_states, source_latents.to(hidden_states.dtype).expand(b, cs, h, w)], 1)
        elif source_latents is not None:
            raise ValueError("source_latents: this Denoiser has no source channels (see Denoiser.with_source_channels)")
        noisy = hidden_states[:, : self.config.in_channels]
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        if self.use_additional_conditions and added_cond_kwargs is None:
            added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        out = super().forward(
            hidden_states, encoder_hidden_states=tokens, timestep=timestep, added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs=cross_attention_kwargs, return_dict=return_dict, **kwargs,
        )
        if self.refiner is None:
            return out
        sample = self.refiner(noisy, out.sample if return_dict else out[0], timestep)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    @classmethod
    def with_source_channels(cls, base: Denoiser, source_channels: int | None = None) -> Denoiser:
        """``base`` with ``source_channels`` (default: its latent channels) more input channels for
        source latents, their patch-embedding weights zero-initialised (InstructPix2Pix): the new
        model's output equals the base's for any source until it is trained."""
        cfg = {k: v for k, v in base.config.items() if k != "_use_default_values"}  # else from_config drops ours
        if cfg.get("source_channels"):
            raise ValueError(f"the base denoiser has source channels already ({cfg['source_channels']})")
        cfg["source_channels"] = source_channels or cfg["in_channels"]
        new = cls.from_config(cfg)
        state = dict(base.state_dict())
        w = state["pos_embed.proj.weight"]
        state["pos_embed.proj.weight"] = torch.cat([w, w.new_zeros(w.shape[0], cfg["source_channels"], *w.shape[2:])], 1)
        new.load_state_dict(state)
        return new.to(device=base.device)

    @classmethod
    def with_classes(cls, base: Denoiser, class_names: list[str]) -> Denoiser:
        """``base`` conditioned on the classes ``class_names`` instead of its own (``synthgen adapt``).

        A name the base knows keeps its learned class embedding; a new name starts from the base's
        null class, so until it is trained a new class generates as the unconditional model does.
        The null class and every other weight are kept."""
        names = [str(n) for n in class_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"class_names must be distinct and non-empty, got {names}")
        cfg = {k: v for k, v in base.config.items() if k != "_use_default_values"}
        old = list(cfg.get("class_names") or [])
        cfg.update(num_classes=len(names), class_names=names)
        new = cls.from_config(cfg)
        state = {k: v for k, v in base.state_dict().items() if k != "class_embedding.weight"}
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "class_embedding.weight"]:
            raise RuntimeError(f"changing the classes lost weights: missing {missing}, unexpected {unexpected}")
        with torch.no_grad():
            w = new.class_embedding.weight
            if base.class_embedding is not None:
                bw = base.class_embedding.weight
                null = bw[len(old)]
                for i, name in enumerate(names):
                    w[i] = bw[old.index(name)] if name in old else null
                w[len(names)] = null
            else:
                w.zero_()  # a base without classes: every class starts as "no class token"
        return new.to(device=base.device)

    @classmethod
    def with_refiner(cls, base: Denoiser, refine_channels: int = 64, refine_depth: int = 2) -> Denoiser:
        """``base`` followed by a new :class:`ConvRefiner` whose last layer is zero: the new model's
        output equals the base's until the refiner is trained."""
        cfg = {k: v for k, v in base.config.items() if k != "_use_default_values"}
        if cfg.get("refine_channels"):
            raise ValueError(f"the base denoiser has a refiner already (refine_channels={cfg['refine_channels']})")
        cfg.update(refine_channels=refine_channels, refine_depth=refine_depth)
        new = cls.from_config(cfg)
        missing, unexpected = new.load_state_dict(base.state_dict(), strict=False)
        if unexpected or [k for k in missing if not k.startswith("refiner.")]:
            raise RuntimeError(f"adding the refiner lost weights: missing {missing}, unexpected {unexpected}")
        return new.to(device=base.device, dtype=base.dtype)

    def resized(self, sample_size: int) -> Denoiser:
        """The same weights at another latent size, for progressive-resolution training.

        The image positional embedding is a fixed sin-cos function, rebuilt for the new grid with
        ``interpolation_scale`` grown in proportion (PixArt/PixCell: 0.5 at 256 px, 2 at 1024 px),
        so the new grid spans the same range of positions as the old one at the old scale.
        """
        cfg = dict(self.config)
        old = cfg["sample_size"]
        scale = cfg.get("interpolation_scale") or max(old // 64, 1)
        cfg.update(sample_size=sample_size, interpolation_scale=scale * sample_size / old)
        new = type(self).from_config(cfg)
        state = {k: v for k, v in self.state_dict().items() if k != "y_pos_embed.y_pos_embed"}
        missing, unexpected = new.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "y_pos_embed.y_pos_embed"]:
            raise RuntimeError(f"resize lost weights: missing {missing}, unexpected {unexpected}")
        return new.to(self.device, self.dtype)
