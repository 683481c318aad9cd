"""Tiles or images -> a feature cache (VAE latents, embeddings, labels, masks) for training."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from synthgen.config import ConfigError


@dataclass(frozen=True)
class CacheJob:
    """What ``synthgen cache`` (and a recipe's ``cache:`` step) does.

    ``source``: a tile table from ``synthgen tile`` or ``synthgen splits`` (a labelled table keeps
    its class and tissue-source ids), an image folder (ImageFolder sub-folders are classes) or a
    CSV of images (``path[,label]``). ``encoders``: output name -> encoder spec (``latents`` is the
    name training reads VAE latents from). ``image_mpp`` and ``mpp`` (together, images only)
    resample images from their resolution to the model's; ``size`` resizes them instead. ``crop``
    caches every crop of that side (grid step ``crop_stride``; ``dihedral``: in 8 orientations).
    """

    source: Path
    out: Path
    encoders: Mapping[str, str]
    slides_json: Path | None = None
    size: int | None = None
    image_mpp: float | None = None
    mpp: float | None = None
    crop: int | None = None
    crop_stride: int | None = None
    dihedral: bool = False
    shard_size: int = 1024
    batch_size: int = 32
    num_workers: int = 2
    dtype: str = "float32"
    force: bool = False


def cache(job: CacheJob, progress: bool = True, loaded: Mapping | None = None) -> int:
    """Build (or resume) the cache of ``job``; returns the number of items cached. ``loaded``: the
    encoders of ``job.encoders`` already loaded (name -> callable), e.g. by a CLI that checked the specs.

    Raises:
        ConfigError: options that do not go together, or an unknown encoder spec.
        CacheError: the folder holds a cache of another configuration, an encoder gave NaN/Inf.
    """
    import json

    import torch

    from synthgen._io import sha256_file
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import ImageListDataset, PatchDataset
    from synthgen.encoders.load import load_encoder
    from synthgen.errors import SynthgenError

    source = Path(job.source)
    image_list = source.is_dir() or is_image_csv(source)
    if (job.image_mpp is None) != (job.mpp is None) or (job.mpp is not None and not image_list):
        raise ConfigError("image_mpp and mpp (--image-mpp, --mpp) go together, for an image folder or CSV")
    if job.crop is None and (job.crop_stride or job.dihedral):
        raise ConfigError("crop_stride and dihedral (--crop-stride, --dihedral) need crop (--crop)")
    fns = dict(loaded or {})
    for name, spec in job.encoders.items():
        if name in fns:
            continue
        try:
            fns[name] = load_encoder(spec)
        except SynthgenError as e:
            raise ConfigError(f"encoder {name}={spec}: {e}") from e
    kw = {"size": job.size, "image_mpp": job.image_mpp, "mpp": job.mpp}
    if source.is_dir():
        dataset = ImageListDataset.from_folder(source, **kw)
    elif image_list:
        dataset = ImageListDataset.from_csv(source, **kw)
    else:
        slides = json.loads(Path(job.slides_json).read_text()) if job.slides_json else None
        if is_labelled_table(source):  # from `synthgen splits`: keep class and tissue-source ids
            from synthgen.data.cache import LabelledTiles

            dataset = LabelledTiles(source, slides=slides)
        else:
            dataset = PatchDataset(source, slides=slides)
    fingerprint = {"source": sha256_file(source)[:16] if source.is_file() else f"folder:{len(dataset)}",
                   "encoders": dict(sorted(job.encoders.items())), "size": job.size}
    if job.mpp is not None:
        fingerprint["mpp"] = [job.image_mpp, job.mpp]
    scale = getattr(dataset, "mpp", None)  # recorded in the cache; `synthgen assemble` passes it on
    if job.crop is not None:
        from synthgen.data.datasets import CropViews

        dataset = CropViews(dataset, job.crop, job.crop_stride, job.dihedral)
        fingerprint["crop"] = [job.crop, job.crop_stride, job.dihedral]
    build_cache(dataset, job.out, fns, shard_size=job.shard_size, batch_size=job.batch_size,
                num_workers=job.num_workers, dtype=getattr(torch, job.dtype), fingerprint=fingerprint,
                classes=getattr(dataset, "classes", None), force=job.force, mpp=scale, progress=progress)
    return len(dataset)


def is_labelled_table(path: Path) -> bool:
    """A CSV tile table with the label columns of ``synthgen splits``."""
    from synthgen.data.splits import LABEL_COLUMNS

    if path.suffix != ".csv":
        return False
    with open(path, newline="") as f:
        header = f.readline().strip().split(",")
    return set(LABEL_COLUMNS) <= set(header)


def is_image_csv(path: Path) -> bool:
    """A CSV listing image files (a ``path`` column), not a tile table."""
    if path.suffix.lower() != ".csv":
        return False
    with open(path, newline="") as f:
        return "path" in f.readline().strip().split(",")
