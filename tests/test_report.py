import json

import pytest
import torch
from cli_helpers import run_cli
from PIL import Image
from tiny_encoders import color_tokens

from synthgen.data.datasets import ImageListDataset, PatchDataset
from synthgen.metrics.report import write_report
from synthgen.studies.utility import utility_study


def _png(path):
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
    with Image.open(path) as im:
        return im.size


@pytest.fixture(scope="module")
def sets(kather, cmu, tmp_path_factory):
    """Real: the labelled Kather tiles; synthetic stand-in: unlabelled 64 px tiles of another
    slide (CMU), so the two sets genuinely differ."""
    root = tmp_path_factory.mktemp("report")
    run_cli(["tile", str(cmu), "--mpp", "1.0", "--size", "64", "--roi", "0,0,0.5,0.5", "-o", str(root / "t.csv")])
    return ImageListDataset.from_folder(kather, size=64), PatchDataset(root / "t.csv"), root


def test_write_report_sections_plots_and_skips(sets, tmp_path):
    real, synth, _ = sets
    # a real (tiny) utility study: the two arms that need no generator, on 32 px Kather tiles
    small = ImageListDataset.from_folder(real.paths[0].parents[1], size=32)
    util = utility_study(small, small, small.labels, None, arms=("real", "classical"), seeds=(0, 1), epochs=1)
    masks = tmp_path / "masks.json"
    masks.write_text(json.dumps({  # shaped like `synthgen eval masks --json`, plus a list
        "controlnet": {"dice": 0.61, "object_f1": 0.4, "num_images": 16},
        "baseline": {"dice": 0.3, "object_f1": 0.1, "num_images": 16},
        "dice_gain": 0.31, "condition": "tile embedding", "dice_per_image": [0.9, 0.95]}))
    out = tmp_path / "rep"
    rep = write_report(out, real, synth, color_tokens(), utility=util, audit_train=real, masks=masks,
                       k=2, n_bootstrap=5, sources={"encoder": "tiny_encoders:color_tokens"})

    assert set(rep["sections"]) == {"fidelity", "utility", "privacy", "masks"}
    assert rep["skipped"] == {"stain": "no stain results given (--stain FILE.json)"}
    assert rep["sections"]["fidelity"]["overall"]["n_real"] == len(real)
    assert rep["sections"]["fidelity"]["overall"]["fd"]["value"] > 0  # skin vs colorectal tiles
    assert rep["sections"]["privacy"]["n_synthetic"] == len(synth)
    assert json.loads((out / "report.json").read_text())["skipped"] == rep["skipped"]

    md = (out / "report.md").read_text()
    for heading in ("## Fidelity", "## Utility", "## Privacy: memorisation audit", "## Mask adherence",
                    "## Stain scores", "## Skipped sections"):
        assert heading in md
    assert "Skipped: no stain results given" in md and "- Stain scores: no stain results given" in md
    assert "| classical |" in md and "01_TUMOR" in md  # utility arms and class names
    assert "| dice_gain | 0.31 |" in md and "| dice_per_image | 0.9, 0.95 |" in md
    assert "|  | dice | object_f1 | num_images |" in md and "| controlnet | 0.61 | 0.4 | 16 |" in md  # arms table
    for name in ("samples.png", "fidelity_prdc.png", "utility_recall.png", "privacy_nn.png"):
        assert f"]({name})" in md
        w, h = _png(out / name)
        assert w > 100 and h > 60
    w, h = _png(out / "samples.png")
    assert h >= 4 * 64  # two real rows and two synthetic rows
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    rep = write_report(out, real, synth)  # again, without inputs: no stale plots left behind
    assert rep["sections"] == {} and sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md",
                                                                      "samples.png"]


def test_report_without_encoder_names_every_skipped_section(sets, tmp_path, capsys):
    real, synth, root = sets
    run_cli(["eval", "report", str(real.paths[0].parents[1]), str(root / "t.csv"), "-o", str(tmp_path / "r"),
             "--size", "64"])
    out = capsys.readouterr().out
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["sections"] == {}
    assert set(rep["skipped"]) == {"fidelity", "utility", "privacy", "masks", "stain"}
    assert "skipped fidelity: no encoder given" in out
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("Skipped: ") == 5 and "samples.png" in md
    _png(tmp_path / "r" / "samples.png")


def test_report_cli_with_encoder_and_option_errors(sets, tmp_path, capsys):
    real, _, root = sets
    kather = str(real.paths[0].parents[1])
    run_cli(["eval", "report", kather, kather, "-o", str(tmp_path / "r"), "-e", "tiny_encoders:color_tokens",
             "--size", "64", "--k", "2", "--bootstrap", "3", "--audit-against", kather])
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["sections"]["fidelity"]["overall"]["fd"]["value"] == pytest.approx(0, abs=1e-6)
    assert all(rep["sections"]["privacy"]["flagged"])  # the same images: every item is a copy
    assert rep["sources"]["encoder"] == "tiny_encoders:color_tokens"

    from synthgen.cli import main

    for extra, message in ((["--audit-against", kather], "--audit-against needs --encoder"),
                           (["--utility-train", kather], "need(s) --utility-test, --pipeline too")):
        with pytest.raises(SystemExit) as e:
            main(["eval", "report", kather, kather, "-o", str(tmp_path / "x"), *extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["eval", "report", kather, kather, "-o", str(tmp_path / "x"), "--size", "64", "--stain", str(bad)])
    assert e.value.code == 1 and "cannot read the stain results as JSON" in capsys.readouterr().err


def test_plot_helpers_draw_on_real_numbers():
    from synthgen.metrics.plots import bar_chart, histogram, nice_ticks

    assert nice_ticks(0, 1.33) == [0.0, 0.5, 1.0, 1.5] and nice_ticks(0, 8) == [0, 2, 4, 6, 8]
    img = bar_chart(["a", "b"], {"x": [0.2, float("nan")], "y": [0.5, 0.9]}, {"y": [(0.4, 0.6), (0.8, 1.0)]},
                    title="t", ylabel="v", ymax=1.0)
    assert img.size == (760, 420) and len(img.getcolors(1 << 16)) > 3  # bars drawn, not blank
    g = torch.Generator().manual_seed(0)
    img = histogram({"r": torch.rand(50, generator=g).tolist()}, threshold=0.5)
    assert len(img.getcolors(1 << 16)) > 3
