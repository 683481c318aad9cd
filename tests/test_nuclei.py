"""Nuclei masks: pseudo-labeller on real tiles, procedural layouts, augmentation, adherence metric."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from synthgen.data import Slide
from synthgen.data.nuclei import augment_mask, procedural_nuclei, segment_nuclei
from synthgen.errors import MaskError
from synthgen.metrics.masks import dice, mask_adherence, match_objects


@pytest.fixture(scope="module")
def cmu_tiles(cmu):
    s = Slide(cmu)
    # dermis with many nuclei, and the white background outside the section
    cellular = [np.asarray(s.read(x, y, 64, 1.0)) for x, y in [(1000, 800), (300, 1000), (1200, 1600)]]
    blank = np.asarray(s.read(400, 400, 64, 1.0))
    return cellular, blank


def test_segment_nuclei_on_real_tiles(cmu_tiles):
    cellular, blank = cmu_tiles
    for img in cellular:
        m = segment_nuclei(img)
        assert m.dtype == np.int32 and m.shape == (64, 64)
        n = m.max()
        assert 10 <= n <= 80, n
        areas = np.bincount(m.ravel())[1:]
        # a 7 px nucleus covers ~38 px; objects are nucleus-sized, not the whole tissue
        assert 10 < np.median(areas) < 120, np.median(areas)
        # nuclei are darker in hematoxylin than the rest of the tissue
        gray = img.mean(-1)
        assert gray[m > 0].mean() < gray[m == 0].mean() - 30
    assert segment_nuclei(blank).max() == 0  # no nuclei on glass
    # CHW input gives the same answer as HWC
    np.testing.assert_array_equal(segment_nuclei(cellular[0].transpose(2, 0, 1)), segment_nuclei(cellular[0]))


def test_segment_nuclei_input_errors():
    with pytest.raises(MaskError, match="RGB"):
        segment_nuclei(np.zeros((64, 64), np.uint8))
    with pytest.raises(MaskError, match="uint8"):
        segment_nuclei(np.zeros((64, 64, 3), np.float32))


@pytest.mark.parametrize("density,diameter", [(0.1, 7.0), (0.3, 7.0), (0.2, 12.0)])
def test_procedural_nuclei_honour_density_and_size(density, diameter):
    masks = [procedural_nuclei(128, density, diameter, seed=s) for s in range(4)]
    cover = np.mean([(m > 0).mean() for m in masks])
    assert abs(cover - density) < 0.03, cover
    eq_diam = [2 * np.sqrt(a / np.pi) for m in masks for a in np.bincount(m.ravel())[1:]]
    assert abs(np.median(eq_diam) / diameter - 1) < 0.2, np.median(eq_diam)
    # instances never touch: labelling the foreground finds as many components as instances
    for m in masks:
        assert ndi.label(m > 0)[1] == m.max()
    np.testing.assert_array_equal(procedural_nuclei(64, 0.2, seed=3), procedural_nuclei(64, 0.2, seed=3))
    with pytest.raises(ValueError, match="density"):
        procedural_nuclei(64, 1.5)


def test_augment_mask_keeps_image_aligned(cmu_tiles):
    img = cmu_tiles[0][0]
    mask = segment_nuclei(img)
    for seed in range(3):
        m2, img2 = augment_mask(mask, img, seed=seed, elastic=2.0)
        # re-segmenting the transformed image finds the transformed nuclei
        assert dice(segment_nuclei(img2), m2) > 0.8
        assert m2.max() == pytest.approx(mask.max(), abs=3)
    fewer, _ = augment_mask(mask, seed=0, dihedral=False, remove=0.5)
    assert fewer.max() == mask.max() - round(0.5 * mask.max())
    more, _ = augment_mask(mask, seed=0, dihedral=False, add=0.5)
    assert more.max() > mask.max()
    with pytest.raises(MaskError, match="differ in size"):
        augment_mask(mask, img[:32])
    with pytest.raises(MaskError, match="integer"):
        augment_mask(mask.astype(float))


def test_adherence_metric_on_planted_masks():
    m = procedural_nuclei(64, 0.25, seed=0)
    assert dice(m, m) == 1.0 and match_objects(m, m) == (m.max(), m.max(), m.max())
    shifted = np.roll(m, 5, axis=1)
    assert dice(shifted, m) < 0.6
    matched, _, _ = match_objects(shifted, m)
    assert matched < m.max() // 2
    # an image drawn from the mask (dark nuclei on pink) is segmented back almost exactly
    img = np.zeros((64, 64, 3), np.uint8) + np.array([235, 180, 215], np.uint8)
    img[m > 0] = (70, 40, 120)
    rep = mask_adherence([img], [m])
    assert rep["dice"] > 0.9 and rep["object_f1"] > 0.8
    other = procedural_nuclei(64, 0.25, seed=1)
    assert mask_adherence([img], [other])["dice"] < 0.5
    with pytest.raises(MaskError, match="differ in size"):
        mask_adherence([img], [m[:32]])
