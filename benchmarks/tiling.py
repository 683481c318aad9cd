"""Patch-reading throughput: synthgen's PatchDataset in a DataLoader vs a naive OpenSlide loop.

Both read the same tissue tiles of the same slide (same level, same output pixels, checked),
measured in one run. The reference is the loop most scripts start with: one process,
``openslide.OpenSlide.read_region`` then ``convert("RGB")`` and ``numpy.asarray``.

Steady state: each reader first makes one untimed pass over the tiles (opening its handles;
for the DataLoader, starting its worker processes), then the readers take turns, one timed pass
each per round, so that load from other jobs falls on all arms alike. Two settings:

* headline, every patch decoded: OpenSlide's tile cache off in both readers, as when the
  tiles of a training set do not fit in it (the usual case);
* repeated passes with OpenSlide's default 32 MiB tile cache: on this small set each worker's
  half of the tiles fits in its handle's cache while the naive reader's whole set does not
  (it misses on every pass), so this ratio shows the cache, not the data path.

Worker start-up is measured separately (from ``iter(loader)`` to the last worker entering
``worker_init_fn``) and reported with the first-pass rates, which include it: with the
``spawn`` or ``forkserver`` start method every worker imports torch and synthgen afresh,
seconds on a small CPU, which would swamp a timed workload of a few hundred patches.

    python benchmarks/tiling.py                      # TCGA slide, 256 px at 0.5 um/px, 2 workers
    python benchmarks/tiling.py --slide my.svs --workers 8
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"


def _worker_init(folder: str, cache_off: bool, worker_id: int) -> None:
    """``worker_init_fn``: note the wall-clock time this worker became ready; optionally turn
    off the OpenSlide tile cache of its handles (benchmark only: reaches into PatchDataset)."""
    Path(folder, f"worker{worker_id}").write_text(repr(time.time()))
    if cache_off:
        from torch.utils.data import get_worker_info

        _no_cache(get_worker_info().dataset)


def _no_cache(ds) -> None:
    import openslide

    for key in ds.slides:
        osr = ds._slide(key)._osr
        if osr is not None:
            osr.set_cache(openslide.OpenSlideCache(0))


def run(slide: Path = DEFAULT_SLIDE, slide_mpp: float = 0.5, mpp: float = 0.5, size: int = 256, workers: int = 2,
        batch_size: int = 32, repeats: int = 10) -> dict:
    """Measure both readers; returns steady-state patches/s of each and their ratio, the worker
    start-up time and the first-pass (cold) rates, and ``summary`` rows."""
    import openslide
    import torch
    from torch.utils.data import DataLoader

    from synthgen.data.datasets import PatchDataset
    from synthgen.data.slides import Slide, slide_key
    from synthgen.data.tiling import TileSpec, tile_slide

    slide = Path(slide)
    with Slide(slide, mpp=slide_mpp) as s:
        tiles = tile_slide(s, TileSpec(mpp=mpp, size=size), key="bench")
        level = s.best_level(mpp)
        exact = abs(s.level_mpp(level) - mpp) < 1e-6
    torch.set_num_threads(1)
    ds = PatchDataset(tiles, slides={"bench": {"path": str(slide), "mpp": slide_mpp}})

    if exact:  # same pixels from both readers
        with openslide.OpenSlide(str(slide)) as osr:
            for i, t in enumerate(tiles[:5]):
                ref = np.asarray(osr.read_region((t.x, t.y), level, (size, size)).convert("RGB"))
                assert np.array_equal(ds[i]["image"].permute(1, 2, 0).numpy(), ref), "readers disagree"
        ds.close()

    osr = {"cached": openslide.OpenSlide(str(slide)), "uncached": openslide.OpenSlide(str(slide))}
    osr["uncached"].set_cache(openslide.OpenSlideCache(0))
    marks = {k: tempfile.TemporaryDirectory(prefix=f"synthgen-bench-{k}-") for k in osr}
    start_method = multiprocessing.get_start_method() if workers > 0 else "none"
    loaders = {}
    for k in osr:
        dsk = PatchDataset(tiles, slides={"bench": {"path": str(slide), "mpp": slide_mpp}})
        if workers == 0 and k == "uncached":
            _no_cache(dsk)
        loaders[k] = DataLoader(dsk, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                                worker_init_fn=functools.partial(_worker_init, marks[k].name, k == "uncached")
                                if workers > 0 else None)

    def naive_pass(k: str) -> int:
        return len([np.asarray(osr[k].read_region((t.x, t.y), level, (size, size)).convert("RGB")) for t in tiles])

    def ours_pass(k: str) -> int:
        return sum(len(batch["image"]) for batch in loaders[k])

    def timed(f, k: str) -> float:
        t0 = time.perf_counter()
        assert f(k) == len(tiles)
        return time.perf_counter() - t0

    try:
        # first (cold) pass of each reader, default caches; the DataLoader's includes starting its workers
        t_naive_first = timed(naive_pass, "cached")
        wall0 = time.time()
        t_ours_first = timed(ours_pass, "cached")
        startup = max(float(p.read_text()) for p in Path(marks["cached"].name).iterdir()) - wall0 if workers else 0.0
        naive_pass("uncached"), ours_pass("uncached")  # untimed first pass of the uncached arms
        # steady state: one timed pass of each arm per round, in turn
        rounds = [{f"{who}_{k}": timed(f, k) for k in ("uncached", "cached")
                   for who, f in (("naive", naive_pass), ("ours", ours_pass))} for _ in range(repeats)]
    finally:
        loaders = None  # drops the iterators, which shuts the persistent workers down
        for o in osr.values():
            o.close()
        for m in marks.values():
            m.cleanup()

    n = len(tiles) * repeats
    tot = {k: sum(r[k] for r in rounds) for k in rounds[0]}
    rate = {k: n / v for k, v in tot.items()}
    ratio = {k: tot[f"naive_{k}"] / tot[f"ours_{k}"] for k in ("uncached", "cached")}
    spread = {k: [r[f"naive_{k}"] / r[f"ours_{k}"] for r in rounds] for k in ("uncached", "cached")}
    first = {"naive": len(tiles) / t_naive_first, "synthgen": len(tiles) / t_ours_first}

    def note(k: str) -> str:
        return (f"{repeats} alternating passes of {len(tiles)} tiles after an untimed one; worker start-up excluded; "
                f"per-round {min(spread[k]):.2f}-{max(spread[k]):.2f}x")

    return {"slide_key": slide_key(slide), "tiles": len(tiles), "repeats": repeats, "size": size, "mpp": mpp,
            "level": level, "exact": exact, "workers": workers, "batch_size": batch_size,
            "start_method": start_method, "worker_startup_s": startup,
            "naive_patches_per_s": rate["naive_uncached"], "synthgen_patches_per_s": rate["ours_uncached"],
            "ratio": ratio["uncached"], "per_round_ratios": spread["uncached"],
            "cached": {"naive_patches_per_s": rate["naive_cached"], "synthgen_patches_per_s": rate["ours_cached"],
                       "ratio": ratio["cached"], "per_round_ratios": spread["cached"]},
            "first_pass_patches_per_s": first, "first_pass_ratio": t_naive_first / t_ours_first,
            "summary": [
                {"measure": f"patches/s, {size} px, {workers} workers, steady state, every patch decoded",
                 "reference": "naive OpenSlide loop", "reference_value": rate["naive_uncached"],
                 "synthgen_value": rate["ours_uncached"], "ratio": ratio["uncached"],
                 "note": "OpenSlide tile cache off in both; " + note("uncached")},
                {"measure": "patches/s, repeated passes, default OpenSlide tile cache",
                 "reference": "naive OpenSlide loop", "reference_value": rate["naive_cached"],
                 "synthgen_value": rate["ours_cached"], "ratio": ratio["cached"],
                 "note": "each worker's half of the tiles fits its 32 MiB cache, the naive reader's whole set "
                         "does not: a cache effect; " + note("cached")},
                {"measure": f"patches/s, first pass incl. worker start-up ({start_method})",
                 "reference": "naive OpenSlide loop, first pass", "reference_value": first["naive"],
                 "synthgen_value": first["synthgen"], "ratio": t_naive_first / t_ours_first,
                 "note": f"one pass of {len(tiles)} tiles, default caches; start-up {startup:.2f} s "
                         f"of {t_ours_first:.2f} s"}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    ap.add_argument("--slide-mpp", type=float, default=0.5,
                    help="level-0 resolution (the TCGA file has none; 0.5 um/px = 20x assumed)")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10,
                    help="timed steady-state rounds (one pass over the tiles per reader each)")
    args = ap.parse_args()
    r = run(**vars(args))

    print(f"slide key {r['slide_key']}, {r['tiles']} tissue tiles, {args.size} px at {args.mpp} um/px "
          f"(level {r['level']}{', exact' if r['exact'] else ', resampled'})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    c = r["cached"]
    print(f"steady state ({args.repeats} alternating timed passes per arm after one untimed pass each; "
          "DataLoader worker start-up NOT included)")
    print("  every patch decoded (OpenSlide tile cache off in both readers):")
    print(f"    naive openslide loop (1 process): {r['naive_patches_per_s']:8.1f} patches/s")
    print(f"    synthgen PatchDataset ({args.workers} workers): {r['synthgen_patches_per_s']:8.1f} patches/s")
    print(f"    ratio synthgen / naive: {r['ratio']:.2f}x (per round: "
          + ", ".join(f"{v:.2f}" for v in r["per_round_ratios"]) + ")")
    print("  repeated passes, default OpenSlide tile cache (a worker's share of this small set fits its cache,")
    print("  the naive reader's whole set does not; shows the cache, not the data path):")
    print(f"    naive {c['naive_patches_per_s']:.1f} patches/s, synthgen {c['synthgen_patches_per_s']:.1f} patches/s, "
          f"ratio {c['ratio']:.2f}x (per round: " + ", ".join(f"{v:.2f}" for v in c["per_round_ratios"]) + ")")
    print(f"first pass, cold, default cache (synthgen's includes starting {args.workers} workers with the "
          f"'{r['start_method']}' start method: {r['worker_startup_s']:.2f} s):")
    print(f"  naive {r['first_pass_patches_per_s']['naive']:.1f} patches/s, synthgen "
          f"{r['first_pass_patches_per_s']['synthgen']:.1f} patches/s, ratio {r['first_pass_ratio']:.2f}x")
    print(f"headline: patch_reading_vs_naive_openslide ratio={r['ratio']:.4f}")

if __name__ == "__main__":
    main()
