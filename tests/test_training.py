import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_encoders import color_tokens, pooled_latents

from synthgen.config import ConfigError, load_train_config, to_dict
from synthgen.data.cache import build_cache
from synthgen.data.datasets import PatchDataset
from synthgen.data.slides import Slide
from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table
from synthgen.errors import SynthgenError
from synthgen.training.trainer import train

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cache(cmu, tmp_path_factory):
    """Real tiles of the CMU slide (64 px at 1 um/px): pixel-space 'latents' and colour tokens."""
    root = tmp_path_factory.mktemp("train-data")
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=1.0, size=64, min_tissue=0.3), key="cmu")
    write_tile_table(tiles, root / "tiles.csv", {"cmu": {"path": str(cmu)}})
    build_cache(PatchDataset(root / "tiles.csv"), root / "cache",
                {"latents": pooled_latents(), "emb": color_tokens()}, shard_size=64, progress=False)
    return root


def denoiser_cfg(cache, out, **over):
    data = {
        "task": "denoiser", "output_dir": str(out), "steps": 40, "seed": 3,
        "model": {"preset": "tiny", "overrides": {"in_channels": 3, "out_channels": 3, "caption_channels": 8,
                                                   "caption_num_tokens": 4}},
        "data": {"cache": str(cache / "cache"), "num_workers": 0},
        "optim": {"lr": 3e-3, "batch_size": 16, "warmup_steps": 5},
        "log_every": 5, "checkpoint_every": 10, "keep_checkpoints": 2, "ema_decay": 0.9,
    }
    return load_train_config(None, {**data, **over}) if not over else load_train_config(None, _deep(data, over))


def _deep(a, b):
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_denoiser_loss_drops_on_real_tiles(cache, tmp_path):
    res = train(denoiser_cfg(cache, tmp_path / "run"), progress=False)
    losses = _losses(tmp_path / "run")
    assert res.step == 40 and not res.interrupted
    assert losses[-1] < 0.7 * losses[0]
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000030", "step-0000040"]


@pytest.mark.parametrize("objective", ["v_prediction", "flow"])
def test_other_objectives_learn(cache, tmp_path, objective):
    cfg = denoiser_cfg(cache, tmp_path / objective, objective={"kind": objective, "timesteps": "logit_normal"})
    train(cfg, progress=False)
    losses = _losses(tmp_path / objective)
    assert losses[-1] < 0.8 * losses[0]


def test_resumed_run_equals_uninterrupted(cache, tmp_path):
    full = train(denoiser_cfg(cache, tmp_path / "full"), progress=False)
    part = train(denoiser_cfg(cache, tmp_path / "part"), stop_at=17, progress=False)
    assert part.interrupted and part.step == 17
    assert (tmp_path / "part" / "checkpoints" / "step-0000017").exists()
    assert not (tmp_path / "part" / "model").exists()
    with pytest.raises(SynthgenError, match="already holds checkpoints"):
        train(denoiser_cfg(cache, tmp_path / "part"), progress=False)
    rest = train(denoiser_cfg(cache, tmp_path / "part"), resume="latest", progress=False)
    assert rest.step == 40
    a, b = full.model.state_dict(), rest.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    ema_a = load_file(tmp_path / "full" / "model" / "diffusion_pytorch_model.safetensors")
    ema_b = load_file(tmp_path / "part" / "model" / "diffusion_pytorch_model.safetensors")
    for k in ema_a:
        torch.testing.assert_close(ema_a[k], ema_b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ema_a["proj_out.weight"], a["proj_out.weight"])  # EMA weights were saved


def test_grad_accumulation_and_class_conditioning(cache, tmp_path, kather):
    root = tmp_path / "k"
    from synthgen.data.datasets import ImageListDataset

    build_cache(ImageListDataset.from_folder(kather, size=64), root / "cache",
                {"latents": pooled_latents(), "emb": color_tokens()}, shard_size=64, progress=False)
    cfg = denoiser_cfg(root, tmp_path / "cls", steps=12, optim={"batch_size": 4, "grad_accum": 2},
                       data={"use_labels": True},
                       model={"overrides": {"use_embeddings": False, "num_classes": 8}})
    res = train(cfg, progress=False)
    assert res.step == 12 and res.model.config.num_classes == 8


