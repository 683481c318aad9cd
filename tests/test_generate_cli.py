import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from synthgen.cli import main
from synthgen.data.cache import build_cache
from synthgen.data.datasets import ImageListDataset
from synthgen.encoders.ssl import SSLEncoder
from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config, encoder_config
from synthgen.models.prior import EmbeddingPrior
from synthgen.models.vae import VAE
from synthgen.pipelines.generate import SynthPipeline
from synthgen.sampling import make_scheduler


@pytest.fixture(scope="module")
def setup(kather, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    enc = SSLEncoder(**encoder_config("tiny")).eval()
    SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                  make_scheduler("epsilon"), image_encoder=enc).save_pretrained(root / "pipe")
    ds = ImageListDataset.from_folder(kather, size=32)
    build_cache(ds, root / "cache", {"emb": enc}, classes=ds.classes, progress=False)
    prior = EmbeddingPrior(num_tokens=1, dim=32, num_classes=8, width=32, depth=1)
    prior.save_pretrained(root / "prior")
    return root




def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


ARGS = ["-n", "6", "--class", "3", "--steps", "3", "--batch-size", "4", "--seed", "5"]


def test_generate_with_filter_writes_manifest(setup, tmp_path):
    out = tmp_path / "out"
    run_cli(["generate", str(setup / "pipe"), "-o", str(out), "--cache", str(setup / "cache"), "--filter", *ARGS])
    m = _manifest(out)
    assert m["num_items"] == 6 and len(m["items"]) == 6 and m["mode"] == "variations"
    assert [it["seed"] for it in m["items"]] == [5_000_000 + i for i in range(6)]
    assert all(it["label"] == 3 and isinstance(it["accepted"], bool) for it in m["items"])
    assert 0 <= m["acceptance_rate"] <= 1
    assert len(list((out / "images").glob("*.png"))) == 6


def test_resume_after_partial_run_gives_same_files(setup, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    base = ["--cache", str(setup / "cache"), "--mode", "interpolation", *ARGS]
    run_cli(["generate", str(setup / "pipe"), "-o", str(full), *base])
    run_cli(["generate", str(setup / "pipe"), "-o", str(part), *base])
    # simulate a kill: the manifest, two images and a torn last record line are lost
    (part / "manifest.json").unlink()
    for i in (1, 4):
        (part / "images" / f"{i:07d}.png").unlink()
    rec = part / "records" / "rank-0.jsonl"
    rec.write_text(rec.read_text() + '{"index": 9, "fi')
    run_cli(["generate", str(setup / "pipe"), "-o", str(part), *base])
    a, b = _manifest(full)["items"], _manifest(part)["items"]
    assert [x["sha256"] for x in a] == [x["sha256"] for x in b]
    assert len({x["index"] for x in b}) == 6  # no duplicates


def test_two_processes_make_exactly_the_one_process_files(setup, tmp_path):
    base = ["generate", str(setup / "pipe"), "--cache", str(setup / "cache"), *ARGS]
    run_cli([*base[:2], "-o", str(tmp_path / "one"), *base[2:]])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "synthgen", *base[:2], "-o", str(tmp_path / "two"), *base[2:]],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = _manifest(tmp_path / "one"), _manifest(tmp_path / "two")
    keys = ("index", "file", "seed", "label", "condition")
    assert [[x[k] for k in keys] for x in one["items"]] == [[x[k] for k in keys] for x in two["items"]]
    assert sorted(p.name for p in (tmp_path / "two" / "records").iterdir()) == ["rank-0.jsonl", "rank-1.jsonl"]
    # the same images: batches are composed differently across processes, so float rounding may
    # move a pixel by one grey level after quantisation, never more
    for x in one["items"]:
        a = np.asarray(Image.open(tmp_path / "one" / x["file"]), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "two" / x["file"]), dtype=np.int16)
        assert np.abs(a - b).max() <= 1 and np.abs(a - b).mean() < 0.01


def test_prior_mode_and_errors(setup, tmp_path, capsys):
    run_cli(["generate", str(setup / "pipe"), "-o", str(tmp_path / "p"), "--mode", "prior", "--prior",
          str(setup / "prior"), "-n", "2", "--class", "1", "--steps", "2"])
    assert _manifest(tmp_path / "p")["mode"] == "prior"
    with pytest.raises(SystemExit) as e:
        main(["generate", str(setup / "pipe"), "-o", str(tmp_path / "x"), "-n", "2", "--mode", "prior", "--class", "1"])
    assert e.value.code == 1 and "--mode prior needs --prior" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", str(setup / "pipe"), "-o", str(tmp_path / "x"), "-n", "2"])
    assert e.value.code == 1 and "class-conditional" in capsys.readouterr().err


