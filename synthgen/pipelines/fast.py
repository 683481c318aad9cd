"""Add a few-step variant (a consistency-distilled student, ``task: consistency``) to a pipeline
folder: ``fast_transformer/`` and ``fast_scheduler/`` beside the other components, listed in
``model_index.json``, so ``SynthPipeline.from_pretrained`` loads it and calls with
``num_inference_steps <= 4`` use it. The student's weights are stored in half precision by default
(half the disk; diffusers loads them back as float32, and sampling runs in bf16 on CPUs that have it
anyway; the change in output is measured in BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from synthgen._io import atomic_dir, atomic_write_text
from synthgen.errors import CheckpointError

# what a student must share with its pipeline's denoiser to stand in for it
_SAME = ("in_channels", "sample_size", "patch_size", "use_embeddings", "caption_channels", "caption_num_tokens",
         "num_classes", "num_sources", "class_names", "source_names", "text_channels", "source_channels")


def add_fast_variant(pipeline: str | os.PathLike, student: str | os.PathLike, storage_dtype: str = "fp16",
                     steps: int | None = None) -> Path:
    """Copy ``student`` (a ``task: consistency`` model folder, with its ``scheduler/``) into
    ``pipeline`` as ``fast_transformer/`` + ``fast_scheduler/`` and list them in its index.

    Args:
        storage_dtype: ``fp16`` (default) stores the student's floating-point weights in half
            precision; ``fp32`` copies them as they are.
        steps: the variant's default step count (1-4; choose it on validation tiles), recorded as
            ``fast_steps`` in ``model_index.json``; None: the global default,
            ``SAMPLING.fast_steps`` (a count recorded for a replaced variant is dropped).

    Raises:
        CheckpointError: a folder that is not a pipeline or not a distilled student, or a student
            whose conditions or sizes differ from the pipeline's denoiser.
    """
    from synthgen.pipelines.generate import check_fast_steps

    if storage_dtype not in ("fp16", "fp32"):
        raise ValueError(f"storage_dtype must be fp16 or fp32, got {storage_dtype!r}")
    check_fast_steps(steps)
    pipeline, student = Path(pipeline), Path(student)
    index_path = pipeline / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{index_path}: missing; {pipeline} is not a pipeline folder")
    try:
        cfg = json.loads((student / "config.json").read_text())
        base = json.loads((pipeline / "transformer" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read the student's or the pipeline's denoiser config ({e})") from e
    if cfg.get("distilled_guidance_scale") is None or not (student / "scheduler" / "scheduler_config.json").is_file():
        raise CheckpointError(f"{student}: not a distilled student (no distilled_guidance_scale in config.json, or "
                              "no scheduler/); train one with `synthgen train`, task: consistency")
    import inspect

    from synthgen.models.denoiser import Denoiser

    defaults = {k: v.default for k, v in inspect.signature(Denoiser.__init__).parameters.items()}
    differ = [k for k in _SAME if cfg.get(k, defaults[k]) != base.get(k, defaults[k])]  # older configs: defaults
    if differ:
        raise CheckpointError(f"{student}: differs from {pipeline}/transformer in {', '.join(differ)}")
    _check_noise_schedule(student / "scheduler", pipeline / "scheduler")
    for src, name in ((student, "fast_transformer"), (student / "scheduler", "fast_scheduler")):
        with atomic_dir(pipeline / name) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("scheduler") if name == "fast_transformer" else None)
            if name == "fast_transformer" and storage_dtype == "fp16":
                _to_half(tmp)
    index = json.loads(index_path.read_text())
    sched_cls = json.loads((student / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    index.update(fast_transformer=["synthgen.models.denoiser", "Denoiser"], fast_scheduler=["diffusers", sched_cls])
    index.pop("fast_steps", None)  # chosen for the variant it replaces
    if steps is not None:
        index["fast_steps"] = int(steps)
    atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return pipeline


def _check_noise_schedule(student_sched: Path, base_sched: Path) -> None:
    """The student samples with the noise levels its teacher was trained on: the same
    ``alphas_cumprod`` from both schedulers' configs (a scheduler class's own default betas differ:
    diffusers' LCMScheduler defaults to Stable Diffusion's)."""
    import diffusers
    import torch

    scheds = []
    for folder in (student_sched, base_sched):
        try:
            cfg = json.loads((folder / "scheduler_config.json").read_text())
            scheds.append(getattr(diffusers, cfg["_class_name"]).from_pretrained(folder))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{folder}: cannot read the scheduler ({e})") from e
    a, b = (getattr(s, "alphas_cumprod", None) for s in scheds)
    if a is None or b is None:  # a flow-matching pipeline has no DDPM noise schedule to compare
        return
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-7):
        ca, cb = (dict(s.config) for s in scheds)
        fields = [k for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas")
                  if ca.get(k) != cb.get(k)]
        raise CheckpointError(f"{student_sched}: its noise schedule differs from {base_sched}'s "
                              f"({', '.join(f'{k} {ca.get(k)} vs {cb.get(k)}' for k in fields) or 'alphas_cumprod'}); "
                              "the student would sample at noise levels it was not trained on")


def _to_half(folder: Path) -> None:
    """Rewrite every ``*.safetensors`` file in ``folder`` with its float tensors in float16."""
    from safetensors.torch import load_file, save_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors weights to store in half precision (use fp32 storage)")
    for f in files:
        tensors = load_file(f)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f,
                  metadata={"format": "pt"})
