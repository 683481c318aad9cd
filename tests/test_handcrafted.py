"""Encoder-free fidelity and the realism check, on real tiles of the CMU slide (64 px at 1 um/px,
left two thirds as the reference, right third held out, as for the shipped pipeline)."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from synthgen.metrics import handcrafted as hc


def _tiles(slide, roi, size=64, overlap=0):
    from synthgen.data.slides import Slide
    from synthgen.data.tiling import TileSpec, tile_slide

    with Slide(slide) as s:
        return [s.read(t.x, t.y, size, 1.0) for t in tile_slide(s, TileSpec(mpp=1.0, size=size, overlap=overlap,
                                                                               roi=roi), key="cmu")]


@pytest.fixture(scope="module")
def cmu_sets(cmu):
    """Non-overlapping 64 px tiles: left two thirds (reference) and right third (held out), with
    their features."""
    left, right = _tiles(cmu, (0, 0, 0.67, 1)), _tiles(cmu, (0.67, 0, 1, 1))
    assert len(left) >= 80 and len(right) >= 16
    return left, right, hc.handcrafted_features(left), hc.handcrafted_features(right)


def grey_blob(size=64):
    """A flat grey tile with one black disc and a white centre: the pipeline's ring artefact."""
    im = np.full((size, size, 3), 128, np.uint8)
    yy, xx = np.mgrid[:size, :size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    im[r2 < (size / 6) ** 2] = 0
    im[r2 < (size / 12) ** 2] = 255
    return im


def _feature(feats, name):
    return feats[:, hc.FEATURE_NAMES.index(name)]


def test_features_are_the_same_for_every_input_form(cmu_sets):
    left, _, f_left, _ = cmu_sets
    ims = left[:6]
    chw = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)
    f = hc.handcrafted_features(ims)
    assert f.shape == (6, len(hc.FEATURE_NAMES)) == (6, 49) and np.isfinite(f).all()
    np.testing.assert_array_equal(f, f_left[:6])
    np.testing.assert_array_equal(f, hc.handcrafted_features(chw))  # uint8 (N, 3, H, W)
    np.testing.assert_array_equal(f, hc.handcrafted_features(np.stack(ims)))  # numpy (N, H, W, 3)
    np.testing.assert_array_equal(f, hc.handcrafted_features([{"image": x} for x in chw]))  # dataset items
    np.testing.assert_array_equal(f[:1], hc.handcrafted_features(chw[0]))  # one (3, H, W) image
    assert len(set(map(tuple, f.round(6)))) == 6  # different tiles, different features
    mixed = hc.handcrafted_features([ims[0], _tiles_of(left[0], 128)])  # sizes may differ
    assert mixed.shape == (2, 49)
    with pytest.raises(ValueError, match="uint8"):
        hc.handcrafted_features(chw.float() / 255)
    with pytest.raises(ValueError, match="no images"):
        hc.handcrafted_features([])


def _tiles_of(im, size):
    return np.array(Image.fromarray(im).resize((size, size), Image.BICUBIC))


def test_features_read_the_stain_and_the_nuclei(cmu_sets):
    """The H features follow hematoxylin, the nuclei features the pseudo-labeller's nuclei."""
    from synthgen.data.nuclei import segment_nuclei

    left, _, f, _ = cmu_sets
    counts = np.array([segment_nuclei(im).max() for im in left])
    np.testing.assert_allclose(_feature(f, "nuclei_per_kpx"), 1000 * counts / 64**2)
    shifted = hc.handcrafted_features(hc.color_shift(left[:20], (0.5, 1.0, 1.0)))  # half the hematoxylin
    assert (_feature(shifted, "H_mean") < _feature(f[:20], "H_mean")).all()
    assert np.abs(_feature(hc.handcrafted_features(grey_blob()[None]), "E_mean")).max() < 0.02  # no eosin in grey


def test_features_are_size_robust(cmu):
    """128 px tiles and the 64 px quarters of the same tiles: every feature's mean within 0.75
    real-set std (counts or sums instead of densities and fractions would be off by 4x)."""
    big = _tiles(cmu, (0, 0, 0.67, 1), size=128)
    small = [b[y : y + 64, x : x + 64] for b in big for y in (0, 64) for x in (0, 64)]
    fb, fs = hc.handcrafted_features(big), hc.handcrafted_features(small)
    shift = np.abs(fb.mean(0) - fs.mean(0)) / fs.std(0)
    assert shift.max() < 0.75, hc.FEATURE_NAMES[int(shift.argmax())]


