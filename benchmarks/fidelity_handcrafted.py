"""Encoder-free fidelity of the default small pipeline on held-out tiles, with its reference
scale measured in the same run.

1. The held-out right third of the bundled CMU slide (64 px at 1 um/px, overlap 32 px: the
   68 tiles of the model card) is written as PNGs and used as ``--images`` references:
   ``synthgen generate checkpoints/synthgen-small-cmu --images HELD_OUT -n 128 --filter``
   (variations of held-out tiles, 20 DPM-Solver++ steps, guidance 2, seed 0; the filter's
   realism check uses the same tiles as its reference).
2. :func:`synthgen.metrics.handcrafted.encoder_free_report` of the generated images against
   the held-out tiles: synthetic, real-vs-real floor, Gaussian-blurred and stain-shifted rows,
   each a 34 vs 34 FD averaged over 10 random halvings of the held-out set. A further reference
   row: real training tiles (left two thirds, 128 drawn at random) in place of the synthetic
   images, i.e. real tissue from elsewhere on the same slide.
3. Beside it, the encoder FD in the pipeline's own SSL-encoder space (as the model card reports).
4. A PNG grid: 2 rows of held-out real tiles, 2 rows of generated images (random), 1 row of the
   images the realism check rejected with the highest scores.

    OMP_NUM_THREADS=1 python benchmarks/fidelity_handcrafted.py --out runs/fidelity_handcrafted
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "checkpoints" / "synthgen-small-cmu"


def run(out: Path = REPO / "runs" / "fidelity_handcrafted", pipeline: Path = CKPT, n: int = 128, steps: int = 20,
        seed: int = 0, n_splits: int = 10) -> dict:
    """Generate, score and draw; returns the numbers (also written to ``out/result.json``) with
    ``summary`` rows (synthetic against the floor and the other references)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _data import cmu_split
    from PIL import Image

    from synthgen.cli import main as cli
    from synthgen.data.datasets import PatchDataset
    from synthgen.metrics.fidelity import fidelity_report
    from synthgen.metrics.handcrafted import (
        encoder_free_report,
        format_report,
        handcrafted_features,
    )
    from synthgen.metrics.plots import image_grid
    from synthgen.pipelines.generate import SynthPipeline

    out = Path(out)
    (out / "held_out").mkdir(parents=True, exist_ok=True)
    train_csv, holdout_csv = cmu_split(out)
    ds = PatchDataset(holdout_csv)
    real = [ds[i]["image"] for i in range(len(ds))]
    for i, im in enumerate(real):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(out / "held_out" / f"{i:03d}.png")
    gen_dir = out / "generated"
    cmd = ["generate", str(pipeline), "-o", str(gen_dir), "-n", str(n), "--images", str(out / "held_out"),
           "--steps", str(steps), "--seed", str(seed), "--filter"]
    t0 = time.perf_counter()
    try:
        cli(cmd)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    gen_s = time.perf_counter() - t0
    manifest = json.loads((gen_dir / "manifest.json").read_text())
    synth = []
    for it in manifest["items"]:
        with Image.open(gen_dir / it["file"]) as im:
            synth.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))

    t0 = time.perf_counter()
    f_real, f_synth = handcrafted_features(real), handcrafted_features(synth)
    free = encoder_free_report(real, synth, seed=seed, n_splits=n_splits, real_features=f_real,
                               synth_features=f_synth)
    free_s = time.perf_counter() - t0
    train = PatchDataset(train_csv)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    train_ims = [train[i]["image"] for i in pick]
    free_train = encoder_free_report(real, train_ims, seed=seed, n_splits=n_splits, real_features=f_real)

    enc = SynthPipeline.from_pretrained(pipeline).image_encoder
    with torch.no_grad():
        e_real, e_synth, e_train = (enc(torch.stack(x)).reshape(len(x), -1) for x in (real, synth, train_ims))
    enc_fd = fidelity_report(e_real, e_synth, n_bootstrap=100, seed=seed)["overall"]
    enc_fd_train = fidelity_report(e_real, e_train, n_bootstrap=100, seed=seed)["overall"]

    g = torch.Generator().manual_seed(seed)
    ri, si = torch.randperm(len(real), generator=g)[:24].tolist(), torch.randperm(len(synth), generator=g)[:24].tolist()
    rejected = sorted((it["realism_score"], k) for k, it in enumerate(manifest["items"]) if not it["realistic"])
    worst = [synth[k] for _, k in rejected[-12:]]
    rows = [("held-out real", [real[i] for i in ri[:12]]), ("held-out real", [real[i] for i in ri[12:]]),
            ("generated", [synth[i] for i in si[:12]]), ("generated", [synth[i] for i in si[12:]])]
    if worst:
        rows.append(("worst realism", worst))
    image_grid(rows, tile=64).save(out / "grid.png")

    floor = free["floor"]["mean"]
    result = {
        "command": "synthgen " + " ".join(cmd), "n_real": len(real), "n_synthetic": len(synth),
        "generation_s": gen_s, "encoder_free_s": free_s, "encoder_free": free,
        "encoder_free_real_training_tiles": free_train,
        "encoder_fd": {"synthetic": enc_fd["fd"], "real_training_tiles": enc_fd_train["fd"]},
        "realism": manifest["realism"], "grid": str(out / "grid.png"), "report_lines": format_report(free),
        "summary": [
            {"measure": f"encoder-free FD, {free['n_per_half']} generated vs half the held-out tiles",
             "reference": "real vs real (other half): the floor", "reference_value": floor,
             "synthgen_value": free["synthetic"]["mean"], "ratio": free["ratio_to_floor"],
             "note": f"blurred {free['ratio_blurred']:.1f}x, stain-shifted {free['ratio_color_shifted']:.1f}x, "
                     f"real training tiles {free_train['ratio_to_floor']:.1f}x the floor"},
        ],
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "fidelity_handcrafted")
    ap.add_argument("--pipeline", type=Path, default=CKPT)
    ap.add_argument("--n", type=int, default=128, help="images to generate")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--splits", dest="n_splits", type=int, default=10, help="random halvings of the held-out set")
    r = run(**vars(ap.parse_args()))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(r["command"], f"({r['generation_s']:.0f} s)")
    print("\n".join(r["report_lines"]))
    t = r["encoder_free_real_training_tiles"]
    print(f"  {'real training tiles (left 2/3) as synthetic':38s} {t['synthetic']['mean']:10.3f} +- "
          f"{t['synthetic']['std']:.3f}   x{t['ratio_to_floor']:.2f} floor")
    e = r["encoder_fd"]
    print(f"encoder FD (pipeline's SSL encoder, all vs all {r['n_real']} held-out): synthetic "
          f"{e['synthetic']['value']:.2f} [{e['synthetic']['ci95'][0]:.2f}, {e['synthetic']['ci95'][1]:.2f}], "
          f"real training tiles {e['real_training_tiles']['value']:.2f}")
    rr = r["realism"]
    print(f"realism check (reference: the {rr['n_reference']} held-out tiles): {rr['rejected']} of {rr['checked']} "
          f"rejected (threshold {rr['threshold']:.2f})")
    print(f"encoder-free features and report: {r['encoder_free_s']:.1f} s; grid: {r['grid']}")
    # higher is better: the real-vs-real floor over the synthetic set's encoder-free FD (1 = as close as real)
    print(f"headline: encoder_free_floor_over_synthetic ratio={1 / r['encoder_free']['ratio_to_floor']:.4f}")


if __name__ == "__main__":
    main()
