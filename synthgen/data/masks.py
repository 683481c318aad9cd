"""Masks aligned with patches: label-map images and QuPath GeoJSON annotations.

A mask is an (H, W) integer label map with 0 for background. Semantic maps hold class ids;
instance maps hold one id per object (nucleus). GeoJSON polygons (as exported by QuPath, in
level-0 pixel coordinates) are rasterized at the patch's own resolution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from synthgen.errors import MaskError


def read_label_map(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a label-map image (8/16/32-bit grayscale or palette PNG/TIFF).

    Args:
        path: the mask file.
        size: expected (width, height); a mismatch raises.

    Returns:
        (H, W) int32 label map.

    Raises:
        MaskError: unreadable file, colour (RGB) mask, size mismatch, or negative labels.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA"):
                raise MaskError(
                    f"{path}: is a colour ({mode}) image; a label map must be single-channel "
                    "(grayscale or palette) with one integer label per pixel"
                )
            arr = np.asarray(im)
    except MaskError:
        raise
    except Exception as e:
        raise MaskError(f"{path}: cannot be read as a label map ({e})") from e
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if size is not None and (arr.shape[1], arr.shape[0]) != tuple(size):
        raise MaskError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} px but its patch is {size[0]}x{size[1]} px"
        )
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise MaskError(f"{path}: a label map must be a 2-D image of integer labels, got {arr.dtype} {arr.shape}")
    if arr.min(initial=0) < 0:
        raise MaskError(f"{path}: negative labels ({int(arr.min())}) are not allowed; labels are 0 (background), "
                        "1, 2, ...")
    return arr.astype(np.int32)


def label_map_region(label_map: np.ndarray, x: float, y: float, size: int, scale: float) -> np.ndarray:
    """The ``size`` x ``size`` patch of a level-0 label map whose top-left corner is (``x``, ``y``)
    with ``scale`` level-0 pixels per output pixel, by nearest neighbour (labels are never
    blended); outside the map is background (0)."""
    idx = np.arange(size) + 0.5
    cols = np.floor(x + idx * scale).astype(np.int64)
    rows = np.floor(y + idx * scale).astype(np.int64)
    h, w = label_map.shape
    out = np.zeros((size, size), np.int32)
    ok_r, ok_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    out[np.ix_(ok_r, ok_c)] = label_map[np.ix_(rows[ok_r], cols[ok_c])]
    return out


LABEL_MAP_SUFFIXES = (".png", ".tif", ".tiff")


def label_map_files(folder: str | os.PathLike) -> list[Path]:
    """The label-map images under ``folder`` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in LABEL_MAP_SUFFIXES)


def write_label_map(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Atomically write an (H, W) label map as a 16-bit grayscale PNG (8-bit when it fits)."""
    path = Path(path)
    mask = np.asarray(mask)
    if mask.max(initial=0) > 65535:
        raise MaskError(f"{path}: label {int(mask.max())} does not fit a 16-bit PNG")
    arr = mask.astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)
    from synthgen._io import atomic_path

    with atomic_path(path, suffix=".png") as tmp:  # removed if the write fails
        Image.fromarray(arr).save(tmp)


def check_mask(mask: np.ndarray, image_hw: tuple[int, int], where: str = "mask") -> np.ndarray:
    """Validate a label map against its image's (height, width); returns it as int32."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise MaskError(f"{where}: a label map must be 2-D (H, W), got shape {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise MaskError(f"{where}: labels must be integers, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(image_hw):
        raise MaskError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image is "
                        f"{image_hw[1]}x{image_hw[0]} px")
    if mask.min(initial=0) < 0:
        raise MaskError(f"{where}: negative labels are not allowed")
    return mask.astype(np.int32)


