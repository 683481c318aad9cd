"""Where every seed synthgen derives comes from.

One job seed gives each generated item its own seed (:func:`item_seeds`); an item's image is a
function of its seed alone, so any image regenerates from the seed in its manifest row, whatever
else was in the batch. Draws other than the image noise (a prior's embedding, a translated
embedding, an augmentation's choices) use :func:`derived` streams of the same seed, so they never
repeat the image noise's numbers. Library code never seeds torch's global generator.

>>> item_seeds(5, 3)
[5000000, 5000001, 5000002]
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

ITEM_STRIDE = 1_000_000  # item i of a job with seed s has seed s * ITEM_STRIDE + i

# named streams of one seed (the second key of derived())
PRIOR = 1  # an embedding prior's draw for an item
TRANSLATE = 2  # a stain translator's draw for an item
AUGMENT = 3  # SynthAugment's per-dataset choices


def item_seeds(seed: int, n: int, start: int = 0) -> list[int]:
    """Seeds of items ``start .. start + n - 1`` of a job with seed ``seed``."""
    return [int(seed) * ITEM_STRIDE + i for i in range(start, start + n)]


def derived(seed: int, stream: int, *more: int) -> int:
    """A seed for another stream of draws of ``seed`` (independent of it and of other streams;
    numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(seed), int(stream), *map(int, more)]).generate_state(1)[0])


def generator(seed: int, device=None) -> torch.Generator:
    """A torch generator seeded with ``seed``."""
    return torch.Generator(device=device or "cpu").manual_seed(int(seed))


def generators(seeds: Iterable[int], stream: int | None = None, device=None) -> list[torch.Generator]:
    """One generator per item seed (on stream ``stream`` of each, when given): a batch drawn with
    them gives each item what it would get alone."""
    return [generator(s if stream is None else derived(s, stream), device) for s in seeds]


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The random source of one optimisation step on one rank (noise, timesteps, dropout)."""
    return generator((int(seed) * 1_000_003 + int(step)) * 1_009 + int(rank))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The data order of one training epoch."""
    return generator(int(seed) + int(epoch))
