"""SynthTransform: a synthetic-variation transform for torchvision / albumentations pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from synthgen.augment import SynthTransform
from synthgen.data.slides import Slide
from synthgen.errors import SynthgenError


class SeedPainter:
    """A cheap generator: paints each image with its noise seed (so outputs show the seeds drawn)."""

    image_size = 64

    def __call__(self, labels, refs, seeds):
        assert refs.dtype == torch.uint8 and refs.shape[1:] == (3, 64, 64)
        out = torch.empty_like(refs)
        for k, s in enumerate(seeds):
            out[k] = torch.tensor([s % 251, (s >> 8) % 251, (s >> 16) % 251], dtype=torch.uint8)[:, None, None]
        return out


class Tiles(Dataset):
    def __init__(self, transform, n=16):
        self.t, self.n = transform, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.t(torch.full((3, 64, 64), 7, dtype=torch.uint8))


def _epoch(transform, seed, workers=2):
    loader = DataLoader(Tiles(transform), batch_size=4, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    return torch.cat(list(loader))


@pytest.fixture(scope="module")
def tiles(cmu):
    """Four 64 px tissue tiles of the bundled slide at 1 um/px (the shipped model's scale)."""
    with Slide(cmu) as s:
        return np.stack([s.read(x, 1200, 64, 1.0) for x in (1500, 1600, 1700, 1800)])


def test_probability_and_types():
    img = torch.full((3, 64, 64), 7, dtype=torch.uint8)
    assert SynthTransform(SeedPainter(), p=0.0)(img) is img
    t = SynthTransform(SeedPainter(), p=1.0)
    for x in (img, img.float() / 255, Image.fromarray(img.permute(1, 2, 0).numpy()), img.permute(1, 2, 0).numpy()):
        y = t(x)
        assert type(y) is type(x)
        back = np.asarray(y) if not isinstance(y, torch.Tensor) else y
        assert not np.array_equal(np.asarray(back, dtype=float).ravel()[:3], np.asarray(x, dtype=float).ravel()[:3])
    big = torch.full((3, 96, 80), 7, dtype=torch.uint8)  # resized to the model's size and back
    assert t(big).shape == (3, 96, 80)
    half = SynthTransform(SeedPainter(), p=0.5)
    changed = [bool((half(img) != img).any()) for _ in range(400)]
    assert 0.4 < np.mean(changed) < 0.6


def test_batch_goes_through_the_generator_once():
    calls = []

    class Counting(SeedPainter):
        def __call__(self, labels, refs, seeds):
            calls.append(len(seeds))
            return super().__call__(labels, refs, seeds)

    x = torch.full((8, 3, 64, 64), 7, dtype=torch.uint8)
    y = SynthTransform(Counting(), p=1.0)(x)
    assert y.shape == x.shape and calls == [8]
    assert len({tuple(y[i, :, 0, 0].tolist()) for i in range(8)}) == 8  # every image its own seed


def test_reproducible_in_dataloader_workers():
    t = SynthTransform(SeedPainter(), p=0.5)
    a, b = _epoch(t, seed=0), _epoch(t, seed=0)
    assert torch.equal(a, b)
    # the two workers (batches 0 and 1) draw different streams, and another loader seed differs
    assert not torch.equal(a[:4], a[4:8])
    assert not torch.equal(a, _epoch(t, seed=1))
    # the transform's own seed separates two transforms' streams under the same loader seed
    assert not torch.equal(a, _epoch(SynthTransform(SeedPainter(), p=0.5, seed=1), seed=0))
    # reseeding torch in the main process restarts the stream there too
    torch.manual_seed(5)
    first = [t(torch.zeros(3, 64, 64, dtype=torch.uint8)) for _ in range(4)]
    torch.manual_seed(5)
    again = [t(torch.zeros(3, 64, 64, dtype=torch.uint8)) for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(first, again, strict=True))


def test_inside_torchvision_compose():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.ToImage(), SynthTransform(SeedPainter(), p=1.0), v2.RandomHorizontalFlip(),
                           v2.ToDtype(torch.float32, scale=True)])
    out = pipeline(Image.new("RGB", (64, 64), (7, 7, 7)))
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float32 and out.shape == (3, 64, 64)
    assert out.max() > 7 / 255 + 1e-6 or out.min() < 7 / 255 - 1e-6


def test_albumentations_seeded():
    A = pytest.importorskip("albumentations", reason="albumentations not installed (pip install 'synthgen[albumentations]')")

    def run(seed):
        aug = A.Compose([SynthTransform(SeedPainter(), p=1.0).albumentations(), A.HorizontalFlip(p=0.5)], seed=seed)
        return [aug(image=np.full((64, 64, 3), 7, np.uint8))["image"] for _ in range(3)]

    a, b, c = run(3), run(3), run(4)
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    assert not np.array_equal(a[0], a[1])


def test_errors():
    with pytest.raises(SynthgenError, match="p must be"):
        SynthTransform(SeedPainter(), p=1.5)
    with pytest.raises(SynthgenError, match="strength= applies"):
        SynthTransform(SeedPainter(), strength=0.3)
    with pytest.raises(SynthgenError, match="generator must be"):
        SynthTransform(42)
    with pytest.raises(SynthgenError, match="unsupported image type"):
        SynthTransform(SeedPainter(), p=1.0)("not an image")


def test_shipped_pipeline_anchored_variation(small_pipe, tiles):
    """On the shipped model: outputs are new images, and low strength keeps them nearer their source."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()

    def dist(strength):
        torch.manual_seed(0)
        y = SynthTransform(small_pipe, p=1.0, strength=strength)(x)
        assert y.shape == x.shape and y.dtype == torch.uint8
        return (y.float() - x.float()).abs().mean().item()

    low, high = dist(0.3), dist(1.0)
    assert low > 1.0  # not the input back
    assert low < 0.8 * high, (low, high)
