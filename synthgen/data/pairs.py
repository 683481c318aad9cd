"""Paired stains for virtual staining: stain names, aligned patch pairs, datasets.

- Stain registry: canonical names (``he``, ``ki67``, ``her2``, ``panck``...) with aliases,
  matched case- and punctuation-insensitively by :func:`resolve_stain`.
- :func:`register_sections` registers consecutive sections (landmarks or intensity, see
  :mod:`synthgen.data.registration`) and warps the target into the source's frame;
  :func:`patch_grid` and :func:`cut_pairs` cut aligned patch pairs where both images hold tissue.
- :class:`PairedStainDataset` serves patch pairs from DeepLIIF strips (registered to a few
  pixels by DeepLIIF, aligned here by phase correlation), registered consecutive sections, and
  paired folders in the BCI layout (``HE/<split>``, ``IHC/<split>``) or the pix2pix / MIST
  layout (``<split>A``, ``<split>B``).

Images are uint8 RGB arrays (H, W, 3); the dataset yields uint8 (3, H, W) tensors like
:mod:`synthgen.data.datasets`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from synthgen.data.registration import (
    Registration,
    optical_density,
    register_intensity,
    register_landmarks,
    register_translation,
    valid_region,
    warp_to,
)
from synthgen.data.slides import IMAGE_SUFFIXES
from synthgen.errors import RegistrationError, SlideError, StainError
from synthgen.stains import STAINS, resolve_stain  # noqa: F401 (re-exported: the vocabulary lives in synthgen.stains)

GLASS_OD = 0.05  # optical density under which a pixel is glass (transmits more than 89% of white)


def patch_grid(source: np.ndarray, target: np.ndarray, size: int, stride: int | None = None,
               min_tissue: float = 0.5, valid: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Top-left corners ``(x, y)`` of aligned patches worth pairing.

    A patch is kept when it lies inside ``valid`` (where the registered target has data) and at
    least ``min_tissue`` of its pixels are tissue in both images. Tissue is optical density above
    :data:`GLASS_OD`, a rule that holds for any stain; the saturation mask of
    :func:`synthgen.data.tiling.tissue_mask` is made for H&E and misses pale IHC (it finds 7% of
    the ANHIR PanCytokeratin kidney section against 53% of the H&E one).

    Args:
        source, target: (H, W, 3) uint8 images in the same frame (the target already warped).
        size: patch side in pixels; ``stride`` defaults to ``size``.
        min_tissue: tissue fraction threshold in [0, 1]; 0 keeps every patch inside ``valid``.
        valid: optional (H, W) bool mask of usable pixels.

    Raises:
        StainError: the images differ in size or are smaller than one patch.
    """
    if source.shape[:2] != target.shape[:2]:
        raise StainError(f"source {source.shape[:2]} and target {target.shape[:2]} differ in size: "
                         "warp the target to the source frame first (warp_to)")
    H, W = source.shape[:2]
    stride = stride or size
    if size > min(H, W):
        raise StainError(f"patch size {size} is larger than the images ({W}x{H})")
    ok = np.ones((H, W), bool) if valid is None else np.asarray(valid, bool)
    integral_valid = _integral(ok)
    if min_tissue > 0:
        integral_tissue = _integral((optical_density(source) > GLASS_OD) & (optical_density(target) > GLASS_OD) & ok)
    out = []
    for y in range(0, H - size + 1, stride):
        for x in range(0, W - size + 1, stride):
            if _box(integral_valid, x, y, size) < size * size:
                continue
            if min_tissue > 0 and _box(integral_tissue, x, y, size) < min_tissue * size * size:
                continue
            out.append((x, y))
    return out


def _integral(mask: np.ndarray) -> np.ndarray:
    return np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _box(integral: np.ndarray, x: int, y: int, size: int) -> int:
    return int(integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x])


def cut_pairs(source: np.ndarray, target: np.ndarray, size: int, stride: int | None = None,
              min_tissue: float = 0.5, valid: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray, tuple[int, int]]]:
    """Aligned patch pairs ``(source_patch, target_patch, (x, y))`` at the corners of :func:`patch_grid`."""
    return [(source[y : y + size, x : x + size], target[y : y + size, x : x + size], (x, y))
            for x, y in patch_grid(source, target, size, stride, min_tissue, valid)]


