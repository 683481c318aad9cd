"""Models: the VAE, the conditioned denoiser, and their presets."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {
    "Denoiser": ".denoiser",
    "VAE": ".vae",
    "EmbeddingPrior": ".prior",
    "MaskControlNet": ".controlnet",
    "ControlledDenoiser": ".controlnet",
    "denoiser_config": ".presets",
    "DENOISER_PRESETS": ".presets",
    "VAE_PRESETS": ".presets",
    "vae_config": ".presets",
    "encoder_config": ".presets",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
