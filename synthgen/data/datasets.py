"""Map-style PyTorch datasets over slides (by tile table) and over folders of images.

Every item is a dict: ``image`` (uint8 tensor, 3 x H x W), ``index``, and when available
``label`` (int) and ``mask`` (int64 tensor, H x W). Dicts collate with the default collate
function and leave room for more fields (embeddings, flags) without breaking callers.

Slide handles are opened lazily in the process that reads, so each DataLoader worker has its
own handles; datasets pickle without them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from synthgen.data.masks import Annotations, check_mask, load_geojson, read_label_map
from synthgen.data.slides import IMAGE_SUFFIXES, Slide
from synthgen.data.tiling import Tile, read_slides_json, read_tile_table
from synthgen.errors import MaskError, SynthgenError


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, copy=not rgb.flags.writeable)).permute(2, 0, 1).contiguous()


class PatchDataset(Dataset):
    """Patches read lazily from slides at the coordinates of a tile table.

    Args:
        tiles: a tile table path (CSV/Parquet from ``synthgen tile``) or a list of :class:`Tile`.
        slides: slide key -> slide path, or -> ``{"path": ..., "mpp": ...}``. Default: the
            ``<table>.slides.json`` written beside the table by ``synthgen tile``.
        transform: applied to the uint8 image tensor (e.g. torchvision v2 transforms).
        annotations: slide key -> GeoJSON file (QuPath export); adds a ``mask`` to each item.
        classes: class name -> label id for the annotation masks (default: 1 for any polygon).
        instance_masks: give each annotated object its own id instead of its class id.

    Example:
        >>> ds = PatchDataset("tiles.csv")
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=32, num_workers=2)
    """

    def __init__(
        self,
        tiles: str | os.PathLike | Sequence[Tile],
        slides: Mapping[str, str | os.PathLike | Mapping] | None = None,
        transform: Callable | None = None,
        annotations: Mapping[str, str | os.PathLike] | None = None,
        classes: Mapping[str, int] | None = None,
        instance_masks: bool = False,
    ):
        if isinstance(tiles, (str, os.PathLike)):
            table = tiles
            self.tiles = read_tile_table(table)
            slides = read_slides_json(table) if slides is None else slides
        else:
            self.tiles = list(tiles)
            if slides is None:
                raise SynthgenError("PatchDataset: pass slides={slide_key: path} with a list of tiles")
        self.slides = {k: _slide_entry(v) for k, v in slides.items()}
        missing = sorted({t.slide_key for t in self.tiles} - set(self.slides))
        if missing:
            raise SynthgenError(f"PatchDataset: no slide file given for slide key(s) {', '.join(missing[:5])}")
        self.transform = transform
        self.annotation_files = dict(annotations or {})
        self.classes = dict(classes) if classes is not None else None
        self.instance_masks = instance_masks
        self._handles: dict[str, Slide] = {}
        self._annotations: dict[str, Annotations] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.tiles)

    def _slide(self, key: str) -> Slide:
        if self._pid != os.getpid():  # forked into a worker: never share OpenSlide handles
            self._handles, self._pid = {}, os.getpid()
        if key not in self._handles:
            entry = self.slides[key]
            self._handles[key] = Slide(entry["path"], mpp=entry.get("mpp"))
        return self._handles[key]

    def __getitem__(self, i: int) -> dict:
        t = self.tiles[i]
        slide = self._slide(t.slide_key)
        item = {"image": _to_tensor(slide.read(t.x, t.y, t.size, t.mpp)), "index": i}
        if self.annotation_files:
            item["mask"] = torch.from_numpy(self._mask(t, slide)).long()
        if self.transform is not None:
            item["image"] = self.transform(item["image"])
        return item

    def _mask(self, t: Tile, slide: Slide) -> np.ndarray:
        if t.slide_key not in self.annotation_files:
            return np.zeros((t.size, t.size), np.int32)
        if t.slide_key not in self._annotations:
            self._annotations[t.slide_key] = load_geojson(self.annotation_files[t.slide_key])
        return self._annotations[t.slide_key].rasterize(
            t.x, t.y, t.size, t.mpp / slide.mpp, self.classes, self.instance_masks)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for s in self._handles.values():
            s.close()
        self._handles = {}


def _slide_entry(v) -> dict:
    if isinstance(v, Mapping):
        if "path" not in v:
            raise SynthgenError(f"PatchDataset: slide entry {dict(v)!r} has no 'path'")
        return {"path": str(v["path"]), "mpp": v.get("mpp")}
    return {"path": str(v), "mpp": None}


class ImageListDataset(Dataset):
    """Images (and optional labels and masks) listed from a folder or a CSV file.

    Build with :meth:`from_folder` (ImageFolder layout: ``root/<class>/<image>``) or
    :meth:`from_csv` (columns ``path``, optional ``label`` and ``mask``).

    Args:
        paths: image files.
        labels: integer labels, one per image, or None.
        classes: class names indexed by label.
        masks: label-map files, one per image, or None.
        size: resize images (and masks, nearest) to this square size when given.
        transform: applied to the uint8 image tensor.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        masks: Sequence[str | os.PathLike] | None = None,
        size: int | None = None,
        transform: Callable | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        for name, seq in (("labels", labels), ("masks", masks)):
            if seq is not None and len(seq) != len(self.paths):
                raise SynthgenError(f"ImageListDataset: {len(seq)} {name} for {len(self.paths)} images")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.classes = list(classes) if classes is not None else None
        self.masks = None if masks is None else [Path(m) for m in masks]
        self.size = size
        self.transform = transform

    @classmethod
    def from_folder(cls, root: str | os.PathLike, masks: str | os.PathLike | None = None, **kw) -> ImageListDataset:
        """ImageFolder layout: one sub-folder per class, sorted names give label ids.

        A flat folder of images (no sub-folders) gives an unlabelled dataset. With ``masks``,
        each image ``root/a/b.png`` pairs with the label map ``masks/a/b.<png|tif>``.
        """
        root = Path(root)
        if not root.is_dir():
            raise SynthgenError(f"{root}: no such folder")
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        paths, labels = [], []
        for label, d in enumerate(class_dirs):
            files = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += files
            labels += [label] * len(files)
        classes = [d.name for d in class_dirs]
        if not class_dirs:
            paths = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            labels, classes = None, None
        if not paths:
            raise SynthgenError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        mask_paths = None if masks is None else [_find_mask(Path(masks) / p.relative_to(root)) for p in paths]
        return cls(paths, labels, classes, mask_paths, **kw)

    @classmethod
    def from_csv(cls, csv_path: str | os.PathLike, root: str | os.PathLike | None = None, **kw) -> ImageListDataset:
        """CSV with a ``path`` column (relative to ``root`` or the CSV's folder), optional
        ``label`` (class name or integer) and ``mask`` columns."""
        csv_path = Path(csv_path)
        if not csv_path.exists():
            raise SynthgenError(f"{csv_path}: no such CSV file")
        root = Path(root) if root is not None else csv_path.parent
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            cols = reader.fieldnames or []
        if "path" not in cols:
            raise SynthgenError(f"{csv_path}: needs a 'path' column (has: {', '.join(cols)})")
        paths = [root / r["path"] for r in rows]
        labels = classes = None
        if "label" in cols:
            raw = [r["label"] for r in rows]
            if all(v.lstrip("-").isdigit() for v in raw):
                labels = [int(v) for v in raw]
            else:
                classes = sorted(set(raw))
                labels = [classes.index(v) for v in raw]
        masks = [root / r["mask"] for r in rows] if "mask" in cols else None
        return cls(paths, labels, classes, masks, **kw)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:
            raise SynthgenError(f"{path}: cannot read image ({e})") from e
        mask = None
        if self.masks is not None:
            mask = read_label_map(self.masks[i])
            try:
                mask = check_mask(mask, (img.height, img.width), where=str(self.masks[i]))
            except MaskError as e:
                raise MaskError(f"{e} ({path})") from None
        if self.size is not None and img.size != (self.size, self.size):
            down = img.width > self.size
            img = img.resize((self.size, self.size), Image.Resampling.BOX if down else Image.Resampling.BICUBIC)
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask).resize((self.size, self.size), Image.Resampling.NEAREST))
        item = {"image": _to_tensor(np.asarray(img)), "index": i}
        if self.labels is not None:
            item["label"] = self.labels[i]
        if mask is not None:
            item["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        if self.transform is not None:
            item["image"] = self.transform(item["image"])
        return item


def _find_mask(stem_path: Path) -> Path:
    for suffix in (stem_path.suffix, ".png", ".tif", ".tiff"):
        cand = stem_path.with_suffix(suffix)
        if cand.exists():
            return cand
    raise MaskError(f"{stem_path.with_suffix('.png')}: no mask for image {stem_path.name}")
