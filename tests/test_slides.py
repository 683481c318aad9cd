import json
import shutil

import numpy as np
import pytest
from PIL import Image

from synthgen.data.slides import Slide, slide_key
from synthgen.errors import SlideError


def test_pyramid_tiff_mpp_and_levels(pyramid_tiff):
    path, img, mpp = pyramid_tiff
    with Slide(path) as s:
        assert s.mpp == pytest.approx(mpp)
        assert s.level_count == 3
        assert s.best_level(0.25) == 0
        assert s.best_level(0.5) == 1
        assert s.best_level(0.75) == 1  # coarsest level still at least as fine as requested
        assert s.best_level(1.0) == 2
        assert s.best_level(8.0) == 2
        assert s.best_level(0.1) == 0  # finer than level 0: upsample from level 0


@pytest.mark.parametrize("level", [0, 1, 2])
def test_read_at_level_mpp_is_pixel_exact(pyramid_tiff, level):
    path, img, mpp = pyramid_tiff
    f = 2**level
    ref = img[::f, ::f]
    with Slide(path) as s:
        for x, y in [(0, 0), (64, 256), (512, 128), (1024 - 64 * f, 1024 - 64 * f)]:
            patch = s.read(x, y, 64, mpp * f)
            np.testing.assert_array_equal(patch, ref[y // f : y // f + 64, x // f : x // f + 64])
            chw = s.read(x, y, 64, mpp * f, channels_first=True)  # PatchDataset's one-copy path
            assert chw.shape == (3, 64, 64) and chw.flags.c_contiguous and chw.flags.writeable
            np.testing.assert_array_equal(chw, patch.transpose(2, 0, 1))


def test_read_between_levels_keeps_block_colours(pyramid_tiff):
    """At 0.75 um/px (1.5x below level 1), every output pixel whose footprint lies inside one
    16 px block must have exactly that block's colour."""
    path, img, mpp = pyramid_tiff
    x0, y0, size, out_mpp = 100, 36, 96, 0.75
    scale = out_mpp / mpp  # level-0 px per output px
    with Slide(path) as s:
        patch = s.read(x0, y0, size, out_mpp)
    assert patch.shape == (size, size, 3)
    checked = 0
    for j in range(size):
        for i in range(size):
            lx0, ly0 = x0 + i * scale, y0 + j * scale
            lx1, ly1 = lx0 + scale, ly0 + scale
            # footprint plus 1 px margin (bicubic/box support) within one block
            if int((lx0 - 1) // 16) == int((lx1 + 1) // 16) and int((ly0 - 1) // 16) == int((ly1 + 1) // 16):
                np.testing.assert_array_equal(patch[j, i], img[int(ly0), int(lx0)])
                checked += 1
    assert checked > size * size // 4


def test_read_fractional_offset_and_upsampling(pyramid_tiff):
    path, img, mpp = pyramid_tiff
    with Slide(path) as s:
        # half a level-1 pixel of offset: resampled, but block interiors keep their colour
        patch = s.read(33, 33, 32, 0.5)
        np.testing.assert_array_equal(patch[12, 12], img[33 + 25, 33 + 25])
        up = s.read(64, 64, 64, 0.125)  # 2x finer than level 0
        assert up.shape == (64, 64, 3)
        np.testing.assert_array_equal(up[8, 8], img[68, 68])


def test_out_of_bounds_is_white(pyramid_tiff):
    path, img, mpp = pyramid_tiff
    with Slide(path) as s:
        patch = s.read(1000, 1000, 64, 0.25)
        chw = s.read(1000, 1000, 64, 0.25, channels_first=True)
    assert (patch[40:, :] == 255).all() and (patch[:, 40:] == 255).all()
    np.testing.assert_array_equal(patch[:24, :24], img[1000:, 1000:])
    assert patch.flags.writeable and chw.flags.c_contiguous
    np.testing.assert_array_equal(chw, patch.transpose(2, 0, 1))


def test_plain_png_needs_mpp(tmp_path, pyramid_tiff):
    _, img, _ = pyramid_tiff
    p = tmp_path / "plain.png"
    Image.fromarray(img[:256, :256]).save(p)
    with pytest.raises(SlideError, match=r"plain\.png: no resolution.*--slide-mpp"):
        Slide(p)
    with Slide(p, mpp=0.5) as s:
        np.testing.assert_array_equal(s.read(16, 32, 64), img[32:96, 16:80])
        assert s.read(0, 0, 64, 1.0).shape == (64, 64, 3)


def test_real_svs_metadata(cmu, tcga):
    with Slide(cmu) as s:
        assert s.mpp == pytest.approx(0.499)
        assert s.dimensions == (2220, 2967)
        assert s.objective_power == 20
        patch = s.read(1000, 1500, 128, 1.0)
        assert patch.shape == (128, 128, 3) and patch.dtype == np.uint8
        info = json.dumps(s.info())
        assert "CMU" not in info and "Filename" not in info and "User" not in info
    with pytest.raises(SlideError, match="TCGA-CR-7395-01A-01-TS1.svs: no resolution"):
        Slide(tcga)
    with Slide(tcga, mpp=0.25) as s:
        assert s.level_count == 2
        assert s.best_level(0.5) == 1
        assert s.read(2000, 2000, 64, 0.5).std() > 5  # tissue, not blank


def test_associated_images_only_on_request(cmu, monkeypatch):
    import openslide.lowlevel

    from synthgen.data.tiling import TileSpec, tile_slide

    def forbidden(*a, **k):
        raise AssertionError("an associated image was read")

    monkeypatch.setattr(openslide.lowlevel, "read_associated_image", forbidden)
    with Slide(cmu) as s:
        assert set(s.associated_image_names()) == {"label", "macro", "thumbnail"}
        s.info()
        tile_slide(s, TileSpec(mpp=2.0, size=64))
        s.read(0, 0, 32)
        with pytest.raises(AssertionError):
            s.associated_image("label")


def test_slide_key_hides_name_and_survives_rename(cmu, tmp_path):
    copy = tmp_path / "TCGA-AA-1234-01Z-00-DX1.svs"
    shutil.copy(cmu, copy)
    key = slide_key(copy)
    assert key == slide_key(cmu)
    assert len(key) == 16 and "TCGA" not in key
    assert slide_key(copy, hashed=False) == "TCGA-AA-1234-01Z-00-DX1"


def test_bad_inputs_name_file_and_problem(cmu, tmp_path):
    with pytest.raises(SlideError, match=r"missing\.svs: no such file"):
        Slide(tmp_path / "missing.svs")
    text = tmp_path / "notes.svs"
    text.write_text("patient notes, not a slide\n")
    with pytest.raises(SlideError, match=r"notes\.svs: not a slide"):
        Slide(text)
    data = cmu.read_bytes()
    trunc = tmp_path / "truncated.svs"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match=r"truncated\.svs: .*truncated or corrupt"):
        Slide(trunc)
    damaged = bytearray(data)
    damaged[600_000:1_200_000] = bytes(600_000)  # zero out tile data, keep the structure
    bad = tmp_path / "damaged.svs"
    bad.write_bytes(bytes(damaged))
    with Slide(bad) as s, pytest.raises(SlideError, match=r"damaged\.svs: failed to read .*corrupt"):
        s.thumbnail(4.0)
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match="empty"):
        Slide(empty)
    with pytest.raises(SlideError, match="mpp override must be a positive number"):
        Slide(cmu, mpp=-1)
    with Slide(cmu) as s, pytest.raises(ValueError, match="size must be positive"):
        s.read(0, 0, 0)
