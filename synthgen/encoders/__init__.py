"""Condition encoders: one protocol, images -> (N, tokens, dim); plus text."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {
    "ImageEncoder": ".base",
    "TimmEncoder": ".timm_encoder",
    "TIMM_PRESETS": ".timm_encoder",
    "HFEncoder": ".hf_encoder",
    "TextEncoder": ".text",
    "SSLEncoder": ".ssl",
    "simclr_loss": ".ssl",
    "augment_views": ".ssl",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
