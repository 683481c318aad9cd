"""Stain metrics on real IHC: DAB and hematoxylin fractions, paired PSNR / SSIM, correlations, report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from synthgen.data.pairs import deepliif_pair, read_rgb
from synthgen.metrics.stain import (
    as_images,
    correlation,
    dab_fraction,
    encoder_frechet_distance,
    hematoxylin_fraction,
    psnr,
    ssim,
    stain_report,
)


@pytest.fixture(scope="session")
def deepliif_strips(data_dir):
    return [data_dir / "stains" / "deepliif" / f"{name}.png" for name in ("Lung1", "Bladder1")]


@pytest.fixture(scope="session")
def ki67_patches(deepliif_strips):
    """64 px patches of both aligned DeepLIIF pairs: (Ki67 IHC uint8 (N, 3, 64, 64), the
    hematoxylin-only panel at the same places, the Ki67-positive fraction of each patch from the
    DeepLIIF segmentation panel, which lines up with the hematoxylin panel)."""
    ihc, hem, pos = [], [], []
    for path in deepliif_strips:
        pair = deepliif_pair(path)
        (x0, y0), (h, w) = pair.origin, pair.source.shape[:2]
        seg = read_rgb(path)[y0 : y0 + h, 2560 + x0 : 2560 + x0 + w].astype(int)
        red = (seg[..., 0] > 150) & (seg[..., 1] < 100) & (seg[..., 2] < 100)  # Ki67-positive nuclei
        for y in range(0, h - 63, 64):
            for x in range(0, w - 63, 64):
                ihc.append(pair.target[y : y + 64, x : x + 64])
                hem.append(pair.source[y : y + 64, x : x + 64])
                pos.append(red[y : y + 64, x : x + 64].mean())

    def chw(a):
        return torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()

    return chw(ihc), chw(hem), np.array(pos)


def test_dab_fraction_is_high_on_ihc_and_near_zero_on_the_hematoxylin_panel(deepliif_strips):
    import skimage.data

    for path in deepliif_strips:
        pair = deepliif_pair(path)
        dab_ihc, dab_hem = dab_fraction(pair.target)[0], dab_fraction(pair.source)[0]
        # measured: Ki67 IHC panel 3.0% (Lung1) and 5.7% (Bladder1); hematoxylin panel 0% and 0.03%
        assert dab_ihc > 0.02 and dab_hem < 0.002 and dab_ihc > 20 * dab_hem
        # both panels are counterstained: hematoxylin is found on both (measured 12-42%)
        assert hematoxylin_fraction(pair.source)[0] > 0.1 and hematoxylin_fraction(pair.target)[0] > 0.1
    dab_rich = skimage.data.immunohistochemistry()  # strongly DAB-stained section: measured 52%
    assert dab_fraction(dab_rich)[0] > 0.3 > hematoxylin_fraction(dab_rich)[0]


def test_dab_fraction_per_patch_follows_the_ki67_positive_nuclei(ki67_patches):
    """Per 64 px patch, the DAB fraction ranks patches as the DeepLIIF segmentation's
    Ki67-positive nuclei do (measured Spearman 0.70, Pearson 0.77 over 98 patches)."""
    ihc, _, positive = ki67_patches
    frac = dab_fraction(ihc)
    rho = correlation(frac, positive)
    assert rho["spearman"] > 0.6 and rho["pearson"] > 0.6
    assert frac[positive == 0].mean() < 0.5 * frac[positive > 0.05].mean()


def test_layouts_are_equivalent(ki67_patches):
    ihc = ki67_patches[0][:4]
    hwc = ihc.permute(0, 2, 3, 1).numpy()
    assert torch.equal(as_images(ihc), as_images(hwc))
    assert torch.equal(as_images(ihc[0]), as_images(hwc[0]))
    assert torch.allclose(as_images(ihc.float() / 255), as_images(ihc))
    assert np.array_equal(dab_fraction(ihc), dab_fraction(hwc))
    with pytest.raises(ValueError, match="must be in"):
        as_images(ihc.float())  # 0-255 floats would be read as [0, 1] and silently wrong
    with pytest.raises(ValueError, match="RGB"):
        as_images(np.zeros((2, 4, 64, 64), np.uint8))


def test_psnr_and_ssim_are_maximal_for_an_image_with_itself(ki67_patches):
    ihc, hem, _ = ki67_patches
    x = ihc[:16]
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    noisy = [(x.float() + s * torch.randn(x.shape, generator=g)).clamp(0, 255).round().to(torch.uint8) for s in (4, 16)]
    p4, p16 = psnr(x, noisy[0]), psnr(x, noisy[1])
    assert 30 < p4 < 40 and p16 < p4 - 8  # 4 grey levels of noise: ~36 dB; 4x the noise: -12 dB
    assert 1 > ssim(x, noisy[0]) > ssim(x, noisy[1]) and ssim(x, hem[:16]) < ssim(x, noisy[0])
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:8])


def test_correlation_of_identical_fractions_is_one_and_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a = rng.random(50)
    assert correlation(a, a) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    assert correlation(a, -a)["spearman"] == pytest.approx(-1.0)
    ties = np.round(a * 5) / 5  # many ties: ranks must be averaged
    b = ties + 0.3 * rng.random(50)
    c = correlation(ties, b)
    assert c["pearson"] == pytest.approx(stats.pearsonr(ties, b)[0])
    assert c["spearman"] == pytest.approx(stats.spearmanr(ties, b)[0])
    assert np.isnan(correlation(np.ones(5), a[:5])["pearson"])


def test_stain_report_perfect_and_identity_baseline(ki67_patches):
    """Virtual = real gives perfect scores; the hematoxylin panel as 'virtual IHC' (what an
    identity translation would give) has no DAB and no DAB correlation with the real IHC."""
    from tiny_encoders import color_tokens

    ihc, hem, _ = ki67_patches
    enc = color_tokens()
    same = stain_report(ihc, ihc, encoder=enc)
    assert same["n"] == len(ihc) and same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert same["dab"]["pearson"] == pytest.approx(1.0) and same["dab"]["spearman"] == pytest.approx(1.0)
    assert same["dab"]["mean_abs_diff"] == 0 and same["fd"] == pytest.approx(0.0, abs=1e-6)
    base = stain_report(ihc, hem, encoder=enc)
    assert base["dab"]["virtual_mean"] < 0.1 * base["dab"]["real_mean"]
    assert base["dab"]["mean_abs_diff"] > 0.5 * base["dab"]["real_mean"]
    assert base["psnr"] < 25 and base["ssim"] < 0.8 and base["fd"] > 0.01
    assert base["fd"] == pytest.approx(encoder_frechet_distance(ihc, hem, enc), rel=1e-6)
    assert len(base["per_patch"]["dab_real"]) == len(ihc)
    assert np.allclose(base["per_patch"]["dab_real"], dab_fraction(ihc))
