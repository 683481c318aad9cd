"""Step caching for multi-step sampling: does reusing the transformer blocks' output between
steps pay at equal quality? (issue 19, deliverable 3)

The cached arm runs the full block stack on every ``interval``-th denoiser call and, on the calls
between, adds the residual the stack produced last time (``output - input`` of the stack) to
the new input instead of running it; the patch embedding, the final layer and the refiner run
every step. This is the whole-stack form of the feature reuse of FORA (Selvaraju et al., 2024)
and Delta-DiT (Chen et al., 2024). The question is whether it beats simply sampling with fewer
steps at the same cost, so the arms are: N steps, N steps cached (about N / interval full stack
passes) and N / interval steps, all bf16, the same embeddings and seeds, judged by the encoder-free
FD to held-out real tiles (``synthgen.metrics.handcrafted``, with its real-vs-real floor).

    python benchmarks/step_cache.py --pipeline checkpoints/synthgen-v2 --cache runs/cache_v2 \\
        --holdout runs/data/v2/test.csv --n 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class CachedStack(nn.Module):
    """The denoiser's transformer blocks as one module that reuses their residual between calls."""

    def __init__(self, blocks: nn.ModuleList, interval: int):
        super().__init__()
        self.blocks, self.interval, self.calls, self.residual = blocks, interval, 0, None

    def forward(self, hidden_states, *args, **kwargs):
        fresh = self.residual is None or self.residual.shape != hidden_states.shape
        if fresh or self.calls % self.interval == 0:
            h = hidden_states
            for block in self.blocks:
                h = block(h, *args, **kwargs)
            self.residual = h - hidden_states
            self.calls = 1
            return h
        self.calls += 1
        return hidden_states + self.residual


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=Path("checkpoints/synthgen-v2"))
    ap.add_argument("--cache", type=Path, required=True, help="feature cache to draw the condition embeddings from")
    ap.add_argument("--holdout", type=Path, required=True, help="tile table of held-out real tiles")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from synthgen.data.cache import CacheDataset
    from synthgen.data.datasets import PatchDataset
    from synthgen.metrics.handcrafted import encoder_free_report, handcrafted_features
    from synthgen.pipelines.generate import SynthPipeline

    pipe = SynthPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    cache = CacheDataset(args.cache)
    idx = torch.randint(0, len(cache), (args.n,), generator=torch.Generator().manual_seed(0)).tolist()
    emb = torch.stack([cache[i]["emb"] for i in idx]).float()
    blocks = pipe.transformer.transformer_blocks
    cached = nn.ModuleList([CachedStack(blocks, args.interval)])

    def sample(steps: int, use_cache: bool) -> tuple[list, float]:
        pipe.transformer.transformer_blocks = cached if use_cache else blocks
        cached[0].residual = None
        kw = dict(embeddings=emb, seeds=list(range(args.n)), num_inference_steps=steps, batch_size=args.batch_size,
                  output_type="pil", dtype="bf16", fast=False)
        pipe(**{**kw, "embeddings": emb[:2], "seeds": [0, 1], "num_inference_steps": 2})  # warm-up
        cached[0].residual = None
        t = time.perf_counter()
        images = pipe(**kw).images
        rate = args.n / (time.perf_counter() - t)
        pipe.transformer.transformer_blocks = blocks
        return images, rate

    fewer = max(1, round(args.steps / args.interval))
    arms = {f"{args.steps} steps": (args.steps, False),
            f"{args.steps} steps, cached every {args.interval}": (args.steps, True),
            f"{fewer} steps": (fewer, False)}
    results = {name: sample(*a) for name, a in arms.items()}
    ds = PatchDataset(args.holdout)
    real = torch.stack([ds[i]["image"] for i in range(len(ds))])
    h_real = handcrafted_features(real)
    print(f"{args.pipeline}: {args.n} images per arm, bf16, 2 CPU threads; {len(real)} held-out real tiles")
    print("| arm | images/s | encoder-free FD | / real-vs-real floor |")
    print("|---|---|---|---|")
    ref_rate = results[f"{args.steps} steps"][1]
    for name, (images, rate) in results.items():
        r = encoder_free_report(real, [np.asarray(im) for im in images], real_features=h_real)
        print(f"| {name} | {rate:.2f} ({rate / ref_rate:.2f}x) | {r['fd']:.2f} | {r['ratio_to_floor']:.2f}x |")
    name = f"{args.steps} steps, cached every {args.interval}"
    print(f"headline: step_cache_speedup ratio={results[name][1] / ref_rate:.4f}")


if __name__ == "__main__":
    main()
