"""Named model configurations, in one place.

``tiny`` is for tests (a few thousand parameters), ``small`` is the CPU default that the
project trains itself, ``pixcell-256`` / ``pixcell-1024`` match the released PixCell
transformers (PixArt-XL/2 with UNI2-h conditioning) and ``sd3`` the SD3/SD3.5 VAE they use,
for GPU machines.
"""

from __future__ import annotations

from typing import Any

_DENOISERS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                 sample_size=8, patch_size=2, caption_channels=32),
    # CPU default: 16x16x4 latents of the small VAE (64 px tiles), small SSL encoder's 128-d tokens
    "small": dict(num_layers=8, num_attention_heads=6, attention_head_dim=32, in_channels=4, out_channels=4,
                  sample_size=16, patch_size=2, caption_channels=128),
    # v2 CPU default: 32x32x4 latents of the v2 VAE (128 px tiles at 0.5 um/px), patch 4 -> 64
    # image tokens (patch 2, 256 tokens, measured 5x slower per step on CPU); 4 condition tokens (a
    # 2x2 grid of 64 px crops through the 128-d SSL encoder), plus a class and a tissue-source
    # token when trained with labels (their numbers and names come from the cache)
    "small-v2": dict(num_layers=8, num_attention_heads=6, attention_head_dim=32, in_channels=4, out_channels=4,
                     sample_size=32, patch_size=4, caption_channels=128, caption_num_tokens=4),
    # PixArt-XL/2 (28 x 1152), 16-channel SD3.5 latents, learned variance (out = 2 x in), UNI2-h (1536)
    "pixcell-256": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=16,
                        out_channels=32, sample_size=32, patch_size=2, caption_channels=1536,
                        caption_num_tokens=1, interpolation_scale=0.5),
    "pixcell-1024": dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=16,
                         out_channels=32, sample_size=128, patch_size=2, caption_channels=1536,
                         caption_num_tokens=16, interpolation_scale=2.0),
}


def _lookup(table: dict[str, dict], kind: str, name: str) -> dict[str, Any]:
    if name not in table:
        raise ValueError(f"unknown {kind} preset {name!r}; choose one of: {', '.join(table)}")
    return dict(table[name])


def denoiser_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`~synthgen.models.denoiser.Denoiser` from a preset.

    ``cross_attention_dim`` follows heads x head_dim unless overridden.
    """
    cfg = _lookup(_DENOISERS, "denoiser", name)
    cfg.update(overrides)
    cfg.setdefault("cross_attention_dim", cfg["num_attention_heads"] * cfg["attention_head_dim"])
    return cfg


DENOISER_PRESETS = tuple(_DENOISERS)

_VAES: dict[str, dict] = {
    # 16 px -> 4x4x4 latents; for tests
    "tiny": dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 sample_size=32, scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False),
    # CPU default: 4x downsampling, 4 channels (64 px tiles -> 16x16x4), about 0.65 M parameters
    "small": dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64, scaling_factor=1.0,
                  shift_factor=0.0, mid_block_add_attention=False),
    # Stable Diffusion 3 / 3.5 VAE (PixCell's): 16 channels, no quant convs
    "sd3": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=1.5305,
                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True),
}


def vae_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for diffusers ``AutoencoderKL`` from a preset."""
    cfg = _lookup(_VAES, "VAE", name)
    cfg.update(overrides)
    return cfg


VAE_PRESETS = tuple(_VAES)

_ENCODERS: dict[str, dict[str, Any]] = {
    "tiny": dict(input_size=32, width=8, dim=32, proj_dim=32),
    # CPU default: 64 px input, about 0.35 M parameters, 128-d embedding
    "small": dict(input_size=64, width=16, dim=128, proj_dim=64),
    # v2 CPU default: the small network on 128 px tiles at 0.5 um/px as a 2x2 grid of 64 px crops,
    # one 128-d token each (4 tokens, the condition of the small-v2 denoiser)
    "small-v2": dict(input_size=64, width=16, dim=128, proj_dim=64, grid=2),
}


def encoder_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`~synthgen.encoders.ssl.SSLEncoder` from a preset.

    Published foundation models (UNI, UNI2-h, Virchow2, H-optimus-0) are presets of
    :class:`~synthgen.encoders.timm_encoder.TimmEncoder` (``TIMM_PRESETS``).
    """
    cfg = _lookup(_ENCODERS, "encoder", name)
    cfg.update(overrides)
    return cfg


ENCODER_PRESETS = tuple(_ENCODERS)
