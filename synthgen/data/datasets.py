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

from synthgen.data.masks import (
    Annotations,
    check_mask,
    label_map_region,
    load_geojson,
    read_label_map,
)
from synthgen.data.slides import IMAGE_SUFFIXES, Slide
from synthgen.data.tiling import Tile, read_slides_json, read_tile_table
from synthgen.errors import MaskError, SynthgenError


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(rgb, copy=not rgb.flags.writeable)).permute(2, 0, 1).contiguous()


class PatchDataset(Dataset):
    """Patches read lazily from slides at the coordinates of a tile table.

    Args:
        tiles: a tile table path (CSV/Parquet from ``synthgen tile``) or a list of :class:`Tile`.
        slides: slide key -> slide path, or -> ``{"path": ..., "mpp": ...}``, optionally with
            ``"mask"``: a label map on the slide's level-0 pixel grid. Default: the
            ``<table>.slides.json`` written beside the table by ``synthgen tile``/``splits``.
            When every tile's slide has a mask file (and no ``annotations`` are given), each item
            gets a ``mask``: the label map read at the tile's scale (nearest neighbour).
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
        self.label_maps = not self.annotation_files and bool(self.tiles) and all(
            self.slides[t.slide_key].get("mask") for t in self.tiles)
        self._handles: dict[str, Slide] = {}
        self._annotations: dict[str, Annotations] = {}
        self._label_maps: dict[str, np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def mpp(self) -> float | None:
        """The tiles' resolution in um/px when they share one (a tile table's scale), else None."""
        values = {float(t.mpp) for t in self.tiles}
        return values.pop() if len(values) == 1 else None

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
        item = {"image": torch.from_numpy(slide.read(t.x, t.y, t.size, t.mpp, channels_first=True)), "index": i}
        if self.annotation_files:
            item["mask"] = torch.from_numpy(self._mask(t, slide)).long()
        elif self.label_maps:
            if t.slide_key not in self._label_maps:
                self._label_maps[t.slide_key] = read_label_map(self.slides[t.slide_key]["mask"],
                                                               size=slide.dimensions)
            item["mask"] = torch.from_numpy(label_map_region(self._label_maps[t.slide_key], t.x, t.y, t.size,
                                                             t.mpp / slide.mpp)).long()
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
        return {"path": str(v["path"]), "mpp": v.get("mpp")} | ({"mask": str(v["mask"])} if v.get("mask") else {})
    return {"path": str(v), "mpp": None}


def resize_image(img, target: tuple[int, int]):
    """PIL image ``img`` resized to ``target`` (width, height): box filter down, bicubic up."""
    if img.size == tuple(target):
        return img
    return img.resize(tuple(target), Image.Resampling.BOX if img.width > target[0] else Image.Resampling.BICUBIC)


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
        image_mpp, mpp: resample images (and masks) from the files' resolution ``image_mpp`` to
            ``mpp`` (microns per pixel; area averaging when shrinking), keeping their aspect;
            give both or neither, and not with ``size``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        masks: Sequence[str | os.PathLike] | None = None,
        size: int | None = None,
        transform: Callable | None = None,
        image_mpp: float | None = None,
        mpp: float | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        if (image_mpp is None) != (mpp is None) or (mpp is not None and size is not None):
            raise SynthgenError("ImageListDataset: give image_mpp and mpp together (resample), or size (resize)")
        if mpp is not None and not (image_mpp > 0 and mpp > 0):
            raise SynthgenError(f"ImageListDataset: image_mpp and mpp must be positive (got {image_mpp}, {mpp})")
        for name, seq in (("labels", labels), ("masks", masks)):
            if seq is not None and len(seq) != len(self.paths):
                raise SynthgenError(f"ImageListDataset: {len(seq)} {name} for {len(self.paths)} images")
        self.labels = None if labels is None else [int(v) for v in labels]
        self.classes = list(classes) if classes is not None else None
        self.masks = None if masks is None else [Path(m) for m in masks]
        self.size = size
        self.transform = transform
        self.image_mpp, self.mpp = image_mpp, mpp

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
        target = (self.size, self.size) if self.size is not None else None
        if self.mpp is not None:
            f = self.image_mpp / self.mpp
            target = (max(1, round(img.width * f)), max(1, round(img.height * f)))
        if target is not None and img.size != target:
            img = resize_image(img, target)
            if mask is not None:
                mask = np.asarray(Image.fromarray(mask).resize(target, Image.Resampling.NEAREST))
        item = {"image": _to_tensor(np.asarray(img)), "index": i}
        if self.labels is not None:
            item["label"] = self.labels[i]
        if mask is not None:
            item["mask"] = torch.from_numpy(np.asarray(mask, dtype=np.int64))
        if self.transform is not None:
            item["image"] = self.transform(item["image"])
        return item


class CropViews(Dataset):
    """Every ``size`` px crop on a grid of step ``stride`` of each image of ``dataset``, optionally
    in its 8 dihedral views (4 rotations x mirror), to turn a few labelled tiles into a bank.

    Item k is view ``k % V`` of crop ``(k // V) % C`` of image ``k // (V C)``. All images must have
    the size of the first. Labels (and masks) follow their image; ``source`` is the image's index
    in ``dataset``, so that splits can keep all crops of one image together.

    Args:
        dataset: map-style dataset of dicts with ``image`` (e.g. :class:`ImageListDataset`).
        size: crop side in pixels; stride: grid step (default ``size``, no overlap).
        dihedral: 8 views per crop instead of 1.
    """

    def __init__(self, dataset: Dataset, size: int, stride: int | None = None, dihedral: bool = False):
        self.dataset, self.size = dataset, size
        self.shape = tuple(dataset[0]["image"].shape[-2:])
        h, w = self.shape
        if size < 1 or size > min(h, w) or (stride is not None and stride < 1):
            raise SynthgenError(f"CropViews: crop size {size} (stride {stride}) does not fit images of {h}x{w} px")
        stride = stride or size
        self.offsets = [(y, x) for y in range(0, h - size + 1, stride) for x in range(0, w - size + 1, stride)]
        self.views = 8 if dihedral else 1
        self.classes = getattr(dataset, "classes", None)
        self.sources = getattr(dataset, "sources", None)

    def __len__(self) -> int:
        return len(self.dataset) * len(self.offsets) * self.views

    def __getitem__(self, k: int) -> dict:
        if not 0 <= k < len(self):
            raise IndexError(f"index {k} out of range for {len(self)} crops")
        i, rest = divmod(k, len(self.offsets) * self.views)
        (y, x), v = self.offsets[rest // self.views], rest % self.views
        item = dict(self.dataset[i])
        if tuple(item["image"].shape[-2:]) != self.shape:
            raise SynthgenError(f"CropViews: item {i} is {tuple(item['image'].shape[-2:])} px, the first is {self.shape}")

        def view(t: torch.Tensor) -> torch.Tensor:
            t = torch.rot90(t[..., y : y + self.size, x : x + self.size], v % 4, dims=(-2, -1))
            return (t.flip(-1) if v >= 4 else t).contiguous()

        item["image"] = view(item["image"])
        if "mask" in item:
            item["mask"] = view(item["mask"])
        item["index"], item["source"] = k, i
        return item


def _find_mask(stem_path: Path) -> Path:
    for suffix in (stem_path.suffix, ".png", ".tif", ".tiff"):
        cand = stem_path.with_suffix(suffix)
        if cand.exists():
            return cand
    raise MaskError(f"{stem_path.with_suffix('.png')}: no mask for image {stem_path.name}")
