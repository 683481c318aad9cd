"""The training engine: one accelerate loop for every model type."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {"train": ".trainer", "TrainResult": ".trainer", "DiffusionObjective": ".objectives"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
