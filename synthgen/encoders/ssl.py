"""The embedded default image encoder: a small residual CNN trained by the project with a
self-supervised objective (SimCLR, Chen et al. 2020) on real H&E tiles.

It stands in for UNI-style foundation models on machines without them: same protocol
(images -> (B, tokens, dim)), same role as the denoiser's condition. The weights shipped in
``checkpoints/`` are trained with :func:`simclr_loss` on tiles of the bundled slides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from synthgen.encoders.base import ImageEncoder, to_unit_range
from synthgen.models.loading import StrictLoadMixin


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class _Block(nn.Module):
    """Pre-activation residual block (He et al. 2016) with GroupNorm, optional stride-2."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return h + self.skip(x)


class SSLEncoder(StrictLoadMixin, ImageEncoder, ModelMixin, ConfigMixin):
    """Small residual CNN image encoder with a SimCLR projection head.

    Args:
        input_size: side of the (resized) input in pixels.
        width: channels of the first stage (doubling at each of 4 stages).
        dim: embedding size (output of the pooled backbone).
        proj_dim: size of the projection used only by the SSL loss.
        grid: crops per side, one token each.
    """

    @register_to_config
    def __init__(self, input_size: int = 128, width: int = 32, dim: int = 256, proj_dim: int = 128, grid: int = 1):
        super().__init__(grid=grid)
        self.input_size, self.dim = input_size, dim
        w = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Conv2d(3, w[0], 3, 2, 1)
        self.stages = nn.Sequential(*[_Block(w[max(i - 1, 0)], w[i], 1 if i == 0 else 2) for i in range(4)])
        self.head = nn.Sequential(_norm(w[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w[-1], dim))
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, proj_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def augment_views(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random view of each image, float in [0, 1], same size: crop (35-100% of the area),
    flips, 90-degree rotations, brightness/contrast/saturation and per-channel stain jitter."""
    x = to_unit_range(images)
    B, _, H, W = x.shape
    dev = x.device

    def u(*shape):
        return torch.rand(*shape, generator=generator, device="cpu").to(dev)

    out = torch.empty_like(x)
    area, rot, flip = u(B) * 0.65 + 0.35, torch.randint(0, 4, (B,), generator=generator), u(B) < 0.5
    for i in range(B):
        side = max(8, int(round(H * float(area[i]) ** 0.5)))
        top = int(torch.randint(0, H - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - side + 1, (1,), generator=generator))
        crop = x[i : i + 1, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=(H, W), mode="bilinear", antialias=True, align_corners=False)[0]
        crop = torch.rot90(crop, int(rot[i]), dims=(1, 2))
        out[i] = crop.flip(2) if flip[i] else crop
    gray = out.mean(1, keepdim=True)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - gray) * (1 + 0.4 * (u(B, 1, 1, 1) - 0.5)) + gray  # saturation
    out = (out - mean) * (1 + 0.4 * (u(B, 1, 1, 1) - 0.5)) + mean  # contrast
    out = out * (1 + 0.16 * (u(B, 3, 1, 1) - 0.5)) + 0.2 * (u(B, 1, 1, 1) - 0.5)  # stain + brightness
    return out.clamp(0, 1)


def simclr_loss(encoder: SSLEncoder, images: torch.Tensor, temperature: float = 0.2,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """NT-Xent loss on two augmented views of each image (SimCLR, eq. 1).

    Each view must pick its partner out of the 2B - 1 other views in the batch.
    """
    v1, v2 = augment_views(images, generator), augment_views(images, generator)
    z = encoder.projector(encoder.embed(encoder.preprocess(torch.cat([v1, v2]))))
    z = F.normalize(z, dim=-1)
    sim = z @ z.T / temperature
    n = len(images)
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, target)
