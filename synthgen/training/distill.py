"""Few-step generator: latent consistency distillation with guidance folded in.

``task: consistency`` distils a pretrained epsilon / v-prediction denoiser (``model.pretrained``,
the teacher) into a student of the same architecture that samples in 1-4 steps with diffusers'
``LCMScheduler``, following Latent Consistency Models (Luo et al. 2023, Algorithm 1; the
augmented consistency distillation of Song et al. 2023 in latent space):

- a training latent is noised to a timestep ``t`` of the ``N = T / k`` point skipping schedule
  (``k = objective.distill_skip``; t in {k-1, 2k-1, ..., T-1});
- the teacher takes one DDIM step from ``t`` to ``s = t - k`` with classifier-free guidance at the
  fixed scale ``objective.distill_guidance`` (so the student needs one pass per step, not two:
  the guided trajectory is what it learns, which folds the guidance in);
- the student's consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (LCM's boundary
  scalings, sigma_data 0.5, timestep scaling 10, the ones ``LCMScheduler`` samples with) at
  ``(x_t, t)`` is pulled towards the same function at ``(x_s, s)`` evaluated by the target
  network, with a pseudo-Huber loss (``objective.huber_c``);
- guidance dropout (``objective.cfg_dropout*``) drops a condition for both nets at once, so the
  student also learns the teacher's trajectory without it (guided on what is left), which is
  what it samples when a caller leaves a condition out (a source-only or unconditional job).

The target network is an exponential moving average of the student (``objective.
distill_target_decay``, LCM's 0.95), updated once per optimisation step before the step's loss;
it is a submodule of the task, so checkpoints hold it and a resumed run continues exactly. With
decay 0 the target is the student itself under a stop-gradient, as in improved consistency
training (Song & Dhariwal 2023): on the v2 denoiser that gave students whose samples were one
texture whatever the reference (BENCHMARKS.md, 2026-12-03). The student and the target start
from the teacher's weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from synthgen import seeding
from synthgen.config import ConfigError
from synthgen.training.tasks import DenoiserTask

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0  # LCMScheduler's default: its boundary condition must match training


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's (c_skip, c_out) at integer timesteps ``t``: c_skip(0) = 1, c_out(0) = 0."""
    s = TIMESTEP_SCALING * t.float()
    return SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s / (s**2 + SIGMA_DATA**2) ** 0.5


def lcm_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear", prediction: str = "epsilon",
                  skip: int = 20):
    """The ``LCMScheduler`` a student of this task samples with."""
    from diffusers import LCMScheduler

    from synthgen.sampling import BETA_END, BETA_START

    # the teacher's betas: LCMScheduler's own defaults are Stable Diffusion's, not the ones trained with
    return LCMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                        beta_start=BETA_START, beta_end=BETA_END,
                        prediction_type=prediction, original_inference_steps=num_train_timesteps // skip,
                        timestep_scaling=TIMESTEP_SCALING, clip_sample=False, set_alpha_to_one=True)


