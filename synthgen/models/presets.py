"""Named model configurations, in one place.

``tiny`` is for tests (a few thousand parameters), ``small`` is the CPU default that the
project trains itself, ``pixcell-256`` / ``pixcell-1024`` match the released PixCell
transformers (PixArt-XL/2 with UNI2-h conditioning, SD3.5 VAE latents) for GPU machines.
"""

from __future__ import annotations

from typing import Any

_DENOISERS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                 sample_size=8, patch_size=2, caption_channels=32),
    "small": dict(num_layers=8, num_attention_heads=6, attention_head_dim=32, in_channels=4, out_channels=4,
                  sample_size=16, patch_size=2, caption_channels=256),
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