def test_sigterm_leaves_resumable_checkpoint(cache, tmp_path):
    cfg_file = tmp_path / "cfg.json"
    cfg = json.loads(json.dumps({
        "task": "denoiser", "output_dir": str(tmp_path / "run"), "steps": 100000, "log_every": 1,
        "checkpoint_every": 100000,
        "model": {"preset": "tiny", "overrides": {"in_channels": 3, "out_channels": 3, "caption_channels": 8,
                                                   "caption_num_tokens": 4}},
        "data": {"cache": str(cache / "cache"), "num_workers": 0}, "optim": {"batch_size": 8}}))
    cfg_file.write_text(json.dumps(cfg))  # JSON is YAML
    proc = subprocess.Popen([sys.executable, "-m", "synthgen", "train", str(cfg_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() or len(_losses(tmp_path / "run")) < 3:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume latest" in err
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert step >= 3
    res = train(load_train_config(cfg_file, [f"steps={step + 2}"]), resume="latest", progress=False)
    assert res.step == step + 2 and not res.interrupted


def test_two_process_gloo_run_keeps_ranks_identical(cache, tmp_path):
    cfg = denoiser_cfg(cache, tmp_path / "ddp", steps=6, optim={"batch_size": 8}, checkpoint_every=3)
    cfg_file = tmp_path / "cfg.json"

    cfg_file.write_text(json.dumps(to_dict(cfg)))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(TESTS / "dist_train.py"), str(cfg_file), str(tmp_path / "hashes")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    h0 = (tmp_path / "hashes" / "rank0.txt").read_text()
    h1 = (tmp_path / "hashes" / "rank1.txt").read_text()
    assert h0 == h1 and h0.startswith("world=2 ")
    # the run continues from its checkpoint on 2 processes too
    assert (tmp_path / "ddp" / "checkpoints" / "step-0000006").exists()


@pytest.mark.parametrize("over,match", [
    ({"objective": {"kind": "eps"}}, r"objective\.kind: 'eps' is not one of epsilon, v_prediction, flow"),
    ({"optim": {"batch_size": 0}}, r"optim\.batch_size: must be positive"),
    ({"optim": {"lr": "fast"}}, r"optim\.lr: expected a number"),
    ({"task": "gan"}, r"task: 'gan' is not one of denoiser, controlnet, vae, ssl, prior, translator"),
    ({"modle": {}}, r"modle: unknown field"),
    ({"data": {"cache": "/nonexistent/cache"}}, r"/nonexistent/cache: no index\.json"),
    ({"optim": {"batch_size": 100000}}, r"optim\.batch_size: 100000 per process is more than"),
    ({"model": {"overrides": {"caption_num_tokens": 3}}}, r"model: cannot build the denoiser.*square"),
    ({"objective": {"kl_weight": 1e-3}}, r"objective\.kl_weight: task denoiser does not read it \(its objective fields: cfg_dropout, kind,"),
    ({"objective": {"distill_skip": 10}}, r"objective\.distill_skip: task denoiser does not read it"),
])
def test_invalid_configs_fail_clearly(cache, tmp_path, over, match):
    with pytest.raises((ConfigError, SynthgenError), match=match):
        train(denoiser_cfg(cache, tmp_path / "bad", **over), progress=False)


def test_objective_fields_belong_to_their_tasks():
    """Each task has its own objective class: a field of another task's is refused, even at its
    default, naming the fields the task reads; a saved config reads back as the same config."""
    from synthgen.config import (
        OBJECTIVE_OF,
        TASKS,
        ConsistencyObjectiveConfig,
        VAEObjectiveConfig,
        from_dict,
    )

    base = {"output_dir": "x", "steps": 1}
    with pytest.raises(ConfigError, match=r"objective\.kind: task vae does not read it \(its objective fields: kl_weight"):
        load_train_config(None, {**base, "task": "vae", "objective": {"kind": "epsilon"}})
    with pytest.raises(ConfigError, match=r"objective\.temperature: task prior"):
        load_train_config(None, {**base, "task": "prior", "objective": {"temperature": 0.5}})
    with pytest.raises(ConfigError, match=r"objective\.cfg_dropout_image: task denoiser"):
        load_train_config(None, {**base, "task": "denoiser", "objective": {"cfg_dropout_image": 0.1}})
    assert load_train_config(None, {**base, "task": "prior", "objective": {"cfg_dropout": 0.2}}).objective.cfg_dropout == 0.2
    assert load_train_config(None, {**base, "task": "ssl", "objective": {"blur": 0.5}}).objective.blur == 0.5
    cons = load_train_config(None, {**base, "task": "consistency", "objective": {"kind": "v_prediction"}})
    assert type(cons.objective) is ConsistencyObjectiveConfig and cons.objective.distill_target_decay == 0.95
    assert set(OBJECTIVE_OF) == set(TASKS)
    for task in TASKS:
        cfg = load_train_config(None, {**base, "task": task})
        assert type(cfg.objective) is OBJECTIVE_OF[task]
        assert from_dict(type(cfg), to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match=r"objective: task denoiser takes a DiffusionObjectiveConfig, got VAEObjectiveConfig"):
        dataclasses.replace(cons, task="denoiser", objective=VAEObjectiveConfig())
    with pytest.raises(ConfigError, match=r"objective\.cfg_dropout: must be in \[0, 1\)"):
        load_train_config(None, {**base, "task": "translator", "objective": {"cfg_dropout": 1.0}})


def test_missing_config_fields():
    with pytest.raises(ConfigError, match="task: required field is missing"):
        load_train_config(None, {"output_dir": "x", "steps": 1})
    with pytest.raises(ConfigError, match="override 'steps': expected key=value"):
        load_train_config(None, ["steps"])


def test_yaml_words_that_read_as_booleans_are_choices():
    # YAML 1.1 reads a bare `no` as false: `-o mixed_precision=no` is the choice "no", not an error
    cfg = load_train_config(None, ["task=denoiser", "output_dir=x", "steps=1", "mixed_precision=no"])
    assert cfg.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision: True is not one of no, fp16, bf16"):
        load_train_config(None, ["task=denoiser", "output_dir=x", "steps=1", "mixed_precision=yes"])


@pytest.mark.parametrize("task,preset", [("vae", "tiny"), ("ssl", "tiny")])
def test_vae_and_ssl_train_through_the_same_loop(cache, tmp_path, task, preset):
    cfg = load_train_config(None, {
        "task": task, "output_dir": str(tmp_path / task), "steps": 30, "seed": 1,
        "model": {"preset": preset}, "data": {"tiles": str(cache / "tiles.csv"), "num_workers": 0},
        "optim": {"lr": 2e-3, "batch_size": 16}, "log_every": 5, "checkpoint_every": 30, "num_samples": 4,
        "ema_decay": 0.0})
    res = train(cfg, progress=False)
    losses = _losses(tmp_path / task)
    assert losses[-1] < 0.9 * losses[0]
    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.vae import VAE

    loaded = (VAE if task == "vae" else SSLEncoder).from_pretrained(tmp_path / task / "model")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in res.model.parameters())
    if task == "vae":  # reconstruction grid: 4 real tiles above their reconstructions
        from PIL import Image

        grid = Image.open(tmp_path / task / "samples" / "step-0000030.png")
        assert grid.size == (4 * 64, 2 * 64)


def test_denoiser_sample_grid_and_lora_finetune(cache, tmp_path):
    """Pretrain a tiny denoiser, then LoRA fine-tune it: only adapter weights change, the merged
    model loads as a plain Denoiser, and sample grids are written from fixed seeds."""
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.vae import VAE

    VAE.from_preset("tiny", latent_channels=3).save_pretrained(tmp_path / "vae")  # decodes 3-channel latents
    base = train(denoiser_cfg(cache, tmp_path / "base", steps=10, checkpoint_every=10), progress=False)
    cfg = denoiser_cfg(cache, tmp_path / "lora", steps=10, checkpoint_every=10, sample_every=5, num_samples=4,
                       lora={"rank": 4}, model={"pretrained": str(tmp_path / "base" / "model")},
                       data={"vae": str(tmp_path / "vae")}, optim={"lr": 1e-2})
    res = train(cfg, progress=False)
    assert res.step == 10
    assert (tmp_path / "lora" / "samples" / "step-0000005.png").exists()
    assert (tmp_path / "lora" / "model" / "lora_adapter.safetensors").exists()
    merged = Denoiser.from_pretrained(tmp_path / "lora" / "model")
    before = Denoiser.from_pretrained(tmp_path / "base" / "model").state_dict()
    after = merged.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(any(m in k for m in ("to_q", "to_k", "to_v", "to_out")) for k in changed)
    assert base.model.config.sample_size == merged.config.sample_size
    # the shipped form: the adapter alone, folded into the base weights at load time
    from synthgen.pipelines.stain import merge_lora

    folded = merge_lora(Denoiser.from_pretrained(tmp_path / "base" / "model"), tmp_path / "lora" / "model")
    for k, v in folded.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=1e-5, atol=1e-6)


def test_progressive_resolution(cache, tmp_path):
    """Continue a model trained on 8x8 latents at 16x16 (positional embedding rebuilt at twice
    the interpolation scale): every weight carries over and the larger model trains."""
    from synthgen.models.denoiser import Denoiser

    train(denoiser_cfg(cache, tmp_path / "s8", steps=5, checkpoint_every=5), progress=False)
    small = Denoiser.from_pretrained(tmp_path / "s8" / "model")
    big = small.resized(16)
    assert big.config.sample_size == 16 and big.config.interpolation_scale == 2 * (small.config.interpolation_scale or 1)
    for k, v in small.state_dict().items():
        if k != "y_pos_embed.y_pos_embed":
            assert torch.equal(v, big.state_dict()[k]), k
    out = big(torch.randn(2, 3, 16, 16), torch.tensor([10, 20]), embeddings=torch.randn(2, 4, 8)).sample
    assert out.shape == (2, 3, 16, 16)
