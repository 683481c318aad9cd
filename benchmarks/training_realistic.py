"""Training throughput on the parts users train with: synthgen's feature-cache loop against a
loop written the way diffusers' ``examples/text_to_image/train_text_to_image.py`` does it (encode
every batch with the VAE and the condition encoder inside the step), in fp32 and in bf16 autocast,
one run, same denoiser, batch, data and optimiser.

The parts, at random weights (timing needs no trained weights; none can be downloaded here):
an AutoencoderKL in the Stable Diffusion 3.5 layout (``VAE.from_preset("sd3")``, 16 latent
channels, 8x downsampling), a ViT of UNI2-h's size and layout (timm, ViT-H/14, 1536 wide, 24
blocks, SwiGLU, 8 register tokens: the ``uni2-h`` preset of ``synthgen.encoders.timm_encoder``)
and PixCell-256's denoiser (``Denoiser`` preset ``pixcell-256``: PixArt-XL/2, 28 x 1152), on
256 px tiles of the bundled slide at 0.5 um/px. Batch and step counts are cut to fit a 2-core CPU;
the first step of each loop is not timed.

The cache is built once (its time is reported, with the number of epochs over the same tiles
after which it has paid for itself); the headline is the cached loop's images/s over the
diffusers-example loop's, both in bf16 autocast.

    python benchmarks/training_realistic.py                  # 16 tiles, batch 2, 4 timed steps
    python benchmarks/training_realistic.py --tiles 32 --steps 6
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml


def parts():
    """(VAE, encoder, denoiser factory) of the realistic sizes, at random weights."""
    import timm

    from synthgen.encoders.timm_encoder import TIMM_PRESETS, TimmEncoder, resolve_layers
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config
    from synthgen.models.vae import VAE

    torch.manual_seed(0)
    vae = VAE.from_preset("sd3").eval().requires_grad_(False)
    kwargs = resolve_layers(dict(TIMM_PRESETS["uni2-h"]["kwargs"]))
    enc = TimmEncoder(timm.create_model("vit_huge_patch14_224", pretrained=False, **kwargs)).eval().requires_grad_(False)

    def denoiser():
        torch.manual_seed(0)
        return Denoiser(**denoiser_config("pixcell-256"))

    return vae, enc, denoiser


def run(tiles: int = 16, steps: int = 4, batch_size: int = 2) -> dict:
    from diffusers import DDPMScheduler
    from torch.utils.data import DataLoader, Subset

    from synthgen.assets import SAMPLE_SLIDE
    from synthgen.config import load_train_config
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import PatchDataset
    from synthgen.data.slides import Slide
    from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table

    work = Path(tempfile.mkdtemp(prefix="synthgen-bench-real-"))
    try:
        with Slide(SAMPLE_SLIDE) as s:
            found = tile_slide(s, TileSpec(mpp=0.5, size=256), key="cmu")[:tiles]
        write_tile_table(found, work / "tiles.csv", {"cmu": {"path": str(SAMPLE_SLIDE)}})
        dataset = PatchDataset(work / "tiles.csv")
        vae, enc, make_denoiser = parts()
        params = {"vae_m": sum(p.numel() for p in vae.parameters()) / 1e6,
                  "encoder_m": sum(p.numel() for p in enc.parameters()) / 1e6,
                  "denoiser_m": sum(p.numel() for p in make_denoiser().parameters()) / 1e6}

        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            build_cache(dataset, work / "cache", {"latents": vae, "emb": enc}, batch_size=4, progress=False)
        cache_s = time.perf_counter() - t0

        def ours(precision: str) -> float:
            out = work / f"run-{precision}"
            cfg = {"task": "denoiser", "output_dir": str(out), "steps": steps + 1, "seed": 0,
                   "model": {"preset": "pixcell-256"}, "data": {"cache": str(work / "cache")},
                   "optim": {"batch_size": batch_size, "lr": 1e-4}, "ema_decay": 0, "mixed_precision": precision,
                   "checkpoint_every": 10**6, "log_every": 1, "num_samples": 0}
            load_train_config(None, cfg)  # validated here; run in its own process: accelerate's precision
            (work / f"{precision}.yaml").write_text(yaml.safe_dump(cfg))  # is fixed once per process
            subprocess.run([sys.executable, "-m", "synthgen", "train", str(work / f"{precision}.yaml")], check=True,
                           capture_output=True)
            recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            shutil.rmtree(out, ignore_errors=True)
            warm = recs[1:]
            return sum(r["images_per_s"] for r in warm) / len(warm)

        def reference(precision: str) -> float:
            model = make_denoiser().train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            sched = DDPMScheduler(num_train_timesteps=1000)
            g = torch.Generator().manual_seed(0)
            order = torch.randperm(len(dataset), generator=g).tolist() * (steps + 1)
            loader = DataLoader(Subset(dataset, order[: (steps + 1) * batch_size]), batch_size=batch_size)
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
            n_img, t_ref = 0, 0.0
            for step, batch in enumerate(loader):
                t1 = time.perf_counter()
                with amp:
                    with torch.no_grad():
                        latents = vae.encode(batch["image"], sample=True)
                        emb = enc(batch["image"])
                    noise = torch.randn_like(latents.float())
                    t = torch.randint(0, 1000, (len(latents),))
                    pred = model(sched.add_noise(latents.float(), noise, t), t, embeddings=emb.float()).sample
                    loss = F.mse_loss(pred[:, : latents.shape[1]].float(), noise)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad()
                if step > 0:  # the first step is not timed, as in the cached loop
                    t_ref += time.perf_counter() - t1
                    n_img += len(latents)
            return n_img / t_ref

        rates = {}
        for precision in ("no", "bf16"):
            rates[f"synthgen {precision}"] = ours(precision)
            rates[f"reference {precision}"] = reference(precision)
        ratio = rates["synthgen bf16"] / rates["reference bf16"]
        # epochs over the same tiles after which cache + cached epochs cost less than encoding each time
        per_img_saved = 1 / rates["reference bf16"] - 1 / rates["synthgen bf16"]
        break_even = cache_s / (len(dataset) * per_img_saved) if per_img_saved > 0 else float("inf")
        return {"tiles": len(dataset), "batch_size": batch_size, "steps": steps, **params, "cache_build_s": cache_s,
                "images_per_s": rates, "ratio_bf16": ratio,
                "ratio_fp32": rates["synthgen no"] / rates["reference no"],
                "bf16_over_fp32_cached": rates["synthgen bf16"] / rates["synthgen no"],
                "break_even_epochs": break_even,
                "summary": [{"measure": f"training images/s, PixCell-256 denoiser, SD3.5-layout VAE, UNI2-h-size ViT, "
                                        f"batch {batch_size}, bf16 autocast",
                             "reference": "diffusers-example loop (encode every step), bf16 autocast",
                             "reference_value": rates["reference bf16"], "synthgen_value": rates["synthgen bf16"],
                             "ratio": ratio,
                             "note": f"cache of {len(dataset)} tiles built in {cache_s:.0f} s, paid back after "
                                     f"{break_even:.1f} epochs"}]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per loop (one more is run first)")
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args()
    r = run(args.tiles, args.steps, args.batch_size)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"parts (random weights): VAE {r['vae_m']:.0f} M, encoder {r['encoder_m']:.0f} M, denoiser "
          f"{r['denoiser_m']:.0f} M parameters; {r['tiles']} tiles of 256 px at 0.5 um/px, batch {r['batch_size']}, "
          f"{r['steps']} timed steps per loop")
    print(f"feature cache build (once, bf16): {r['cache_build_s']:.1f} s")
    for k, v in r["images_per_s"].items():
        print(f"  {k:16s} {v:8.3f} images/s")
    print(f"ratio cached / diffusers-example loop: fp32 {r['ratio_fp32']:.2f}x, bf16 {r['ratio_bf16']:.2f}x; "
          f"bf16 / fp32 (cached loop) {r['bf16_over_fp32_cached']:.2f}x")
    print(f"the cache pays for itself after {r['break_even_epochs']:.1f} epochs over these tiles")
    print(f"headline: training_cached_vs_diffusers_loop_realistic ratio={r['ratio_bf16']:.4f}")


if __name__ == "__main__":
    main()
