"""On-the-fly synthetic augmentation for any map-style dataset of (image, label[, ...]).

``SynthAugment(dataset, generator, policy)`` is a dataset of the real items followed by
synthetic items: for class c it adds ``round(n_c * ratio_c)`` synthetic samples, so rare classes
get synthetic company while common ones stay real. Synthetic item k is fully determined by the
seed and k (its class, the real sample it varies, its noise seed), so a run is reproducible
whatever the number of DataLoader workers.

Generation is batched: DataLoader workers fetch a whole batch through ``__getitems__``, and all
synthetic items of that batch go through the pipeline in one call; with ``num_workers > 0`` and
the loader's prefetching, generation runs ahead of the training step. The pipeline is loaded
once per process, lazily.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from synthgen.errors import SynthgenError


@dataclass(frozen=True)
class SynthPolicy:
    """How many synthetic samples each class gets: ``ratios[c]`` synthetic per real sample.

    Build with :meth:`balance` from the class counts, or give ratios directly.
    """

    ratios: Mapping[int, float] = field(default_factory=dict)

    @classmethod
    def balance(cls, labels: Sequence[int], max_ratio: float = 3.0) -> SynthPolicy:
        """Top every class up towards the largest one, with at most ``max_ratio`` synthetic per
        real sample (1:3 for the rarest by default) and none for the largest class."""
        counts = Counter(int(v) for v in labels)
        top = max(counts.values())
        return cls({c: float(min(max_ratio, top / n - 1)) for c, n in sorted(counts.items())})

    def extra(self, counts: Mapping[int, int]) -> dict[int, int]:
        return {c: int(round(counts.get(c, 0) * r)) for c, r in self.ratios.items() if counts.get(c, 0)}


class PipelineGenerator:
    """Makes synthetic images with a :class:`~synthgen.pipelines.generate.SynthPipeline`, loaded
    once per process (workers load their own copy on first use).

    Args:
        pipeline: a pipeline folder (or a loaded pipeline, for ``num_workers=0``).
        mode: ``variation`` (embedding of the real sample; needs the pipeline's image encoder)
            or ``class`` (a class-conditional model; the label is the condition).
        guidance_scale, num_inference_steps: sampling settings.
    """

    def __init__(self, pipeline, mode: str = "variation", guidance_scale: float = 2.0, num_inference_steps: int = 8):
        if mode not in ("variation", "class"):
            raise ValueError(f"mode must be 'variation' or 'class', got {mode!r}")
        self.source, self.mode = pipeline, mode
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self._pipe, self._pid = None, None

    def _pipeline(self):
        if self._pipe is None or self._pid != os.getpid():
            from synthgen.pipelines.generate import SynthPipeline

            src = self.source
            self._pipe = SynthPipeline.from_pretrained(src) if isinstance(src, (str, os.PathLike)) else src
            self._pipe.set_progress_bar_config(disable=True)
            self._pid = os.getpid()
        return self._pipe

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.source, (str, os.PathLike)):
            state["_pipe"] = None  # each worker loads its own
        return state

    def __call__(self, labels: list[int], references: torch.Tensor | None, seeds: list[int]) -> torch.Tensor:
        """uint8 (B, 3, H, W) synthetic images for the given labels / reference images / seeds."""
        pipe = self._pipeline()
        kw = {"class_labels": labels} if self.mode == "class" else {"images": references}
        if self.mode == "variation" and pipe.transformer.config.num_classes:
            kw["class_labels"] = labels
        with torch.no_grad():
            return pipe(**kw, seeds=seeds, guidance_scale=self.guidance_scale,
                        num_inference_steps=self.num_inference_steps, output_type="pt").images


class SynthAugment(Dataset):
    """Real items of ``dataset`` followed by synthetic items of the classes the policy names.

    Args:
        dataset: map-style dataset returning ``(image, label)``, ``(image, label, mask)`` or a
            dict with ``image`` and ``label``. Images: uint8 tensors (3, H, W), float tensors
            in [0, 1], or PIL images; synthetic items come back in the same type.
        generator: callable ``(labels, reference_images, seeds) -> uint8 (B, 3, H, W)``, e.g.
            :class:`PipelineGenerator`.
        policy: :class:`SynthPolicy` (default: :meth:`SynthPolicy.balance` of the labels).
        labels: the dataset's labels, if known (saves one pass over the dataset).
        seed: fixes which real samples are varied and the noise of every synthetic item.

    Each item carries whether it is synthetic: a 3rd tuple element, or ``"synthetic"`` in dicts.

    Raises:
        SynthgenError: items of an unexpected type, labels that are not class ids, or items with
            masks (mask-guided synthesis needs the mask-conditioned model, not available yet).
    """

    def __init__(self, dataset: Dataset, generator: Callable, policy: SynthPolicy | None = None,
                 labels: Sequence[int] | None = None, seed: int = 0):
        self.dataset, self.generator, self.seed = dataset, generator, seed
        first = self._raw(0)
        if (isinstance(first, Mapping) and "mask" in first) or (not isinstance(first, Mapping) and len(first) == 3):
            raise SynthgenError("SynthAugment: the dataset returns masks; mask-guided synthetic samples need the "
                                "mask-conditioned model, which synthgen does not provide yet")
        self.labels = [int(v) for v in (labels if labels is not None else (self._label(i) for i in range(len(dataset))))]
        self.policy = policy or SynthPolicy.balance(self.labels)
        counts = Counter(self.labels)
        extra = self.policy.extra(counts)
        g = torch.Generator().manual_seed(seed)
        members = {c: [i for i, v in enumerate(self.labels) if v == c] for c in extra}
        self.synthetic: list[tuple[int, int, int]] = []  # (label, real index varied, noise seed)
        for c in sorted(extra):
            picks = torch.randint(0, len(members[c]), (extra[c],), generator=g).tolist()
            self.synthetic += [(c, members[c][p], 0) for p in picks]
        self.synthetic = [(c, ref, seed * 10_000_019 + k) for k, (c, ref, _) in enumerate(self.synthetic)]

    # -- the wrapped dataset ---------------------------------------------------------------
    def _raw(self, i: int):
        item = self.dataset[i]
        if isinstance(item, Mapping):
            if "image" not in item or "label" not in item:
                raise SynthgenError(f"SynthAugment: dataset items are dicts without 'image' and 'label' "
                                    f"(keys: {', '.join(map(str, item))})")
            return item
        if isinstance(item, tuple | list) and len(item) in (2, 3):
            return tuple(item)
        raise SynthgenError(f"SynthAugment: dataset item {i} is a {type(item).__name__}; expected (image, label), "
                            "(image, label, mask) or a dict with 'image' and 'label'")

    def _label(self, i: int) -> int:
        item = self._raw(i)
        label = item["label"] if isinstance(item, Mapping) else item[1]
        try:
            return int(label)
        except (TypeError, ValueError) as e:
            raise SynthgenError(f"SynthAugment: label of item {i} is {label!r}, not an integer class id") from e

    def __len__(self) -> int:
        return len(self.labels) + len(self.synthetic)

    def class_counts(self) -> dict[int, tuple[int, int]]:
        """class -> (real, synthetic) counts of the augmented dataset."""
        real, synth = Counter(self.labels), Counter(c for c, _, _ in self.synthetic)
        return {c: (real.get(c, 0), synth.get(c, 0)) for c in sorted(set(real) | set(synth))}

    @property
    def is_synthetic(self) -> np.ndarray:
        """Bool per index (for samplers and loss weighting)."""
        return np.arange(len(self)) >= len(self.labels)

    # -- items -----------------------------------------------------------------------------
    def __getitem__(self, i: int):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        n = len(self.labels)
        out: dict[int, object] = {}
        synth = []
        for pos, i in enumerate(indices):
            i = int(i)
            if not 0 <= i < len(self):
                raise IndexError(f"index {i} out of range for SynthAugment of {len(self)} items")
            if i < n:
                out[pos] = self._tag(self._raw(i), False)
            else:
                synth.append((pos, self.synthetic[i - n]))
        if synth:
            refs = [self._raw(ref) for _, (_, ref, _) in synth]
            ref_images = torch.stack([_to_uint8(r["image"] if isinstance(r, Mapping) else r[0]) for r in refs])
            images = self.generator([c for _, (c, _, _) in synth], ref_images, [s for _, (_, _, s) in synth])
            for (pos, (c, _, _)), ref, img in zip(synth, refs, images, strict=True):
                out[pos] = self._tag(_replace(ref, img, c), True)
        return [out[p] for p in range(len(indices))]

    @staticmethod
    def _tag(item, synthetic: bool):
        if isinstance(item, Mapping):
            return {**item, "synthetic": synthetic}
        return (*item, synthetic)


def _to_uint8(image) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image
        if image.is_floating_point():
            return (image.clamp(0, 1) * 255).round().to(torch.uint8)
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        return torch.from_numpy(image).permute(2, 0, 1)
    raise SynthgenError(f"SynthAugment: unsupported image type {type(image).__name__}; use uint8 or [0, 1] float "
                        "tensors (3, H, W), HWC uint8 arrays or PIL images")


def _like(template, img: torch.Tensor):
    """The synthetic uint8 (3, H, W) image in the type of the real one."""
    if isinstance(template, torch.Tensor):
        return img if template.dtype == torch.uint8 else img.float() / 255
    if isinstance(template, np.ndarray):
        return img.permute(1, 2, 0).numpy()
    from PIL import Image

    return Image.fromarray(img.permute(1, 2, 0).numpy())


def _replace(ref, img: torch.Tensor, label: int):
    if isinstance(ref, Mapping):
        return {**ref, "image": _like(ref["image"], img), "label": label}
    return (_like(ref[0], img), label)
