"""Generation: sampling loops and pipelines."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {"sample_latents": ".sampling", "make_scheduler": ".sampling"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
