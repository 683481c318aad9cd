"""Images larger than the model's patch: overlapping windows denoised together, one canvas.

At every sampling step each window of the latent canvas is denoised with its own condition
(an embedding grid, PixCell-style), and the model outputs are averaged where windows overlap,
with weights that fall off towards window borders (MultiDiffusion, Bar-Tal et al. 2023). The
scheduler then steps the whole canvas at once, so neighbouring windows agree at every step and
no seam appears. The result can be written as a pyramidal TIFF that OpenSlide and QuPath open.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from synthgen import seeding
from synthgen._io import atomic_path
from synthgen.config import SAMPLING


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, size) with windows of ``window`` at most ``stride`` apart."""
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    return [round(i * (size - window) / (n - 1)) for i in range(n)]


def region_embeddings(pipe, region: np.ndarray, overlap: int) -> torch.Tensor:
    """Embedding grid (rows, cols, tokens, dim) of the windows ``generate_large`` denoises over a
    real ``region`` (H, W, 3) uint8: each window is conditioned on the matching crop."""
    down, win = pipe.vae_scale, pipe.image_size
    starts = window_starts(region.shape[0] // down, win // down, (win - overlap) // down)
    crops = torch.stack([torch.from_numpy(region[sy * down: sy * down + win, sx * down: sx * down + win].copy())
                         .permute(2, 0, 1) for sy in starts for sx in starts])
    emb = pipe.encode_images(crops).cpu()
    return emb.reshape(len(starts), len(starts), *emb.shape[1:])


def _weights(window: int, device) -> torch.Tensor:
    """Separable raised-cosine (Hann) weights: near zero at the window border, 1 at its centre,
    so a window's contribution fades out smoothly where its neighbour takes over."""
    r = torch.arange(window, device=device, dtype=torch.float32)
    w = torch.sin(math.pi * (r + 0.5) / window) ** 2
    return (w[:, None] * w[None, :]).clamp_min(1e-4)


class WindowedDenoiser:
    """A denoiser over a latent canvas larger than its window, as a model function the one
    sampling loop (:func:`~synthgen.sampling.sample_latents`) calls like the denoiser
    itself (the k-diffusion way of adding behaviour: wrap the model, keep the sampler).

    Each call crops the canvas into overlapping windows, runs the denoiser on all of them as one
    batch, each with its own condition, and blends the predictions with Hann weights, so every
    step sees one consistent canvas and there are no seams (MultiDiffusion, Bar-Tal et al. 2023).
    Conditions are per window: ``embeddings`` (B, windows, tokens, dim), labels (B, windows).
    """

    def __init__(self, model, canvas: int, overlap: int):
        self.model, self.config = model, model.config
        win = self.win = model.config.sample_size
        if not 0 <= overlap < win:
            raise ValueError(f"overlap must be in [0, {win}) latent pixels, got {overlap}")
        self.ys, self.xs = window_starts(canvas, win, win - overlap), window_starts(canvas, win, win - overlap)
        self.corners = [(y, x) for y in self.ys for x in self.xs]
        self.canvas = canvas
        self.weights = _weights(win, next(model.parameters()).device)  # (win, win), float32

    def parameters(self):
        return self.model.parameters()

    def null_conditions(self, batch_size: int, device=None, dtype=None) -> dict[str, torch.Tensor]:
        n = len(self.corners)
        return {k: v.reshape(batch_size, n, *v.shape[1:])
                for k, v in self.model.null_conditions(batch_size * n, device=device, dtype=dtype).items()}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **conditions):
        from types import SimpleNamespace

        b, n, win = len(x), len(self.corners), self.win
        crops = torch.cat([x[i : i + 1, :, y : y + win, xx : xx + win] for i in range(b) for y, xx in self.corners])
        flat = {k: v.flatten(0, 1) for k, v in conditions.items()}
        out = self.model(crops, t.repeat_interleave(n), **flat).sample[:, : self.config.in_channels].float()
        w = self.weights
        acc = torch.zeros(b, out.shape[1], self.canvas, self.canvas, device=x.device, dtype=out.dtype)
        norm = torch.zeros(1, 1, self.canvas, self.canvas, device=x.device, dtype=out.dtype)
        for k, (y, xx) in enumerate(self.corners):
            acc[:, :, y : y + win, xx : xx + win] += out[k::n] * w
            norm[:, :, y : y + win, xx : xx + win] += w
        return SimpleNamespace(sample=acc / norm)


