"""Cost of on-the-fly synthetic augmentation in a training loop: a small CNN classifier trained
on real tiles of the bundled slide (at the pipeline's scale and size: 64 px at 1 um/px for the
small pipeline, 128 px at 0.5 um/px for v2), with and without ``SynthAugment`` at 25% synthetic
(the default small pipeline, variation mode, ``PipelineGenerator``'s default sampling: its few-step
variant at the pipeline's recorded step count where it ships one, else 8 DPM-Solver++ steps; bf16 autocast where
the CPU has native bf16), same loader settings, one
run. Two ways of getting the synthetic items: generated on the fly by the loader workers
(uncached), and read from a disk cache that ``SynthAugment.pregenerate()`` filled before the
loop (cached; the pregeneration time is reported, not counted in the loop's rate), and, from an
empty cache, with ``pregenerate(order, background=True)`` filling it in the loader's order while
the loop runs. Reports training samples/s of each against real tiles only, and the overheads.

    python benchmarks/augment.py                      # 2 loader workers
    python benchmarks/augment.py --workers 4 --steps 40
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]


class LabelledTiles(Dataset):
    """(uint8 image, label) from a tile table; label = tile row parity (a stand-in: the cost
    of augmentation does not depend on what the labels mean)."""

    def __init__(self, table):
        from synthgen.data.datasets import PatchDataset

        self.ds = PatchDataset(table)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]["image"], (self.ds.tiles[i].y // 64) % 2


def classifier() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 128, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(128, 2))


def train_rate(dataset, steps: int, batch_size: int, workers: int, order: list[int] | None = None) -> float:
    """Training samples/s over ``steps`` (the first 3 excluded); shuffled, or in ``order``."""
    torch.manual_seed(0)
    model, loader = classifier(), DataLoader(dataset, batch_size=batch_size, shuffle=order is None, sampler=order,
                                             num_workers=workers, persistent_workers=workers > 0, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    n, t0, step = 0, None, 0
    while step < steps:
        for batch in loader:
            x, y = batch[0].float() / 255, torch.as_tensor(batch[1])
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 3:  # exclude worker start-up and the first batches
                t0 = time.perf_counter()
            elif step > 3:
                n += len(x)
            if step >= steps:
                break
    rate = n / (time.perf_counter() - t0)
    del loader
    return rate


def run(pipeline: Path = REPO / "checkpoints" / "synthgen-small-cmu", steps: int = 30, batch_size: int = 32,
        workers: int = 2, gen_steps: int | None = None) -> dict:
    """Training samples/s without SynthAugment, with it generating on the fly and with it reading a
    pre-generated cache; their ratios and ``summary`` rows."""
    args = argparse.Namespace(pipeline=Path(pipeline), steps=steps, batch_size=batch_size, workers=workers,
                              gen_steps=gen_steps)

    import tempfile

    from synthgen.assets import SAMPLE_SLIDE
    from synthgen.augment import PipelineGenerator, SynthAugment, SynthPolicy
    from synthgen.data.slides import Slide
    from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table
    from synthgen.pipelines.generate import SynthPipeline

    scale = SynthPipeline.from_pretrained(args.pipeline)  # tiles at the pipeline's own scale and size
    mpp, size = scale.mpp or 1.0, scale.image_size
    del scale
    with tempfile.TemporaryDirectory() as tmp:
        with Slide(SAMPLE_SLIDE) as s:
            tiles = tile_slide(s, TileSpec(mpp=mpp, size=size, overlap=size // 2), key="cmu")
        write_tile_table(tiles, Path(tmp) / "t.csv", {"cmu": {"path": str(SAMPLE_SLIDE)}})
        real = LabelledTiles(Path(tmp) / "t.csv")
        labels = [real[i][1] for i in range(len(real))]
        gen = PipelineGenerator(str(args.pipeline), mode="variations", num_inference_steps=args.gen_steps)
        sampling = (f"{gen.num_inference_steps} steps"
                    + (", few-step variant" if (args.pipeline / "fast_transformer").is_dir()
                       and gen.num_inference_steps <= 4 else "") + f", {gen.compute_dtype}")
        policy = SynthPolicy({0: 1 / 3, 1: 1 / 3})
        aug = SynthAugment(real, gen, policy, labels=labels)
        share = aug.is_synthetic.mean()
        base = train_rate(real, args.steps, args.batch_size, args.workers)
        with_synth = train_rate(aug, args.steps, args.batch_size, args.workers)
        # the same on the fly with the earlier default: the base model, 8 steps, fp32
        old_gen = PipelineGenerator(str(args.pipeline), mode="variations", num_inference_steps=8, dtype="fp32")
        with_old = train_rate(SynthAugment(real, old_gen, policy, labels=labels), args.steps, args.batch_size,
                              args.workers)
        # the pooled path: every synthetic item generated before the loop, read from disk by the workers
        cached = SynthAugment(real, gen, policy, labels=labels, cache_dir=Path(tmp) / "synth_cache")
        t = time.perf_counter()
        made = cached.pregenerate()
        pregen_s = time.perf_counter() - t
        with_cache = train_rate(cached, args.steps, args.batch_size, args.workers)
        base_again = train_rate(real, args.steps, args.batch_size, args.workers)  # load drift check
        # the first epoch with a background process filling an empty cache in the loader's order
        filled = SynthAugment(real, gen, policy, labels=labels, cache_dir=Path(tmp) / "background_cache")
        g = torch.Generator().manual_seed(0)
        order = [i for _ in range(-(-args.steps * args.batch_size // len(filled)))
                 for i in torch.randperm(len(filled), generator=g).tolist()]
        with filled.pregenerate(order, batch_size=args.batch_size // 4, background=True) as fill:
            with_background = train_rate(filled, args.steps, args.batch_size, args.workers, order=order)
        by_background = fill.made
    ref = (base + base_again) / 2  # the cached run sits between the two reference runs
    return {"tile_size": size, "mpp": mpp, "share": float(share), "workers": args.workers, "batch_size": args.batch_size, "sampling": sampling,
            "real_samples_per_s": base, "augmented_samples_per_s": with_synth, "ratio": with_synth / base,
            "base8_fp32_samples_per_s": with_old, "base8_fp32_ratio": with_old / base,
            "real_again_samples_per_s": base_again, "cached_samples_per_s": with_cache,
            "cached_ratio": with_cache / ref, "pregenerated": made, "pregenerate_s": pregen_s,
            "background_samples_per_s": with_background, "background_ratio": with_background / ref,
            "made_by_background": by_background,
            "summary": [{"measure": f"classifier training samples/s, {share:.0%} synthetic ({sampling})",
                         "reference": "real tiles only", "reference_value": base, "synthgen_value": with_synth,
                         "ratio": with_synth / base, "note": f"overhead {100 * (1 - with_synth / base):.0f}%"},
                        {"measure": f"same, {share:.0%} synthetic read from a pre-generated cache",
                         "reference": "real tiles only (mean of runs before and after)", "reference_value": ref,
                         "synthgen_value": with_cache, "ratio": with_cache / ref,
                         "note": f"overhead {100 * (1 - with_cache / ref):.0f}%; pregenerate() {made} items in "
                                 f"{pregen_s:.0f} s (not counted)"},
                        {"measure": f"same, {share:.0%} synthetic, a background process filling the cache",
                         "reference": "real tiles only (mean of runs before and after)", "reference_value": ref,
                         "synthgen_value": with_background, "ratio": with_background / ref,
                         "note": f"overhead {100 * (1 - with_background / ref):.0f}%; the process made "
                                 f"{by_background} of the {made} items, the loader workers the rest they asked for"}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", type=Path, default=REPO / "checkpoints" / "synthgen-small-cmu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gen-steps", type=int, default=None,
                    help="sampling steps of the on-the-fly generator (default: PipelineGenerator's own)")
    args = ap.parse_args()
    r = run(**vars(args))

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; {args.workers} loader workers, "
          f"batch {args.batch_size}, small CNN classifier, {r['tile_size']} px tiles at {r['mpp']} um/px")
    print(f"real only:                    {r['real_samples_per_s']:8.1f} samples/s")
    print(f"with SynthAugment ({r['share']:.0%} synthetic, {r['sampling']}): {r['augmented_samples_per_s']:8.1f} samples/s")
    print(f"ratio with / without: {r['ratio']:.3f} (overhead {100 * (1 - r['ratio']):.0f}%)")
    print(f"  same with the base model, 8 steps, fp32: {r['base8_fp32_samples_per_s']:8.1f} samples/s, ratio "
          f"{r['base8_fp32_ratio']:.3f}")
    print(f"pregenerate(): {r['pregenerated']} synthetic items in {r['pregenerate_s']:.1f} s (not counted below)")
    print(f"with SynthAugment, cached:     {r['cached_samples_per_s']:8.1f} samples/s "
          f"(real only again: {r['real_again_samples_per_s']:.1f})")
    print(f"ratio cached / without: {r['cached_ratio']:.3f} (overhead {100 * (1 - r['cached_ratio']):.0f}%; "
          f"goal <= 20%) vs uncached {r['ratio']:.3f}")
    print(f"with SynthAugment, background fill from empty: {r['background_samples_per_s']:8.1f} samples/s, ratio "
          f"{r['background_ratio']:.3f} (the process made {r['made_by_background']} of {r['pregenerated']} items)")
    print(f"headline: augment_on_the_fly_vs_real_only ratio={r['ratio']:.4f}")


if __name__ == "__main__":
    main()
