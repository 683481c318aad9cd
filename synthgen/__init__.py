"""synthgen: synthetic histopathology data you can train on and share.

The top-level import is light; heavy parts (torch, diffusers, OpenSlide) load on first use.
"""

from synthgen._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "Slide": ".data.slides",
    "TileSpec": ".data.tiling",
    "tile_slide": ".data.tiling",
    "PatchDataset": ".data.datasets",
    "ImageListDataset": ".data.datasets",
    "CacheDataset": ".data.cache",
    "build_cache": ".data.cache",
    "SynthgenError": ".errors",
    "Denoiser": ".models.denoiser",
    "VAE": ".models.vae",
    "EmbeddingPrior": ".models.prior",
    "SSLEncoder": ".encoders.ssl",
    "TimmEncoder": ".encoders.timm_encoder",
    "SynthPipeline": ".pipelines.generate",
    "RareClassSynthesizer": ".pipelines.rare",
    "train": ".training.trainer",
    "load_train_config": ".config",
}
__all__ = ["__version__", *_EXPORTS]
__getattr__ = lazy_getattr(__name__, _EXPORTS)
