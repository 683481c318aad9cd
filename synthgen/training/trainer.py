"""One training loop for every model, on top of HuggingFace accelerate.

One process or many (DDP/FSDP through ``accelerate launch`` or ``torchrun``), mixed precision,
gradient accumulation, EMA, warmup + cosine LR, gradient clipping, checkpoints every N steps
that hold everything needed to continue bit-for-bit (model, EMA, optimizer, LR schedule, RNG
states, step), ``resume="latest"``, and a clean save-and-exit on SIGTERM/SIGINT.

Randomness is explicit and stateless: the data order of epoch e comes from ``seed + e``, and
the noise/timesteps/dropout of step s on rank r from a generator seeded with (seed, s, r).
A resumed run therefore replays exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from synthgen._io import OutputLock, atomic_dir, replace_dir
from synthgen.config import ConfigError, TrainConfig, to_dict
from synthgen.errors import SynthgenError
from synthgen.seeding import epoch_generator, step_generator

log = logging.getLogger("synthgen.training")


class EpochSampler(Sampler[int]):
    """Shuffled indices for epoch e from seed + e, this rank's share, minus the samples already
    consumed (for resuming mid-epoch). Every rank sees the same number of samples."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        g = epoch_generator(self.seed, self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = self.n // self.world
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return self.n // self.world - self.skip


