"""Slides, tiles, masks, datasets and the feature cache."""

from synthgen._lazy import lazy_getattr

_EXPORTS = {
    "Slide": ".slides",
    "slide_key": ".slides",
    "TileSpec": ".tiling",
    "Tile": ".tiling",
    "tissue_mask": ".tiling",
    "tile_slide": ".tiling",
    "find_slides": ".tiling",
    "write_tile_table": ".tiling",
    "read_tile_table": ".tiling",
    "Annotations": ".masks",
    "load_geojson": ".masks",
    "read_label_map": ".masks",
    "check_mask": ".masks",
    "segment_nuclei": ".nuclei",
    "procedural_nuclei": ".nuclei",
    "augment_mask": ".nuclei",
    "PatchDataset": ".datasets",
    "ImageListDataset": ".datasets",
    "CropViews": ".datasets",
    "build_cache": ".cache",
    "CacheDataset": ".cache",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
