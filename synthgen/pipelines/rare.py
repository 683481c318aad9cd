"""Rare-class synthesis: more patches of a class a dataset lacks, in three modes with one API.

- ``variations``: condition on embeddings of real patches of the class (optionally of
  augmented views of them): new images that share their content but are not copies;
- ``prior``: sample embeddings of the class from the :class:`~synthgen.models.prior.EmbeddingPrior`
  (no reference image needed);
- ``interpolation``: SMOTE-style mixing of two same-class embeddings (Chawla et al. 2002):
  e = e_i + u (e_j - e_i), with j among the k nearest same-class neighbours of i.

The selective filter re-encodes each generated image and keeps it only when its embedding is
closer to its own class than to any other class (nearest centroid in cosine distance), and
reports the acceptance rate. Given a fitted realism filter
(:class:`~synthgen.metrics.handcrafted.RealismFilter`: distance to the nearest real tile in
hand-crafted features, threshold calibrated on real tiles), it also rejects images that look
like no real tile, and reports how many it rejected for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from synthgen import seeding
from synthgen.config import SAMPLING

MODES = ("variations", "prior", "interpolation")


def interpolate_embeddings(bank: torch.Tensor, n: int, generator: torch.Generator, k: int = 5) -> torch.Tensor:
    """``n`` SMOTE mixtures of same-class embeddings ``bank`` (M, tokens, dim), M >= 2."""
    if len(bank) < 2:
        raise ValueError("interpolation needs at least 2 embeddings of the class")
    flat = F.normalize(bank.reshape(len(bank), -1).float(), dim=-1)
    sim = flat @ flat.T
    sim.fill_diagonal_(-float("inf"))
    k = min(k, len(bank) - 1)
    neighbours = sim.topk(k, dim=1).indices  # (M, k)
    i = torch.randint(0, len(bank), (n,), generator=generator)
    j = neighbours[i, torch.randint(0, k, (n,), generator=generator)]
    u = torch.rand(n, 1, 1, generator=generator)
    return bank[i] + u * (bank[j] - bank[i])


class ClassFilter:
    """Nearest-centroid check in cosine distance against the real embedding bank.

    Args:
        bank: real embeddings (N, tokens, dim); labels: (N,) class ids.
    """

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor):
        labels = torch.as_tensor(labels).long()
        self.classes = sorted(int(c) for c in labels.unique())
        flat = F.normalize(bank.reshape(len(bank), -1).float(), dim=-1)
        self.centroids = F.normalize(torch.stack([flat[labels == c].mean(0) for c in self.classes]), dim=-1)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        flat = F.normalize(embeddings.reshape(len(embeddings), -1).float(), dim=-1)
        idx = (flat @ self.centroids.to(flat.device).T).argmax(1)
        return torch.tensor(self.classes, device=flat.device)[idx]

    def accept(self, embeddings: torch.Tensor, labels) -> torch.Tensor:
        """Bool mask: generated embedding i is nearest to the centroid of labels[i]."""
        labels = torch.as_tensor(labels).long().to(embeddings.device).flatten()
        return self.predict(embeddings) == labels


@dataclass
class RareClassResult:
    images: list  # PIL images (all generated, accepted or not)
    labels: list[int]
    seeds: list[int]
    conditions: torch.Tensor  # the embeddings the images were generated from
    accepted: torch.Tensor  # bool (n,), all True when no filter ran; class check and realism check
    acceptance_rate: float
    mode: str
    realistic: torch.Tensor | None = None  # bool (n,) of the realism check, None when it did not run
    realism_scores: torch.Tensor | None = None  # distance to the nearest real reference tile
    realism_rejected: int = 0  # images failing the realism check

    def kept(self) -> list:
        return [im for im, ok in zip(self.images, self.accepted.tolist(), strict=True) if ok]


class RareClassSynthesizer:
    """Generate images of one class from an embedding-conditioned pipeline.

    Args:
        pipeline: a :class:`~synthgen.pipelines.generate.SynthPipeline` conditioned on embeddings.
        bank: real embeddings (N, tokens, dim) of the training patches; labels: (N,) class ids.
        prior: an :class:`~synthgen.models.prior.EmbeddingPrior` for ``mode="prior"``.
        image_encoder: encoder of generated images for the filter (default: the pipeline's).
        realism_filter: a fitted :class:`~synthgen.metrics.handcrafted.RealismFilter` (real
            reference tiles at the model's scale): the filter also rejects unrealistic images.
    """

    def __init__(self, pipeline, bank: torch.Tensor, labels, prior=None, image_encoder=None, realism_filter=None):
        self.pipe, self.bank = pipeline, bank.float()
        self.labels = torch.as_tensor(labels).long()
        self.prior, self.encoder = prior, image_encoder or pipeline.image_encoder
        self.filter = ClassFilter(self.bank, self.labels)
        if realism_filter is not None and getattr(realism_filter, "threshold", None) is None:
            raise ValueError("realism_filter must be fitted on real tiles first (RealismFilter().fit(images))")
        self.realism = realism_filter

    def conditions(self, label: int, n: int, mode: str, generator: torch.Generator,
                   augment_views: bool = False) -> torch.Tensor:
        """``n`` condition embeddings of class ``label``."""
        own = self.bank[self.labels == label]
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        if mode == "prior":
            if self.prior is None:
                raise ValueError("mode='prior' needs an EmbeddingPrior (prior=...)")
            return self.prior.sample(torch.full((n,), label), generator=generator).cpu()
        if len(own) == 0:
            raise ValueError(f"class {label} has no real embeddings in the bank; use mode='prior'")
        if mode == "interpolation":
            return interpolate_embeddings(own, n, generator)
        return own[torch.randint(0, len(own), (n,), generator=generator)]

    def generate(self, label: int, n: int, mode: str = "variations", seed: int = 0, guidance_scale: float = SAMPLING.guidance,
                 num_inference_steps: int = SAMPLING.steps, filter: bool = True, batch_size: int = 32,
                 reference_images: Sequence | None = None) -> RareClassResult:
        """Make ``n`` images of class ``label``.

        Args:
            mode: ``variations``, ``prior`` or ``interpolation``.
            seed: derives the condition draws and the image seeds (:func:`synthgen.seeding.item_seeds`).
            filter: re-encode the images and flag those not nearest to their class, and (with a
                ``realism_filter``) those far from every real reference tile.
            reference_images: for ``variations`` from images instead of the bank: their
                embeddings (through the pipeline's encoder) are the conditions.
        """
        g = seeding.generator(seed)
        seeds = seeding.item_seeds(seed, n)
        if reference_images is not None:
            refs = self.pipe.encode_images(reference_images).cpu()
            conds = refs[torch.randint(0, len(refs), (n,), generator=g)]
        else:  # a prior draws each item's embedding from that item's seed (independent of n)
            conds = self.conditions(label, n, mode, seeding.generators(seeds, seeding.PRIOR) if mode == "prior" else g)
        out = self.pipe(embeddings=conds, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                        seeds=seeds, batch_size=batch_size, output_type="pt")
        accepted = torch.ones(n, dtype=torch.bool)
        if filter:
            if self.encoder is None:
                raise ValueError("filter=True needs an image encoder (the pipeline's or image_encoder=)")
            with torch.no_grad():
                emb = torch.cat([self.encoder(out.images[i : i + batch_size]).cpu() for i in range(0, n, batch_size)])
            accepted = self.filter.accept(emb, [label] * n).cpu()
        realistic = scores = None
        if filter and self.realism is not None:
            scores = torch.as_tensor(self.realism.scores(out.images), dtype=torch.float32)
            realistic = scores <= self.realism.threshold
            accepted = accepted & realistic
        images = self.pipe.numpy_to_pil(out.images.permute(0, 2, 3, 1).numpy())
        return RareClassResult(images, [label] * n, seeds, conds, accepted, float(accepted.float().mean()), mode,
                               realistic, scores, 0 if realistic is None else int((~realistic).sum()))