@dataclass(frozen=True)
class Annotations:
    """Polygons of one slide, in level-0 pixels, with their class names.

    Build with :func:`load_geojson`; rasterize a patch with :meth:`rasterize`.
    """

    polygons: tuple[tuple[np.ndarray, ...], ...]  # per feature: exterior ring, then holes
    names: tuple[str | None, ...]
    bboxes: np.ndarray  # (n, 4) x0, y0, x1, y1

    def rasterize(
        self,
        x: float,
        y: float,
        size: int | tuple[int, int],
        scale: float,
        classes: Mapping[str, int] | None = None,
        instance: bool = False,
    ) -> np.ndarray:
        """Label map of the patch whose top-left is (x, y) in level-0 pixels.

        Args:
            x, y: patch corner in level-0 pixels.
            size: patch size in output pixels (int or (width, height)).
            scale: level-0 pixels per output pixel (``patch_mpp / slide_mpp``).
            classes: class name -> label id. Default: 1 for every feature. Features whose
                class is not in the map are skipped.
            instance: give each feature its own id (1, 2, ...) instead of a class id.

        Returns:
            (H, W) int32 label map; later features paint over earlier ones.
        """
        w, h = (size, size) if isinstance(size, int) else size
        x1, y1 = x + w * scale, y + h * scale
        hit = np.nonzero((self.bboxes[:, 0] < x1) & (self.bboxes[:, 2] > x)
                         & (self.bboxes[:, 1] < y1) & (self.bboxes[:, 3] > y))[0]
        canvas = Image.new("I", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        for k, i in enumerate(hit):
            if instance:
                label = k + 1
            elif classes is None:
                label = 1
            else:
                label = classes.get(self.names[i]) if self.names[i] is not None else None
                if label is None:
                    continue
            for r, ring in enumerate(self.polygons[i]):
                pts = [tuple(p) for p in ((ring - (x, y)) / scale)]
                if len(pts) >= 3:
                    draw.polygon(pts, fill=label if r == 0 else 0)
        return np.array(canvas, dtype=np.int32)


def load_geojson(path: str | os.PathLike) -> Annotations:
    """Read polygons from a GeoJSON file as exported by QuPath.

    Accepts a FeatureCollection, a list of Features, or a single Feature; Polygon and
    MultiPolygon geometries (other geometry types such as points are ignored). The class name
    comes from ``properties.classification.name`` (QuPath) or ``properties.class``/``name``.

    Raises:
        MaskError: the file is not valid JSON/GeoJSON (names the file and feature).
    """
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise MaskError(f"{path}: no such GeoJSON file") from e
    except (OSError, ValueError) as e:
        raise MaskError(f"{path}: not valid JSON ({e})") from e
    features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else data
    if isinstance(features, dict):
        features = [features]
    if not isinstance(features, Sequence):
        raise MaskError(f"{path}: expected a FeatureCollection or a list of Features")
    polys, names, boxes = [], [], []
    for n, feat in enumerate(features):
        geom = feat.get("geometry") if isinstance(feat, dict) else None
        if not isinstance(geom, dict) or "type" not in geom:
            raise MaskError(f"{path}: feature {n} has no geometry")
        if geom["type"] == "Polygon":
            parts = [geom.get("coordinates")]
        elif geom["type"] == "MultiPolygon":
            parts = geom.get("coordinates") or []
        else:
            continue
        name = _class_name(feat.get("properties") or {})
        for part in parts:
            try:
                rings = tuple(np.asarray(ring, dtype=np.float64)[:, :2] for ring in part)
            except (TypeError, ValueError, IndexError) as e:
                raise MaskError(f"{path}: feature {n} has malformed coordinates ({e})") from e
            if not rings or len(rings[0]) < 3:
                raise MaskError(f"{path}: feature {n} has a polygon with fewer than 3 points")
            polys.append(rings)
            names.append(name)
            boxes.append((*rings[0].min(0), *rings[0].max(0)))
    return Annotations(tuple(polys), tuple(names), np.asarray(boxes, dtype=np.float64).reshape(-1, 4))


def _class_name(props: Mapping) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict) and c.get("name"):
        return str(c["name"])
    for k in ("class", "classification", "name", "label"):
        if isinstance(props.get(k), str):
            return props[k]
    return None
