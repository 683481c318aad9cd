"""The embedded default image encoder: a small residual CNN trained by the project with a
self-supervised objective on real H&E tiles: SimCLR (Chen et al. 2020, :func:`simclr_loss`) or
DINO self-distillation (Caron et al. 2021, :class:`DINO`).

It stands in for UNI-style foundation models on machines without them: same protocol
(images -> (B, tokens, dim)), same role as the denoiser's condition. The weights shipped in
``checkpoints/`` are trained with :func:`simclr_loss` on tiles of the bundled slides.

Views (:func:`augment_views`): random resized crops, flips, 90-degree rotations, colour jitter and,
for pathology, stain jitter in H&E optical-density space (:func:`hed_jitter`, Tellez et al. 2018)
and Gaussian blur. Every random number comes from the generator passed in.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from synthgen.encoders.base import ImageEncoder, to_unit_range
from synthgen.loading import StrictLoadMixin


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class _Block(nn.Module):
    """Pre-activation residual block (He et al. 2016) with GroupNorm, optional stride-2."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.n1, self.c1 = _norm(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n2, self.c2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return h + self.skip(x)


class SSLEncoder(StrictLoadMixin, ImageEncoder, ModelMixin, ConfigMixin):
    """Small residual CNN image encoder with a SimCLR projection head.

    Args:
        input_size: side of the (resized) input in pixels.
        width: channels of the first stage (doubling at each of 4 stages).
        dim: embedding size (output of the pooled backbone).
        proj_dim: size of the projection used only by the SSL loss.
        grid: crops per side, one token each.
    """

    @register_to_config
    def __init__(self, input_size: int = 128, width: int = 32, dim: int = 256, proj_dim: int = 128, grid: int = 1):
        super().__init__(grid=grid)
        self.input_size, self.dim = input_size, dim
        w = [width, width * 2, width * 4, width * 8]
        self.stem = nn.Conv2d(3, w[0], 3, 2, 1)
        self.stages = nn.Sequential(*[_Block(w[max(i - 1, 0)], w[i], 1 if i == 0 else 2) for i in range(4)])
        self.head = nn.Sequential(_norm(w[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(w[-1], dim))
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, proj_dim))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# Ruifrok & Johnston (2001) stain vectors, rows hematoxylin, eosin, DAB: skimage.color.rgb_from_hed
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_LOG_ADJUST = math.log(1e-6)  # skimage's optical-density unit: OD / -log(1e-6)


def rgb_to_hed(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] (B, 3, H, W) -> H, E, D concentrations (B, 3, H, W) by colour deconvolution.

    Same units as :func:`skimage.color.rgb2hed` (optical density over -ln 1e-6), but not clipped
    at 0, so that :func:`hed_to_rgb` inverts it exactly."""
    x = to_unit_range(images)
    hed_from_rgb = torch.linalg.inv(torch.tensor(RGB_FROM_HED, dtype=torch.float64)).to(x)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST  # Beer-Lambert: OD = -log(I / I0)
    return torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """H, E, D concentrations (B, 3, H, W) -> RGB in [0, 1] (:func:`skimage.color.hed2rgb`)."""
    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=hed.dtype, device=hed.device)
    return torch.exp(torch.einsum("bdhw,dc->bchw", hed, rgb_from_hed) * _LOG_ADJUST).clamp(0, 1)


def _uniform(shape, generator, device) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, device="cpu").to(device)


def hed_jitter(images: torch.Tensor, scale: float = 0.2, shift: float = 0.01,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """HED stain augmentation (Tellez et al. 2018): each image's H, E and D concentrations
    (:func:`rgb_to_hed`) become ``alpha * c + beta`` with ``alpha ~ U(1 - scale, 1 + scale)`` and
    ``beta ~ U(-shift, shift)`` per image and channel, back to RGB (float in [0, 1]).

    Args:
        images: uint8 (B, 3, H, W) or float in [0, 1].
        scale, shift: jitter bounds (Tellez et al.: 0.05 "light", 0.2 "strong"). ``shift`` is in
            rgb2hed units (1 = 13.8 optical-density units), where the median H concentration of
            the v2 tiles is about 0.013: a shift of 0.05 turns glass purple, 0.01 stays plausible.
        generator: source of the per-image draws.
    """
    if not 0 <= scale < 1 or shift < 0:
        raise ValueError(f"hed_jitter: need 0 <= scale < 1 and shift >= 0, got scale={scale}, shift={shift}")
    x = to_unit_range(images)
    B = x.shape[0]
    alpha = 1 + scale * (2 * _uniform((B, 3, 1, 1), generator, x.device) - 1)
    beta = shift * (2 * _uniform((B, 3, 1, 1), generator, x.device) - 1)
    return hed_to_rgb(rgb_to_hed(x) * alpha + beta)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of float (B, C, H, W) with one sigma (px) per image, reflect padding."""
    B, C, H, W = images.shape
    r = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(H, W) - 1)))
    t = torch.arange(-r, r + 1, device=images.device, dtype=images.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(images).clamp_min(1e-3)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B * C, 2r + 1)
    x = F.pad(images.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(B * C, 1, 1, -1), groups=B * C)
    return F.conv2d(x, k.view(B * C, 1, -1, 1), groups=B * C).view(B, C, H, W)