# -- image pairs ----------------------------------------------------------------------------
def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A plain image file as uint8 RGB (H, W, 3).

    Raises:
        SlideError: missing or unreadable file (names it).
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise SlideError(f"{path}: cannot read image ({e})") from e


@dataclass
class ImagePair:
    """A source image and its target stain in the same pixel frame.

    ``source`` and ``target`` are uint8 RGB arrays, or file paths read when an item is asked for
    (paired folders). ``valid`` marks the pixels where a registered target has data;
    ``registration`` is how the target was brought into the pair's frame (None: already aligned);
    ``origin`` is the pair's top-left ``(x, y)`` in the source image it was cropped from.
    """

    source: np.ndarray | Path
    target: np.ndarray | Path
    name: str
    valid: np.ndarray | None = None
    registration: Registration | None = field(default=None, repr=False)
    origin: tuple[int, int] = (0, 0)

    def shape(self) -> tuple[int, int]:
        """(H, W) of the pair (read from the file header for paths)."""
        if isinstance(self.source, np.ndarray):
            return self.source.shape[:2]
        with Image.open(self.source) as im:
            return im.height, im.width

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        src = self.source if isinstance(self.source, np.ndarray) else read_rgb(self.source)
        tgt = self.target if isinstance(self.target, np.ndarray) else read_rgb(self.target)
        if src.shape != tgt.shape:
            raise StainError(f"{self.name}: source is {src.shape[1]}x{src.shape[0]} but target is "
                             f"{tgt.shape[1]}x{tgt.shape[0]}")
        return src, tgt


DEEPLIIF_PANELS = {"ki67_ihc": 0, "hematoxylin": 1, "dapi": 2, "lap2": 3, "ki67_if": 4, "segmentation": 5}


def deepliif_pair(path: str | os.PathLike, source_panel: int = 1, target_panel: int = 0, align: bool = True) -> ImagePair:
    """Split a DeepLIIF strip (six square panels side by side, see :data:`DEEPLIIF_PANELS`) into a pair.

    The default pair is the hematoxylin-only panel (source) and the Ki67 IHC panel (target). The
    panels come from one slide re-imaged after restaining and are registered only to within a few
    pixels (in the sample strips the IHC panel sits about 7 px off the others). With ``align``
    the residual translation is measured by phase correlation of the hematoxylin channels (the
    one stain both panels share), the target is shifted by it, and both panels are cropped to
    the rows and columns where they overlap (``origin`` says where the crop starts in the
    source panel; the other panels, e.g. the segmentation, line up with the source panel).

    Raises:
        StainError: the image is not a strip of six square panels.
    """
    strip = read_rgb(path)
    h, w = strip.shape[:2]
    if w != 6 * h:
        raise StainError(f"{path}: a DeepLIIF strip is six square panels side by side (width = 6 x height), "
                         f"this image is {w}x{h}")
    src, tgt = (np.ascontiguousarray(strip[:, i * h : (i + 1) * h]) for i in (source_panel, target_panel))
    if not align:
        return ImagePair(src, tgt, Path(path).stem)
    reg = register_translation(src, tgt)
    warped = warp_to(src.shape, tgt, reg.matrix)
    valid = valid_region(src.shape, tgt.shape, reg.matrix)  # a rectangle for a translation
    rows, cols = np.nonzero(valid.any(1))[0], np.nonzero(valid.any(0))[0]
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.eye(3)
    crop[:2, 2] = (-x0, -y0)  # matrices refer to the cropped source frame
    return ImagePair(src[y0:y1, x0:x1].copy(), warped[y0:y1, x0:x1].copy(), Path(path).stem,
                     registration=Registration(crop @ reg.matrix, reg.method, ncc=reg.ncc), origin=(int(x0), int(y0)))


def register_sections(source: str | os.PathLike | np.ndarray, target: str | os.PathLike | np.ndarray,
                      source_landmarks: str | os.PathLike | None = None,
                      target_landmarks: str | os.PathLike | None = None, **intensity_kw) -> ImagePair:
    """Register a target section (e.g. IHC) onto a consecutive source section (e.g. H&E).

    With both landmark files the affine fit is used, otherwise :func:`register_intensity`
    (``intensity_kw`` go to it). The target is warped into the source frame.
    """
    name = Path(source).stem if isinstance(source, (str, os.PathLike)) else "pair"
    src = read_rgb(source) if isinstance(source, (str, os.PathLike)) else np.asarray(source)
    tgt = read_rgb(target) if isinstance(target, (str, os.PathLike)) else np.asarray(target)
    if (source_landmarks is None) != (target_landmarks is None):
        raise RegistrationError("pass both source_landmarks and target_landmarks, or neither")
    if source_landmarks is not None:
        reg = register_landmarks(target_landmarks, source_landmarks)
    else:
        reg = register_intensity(src, tgt, **intensity_kw)
    warped = warp_to(src.shape, tgt, reg.matrix)
    return ImagePair(src, warped, name, valid_region(src.shape, tgt.shape, reg.matrix), reg)


