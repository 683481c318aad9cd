"""Mask branch for the denoiser: a PixArt-style ControlNet (Chen et al. 2024, PixArt-delta).

The branch holds trainable copies of the first ``num_layers`` transformer blocks of a frozen
:class:`~synthgen.models.denoiser.Denoiser`. The mask enters as tokens added (through a
zero-initialised linear layer) to the base model's patch tokens; block copy i's output goes
through another zero-initialised linear layer and is added to the output of base block i. At
initialisation every residual is exactly zero, so training starts from the base model's
behaviour and cannot damage it.

**Mask encoding.** A label map (B, H, W) at image resolution becomes channels at image
resolution (instance maps: nucleus foreground and instance boundary, so touching nuclei stay
two objects; semantic maps: one-hot of ``mask_classes`` classes), then a space-to-depth
rearrangement by the VAE factor (``pixel_unshuffle``) brings it to the latent grid without
losing a pixel, and a strided convolution makes one token per denoiser patch. We chose this over
rendering the mask as an RGB image and VAE-encoding it (PixArt's ControlNet for edge maps):
a VAE trained on H&E blurs one-pixel boundaries between touching nuclei, its latents spend
capacity on colour a mask does not have, and it would tie the branch to one VAE; the
space-to-depth encoding is exact, costs nothing and works with any latent size.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from synthgen.errors import MaskError
from synthgen.loading import StrictLoadMixin

_BLOCK_KEYS = ("num_attention_heads", "attention_head_dim", "dropout", "cross_attention_dim", "activation_fn",
               "num_embeds_ada_norm", "attention_bias", "upcast_attention", "norm_type", "norm_elementwise_affine",
               "norm_eps", "attention_type")


def mask_to_channels(mask: torch.Tensor, mask_classes: int = 0) -> torch.Tensor:
    """Label maps (B, H, W) -> float channels (B, C, H, W) at the same resolution.

    ``mask_classes == 0``: instance labels (0 background, 1..N objects) -> [foreground, boundary],
    where a boundary pixel is an object pixel with a 4-neighbour of another label.
    ``mask_classes == K``: semantic labels 0..K -> one-hot of classes 1..K (0 is background).
    """
    if mask.ndim != 3:
        raise MaskError(f"masks must be label maps (B, H, W), got shape {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise MaskError(f"masks must hold integer labels, got {mask.dtype} (pass a label map, not an image)")
    m = mask.long()
    if (m < 0).any():
        raise MaskError("masks: negative labels are not allowed")
    if mask_classes:
        if int(m.max()) > mask_classes:
            raise MaskError(f"masks: label {int(m.max())} > mask_classes={mask_classes} (semantic labels are "
                            f"0 = background, 1..{mask_classes})")
        return F.one_hot(m, mask_classes + 1)[..., 1:].permute(0, 3, 1, 2).float()
    fg = m > 0
    p = F.pad(m[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    c = p[:, 1:-1, 1:-1]
    edge = (p[:, :-2, 1:-1] != c) | (p[:, 2:, 1:-1] != c) | (p[:, 1:-1, :-2] != c) | (p[:, 1:-1, 2:] != c)
    return torch.stack([fg, fg & edge], 1).float()


class MaskControlNet(StrictLoadMixin, ModelMixin, ConfigMixin):
    """Zero-initialised ControlNet branch over a frozen denoiser, conditioned on a label map.

    Args:
        num_layers: number of base blocks copied (PixArt-delta copies 13 of 28; half is a good
            default for small models).
        mask_classes: 0 for instance (nuclei) maps, K for semantic maps with classes 1..K.
        downscale: image pixels per latent pixel (the VAE's factor).
        patch_size, inner_dim, block: the base denoiser's patch size, width and block settings
            (filled by :meth:`from_denoiser`).
        conditioning_scale: the strength the branch runs at when a call gives none (recorded in
            its config: chosen on validation for a shipped branch; training uses 1).

    Build it with :meth:`from_denoiser` (copies the base blocks' weights), train it with
    ``synthgen train`` (``task: controlnet``), save it as the ``controlnet`` folder of a pipeline.
    """

    @register_to_config
    def __init__(
        self,
        num_layers: int = 4,
        mask_classes: int = 0,
        downscale: int = 4,
        patch_size: int = 2,
        num_attention_heads: int = 6,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        cross_attention_dim: int | None = 192,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        attention_bias: bool = True,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        attention_type: str | None = "default",
        conditioning_scale: float = 1.0,
    ):
        super().__init__()
        inner = num_attention_heads * attention_head_dim
        in_ch = (mask_classes or 2) * downscale**2
        self.mask_embed = nn.Conv2d(in_ch, inner, kernel_size=patch_size, stride=patch_size)
        self.before_proj = nn.Linear(inner, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(
                inner, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm, attention_bias=attention_bias,
                upcast_attention=upcast_attention, norm_type=norm_type,
                norm_elementwise_affine=norm_elementwise_affine, norm_eps=norm_eps, attention_type=attention_type,
            )
            for _ in range(num_layers)
        ])
        self.after_proj = nn.ModuleList([nn.Linear(inner, inner) for _ in range(num_layers)])
        for layer in [self.before_proj, *self.after_proj]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_denoiser(cls, denoiser, num_layers: int | None = None, mask_classes: int = 0,
                      downscale: int = 4) -> MaskControlNet:
        """A branch whose blocks start as copies of ``denoiser``'s first ``num_layers`` blocks."""
        cfg = denoiser.config
        num_layers = num_layers or max(cfg.num_layers // 2, 1)
        if not 1 <= num_layers <= cfg.num_layers:
            raise ValueError(f"num_layers must be in [1, {cfg.num_layers}] (the base model's depth), got {num_layers}")
        net = cls(num_layers=num_layers, mask_classes=mask_classes, downscale=downscale, patch_size=cfg.patch_size,
                  **{k: cfg[k] for k in _BLOCK_KEYS})
        for mine, base in zip(net.transformer_blocks, denoiser.transformer_blocks, strict=False):
            mine.load_state_dict(copy.deepcopy(base.state_dict()))
        net = net.to(denoiser.device)
        return net if denoiser.dtype == torch.float32 else net.to(denoiser.dtype)

    def check_mask(self, mask: torch.Tensor, latent_hw: tuple[int, int]) -> None:
        want = (latent_hw[0] * self.config.downscale, latent_hw[1] * self.config.downscale)
        if mask.ndim != 3 or tuple(mask.shape[1:]) != want:
            raise MaskError(f"masks must be (B, {want[0]}, {want[1]}) label maps at image resolution, "
                            f"got shape {tuple(mask.shape)}")

    def forward(self, denoiser, hidden_states: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor,
                **conditions) -> list[torch.Tensor]:
        """Residuals (one per copied block) to add to ``denoiser``'s block outputs.

        ``hidden_states`` are the noisy latents, ``conditions`` the denoiser's condition inputs.
        """
        self.check_mask(mask, hidden_states.shape[-2:])
        b = hidden_states.shape[0]
        x = denoiser.pos_embed(hidden_states)
        t, _ = denoiser.adaln_single(timestep, {"resolution": None, "aspect_ratio": None}, batch_size=b,
                                     hidden_dtype=x.dtype)
        enc = denoiser.caption_projection(denoiser.condition_tokens(**conditions)).view(b, -1, x.shape[-1])
        m = F.pixel_unshuffle(mask_to_channels(mask.to(x.device), self.config.mask_classes), self.config.downscale)
        c = x + self.before_proj(self.mask_embed(m.to(x.dtype)).flatten(2).transpose(1, 2))
        out = []
        for block, proj in zip(self.transformer_blocks, self.after_proj, strict=True):
            c = block(c, encoder_hidden_states=enc, timestep=t)
            out.append(proj(c))
        return out


@contextlib.contextmanager
def _add_to_block_outputs(blocks, residuals):
    handles = [blk.register_forward_hook(lambda _m, _i, out, r=r: out + r) for blk, r in zip(blocks, residuals, strict=False)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class ControlledDenoiser(nn.Module):
    """A denoiser plus its mask branch, called like the denoiser with an extra ``mask`` input.

    Sampling and training code treat it as a denoiser (``config``, ``null_conditions``,
    ``drop_conditions``): the mask is kept in both halves of a classifier-free-guidance batch,
    so guidance acts on the embedding/class/text condition and the layout is always honoured.

    Args:
        conditioning_scale: multiplies the branch's residuals (0 = the base model alone).
    """

    def __init__(self, denoiser, controlnet: MaskControlNet, conditioning_scale: float = 1.0):
        super().__init__()
        self.denoiser, self.controlnet, self.conditioning_scale = denoiser, controlnet, conditioning_scale

    @property
    def config(self):
        return self.denoiser.config

    def null_conditions(self, *args, **kwargs):
        return self.denoiser.null_conditions(*args, **kwargs)

    def drop_conditions(self, drop, mask=None, **conditions):
        out = self.denoiser.drop_conditions(drop, **conditions)
        if mask is not None:
            out["mask"] = mask
        return out

    def forward(self, hidden_states, timestep, mask: torch.Tensor | None = None, **conditions):
        if mask is None:
            raise MaskError("this model is mask-guided: pass mask= (B, H, W) label maps")
        if timestep.ndim == 0:
            timestep = timestep.expand(hidden_states.shape[0])
        residuals = self.controlnet(self.denoiser, hidden_states, timestep, mask, **conditions)
        residuals = [r * self.conditioning_scale for r in residuals]
        with _add_to_block_outputs(self.denoiser.transformer_blocks, residuals):
            return self.denoiser(hidden_states, timestep, **conditions)
