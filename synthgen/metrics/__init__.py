"""Metrics: fidelity of synthetic sets (encoder and encoder-free), masks, stains, utility, privacy."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {
    "frechet_distance": ".fidelity",
    "kid": ".fidelity",
    "prdc": ".fidelity",
    "bootstrap": ".fidelity",
    "fidelity_report": ".fidelity",
    "extract_features": ".fidelity",
    "handcrafted_features": ".handcrafted",
    "handcrafted_fd": ".handcrafted",
    "encoder_free_report": ".handcrafted",
    "RealismFilter": ".handcrafted",
    "mask_adherence": ".masks",
    "dice": ".masks",
    "match_objects": ".masks",
    "stain_report": ".stain",
    "dab_fraction": ".stain",
    "hematoxylin_fraction": ".stain",
    "psnr": ".stain",
    "ssim": ".stain",
    "correlation": ".stain",
    "encoder_frechet_distance": ".stain",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