def test_fd_of_real_vs_itself_is_zero_and_other_tissue_is_far(cmu_sets, kather):
    left, right, f_left, f_right = cmu_sets
    assert hc.handcrafted_fd(right, right) == pytest.approx(0, abs=1e-6)
    assert hc.handcrafted_fd(None, None, real_features=f_left, synth_features=f_left) == pytest.approx(0, abs=1e-6)
    from synthgen.data.datasets import ImageListDataset

    colorectal = ImageListDataset.from_folder(kather, size=64)  # another tissue, another lab
    assert hc.handcrafted_fd(None, colorectal, real_features=f_left) > 2 * hc.handcrafted_fd(
        None, None, real_features=f_left, synth_features=f_right)


def test_report_floor_is_below_blurred_and_color_shifted(cmu_sets):
    left, right, f_left, f_right = cmu_sets
    real, f_real = left[:64], f_left[:64]
    rep = hc.encoder_free_report(real, right, seed=0, n_splits=5, real_features=f_real, synth_features=f_right)
    m = min(32, len(right))
    assert rep["n_real"] == 64 and rep["n_synthetic"] == len(right) and rep["n_per_half"] == m
    assert rep["n_features"] == 49 and rep["blur_sigma_px"] == hc.BLUR_SIGMA
    floor = rep["floor"]["mean"]
    assert 0 < floor < rep["color_shifted"]["mean"] < rep["blurred"]["mean"]
    assert rep["blurred"]["mean"] > floor + 3 * rep["blurred"]["std"] + 3 * rep["floor"]["std"]
    assert rep["color_shifted"]["mean"] > floor + 2 * rep["floor"]["std"]
    assert rep["ratio_blurred"] == pytest.approx(rep["blurred"]["mean"] / floor)
    # real held-out tiles as the "synthetic" set: a little above the floor, far below the blurred copy
    assert rep["ratio_to_floor"] < 0.5 * rep["ratio_blurred"] and rep["ratio_blurred"] > 5
    assert rep["fd"] == pytest.approx(hc.handcrafted_fd(None, None, real_features=f_real, synth_features=f_right))
    lines = hc.format_report(rep)
    assert "real vs real (floor)" in lines[2] and "x1.00 floor" in lines[2] and len(lines) == 6
    small = [hc.encoder_free_report(left[:8], right[:5], seed=s, n_splits=3) for s in (0, 0, 1)]
    assert small[0]["n_per_half"] == 4 and small[0]["floor"] == small[1]["floor"]  # seeded
    assert small[0]["floor"] != small[2]["floor"]
    with pytest.raises(ValueError, match=">= 4 real"):
        hc.encoder_free_report(left[:3], left[:3])


def test_blurred_set_scores_lower_sharpness(cmu_sets):
    left, _, f_left, _ = cmu_sets
    fb = hc.handcrafted_features(hc.blur(left))
    for name in ("log_laplacian_var", "gradient_mean", "high_freq_fraction"):
        assert (_feature(fb, name) < _feature(f_left, name)).mean() > 0.95, name
        assert _feature(fb, name).mean() < _feature(f_left, name).mean()


def test_realism_filter_rejects_a_grey_blob_and_passes_held_out_tiles(cmu_sets):
    left, right, f_left, f_right = cmu_sets
    filt = hc.RealismFilter().fit(features=f_left)
    assert len(filt) == len(left) and filt.threshold > 0
    assert filt.accept(features=f_left).mean() >= 0.99  # the references themselves
    held_out = filt.accept(features=f_right)
    assert held_out.mean() >= 0.8, filt.scores(features=f_right)
    blob = filt.scores(np.stack([grey_blob(), np.full((64, 64, 3), 200, np.uint8)]))
    assert (blob > 2 * filt.threshold).all()
    assert not filt.accept(grey_blob()[None]).any()
    heavy_blur = hc.blur(right, sigma=3.0)  # obviously degenerate too
    assert filt.accept(heavy_blur).mean() < 0.2
    # margin 1 (the plain 99th percentile) is stricter: fewer held-out tiles pass
    assert hc.RealismFilter(margin=1.0).fit(features=f_left).accept(features=f_right).mean() < held_out.mean()
    with pytest.raises(RuntimeError, match="fit"):
        hc.RealismFilter().scores(right)
    with pytest.raises(ValueError, match=">= 2 reference"):
        hc.RealismFilter().fit(right[:1])


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    """A tiny untrained embedding-conditioned pipeline (32 px): its images are not tissue."""
    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config, encoder_config
    from synthgen.models.vae import VAE
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.sampling import make_scheduler

    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                  make_scheduler("epsilon"), image_encoder=SSLEncoder(**encoder_config("tiny")).eval(), mpp=2.0
                  ).save_pretrained(root / "pipe")
    return root / "pipe"


