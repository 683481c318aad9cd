"""Sampling loop: a plain function of the model, a diffusers scheduler, conditions and
explicit per-sample generators (so any image can be regenerated from its seed alone).

Classifier-free guidance (Ho & Salimans 2022) runs the conditional and the unconditional
inputs as one batch: eps = eps_u + s (eps_c - eps_u). Guidance scale 1 skips the null pass.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

SAMPLERS = ("dpm++", "ddim", "euler", "flow-euler")


def make_scheduler(prediction: str, sampler: str = "dpm++", num_train_timesteps: int = 1000,
                   beta_schedule: str = "linear"):
    """A diffusers scheduler matching how the model was trained.

    Args:
        prediction: ``epsilon``, ``v_prediction`` or ``flow``.
        sampler: ``dpm++`` (DPM-Solver++ 2M, default), ``ddim``, ``euler``; flow models use
            the flow-matching Euler scheduler whatever is asked.
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )

    if prediction == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler == "euler":
        return EulerDiscreteScheduler(**common)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype) -> torch.Tensor:
    """One noise tensor per sample, each from its own generator (CPU, for reproducibility)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device, dtype)


@torch.no_grad()
def sample_latents(
    model,
    scheduler,
    conditions: dict[str, torch.Tensor],
    generators: Sequence[torch.Generator],
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    latent_size: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    progress: bool = False,
    guide: Collection[str] | None = None,
) -> torch.Tensor:
    """Denoise from per-sample noise to clean latents.

    Args:
        model: a :class:`~synthgen.models.denoiser.Denoiser`.
        scheduler: from :func:`make_scheduler` (its state is reset here).
        conditions: ``embeddings`` / ``class_labels`` / ``text`` for the batch (and ``mask`` for a
            :class:`~synthgen.models.controlnet.ControlledDenoiser`).
        generators: one per sample; sample i depends only on generator i and its conditions.
        guidance_scale: classifier-free guidance scale (1: conditional model alone).
        latent_size: latent side (default: the model's ``sample_size``).
        guidance_interval: apply guidance only for steps whose position in the trajectory
            (0 = first, noisiest step; 1 = last) lies in [lo, hi]; other steps run the
            conditional model alone, saving the unconditional pass (Kynkaanniemi et al. 2024
            found guidance at the noisiest and the final steps hurts diversity and helps little).
        guide: the conditions set to their nulls in the unconditional half (default: every
            condition that has a null, i.e. guidance towards the joint condition). The others
            stay in both halves, so guidance pushes towards the listed ones given the rest.

    Returns:
        Latents (B, C, H, W) in the VAE's normalised space.
    """
    from tqdm.auto import tqdm

    cfg = model.config
    B = len(generators)
    size = latent_size or cfg.sample_size
    p = next(model.parameters())
    x = initial_noise((cfg.in_channels, size, size), generators, p.device, p.dtype)
    scheduler.set_timesteps(num_steps, device=p.device)
    x = x * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    if guided:
        null = model.null_conditions(B, device=p.device)
        # conditions without a null (a mask) or not guided are kept in both halves: guidance acts on the others
        null = {k: v for k, v in null.items() if guide is None or k in guide}
        both = {k: torch.cat([v, null.get(k, v).to(v.dtype)]) for k, v in conditions.items() if v is not None}
    n = len(scheduler.timesteps)
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        xin = scheduler.scale_model_input(x, t)
        tt = t.expand(B).to(p.device)
        pos = i / max(n - 1, 1)
        if guided and (guidance_interval is None or guidance_interval[0] <= pos <= guidance_interval[1]):
            out = model(torch.cat([xin, xin]), torch.cat([tt, tt]), **both).sample[:, : cfg.in_channels]
            cond, uncond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        else:
            out = model(xin, tt, **conditions).sample[:, : cfg.in_channels]
        x = scheduler.step(out, t, x).prev_sample
    return x
