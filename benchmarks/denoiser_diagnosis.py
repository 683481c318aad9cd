"""How much of the noise a denoiser removes, by noise level, on held-out latents.

For each item of a feature cache (a validation split: ``synthgen cache runs/data/v2/val.csv ...``)
and each timestep t, the same noise (fixed seed) gives x_t; the model's one-step estimate of the
clean latent x0_hat is compared with x0 (MSE), beside the identity estimate x_t / sqrt(a_t) that
only rescales the noisy input. ``removed`` = 1 - MSE(model) / MSE(identity): 0 for a model that
ignores the noise, 1 for a perfect one. The mean v / epsilon loss over a grid of 20 timesteps is
the validation loss. Every model sees the same items, noise and conditions (its own cache
embeddings, class and source ids), so the columns compare models, not draws.

    OMP_NUM_THREADS=2 python benchmarks/denoiser_diagnosis.py runs/cache_v2_val \
        base=checkpoints/synthgen-v2 refined=runs/denoiser_v2_refine/model

The headline is the validation loss of the first model over that of the last (higher: the last
is better).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

T_DIAG = (20, 50, 100, 200, 400)


def load_denoiser(path: str):
    from synthgen.loading import component_subfolder
    from synthgen.models.denoiser import Denoiser

    return Denoiser.from_pretrained(path, subfolder=component_subfolder(path, "transformer")).eval()


@torch.no_grad()
def diagnose(net, batch: dict, prediction: str, timesteps, seed: int = 0, batch_size: int = 64) -> dict:
    """MSE of x0 estimates per timestep (model and identity) and the mean loss over ``timesteps``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction)
    acp = sched.alphas_cumprod
    x0 = batch["latents"].float()
    conds = {"embeddings": batch["emb"].float()} if net.config.use_embeddings else {}
    if net.config.num_classes:
        conds["class_labels"] = batch["label"]
    if net.config.num_sources:
        conds["source_labels"] = batch["source"]
    out = {}
    for t in timesteps:
        g = torch.Generator().manual_seed(seed * 100_003 + int(t))
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((len(x0),), int(t), dtype=torch.long)
        xt = sched.add_noise(x0, noise, steps)
        a, s = acp[int(t)].sqrt(), (1 - acp[int(t)]).sqrt()
        preds = []
        for lo in range(0, len(x0), batch_size):
            sl = slice(lo, lo + batch_size)
            preds.append(net(xt[sl], steps[sl], **{k: v[sl] for k, v in conds.items()}).sample[:, : x0.shape[1]])
        pred = torch.cat(preds).float()
        x0_hat = a * xt - s * pred if prediction == "v_prediction" else (xt - s * pred) / a
        target = sched.get_velocity(x0, noise, steps) if prediction == "v_prediction" else noise
        out[int(t)] = {"model": float((x0_hat - x0).square().mean()), "identity": float((xt / a - x0).square().mean()),
                       "loss": float((pred - target).square().mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cache", type=Path, help="feature cache with latents, emb (and label, source)")
    ap.add_argument("models", nargs="+", metavar="NAME=FOLDER", help="denoisers: a pipeline or model folder")
    ap.add_argument("--prediction", default="v_prediction", choices=["v_prediction", "epsilon"])
    ap.add_argument("--limit", type=int, default=None, help="first N items of the cache")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from synthgen.data.cache import CacheDataset

    ds = CacheDataset(a.cache)
    n = min(len(ds), a.limit or len(ds))
    batch = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in range(n)]) for k in ds.keys}
    grid = [int(t) for t in torch.linspace(10, 990, 20)]
    rows = []
    for spec in a.models:
        name, _, path = spec.partition("=")
        t0 = time.perf_counter()
        net = load_denoiser(path or name)
        diag = diagnose(net, batch, a.prediction, sorted(set(T_DIAG) | set(grid)), a.seed)
        val = sum(diag[t]["loss"] for t in grid) / len(grid)
        rows.append((name, diag, val))
        print(f"{name}: {path}  ({time.perf_counter() - t0:.0f} s)")
    print(f"\n{n} items of {a.cache}, seed {a.seed}; x0 MSE model / identity (share of the noise error removed)")
    print("| model | val loss (20 t) | " + " | ".join(f"t={t}" for t in T_DIAG) + " |")
    print("|---|---|" + "---|" * len(T_DIAG))
    for name, diag, val in rows:
        cells = [f"{diag[t]['model']:.4f} / {diag[t]['identity']:.4f} ({1 - diag[t]['model'] / diag[t]['identity']:.0%})"
                 for t in T_DIAG]
        print(f"| {name} | {val:.4f} | " + " | ".join(cells) + " |")
    print(f"headline: denoiser_val_loss_first_over_last ratio={rows[0][2] / rows[-1][2]:.4f}")


if __name__ == "__main__":
    main()
