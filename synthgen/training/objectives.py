"""Diffusion training objectives: noise schedule, timestep sampling and the loss.

Three parameterisations (Salimans & Ho 2022; Liu et al. 2022; Esser et al. 2024):

- ``epsilon``: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e, the model predicts e (DDPM).
- ``v_prediction``: same x_t, the model predicts v = sqrt(a_t) e - sqrt(1 - a_t) x_0.
- ``flow`` (rectified flow): x_t = (1 - t) x_0 + t e with t in [0, 1], the model predicts
  the velocity e - x_0; the model's timestep input is t x num_train_timesteps.

Timesteps are drawn ``uniform`` or ``logit_normal`` (t = sigmoid(n), n ~ N(0, 1): SD3's
choice, which spends more steps at middle noise levels where the loss is most informative).
The DDPM schedule is diffusers' ``DDPMScheduler``; nothing here keeps hidden state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from synthgen.config import DiffusionObjectiveConfig


class DiffusionObjective:
    """Loss of a denoiser on clean latents, with all randomness from an explicit generator."""

    def __init__(self, cfg: DiffusionObjectiveConfig):
        self.cfg = cfg
        self.T = cfg.num_train_timesteps
        if cfg.kind != "flow":
            from diffusers import DDPMScheduler

            from synthgen.sampling import BETA_END, BETA_START

            self.scheduler = DDPMScheduler(num_train_timesteps=self.T, beta_schedule=cfg.beta_schedule,
                                           beta_start=BETA_START, beta_end=BETA_END,
                                           prediction_type=cfg.kind)

    def sample_t(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Continuous t in (0, 1), one per sample."""
        if self.cfg.timesteps == "logit_normal":
            return torch.sigmoid(torch.randn(n, generator=generator))
        return torch.rand(n, generator=generator)

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, model timestep input, regression target) for clean x0, noise and t in (0, 1)."""
        if self.cfg.kind == "flow":
            tt = t.to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
            return (1 - tt) * x0 + tt * noise, t.to(x0.device) * self.T, noise - x0
        steps = (t * self.T).long().clamp_(0, self.T - 1).to(x0.device)
        xt = self.scheduler.add_noise(x0, noise, steps)
        target = noise if self.cfg.kind == "epsilon" else self.scheduler.get_velocity(x0, noise, steps)
        return xt, steps, target

    def loss(self, model, x0: torch.Tensor, conditions: dict, generator: torch.Generator) -> torch.Tensor:
        """Mean squared error of the model's prediction (first C output channels: a model that also
        predicts its variance, like PixCell's, is trained on the mean part only)."""
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = self.sample_t(len(x0), generator)
        xt, tin, target = self.noisy_input(x0, noise, t)
        pred = model(xt, tin, **conditions).sample[:, : x0.shape[1]]
        return F.mse_loss(pred.float(), target.float())
