"""On-the-fly synthetic augmentation for any map-style dataset of (image, label[, mask]).

``SynthAugment(dataset, generator, policy)`` is a dataset of the real items followed by
synthetic items: for class c it adds ``round(n_c * ratio_c)`` synthetic samples, so rare classes
get synthetic company while common ones stay real. Synthetic item k is fully determined by the
seed and k (its class, the real sample it varies, its noise seed), so a run is reproducible
whatever the number of DataLoader workers, and under DDP each rank's ``DistributedSampler``
share holds the same items a single process would give for those indices.

:class:`PipelineGenerator` modes: ``variation`` of the sample's own image, ``prior`` (a fresh
sample of the item's class from the embedding prior), ``mask`` (generated from the sample's own
mask, which the synthetic item keeps) and ``class`` (class-conditional models).

Generation is batched: DataLoader workers fetch a whole batch through ``__getitems__``, and all
synthetic items of that batch go through the pipeline in one call; with ``num_workers > 0`` and
the loader's prefetching, generation runs ahead of the training step. The pipeline is loaded
once per process, lazily. ``cache_dir=`` keeps the generated images on disk for later epochs,
and :meth:`SynthAugment.pregenerate` fills that cache before training, or, with
``background=True``, in a separate process while training runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from synthgen import seeding
from synthgen.augment.images import as_uint8, like
from synthgen.config import SAMPLING, resolve_mode
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


MODES = ("variations", "class", "prior", "mask")  # of GENERATION_MODES; "variation" is accepted too


class PipelineGenerator:
    """Makes synthetic images with a :class:`~synthgen.pipelines.generate.SynthPipeline`, loaded
    once per process (workers load their own copy on first use).

    Args:
        pipeline: a pipeline folder (or a loaded pipeline, for ``num_workers=0``).
        mode: ``variations`` (or ``variation``: embedding of the real sample; needs the pipeline's image encoder),
            ``class`` (a class-conditional model; the label is the condition), ``prior`` (a fresh
            sample of the item's class: its embedding drawn from the embedding prior, no reference
            image) or ``mask`` (the sample's own mask through the pipeline's mask branch, with the
            sample's embedding when the model takes one; for datasets with masks, which the
            synthetic item keeps).
        guidance_scale, num_inference_steps: sampling settings. ``num_inference_steps`` None
            (default): the pipeline's few-step variant at its recorded step count
            (``fast_steps`` in ``model_index.json``, else ``SAMPLING.fast_steps``) where it has
            one and the mode allows (``variation`` at strength 1, ``class``, ``prior``, at its
            folded guidance), else 8 steps of the base model.
        classes: ``prior`` mode: how dataset class ids map to the prior's classes; a list of the
            dataset's class names (``ImageListDataset.classes``; matched to the prior's
            ``class_names`` case-insensitively, a leading ``01_``-style number ignored) or a dict
            ``{dataset id: prior id or name}``. Classes left out cannot be generated.
        prior: ``prior`` mode: an :class:`~synthgen.models.prior.EmbeddingPrior` or its folder
            (default: the pipeline folder's ``prior/``).
        controlnet_conditioning_scale: ``mask`` mode: strength of the mask branch (default: the
            branch's recorded one).
        strength: ``variation`` mode: below 1, anchored variations (SDEdit): each synthetic image
            starts from its reference's latent noised this fraction of the way, so it keeps the
            reference's layout (and, with a mask dataset, stays near its mask); 1 (default)
            starts from pure noise and keeps only the reference's embedding.
        device: where the pipeline runs (e.g. ``"cuda:1"``: a GPU kept for generation, typically
            with ``SynthAugment.pregenerate(background=True)``, whose process is spawned); default
            CPU. DataLoader workers that generate on a GPU need
            ``multiprocessing_context="spawn"`` (CUDA does not survive a fork). Images come back
            on the CPU. Not part of the cache key: CPU and GPU results differ only in rounding.
        dtype: compute precision of the pipeline (``auto``: bf16 autocast where the hardware has
            native bf16, else fp32; ``bf16``, ``fp16``, ``fp32``); part of the cache key.

    Raises:
        SynthgenError: an unknown mode, a prior mode without a prior or with classes that do not
            map to it.
    """

    def __init__(self, pipeline, mode: str = "variations", guidance_scale: float = SAMPLING.guidance,
                 num_inference_steps: int | None = None,
                 classes: Sequence[str] | Mapping[int, int | str] | None = None, prior=None,
                 controlnet_conditioning_scale: float | None = None, device: str | torch.device | None = None,
                 strength: float = 1.0, dtype: str = "auto"):
        mode = resolve_mode(mode, MODES, "PipelineGenerator mode")
        if not 0 < strength <= 1:
            raise SynthgenError(f"strength must be in (0, 1], got {strength}")
        if strength < 1 and mode != "variations":
            raise SynthgenError(f"strength < 1 (anchored variations) needs mode='variations', got mode={mode!r}")
        from synthgen.pipelines.precision import resolve_dtype

        try:
            resolve_dtype(dtype, "cpu")  # an unknown name fails here, not in a worker
        except ValueError as e:
            raise SynthgenError(str(e)) from e
        self.strength, self.dtype = strength, dtype
        self.source, self.mode = pipeline, mode
        if num_inference_steps is None:
            num_inference_steps = _fast_steps(pipeline, mode, strength, guidance_scale) or 8
        self.guidance_scale, self.num_inference_steps = guidance_scale, num_inference_steps
        self.controlnet_conditioning_scale = controlnet_conditioning_scale
        self.device = None if device is None else torch.device(device)
        self._pipe, self._pid, self._prior, self._fingerprint = None, None, None, None
        self.prior_source, self.class_map = None, None
        if mode == "prior":
            self.prior_source = prior if prior is not None else _shipped_prior(pipeline)
            self.class_map = _class_map(classes, _prior_config(self.prior_source))

    @property
    def image_size(self) -> int:
        """Side of the images the pipeline makes (and its references must have), in px."""
        return self._pipeline().image_size

    @property
    def follows_masks(self) -> bool:
        """Whether the synthetic images follow the dataset's masks (then SynthAugment passes them)."""
        return self.mode == "mask"

    def _pipeline(self):
        if self._pipe is None or self._pid != os.getpid():
            from synthgen.pipelines.generate import SynthPipeline

            src = self.source
            self._pipe = SynthPipeline.from_pretrained(src) if isinstance(src, (str, os.PathLike)) else src
            self._pipe.set_progress_bar_config(disable=True)
            if self.device is not None:
                self._pipe.to(self.device)
            if self.mode == "mask" and self._pipe.controlnet is None:
                raise SynthgenError(f"mode='mask' needs a pipeline with a mask branch (controlnet/); {src} has none")
            if self.mode == "prior":
                from synthgen.models.prior import EmbeddingPrior

                p = self.prior_source
                self._prior = (EmbeddingPrior.from_pretrained(p) if isinstance(p, (str, os.PathLike)) else p).eval()
            self._pid = os.getpid()
        return self._pipe

    def __getstate__(self):
        state = self.__dict__.copy()
        if isinstance(self.source, (str, os.PathLike)):
            state["_pipe"], state["_prior"], state["_pid"] = None, None, None  # each worker loads its own
        return state

    def fingerprint(self) -> str:
        """Hash of everything the images depend on besides (labels, references, masks, seeds):
        the model files (or weights), the mode and the sampling settings. Keys the disk cache."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps({
                "mode": self.mode, "guidance": self.guidance_scale, "steps": self.num_inference_steps,
                "controlnet_scale": self.controlnet_conditioning_scale,
                "classes": sorted((self.class_map or {}).items())} | (
                    {"strength": self.strength} if self.strength != 1 else {}) | (
                    {"dtype": self.compute_dtype} if self.compute_dtype != "fp32" else {})).encode())  # old keys stay
            for src in (self.source, self.prior_source):
                if src is not None:
                    h.update(_model_hash(src).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def compute_dtype(self) -> str:
        """The precision this generator samples in (``fp32``, ``bf16``, ``fp16``; ``auto`` resolved)."""
        from synthgen.pipelines.precision import dtype_name, resolve_dtype

        return dtype_name(resolve_dtype(self.dtype, self.device or "cpu"))

    def __call__(self, labels: list[int], references: torch.Tensor | None, seeds: list[int],
                 masks: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, 3, H, W) synthetic images for the given labels / reference images / seeds
        (and, in ``mask`` mode, int (B, H, W) label maps)."""
        pipe = self._pipeline()
        kw = {}
        if self.mode == "class":
            kw["class_labels"] = labels
        elif self.mode == "variations":
            kw["images"] = references
            if self.strength != 1:
                kw["strength"] = self.strength
        elif self.mode == "prior":
            kw["embeddings"] = self._prior_embeddings(labels, seeds)
        else:
            if masks is None:
                raise SynthgenError("mode='mask' needs the items' masks (a dataset returning masks)")
            kw["masks"] = masks
            kw["controlnet_conditioning_scale"] = self.controlnet_conditioning_scale
            if pipe.transformer.config.use_embeddings and pipe.image_encoder is not None:
                kw["images"] = references
        if self.mode != "class" and pipe.transformer.config.num_classes:
            kw["class_labels"] = labels
        with torch.no_grad():
            return pipe(**kw, seeds=seeds, guidance_scale=self.guidance_scale, dtype=self.dtype,
                        num_inference_steps=self.num_inference_steps, output_type="pt").images

    def check_labels(self, labels) -> None:
        """Raise if this generator cannot make some of these dataset classes (SynthAugment calls
        it with the classes the policy adds, before any generation)."""
        missing = sorted({int(c) for c in labels} - set(self.class_map)) if self.mode == "prior" else []
        if missing:
            raise SynthgenError(f"prior mode: dataset class(es) {missing} have no class of the prior; "
                                f"classes= maps {sorted(self.class_map)}")

    def _prior_embeddings(self, labels: list[int], seeds: list[int]) -> torch.Tensor:
        """One prior sample per item, each from its own generator (independent of the batch)."""
        self.check_labels(labels)
        out = []
        for c, s in zip(labels, seeds, strict=True):
            g = seeding.generator(seeding.derived(s, seeding.PRIOR))
            out.append(self._prior.sample([self.class_map[c]], generator=g).cpu())
        return torch.cat(out)


def _fast_steps(pipeline, mode: str, strength: float, guidance_scale: float) -> int | None:
    """Steps of the pipeline's few-step variant when it can serve this generator, else None."""
    if mode == "mask" or strength != 1:
        return None
    if not isinstance(pipeline, (str, os.PathLike)):  # loaded: the pipeline decides
        steps = pipeline.default_fast_steps
        return None if pipeline.fast_unavailable(steps, guidance_scale, strength=strength) else steps
    # a folder, not loaded yet (each worker loads its own): the same checks, from its files
    cfg_path = Path(pipeline) / "fast_transformer" / "config.json"
    if not (cfg_path.is_file() and (Path(pipeline) / "fast_scheduler").is_dir()):
        return None
    from synthgen.pipelines.generate import default_fast_steps

    index = Path(pipeline) / "model_index.json"
    try:
        steps = default_fast_steps(json.loads(index.read_text()) if index.is_file() else {})
    except ValueError as e:
        raise SynthgenError(f"{index}: {e}") from e
    folded = json.loads(cfg_path.read_text()).get("distilled_guidance_scale")
    return None if folded is not None and abs(folded - guidance_scale) > 1e-6 else steps


def _shipped_prior(pipeline):
    if isinstance(pipeline, (str, os.PathLike)) and (Path(pipeline) / "prior").is_dir():
        return Path(pipeline) / "prior"
    raise SynthgenError(f"mode='prior' needs an embedding prior: {pipeline} has no prior/ folder; give prior=")


def _prior_config(prior) -> dict:
    if isinstance(prior, (str, os.PathLike)):
        from synthgen.models.prior import EmbeddingPrior

        return dict(EmbeddingPrior.load_config(prior))
    return dict(prior.config)


def _class_map(classes, prior_cfg: dict) -> dict[int, int]:
    """Dataset class id -> prior class id, from dataset class names or an explicit mapping."""
    names, n = prior_cfg.get("class_names"), prior_cfg["num_classes"]
    listing = ", ".join(f"{i} {v}" for i, v in enumerate(names)) if names else f"ids 0-{n - 1}"

    def find(value, what) -> int:
        if isinstance(value, int | np.integer) and not isinstance(value, bool):
            if not 0 <= int(value) < n:
                raise SynthgenError(f"prior mode: {what} maps to class id {value}; the prior has {listing}")
            return int(value)
        key = _norm(str(value))
        found = [i for i, v in enumerate(names or []) if _norm(v) == key]
        if len(found) != 1:
            raise SynthgenError(f"prior mode: {what} {value!r} matches no class of the prior (it has {listing}); "
                                "give classes={dataset id: prior class}")
        return found[0]

    if classes is None:
        raise SynthgenError(f"prior mode needs classes=: the dataset's class names, or {{dataset id: prior class}} "
                            f"(the prior has {listing})")
    if isinstance(classes, Mapping):
        return {int(k): find(v, f"dataset class {k}") for k, v in classes.items()}
    return {i: find(name, "dataset class") for i, name in enumerate(classes)}


def _norm(name: str) -> str:
    """Class name for matching: lower case, a leading number (``01_TUMOR``) dropped."""
    return re.sub(r"^\d+[_\- ]+", "", name.strip()).lower()


def _model_hash(source) -> str:
    """Content hash of a model folder's files, or of a loaded module's weights."""
    h = hashlib.sha256()
    if isinstance(source, (str, os.PathLike)):
        from synthgen._io import sha256_file

        for f in sorted(p for p in Path(source).rglob("*") if p.is_file()):
            h.update(f.relative_to(source).as_posix().encode() + sha256_file(f).encode())
        return h.hexdigest()
    modules = source.components.values() if hasattr(source, "components") else [source]
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for k, v in m.state_dict().items():
                h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        elif getattr(m, "config", None) is not None:  # the scheduler
            h.update(json.dumps(dict(m.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


class SynthAugment(Dataset):
    """Real items of ``dataset`` followed by synthetic items of the classes the policy names.

    Args:
        dataset: map-style dataset returning ``(image, label)``, ``(image, label, mask)`` or a
            dict with ``image`` and ``label`` (and optionally ``mask``). Images: uint8 tensors
            (3, H, W), float tensors in [0, 1], or PIL images; synthetic items come back in the
            same type. Masks: integer label maps (H, W); a synthetic item keeps the mask of the
            real sample it was generated from, so the generator must follow it (``mode='mask'``).
        generator: callable ``(labels, reference_images, seeds) -> uint8 (B, 3, H, W)``, e.g.
            :class:`PipelineGenerator`; one with ``follows_masks`` true is also given
            ``masks=`` (int64 (B, H, W)).
        policy: :class:`SynthPolicy` (default: :meth:`SynthPolicy.balance` of the labels).
        labels: the dataset's labels, if known (saves one pass over the dataset).
        seed: fixes which real samples are varied and the noise of every synthetic item.
        cache_dir: keep every generated image on disk (by seed and index, in a sub-folder per
            settings hash) and reuse it in later epochs and runs. The key covers the generator's
            ``fingerprint()`` (model files and sampling settings), the seed and the synthetic plan
            (labels and policy), not the pixels of the wrapped dataset: use a new folder when the
            images change under the same labels.

    Each item carries whether it is synthetic: a last tuple element, or ``"synthetic"`` in dicts.
    A synthetic item's other fields (a mask, dict keys such as ``index``) are those of the real
    sample it was made from (varied, or drawn for in ``prior`` mode).

    Raises:
        SynthgenError: items of an unexpected type, labels that are not class ids, items with
            masks for a generator that does not follow masks (or the reverse).
    """

    def __init__(self, dataset: Dataset, generator: Callable, policy: SynthPolicy | None = None,
                 labels: Sequence[int] | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None):
        self.dataset, self.generator, self.seed = dataset, generator, seed
        first = self._raw(0)
        self.has_masks = (isinstance(first, Mapping) and "mask" in first) or (not isinstance(first, Mapping)
                                                                             and len(first) == 3)
        follows = bool(getattr(generator, "follows_masks", False))
        if self.has_masks and not follows:
            raise SynthgenError("SynthAugment: the dataset returns masks, and a synthetic item keeps its sample's "
                                "mask, so the generator must follow it: use PipelineGenerator(..., mode='mask') "
                                "with a pipeline that has a mask branch (controlnet/)")
        if follows and not self.has_masks:
            raise SynthgenError("SynthAugment: the generator is mask-guided but the dataset returns no masks "
                                "(expected (image, label, mask) or a dict with 'mask')")
        self.labels = [int(v) for v in (labels if labels is not None else (self._label(i) for i in range(len(dataset))))]
        self.policy = policy or SynthPolicy.balance(self.labels)
        plan = synthetic_plan(self.labels, self.policy, seed)
        self.synthetic: list[tuple[int, int, int]] = [  # (label, real index varied, noise seed)
            (c, ref, s) for (c, ref), s in zip(plan, seeding.item_seeds(seed, len(plan)), strict=True)]
        check = getattr(generator, "check_labels", None)
        if check is not None:
            check(sorted({c for c, _, _ in self.synthetic}))
        self.cache = None
        if cache_dir is not None:
            from synthgen.augment.cache import ItemCache

            fp = getattr(generator, "fingerprint", None)
            fp = fp() if callable(fp) else f"{getattr(generator, '__module__', '')}.{_qualname(generator)}"
            plan = hashlib.sha256(json.dumps([len(self.labels), self.synthetic]).encode()).hexdigest()
            self.cache = ItemCache(cache_dir, {"generator": fp, "seed": seed, "plan": plan})

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
                synth.append((pos, i - n))
        if synth:
            refs = [self._raw(self.synthetic[k][1]) for _, k in synth]
            images, _ = self._generate([k for _, k in synth], refs)
            for (pos, k), ref, img in zip(synth, refs, images, strict=True):
                out[pos] = self._tag(_replace(ref, img, self.synthetic[k][0]), True)
        return [out[p] for p in range(len(indices))]

    def _generate(self, ks: list[int], refs: list) -> tuple[list[torch.Tensor], int]:
        """Images of synthetic items ``ks`` (from the cache where there, the rest in one batch),
        and how many of them were generated here."""
        images = [self.cache.get(self.seed, k) if self.cache else None for k in ks]
        todo = [j for j, img in enumerate(images) if img is None]
        if todo:
            kw = {}
            if self.has_masks:
                kw["masks"] = torch.stack([_mask_tensor(refs[j]) for j in todo])
            ref_images = torch.stack([as_uint8(_image(refs[j])) for j in todo])
            new = self.generator([self.synthetic[ks[j]][0] for j in todo], ref_images,
                                 [self.synthetic[ks[j]][2] for j in todo], **kw)
            if new.shape[-2:] != ref_images.shape[-2:]:
                raise SynthgenError(f"SynthAugment: the generator makes {new.shape[-1]}x{new.shape[-2]} images but the "
                                    f"dataset's are {ref_images.shape[-1]}x{ref_images.shape[-2]}; give the dataset at "
                                    "the model's tile size and scale (microns per pixel)")
            for j, img in zip(todo, new, strict=True):
                images[j] = img
                if self.cache:
                    self.cache.put(self.seed, ks[j], img)
        return images, len(todo)

    def pregenerate(self, indices: Sequence[int] | None = None, batch_size: int = 32, background: bool = False):
        """Fill the disk cache ahead of training (e.g. this DDP rank's share, or all synthetic
        items by default), in the order given; items already cached are skipped.

        Args:
            indices: dataset indices (real ones are ignored); default: every synthetic item.
            batch_size: items generated per pipeline call.
            background: generate in a spawned background process instead (see
                :mod:`synthgen.augment.background`) and return at once, so that training starts
                while the cache fills: loader workers read the items already there and generate
                only the missing ones. Give the order the loader will ask for (e.g.
                ``list(sampler)``) to keep the process ahead of the loop.

        Returns:
            How many items were generated; with ``background=True``, the running
            :class:`~synthgen.augment.background.BackgroundFill` (a context manager).

        Raises:
            SynthgenError: no ``cache_dir``; with ``background=True``, a dataset or generator
                that does not pickle.
        """
        if self.cache is None:
            raise SynthgenError("SynthAugment.pregenerate needs cache_dir=")
        n = len(self.labels)
        ks = [int(i) - n for i in (indices if indices is not None else range(n, len(self))) if int(i) >= n]
        if background:
            from synthgen.augment.background import BackgroundFill

            return BackgroundFill(self, ks, batch_size)
        return self._fill(ks, batch_size)

    def _fill(self, ks: list[int], batch_size: int, stop: Callable[[], bool] | None = None) -> int:
        """Generate the uncached items of ``ks`` into the cache, ``batch_size`` at a time (re-checking
        the cache before each batch: another process may have made some); stop early when
        ``stop()`` is true. Returns how many were generated."""
        made, todo = 0, [k for k in ks if not self.cache.path(self.seed, k).exists()]
        while todo and not (stop and stop()):
            part, todo = todo[:batch_size], todo[batch_size:]
            part = [k for k in part if not self.cache.path(self.seed, k).exists()]
            if part:  # counts only what this call generated: a loader worker may have cached some since
                made += self._generate(part, [self._raw(self.synthetic[k][1]) for k in part])[1]
        return made

    @staticmethod
    def _tag(item, synthetic: bool):
        if isinstance(item, Mapping):
            return {**item, "synthetic": synthetic}
        return (*item, synthetic)


def synthetic_plan(labels: Sequence[int], policy: SynthPolicy, seed: int) -> list[tuple[int, int]]:
    """(label, real index varied) of each synthetic item: ``policy.extra`` items per class, their
    references drawn with replacement from the class's items by the seed's generator."""
    labels = [int(v) for v in labels]
    extra = policy.extra(Counter(labels))
    g = seeding.generator(seed)
    plan = []
    for c in sorted(extra):
        members = [i for i, v in enumerate(labels) if v == c]
        plan += [(c, members[p]) for p in torch.randint(0, len(members), (extra[c],), generator=g).tolist()]
    return plan


def _qualname(obj) -> str:
    return getattr(obj, "__qualname__", type(obj).__qualname__)


def _image(item):
    return item["image"] if isinstance(item, Mapping) else item[0]


def _mask_tensor(item) -> torch.Tensor:
    mask = item["mask"] if isinstance(item, Mapping) else item[2]
    m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.asarray(mask))
    if m.is_floating_point() or m.ndim != 2:
        raise SynthgenError(f"SynthAugment: masks must be integer label maps (H, W), got {m.dtype} {tuple(m.shape)}")
    return m.long()


def _replace(ref, img: torch.Tensor, label: int):
    """The reference item with the synthetic image and its label (a mask, if any, stays)."""
    if isinstance(ref, Mapping):
        return {**ref, "image": like(ref["image"], img), "label": label}
    return (like(ref[0], img), label, *ref[2:])
