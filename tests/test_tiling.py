import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2hsv

from synthgen.data.slides import Slide
from synthgen.data.tiling import (
    TileSpec,
    read_slides_json,
    read_tile_table,
    tile_slide,
    tissue_mask,
    write_tile_table,
)
from synthgen.errors import SynthgenError, TissueError


def _looks_like_tissue(patch: np.ndarray) -> bool:
    """H&E tissue: stained (saturated), not background white, textured."""
    sat = rgb2hsv(patch)[..., 1]
    return sat.mean() > 0.12 and patch.mean() < 225 and patch.std() > 10


def test_cmu_tissue_and_tiles(cmu):
    spec = TileSpec(mpp=1.0, size=128)
    with Slide(cmu) as s:
        tmpp = spec.thumbnail_mpp(s.mpp)
        mask = tissue_mask(s.thumbnail(tmpp), tmpp)
        # the skin section covers about a third of this region (checked by eye on the preview)
        assert 0.2 < mask.mean() < 0.5
        tiles = tile_slide(s, spec)
        assert len(tiles) == 29  # stable count: a change here is a behaviour change
        assert all(t.tissue_fraction >= 0.5 for t in tiles)
        patches = [s.read(t.x, t.y, t.size, t.mpp) for t in tiles]
        # background tiles for contrast: the top-left corner of this slide is glass
        glass = s.read(0, 0, 128, 1.0)
    assert sum(map(_looks_like_tissue, patches)) >= 0.9 * len(patches)
    assert not _looks_like_tissue(glass)


def test_tcga_with_mpp_override(tcga):
    with Slide(tcga, mpp=0.25) as s:
        tiles = tile_slide(s, TileSpec(mpp=0.5, size=128))
        assert len(tiles) == 151  # stable count
        assert sum(_looks_like_tissue(s.read(t.x, t.y, t.size, t.mpp)) for t in tiles) >= 0.9 * len(tiles)


def test_overlap_and_min_tissue(cmu):
    with Slide(cmu) as s:
        base = tile_slide(s, TileSpec(mpp=1.0, size=128))
        dense = tile_slide(s, TileSpec(mpp=1.0, size=128, overlap=64))
        every = tile_slide(s, TileSpec(mpp=1.0, size=128, min_tissue=0.0))
    assert len(dense) > 3 * len(base)
    W, H = 2220, 2967
    side = int(128 * 1.0 / 0.499)
    assert len(every) == (W // side) * (H // side)  # whole grid
    steps = sorted({t.x for t in dense})
    assert steps[1] - steps[0] == pytest.approx(64 / 0.499, abs=1)


def test_empty_tissue_is_a_clear_error(tmp_path):
    blank = tmp_path / "glass.png"
    Image.fromarray(np.full((512, 512, 3), 242, np.uint8)).save(blank)
    with Slide(blank, mpp=0.5) as s, pytest.raises(TissueError, match=r"glass\.png: no tissue detected"):
        tile_slide(s, TileSpec(mpp=0.5, size=64))


def test_tissue_mask_input_checked():
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((8, 8)), 1.0)


def test_tilespec_validation():
    with pytest.raises(ValueError, match="TileSpec.overlap"):
        TileSpec(size=64, overlap=64)
    with pytest.raises(ValueError, match="TileSpec.min_tissue"):
        TileSpec(min_tissue=1.5)
    with pytest.raises(ValueError, match="TileSpec.mpp"):
        TileSpec(mpp=0)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_round_trip(cmu, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=2.0, size=64), key="k1")
    out = write_tile_table(tiles, tmp_path / f"t{suffix}", {"k1": {"path": str(cmu)}})
    assert read_tile_table(out) == tiles
    assert read_slides_json(out) == {"k1": {"path": str(cmu)}}
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left


def test_table_errors(tmp_path):
    with pytest.raises(SynthgenError, match="no such tile table"):
        read_tile_table(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_key,x,y\nk,1,2\n")
    with pytest.raises(SynthgenError, match="lacks column.*mpp"):
        read_tile_table(bad)


def test_roi_splits_train_and_holdout(cmu):
    with Slide(cmu) as s:
        every = tile_slide(s, TileSpec(mpp=1.0, size=128))
        left = tile_slide(s, TileSpec(mpp=1.0, size=128, roi=(0, 0, 0.67, 1)))
        right = tile_slide(s, TileSpec(mpp=1.0, size=128, roi=(0.67, 0, 1, 1)))
    side = 128 / 0.499
    assert all(t.x + side <= 0.67 * 2220 for t in left) and all(t.x >= 0.67 * 2220 for t in right)
    assert not set(left) & set(right) and len(left) + len(right) <= len(every) and left and right
    with pytest.raises(ValueError, match="TileSpec.roi"):
        TileSpec(roi=(0.5, 0, 0.4, 1))
