"""The few-step variant: consistency distillation (task consistency), adding the student to a
pipeline, and how calls pick it."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from cli_helpers import run_cli
from conftest import SMALL, V2

from synthgen.config import ConfigError, load_train_config
from synthgen.errors import CheckpointError, SynthgenError
from synthgen.pipelines.generate import SynthPipeline
from synthgen.sampling import CLIP_DENOISED, sample_latents
from synthgen.training.distill import boundary_scalings, lcm_scheduler
from synthgen.training.trainer import train


@pytest.fixture(scope="module")
def student(cmu, tmp_path_factory):
    """A student distilled for a few steps from the shipped small pipeline, on real tiles."""
    root = tmp_path_factory.mktemp("fast")
    run_cli(["tile", str(cmu), "--mpp", "1.0", "--size", "64", "--roi", "0.3,0,0.7,1", "-o", str(root / "t.csv")])
    run_cli(["cache", str(root / "t.csv"), "-o", str(root / "cache"), "-e", f"latents=vae:{SMALL}",
             "-e", f"emb=ssl:{SMALL}/image_encoder"])
    cfg = load_train_config(None, {
        "task": "consistency", "output_dir": str(root / "run"), "steps": 6, "model": {"pretrained": str(SMALL)},
        "data": {"cache": str(root / "cache"), "vae": str(SMALL)},
        "objective": {"kind": "epsilon", "cfg_dropout": 0.0, "distill_guidance": 2.0},
        "optim": {"lr": 1e-4, "batch_size": 8}, "ema_decay": 0, "checkpoint_every": 3, "log_every": 1})
    res = train(cfg, progress=False)
    return root / "run" / "model", res, root


def _plain_copy(folder):
    """The shipped pipeline without its stains and its own few-step variant."""
    shutil.copytree(SMALL, folder, ignore=shutil.ignore_patterns("stains", "fast_*"))
    index = json.loads((folder / "model_index.json").read_text())
    for key in ("fast_transformer", "fast_scheduler"):
        index.pop(key, None)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def plain_pipe(tmp_path_factory):
    pipe = SynthPipeline.from_pretrained(_plain_copy(tmp_path_factory.mktemp("plain") / "p"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.fast_transformer is None
    return pipe


@pytest.fixture(scope="module")
def fast_pipe(student, tmp_path_factory):
    """The plain pipeline with the test's student added as its fast variant."""
    folder = _plain_copy(tmp_path_factory.mktemp("pipe") / "p")
    run_cli(["add-fast", str(folder), str(student[0])])
    pipe = SynthPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder


def test_boundary_scalings_match_lcm_scheduler():
    t = torch.tensor([0, 19, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    assert c_skip[0] == 1 and c_out[0] == 0
    sched = lcm_scheduler()
    for i, ti in enumerate(t.tolist()):
        ref = sched.get_scalings_for_boundary_condition_discrete(ti)
        assert abs(float(ref[0]) - float(c_skip[i])) < 1e-6 and abs(float(ref[1]) - float(c_out[i])) < 1e-6


def test_distillation_trains_and_saves_a_student(student):
    model, res, root = student
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["distilled_guidance_scale"] == 2.0
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 50
    losses = [json.loads(line)["loss"] for line in (root / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 6 and all(0 < v < 10 for v in losses)
    base = SynthPipeline.from_pretrained(SMALL).transformer.state_dict()
    from synthgen.models.denoiser import Denoiser

    moved = Denoiser.from_pretrained(model).state_dict()
    assert any(not torch.equal(base[k], moved[k]) for k in base)  # the student trained away from the teacher


def test_consistency_guidance_dropout_reaches_every_net(student):
    """With cfg_dropout ~1 every row trains on the null condition: the student and the EMA target
    each get their own null embedding, and the teacher's conditional branch is its null too (its
    unguided trajectory)."""
    from synthgen.training.tasks import task_class

    root = student[2]
    cfg = load_train_config(None, {
        "task": "consistency", "output_dir": str(root / "drop"), "steps": 1, "model": {"pretrained": str(SMALL)},
        "data": {"cache": str(root / "cache"), "vae": str(SMALL)},
        "objective": {"kind": "epsilon", "cfg_dropout": 0.999, "distill_guidance": 2.0}})
    task = task_class("consistency")(cfg)
    with torch.no_grad():  # the student's null apart from the target's and the teacher's, so that each can be told
        task.net.caption_projection.uncond_embedding.add_(1.0)
        task.target.caption_projection.uncond_embedding.add_(2.0)
    seen = {"student": [], "target": [], "teacher": []}

    def spy(name, net):
        forward = net.forward

        def wrapped(x, t, **conds):
            seen[name].append(conds["embeddings"].detach().clone())
            return forward(x, t, **conds)
        net.forward = wrapped

    spy("student", task.net)
    spy("target", task.target)
    spy("teacher", task._frozen["teacher"])
    emb = torch.randn(4, *task.net.null_conditions(1)["embeddings"].shape[1:])
    batch = {"latents": torch.randn(4, 4, 16, 16), "emb": emb}
    task.eval()  # no target update: the nulls stay apart
    loss = task(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert len(seen["student"]) == 1 and torch.equal(seen["student"][0], task.net.null_conditions(4)["embeddings"])
    assert len(seen["target"]) == 1 and torch.equal(seen["target"][0], task.target.null_conditions(4)["embeddings"])
    t_null = task._frozen["teacher"].null_conditions(8)["embeddings"]
    assert len(seen["teacher"]) == 1 and torch.equal(seen["teacher"][0], t_null)
    # without dropout all see the batch's embeddings (the teacher's second half: its null)
    task.cfg = dataclasses.replace(cfg, objective=dataclasses.replace(cfg.objective, cfg_dropout=0.0))
    seen = {"student": [], "target": [], "teacher": []}
    task(batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(e, emb) for e in seen["student"] + seen["target"]) and torch.equal(seen["teacher"][0][:4], emb)


def test_consistency_target_is_an_ema_of_the_student(student):
    """The target moves towards the student by 1 - decay once per optimisation step (not per
    micro-batch), is held in the task's state (so checkpoints resume it), and decay 0 drops it."""
    from synthgen.training.tasks import task_class

    root = student[2]
    raw = {"task": "consistency", "output_dir": str(root / "ema"), "steps": 1, "model": {"pretrained": str(SMALL)},
           "data": {"cache": str(root / "cache"), "vae": str(SMALL)},
           "objective": {"kind": "epsilon", "distill_target_decay": 0.75}}
    task = task_class("consistency")(load_train_config(None, raw)).train()
    assert not task.target.training and not any(p.requires_grad for p in task.target.parameters())
    assert any(k.startswith("target.") for k in task.state_dict())
    batch = {"latents": torch.randn(2, 4, 16, 16), "emb": torch.randn(2, *task.net.null_conditions(1)["embeddings"].shape[1:])}
    name, param = next(iter(task.net.named_parameters()))
    before = dict(task.target.named_parameters())[name].detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    task.step = 1
    task(batch, torch.Generator().manual_seed(0))
    task(batch, torch.Generator().manual_seed(1))  # a second micro-batch of the same step: no second update
    after = dict(task.target.named_parameters())[name]
    torch.testing.assert_close(after, before + 0.25)
    raw["objective"]["distill_target_decay"] = 0.0
    assert task_class("consistency")(load_train_config(None, raw)).target is None
    raw["objective"]["distill_target_decay"] = 1.0
    with pytest.raises(ConfigError, match="distill_target_decay"):
        task_class("consistency")(load_train_config(None, raw))


def test_consistency_config_errors(tmp_path):
    base = {"task": "consistency", "output_dir": str(tmp_path / "x"), "steps": 1, "data": {"cache": "c"}}
    with pytest.raises(ConfigError, match="model.pretrained"):
        train(load_train_config(None, base), progress=False)
    with pytest.raises(ConfigError, match="epsilon or v_prediction"):
        train(load_train_config(None, {**base, "model": {"pretrained": str(SMALL)}, "objective": {"kind": "flow"}}),
              progress=False)
    with pytest.raises(ConfigError, match="distill_skip"):
        train(load_train_config(None, {**base, "model": {"pretrained": str(SMALL)},
                                       "objective": {"distill_skip": 30}}), progress=False)


def test_calls_pick_the_fast_variant(fast_pipe, plain_pipe):
    pipe, _ = fast_pipe
    small_pipe = plain_pipe
    emb = small_pipe.encode_images(torch.full((3, 3, 64, 64), 180, dtype=torch.uint8))
    out = pipe(embeddings=emb, seeds=[1, 2, 3], num_inference_steps=2, output_type="latent", dtype="fp32").images
    # the same as the student sampled by hand with its LCMScheduler, one pass per step (no guidance pass)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    conds = {"embeddings": emb}
    ref = sample_latents(pipe.fast_transformer, pipe.fast_scheduler, conds, gens, 2, 1.0, clip_denoised=CLIP_DENOISED)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # image i depends only on its own seed, also with LCM's fresh noise between steps
    one = pipe(embeddings=emb[1:2], seeds=[2], num_inference_steps=2, output_type="latent", dtype="fp32").images
    torch.testing.assert_close(one[0], out[1], rtol=1e-4, atol=1e-4)
    # more steps, or fast=False, sample the base model exactly as the pipeline without the variant
    for kw in ({"num_inference_steps": 8}, {"num_inference_steps": 2, "fast": False}):
        a = pipe(embeddings=emb, seeds=[1, 2, 3], output_type="latent", dtype="fp32", **kw).images
        b = small_pipe(embeddings=emb, seeds=[1, 2, 3], output_type="latent", dtype="fp32", **kw).images
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="guidance 2 folded in, not 3"):
        pipe(embeddings=emb, num_inference_steps=2, guidance_scale=3.0, fast=True)
    with pytest.raises(ValueError, match="without masks"):
        pipe(masks=torch.zeros(1, 64, 64, dtype=torch.long), num_inference_steps=2, fast=True)
    with pytest.raises(ValueError, match="no few-step variant"):
        small_pipe(embeddings=emb, num_inference_steps=2, fast=True)
    # a guidance scale other than the folded one falls back to the base model under fast=None
    a = pipe(embeddings=emb[:1], seeds=[1], num_inference_steps=2, guidance_scale=3.0, output_type="latent").images
    b = small_pipe(embeddings=emb[:1], seeds=[1], num_inference_steps=2, guidance_scale=3.0,
                   output_type="latent").images
    torch.testing.assert_close(a, b)


def test_generate_fast_cli_and_augment_default(fast_pipe, plain_pipe, tmp_path, capsys):
    _, folder = fast_pipe
    run_cli(["generate", str(folder), "-o", str(tmp_path / "g"), "-n", "3", "--mode", "variations", "--fast"])
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert man["fast_variant"] is True and man["sampler"] == "LCMScheduler" and man["num_inference_steps"] == 4
    assert len(list((tmp_path / "g" / "images").glob("*.png"))) == 3
    from synthgen.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", str(folder), "-o", str(tmp_path / "h"), "-n", "2", "--mode", "variations", "--fast",
              "--guidance", "3"])
    assert "--fast: the few-step variant has guidance 2 folded in, not 3" in capsys.readouterr().err

    from synthgen.augment import PipelineGenerator

    assert PipelineGenerator(folder).num_inference_steps == SynthPipeline.FAST_MAX_STEPS
    assert PipelineGenerator(folder, strength=0.5).num_inference_steps == 8  # anchored: the base model
    assert PipelineGenerator(plain_pipe).num_inference_steps == 8
    assert PipelineGenerator(SMALL).num_inference_steps == SynthPipeline.FAST_MAX_STEPS  # the shipped variant


def test_add_fast_records_the_chosen_default_step_count(student, tmp_path, capsys):
    from synthgen.augment import PipelineGenerator
    from synthgen.cli import main

    folder = _plain_copy(tmp_path / "p")
    run_cli(["add-fast", str(folder), str(student[0]), "--steps", "2"])
    assert json.loads((folder / "model_index.json").read_text())["fast_steps"] == 2
    assert SynthPipeline.from_pretrained(folder).default_fast_steps == 2
    assert PipelineGenerator(folder).num_inference_steps == 2
    run_cli(["generate", str(folder), "-o", str(tmp_path / "g"), "-n", "1", "--mode", "variations", "--fast"])
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["num_inference_steps"] == 2
    # a replaced variant's count does not carry over to the new one
    run_cli(["add-fast", str(folder), str(student[0])])
    assert "fast_steps" not in json.loads((folder / "model_index.json").read_text())
    assert PipelineGenerator(folder).num_inference_steps == SynthPipeline.FAST_MAX_STEPS
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["add-fast", str(folder), str(student[0]), "--steps", "5"])
    assert "Invalid value for '--steps'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fast_steps must be a whole number of steps in 1-4"):
        SynthPipeline(transformer=None, vae=None, scheduler=None, fast_steps=0)
    with pytest.raises(ValueError, match="got 'two'"):
        SynthPipeline(transformer=None, vae=None, scheduler=None, fast_steps="two")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "fast_steps": 9}))  # edited by hand
    with pytest.raises(SynthgenError, match="model_index.json: fast_steps must be a whole number"):
        PipelineGenerator(folder)
    # the shipped default pipeline's variant samples in 2 steps (chosen on validation tiles)
    assert PipelineGenerator(V2).num_inference_steps == 2