def _folder(images, path):
    path.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


def test_generate_filter_rejects_unrealistic_images_and_reports_it(cmu_sets, tiny_pipe, tmp_path, capsys):
    left, right, _, _ = cmu_sets
    ref = _folder(left[:40], tmp_path / "ref")
    out = tmp_path / "out"
    run_cli(["generate", str(tiny_pipe), "-o", str(out), "-n", "4", "--images", str(_folder(right[:4], tmp_path / "c")),
             "--image-mpp", "1.0", "--filter", "--realism-ref", str(ref), "--steps", "2", "--batch-size", "4"])
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    r = m["realism"]
    assert r["reference"] == str(ref) and r["n_reference"] == 40 and r["checked"] == 4
    assert r["rejected"] == 4 == r["rejected_only_for_realism"]  # an untrained model makes no tissue
    assert all(it["realistic"] is False and it["accepted"] is False and it["realism_score"] > r["threshold"]
               for it in m["items"])
    assert "class_accepted" not in m["items"][0] and m["acceptance_rate"] == 0
    assert "realism check: 4 of 4 rejected as unrealistic" in printed and "accepted: 0 of 4" in printed

    from synthgen.cli import main

    with pytest.raises(SystemExit) as e:  # a reference without --filter
        main(["generate", str(tiny_pipe), "-o", str(tmp_path / "x"), "-n", "1", "--images", str(ref),
              "--realism-ref", str(ref)])
    assert e.value.code == 1 and "add --filter" in capsys.readouterr().err


def test_apply_realism_keeps_real_tiles_and_combines_with_the_class_check(cmu_sets, tmp_path):
    """A generate-style output whose images are real held-out tiles (and one grey blob): the
    realism check keeps the tiles, rejects the blob, and ``accepted`` is both checks."""
    from synthgen.workflows.generate import apply_realism, filter_summary

    left, right, f_left, _ = cmu_sets
    out = tmp_path / "gen"
    _folder([*right, grey_blob()], out / "images")
    n = len(right) + 1
    items = [{"index": i, "file": f"images/{i:03d}.png", "seed": i, "label": 0, "condition": "variations",
              "accepted": i % 2 == 0} for i in range(n)]
    (out / "manifest.json").write_text(json.dumps({"num_items": n, "items": items, "acceptance_rate": 0.5}))
    m = apply_realism(out / "manifest.json", hc.RealismFilter().fit(features=f_left), "left two thirds")
    assert m == json.loads((out / "manifest.json").read_text())
    realistic = [it["realistic"] for it in m["items"]]
    assert realistic[-1] is False and sum(realistic[:-1]) >= 0.8 * len(right)
    assert all(it["accepted"] == (it["class_accepted"] and it["realistic"]) for it in m["items"])
    assert m["realism"]["rejected"] == realistic.count(False)
    assert m["realism"]["rejected_only_for_realism"] == sum(not it["realistic"] and it["class_accepted"]
                                                            for it in m["items"])
    assert m["class_acceptance_rate"] == pytest.approx(sum(i % 2 == 0 for i in range(n)) / n)
    lines = filter_summary(m)
    assert lines[0].startswith("class filter:") and lines[1].startswith("realism check:")


def test_generate_filter_without_images_says_the_realism_check_was_skipped(tiny_pipe, kather, tmp_path, capsys):
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import ImageListDataset
    from synthgen.encoders.ssl import SSLEncoder

    ds = ImageListDataset.from_folder(kather, size=32)
    build_cache(ds, tmp_path / "cache", {"emb": SSLEncoder.from_pretrained(tiny_pipe / "image_encoder")},
                classes=ds.classes, progress=False)
    out = tmp_path / "out"
    run_cli(["generate", str(tiny_pipe), "-o", str(out), "-n", "2", "--cache", str(tmp_path / "cache"),
             "--class", "3", "--filter", "--steps", "2"])
    printed = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert "no real reference images" in m["realism"]["skipped"] and "realism check skipped" in printed
    assert all(isinstance(it["accepted"], bool) and "realistic" not in it for it in m["items"])
    assert "class filter:" in printed