def test_large_cli_resynthesises_a_slide_region(setup, cmu, tmp_path):
    from synthgen.data.slides import Slide

    out = tmp_path / "big.tif"
    run_cli(["large", str(setup / "pipe"), "-o", str(out), "--size", "64", "--reference", str(cmu),
          "--x", "800", "--y", "1200", "--steps", "2"])
    with Slide(out) as s:
        assert s.dimensions == (64, 64) and s.mpp == pytest.approx(1.0)
    assert out.with_suffix(".png").exists()
    # from a cache: one embedding of a class picked by name (or id), else a named error
    run_cli(["large", str(setup / "pipe"), "-o", str(tmp_path / "c.tif"), "--size", "48", "--cache",
             str(setup / "cache"), "--class", "06_mucosa", "--steps", "1"])
    assert Image.open(tmp_path / "c.png").size == (48, 48)
    from synthgen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["large", str(setup / "pipe"), "-o", str(tmp_path / "d.tif"), "--size", "48", "--cache",
              str(setup / "cache"), "--class", "bone", "--steps", "1"])
    assert e.value.code == 1


def test_assemble_reads_the_objective_of_therun_cli(setup, tmp_path):
    from synthgen.pipelines.generate import SynthPipeline

    run = tmp_path / "run"
    Denoiser(**denoiser_config("tiny")).save_pretrained(run / "model")
    (run / "config.json").write_text(json.dumps({"objective": {"kind": "v_prediction", "num_train_timesteps": 1000,
                                                               "beta_schedule": "linear"}}))
    VAE.from_preset("tiny").save_pretrained(tmp_path / "vae")
    run_cli(["assemble", "-o", str(tmp_path / "pipe"), "--denoiser", str(run / "model"), "--vae", str(tmp_path / "vae"),
          "--encoder", str(setup / "pipe" / "image_encoder")])
    pipe = SynthPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.image_encoder is not None
    # a released pipeline's layout (transformer/, vae/ subfolders, as on the hub) plus a mask branch
    from synthgen.models.controlnet import MaskControlNet

    MaskControlNet.from_denoiser(pipe.transformer, num_layers=1).save_pretrained(tmp_path / "cn")
    run_cli(["assemble", "-o", str(tmp_path / "pipe2"), "--denoiser", str(tmp_path / "pipe"), "--vae",
             str(tmp_path / "pipe"), "--prediction", "epsilon", "--controlnet", str(tmp_path / "cn")])
    pipe2 = SynthPipeline.from_pretrained(tmp_path / "pipe2")
    assert pipe2.controlnet is not None and pipe2.scheduler.config.prediction_type == "epsilon"
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in pipe2.transformer.state_dict().items())


def test_sampler_option_keeps_the_pipelines_objective_cli(setup, tmp_path):
    """--sampler switches the solver, never what the model predicts (a flow pipeline stays flow)."""
    from synthgen.sampling import prediction_of, scheduler_for

    flow = tmp_path / "flow"
    pipe = SynthPipeline.from_pretrained(setup / "pipe")
    SynthPipeline(pipe.transformer, pipe.vae, make_scheduler("flow"), image_encoder=pipe.image_encoder,
                  mpp=1.0).save_pretrained(flow)
    for folder, want in ((flow, "FlowMatchEulerDiscreteScheduler"), (setup / "pipe", "DDIMScheduler")):
        out = tmp_path / f"out_{folder.name}"
        run_cli(["generate", str(folder), "-o", str(out), "--cache", str(setup / "cache"), "--sampler", "ddim",
                 "-n", "2", "--steps", "2"])
        assert _manifest(out)["sampler"] == want
    v = scheduler_for(make_scheduler("v_prediction"), "ddim")
    assert type(v).__name__ == "DDIMScheduler" and prediction_of(v) == "v_prediction"
    assert prediction_of(scheduler_for(make_scheduler("flow"), "euler")) == "flow"
    assert scheduler_for(pipe.scheduler) is pipe.scheduler
