"""Sampling throughput and quality: synthgen's pipeline vs diffusers' stock ``PixArtSigmaPipeline``
running the same transformer weights, VAE, scheduler (DPM-Solver++), step count and guidance,
in one run, on the same real condition embeddings.

1. Same settings (20 steps): images/s of each, and their ratio.
2. Fewer steps at equal quality: synthgen at 8 steps vs stock at 20 steps, with the Frechet
   distance (in the pipeline's image-encoder space) of each output set to held-out real tiles.

    python benchmarks/sampling.py --pipeline runs/pipeline --cache runs/cache_small \\
        --holdout runs/data/cmu_holdout.csv
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017)."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, required=True)
    ap.add_argument("--cache", type=Path, required=True, help="feature cache: real condition embeddings")
    ap.add_argument("--holdout", type=Path, required=True, help="tile table of held-out real tiles (for FD)")
    ap.add_argument("--n", type=int, default=64, help="images per setting")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=2.0)
    args = ap.parse_args()

    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from synthgen.data.cache import CacheDataset
    from synthgen.data.datasets import PatchDataset
    from synthgen.pipelines.generate import SynthPipeline

    torch.manual_seed(0)
    pipe = SynthPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    cache = CacheDataset(args.cache)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(cache), (args.n,), generator=g).tolist()
    emb = torch.stack([cache[i]["emb"] for i in idx]).float()
    size = pipe.image_size

    stock = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, vae=pipe.vae,
                                scheduler=DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
    stock.set_progress_bar_config(disable=True)
    null = pipe.transformer.null_conditions(1)["embeddings"].detach()

    def run_stock(steps: int) -> list:
        out = []
        for lo in range(0, args.n, args.batch_size):
            e = emb[lo : lo + args.batch_size]
            gens = [torch.Generator().manual_seed(lo + i) for i in range(len(e))]
            mask = torch.ones(len(e), e.shape[1])
            out += stock(prompt_embeds=e, prompt_attention_mask=mask, negative_prompt=None,
                         negative_prompt_embeds=null.expand(len(e), -1, -1),
                         negative_prompt_attention_mask=mask, guidance_scale=args.guidance, num_inference_steps=steps,
                         height=size, width=size, use_resolution_binning=False, generator=gens,
                         output_type="pil").images
        return out

    def run_ours(steps: int, interval=None) -> list:
        return pipe(embeddings=emb, seeds=list(range(args.n)), guidance_scale=args.guidance,
                    num_inference_steps=steps, batch_size=args.batch_size, output_type="pil",
                    guidance_interval=interval).images

    def run_ours_interval(steps: int) -> list:
        return run_ours(steps, (0.2, 0.8))

    def timed(fn, steps):
        fn(2) if steps > 2 else None  # warm-up
        t = time.perf_counter()
        images = fn(steps)
        return images, args.n / (time.perf_counter() - t)

    stock20, ips_stock = timed(run_stock, 20)
    ours20, ips_ours20 = timed(run_ours, 20)
    ours8, ips_ours8 = timed(run_ours, 8)
    oursi, ips_oursi = timed(run_ours_interval, 20)
    ours8i, ips_ours8i = timed(run_ours_interval, 8)

    enc = pipe.image_encoder
    ds = PatchDataset(args.holdout)
    real = torch.stack([ds[i]["image"] for i in range(len(ds))])

    def feats(images) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.stack(
            [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
        with torch.no_grad():
            return enc(x).reshape(len(x), -1)

    f_real = feats(real)
    fd = {name: frechet(feats(ims), f_real) for name, ims in
          (("stock 20", stock20), ("synthgen 20", ours20), ("synthgen 8", ours8), ("interval 20", oursi),
           ("interval 8", ours8i))}

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.1f} M-parameter denoiser, "
          f"{size} px images, DPM-Solver++ 2M, guidance {args.guidance}, {args.n} images, batch {args.batch_size}")
    print(f"stock PixArtSigmaPipeline, 20 steps: {ips_stock:7.2f} images/s   FD to held-out real {fd['stock 20']:.3f}")
    print(f"synthgen SynthPipeline,    20 steps: {ips_ours20:7.2f} images/s   FD {fd['synthgen 20']:.3f}")
    print(f"synthgen SynthPipeline,     8 steps: {ips_ours8:7.2f} images/s   FD {fd['synthgen 8']:.3f}")
    print(f"synthgen, guidance interval [0.2, 0.8], 20 steps: {ips_oursi:7.2f} images/s   FD {fd['interval 20']:.3f}")
    print(f"synthgen, guidance interval [0.2, 0.8],  8 steps: {ips_ours8i:7.2f} images/s   FD {fd['interval 8']:.3f}")
    print(f"ratio at equal settings (20 vs 20): {ips_ours20 / ips_stock:.2f}x")
    print(f"ratio with guidance interval (20 vs 20): {ips_oursi / ips_stock:.2f}x")
    print(f"ratio with guidance interval, 8 steps / stock 20 steps: {ips_ours8i / ips_stock:.2f}x")
    print(f"ratio synthgen 8 steps / stock 20 steps: {ips_ours8 / ips_stock:.2f}x "
          f"(FD {fd['synthgen 8']:.3f} vs {fd['stock 20']:.3f}; held-out real tiles: {len(real)})")
    print("note: the stock pipeline decodes latents / scaling_factor without the VAE's shift_factor; "
          "synthgen applies both (the FD column shows the effect)")


if __name__ == "__main__":
    main()