def test_rare_synthesizer_counts_realism_rejections(cmu_sets, tiny_pipe):
    from tiny_encoders import color_tokens

    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.rare import RareClassSynthesizer

    left, _, _, _ = cmu_sets
    pipe = SynthPipeline.from_pretrained(tiny_pipe)
    pipe.set_progress_bar_config(disable=True)
    enc = color_tokens()
    ref = torch.from_numpy(np.stack([_tiles_of(im, 32) for im in left[:40]])).permute(0, 3, 1, 2)
    bank, labels = pipe.encode_images(ref[:8]).cpu(), torch.tensor([0, 1] * 4)
    with pytest.raises(ValueError, match="fitted"):
        RareClassSynthesizer(pipe, bank, labels, image_encoder=enc, realism_filter=hc.RealismFilter())
    synth = RareClassSynthesizer(pipe, bank, labels, image_encoder=enc, realism_filter=hc.RealismFilter().fit(ref))
    res = synth.generate(0, 3, num_inference_steps=2)
    assert res.realistic.tolist() == [False] * 3 and res.realism_rejected == 3 and not res.accepted.any()
    assert (res.realism_scores > synth.realism.threshold).all()
    plain = RareClassSynthesizer(pipe, bank, labels, image_encoder=enc).generate(0, 3, num_inference_steps=2)
    assert plain.realistic is None and plain.realism_rejected == 0


def test_eval_fidelity_cli_reports_encoder_free_rows(cmu, tmp_path, capsys):
    """Without an encoder only the encoder-free FD; with one, both (and the old keys)."""
    for name, roi in (("left", "0,0,0.67,0.4"), ("right", "0.67,0,1,1")):
        run_cli(["tile", str(cmu), "--mpp", "1.0", "--size", "64", "--roi", roi, "-o", str(tmp_path / f"{name}.csv")])
    capsys.readouterr()
    real, synth = str(tmp_path / "left.csv"), str(tmp_path / "right.csv")
    run_cli(["eval", "fidelity", real, synth, "--json", str(tmp_path / "a.json")])
    out = capsys.readouterr().out
    for row in ("encoder-free FD (49 hand-crafted features", "synthetic", "real vs real (floor)",
                "Gaussian blur sigma 1 px", "stain shift (H x0.7, E x1.3)"):
        assert row in out
    rep = json.loads((tmp_path / "a.json").read_text())
    assert set(rep) == {"encoder_free"} and rep["encoder_free"]["floor"]["mean"] > 0
    run_cli(["eval", "fidelity", synth, synth, "-e", "tiny_encoders:color_tokens", "--bootstrap", "3",
             "--json", str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["overall"]["fd"]["value"] == pytest.approx(0, abs=1e-6) and "FD 0.0000" in out
    assert rep["encoder_free"]["fd"] == pytest.approx(0, abs=1e-6) and "real vs real (floor)" in out


def test_eval_report_has_the_encoder_free_section_without_an_encoder(cmu, kather, tmp_path, capsys):
    run_cli(["tile", str(cmu), "--mpp", "1.0", "--size", "64", "--roi", "0,0,0.5,0.5", "-o", str(tmp_path / "t.csv")])
    capsys.readouterr()
    run_cli(["eval", "report", str(tmp_path / "t.csv"), str(kather), "-o", str(tmp_path / "r"), "--size", "64"])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    free = rep["encoder_free"]
    assert rep["sections"] == {} and free["n_synthetic"] == 24
    assert free["ratio_to_floor"] > 2  # colorectal tiles of another lab vs skin
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Fidelity, encoder-free features" in md and "| Fidelity, encoder-free features | included |" in md
    for row in ("| synthetic |", "| real vs real (floor) |", "| real, Gaussian blur sigma 1 px |",
                "| real, stain shift (H x0.7, E x1.3) |"):
        assert row in md
    assert "real vs real (floor)" in out
