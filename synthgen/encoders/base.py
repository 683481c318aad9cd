"""The image-encoder protocol: images in, embedding tokens (N, tokens, dim) out.

An encoder owns its preprocessing (crop grid, resize, normalisation), so callers always pass
plain images: uint8 (B, 3, H, W) in [0, 255] or float in [0, 1]. Already-normalised input is
refused rather than normalised twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float input must already be in [0, 1].

    Raises:
        ValueError: float input outside [0, 1] (for example already normalised).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float, got {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"float images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; pass raw images "
            "(uint8 or [0, 1] floats): the encoder applies its own normalisation"
        )
    return images


def grid_crops(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Split (B, C, H, W) into grid x grid crops, row-major: (B * grid^2, C, H/grid, W/grid)."""
    if grid == 1:
        return images
    B, C, H, W = images.shape
    if H % grid or W % grid:
        raise ValueError(f"image size {H}x{W} is not divisible into a {grid}x{grid} grid of crops")
    h, w = H // grid, W // grid
    crops = images.view(B, C, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5)
    return crops.reshape(B * grid * grid, C, h, w)


class ImageEncoder(nn.Module):
    """Base class: subclasses set ``input_size``, ``mean``, ``std``, ``dim`` and implement
    :meth:`embed` on preprocessed input.

    Args:
        grid: encode a grid x grid set of crops of each image, one token per crop (PixCell-1024
            encodes 1024 px patches as 4x4 crops of 256 px: ``grid=4``, 16 tokens).
    """

    input_size: int = 224
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    dim: int

    def __init__(self, grid: int = 1):
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.grid = grid

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images -> the backbone's normalised input (B * grid^2, 3, S, S)."""
        x = grid_crops(to_unit_range(images), self.grid)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (M, 3, S, S) -> embeddings (M, dim)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Raw images (B, 3, H, W) -> embedding tokens (B, grid^2, dim)."""
        B = images.shape[0]
        x = self.preprocess(images)
        p = next(self.parameters(), None)
        if p is not None:
            x = x.to(p.device, p.dtype)
        return self.embed(x).reshape(B, self.num_tokens, -1)