def augment_views(images: torch.Tensor, generator: torch.Generator | None = None, *, size: int | None = None,
                  scale: tuple[float, float] = (0.35, 1.0), hed_scale: float = 0.0, hed_shift: float = 0.0,
                  blur: float = 0.0, blur_sigma: tuple[float, float] = (0.1, 1.5)) -> torch.Tensor:
    """A random view of each image, float in [0, 1]: crop (``scale``: 35-100% of the area), resized
    to ``size`` x ``size`` (default: the input's size), flips, 90-degree rotations, HED stain jitter (when
    ``hed_scale`` or ``hed_shift`` is set, :func:`hed_jitter`), brightness/contrast/saturation and
    per-channel colour jitter, and with probability ``blur`` a Gaussian blur of sigma drawn from
    ``blur_sigma`` (px of the output). With the defaults the views (and the draws from
    ``generator``) are those of the first shipped encoder's training."""
    x = to_unit_range(images)
    B, _, H, W = x.shape
    hw = (size, size) if size else (H, W)
    dev = x.device
    lo, hi = scale
    if not 0 < lo <= hi:
        raise ValueError(f"augment_views: scale must be 0 < min <= max, got {scale}")

    def u(*shape):
        return _uniform(shape, generator, dev)

    out = torch.empty(B, 3, *hw, dtype=x.dtype, device=dev)
    area = u(B) * (hi - lo) + lo
    rot, flip = torch.randint(0, 4, (B,), generator=generator), u(B) < 0.5
    for i in range(B):
        side = min(H, W, max(8, int(round(H * float(area[i]) ** 0.5))))
        top = int(torch.randint(0, H - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, W - side + 1, (1,), generator=generator))
        crop = x[i : i + 1, :, top : top + side, left : left + side]
        crop = F.interpolate(crop, size=hw, mode="bilinear", antialias=True, align_corners=False)[0]
        crop = torch.rot90(crop, int(rot[i]), dims=(1, 2))
        out[i] = crop.flip(2) if flip[i] else crop
    if hed_scale or hed_shift:
        out = hed_jitter(out, hed_scale, hed_shift, generator)
    gray = out.mean(1, keepdim=True)
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - gray) * (1 + 0.4 * (u(B, 1, 1, 1) - 0.5)) + gray  # saturation
    out = (out - mean) * (1 + 0.4 * (u(B, 1, 1, 1) - 0.5)) + mean  # contrast
    out = out * (1 + 0.16 * (u(B, 3, 1, 1) - 0.5)) + 0.2 * (u(B, 1, 1, 1) - 0.5)  # stain + brightness
    out = out.clamp(0, 1)
    if blur:
        blurred = u(B) < blur
        sigma = u(B) * (blur_sigma[1] - blur_sigma[0]) + blur_sigma[0]
        if blurred.any():
            out = torch.where(blurred.view(B, 1, 1, 1), gaussian_blur(out, sigma), out)
    return out