@torch.no_grad()
def generate_large(pipe, embeddings: torch.Tensor, size: int, overlap: int | None = None, seed: int = 0,
                   guidance_scale: float = SAMPLING.guidance, num_inference_steps: int = SAMPLING.steps,
                   class_label: int | None = None, progress: bool = True,
                   guidance_interval: tuple[float, float] | None = None, dtype: str | None = None) -> np.ndarray:
    """A ``size`` x ``size`` image from a grid of condition embeddings.

    Args:
        pipe: an embedding-conditioned :class:`~synthgen.pipelines.generate.SynthPipeline`.
        embeddings: (gy, gx, tokens, dim) one condition per window of the window grid, or
            (tokens, dim) for the same condition everywhere.
        size: output side in pixels (a multiple of the VAE's downscale factor).
        overlap: window overlap in pixels (default: half a window).
        seed: the canvas noise seed.
        guidance_interval: as for :func:`~synthgen.sampling.sample_latents`.
        dtype: compute precision as for the pipeline call (default: ``pipe.inference_dtype``,
            ``auto``: bfloat16 autocast where the device has fast bf16).

    Returns:
        (size, size, 3) uint8 RGB.
    """
    from synthgen.models.vae import VAE, to_uint8
    from synthgen.pipelines.precision import autocast, resolve_dtype
    from synthgen.sampling import sample_latents

    model = pipe.transformer
    cfg = model.config
    down = pipe.vae_scale
    if size % down:
        raise ValueError(f"size {size} must be a multiple of the VAE's downscale factor {down}")
    win, lat = cfg.sample_size, size // down
    ov = (win // 2) if overlap is None else overlap // down
    if not 0 <= ov < win:
        raise ValueError(f"overlap must be in [0, {win * down}) pixels, got {overlap}")
    windowed = WindowedDenoiser(model, lat, ov)
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    if emb.ndim == 2:
        emb = emb.expand(len(windowed.ys), len(windowed.xs), *emb.shape)
    if emb.shape[:2] != (len(windowed.ys), len(windowed.xs)):
        raise ValueError(f"embeddings grid is {tuple(emb.shape[:2])} but the canvas needs {len(windowed.ys)}x"
                         f"{len(windowed.xs)} windows of {win * down} px with {ov * down} px overlap")
    p = next(model.parameters())
    n = len(windowed.corners)
    conds = {"embeddings": emb.reshape(1, n, *emb.shape[2:]).to(p.device)}
    if cfg.num_classes:
        conds["class_labels"] = torch.full((1, n), class_label if class_label is not None else -1, device=p.device)
    compute = resolve_dtype(pipe.inference_dtype if dtype is None else dtype, p.device)
    with autocast(compute, p.device):
        x = sample_latents(windowed, pipe.scheduler, conds, [seeding.generator(seed)], num_inference_steps, guidance_scale,
                           latent_size=lat, guidance_interval=guidance_interval, progress=progress)
        image = to_uint8(VAE(pipe.vae).decode(x.float()))[0].permute(1, 2, 0).cpu().numpy()
    return image


def write_pyramidal_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float, tile: int = 256) -> Path:
    """Write a tiled, pyramidal RGB TIFF with its resolution (OpenSlide 'generic-tiff', QuPath).

    Levels halve in size (area-averaged) until the image fits in one tile. The file is
    written to a temporary name and renamed, so a partial file never has the final name.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    levels = [rgb]
    while max(levels[-1].shape[:2]) > tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((max(1, w // 2), max(1, h // 2)),
                                                                      Image.Resampling.BOX)))
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:  # no partial file
        for i, level in enumerate(levels):
            res = 1e4 / (mpp * rgb.shape[1] / level.shape[1])  # pixels per centimetre
            tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1,
                     software="synthgen")
    return path
