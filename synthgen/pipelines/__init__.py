"""Generation: sampling loops and pipelines."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {
    "sample_latents": ".sampling",
    "make_scheduler": ".sampling",
    "SynthPipeline": ".generate",
    "RareClassSynthesizer": ".rare",
    "ClassFilter": ".rare",
    "interpolate_embeddings": ".rare",
    "generate_large": ".large_image",
    "write_pyramidal_tiff": ".large_image",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