@dataclass
class TrainState:
    """The loop's counters, saved in every checkpoint."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, d: dict) -> None:
        self.step = int(d["step"])


@dataclass
class TrainResult:
    step: int
    interrupted: bool  # stopped by a signal or stop_at before cfg.steps
    output_dir: Path
    final_loss: float | None
    model: torch.nn.Module  # the trained network (raw weights, not EMA), on this process
    num_processes: int = 1


def find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    """``latest`` -> newest ``checkpoints/step-*`` (None if there is none); else a path."""
    if resume == "latest":
        found = sorted((output_dir / "checkpoints").glob("step-*[0-9]"))
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise SynthgenError(f"{path}: no such checkpoint folder")
    return path


@contextmanager
def _stop_signals():
    """Turn SIGTERM/SIGINT into a flag the loop checks after each step (restored on exit)."""
    flag = {"signal": None}

    def handler(signum, _frame):
        flag["signal"] = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _loader(dataset: Dataset, sampler: EpochSampler, cfg: TrainConfig) -> DataLoader:
    # the sampler runs in this process, so persistent workers follow its set_epoch()
    return DataLoader(dataset, batch_size=cfg.optim.batch_size, sampler=sampler, drop_last=True,
                      num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)


def train(cfg: TrainConfig, resume: str | None = None, stop_at: int | None = None, progress: bool = True,
          force: bool = False) -> TrainResult:
    """Train the model ``cfg.task`` describes; see :class:`~synthgen.config.TrainConfig`.

    Writes ``output_dir/``: ``config.json``, ``metrics.jsonl``, ``checkpoints/step-N/``
    (resumable state, the last ``keep_checkpoints``), ``samples/step-N.png`` and the final
    ``model/`` (EMA weights when EMA is on) in diffusers layout.

    Args:
        cfg: the run.
        resume: ``"latest"`` or a checkpoint folder; None starts fresh (refusing to overwrite
            an output folder that already has checkpoints).
        stop_at: checkpoint and stop at this step, as a signal would (staged runs on
            time-limited nodes; the run continues later with ``resume="latest"``).
        force: take over the output folder's lock (``.synthgen.lock``) even when its owner
            looks alive. Only rank 0 (``RANK``, set by torchrun / accelerate launch) takes it.

    Returns:
        The last step, whether a signal stopped the run, and the final logged loss.

    Raises:
        LockError: another live process trains into ``output_dir``.
    """
    rank0 = int(os.environ.get("RANK", "0")) == 0  # the other ranks share rank 0's lock
    with OutputLock(cfg.output_dir, "train", force=force, enabled=rank0):
        return _train(cfg, resume, stop_at, progress)


def _train(cfg: TrainConfig, resume: str | None, stop_at: int | None, progress: bool) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from synthgen.training.tasks import task_class

    out = Path(cfg.output_dir)
    acc = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with="tensorboard" if _has_tensorboard() else None,
        project_dir=str(out),
    )
    ckpt_dir = out / "checkpoints"
    start_from = find_checkpoint(out, resume) if resume else None
    if resume is None and ckpt_dir.exists() and any(ckpt_dir.glob("step-*")):
        raise SynthgenError(f"{out}: already holds checkpoints; pass resume='latest' (CLI: --resume latest) "
                            "to continue, or choose another output_dir")

    set_seed(cfg.seed)  # model initialisation
    task = task_class(cfg.task)(cfg)
    net = task.net
    if cfg.gradient_checkpointing:
        if not getattr(net, "_supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing: the {cfg.task} model does not support it")
        net.enable_gradient_checkpointing()
    dataset = task.dataset()
    world, rank = acc.num_processes, acc.process_index
    per_rank_batches = (len(dataset) // world) // cfg.optim.batch_size
    if per_rank_batches == 0:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} per process is more than the "
                          f"{len(dataset) // world} samples each of the {world} process(es) gets")
    params = [p for p in net.parameters() if p.requires_grad]
    aux = task.aux_parameters()  # e.g. a discriminator: optimised, never saved with the model or averaged
    # the fused kernel (one pass over each parameter, its gradient and both moments) where torch has
    # it: 0.43 s against 1.25 s per step for a 608 M denoiser on 2 CPU cores (BENCHMARKS.md)
    fused = acc.device.type in ("cpu", "cuda") and acc.distributed_type.value != "DEEPSPEED"
    optimizer = torch.optim.AdamW([{"params": params}, {"params": aux}] if aux else params, lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                                  fused=fused)
    lr_sched = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                             num_training_steps=cfg.steps)
    if acc.distributed_type.value == "FSDP" and cfg.ema_decay > 0:
        raise ConfigError("ema_decay: EMA over FSDP-sharded parameters is not supported; set ema_decay: 0 with FSDP")
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
    state = TrainState()
    task, optimizer = acc.prepare(task, optimizer)
    if ema is not None:
        ema.to(acc.device)
        acc.register_for_checkpointing(ema)
    acc.register_for_checkpointing(lr_sched)  # stepped by us once per optimizer step, not by accelerate
    acc.register_for_checkpointing(state)
    unwrapped = acc.unwrap_model(task)

    if start_from is not None:
        acc.load_state(str(start_from))
        log.info("resumed from %s at step %d", start_from, state.step)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        if acc.log_with:
            acc.init_trackers("train")

    sampler = EpochSampler(len(dataset), cfg.seed, rank, world)
    preview_batch = _first_items(dataset, cfg.num_samples) if acc.is_main_process else None
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.task}", unit="step",
               disable=not (progress and acc.is_main_process), dynamic_ncols=True)
    metrics_file = out / "metrics.jsonl"
    interrupted, last_loss = False, None
    window_loss, window_n, t0 = 0.0, 0, time.perf_counter()

    loader = _loader(dataset, sampler, cfg)
    with _stop_signals() as stop:
        while state.step < cfg.steps and not interrupted:
            consumed = state.step * cfg.optim.grad_accum  # micro-batches per rank so far
            epoch, offset = divmod(consumed, per_rank_batches)
            sampler.set_epoch(epoch, skip=offset * cfg.optim.batch_size)
            micro = 0
            for batch in loader:
                with acc.accumulate(task):
                    g = step_generator(cfg.seed, state.step * cfg.optim.grad_accum + micro, rank)
                    unwrapped.step = state.step
                    loss = task(batch, g)
                    if not torch.isfinite(loss):
                        raise SynthgenError(f"loss is {float(loss)} at step {state.step}: lower optim.lr, check the "
                                            "data (NaN embeddings?) or use mixed_precision=bf16 instead of fp16")
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.grad_clip:
                        acc.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                window_loss += float(loss.detach())
                window_n += 1
                if not acc.sync_gradients:
                    continue
                micro = 0
                lr_sched.step()
                if ema is not None:
                    ema.step(params)
                state.step += 1
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    mean = acc.reduce(torch.tensor(window_loss / window_n, device=acc.device), "mean").item()
                    dt = time.perf_counter() - t0
                    ips = window_n * cfg.optim.batch_size * world / dt
                    last_loss = mean
                    bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.1f}")
                    if acc.is_main_process:
                        rec = {"step": state.step, "loss": mean, "lr": lr_sched.get_last_lr()[0], "images_per_s": ips}
                        with open(metrics_file, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        if acc.log_with:
                            acc.log({k: v for k, v in rec.items() if k != "step"}, step=state.step)
                    window_loss, window_n, t0 = 0.0, 0, time.perf_counter()
                if cfg.sample_every and state.step % cfg.sample_every == 0 and acc.is_main_process:
                    _preview(unwrapped, ema, params, preview_batch, out / "samples" / f"step-{state.step:07d}.png")
                if _should_stop(stop, acc) or (stop_at is not None and state.step >= stop_at < cfg.steps):
                    interrupted = True
                if state.step % cfg.checkpoint_every == 0 or interrupted or state.step == cfg.steps:
                    _save_checkpoint(acc, ckpt_dir, state.step, cfg.keep_checkpoints)
                if interrupted or state.step >= cfg.steps:
                    break
    del loader  # shut the workers down before the end (see accelerate's notes on end_training)

    bar.close()
    acc.wait_for_everyone()
    if not interrupted and acc.is_main_process:
        final = out / "model"
        with _ema_weights(ema, params), atomic_dir(final) as tmp:
            unwrapped.save(unwrapped.net, tmp)
            _preview(unwrapped, None, params, preview_batch, out / "samples" / f"step-{state.step:07d}.png")
    acc.wait_for_everyone()
    acc.end_training()
    return TrainResult(state.step, interrupted, out, last_loss, unwrapped.net, world)


def _should_stop(stop: dict, acc) -> bool:
    flag = torch.tensor(1.0 if stop["signal"] else 0.0, device=acc.device)
    if acc.num_processes > 1:  # a signal to any rank stops every rank at the same step
        flag = acc.reduce(flag, "sum")
    return bool(flag.item() > 0)


def _save_checkpoint(acc, ckpt_dir: Path, step: int, keep: int) -> None:
    """Write checkpoints/step-N atomically (a temporary folder renamed once complete), keep the last K."""
    final = ckpt_dir / f"step-{step:07d}"
    tmp = ckpt_dir / f".step-{step:07d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if acc.is_main_process:
        replace_dir(tmp, final)
        for old in sorted(ckpt_dir.glob("step-*[0-9]"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


@contextmanager
def _ema_weights(ema, params):
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def _preview(task, ema, params, batch, path: Path) -> None:
    if batch is None:
        return
    try:
        with _ema_weights(ema, params):
            if task.preview(task.net, path, batch):
                log.info("samples -> %s", path)
    except Exception as e:  # a failed preview must not kill a long run
        log.warning("sample grid failed: %s", e)


def _first_items(dataset: Dataset, n: int) -> dict | None:
    from torch.utils.data import default_collate

    if n <= 0:
        return None
    return default_collate([dataset[i] for i in range(min(n, len(dataset)))])


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
