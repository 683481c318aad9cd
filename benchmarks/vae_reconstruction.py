"""Reconstruction quality of a trained VAE on held-out real tiles: PSNR and SSIM, with a
reference measured in the same run: bicubic 4x down- and up-sampling (16x16x3 = 768 numbers
per 64 px tile, against the small VAE's 16x16x4 = 1024 latent numbers).

    python benchmarks/vae_reconstruction.py runs/vae_small/model runs/data/cmu_holdout.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, help="VAE folder (diffusers AutoencoderKL layout)")
    ap.add_argument("tiles", type=Path, help="tile table of held-out tiles")
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG: originals above reconstructions")
    args = ap.parse_args()

    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    from synthgen.data.datasets import PatchDataset
    from synthgen.models.vae import VAE, reconstruction_metrics, to_uint8

    ds = PatchDataset(args.tiles)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    vae = VAE.from_pretrained(args.vae).eval()
    ours = reconstruction_metrics(vae, images)
    x = images.float() / 255
    f = vae.downscale
    low = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True, align_corners=False)
    up = F.interpolate(low, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    up = (up * 255).round() / 255
    ref = {"psnr": float(peak_signal_noise_ratio(up, x, data_range=1.0)),
           "ssim": float(structural_similarity_index_measure(up, x, data_range=1.0))}
    print(f"{len(ds)} held-out tiles, {images.shape[-1]} px; VAE latents {vae.latent_channels}x"
          f"{images.shape[-1] // f}x{images.shape[-1] // f}")
    print(f"VAE reconstruction:          PSNR {ours['psnr']:.2f} dB   SSIM {ours['ssim']:.3f}")
    print(f"bicubic {f}x down/up (ref):   PSNR {ref['psnr']:.2f} dB   SSIM {ref['ssim']:.3f}")
    if args.grid:
        from synthgen.training.tasks import _save_grid

        n = min(8, len(images))
        with torch.no_grad():
            rec = to_uint8(vae.decode(vae.encode(images[:n])))
        _save_grid(torch.cat([images[:n], rec]), args.grid, nrow=n)
        print(f"grid -> {args.grid}")


if __name__ == "__main__":
    main()
