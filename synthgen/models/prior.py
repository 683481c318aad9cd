"""Embedding prior: a class-conditional rectified-flow MLP over the encoder's embedding space.

It lets a class be sampled with no reference image: draw an embedding of class c from the
prior, then decode it into an image with the embedding-conditioned denoiser. Training data is
the bank of real embeddings (the feature cache). The model owns the per-dimension
normalisation of the bank (``mean``/``std`` buffers, set by :meth:`fit_normalization`).

Flow matching (Liu et al. 2022; Lipman et al. 2023): x_t = (1 - t) x_0 + t e, the network
predicts v = e - x_0, and sampling integrates dx/dt = v from t = 1 (noise) to t = 0.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from synthgen.loading import StrictLoadMixin


def time_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class _ResBlock(nn.Module):
    def __init__(self, width: int, cond: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.mod = nn.Linear(cond, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h, c):
        scale, shift = self.mod(c).chunk(2, dim=-1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class EmbeddingPrior(StrictLoadMixin, ModelMixin, ConfigMixin):
    """p(embedding | class) as a flow-matching MLP.

    Args:
        num_tokens, dim: shape of one embedding (tokens x dim, flattened inside).
        num_classes: classes; label ``num_classes`` (or -1) is the unconditional class.
        width, depth: MLP size.
        class_names: names of the labels 0 .. num_classes - 1 (stored in the config), or None.
    """

    @register_to_config
    def __init__(self, num_tokens: int = 1, dim: int = 128, num_classes: int = 2, width: int = 512, depth: int = 4,
                 class_names: list[str] | None = None):
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        d = num_tokens * dim
        self.inp = nn.Linear(d, width)
        self.time = nn.Sequential(nn.Linear(128, width), nn.SiLU(), nn.Linear(width, width))
        self.classes = nn.Embedding(num_classes + 1, width)
        self.blocks = nn.ModuleList([_ResBlock(width, width) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))

    @torch.no_grad()
    def fit_normalization(self, bank: torch.Tensor) -> None:
        """Per-dimension mean and std of the real embeddings (N, tokens, dim)."""
        x = bank.reshape(len(bank), -1).float()
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-6))

    def normalize(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb.reshape(len(emb), -1).float() - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        return (x * self.std + self.mean).reshape(len(x), cfg.num_tokens, cfg.dim)

    def _labels(self, labels: torch.Tensor) -> torch.Tensor:
        n = self.config.num_classes
        labels = labels.long()
        return torch.where(labels < 0, n, labels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity for normalised, flattened embeddings ``x`` (B, D) at times ``t`` (B,) in [0, 1]."""
        c = self.time(time_features(t, 128)) + self.classes(self._labels(labels))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)

    def loss(self, emb: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
             drop_prob: float = 0.1, **cond) -> torch.Tensor:
        """Flow-matching loss on real embeddings (B, tokens, dim), with class dropout for guidance;
        ``cond``: extra inputs of ``forward`` (a subclass's conditions)."""
        x0 = self.normalize(emb)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t = torch.rand(len(x0), generator=generator).to(x0)
        drop = (torch.rand(len(x0), generator=generator) < drop_prob).to(x0.device)
        labels = torch.where(drop, -1, labels.to(x0.device).long())
        xt = (1 - t[:, None]) * x0 + t[:, None] * noise
        return F.mse_loss(self(xt, t, labels, **cond), noise - x0)

    @torch.no_grad()
    def sample(self, labels, generator: torch.Generator | None = None, num_steps: int = 50,
               guidance_scale: float = 1.0, **cond) -> torch.Tensor:
        """Embeddings (B, tokens, dim) for class ``labels`` (B,), by Euler integration from noise.

        ``generator``: one for the batch, or a list of one per item (then item i depends only on
        generator i, whatever else is in the batch)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from synthgen.sampling import sample_latents

        p = next(self.parameters())
        labels = torch.as_tensor(labels, dtype=torch.long, device=p.device).flatten()
        if (labels >= self.config.num_classes).any():
            raise ValueError(f"labels must be < num_classes={self.config.num_classes} (or -1 for any class)")
        if isinstance(generator, list | tuple):
            if len(generator) != len(labels):
                raise ValueError(f"{len(generator)} generators for {len(labels)} items")
        else:
            generator = [generator] * len(labels)  # one generator (or the global one) drawn item after item
        # Euler on t = 1, 1 - 1/N, ..., 0: the flow-matching scheduler with N training timesteps
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_steps, shift=1.0)
        x = sample_latents(_VelocityField(self, num_steps), scheduler, {"class_labels": labels, **cond},
                           list(generator), num_steps=num_steps, guidance_scale=guidance_scale, guide=["class_labels"])
        return self.denormalize(x.flatten(1))


class _VelocityField:
    """An :class:`EmbeddingPrior` as the sampling loop's model (:func:`synthgen.sampling.sample_latents`):
    a flattened embedding is a (D, 1, 1) latent, the loop's timestep (sigma times the scheduler's
    ``num_train_timesteps``) is the net's t in [0, 1], and the class label, null -1, is the guided
    condition; other conditions (a translator's source) stay in both guidance passes."""

    def __init__(self, net: EmbeddingPrior, num_train_timesteps: int):
        self.net, self.T = net, num_train_timesteps
        self.config = SimpleNamespace(in_channels=net.mean.numel(), sample_size=1)

    def parameters(self):
        return self.net.parameters()

    def null_conditions(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        return {"class_labels": torch.full((batch,), -1, dtype=torch.long, device=device)}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor, **cond) -> SimpleNamespace:
        v = self.net(x.flatten(1).float(), t.float() / self.T, class_labels, **cond)
        return SimpleNamespace(sample=v[:, :, None, None])
