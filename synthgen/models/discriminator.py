"""A patch discriminator and the losses that make an autoencoder's reconstructions sharp.

An L1-trained autoencoder averages over the details it cannot place exactly, so its
reconstructions are blurry. Latent-diffusion autoencoders (Esser et al. 2021, "Taming
Transformers", sec. 3.2; Rombach et al. 2022, appendix G) add a patch-based adversarial loss
after a warm-up; with no downloadable perceptual network here (no LPIPS weights), we add two
weight-free terms instead: an L1 on image gradients and an L1 on Fourier amplitudes, both of
which penalise missing high frequencies directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix): a conv net scoring overlapping patches as real or not.

    Args:
        in_channels: image channels.
        width: channels of the first layer (doubled at each downsampling, capped at 8x).
        num_layers: stride-2 layers; the receptive field is 34 px for 2, 70 px for 3.
    """

    def __init__(self, in_channels: int = 3, width: int = 32, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, num_layers):
            nxt = width * min(2**i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, 2, 1), nn.GroupNorm(min(8, nxt), nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        layers += [nn.Conv2d(ch, ch, 4, 1, 1), nn.GroupNorm(min(8, ch), ch), nn.LeakyReLU(0.2),
                   nn.Conv2d(ch, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, H, W) -> patch logits (B, 1, h, w)."""
        return self.net(images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): mean(relu(1 - D(x))) + mean(relu(1 + D(G(z))))."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_adversarial_loss(discriminator: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    """-mean(D(fake)), with the discriminator's parameters held fixed.

    The gradient reaches ``fake`` (the generator) but not the discriminator, so one backward pass
    can train both players (the discriminator through :func:`hinge_d_loss` on detached fakes).
    """
    from torch.func import functional_call

    frozen = {k: v.detach() for k, v in discriminator.named_parameters()}
    frozen.update(dict(discriminator.named_buffers()))
    return -functional_call(discriminator, frozen, (fake,)).mean()


def gradient_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences of two image batches."""
    def grads(x):
        return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]

    (rx, ry), (tx, ty) = grads(recon), grads(target)
    return F.l1_loss(rx, tx) + F.l1_loss(ry, ty)


def frequency_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the log Fourier amplitudes of two image batches (orthonormal 2-D FFT).

    The log keeps the weak high frequencies, where blur shows, from being drowned by the DC term.
    """
    fr = torch.fft.rfft2(recon.float(), norm="ortho").abs()
    ft = torch.fft.rfft2(target.float(), norm="ortho").abs()
    return F.l1_loss(torch.log1p(fr), torch.log1p(ft))
