"""Deterministic tiny encoders for cache tests (importable as factories by `synthgen cache`)."""

import os
import time

import torch
import torch.nn.functional as F


def pooled_latents():
    """'VAE-like': average-pool to 1/8 resolution, 3 channels, scaled to [-1, 1]."""
    def enc(images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images.float() / 127.5 - 1, 8)
    return enc


def color_tokens():
    """'Embedding-like': 4 tokens (2x2 grid) of 8 colour statistics each (RGB + gray mean and std)."""
    def enc(images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        x = torch.cat([x, x.mean(1, keepdim=True)], 1)
        grid = F.adaptive_avg_pool2d(x, 2).flatten(2).transpose(1, 2)  # (B, 4, 4)
        sq = F.adaptive_avg_pool2d(x * x, 2).flatten(2).transpose(1, 2)
        return torch.cat([grid, (sq - grid**2).clamp_min(0).sqrt()], -1)
    return enc


def slow_color_tokens():
    """color_tokens that sleeps per batch, so a test can kill the run midway."""
    delay = float(os.environ.get("SYNTHGEN_TEST_DELAY", "0.2"))
    inner = color_tokens()

    def enc(images):
        time.sleep(delay)
        return inner(images)
    return enc


def nan_tokens():
    """Returns NaN for the third image of each batch."""
    inner = color_tokens()

    def enc(images):
        out = inner(images)
        if len(out) > 2:
            out[2] = float("nan")
        return out
    return enc
