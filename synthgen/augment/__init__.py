"""On-the-fly synthetic augmentation inside a PyTorch DataLoader."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {"SynthAugment": ".synth_augment", "SynthPolicy": ".synth_augment", "PipelineGenerator": ".synth_augment",
            "SynthTransform": ".transform"}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
