"""A pipeline knows its scale: tile table -> cache -> assemble -> the commands that read slides."""

import json

import numpy as np
import torch
from cli_helpers import run_cli
from PIL import Image

from synthgen.data.cache import CacheDataset
from synthgen.encoders.ssl import SSLEncoder
from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config, encoder_config
from synthgen.models.vae import VAE
from synthgen.pipelines.generate import SynthPipeline


def _tiff_mpp(path) -> float:
    with Image.open(path) as im:
        x_res, unit = im.tag_v2[282], im.tag_v2.get(296)
    assert unit == 3  # centimetres
    return 1e4 / float(x_res)


def test_scale_travels_from_the_tile_table_to_the_commands(cmu, tmp_path, capsys):
    torch.manual_seed(0)
    enc = SSLEncoder(**encoder_config("tiny")).eval()
    enc.save_pretrained(tmp_path / "enc")
    run_cli(["tile", str(cmu), "--mpp", "4.0", "--size", "32", "-o", str(tmp_path / "tiles.csv")])
    run_cli(["cache", str(tmp_path / "tiles.csv"), "-o", str(tmp_path / "cache"), "-e", f"emb=ssl:{tmp_path / 'enc'}"])
    assert CacheDataset(tmp_path / "cache").mpp == 4.0

    run = tmp_path / "run"
    Denoiser(**denoiser_config("tiny")).save_pretrained(run / "model")
    (run / "config.json").write_text(json.dumps({"objective": {"kind": "epsilon"},
                                                 "data": {"cache": str(tmp_path / "cache")}}))
    VAE.from_preset("tiny").save_pretrained(tmp_path / "vae")
    capsys.readouterr()
    run_cli(["assemble", "-o", str(tmp_path / "pipe"), "--denoiser", str(run / "model"),
             "--vae", str(tmp_path / "vae"), "--encoder", str(tmp_path / "enc")])
    assert "4 um/px" in capsys.readouterr().out
    pipe = SynthPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.mpp == 4.0 and pipe.resolve_mpp(None) == 4.0 and pipe.resolve_mpp(0.5) == 0.5
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["mpp"] == 4.0

    # synthgen large reads the reference region at the pipeline's scale unless told otherwise
    for extra, want in (([], 4.0), (["--mpp", "2.0"], 2.0)):
        tif = tmp_path / f"large{want}.tif"
        run_cli(["large", str(tmp_path / "pipe"), "-o", str(tif), "--size", "48", "--reference", str(cmu),
                 "--steps", "1", *extra])
        assert abs(_tiff_mpp(tif) - want) < 1e-3
        assert np.asarray(Image.open(tif.with_suffix(".png"))).shape == (48, 48, 3)

    # --mpp overrides the cache's; a pipeline without a recorded scale says so and defaults to 1.0
    run_cli(["assemble", "-o", str(tmp_path / "pipe2"), "--denoiser", str(run / "model"),
             "--vae", str(tmp_path / "vae"), "--mpp", "0.25"])
    assert SynthPipeline.from_pretrained(tmp_path / "pipe2").mpp == 0.25
    (run / "config.json").write_text(json.dumps({"objective": {"kind": "epsilon"}}))
    capsys.readouterr()
    run_cli(["assemble", "-o", str(tmp_path / "pipe3"), "--denoiser", str(run / "model"),
             "--vae", str(tmp_path / "vae")])
    assert "scale not recorded" in capsys.readouterr().out
    legacy = SynthPipeline.from_pretrained(tmp_path / "pipe3")
    assert legacy.mpp is None and legacy.resolve_mpp(None) == 1.0


def test_shipped_pipelines_record_their_scale(small_pipe, v2_pipe):
    assert small_pipe.mpp == 1.0 and v2_pipe.mpp == 0.5


def test_a_cache_from_before_the_scale_was_stored_still_resumes(cmu, tmp_path):
    torch.manual_seed(0)
    SSLEncoder(**encoder_config("tiny")).eval().save_pretrained(tmp_path / "enc")
    run_cli(["tile", str(cmu), "--mpp", "4.0", "--size", "32", "-o", str(tmp_path / "tiles.csv")])
    args = ["cache", str(tmp_path / "tiles.csv"), "-o", str(tmp_path / "cache"), "-e", f"emb=ssl:{tmp_path / 'enc'}"]
    run_cli(args)
    cfg = tmp_path / "cache" / "config.json"
    old = json.loads(cfg.read_text())
    old.pop("mpp")
    cfg.write_text(json.dumps(old))
    run_cli(args)  # no "another configuration" error
    assert CacheDataset(tmp_path / "cache").mpp is None


def test_generate_refuses_references_at_another_scale_unless_told(small_pipe, tmp_path, capsys):
    """--images at the model's size are taken as they are; other sizes need --image-mpp, which
    resamples them to the pipeline's scale (1 um/px here) and centre-crops to its 64 px tiles."""
    from conftest import SMALL

    from synthgen.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "big").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(90, 230, (128, 128, 3), dtype=np.uint8)).save(tmp_path / "big" / f"{i}.png")
    try:
        main(["generate", str(SMALL), "-o", str(tmp_path / "o1"), "-n", "2", "--images", str(tmp_path / "big"),
              "--steps", "1"])
    except SystemExit as e:
        assert e.code == 1
    err = capsys.readouterr().err
    assert "128x128 px" in err and "64x64 px tiles at 1 um/px" in err and "--image-mpp" in err
    assert not (tmp_path / "o1" / "manifest.json").exists()
    run_cli(["generate", str(SMALL), "-o", str(tmp_path / "o2"), "-n", "2", "--images", str(tmp_path / "big"),
             "--image-mpp", "0.5", "--steps", "1"])  # 128 px at 0.5 um/px = 64 px at 1 um/px
    assert len(json.loads((tmp_path / "o2" / "manifest.json").read_text())["items"]) == 2
    try:
        main(["generate", str(SMALL), "-o", str(tmp_path / "o3"), "-n", "2", "--images", str(tmp_path / "big"),
              "--image-mpp", "0.25", "--steps", "1"])  # 32 px at the model's scale: too small
    except SystemExit as e:
        assert e.code == 1
    assert "smaller than its 64 px tiles" in capsys.readouterr().err