def folder_pairs(root: str | os.PathLike, split: str = "train", layout: str | None = None) -> tuple[list[ImagePair], str]:
    """Image pairs of a paired folder, matched by file name (stem).

    Layouts:
        ``"bci"``: ``root/HE/<split>/*`` and ``root/IHC/<split>/*`` (the BCI dataset).
        ``"pix2pix"``: ``root/<split>A/*`` and ``root/<split>B/*`` (pix2pix, MIST's ``TrainValAB``).

    Args:
        root: dataset folder.
        split: ``train``, ``test``, ``val``...
        layout: one of the above; None detects it.

    Returns:
        ``(pairs, layout)``.

    Raises:
        StainError: no known layout, an empty folder, names on one side only, different sizes.
    """
    root = Path(root)
    candidates = {"bci": (root / "HE" / split, root / "IHC" / split),
                  "pix2pix": (root / f"{split}A", root / f"{split}B")}
    if layout is None:
        layout = next((k for k, (a, b) in candidates.items() if a.is_dir() and b.is_dir()), None)
        if layout is None:
            raise StainError(f"{root}: no paired folders for split {split!r}: expected HE/{split} + IHC/{split} "
                             f"(BCI) or {split}A + {split}B (pix2pix/MIST)")
    if layout not in candidates:
        raise StainError(f"unknown paired-folder layout {layout!r}; known: {', '.join(candidates)}")
    a_dir, b_dir = candidates[layout]
    sides = []
    for d in (a_dir, b_dir):
        if not d.is_dir():
            raise StainError(f"{d}: no such folder ({layout} layout)")
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise StainError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)})")
        by_stem: dict[str, Path] = {}
        for p in files:
            if p.stem in by_stem:
                raise StainError(f"{d}: {by_stem[p.stem].name} and {p.name} have the same name; cannot pair by name")
            by_stem[p.stem] = p
        sides.append(by_stem)
    a, b = sides
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        def some(names, side):
            return ", ".join(side[n].name for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        parts = [f"only in {a_dir}: {some(only_a, a)}" if only_a else "",
                 f"only in {b_dir}: {some(only_b, b)}" if only_b else ""]
        raise StainError("unpaired images (a pair needs the same file name on both sides); "
                         + "; ".join(p for p in parts if p))
    pairs = []
    for stem in sorted(a):
        sizes = []
        for path in (a[stem], b[stem]):
            try:
                with Image.open(path) as im:
                    sizes.append(im.size)
            except OSError as e:
                raise StainError(f"{path}: cannot read image ({e})") from e
        if sizes[0] != sizes[1]:
            raise StainError(f"{a[stem]} is {sizes[0][0]}x{sizes[0][1]} but {b[stem]} is {sizes[1][0]}x{sizes[1][1]}: "
                             "paired images must have the same size")
        pairs.append(ImagePair(a[stem], b[stem], stem))
    return pairs, layout


# -- dataset --------------------------------------------------------------------------------
def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    rgb = np.array(rgb) if not rgb.flags.writeable else np.ascontiguousarray(rgb)  # images read by Pillow are read-only
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class PairedStainDataset(Dataset):
    """Aligned patch pairs of a source stain (usually H&E) and a target stain.

    Every item is a dict: ``image`` (source, uint8 tensor 3 x H x W), ``target`` (same shape,
    the target stain at the same place), ``stain`` (canonical target stain name), ``index``.

    Args:
        pairs: aligned image pairs (:func:`deepliif_pair`, :func:`register_sections`,
            :func:`folder_pairs`).
        target_stain: stain of the targets (any alias, see :func:`resolve_stain`).
        source_stain: stain of the sources.
        size: patch side in pixels; None gives one item per whole pair (all pairs must then have
            the same size to batch).
        stride: patch stride (default ``size``).
        min_tissue: tissue fraction a patch needs in both images (in-memory pairs only; pairs
            read from files are not filtered, their images are read when an item is asked for).
        transform: optional ``transform(image, target) -> (image, target)`` on the uint8
            tensors, applied jointly (torchvision v2 transforms use the same random parameters
            for both).

    Raises:
        StainError: unknown stain, no pairs, no patch passing the filters.
    """

    def __init__(self, pairs: Sequence[ImagePair], target_stain: str, source_stain: str = "he",
                 size: int | None = 256, stride: int | None = None, min_tissue: float = 0.5,
                 transform: Callable | None = None):
        self.target_stain, self.source_stain = resolve_stain(target_stain), resolve_stain(source_stain)
        self.pairs = list(pairs)
        if not self.pairs:
            raise StainError("PairedStainDataset: no image pairs")
        self.size, self.transform = size, transform
        self.patches: list[tuple[int, int, int]] = []  # (pair index, x, y)
        for k, p in enumerate(self.pairs):
            if size is None:
                self.patches.append((k, 0, 0))
            elif isinstance(p.source, np.ndarray) and isinstance(p.target, np.ndarray):
                self.patches += [(k, x, y) for x, y in patch_grid(p.source, p.target, size, stride, min_tissue, p.valid)]
            else:
                H, W = p.shape()
                s = stride or size
                self.patches += [(k, x, y) for y in range(0, H - size + 1, s) for x in range(0, W - size + 1, s)]
        if not self.patches:
            raise StainError(f"PairedStainDataset: no {size} px patch of {len(self.pairs)} pair(s) passes "
                             f"min_tissue={min_tissue} (and lies where the registered target has data)")

    @classmethod
    def from_deepliif(cls, paths: str | os.PathLike | Sequence[str | os.PathLike], size: int | None = 256,
                      stride: int | None = None, min_tissue: float = 0.0, **kw) -> PairedStainDataset:
        """Hematoxylin panel -> Ki67 IHC panel of DeepLIIF strips (a file, a folder, or a list of files)."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files = []
        for p in map(Path, paths):
            files += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
        if not files:
            raise StainError(f"no DeepLIIF strips in {', '.join(map(str, paths))}")
        kw.setdefault("target_stain", "ki67")
        kw.setdefault("source_stain", "hematoxylin")
        return cls([deepliif_pair(f) for f in files], size=size, stride=stride, min_tissue=min_tissue, **kw)

    @classmethod
    def from_sections(cls, source: str | os.PathLike, target: str | os.PathLike, target_stain: str,
                      source_landmarks: str | os.PathLike | None = None,
                      target_landmarks: str | os.PathLike | None = None, size: int | None = 256,
                      stride: int | None = None, min_tissue: float = 0.5, registration: dict | None = None,
                      **kw) -> PairedStainDataset:
        """Consecutive sections, registered by landmarks when given, else by intensity
        (``registration`` holds keyword arguments of :func:`register_intensity`)."""
        pair = register_sections(source, target, source_landmarks, target_landmarks, **(registration or {}))
        return cls([pair], target_stain, size=size, stride=stride, min_tissue=min_tissue, **kw)

    @classmethod
    def from_folders(cls, root: str | os.PathLike, split: str = "train", target_stain: str | None = None,
                     layout: str | None = None, size: int | None = None, stride: int | None = None,
                     **kw) -> PairedStainDataset:
        """Paired folders (see :func:`folder_pairs`); BCI targets default to HER2, other layouts
        need ``target_stain``. ``size=None`` gives whole images, else a grid of patches per image."""
        pairs, layout = folder_pairs(root, split, layout)
        if target_stain is None:
            if layout != "bci":
                raise StainError(f"{root}: pass target_stain= for a {layout} folder (known: {', '.join(STAINS)})")
            target_stain = "her2"
        return cls(pairs, target_stain, size=size, stride=stride, min_tissue=0.0, **kw)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict:
        k, x, y = self.patches[i]
        src, tgt = self.pairs[k].load()
        if self.size is not None:
            src, tgt = src[y : y + self.size, x : x + self.size], tgt[y : y + self.size, x : x + self.size]
        image, target = _to_tensor(src), _to_tensor(tgt)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return {"image": image, "target": target, "stain": self.target_stain, "index": i}