class ConsistencyTask(DenoiserTask):
    """Consistency distillation of ``model.pretrained`` (see the module docstring)."""

    def __init__(self, cfg):
        if not cfg.model.pretrained:
            raise ConfigError("task consistency: model.pretrained must name the teacher (a pipeline or denoiser folder)")
        if cfg.lora.rank:
            raise ConfigError("task consistency: trains the whole student; remove lora.rank")
        super().__init__(cfg)
        o = cfg.objective  # ConsistencyObjectiveConfig: kind, skip and decay checked there
        teacher = self._pretrained_denoiser().eval().requires_grad_(False)
        self._frozen["teacher"] = teacher
        from diffusers import DDPMScheduler

        from synthgen.sampling import BETA_END, BETA_START

        sched = DDPMScheduler(num_train_timesteps=o.num_train_timesteps, beta_schedule=o.beta_schedule,
                              beta_start=BETA_START, beta_end=BETA_END)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.float(), persistent=False)
        self.target = None  # the EMA target: a submodule, so checkpoints hold it
        if o.distill_target_decay > 0:
            self.target = copy.deepcopy(self.net).requires_grad_(False).eval()
        self._target_step = -1

    def train(self, mode: bool = True):
        super().train(mode)
        if self.target is not None:
            self.target.eval()
        return self

    @torch.no_grad()
    def _update_target(self) -> None:
        """target <- decay * target + (1 - decay) * student, once per optimisation step."""
        if self.target is None or not self.training or self._target_step == self.step:
            return
        self._target_step = self.step
        decay = self.cfg.objective.distill_target_decay
        for t, s in zip(self.target.parameters(), self.net.parameters(), strict=True):
            t.lerp_(s.detach(), 1 - decay)

    def _x0(self, pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Denoised estimate from a model output at alpha-bar ``a`` (B, 1, 1, 1)."""
        if self.cfg.objective.kind == "epsilon":
            return (x - (1 - a).sqrt() * pred) / a.sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * pred  # v-prediction

    def _eps(self, pred: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.cfg.objective.kind == "epsilon":
            return pred
        return (1 - a).sqrt() * x + a.sqrt() * pred

    def _consistency(self, net, x: torch.Tensor, t: torch.Tensor, conds: dict) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        out = net(x, t, **conds).sample[:, : x.shape[1]].float()
        c_skip, c_out = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t))
        return c_skip * x + c_out * self._x0(out, x, a)

    def forward(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        o = self.cfg.objective
        device = next(self.net.parameters()).device
        x0, conds = self.conditions(batch, device)
        B, k = len(x0), o.distill_skip
        teacher = self._frozen["teacher"].to(device)
        self._update_target()
        target_net = self.net if self.target is None else self.target
        drop = self._drops(B, conds, generator, device)  # guidance dropout: each net swaps in its own nulls
        t_conds = g_conds = conds
        if drop is not None:
            t_conds, g_conds = teacher.drop_conditions(drop, **conds), target_net.drop_conditions(drop, **conds)
            conds = self.net.drop_conditions(drop, **conds)
        n = torch.randint(1, o.num_train_timesteps // k + 1, (B,), generator=generator)
        t = (n * k - 1).to(device)  # k-1, 2k-1, ..., T-1: LCMScheduler's original timesteps
        s = (t - k).clamp_min(0)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        at, as_ = self.alphas_cumprod[t].view(-1, 1, 1, 1), self.alphas_cumprod[s].view(-1, 1, 1, 1)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * noise
        with torch.no_grad():
            null = teacher.null_conditions(B, device=device)
            uncond = {key: null[key].to(v.dtype).expand_as(v) if key in null else v for key, v in t_conds.items()}
            both = {key: torch.cat([t_conds[key], uncond[key]]) for key in t_conds}
            out = teacher(torch.cat([xt, xt]), torch.cat([t, t]), **both).sample[:, : x0.shape[1]].float()
            cond, uncond_out = out.chunk(2)
            guided = uncond_out + o.distill_guidance * (cond - uncond_out)
            x0_hat, eps_hat = self._x0(guided, xt, at), self._eps(guided, xt, at)
            xs = as_.sqrt() * x0_hat + (1 - as_).sqrt() * eps_hat  # one DDIM step of the guided teacher
            target = self._consistency(target_net, xs, s, g_conds)  # EMA target (or the student), no gradient
        pred = self._consistency(self.net, xt, t, conds)
        h = o.huber_c  # pseudo-Huber: quadratic below h, linear above
        return (torch.sqrt((pred - target) ** 2 + h**2) - h).mean()

    def save(self, net, path: Path) -> None:
        """The student, with its folded guidance scale in its config, and its LCMScheduler beside it."""
        o = self.cfg.objective
        net.register_to_config(distilled_guidance_scale=float(o.distill_guidance))
        net.save_pretrained(path)
        lcm_scheduler(o.num_train_timesteps, o.beta_schedule, o.kind, o.distill_skip).save_pretrained(
            Path(path) / "scheduler")

    def _preview_latents(self, net, conds: dict, n: int) -> tuple[torch.Tensor, int]:
        """Student samples in 1, 2 and 4 LCM steps (one grid row each) for the first 8 items."""
        from synthgen.sampling import sample_latents

        n = min(8, n)
        conds = {key: v[:n] for key, v in conds.items()}
        o = self.cfg.objective
        rows = []
        for steps in (1, 2, 4):
            sched = lcm_scheduler(o.num_train_timesteps, o.beta_schedule, o.kind, o.distill_skip)
            gens = seeding.generators(range(n))
            rows.append(sample_latents(net, sched, conds, gens, num_steps=steps, guidance_scale=1.0))
        return torch.cat(rows), n
