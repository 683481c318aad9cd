import numpy as np
import pytest
import torch

from synthgen.metrics.fidelity import bootstrap, fidelity_report, frechet_distance, kid, prdc


def _gauss(n, d=8, shift=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * scale + shift


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise():
    x = _gauss(500)
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    fds = [frechet_distance(x, x + _gauss(500, seed=1) * s) for s in (0.1, 0.3, 0.6, 1.0)]
    assert all(a < b for a, b in zip(fds, fds[1:], strict=False))


def test_fd_matches_closed_form_for_gaussians():
    # N(0, I) vs N(m, s^2 I) in d dims: ||m||^2 + d (1 - s)^2
    a, b = _gauss(20000, d=4), _gauss(20000, d=4, shift=0.5, scale=2.0, seed=1)
    assert frechet_distance(a, b) == pytest.approx(4 * 0.25 + 4 * 1.0, rel=0.05)


def test_kid_is_unbiased_on_small_sets():
    """Same distribution: the KID estimates centre on 0 even with 30 samples; different: > 0."""
    same = [kid(_gauss(30, seed=2 * i), _gauss(30, seed=2 * i + 1), subset_size=30, num_subsets=1)[0]
            for i in range(200)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same))
    diff, _ = kid(_gauss(30), _gauss(30, shift=1.0, seed=1), subset_size=30, num_subsets=20)
    assert diff > 10 * np.std(same)


def test_precision_recall_on_planted_distributions():
    real = _gauss(400)
    narrow = _gauss(400, scale=0.3, seed=1)  # realistic but not diverse: high precision, low recall
    broad = _gauss(400, scale=3.0, seed=2)  # diverse but unrealistic: low precision, high recall
    same = _gauss(400, seed=3)
    pn, pb, ps = prdc(real, narrow), prdc(real, broad), prdc(real, same)
    assert pn["precision"] > 0.95 and pn["recall"] < 0.3
    assert pb["precision"] < 0.3 and pb["recall"] > 0.9
    assert ps["precision"] > 0.7 and ps["recall"] > 0.7 and 0.7 < ps["density"] < 1.3 and ps["coverage"] > 0.9


def test_bootstrap_interval_and_per_class_report():
    real, fake = _gauss(200), _gauss(200, shift=0.3, seed=1)
    v, lo, hi = bootstrap(frechet_distance, real, fake, n=50)
    assert lo <= v <= hi and hi - lo > 0
    small_r = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))  # few items: resampling biases FD up
    small_f = torch.randn(40, 16, generator=torch.Generator().manual_seed(1)) + 0.1
    v, lo, hi = bootstrap(frechet_distance, small_r, small_f, n=50)
    assert lo <= v <= hi  # the bias-corrected interval holds its own point estimate
    labels = torch.arange(200) % 2
    rep = fidelity_report(real, fake, labels, labels, n_bootstrap=10)
    assert set(rep["per_class"]) == {0, 1} and rep["overall"]["n_real"] == 200


def test_eval_fidelity_cli_on_real_tiles(kather, tmp_path, capsys):
    import json

    from synthgen.cli import main

    main(["eval", "fidelity", str(kather), str(kather), "-e", "tiny_encoders:color_tokens", "--size", "64",
          "--bootstrap", "5", "--k", "2", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["overall"]["fd"]["value"] == pytest.approx(0, abs=1e-6) and "FD 0.0000" in out
    assert len(rep["per_class"]) == 0  # 3 tiles per class: too few for per-class statistics


def test_fd_agrees_with_torchmetrics_custom_feature_module(kather):
    """Our FD on encoder features equals torchmetrics' FrechetInceptionDistance given the same
    encoder as its feature module."""
    from tiny_encoders import color_tokens
    from torchmetrics.image.fid import FrechetInceptionDistance

    from synthgen.data.datasets import ImageListDataset
    from synthgen.metrics.fidelity import extract_features

    enc = color_tokens()

    class Features(torch.nn.Module):
        def forward(self, x):
            return enc(x).reshape(len(x), -1).double()

    ds = ImageListDataset.from_folder(kather, size=64)
    feats, labels = extract_features(enc, ds)
    real, fake = feats[labels < 4], feats[labels >= 4]
    fid = FrechetInceptionDistance(feature=Features(), normalize=False)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    fid.update(images[labels < 4], real=True)
    fid.update(images[labels >= 4], real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(fid.compute()), rel=1e-3)
