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

from synthgen.config import SAMPLING
from synthgen.seeding import generator


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


@torch.no_grad()
def generate_large(pipe, embeddings: torch.Tensor, size: int, overlap: int | None = None, seed: int = 0,
                   guidance_scale: float = SAMPLING.guidance, num_inference_steps: int = SAMPLING.steps, class_label: int | None = None,
                   progress: bool = True) -> np.ndarray:
    """A ``size`` x ``size`` image from a grid of condition embeddings.

    Args:
        pipe: an embedding-conditioned :class:`~synthgen.pipelines.generate.SynthPipeline`.
        embeddings: (gy, gx, tokens, dim) one condition per window of the window grid, or
            (tokens, dim) for the same condition everywhere.
        size: output side in pixels (a multiple of the VAE's downscale factor).
        overlap: window overlap in pixels (default: half a window).
        seed: the canvas noise seed.

    Returns:
        (size, size, 3) uint8 RGB.
    """
    from tqdm.auto import tqdm

    from synthgen.models.vae import VAE, to_uint8
    from synthgen.pipelines.sampling import init_sigma, scale_input

    model, sched = pipe.transformer, pipe.scheduler
    cfg = model.config
    down = pipe.vae_scale
    if size % down:
        raise ValueError(f"size {size} must be a multiple of the VAE's downscale factor {down}")
    win = cfg.sample_size
    lat = size // down
    ov = (win // 2) if overlap is None else overlap // down
    if not 0 <= ov < win:
        raise ValueError(f"overlap must be in [0, {win * down}) pixels, got {overlap}")
    ys = window_starts(lat, win, win - ov)
    xs = window_starts(lat, win, win - ov)
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    if emb.ndim == 2:
        emb = emb.expand(len(ys), len(xs), *emb.shape)
    if emb.shape[:2] != (len(ys), len(xs)):
        raise ValueError(f"embeddings grid is {tuple(emb.shape[:2])} but the canvas needs {len(ys)}x{len(xs)} windows "
                         f"of {win * down} px with {ov * down} px overlap")
    p = next(model.parameters())
    g = generator(seed)
    x = torch.randn(1, cfg.in_channels, lat, lat, generator=g).to(p.device, p.dtype)
    sched.set_timesteps(num_inference_steps, device=p.device)
    x = x * init_sigma(sched)
    w = _weights(win, p.device)
    windows = [(y, xx, emb[i, j]) for i, y in enumerate(ys) for j, xx in enumerate(xs)]
    conds = torch.stack([e for *_, e in windows]).to(p.device)
    labels = torch.full((len(windows),), class_label if class_label is not None else -1, device=p.device)
    cond_kw = {"embeddings": conds}
    if cfg.num_classes:
        cond_kw["class_labels"] = labels
    null = model.null_conditions(len(windows), device=p.device)
    for t in tqdm(sched.timesteps, desc="large image", disable=not progress, leave=False):
        xin = scale_input(sched, x, t)
        crops = torch.cat([xin[:, :, y : y + win, xx : xx + win] for y, xx, _ in windows])
        tt = t.expand(len(windows)).to(p.device)
        out = model(crops, tt, **cond_kw).sample[:, : cfg.in_channels]
        if guidance_scale != 1.0:
            unc = model(crops, tt, **{k: null[k] for k in cond_kw}).sample[:, : cfg.in_channels]
            out = unc + guidance_scale * (out - unc)
        acc = torch.zeros_like(x)
        norm = torch.zeros(1, 1, lat, lat, device=p.device)
        for k, (y, xx, _) in enumerate(windows):
            acc[:, :, y : y + win, xx : xx + win] += out[k : k + 1] * w
            norm[:, :, y : y + win, xx : xx + win] += w
        x = sched.step(acc / norm, t, x).prev_sample
    image = to_uint8(VAE(pipe.vae).decode(x))[0].permute(1, 2, 0).cpu().numpy()
    return image


def write_pyramidal_tiff(path: str | os.PathLike, rgb: np.ndarray, mpp: float, tile: int = 256) -> Path:
    """Write a tiled, pyramidal RGB TIFF with its resolution (OpenSlide 'generic-tiff', QuPath).

    Levels halve in size (area-averaged) until the image fits in one tile. The file is
    written to a temporary name and renamed, so a partial file never has the final name.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    levels = [rgb]
    while max(levels[-1].shape[:2]) > tile:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(Image.fromarray(levels[-1]).resize((max(1, w // 2), max(1, h // 2)),
                                                                      Image.Resampling.BOX)))
    try:
        with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
            for i, level in enumerate(levels):
                res = 1e4 / (mpp * rgb.shape[1] / level.shape[1])  # pixels per centimetre
                tw.write(level, tile=(tile, tile), photometric="rgb", compression="zlib",
                         resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1,
                         software="synthgen")
        os.replace(tmp, path)
    except BaseException:  # full disk, Ctrl-C: leave no partial file
        tmp.unlink(missing_ok=True)
        raise
    return path
