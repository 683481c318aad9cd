"""Reconstruction quality of trained VAEs on held-out real tiles: PSNR, SSIM and sharpness
(mean Laplacian variance of the reconstructions over that of the real tiles; 1 = as sharp as
real), with references measured in the same run on the same tiles: bicubic down- and up-sampling
by the VAE's factor, and a Gaussian blur (sigma 1 px) of the real tiles.

    python benchmarks/vae_reconstruction.py runs/vae_v2/model                   # v2 test split
    python benchmarks/vae_reconstruction.py runs/vae_v2/model --compare checkpoints/synthgen-small-cmu/vae
    python benchmarks/vae_reconstruction.py VAE tiles.csv --grid recon.png      # any tile table
    python benchmarks/vae_reconstruction.py                                     # shipped v2 VAE, v2 test split
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VAE = REPO / "checkpoints" / "synthgen-v2" / "vae"


def run(vae: Path = DEFAULT_VAE, tiles: Path | None = None, grid: Path | None = None, limit: int | None = None,
        compare: tuple[Path, ...] = ()) -> dict:
    """Metrics of each VAE and of the references, with ``summary`` rows (VAE / reference ratios).

    Without ``tiles`` the test split of ``recipes/data/default_v2.csv`` (128 px at 0.5 um/px) is
    used; ``limit`` keeps the first tiles only."""
    with tempfile.TemporaryDirectory() as tmp:
        if tiles is None:
            from _data import v2_split

            tiles = v2_split(Path(tmp))
        return _run(Path(vae), Path(tiles), grid, limit, tuple(Path(c) for c in compare))


def _run(vae_path: Path, tiles: Path, grid: Path | None, limit: int | None, compare: tuple[Path, ...]) -> dict:
    import numpy as np

    from synthgen.data.datasets import PatchDataset
    from synthgen.metrics.handcrafted import blur
    from synthgen.models.vae import VAE, image_agreement, reconstruction_metrics, to_uint8

    ds = PatchDataset(tiles)
    images = torch.stack([ds[i]["image"] for i in range(min(len(ds), limit or len(ds)))])
    x = images.float() / 255
    vaes = {str(p): VAE.from_pretrained(p).eval() for p in (vae_path, *compare)}
    results = {name: reconstruction_metrics(v, images) for name, v in vaes.items()}
    f = vaes[str(vae_path)].downscale
    low = F.interpolate(x, scale_factor=1 / f, mode="bicubic", antialias=True, align_corners=False)
    up = F.interpolate(low, size=x.shape[-2:], mode="bicubic", align_corners=False)
    as_uint8 = lambda t: (t.clamp(0, 1) * 255).round().to(torch.uint8)  # noqa: E731
    refs = {f"bicubic {f}x down/up": image_agreement(as_uint8(up), images),
            "Gaussian blur sigma 1 px": image_agreement(
                torch.from_numpy(np.stack(blur(images, sigma=1.0))).permute(0, 3, 1, 2), images)}
    ours = results[str(vae_path)]
    bicubic = refs[f"bicubic {f}x down/up"]
    summary = [{"measure": f"reconstruction {name}, {len(images)} held-out tiles",
                "reference": f"bicubic {f}x down/up", "reference_value": bicubic[key],
                "synthgen_value": ours[key], "ratio": ours[key] / bicubic[key]}
               for key, name in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"))]
    summary.append({"measure": f"reconstruction sharpness, {len(images)} held-out tiles",
                    "reference": "real tiles (1.0)", "reference_value": 1.0,
                    "synthgen_value": ours["sharpness_ratio"], "ratio": ours["sharpness_ratio"]})
    result = {"tiles": len(images), "size": images.shape[-1], "table": str(tiles), "downscale": f,
              "latent_channels": vaes[str(vae_path)].latent_channels, "vae": ours, "bicubic": bicubic,
              "vaes": results, "references": refs, "summary": summary}
    if grid:
        from synthgen.training.tasks import save_grid

        n = min(8, len(images))
        pick = torch.linspace(0, len(images) - 1, n).long()
        rows = [images[pick]]
        with torch.no_grad():
            rows += [to_uint8(v.decode(v.encode(images[pick]))) for v in vaes.values()]
        save_grid(torch.cat(rows), grid, nrow=n)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vae", type=Path, nargs="?", default=DEFAULT_VAE, help="VAE folder (diffusers AutoencoderKL layout)")
    ap.add_argument("tiles", type=Path, nargs="?", default=None,
                    help="tile table of held-out tiles (default: test split of recipes/data/default_v2.csv)")
    ap.add_argument("--compare", type=Path, nargs="*", default=(), help="more VAE folders, measured on the same tiles")
    ap.add_argument("--grid", type=Path, default=None,
                    help="write a PNG: originals, then each VAE's reconstructions (one row per VAE)")
    ap.add_argument("--limit", type=int, default=None, help="first N tiles only")
    args = ap.parse_args()
    r = run(args.vae, args.tiles, args.grid, args.limit, tuple(args.compare))
    print(f"{r['tiles']} held-out tiles, {r['size']} px ({r['table']})")
    print(f"{'':44s} {'PSNR dB':>8s} {'SSIM':>6s} {'sharpness':>9s}")
    for name, m in {**r["vaes"], **r["references"]}.items():
        print(f"{name[-44:]:44s} {m['psnr']:8.2f} {m['ssim']:6.3f} {m['sharpness_ratio']:9.3f}")
    if args.grid:
        print(f"grid -> {args.grid}")
    print(f"headline: vae_psnr_vs_bicubic ratio={r['summary'][0]['ratio']:.4f}")


if __name__ == "__main__":
    main()
