"""Reconstruction quality of a trained VAE on held-out real tiles: PSNR and SSIM, with a
reference measured in the same run: bicubic 4x down- and up-sampling (16x16x3 = 768 numbers
per 64 px tile, against the small VAE's 16x16x4 = 1024 latent numbers).

    python benchmarks/vae_reconstruction.py runs/vae_small/model runs/data/cmu_holdout.csv
    python benchmarks/vae_reconstruction.py   # default small pipeline's VAE, held-out third of the bundled slide
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VAE = REPO / "checkpoints" / "synthgen-small-cmu" / "vae"


def run(vae: Path = DEFAULT_VAE, tiles: Path | None = None, grid: Path | None = None, limit: int | None = None) -> dict:
    """PSNR and SSIM of the VAE and of the bicubic reference, their ratios as ``summary`` rows.

    Without ``tiles`` the held-out third of the bundled slide is used; ``limit`` keeps the first
    tiles only."""
    with tempfile.TemporaryDirectory() as tmp:
        if tiles is None:
            from _data import cmu_split

            tiles = cmu_split(Path(tmp))[1]
        return _run(argparse.Namespace(vae=Path(vae), tiles=Path(tiles), grid=grid, limit=limit))


def _run(args) -> dict:
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    from synthgen.data.datasets import PatchDataset
    from synthgen.models.vae import VAE, reconstruction_metrics, to_uint8

    ds = PatchDataset(args.tiles)
    images = torch.stack([ds[i]["image"] for i in range(min(len(ds), args.limit or len(ds)))])
    vae = VAE.from_pretrained(args.vae).eval()
    ours = reconstruction_metrics(vae, images)
    x = images.float() / 255
    f = vae.downscale
    low = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True, align_corners=False)
    up = F.interpolate(low, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
    up = (up * 255).round() / 255
    ref = {"psnr": float(peak_signal_noise_ratio(up, x, data_range=1.0)),
           "ssim": float(structural_similarity_index_measure(up, x, data_range=1.0))}
    result = {"tiles": len(images), "size": images.shape[-1], "downscale": f, "latent_channels": vae.latent_channels,
              "vae": ours, "bicubic": ref,
              "summary": [{"measure": f"reconstruction {name}, {len(images)} held-out tiles",
                           "reference": f"bicubic {f}x down/up", "reference_value": ref[key],
                           "synthgen_value": ours[key], "ratio": ours[key] / ref[key]}
                          for key, name in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"))]}
    if args.grid:
        from synthgen.training.tasks import _save_grid

        n = min(8, len(images))
        with torch.no_grad():
            rec = to_uint8(vae.decode(vae.encode(images[:n])))
        _save_grid(torch.cat([images[:n], rec]), args.grid, nrow=n)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, nargs="?", default=DEFAULT_VAE, help="VAE folder (diffusers AutoencoderKL layout)")
    ap.add_argument("tiles", type=Path, nargs="?", default=None,
                    help="tile table of held-out tiles (default: right third of the bundled slide)")
    ap.add_argument("--grid", type=Path, default=None, help="write a PNG: originals above reconstructions")
    args = ap.parse_args()
    r = run(args.vae, args.tiles, args.grid)
    f, ours, ref = r["downscale"], r["vae"], r["bicubic"]
    print(f"{r['tiles']} held-out tiles, {r['size']} px; VAE latents {r['latent_channels']}x"
          f"{r['size'] // f}x{r['size'] // f}")
    print(f"VAE reconstruction:          PSNR {ours['psnr']:.2f} dB   SSIM {ours['ssim']:.3f}")
    print(f"bicubic {f}x down/up (ref):   PSNR {ref['psnr']:.2f} dB   SSIM {ref['ssim']:.3f}")
    if args.grid:
        print(f"grid -> {args.grid}")


if __name__ == "__main__":
    main()
