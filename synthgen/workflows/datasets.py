"""Image sets the evaluation and audit workflows read."""

from __future__ import annotations

from pathlib import Path


def image_set(source: Path, size: int | None = None):
    """A dataset of images (dicts with ``image``, and ``label`` where known) from a tile table
    (``synthgen tile``), a ``synthgen generate`` output (its manifest's items and labels) or an
    image folder (sub-folders are classes); ``size`` resizes folder images."""
    import json

    from synthgen.data.datasets import ImageListDataset, PatchDataset

    source = Path(source)
    if source.is_file():
        return PatchDataset(source)
    manifest = source / "manifest.json"
    if manifest.exists():
        items = json.loads(manifest.read_text())["items"]
        labels = [it["label"] for it in items]
        return ImageListDataset([source / it["file"] for it in items],
                                labels if all(v is not None for v in labels) else None, size=size)
    return ImageListDataset.from_folder(source, size=size)


def mask_pairs(folder: Path, n: int = 8) -> list | None:
    """The first ``n`` (image, condition mask) pairs of a mask-guided `synthgen generate` output."""
    import json

    manifest = folder / "manifest.json"
    if folder.is_file() or not manifest.exists():
        return None
    items = [it for it in json.loads(manifest.read_text())["items"] if "mask" in it][:n]
    if not items:
        return None
    import numpy as np
    from PIL import Image

    from synthgen.data.masks import read_label_map

    return [(np.asarray(Image.open(folder / it["file"]).convert("RGB")), read_label_map(folder / it["mask"]))
            for it in items]
