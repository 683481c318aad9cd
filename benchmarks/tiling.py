"""Patch-reading throughput: synthgen's PatchDataset in a DataLoader vs a naive OpenSlide loop.

Both read the same tissue tiles of the same slide (same level, same output pixels, checked),
measured in one run. The reference is the loop most scripts start with: one process,
``openslide.OpenSlide.read_region`` then ``convert("RGB")`` and ``numpy.asarray``.

    python benchmarks/tiling.py                      # TCGA slide, 256 px at 0.5 um/px, 2 workers
    python benchmarks/tiling.py --slide my.svs --workers 8
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"


def run(slide: Path = DEFAULT_SLIDE, slide_mpp: float = 0.5, mpp: float = 0.5, size: int = 256, workers: int = 2,
        batch_size: int = 32, repeats: int = 3) -> dict:
    """Measure both readers; returns patches/s of each, their ratio and a ``summary`` row."""
    args = argparse.Namespace(slide=Path(slide), slide_mpp=slide_mpp, mpp=mpp, size=size, workers=workers,
                              batch_size=batch_size, repeats=repeats)

    import openslide
    import torch
    from torch.utils.data import DataLoader

    from synthgen.data.datasets import PatchDataset
    from synthgen.data.slides import Slide, slide_key
    from synthgen.data.tiling import TileSpec, tile_slide

    with Slide(args.slide, mpp=args.slide_mpp) as s:
        tiles = tile_slide(s, TileSpec(mpp=args.mpp, size=args.size), key="bench")
        level = s.best_level(args.mpp)
        exact = abs(s.level_mpp(level) - args.mpp) < 1e-6
    n = len(tiles) * args.repeats
    torch.set_num_threads(1)

    def naive() -> list[np.ndarray]:
        osr = openslide.OpenSlide(str(args.slide))
        out = []
        for _ in range(args.repeats):
            for t in tiles:
                out.append(np.asarray(osr.read_region((t.x, t.y), level, (args.size, args.size)).convert("RGB")))
        osr.close()
        return out

    ds = PatchDataset(tiles, slides={"bench": {"path": str(args.slide), "mpp": args.slide_mpp}})

    def ours() -> int:
        loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                            persistent_workers=args.workers > 0)
        count = 0
        for _ in range(args.repeats):
            for batch in loader:
                count += len(batch["image"])
        del loader
        return count

    if exact:  # same pixels from both readers
        ref = naive()[: len(tiles)][:5]
        for i, r in enumerate(ref):
            assert np.array_equal(ds[i]["image"].permute(1, 2, 0).numpy(), r), "readers disagree"

    t0 = time.perf_counter()
    naive()
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert ours() == n
    t_ours = time.perf_counter() - t0
    return {"slide_key": slide_key(args.slide), "tiles": len(tiles), "repeats": args.repeats, "size": args.size,
            "mpp": args.mpp, "level": level, "exact": exact, "workers": args.workers,
            "naive_patches_per_s": n / t_naive, "synthgen_patches_per_s": n / t_ours, "ratio": t_naive / t_ours,
            "summary": [{"measure": f"patches/s, {args.size} px, {args.workers} workers",
                         "reference": "naive OpenSlide loop", "reference_value": n / t_naive,
                         "synthgen_value": n / t_ours, "ratio": t_naive / t_ours}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    ap.add_argument("--slide-mpp", type=float, default=0.5,
                    help="level-0 resolution (the TCGA file has none; 0.5 um/px = 20x assumed)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="passes over the tiles for each reader")
    args = ap.parse_args()
    r = run(**vars(args))

    print(f"slide key {r['slide_key']}, {r['tiles']} tissue tiles x {args.repeats} passes, "
          f"{args.size} px at {args.mpp} um/px (level {r['level']}{', exact' if r['exact'] else ', resampled'})")
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
    print(f"naive openslide loop (1 process): {r['naive_patches_per_s']:8.1f} patches/s")
    print(f"synthgen PatchDataset ({args.workers} workers): {r['synthgen_patches_per_s']:8.1f} patches/s")
    print(f"ratio synthgen / naive: {r['ratio']:.2f}x")


if __name__ == "__main__":
    main()
