"""Sampling throughput and quality: synthgen's pipeline vs diffusers' stock ``PixArtSigmaPipeline``
running the same transformer weights, VAE, scheduler (DPM-Solver++), step count and guidance,
in one run, on the same real condition embeddings.

1. Same settings (20 steps, float32): images/s of each, and their ratio.
2. bfloat16 autocast (``dtype="bf16"``, the ``auto`` default on CPUs with native bf16) and fewer
   steps, against stock at 20 steps in float32, with two Frechet distances of each output set to
   held-out real tiles: in the pipeline's image-encoder space, and encoder-free (hand-crafted
   features, ``synthgen.metrics.handcrafted``) beside its real-vs-real floor; plus the mean
   absolute pixel difference of bf16 and fp32 images of the same seeds.

The last line is the headline: the fastest synthgen setting whose encoder-free FD (all images vs
all held-out tiles) is within 10% of the better of the stock pipeline's and synthgen's own 20-step
fp32 FD, as a ratio of images/s to stock. (The stock pipeline decodes without the VAE's shift
factor, which shifts its colours and inflates its FD; its FD alone would be too easy a bar.)

    python benchmarks/sampling.py --pipeline runs/pipeline --cache runs/cache_small \\
        --holdout runs/data/cmu_holdout.csv
    python benchmarks/sampling.py     # default small pipeline, embeddings and held-out tiles of the bundled slide
"""

from __future__ import annotations

import argparse
import platform
import tempfile
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


REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = REPO / "checkpoints" / "synthgen-small-cmu"


def run(pipeline: Path = DEFAULT_PIPELINE, cache: Path | None = None, holdout: Path | None = None, n: int = 64,
        batch_size: int = 32, guidance: float = 2.0, compile: bool = False) -> dict:
    """Measure the five settings; returns images/s and FD of each, the ratios and ``summary`` rows.

    Without ``cache`` the condition embeddings are the pipeline's image-encoder embeddings of
    training tiles of the bundled slide; without ``holdout`` its held-out third is used."""
    with tempfile.TemporaryDirectory() as tmp:
        if cache is None or holdout is None:
            from _data import cmu_split

            train_tiles, split_holdout = cmu_split(Path(tmp))
            holdout = holdout or split_holdout
        return _run(argparse.Namespace(pipeline=Path(pipeline), cache=cache, holdout=Path(holdout), n=n,
                                       batch_size=batch_size, guidance=guidance, compile=compile),
                    None if cache is not None else train_tiles)


