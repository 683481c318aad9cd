"""Embedding translator for virtual staining: p(IHC embedding | H&E embedding, stain).

PixCell's route to virtual IHC: encode the H&E tile with the image encoder, translate its
embedding into the embedding the matching IHC tile would have, and decode that with a denoiser
adapted to IHC images. The translator here is the embedding prior's rectified-flow MLP with one
more condition: the (normalised) source embedding, added to the time and stain conditioning of
every residual block. Stain dropout during training gives a stain-agnostic translation used for
guidance, as class dropout does for the prior.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from synthgen.models.prior import EmbeddingPrior, time_features


class StainTranslator(EmbeddingPrior):
    """Conditional flow from H&E embeddings to IHC embeddings, one label per target stain.

    Args:
        num_tokens, dim: embedding shape (the same encoder embeds both stains).
        num_classes: number of target stains; ``class_names`` their canonical names
            (see :func:`synthgen.data.pairs.resolve_stain`).
        width, depth: MLP size.
    """

    @register_to_config
    def __init__(self, num_tokens: int = 1, dim: int = 128, num_classes: int = 1, width: int = 512, depth: int = 4,
                 class_names: list[str] | None = None):
        super().__init__(num_tokens=num_tokens, dim=dim, num_classes=num_classes, width=width, depth=depth,
                         class_names=class_names)
        d = num_tokens * dim
        self.source = nn.Sequential(nn.Linear(d, width), nn.SiLU(), nn.Linear(width, width))
        self.register_buffer("source_mean", torch.zeros(d))
        self.register_buffer("source_std", torch.ones(d))

    @torch.no_grad()
    def fit_normalization(self, bank: torch.Tensor, source_bank: torch.Tensor | None = None) -> None:
        """Per-dimension statistics of the target (IHC) and source (H&E) embeddings."""
        super().fit_normalization(bank)
        if source_bank is not None:
            x = source_bank.reshape(len(source_bank), -1).float()
            self.source_mean.copy_(x.mean(0))
            self.source_std.copy_(x.std(0).clamp_min(1e-6))

    def stain_ids(self, stains) -> torch.Tensor:
        """Stain names or ids -> label tensor."""
        if isinstance(stains, str):
            stains = [stains]
        names = self.config.class_names or []
        out = []
        for s in stains:
            if isinstance(s, str):
                from synthgen.stains import resolve_stain

                key = resolve_stain(s)
                if key not in names:
                    raise ValueError(f"this translator knows {', '.join(names) or 'no named stains'}; "
                                     f"it was not trained for {key!r}")
                out.append(names.index(key))
            else:
                out.append(int(s))
        return torch.tensor(out, dtype=torch.long)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                source: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for normalised flattened target embeddings ``x`` given ``source`` (B, tokens, dim)."""
        if source is None:
            raise ValueError("StainTranslator needs the source (H&E) embeddings")
        s = (source.reshape(len(source), -1).float() - self.source_mean) / self.source_std
        c = self.time(time_features(t, 128)) + self.classes(self._labels(labels)) + self.source(s)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)

    def loss(self, emb: torch.Tensor, labels: torch.Tensor, generator: torch.Generator, drop_prob: float = 0.1,
             source: torch.Tensor | None = None) -> torch.Tensor:
        """Flow-matching loss on paired (source, target) embeddings, with stain dropout."""
        return super().loss(emb, labels, generator, drop_prob, source=source)

    @torch.no_grad()
    def translate(self, source: torch.Tensor, stains, generator=None,
                  num_steps: int = 50, guidance_scale: float = 1.0) -> torch.Tensor:
        """IHC embeddings (B, tokens, dim) for H&E embeddings ``source`` and target ``stains``
        (a name, or one name/id per sample); ``generator``: one, or a list of one per sample."""
        p = next(self.parameters())
        source = torch.as_tensor(source, dtype=torch.float32, device=p.device)
        source = source[:, None] if source.ndim == 2 else source
        labels = self.stain_ids(stains).to(p.device)
        labels = labels.expand(len(source)) if len(labels) == 1 else labels
        if len(labels) != len(source):
            raise ValueError(f"{len(labels)} stains for {len(source)} source embeddings")
        return super().sample(labels, generator, num_steps, guidance_scale, source=source)
