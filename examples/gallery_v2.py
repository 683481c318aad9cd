"""The v2 gallery (examples/gallery_v2.png): validation tiles, their variations by the shipped v2
pipeline and, for comparison, by another pipeline (e.g. the previous v2 denoiser).

    OMP_NUM_THREADS=2 python examples/gallery_v2.py checkpoints/synthgen-v2 --before runs/pipe_base

Rows: real validation tiles (2 CMU, 2 MoNuSeg, 3 CoNSeP, 1 Kather); variations by --before (if
given); variations by PIPELINE (each tile's embedding, class and source); the same at strength
0.5; source only (no reference, guidance 3). 20 DPM-Solver++ steps, guidance 2, seeds 0-7.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PICK = {"cmu": 2, "monuseg": 2, "consep": 3, "kather2016_224": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--before", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=REPO / "runs" / "data" / "v2")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "examples" / "gallery_v2.png")
    a = ap.parse_args()
    from PIL import Image

    from synthgen.data.cache import LabelledTiles
    from synthgen.pipelines.generate import SynthPipeline

    ds = LabelledTiles(a.data / "val.csv")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))
    chosen, need = [], dict(PICK)
    for i in order:
        src = ds.sources[int(ds.source_ids[i])]
        if need.get(src, 0) > 0:
            chosen.append(int(i))
            need[src] -= 1
    chosen.sort(key=lambda i: list(PICK).index(ds.sources[int(ds.source_ids[i])]))
    items = [ds[i] for i in chosen]
    tiles = torch.stack([it["image"] for it in items])
    labels = [ds.classes[it["label"]] if it["label"] >= 0 else None for it in items]
    sources = [ds.sources[it["source"]] for it in items]
    seeds = list(range(len(items)))
    kw = dict(num_inference_steps=20, guidance_scale=2.0, output_type="np", seeds=seeds)
    rows = [tiles.permute(0, 2, 3, 1).numpy()]
    for folder in ([a.before] if a.before else []) + [a.pipeline]:
        pipe = SynthPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        rows.append(pipe(images=tiles, labels=labels, sources=sources, **kw).images)
    rows.append(pipe(images=tiles, labels=labels, sources=sources, strength=0.5, **kw).images)
    rows.append(pipe(sources=sources, **{**kw, "guidance_scale": 3.0}).images)
    grid = np.concatenate([np.concatenate(list(r), 1) for r in rows], 0)
    grid = grid if grid.dtype == np.uint8 else (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(a.out)
    print(f"{len(rows)} rows x {len(items)} tiles ({', '.join(sources)}) -> {a.out}")


if __name__ == "__main__":
    main()
