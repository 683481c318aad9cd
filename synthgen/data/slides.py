"""Read whole-slide images and plain images at a physical resolution (microns per pixel).

One class, :class:`Slide`, covers every OpenSlide format (SVS, NDPI, MRXS, SCN, pyramidal
TIFF, ...) and plain images (PNG, JPEG, flat TIFF) read with Pillow. Coordinates are always
level-0 pixels; sizes are output pixels at the requested mpp. The reader chooses the coarsest
pyramid level that is at least as fine as the request and resamples from there.

Associated images (label, macro, thumbnail) can carry patient data: they are read only by the
explicit :meth:`Slide.associated_image` call, and :meth:`Slide.info` returns only geometry.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from synthgen.errors import SlideError

# Pillow refuses very large images by default; flat TIFF scans legitimately exceed that.
_MAX_PLAIN_PIXELS = 40_000 * 40_000
# Metadata resolutions outside this range are not microscope resolutions (72 dpi = 353 um/px).
_MPP_PLAUSIBLE = (0.02, 100.0)
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def slide_key(path: str | os.PathLike, *, hashed: bool = True) -> str:
    """A stable identifier for a slide that does not reveal its file name.

    The hashed key is derived from the file's size and first and last MiB, not from its name,
    so renaming a slide keeps its key and a barcode-like file name cannot be recovered from it.

    Args:
        path: the slide file.
        hashed: if False, return the file stem instead (only for data you may share by name).

    Returns:
        16 hexadecimal characters, or the stem.
    """
    path = Path(path)
    if not hashed:
        return path.stem
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


class Slide:
    """A slide or image opened for reading at a physical resolution.

    Args:
        path: slide or image file.
        mpp: microns per pixel of level 0. Required when the file carries no resolution
            metadata (for example the TCGA frozen sections or PNG tiles); overrides the
            metadata when given.

    Raises:
        SlideError: the file is missing, unreadable, not an image, or has no resolution and
            no override was given.

    Example:
        >>> with Slide("CMU-1-Small-Region.svs") as s:
        ...     patch = s.read(1000, 1000, 256, mpp=1.0)   # (256, 256, 3) uint8
    """

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise SlideError(f"{self.path}: is a folder, not a slide file")
        if self.path.stat().st_size == 0:
            raise SlideError(f"{self.path}: file is empty")
        self._osr = None
        self._img: Image.Image | None = None
        fmt = _detect_openslide_format(self.path)
        if fmt is not None:
            self._open_openslide(fmt)
        else:
            self._open_plain()
        if mpp is not None:
            if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
                raise SlideError(f"{self.path}: mpp override must be a positive number, got {mpp!r}")
            self.mpp = float(mpp)
        elif self._meta_mpp is not None:
            self.mpp = self._meta_mpp
        else:
            raise SlideError(
                f"{self.path}: no resolution (microns per pixel) in its metadata; "
                "pass the level-0 resolution explicitly (Slide(path, mpp=0.25), CLI --slide-mpp 0.25)"
            )

    # -- opening -------------------------------------------------------------------------
    def _open_openslide(self, fmt: str) -> None:
        import openslide

        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as e:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise SlideError(
                f"{self.path}: looks like a {fmt} slide but cannot be opened ({e}); "
                "the file may be truncated or corrupt"
            ) from e
        self.dimensions = tuple(self._osr.dimensions)
        self.level_dimensions = [tuple(d) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        props = self._osr.properties
        self.vendor = props.get("openslide.vendor", fmt)
        self.objective_power = _float_or_none(props.get("openslide.objective-power"))
        mx = _float_or_none(props.get("openslide.mpp-x"))
        my = _float_or_none(props.get("openslide.mpp-y"))
        vals = [v for v in (mx, my) if v is not None and _MPP_PLAUSIBLE[0] <= v <= _MPP_PLAUSIBLE[1]]
        self._meta_mpp = float(np.mean(vals)) if vals else None

    def _open_plain(self) -> None:
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, _MAX_PLAIN_PIXELS)
        with open(self.path, "rb") as f:
            magic = f.read(4)
        is_tiff = magic in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Pillow's EXIF chatter on damaged files
                img = Image.open(self.path)
                img.load()
        except Exception as e:
            if is_tiff and self.path.suffix.lower() in SLIDE_SUFFIXES:
                why = "a TIFF-based slide whose structure cannot be read: the file is truncated or corrupt"
            elif self.path.suffix.lower() in SLIDE_SUFFIXES:
                why = "not a slide: its content is not a slide format (a renamed or damaged file?)"
            else:
                why = "not a slide or image synthgen can read"
            raise SlideError(f"{self.path}: {why} (OpenSlide does not recognise it; Pillow: {e})") from e
        self._meta_mpp = _plain_image_mpp(img)
        self._img = img.convert("RGB") if img.mode != "RGB" else img
        self.dimensions = self._img.size
        self.level_dimensions = [self._img.size]
        self.level_downsamples = [1.0]
        self.vendor = f"image/{(img.format or 'unknown').lower()}"
        self.objective_power = None

    # -- geometry ------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """Microns per pixel of a pyramid level."""
        return self.mpp * self.level_downsamples[level]

    def best_level(self, mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``mpp`` (level 0 if none)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if self.mpp * ds <= mpp * (1 + 1e-3):
                best = i if ds >= self.level_downsamples[best] else best
        return best

    def size_at(self, mpp: float) -> tuple[int, int]:
        """Width and height of the whole slide in pixels at ``mpp``."""
        f = self.mpp / mpp
        return max(1, int(round(self.dimensions[0] * f))), max(1, int(round(self.dimensions[1] * f)))

    def info(self) -> dict:
        """Geometry only: safe to store or share (no file name, no vendor properties)."""
        return {
            "width": self.dimensions[0],
            "height": self.dimensions[1],
            "mpp": self.mpp,
            "levels": [
                {"width": w, "height": h, "downsample": ds}
                for (w, h), ds in zip(self.level_dimensions, self.level_downsamples, strict=False)
            ],
            "vendor": self.vendor,
            "objective_power": self.objective_power,
        }

    # -- reading -------------------------------------------------------------------------
    def read(self, x: float, y: float, size: int | tuple[int, int], mpp: float | None = None,
             channels_first: bool = False) -> np.ndarray:
        """Read a patch.

        Args:
            x, y: top-left corner in level-0 pixels (may be fractional).
            size: output size in pixels at ``mpp``: an int for a square or (width, height).
            mpp: output resolution in microns per pixel; level 0 when None.
            channels_first: return (3, height, width), the layout of a torch image tensor; on a
                slide level's own pixel grid it is made from OpenSlide's buffer in one copy
                (what ``PatchDataset`` reads with).

        Returns:
            An RGB uint8 array of shape (height, width, 3), or (3, height, width) with
            ``channels_first``; C-contiguous and writeable. Areas outside the slide are white.

        Raises:
            SlideError: the slide data cannot be decoded (truncated or corrupt file).
        """
        w, h = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        if w <= 0 or h <= 0:
            raise ValueError(f"size must be positive, got {size!r}")
        mpp = self.mpp if mpp is None else float(mpp)
        if not (math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number, got {mpp!r}")
        scale = mpp / self.mpp  # level-0 pixels per output pixel
        level = self.best_level(mpp)
        ds = self.level_downsamples[level]
        lx, ly = x / ds, y / ds  # top-left in level pixels
        rw, rh = w * scale / ds, h * scale / ds  # region size in level pixels
        exact = abs(rw - w) < 1e-6 and abs(rh - h) < 1e-6 and lx == int(lx) and ly == int(ly)
        if exact and self._osr is not None:
            region = self._read_rgba(level, int(lx), int(ly), w, h)
            rgba = np.asarray(region)
            if rgba[..., 3].min() == 255:  # no transparent pixels: drop alpha in the one copy
                return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1) if channels_first else rgba[..., :3])
            region = _on_white(region)
        elif exact:
            region = self._read_level(level, int(lx), int(ly), w, h)
        else:
            pad = 2  # filter support at the borders
            ix, iy = math.floor(lx) - pad, math.floor(ly) - pad
            region = self._read_level(level, ix, iy, math.ceil(lx - ix + rw) + pad, math.ceil(ly - iy + rh) + pad)
            box = (lx - ix, ly - iy, lx - ix + rw, ly - iy + rh)
            # Area averaging when shrinking (what pyramid builders do), bicubic when enlarging.
            resample = Image.Resampling.BOX if rw >= w else Image.Resampling.BICUBIC
            region = region.resize((w, h), resample=resample, box=box)
        rgb = np.asarray(region)
        return np.ascontiguousarray(rgb.transpose(2, 0, 1)) if channels_first else np.array(rgb)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` (e.g. 8 um/px for tissue detection), RGB uint8."""
        return self.read(0, 0, self.size_at(mpp), mpp)

    def _read_level(self, level: int, ix: int, iy: int, w: int, h: int) -> Image.Image:
        """An RGB region of one level; coordinates in that level's pixels; white outside."""
        if self._osr is not None:
            return _on_white(self._read_rgba(level, ix, iy, w, h))
        assert self._img is not None
        W, H = self._img.size
        if ix >= 0 and iy >= 0 and ix + w <= W and iy + h <= H:
            return self._img.crop((ix, iy, ix + w, iy + h))
        out = Image.new("RGB", (w, h), (255, 255, 255))
        sx0, sy0, sx1, sy1 = max(ix, 0), max(iy, 0), min(ix + w, W), min(iy + h, H)
        if sx1 > sx0 and sy1 > sy0:
            out.paste(self._img.crop((sx0, sy0, sx1, sy1)), (sx0 - ix, sy0 - iy))
        return out

    def _read_rgba(self, level: int, ix: int, iy: int, w: int, h: int) -> Image.Image:
        """OpenSlide's RGBA region; coordinates in that level's pixels."""
        ds = self.level_downsamples[level]
        try:
            return self._osr.read_region((int(round(ix * ds)), int(round(iy * ds))), level, (w, h))
        except Exception as e:
            raise SlideError(
                f"{self.path}: failed to read level {level} at ({ix}, {iy}) size {w}x{h} ({e}); "
                "the file may be truncated or corrupt"
            ) from e

    def associated_image(self, name: str) -> Image.Image:
        """Read an associated image (``label``, ``macro``, ``thumbnail``) on explicit request.

        Label and macro images can show patient identifiers: never put them in a dataset.
        """
        if self._osr is None or name not in self._osr.associated_images:
            raise SlideError(f"{self.path}: has no associated image named {name!r}")
        return self._osr.associated_images[name].convert("RGB")

    def associated_image_names(self) -> list[str]:
        """Names of the associated images, without reading them."""
        return [] if self._osr is None else list(self._osr.associated_images.keys())

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None
        self._img = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({self.vendor}, {self.dimensions[0]}x{self.dimensions[1]} px, {self.mpp:.4g} um/px, {self.level_count} levels)"


def _detect_openslide_format(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def _float_or_none(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _plain_image_mpp(img: Image.Image) -> float | None:
    """Resolution from TIFF tags or PNG/JPEG dpi, when it is a microscope resolution."""
    mpp = None
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 282 in tags:
        unit = tags.get(296, 2)  # 2 = inch, 3 = centimetre
        res = _float_or_none(tags[282])
        if res and unit in (2, 3):
            mpp = (25_400.0 if unit == 2 else 10_000.0) / res
    elif "dpi" in img.info:
        dpi = _float_or_none(img.info["dpi"][0])
        if dpi:
            mpp = 25_400.0 / dpi
    if mpp is not None and not (_MPP_PLAUSIBLE[0] <= mpp <= _MPP_PLAUSIBLE[1]):
        return None  # a screen dpi (72, 96, 300), not a microscope resolution
    return mpp


def _on_white(rgba: Image.Image) -> Image.Image:
    """An RGBA region as RGB, its transparent parts (outside the scanned area) white."""
    if rgba.getextrema()[3][0] == 255:
        return rgba.convert("RGB")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
