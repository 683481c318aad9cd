"""Sampling loop: a plain function of the model, a diffusers scheduler, conditions and
explicit per-sample generators (so any image can be regenerated from its seed alone).

Classifier-free guidance (Ho & Salimans 2022) runs the conditional and the unconditional
inputs as one batch: eps = eps_u + s (eps_c - eps_u). Guidance scale 1 skips the null pass.

The denoised estimate can be clipped to the latent range (``clip_denoised``), the latent
counterpart of DDPM's clipping of x0 to [-1, 1] (Ho et al. 2020): an epsilon model's estimate
x0 = (x_t - sigma_t eps) / alpha_t multiplies the model's error by sigma_t / alpha_t (157 at
t = 999 of the linear schedule), so a small error at a noisy step becomes a latent far outside
anything the VAE was trained on, which the ODE then keeps (BENCHMARKS.md, degenerate samples).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from synthgen.config import SAMPLING

SAMPLERS = ("dpm++", "ddim", "euler", "flow-euler")

# Default bound on the denoised estimate, in the VAE's normalised latent units (VAE.calibrate
# gives the latents unit variance). The shipped small VAE's training latents reach 5.44 and
# exceed 4.5 in 0.016% of their values; the runaway latents it prevents reached 30-55.
CLIP_DENOISED = 4.5

# The beta range of the noise schedule every diffusion objective here trains with: DDPM's linear
# 1e-4 to 0.02 (Ho et al. 2020), the default of diffusers' DDPM, DDIM, DPM-Solver and Euler
# schedulers but not of its LCMScheduler (0.00085 to 0.012, Stable Diffusion's), so it is passed
# explicitly wherever a scheduler is built.
BETA_START, BETA_END = 1e-4, 0.02


def make_scheduler(prediction: str, sampler: str = "dpm++", num_train_timesteps: int = 1000,
                   beta_schedule: str = "linear", beta_start: float = BETA_START, beta_end: float = BETA_END):
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
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, prediction_type=prediction,
                  beta_start=beta_start, beta_end=beta_end)
    if sampler == "dpm++":
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler == "euler":
        return EulerDiscreteScheduler(**common)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")


def prediction_of(scheduler) -> str:
    """What a model sampled by ``scheduler`` predicts: ``flow`` for a flow-matching scheduler (its
    config has no ``prediction_type``), else the config's ``prediction_type``."""
    if "FlowMatch" in type(scheduler).__name__:
        return "flow"
    return scheduler.config.get("prediction_type", "epsilon")


def scheduler_for(scheduler, sampler: str | None = None):
    """``scheduler`` (a pipeline's own, matching its training) switched to ``sampler``; the same
    objective, timesteps and beta schedule. ``None`` keeps it. The one place a pipeline's
    scheduler is rebuilt (the pipeline call and ``synthgen generate --sampler``)."""
    if sampler is None:
        return scheduler
    cfg = scheduler.config
    return make_scheduler(prediction_of(scheduler), sampler, cfg.get("num_train_timesteps", 1000),
                          cfg.get("beta_schedule", "linear"), cfg.get("beta_start", BETA_START),
                          cfg.get("beta_end", BETA_END))


