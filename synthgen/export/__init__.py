"""Shareable exports with manifest, datasheet and checksums."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {"export_dataset": ".writers", "verify_export": ".writers", "FORMATS": ".writers"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
