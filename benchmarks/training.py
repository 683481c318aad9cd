"""Training throughput: synthgen's loop on the feature cache vs a loop written the way diffusers'
``examples/text_to_image/train_text_to_image.py`` does it (encode every batch with the VAE and
the condition encoder inside the step), same denoiser, batch, precision and data, one run.

Also reports the denoiser's model FLOP/s as a fraction of this machine's measured fp32 matmul
peak (training FLOPs = 3 x forward FLOPs, counted with torch's FlopCounterMode).

    python benchmarks/training.py                 # small presets, 64 px tiles of the bundled slide
    python benchmarks/training.py --steps 50 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def forward_flops(model, x, t, emb) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, embeddings=emb)
    return counter.get_total_flops()


def run(steps: int = 30, batch_size: int = 32, workers: int = 1) -> dict:
    """Measure both loops and the MFU; returns images/s of each, their ratio, the MFU and a ``summary`` row."""
    args = argparse.Namespace(steps=steps, batch_size=batch_size, workers=workers)

    from diffusers import DDPMScheduler
    from torch.utils.data import DataLoader

    from synthgen.assets import SAMPLE_SLIDE
    from synthgen.config import load_train_config
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import PatchDataset
    from synthgen.data.slides import Slide
    from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table
    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config, encoder_config
    from synthgen.models.vae import VAE
    from synthgen.training.trainer import train

    work = Path(tempfile.mkdtemp(prefix="synthgen-bench-"))
    try:
        torch.manual_seed(0)
        with Slide(SAMPLE_SLIDE) as s:
            tiles = tile_slide(s, TileSpec(mpp=1.0, size=64, overlap=32), key="cmu")
        write_tile_table(tiles, work / "tiles.csv", {"cmu": {"path": str(SAMPLE_SLIDE)}})
        vae, enc = VAE.from_preset("small").eval(), SSLEncoder(**encoder_config("small")).eval()
        vae.save_pretrained(work / "vae")
        enc.save_pretrained(work / "ssl")
        dataset = PatchDataset(work / "tiles.csv")

        # -- synthgen: cache once, then train from the cache -----------------------------------
        t0 = time.perf_counter()
        build_cache(dataset, work / "cache", {"latents": vae, "emb": enc}, batch_size=64,
                    num_workers=args.workers, progress=False)
        t_cache = time.perf_counter() - t0
        cfg = load_train_config(None, {
            "task": "denoiser", "output_dir": str(work / "run"), "steps": args.steps, "seed": 0,
            "model": {"preset": "small"}, "data": {"cache": str(work / "cache"), "num_workers": args.workers},
            "optim": {"batch_size": args.batch_size, "lr": 1e-4}, "ema_decay": 0.999,
            "checkpoint_every": 10**6, "log_every": 1, "num_samples": 0})
        train(cfg, progress=False)
        recs = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
        warm = recs[3:]  # skip start-up steps
        ours = sum(r["images_per_s"] for r in warm) / len(warm)

        # -- reference: the diffusers-example loop, encoding inside every step -----------------
        torch.manual_seed(0)
        model = Denoiser(**denoiser_config("small")).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sched = DDPMScheduler(num_train_timesteps=1000)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            num_workers=args.workers)
        n_img, t_ref, step = 0, 0.0, 0
        while step < args.steps:
            for batch in loader:
                t1 = time.perf_counter()
                pixel_values = batch["image"].float() / 127.5 - 1
                with torch.no_grad():
                    latents = vae.model.encode(pixel_values).latent_dist.sample() * vae.scaling_factor
                    emb = enc(batch["image"])
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, 1000, (len(latents),))
                noisy = sched.add_noise(latents, noise, timesteps)
                pred = model(noisy, timesteps, embeddings=emb).sample
                loss = F.mse_loss(pred.float(), noise.float())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                step += 1
                if step > 3:  # same warm-up exclusion as above
                    t_ref += time.perf_counter() - t1
                    n_img += len(latents)
                if step >= args.steps:
                    break
        del loader
        ref = n_img / t_ref

        peak = matmul_peak()
        x = torch.randn(args.batch_size, 4, 16, 16)
        fl = 3 * forward_flops(model, x, torch.randint(0, 1000, (args.batch_size,)),
                               torch.randn(args.batch_size, 1, 128))
        mfu = fl * ours / args.batch_size / peak
        return {"tiles": len(dataset), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "batch_size": args.batch_size, "steps": args.steps, "cache_build_s": t_cache,
                "reference_images_per_s": ref, "synthgen_images_per_s": ours, "ratio": ours / ref,
                "matmul_peak_gflops": peak / 1e9, "model_gflops": fl * ours / args.batch_size / 1e9, "mfu": mfu,
                "summary": [{"measure": f"images/s, small denoiser, batch {args.batch_size}",
                             "reference": "diffusers-example loop (encode every step)", "reference_value": ref,
                             "synthgen_value": ours, "ratio": ours / ref,
                             "note": f"CPU MFU {100 * mfu:.1f}% of measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s"}]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    r = run(**vars(args))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"data: {r['tiles']} tiles of 64 px at 1 um/px; small denoiser "
          f"({r['params_m']:.1f} M params), batch {args.batch_size}, fp32")
    print(f"feature cache build (once): {r['cache_build_s']:.1f} s")
    print(f"diffusers-example loop (encode every step): {r['reference_images_per_s']:8.1f} images/s")
    print(f"synthgen train (cached latents+embeddings): {r['synthgen_images_per_s']:8.1f} images/s")
    print(f"ratio synthgen / reference: {r['ratio']:.2f}x")
    print(f"measured fp32 matmul peak: {r['matmul_peak_gflops']:.1f} GFLOP/s; denoiser training at "
          f"{r['model_gflops']:.1f} GFLOP/s = {100 * r['mfu']:.1f}% of peak (MFU)")
    print(f"headline: training_cached_vs_diffusers_loop ratio={r['ratio']:.4f}")


if __name__ == "__main__":
    main()