def _bounds(clip, channels: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``clip`` (a bound c: [-c, c]; or (lo, hi), each a number or one value per channel) as
    (1, C, 1, 1) tensors."""
    lo, hi = (-float(clip), float(clip)) if isinstance(clip, int | float) else clip

    def one(v):
        v = torch.as_tensor(v, dtype=like.dtype, device=like.device).flatten()
        if v.numel() not in (1, channels):
            raise ValueError(f"clip_denoised: {v.numel()} values for {channels} latent channels")
        return v.expand(channels).view(1, channels, 1, 1)

    lo, hi = one(lo), one(hi)
    if (lo >= hi).any():
        raise ValueError(f"clip_denoised: lower bound must be below the upper one, got {lo.flatten().tolist()} "
                         f"and {hi.flatten().tolist()}")
    return lo, hi


def clamp_denoised(out: torch.Tensor, xin: torch.Tensor, t, scheduler, step: int, clip) -> torch.Tensor:
    """The model output ``out`` for input ``xin`` at timestep ``t`` (step ``step`` of the
    scheduler's trajectory), changed so that its denoised estimate x0 lies in ``clip``.

    x0 is recovered from the output (epsilon, v or flow velocity, as the scheduler was
    configured), clamped, and turned back into the same kind of output, so every scheduler and
    solver order sees a model whose predictions stay in the latent range. Outputs whose x0 is
    in range are unchanged.

    Args:
        clip: a bound c (x0 in [-c, c]) or (lo, hi), numbers or one value per latent channel,
            in the VAE's normalised latent units.
    """
    lo, hi = _bounds(clip, out.shape[1], out)
    if "FlowMatch" in type(scheduler).__name__ or scheduler.config.get("use_flow_sigmas"):  # x_t = (1-s) x0 + s e
        s = float(scheduler.sigmas[step])
        x0 = xin - s * out  # out = e - x0
        return out if s <= 0 else (xin - torch.maximum(torch.minimum(x0, hi), lo)) / s
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > step:  # k-diffusion sigma = sigma_t / alpha_t (DPM-Solver, Euler)
        k = float(sigmas[step])
    else:
        ac = float(scheduler.alphas_cumprod[int(t)])
        k = ((1 - ac) / ac) ** 0.5
    a, s = (1 + k * k) ** -0.5, k * (1 + k * k) ** -0.5  # the model's input is alpha_t x0 + sigma_t eps
    if s <= 0:
        return out
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":  # v = alpha eps - sigma x0
        x0 = a * xin - s * out
        return (a * xin - torch.maximum(torch.minimum(x0, hi), lo)) / s
    if kind != "epsilon":
        raise ValueError(f"clip_denoised: unsupported prediction type {kind!r}")
    x0 = (xin - s * out) / a
    return (xin - a * torch.maximum(torch.minimum(x0, hi), lo)) / s


def scale_input(scheduler, x: torch.Tensor, t) -> torch.Tensor:
    """The model input at timestep ``t``: ``scheduler.scale_model_input`` where the scheduler has
    one (FlowMatch schedulers have none: their input is the sample itself)."""
    return scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x


def init_sigma(scheduler) -> float:
    """The scale of pure noise at the first step (FlowMatch schedulers have no
    ``init_noise_sigma``: sigma 1 is pure noise)."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def initial_noise(shape: Sequence[int], generators: Sequence[torch.Generator], device, dtype) -> torch.Tensor:
    """One noise tensor per sample, each from its own generator (CPU, for reproducibility)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device, dtype)


@torch.no_grad()
def sample_latents(
    model,
    scheduler,
    conditions: dict[str, torch.Tensor],
    generators: Sequence[torch.Generator],
    num_steps: int = SAMPLING.steps,
    guidance_scale: float = 1.0,
    latent_size: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
    progress: bool = False,
    guide: Collection[str] | None = None,
    clip_denoised: float | tuple | None = None,
    init_latents: torch.Tensor | None = None,
    strength: float = 1.0,
    image_guidance_scale: float | None = None,
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
        clip_denoised: keep the (guided) denoised estimate x0 of every step in this latent
            range: a bound c for [-c, c], or (lo, hi) with a number or one value per channel, in
            the VAE's normalised units (see :func:`clamp_denoised`). None: no clipping.
        init_latents, strength: SDEdit (Meng et al. 2022), as diffusers' img2img pipelines do:
            the clean latents (B, C, H, W) are noised to the timestep ``strength`` of the way
            along the trajectory, with each sample's own noise, and only the last
            ``max(1, int(num_steps * strength))`` steps run, so the output keeps the reference's
            layout (low strength) or departs from it (high). ``strength`` 1 (or no
            ``init_latents``) starts from pure noise: exactly the plain sampler.
        image_guidance_scale: for a model with source latents (``conditions["source_latents"]``),
            guide on the source image and on the other conditions separately, as InstructPix2Pix
            does (Brooks et al. 2023): out = u + s_I (c_I - u) + s (c - c_I), where u has every
            guided condition and the source at their nulls, c_I only the source given and c all;
            ``guidance_scale`` is s. None: the source is kept in both passes of plain guidance.

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
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    timesteps, start = scheduler.timesteps, 0
    if init_latents is not None and strength < 1:
        if tuple(init_latents.shape) != tuple(x.shape):
            raise ValueError(f"init_latents: shape {tuple(init_latents.shape)}, the sampler draws {tuple(x.shape)}")
        start = (num_steps - max(1, int(num_steps * strength))) * scheduler.order
        timesteps = timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        init = init_latents.to(p.device, p.dtype)
        t0 = timesteps[:1].expand(B)
        x = scheduler.scale_noise(init, t0, x) if hasattr(scheduler, "scale_noise") else scheduler.add_noise(init, x, t0)
    else:
        x = x * init_sigma(scheduler)
    conditions = {k: v for k, v in conditions.items() if v is not None}
    image = image_guidance_scale is not None and "source_latents" in conditions
    guided = guidance_scale != 1.0 or (image and image_guidance_scale != 1.0)
    if guided:
        null = model.null_conditions(B, device=p.device)
        # conditions without a null (a mask) or not guided are kept in every pass: guidance acts on the others
        null = {k: v for k, v in null.items() if guide is None or k in guide or (image and k == "source_latents")}

        def nulled(keys) -> dict[str, torch.Tensor]:
            return {k: null[k].to(v.dtype).expand_as(v) if k in keys else v for k, v in conditions.items()}

        others = {k for k in null if k != "source_latents"} if image else set(null)
        passes = [conditions, nulled(others)] + ([nulled(set(null))] if image else [])
        stacked = {k: torch.cat([c[k] for c in passes]) for k in conditions}
    # stochastic multistep samplers (LCM) draw each sample's fresh noise from its own generator
    step_kw = {"generator": list(generators)} if _step_draws_noise(scheduler) else {}
    n = len(scheduler.timesteps)
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False), start=start):
        xin = scale_input(scheduler, x, t)
        tt = t.expand(B).to(p.device)
        pos = i / max(n - 1, 1)
        if guided and (guidance_interval is None or guidance_interval[0] <= pos <= guidance_interval[1]):
            k = len(passes)
            out = model(torch.cat([xin] * k), torch.cat([tt] * k), **stacked).sample[:, : cfg.in_channels].float()
            out = out.chunk(k)  # float32 from here on, also under autocast: guidance and the step stay exact
            if image:  # out = (c, c_I, u)
                out = out[2] + image_guidance_scale * (out[1] - out[2]) + guidance_scale * (out[0] - out[1])
            else:
                out = out[1] + guidance_scale * (out[0] - out[1])
        else:
            out = model(xin, tt, **conditions).sample[:, : cfg.in_channels].float()
        if clip_denoised is not None:
            out = clamp_denoised(out, xin, t, scheduler, i, clip_denoised)
        x = scheduler.step(out, t, x, **step_kw).prev_sample
    return x


def _step_draws_noise(scheduler) -> bool:
    """Whether the scheduler's step adds fresh noise (LCM's multistep consistency sampling)."""
    return type(scheduler).__name__ == "LCMScheduler"