def test_add_fast_refuses_what_is_not_a_student(fast_pipe, tmp_path):
    from synthgen.pipelines.fast import add_fast_variant

    _, folder = fast_pipe
    with pytest.raises(CheckpointError, match="not a distilled student"):
        add_fast_variant(folder, SMALL / "transformer")
    with pytest.raises(CheckpointError, match="not a pipeline folder"):
        add_fast_variant(tmp_path, folder / "fast_transformer")


def test_fast_scheduler_keeps_the_teachers_noise_levels(student, fast_pipe, tmp_path):
    """The student samples at the noise levels it was trained on (LCMScheduler's own default betas
    are Stable Diffusion's, not the DDPM ones every synthgen objective uses); add-fast refuses a
    student whose scheduler says otherwise."""
    from synthgen.pipelines.fast import add_fast_variant

    pipe, folder = fast_pipe
    assert torch.allclose(pipe.fast_scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    shipped = SynthPipeline.from_pretrained(SMALL)
    assert torch.allclose(shipped.fast_scheduler.alphas_cumprod, shipped.scheduler.alphas_cumprod)
    bad = tmp_path / "student"
    shutil.copytree(student[0], bad)
    sched = json.loads((bad / "scheduler" / "scheduler_config.json").read_text())
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "beta_start": 0.00085, "beta_end": 0.012}))
    with pytest.raises(CheckpointError, match=r"noise schedule differs .*beta_start 0.00085 vs 0.0001"):
        add_fast_variant(_plain_copy(tmp_path / "p"), bad)


