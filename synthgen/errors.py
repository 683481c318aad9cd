"""Exceptions raised by synthgen. Each message names the file or field and the problem."""

from __future__ import annotations


class SynthgenError(Exception):
    """Base class of every error synthgen raises on purpose."""


class SlideError(SynthgenError):
    """A slide or image file cannot be opened or read (missing, corrupt, no resolution)."""


class TissueError(SynthgenError):
    """No tissue was found where tissue was required."""


class MaskError(SynthgenError):
    """A mask or annotation does not fit its patch (size, dtype, geometry)."""


class CacheError(SynthgenError):
    """A feature cache is inconsistent, incomplete or was built with another configuration."""


class CheckpointError(SynthgenError):
    """A checkpoint does not match the model it is loaded into (names the keys)."""


class StainError(SynthgenError):
    """Paired stain data is unusable: unknown stain name, unpaired or empty folders, size mismatch."""


class RegistrationError(SynthgenError):
    """Two sections cannot be registered (too few or degenerate landmarks, no tissue to align)."""


class LockError(SynthgenError):
    """Another live process holds the lock of an output folder (see :class:`synthgen._io.OutputLock`)."""
