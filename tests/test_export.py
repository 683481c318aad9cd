import json
import shutil

import pytest
import torch
from cli_helpers import run_cli

from synthgen.cli import main
from synthgen.errors import SynthgenError
from synthgen.export.writers import export_dataset, verify_export


@pytest.fixture(scope="module")
def generated(cmu, tmp_path_factory):
    """slide named like a TCGA barcode -> tiles -> cache (tiny SSL, labels) -> generate (tiny pipeline)."""
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import PatchDataset
    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config, encoder_config
    from synthgen.models.vae import VAE
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.sampling import make_scheduler

    root = tmp_path_factory.mktemp("export")
    slide = root / "TCGA-AA-1234-01Z-00-DX1.svs"
    shutil.copy(cmu, slide)
    run_cli(["tile", str(slide), "--mpp", "2.0", "--size", "32", "-o", str(root / "tiles.csv")])
    torch.manual_seed(0)
    enc = SSLEncoder(**encoder_config("tiny")).eval()

    class Labelled(PatchDataset):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "label": i % 2}

    build_cache(Labelled(root / "tiles.csv"), root / "cache", {"emb": enc}, progress=False)
    SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                  make_scheduler("epsilon"), image_encoder=enc).save_pretrained(root / "pipe")
    (root / "pipe" / "LICENSE").write_text("Weights: CC BY-NC-SA 4.0 (trained on MoNuSeg), non-commercial.\n")
    run_cli(["generate", str(root / "pipe"), "-o", str(root / "gen"), "-n", "6", "--cache", str(root / "cache"),
          "--class", "1", "--filter", "--steps", "2"])
    run_cli(["generate", str(root / "pipe"), "-o", str(root / "gen0"), "-n", "4", "--cache", str(root / "cache"),
          "--class", "0", "--steps", "2"])
    return root


@pytest.mark.parametrize("fmt", ["imagefolder", "webdataset", "hf"])
def test_export_loads_in_its_ecosystem_and_verifies(generated, tmp_path, fmt):
    out = tmp_path / fmt
    run_cli(["export", str(generated / "gen"), "-o", str(out), "--format", fmt, "--class-names", "benign,tumour"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_items"] == 6 and m["classes"] == {"tumour": 6} and (out / "DATASHEET.md").exists()
    sheet = (out / "DATASHEET.md").read_text()  # the generating model's licence travels with its data
    assert "Licence of the generating model" in sheet and "CC BY-NC-SA 4.0 (trained on MoNuSeg)" in sheet
    if fmt == "imagefolder":
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(out)
        assert len(ds) == 6 and ds.classes == ["tumour"] and ds[0][0].size == (32, 32)
    elif fmt == "webdataset":
        import webdataset as wds

        samples = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode("pil"))
        assert len(samples) == 6 and samples[0]["png"].size == (32, 32) and samples[0]["cls"] == 1
    else:
        import datasets

        ds = datasets.load_dataset("parquet", data_dir=str(out / "data"), split="train")
        assert len(ds) == 6 and ds.features["label"].names == ["benign", "tumour"] and ds[0]["label"] == 1
        assert ds[0]["image"].size == (32, 32)
    assert verify_export(out)["ok"]


def test_verify_catches_tampering(generated, tmp_path, capsys):
    out = tmp_path / "e"
    export_dataset(generated / "gen", out)
    victim = sorted(out.rglob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    (out / "extra.png").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        main(["verify", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "modified" in err and "not in manifest: extra.png" in err


def test_no_trace_of_the_source_slide(generated, tmp_path):
    out = tmp_path / "shared"
    export_dataset(generated / "gen", out, "webdataset")
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for needle in (b"TCGA", b"AA-1234", b"DX1", b"CMU", b"aperio", b"Aperio"):
        assert needle not in blob, needle


def test_interrupted_export_leaves_nothing(generated, tmp_path, monkeypatch):
    import synthgen.export.writers as w

    calls = {"n": 0}
    real = w._png_bytes

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return real(path)

    monkeypatch.setattr(w, "_png_bytes", flaky)
    with pytest.raises(OSError, match="No space left"):
        export_dataset(generated / "gen", tmp_path / "x")
    assert not list(tmp_path.iterdir())  # neither the export nor its temporary folder


def test_export_errors(generated, tmp_path):
    export_dataset(generated / "gen0", tmp_path / "a", drop_rejected=True)
    with pytest.raises(SynthgenError, match="already exists"):
        export_dataset(generated / "gen0", tmp_path / "a")
    with pytest.raises(SynthgenError, match="unknown export format"):
        export_dataset(generated / "gen0", tmp_path / "b", "zip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthgenError, match="no manifest.json"):
        export_dataset(tmp_path / "empty", tmp_path / "c")
    with pytest.raises(SynthgenError, match="inside the export's source"):
        export_dataset(generated / "gen0", generated / "gen0" / "sub")