def test_student_is_stored_in_half_precision_and_loads_as_float32(student, fast_pipe, plain_pipe, tmp_path):
    from safetensors.torch import load_file

    from synthgen.models.denoiser import Denoiser

    pipe, folder = fast_pipe
    stored = load_file(folder / "fast_transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    full = Denoiser.from_pretrained(student[0]).state_dict()
    loaded = pipe.fast_transformer.state_dict()
    assert {v.dtype for v in loaded.values()} == {torch.float32}
    assert all(torch.equal(loaded[k], full[k].half().float()) for k in full)
    # --storage-dtype fp32 copies the weights as they are; the two sample nearly alike
    folder32 = _plain_copy(tmp_path / "p32")
    run_cli(["add-fast", str(folder32), str(student[0]), "--storage-dtype", "fp32"])
    pipe32 = SynthPipeline.from_pretrained(folder32)
    pipe32.set_progress_bar_config(disable=True)
    assert all(torch.equal(v, full[k]) for k, v in pipe32.fast_transformer.state_dict().items())
    emb = plain_pipe.encode_images(torch.full((2, 3, 64, 64), 180, dtype=torch.uint8))
    kw = dict(embeddings=emb, seeds=[1, 2], num_inference_steps=2, output_type="latent", dtype="fp32")
    a, b = pipe(**kw).images, pipe32(**kw).images
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.02 * b.abs().max()