def _backbone_input(encoder: SSLEncoder, views: torch.Tensor, resize: bool = True) -> torch.Tensor:
    """Views (float [0, 1]) -> normalised backbone input of one crop each (no grid split: a view
    is already one token's field), resized to ``encoder.input_size`` unless ``resize`` is off
    (DINO's small local crops go through the fully convolutional backbone at their own size)."""
    if resize and views.shape[-2:] != (encoder.input_size, encoder.input_size):
        views = F.interpolate(views, size=(encoder.input_size, encoder.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
    mean = torch.tensor(encoder.mean, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=views.device, dtype=views.dtype).view(1, 3, 1, 1)
    x = (views - mean) / std
    p = next(encoder.parameters(), None)
    return x if p is None else x.to(p.device, p.dtype)


def _global_views(encoder: SSLEncoder, images: torch.Tensor, generator, augment: Mapping[str, Any] | None,
                  n: int = 2) -> list[torch.Tensor]:
    """``n`` views of each image covering what one token sees: the whole image (grid 1) or, for a
    grid encoder, a crop of one cell's area at one cell's side."""
    kw = dict(augment or {})
    g = encoder.grid
    if g > 1:
        lo, hi = kw.pop("scale", (0.35, 1.0))
        kw.update(size=images.shape[-1] // g, scale=(lo / g**2, hi / g**2))
    return [augment_views(images, generator, **kw) for _ in range(n)]


def simclr_loss(encoder: SSLEncoder, images: torch.Tensor, temperature: float = 0.2,
                generator: torch.Generator | None = None, augment: Mapping[str, Any] | None = None) -> torch.Tensor:
    """NT-Xent loss on two augmented views of each image (SimCLR, eq. 1).

    Each view must pick its partner out of the 2B - 1 other views in the batch. ``augment``:
    keyword arguments of :func:`augment_views` (e.g. ``hed_scale``, ``blur``).
    """
    v1, v2 = _global_views(encoder, images, generator, augment)
    z = encoder.projector(encoder.embed(_backbone_input(encoder, torch.cat([v1, v2]))))
    z = F.normalize(z, dim=-1)
    sim = z @ z.T / temperature
    n = len(images)
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
    return F.cross_entropy(sim, target)


class DINOHead(nn.Module):
    """DINO's last layers: batch normalisation of the projection (DINO uses BN in the head of
    convolutional backbones), L2 normalisation, then cosine similarity to ``prototypes``
    weight-normalised vectors (weight norm with its gain fixed at 1, Caron et al. 2021, sec. 3.1)."""

    def __init__(self, dim: int, prototypes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.weight = nn.Parameter(torch.randn(prototypes, dim) * dim**-0.5)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.norm(z), dim=-1) @ F.normalize(self.weight, dim=-1).T


class DINO(nn.Module):
    """Self-distillation with no labels (Caron et al. 2021) around an :class:`SSLEncoder` student.

    The teacher is an exponential moving average of the student (encoder, projector and head),
    updated by :meth:`update_teacher`. The student matches, on every other view, the teacher's
    centred and sharpened distribution over ``prototypes`` for the two global views (eq. 1 with
    multi-crop: ``local_crops`` small views the student sees, the teacher does not).

    Args:
        encoder: the student; its ``projector`` is DINO's bottleneck MLP.
        prototypes: size K of the output distribution.
        teacher_temperature / student_temperature: sharpening (0.04 / 0.1 in the paper).
        center_momentum: EMA of the teacher's batch mean output, subtracted before sharpening.
        local_crops: number of local views per image; ``local_size`` their side in px (default
            half the encoder's input side: global views are resized to it, local views are not),
            ``local_scale`` their area as a fraction of the area a global view covers.
    """

    def __init__(self, encoder: SSLEncoder, prototypes: int = 1024, teacher_temperature: float = 0.04,
                 student_temperature: float = 0.1, center_momentum: float = 0.9, local_crops: int = 4,
                 local_size: int | None = None, local_scale: tuple[float, float] = (0.05, 0.35)):
        super().__init__()
        self.head = DINOHead(encoder.config.proj_dim, prototypes)
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(prototypes))
        self.teacher_temperature, self.student_temperature = teacher_temperature, student_temperature
        self.center_momentum, self.local_crops = center_momentum, local_crops
        self.local_size, self.local_scale = local_size, local_scale

    @torch.no_grad()
    def update_teacher(self, encoder: SSLEncoder, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (DINO's EMA, sec. 3.1)."""
        pairs = [(self.teacher, encoder), (self.teacher_head, self.head)]
        for t_mod, s_mod in pairs:
            for t, s in zip(t_mod.parameters(), s_mod.parameters(), strict=True):
                t.lerp_(s.detach(), 1 - momentum)

    def _out(self, encoder, head, x):
        return head(encoder.projector(encoder.embed(x)))

    def loss(self, encoder: SSLEncoder, images: torch.Tensor, generator: torch.Generator | None = None,
             augment: Mapping[str, Any] | None = None) -> torch.Tensor:
        """Cross-entropy of the student's views against the teacher's global views (DINO, eq. 1)."""
        globals_ = _global_views(encoder, images, generator, augment)
        kw = {k: v for k, v in dict(augment or {}).items() if k != "scale"}
        kw["size"] = self.local_size or max(8, encoder.input_size // 2)
        field = (globals_[0].shape[-1] / images.shape[-1]) ** 2  # the area a global view covers, of the image
        lo, hi = self.local_scale
        locals_ = [augment_views(images, generator, **kw, scale=(lo * field, hi * field)) for _ in range(self.local_crops)]
        x_glob = _backbone_input(encoder, torch.cat(globals_))
        with torch.no_grad():
            t = self._out(self.teacher, self.teacher_head, x_glob)
            t_prob = F.softmax((t - self.center) / self.teacher_temperature, dim=-1).chunk(2)
        s = [self._out(encoder, self.head, x_glob)]
        if locals_:
            s.append(self._out(encoder, self.head, _backbone_input(encoder, torch.cat(locals_), resize=False)))
        s_logp = F.log_softmax(torch.cat(s) / self.student_temperature, dim=-1).chunk(2 + self.local_crops)
        total, n = 0.0, 0
        for iq, q in enumerate(t_prob):
            for v, lp in enumerate(s_logp):
                if v != iq:  # never the same view
                    total = total + (-(q * lp).sum(-1)).mean()
                    n += 1
        self._update_center(t)
        return total / n

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        mean = teacher_out.mean(0)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
