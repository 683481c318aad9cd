"""``SynthTransform``: an image transform that swaps an image for a synthetic variation of itself.

Where :class:`~synthgen.augment.SynthAugment` adds synthetic items to a dataset, this is a
transform in the torchvision / albumentations sense: with probability ``p`` the image it is
given comes back as a synthetic variation of itself (anchored at ``strength``: low values keep
its layout, 1 keeps only its embedding's content), otherwise unchanged. It composes inside
``torchvision.transforms.v2.Compose`` like any callable, and :meth:`SynthTransform.albumentations`
wraps it as an albumentations ``ImageOnlyTransform``.

Randomness follows torchvision's random transforms: the coin flip and the noise seed of each call
are drawn from torch's default generator (mixed with the transform's ``seed``). PyTorch seeds that
generator in every DataLoader worker from the loader's ``generator=`` (or the global seed) and the
worker id, so a run is reproducible from ``torch.manual_seed`` / the loader's generator, workers
do not repeat each other, and each epoch draws afresh.

One image per call costs one pipeline call; for speed, apply it to a whole batch (a uint8
``(B, 3, H, W)`` tensor, e.g. after collation in the training loop): the chosen images go
through the pipeline together.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from synthgen.config import SAMPLING
from synthgen.errors import SynthgenError


class SynthTransform:
    """Replace an image by a synthetic variation of itself with probability ``p``.

    Args:
        generator: a pipeline folder or a loaded :class:`~synthgen.pipelines.generate.SynthPipeline`
            (wrapped as a variation :class:`~synthgen.augment.PipelineGenerator`), or any callable
            ``(labels, reference_images uint8 (B, 3, H, W), seeds) -> uint8 (B, 3, H, W)``
            such as a ready ``PipelineGenerator`` (which then owns its own settings).
        p: probability that an image is replaced.
        strength: anchoring of the variation (SDEdit, see ``SynthPipeline``'s ``strength``);
            only with a pipeline as ``generator``. Default 0.5.
        guidance_scale, num_inference_steps: sampling settings, with a pipeline as ``generator``
            (steps: see ``PipelineGenerator``).
        seed: separates the random streams of transforms that would otherwise share them.

    Images may be PIL images, uint8 or [0, 1] float tensors (3, H, W) or (B, 3, H, W), or HWC uint8
    arrays; they come back in the same type and size. Images of another size than the model's
    are resized to it for generation and back, so give tiles at the model's scale (its mpp).

    Raises:
        SynthgenError: ``p`` outside [0, 1], ``strength`` outside (0, 1] or given with a ready
            generator, an unsupported image type.
    """

    def __init__(self, generator, p: float = 0.5, strength: float | None = None, guidance_scale: float = SAMPLING.guidance,
                 num_inference_steps: int | None = None, seed: int = 0):
        if not 0 <= p <= 1:
            raise SynthgenError(f"SynthTransform: p must be in [0, 1], got {p}")
        if _is_pipeline(generator):
            from synthgen.augment.synth_augment import PipelineGenerator

            generator = PipelineGenerator(generator, mode="variations", guidance_scale=guidance_scale,
                                          num_inference_steps=num_inference_steps,
                                          strength=0.5 if strength is None else strength)
        elif strength is not None:
            raise SynthgenError("SynthTransform: strength= applies when generator is a pipeline; a ready "
                                "generator keeps its own (PipelineGenerator(..., strength=))")
        elif not callable(generator):
            raise SynthgenError(f"SynthTransform: generator must be a pipeline folder, a SynthPipeline or a callable, "
                                f"got {type(generator).__name__}")
        self.generator: Callable = generator
        self.p, self.seed = float(p), int(seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, seed={self.seed}, generator={self.generator!r})"

    def draw(self, n: int) -> tuple[list[bool], list[int]]:
        """The next ``n`` coin flips and noise seeds, from torch's default generator (as
        torchvision's random transforms draw) mixed with this transform's ``seed``."""
        chosen = (torch.rand(n) < self.p).tolist()
        raw = torch.randint(0, 2**62, (n,)).tolist()
        seeds = [int(np.random.SeedSequence([self.seed, r]).generate_state(2, np.uint64)[0] >> 2) for r in raw]
        return chosen, seeds

    def __call__(self, image):
        from synthgen.augment.images import as_uint8, like

        batched = isinstance(image, torch.Tensor) and image.ndim == 4
        items = list(image) if batched else [image]
        chosen, seeds = self.draw(len(items))
        picked = [i for i, c in enumerate(chosen) if c]
        if not picked:
            return image
        refs = [as_uint8(items[i]) for i in picked]
        for r in refs:
            if r.ndim != 3 or r.shape[0] != 3:
                raise SynthgenError(f"SynthTransform: expected RGB images (3, H, W), got shape {tuple(r.shape)}")
        size = getattr(self.generator, "image_size", None)
        sizes = [tuple(r.shape[-2:]) for r in refs]
        batch = torch.stack([_resize(r, (size, size)) if size else r for r in refs])
        out = self.generator([-1] * len(refs), batch, [seeds[i] for i in picked])
        for k, i in enumerate(picked):
            img = _resize(out[k], sizes[k])
            items[i] = like(items[i], img)
        if batched:
            return torch.stack(items).as_subclass(type(image))
        res = items[0]
        if isinstance(image, torch.Tensor) and type(image) is not torch.Tensor:
            res = res.as_subclass(type(image))  # torchvision tv_tensors.Image stays an Image
        return res

    def albumentations(self):
        """This transform as an albumentations ``ImageOnlyTransform`` (HWC uint8 numpy images).

        Albumentations draws whether to apply it (its ``p``, set to this transform's); the noise
        seed comes from albumentations' own seeded generator, so ``A.Compose(..., seed=)``
        makes it reproducible.
        """
        try:
            import albumentations as A
        except ImportError as e:
            raise SynthgenError("SynthTransform.albumentations() needs albumentations: "
                                "pip install 'synthgen[albumentations]'") from e
        synth = self

        class _AlbuSynth(A.ImageOnlyTransform):
            def __init__(self, p: float):
                super().__init__(p=p)

            def get_params_dependent_on_data(self, params, data):
                return {"noise_seed": int(self.random_generator.integers(0, 2**62))}

            def apply(self, img, noise_seed: int = 0, **params):
                if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                    raise SynthgenError(f"SynthTransform (albumentations): expected HWC uint8 RGB, got {img.dtype} "
                                        f"{img.shape}")
                ref = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
                size = getattr(synth.generator, "image_size", None)
                out = synth.generator([-1], (_resize(ref, (size, size)) if size else ref)[None], [noise_seed])[0]
                return _resize(out, tuple(ref.shape[-2:])).permute(1, 2, 0).numpy()

        return _AlbuSynth(p=self.p)


def _is_pipeline(obj) -> bool:
    if isinstance(obj, str | os.PathLike):
        return True
    from synthgen.pipelines.generate import SynthPipeline

    return isinstance(obj, SynthPipeline)


def _resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) to ``size``, antialiased; unchanged when already that size."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)