class _NullLabels(torch.nn.Module):
    """The stock pipeline's view of a denoiser that also takes class or source labels (the v2
    default): the embedding tokens as PixArt's ``encoder_hidden_states``, the labels at their
    learned nulls, as ``SynthPipeline`` samples when given embeddings alone."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config = net, net.config

    @property
    def dtype(self):
        return self.net.dtype

    @property
    def device(self):
        return self.net.device

    def forward(self, hidden_states, *args, **kwargs):
        nulls = self.net.null_conditions(len(hidden_states), device=hidden_states.device)
        labels = {k: nulls[k] for k in ("class_labels", "source_labels") if k in nulls}
        if labels:  # the label tokens lengthen the condition: the stock all-ones mask no longer fits
            kwargs.pop("encoder_attention_mask", None)
        return self.net(hidden_states, *args, **labels, **kwargs)


def _run(args, train_tiles) -> dict:
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline

    from synthgen.data.cache import CacheDataset
    from synthgen.data.datasets import PatchDataset
    from synthgen.pipelines.generate import SynthPipeline

    torch.manual_seed(0)
    pipe = SynthPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    if train_tiles is None:
        cache = CacheDataset(args.cache)
        idx = torch.randint(0, len(cache), (args.n,), generator=g).tolist()
        emb = torch.stack([cache[i]["emb"] for i in idx]).float()
    else:
        tiles = PatchDataset(train_tiles)
        idx = torch.randint(0, len(tiles), (args.n,), generator=g).tolist()
        with torch.no_grad():
            emb = pipe.image_encoder(torch.stack([tiles[i]["image"] for i in idx])).float()
    size = pipe.image_size

    stock = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, transformer=_NullLabels(pipe.transformer), vae=pipe.vae,
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

    def run_ours(steps: int, interval=None, dtype="fp32") -> list:
        return pipe(embeddings=emb, seeds=list(range(args.n)), guidance_scale=args.guidance,
                    num_inference_steps=steps, batch_size=args.batch_size, output_type="pil",
                    guidance_interval=interval, dtype=dtype, fast=False).images  # the base model

    def run_ours_interval(steps: int) -> list:
        return run_ours(steps, (0.2, 0.8))

    def run_bf16(steps: int) -> list:
        return run_ours(steps, dtype="bf16")

    def run_bf16_interval(steps: int) -> list:
        return run_ours(steps, (0.2, 0.8), dtype="bf16")

    def timed(fn, steps):
        fn(min(2, steps))  # warm-up
        t = time.perf_counter()
        images = fn(steps)
        return images, args.n / (time.perf_counter() - t)

    stock20, ips_stock = timed(run_stock, 20)
    ours20, ips_ours20 = timed(run_ours, 20)
    ours8, ips_ours8 = timed(run_ours, 8)
    oursi, ips_oursi = timed(run_ours_interval, 20)
    ours8i, ips_ours8i = timed(run_ours_interval, 8)
    bf20, ips_bf20 = timed(run_bf16, 20)
    bf8, ips_bf8 = timed(run_bf16, 8)
    bf8i, ips_bf8i = timed(run_bf16_interval, 8)
    bf4, ips_bf4 = timed(run_bf16, 4)
    fast_sets, fast_ips = {}, {}
    if pipe.fast_transformer is not None:  # the few-step variant (consistency-distilled, guidance folded in)
        def run_fast(steps):
            return pipe(embeddings=emb, seeds=list(range(args.n)), guidance_scale=args.guidance,
                        num_inference_steps=steps, batch_size=args.batch_size, output_type="pil", dtype="bf16",
                        fast=True).images

        for k in (1, 2, 4):
            fast_sets[f"fast {k}"], fast_ips[f"fast {k}"] = timed(run_fast, k)

    enc = pipe.image_encoder
    ds = PatchDataset(args.holdout)
    real = torch.stack([ds[i]["image"] for i in range(len(ds))])

    def feats(images) -> torch.Tensor:
        x = images if isinstance(images, torch.Tensor) else torch.stack(
            [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
        with torch.no_grad():
            return enc(x).reshape(len(x), -1)

    compiled = {}
    if args.compile:  # torch.compile (inductor) of the denoisers, in place; the eager arms above are the reference
        eager = {"bf16 8": (run_bf16, 8, bf8, ips_bf8)}
        pipe.transformer.compile()
        if pipe.fast_transformer is not None:
            pipe.fast_transformer.compile()
            eager["fast 2"] = (run_fast, 2, fast_sets["fast 2"], fast_ips["fast 2"])
        for name, (fn, k, ref_images, ref_rate) in eager.items():
            t = time.perf_counter()
            fn(k)  # compiles
            first = time.perf_counter() - t
            images, rate = timed(fn, k)
            diff = float(np.abs(np.stack([np.asarray(a, float) for a in images])
                                - np.stack([np.asarray(b, float) for b in ref_images])).mean())
            compiled[name] = {"images_per_s": rate, "speedup": rate / ref_rate, "compile_and_first_call_s": first,
                              "mean_abs_pixel_diff": diff}

    from synthgen.metrics.handcrafted import encoder_free_report, handcrafted_features

    f_real = feats(real)
    sets = {"stock 20": stock20, "synthgen 20": ours20, "synthgen 8": ours8, "interval 20": oursi,
            "interval 8": ours8i, "bf16 20": bf20, "bf16 8": bf8, "bf16 interval 8": bf8i, "bf16 4": bf4,
            **fast_sets}
    fd = {name: frechet(feats(ims), f_real) for name, ims in sets.items()}
    h_real = handcrafted_features(real)
    free = {name: encoder_free_report(real, ims, real_features=h_real) for name, ims in sets.items()}
    fd_free = {name: r["fd"] for name, r in free.items()}
    to_floor = {name: r["ratio_to_floor"] for name, r in free.items()}
    floor = free["stock 20"]["floor"]["mean"]

    def pixels(ims):
        return np.stack([np.asarray(im, dtype=np.float64) for im in ims])

    bf16_vs_fp32 = {"20 steps": float(np.abs(pixels(bf20) - pixels(ours20)).mean()),
                    "8 steps": float(np.abs(pixels(bf8) - pixels(ours8)).mean())}

    ips = {"stock 20": ips_stock, "synthgen 20": ips_ours20, "synthgen 8": ips_ours8, "interval 20": ips_oursi,
           "interval 8": ips_ours8i, "bf16 20": ips_bf20, "bf16 8": ips_bf8, "bf16 interval 8": ips_bf8i,
           "bf16 4": ips_bf4, **fast_ips}
    rows = [(f"images/s, {label}", name) for label, name in (
        ("20 steps, equal settings", "synthgen 20"), ("guidance interval, 20 steps", "interval 20"),
        ("8 steps vs stock 20", "synthgen 8"), ("8 steps + guidance interval vs stock 20", "interval 8"),
        ("bf16 autocast, 20 steps", "bf16 20"), ("bf16, 8 steps vs stock 20", "bf16 8"),
        ("bf16, 8 steps + guidance interval vs stock 20", "bf16 interval 8"), ("bf16, 4 steps vs stock 20", "bf16 4"),
        *((f"few-step variant, bf16, {k[5:]} step(s) vs stock 20", k) for k in fast_sets))]
    bar = 1.1 * min(fd_free["stock 20"], fd_free["synthgen 20"])
    fair = [name for name in ips if name != "stock 20" and fd_free[name] <= bar]
    best = max(fair, key=ips.get) if fair else None
    return {"params_m": sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, "size": size,
            "n": args.n, "batch_size": args.batch_size, "guidance": args.guidance, "holdout_tiles": len(real),
            "images_per_s": ips, "fd": fd, "fd_free": fd_free, "fd_free_floor": floor, "fd_free_bar": bar,
            "fd_free_ratio_to_floor": to_floor,
            "bf16_vs_fp32_pixels": bf16_vs_fp32, "compiled": compiled,
            "headline": {"setting": best, "ratio": ips[best] / ips_stock if best else 0.0},
            "summary": [{"measure": label, "reference": "stock PixArtSigmaPipeline, 20 steps",
                         "reference_value": ips_stock, "synthgen_value": ips[name], "ratio": ips[name] / ips_stock,
                         "note": f"FD to held-out real {fd[name]:.2f} (stock {fd['stock 20']:.2f}); encoder-free "
                                 f"{fd_free[name]:.1f} (stock {fd_free['stock 20']:.1f})"}
                        for label, name in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=DEFAULT_PIPELINE)
    ap.add_argument("--cache", type=Path, default=None,
                    help="feature cache: real condition embeddings (default: encode training tiles of the bundled slide)")
    ap.add_argument("--holdout", type=Path, default=None,
                    help="tile table of held-out real tiles, for FD (default: right third of the bundled slide)")
    ap.add_argument("--n", type=int, default=64, help="images per setting")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile of the denoisers (bf16, 8 steps; the few-step variant at 2)")
    args = ap.parse_args()
    r = run(**vars(args))
    ips, fd = r["images_per_s"], r["fd"]

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {r['params_m']:.1f} M-parameter denoiser, "
          f"{r['size']} px images, DPM-Solver++ 2M, guidance {args.guidance}, {args.n} images, batch {args.batch_size}")
    print(f"stock PixArtSigmaPipeline, 20 steps: {ips['stock 20']:7.2f} images/s   FD to held-out real {fd['stock 20']:.3f}")
    print(f"synthgen SynthPipeline,    20 steps: {ips['synthgen 20']:7.2f} images/s   FD {fd['synthgen 20']:.3f}")
    print(f"synthgen SynthPipeline,     8 steps: {ips['synthgen 8']:7.2f} images/s   FD {fd['synthgen 8']:.3f}")
    print(f"synthgen, guidance interval [0.2, 0.8], 20 steps: {ips['interval 20']:7.2f} images/s   FD {fd['interval 20']:.3f}")
    print(f"synthgen, guidance interval [0.2, 0.8],  8 steps: {ips['interval 8']:7.2f} images/s   FD {fd['interval 8']:.3f}")
    for name in ("bf16 20", "bf16 8", "bf16 interval 8", "bf16 4", *(k for k in ips if k.startswith("fast"))):
        print(f"synthgen, {name}: {ips[name]:7.2f} images/s   FD {fd[name]:.3f}")
    print("encoder-free FD, all images vs all held-out real: " + ", ".join(f"{k} {v:.1f}" for k, v in r["fd_free"].items()))
    print(f"encoder-free FD over the real-vs-real floor ({r['fd_free_floor']:.1f}; equal-size halves, mean of 10 splits): "
          + ", ".join(f"{k} {v:.1f}x" for k, v in r["fd_free_ratio_to_floor"].items()))
    print("mean |bf16 - fp32| per pixel, same seeds (grey levels of 255): "
          + ", ".join(f"{k} {v:.2f}" for k, v in r["bf16_vs_fp32_pixels"].items()))
    for row in r["summary"]:
        print(f"ratio, {row['measure']}: {row['ratio']:.2f}x")
    print(f"held-out real tiles: {r['holdout_tiles']}")
    print("note: the stock pipeline decodes latents / scaling_factor without the VAE's shift_factor; "
          "synthgen applies both (the FD column shows the effect)")
    for name, c in r["compiled"].items():
        print(f"torch.compile, {name}: {c['images_per_s']:.2f} images/s, {c['speedup']:.2f}x eager; compile + first "
              f"call {c['compile_and_first_call_s']:.1f} s; mean |compiled - eager| {c['mean_abs_pixel_diff']:.2f} "
              "grey levels")
    h = r["headline"]
    print(f"fastest with encoder-free FD <= {r['fd_free_bar']:.1f} (1.1 x the better of stock 20 and synthgen 20 fp32): "
          f"{h['setting']}")
    print(f"headline: sampling_vs_stock_equal_fidelity ratio={h['ratio']:.4f}")


if __name__ == "__main__":
    main()
