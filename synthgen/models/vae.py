"""The image autoencoder: diffusers' ``AutoencoderKL`` plus the latent normalisation.

The latent scale and shift live in one place, the autoencoder's own config
(``scaling_factor``, ``shift_factor``), and only :class:`VAE` applies them:
``z = (posterior - shift) * scale`` on encode and the inverse on decode. The SD3/SD3.5 VAE
(16 channels, scale 1.5305, shift 0.0609, as PixCell uses) loads from its folder or hub id;
the small default configuration is trained by the project on real tiles.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401 (pipelines look it up here)
from torch import nn

from synthgen.loading import StrictLoadMixin
from synthgen.models.presets import vae_config


class StrictAutoencoderKL(StrictLoadMixin, AutoencoderKL):
    """``AutoencoderKL`` whose ``from_pretrained`` refuses missing or unexpected keys."""


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if images.is_floating_point():
        return images * 2.0 - 1.0
    raise TypeError(f"images must be uint8 or float, got {images.dtype}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (rounded, clamped)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class VAE(nn.Module):
    """Encode images to normalised latents and back.

    Args:
        autoencoder: a diffusers ``AutoencoderKL``; its config's ``scaling_factor`` and
            ``shift_factor`` define the latent normalisation.

    Example:
        >>> vae = VAE.from_pretrained("stabilityai/stable-diffusion-3.5-large", subfolder="vae")
        >>> z = vae.encode(uint8_images)       # (B, 16, H/8, W/8), roughly unit variance
        >>> images = vae.decode(z)              # float in [-1, 1]
    """

    def __init__(self, autoencoder: AutoencoderKL):
        super().__init__()
        self.model = autoencoder

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> VAE:
        return cls(StrictAutoencoderKL(**vae_config(name, **overrides)))

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, subfolder: str | None = None, **kwargs) -> VAE:
        """Load an ``AutoencoderKL`` folder (``config.json`` + safetensors) or hub id, strictly."""
        return cls(StrictAutoencoderKL.from_pretrained(path_or_hub_id, subfolder=subfolder, **kwargs))

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        self.model.save_pretrained(path, **kwargs)

    # -- the normalisation (its only owner) ------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(self.model.config.shift_factor or 0.0)

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, batch_size: int = 32) -> tuple[float, float]:
        """Set shift and scale so that latents of ``images`` have zero mean and unit variance.

        Stores them in the autoencoder's config (saved with it). Returns (shift, scale).
        """
        zs = [self.model.encode(to_model_range(images[i : i + batch_size]).to(self.device, self.dtype)).latent_dist.mode()
              for i in range(0, len(images), batch_size)]
        z = torch.cat(zs).float()
        shift, scale = float(z.mean()), float(1.0 / z.std().clamp_min(1e-6))
        self.model.register_to_config(shift_factor=shift, scaling_factor=scale)
        return shift, scale

    # -- encode / decode -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def posterior(self, images: torch.Tensor):
        """The diagonal Gaussian posterior of un-normalised latents (for training)."""
        return self.model.encode(to_model_range(images).to(self.device, self.dtype)).latent_dist

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scaling_factor + self.shift_factor

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (uint8, or float in [0, 1]) -> normalised latents (B, C, H/d, W/d).

        Args:
            sample: draw from the posterior instead of taking its mean.
            generator: random source when sampling.
        """
        dist = self.posterior(images)
        z = dist.sample(generator) if sample else dist.mode()
        return self.normalize(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images as float in [-1, 1]."""
        return self.model.decode(self.denormalize(latents).to(self.device, self.dtype)).sample

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``encode`` without sampling: a VAE serves directly as a feature-cache encoder."""
        return self.encode(images)


def vae_loss(vae: VAE, images: torch.Tensor, kl_weight: float = 1e-6,
             generator: torch.Generator | None = None, *, gradient_weight: float = 0.0,
             frequency_weight: float = 0.0, return_images: bool = False) -> tuple[torch.Tensor, dict]:
    """Reconstruction + KL objective of an autoencoder (LDM, Rombach et al. 2022, eq. 25; the
    adversarial term is added by the training task, :mod:`synthgen.models.discriminator`).

    L1 on pixels in [-1, 1] plus ``kl_weight`` x KL(q(z|x) || N(0, I)) averaged per element, plus
    ``gradient_weight`` x L1 of image gradients and ``frequency_weight`` x L1 of log Fourier
    amplitudes (both penalise blur).

    Returns:
        The loss and its parts as floats (for logging); with ``return_images`` also
        ``parts["images"] = (target, reconstruction)`` in [-1, 1], the reconstruction with its graph.
    """
    from synthgen.models.discriminator import frequency_loss, gradient_loss

    x = to_model_range(images).to(vae.device, vae.dtype)
    dist = vae.model.encode(x).latent_dist
    recon = vae.model.decode(dist.sample(generator)).sample
    l1 = F.l1_loss(recon, x)
    kl = 0.5 * (dist.mean**2 + dist.var - 1.0 - dist.logvar).mean()
    loss = l1 + kl_weight * kl
    parts: dict = {"l1": float(l1.detach()), "kl": float(kl.detach())}
    if gradient_weight:
        g = gradient_loss(recon, x)
        loss = loss + gradient_weight * g
        parts["gradient"] = float(g.detach())
    if frequency_weight:
        f = frequency_loss(recon, x)
        loss = loss + frequency_weight * f
        parts["frequency"] = float(f.detach())
    if return_images:
        parts["images"] = (x, recon)
    return loss, parts


def laplacian_variance(images: torch.Tensor) -> torch.Tensor:
    """Sharpness of each image: the variance of the 3x3 Laplacian of its grey level in [0, 1].

    A blurred copy of an image scores lower; the ratio of reconstructions to originals says how
    much detail an autoencoder loses (1 = as sharp as the real tiles)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    return F.conv2d(grey, k).flatten(1).var(1)


@torch.no_grad()
def reconstruction_metrics(vae: VAE, images: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """PSNR (dB), SSIM and sharpness ratio (mean :func:`laplacian_variance` of the reconstructions
    over that of the originals) of ``decode(encode(images))`` against ``images`` (uint8)."""
    recons = []
    for i in range(0, len(images), batch_size):
        recons.append(to_uint8(vae.decode(vae.encode(images[i : i + batch_size]))).cpu())
    return image_agreement(torch.cat(recons), images.cpu())


def image_agreement(recon: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """PSNR (dB), SSIM and sharpness ratio of uint8 ``recon`` against uint8 ``images``."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    a, b = recon.float() / 255, images.float() / 255
    return {"psnr": float(peak_signal_noise_ratio(a, b, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(a, b, data_range=1.0)),
            "sharpness_ratio": float(laplacian_variance(a).mean() / laplacian_variance(b).mean().clamp_min(1e-12))}
