"""``synthgen adapt``: fine-tune the v2 pipeline on a user's ImageFolder (all classes), then
generate a class by name from the adapted pipeline with no other files (issue 17)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import run_cli
from conftest import V2
from PIL import Image

from synthgen.cli import main
from synthgen.models.denoiser import Denoiser


def _dataset(kather, root, classes=("TUMOR", "STROMA")):
    """An ImageFolder of real Kather 2016 tiles (150 px at 0.495 um/px), 3 per class."""
    for c in classes:
        (root / c).mkdir(parents=True)
        for f in sorted(kather.glob(f"*_{c}/*")):
            shutil.copy(f, root / c / f.name)
    return root


def _err(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def adapted(kather, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    data = _dataset(kather, root / "data")
    args = ["adapt", str(data), "-o", str(root / "pipe"), "--image-mpp", "0.495", "--steps", "3",
            "--prior-steps", "10", "--batch-size", "8"]
    run_cli(args)
    return root, args


def test_adapt_writes_a_pipeline_that_generates_a_class_by_name(adapted, tmp_path, capsys):
    root, _ = adapted
    pipe = root / "pipe"
    cfg = json.loads((pipe / "transformer" / "config.json").read_text())
    assert cfg["class_names"] == ["STROMA", "TUMOR"] and cfg["num_classes"] == 2
    summary = json.loads((pipe / "adapt.json").read_text())
    assert summary["tiles_per_class"] == {"STROMA": 3, "TUMOR": 3} and summary["mpp"] == 0.5
    index = json.loads((pipe / "model_index.json").read_text())
    assert "fast_transformer" not in index and index["mpp"] == 0.5  # the base's student is dropped
    assert json.loads((pipe / "prior" / "config.json").read_text())["class_names"] == ["STROMA", "TUMOR"]
    assert "Licence" in (pipe / "README.md").read_text() and (pipe / "README.base.md").is_file()
    # the fine-tune moved the denoiser away from the base
    base, new = Denoiser.from_pretrained(V2 / "transformer").state_dict(), Denoiser.from_pretrained(
        pipe / "transformer").state_dict()
    assert any(not torch.equal(base[k], new[k]) for k in base if k != "class_embedding.weight")

    run_cli(["generate", str(pipe), "--class", "TUMOR", "-n", "2", "--steps", "2", "-o", str(tmp_path / "g")])
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert man["class_name"] == "TUMOR" and [it["label"] for it in man["items"]] == [1, 1]
    with Image.open(tmp_path / "g" / man["items"][0]["file"]) as im:
        assert im.size == (128, 128)
    code, err = _err(["generate", pipe, "--class", "ADIPOSE", "-n", "1", "-o", tmp_path / "h"], capsys)
    assert code == 1 and "ADIPOSE" in err and "TUMOR" in err and "Traceback" not in err
    # anchored variations of the user's own tiles, of a class named from the pipeline (no cache)
    run_cli(["generate", str(pipe), "--images", str(root / "data" / "TUMOR"), "--image-mpp", "0.495", "--class",
             "tumor", "--strength", "0.5", "-n", "2", "--steps", "2", "-o", str(tmp_path / "v")])
    man = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert man["class_name"] == "TUMOR" and man["mode"] == "variations" and [it["label"] for it in man["items"]] == [1, 1]
    code, err = _err(["generate", pipe, "--images", root / "data" / "TUMOR", "--image-mpp", "0.495", "--class",
                      "ADIPOSE", "-n", "1", "-o", tmp_path / "w"], capsys)
    assert code == 1 and "the pipeline has classes 0 STROMA, 1 TUMOR" in err and "Traceback" not in err


def test_adapt_rerun_resumes_without_training_again(adapted):
    root, args = adapted
    before = (root / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    mtime = (root / ".pipe.adapt" / "denoiser" / "model").stat().st_mtime
    run_cli(args)
    assert (root / ".pipe.adapt" / "denoiser" / "model").stat().st_mtime == mtime  # not retrained
    assert (root / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_with_classes_keeps_known_classes_and_starts_new_ones_as_the_null_class():
    base = Denoiser.from_pretrained(V2 / "transformer").eval()
    names = base.config.class_names
    new = Denoiser.with_classes(base, ["TUMOR", "MY_RARE"]).eval()
    w, bw = new.class_embedding.weight, base.class_embedding.weight
    assert torch.equal(w[0], bw[names.index("TUMOR")]) and torch.equal(w[1], bw[len(names)])
    assert torch.equal(w[2], bw[len(names)])  # the null class
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    emb = torch.randn(2, base.config.caption_num_tokens, base.config.caption_channels, generator=g)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        a = new(x, t, embeddings=emb, class_labels=torch.tensor([0, 1])).sample
        b = base(x, t, embeddings=emb, class_labels=torch.tensor([names.index("TUMOR"), -1])).sample
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="distinct"):
        Denoiser.with_classes(base, ["A", "A"])


def test_adapt_bad_datasets_fail_clearly(kather, tmp_path, capsys):
    data = _dataset(kather, tmp_path / "d")
    out = tmp_path / "p"
    code, err = _err(["adapt", data, "-o", out, "--steps", "1"], capsys)  # 150 px tiles, no --image-mpp
    assert code == 1 and "150x150" in err and "--image-mpp" in err and "Traceback" not in err
    (data / "EMPTY").mkdir()
    code, err = _err(["adapt", data, "-o", out, "--image-mpp", "0.495", "--steps", "1"], capsys)
    assert code == 1 and "class EMPTY has no images" in err
    one = _dataset(kather, tmp_path / "one", ("TUMOR",))
    code, err = _err(["adapt", one, "-o", out, "--image-mpp", "0.495", "--steps", "1"], capsys)
    assert code == 1 and "one class" in err
    (data / "EMPTY").rmdir()
    code, err = _err(["adapt", data, "-o", out, "--image-mpp", "0.1", "--steps", "1"], capsys)
    assert code == 1 and "smaller than its 128 px tiles" in err
    assert not out.exists()  # nothing partial written
