"""Virtual IHC on held-out pairs: does the translator beat the identity baseline?

Routes compared on the same source tiles, seeds and steps (``synthgen.pipelines.stain``):

- ``source``: the H&E tile itself taken as the IHC (a floor: how much DAB the H&E already shows);
- ``identity``: the H&E embedding used as the IHC embedding, decoded by the IHC denoiser;
- ``translator``: the H&E embedding translated to an IHC embedding (PixCell's route);
- ``structure``: the translator plus the source's nuclei through the mask branch;
- ``oracle``: the real IHC tile's own embedding decoded (the decoder's ceiling: what a perfect
  translator would score).

Scores (``synthgen.metrics.stain.stain_report``): Pearson and Spearman correlation over patches of
the DAB-positive area fraction (colour deconvolution) of virtual vs real IHC, mean fractions,
PSNR and SSIM.

Held-out pairs: for ``panck`` the ANHIR rat-kidney H&E / PanCytokeratin sections, registered by
their landmarks, 64 px patches of the band 0.4-0.6 of the width (stride 32): the band that
the shipped PanCK model was trained without (``checkpoints/synthgen-small-cmu/README.md``). For ``ki67`` the DeepLIIF Lung1 strip
(hematoxylin -> Ki67, aligned, 4x downsampled to ~1 um/px, 64 px, stride 16): the shipped Ki67
demo was trained on Bladder1 only. ``--pairs DIR`` takes any folder with ``testA``/``testB``.

    OMP_NUM_THREADS=1 python benchmarks/virtual_stain.py --stain panck     # about 3 min on 1 CPU thread
    python benchmarks/virtual_stain.py --stain ki67 --steps 20 --json runs/vstain_ki67.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "checkpoints" / "synthgen-small-cmu"
SHARED = Path(os.environ.get("SYNTHGEN_TEST_DATA", REPO.parent / "shared" / "data")) / "stains"
KIDNEY_HOLDOUT = (0.4, 0.6)


def held_out_pairs(stain: str, folder: Path) -> Path:
    """Write the default held-out pairs of ``stain`` into ``folder``; returns it (testA/testB inside)."""
    from synthgen.data.pair_folders import downsample_pair, write_pair_folders
    from synthgen.data.pairs import deepliif_pair, register_sections

    if stain == "panck":
        d = SHARED / "anhir-rat-kidney"
        pair = register_sections(d / "Rat-Kidney_HE.jpg", d / "Rat-Kidney_PanCytokeratin.jpg",
                                 d / "Rat-Kidney_HE.csv", d / "Rat-Kidney_PanCytokeratin.csv")
        pair.name = "kidney"
        write_pair_folders([pair], folder, 64, stride=64, test_stride=32, holdout=KIDNEY_HOLDOUT)
    elif stain == "ki67":
        pair = downsample_pair(deepliif_pair(SHARED / "deepliif" / "Lung1.png"), 4)
        write_pair_folders([pair], folder, 64, test_stride=16, min_tissue=0.0, holdout=(0.0, 1.0))
    else:
        raise SystemExit(f"no default held-out pairs for {stain!r}: pass --pairs DIR (testA/testB)")
    return folder


def read_split(folder: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    names = sorted(p.name for p in (folder / "testA").glob("*.png"))
    if limit and limit < len(names):  # evenly spaced over the band, not its first columns
        names = [names[i] for i in np.linspace(0, len(names) - 1, limit).round().astype(int)]
    if not names:
        raise SystemExit(f"{folder}/testA has no PNG pairs")
    load = lambda sub: np.stack([np.asarray(Image.open(folder / sub / n).convert("RGB")) for n in names])  # noqa: E731
    return load("testA"), load("testB"), names


ROUTES = ("identity", "translator", "structure", "oracle")


def run(stain: str = "panck", pairs: Path | None = None, pipeline: Path = CKPT, steps: int = 20,
        guidance: float = 2.0, limit: int | None = None, grid: Path | None = None,
        routes: tuple[str, ...] = ROUTES) -> dict:
    from synthgen.metrics.stain import stain_report
    from synthgen.pipelines.stain import load_stain, virtual_stain

    with tempfile.TemporaryDirectory() as tmp:
        folder = pairs or held_out_pairs(stain, Path(tmp))
        src, real, _ = read_split(folder, limit)
    ihc, translator = load_stain(pipeline, stain)
    seeds = list(range(len(src)))
    kw = {"seeds": seeds, "num_inference_steps": steps, "guidance_scale": guidance, "output_type": "np"}
    images, times = {"source": src}, {}
    for name, fn in (
        ("identity", lambda: ihc(embeddings=ihc.encode_images(src), **kw).images),
        ("translator", lambda: virtual_stain(ihc, translator, src, stain, seeds=seeds, num_inference_steps=steps,
                                             guidance_scale=guidance)),
        ("structure", lambda: virtual_stain(ihc, translator, src, stain, seeds=seeds, num_inference_steps=steps,
                                            guidance_scale=guidance, structure=True)),
        ("oracle", lambda: ihc(embeddings=ihc.encode_images(real), **kw).images),
    ):
        if name not in routes or (name == "structure" and ihc.controlnet is None):
            continue
        t = time.perf_counter()
        images[name] = fn()
        times[name] = time.perf_counter() - t
    out = {"stain": stain, "n": len(src), "steps": steps, "guidance": guidance, "routes": {}}
    for name, imgs in images.items():
        r = stain_report(real, imgs, per_patch=False)
        out["routes"][name] = {"dab_pearson": r["dab"]["pearson"], "dab_spearman": r["dab"]["spearman"],
                               "dab_virtual_mean": r["dab"]["virtual_mean"], "dab_real_mean": r["dab"]["real_mean"],
                               "psnr": r["psnr"], "ssim": r["ssim"], "seconds": times.get(name, 0.0)}
    if grid is not None:
        from PIL import Image

        order = [k for k in ("source", *ROUTES) if k in images]
        rows = [np.concatenate([src[i], real[i]] + [images[k][i] for k in order[1:]], 1)
                for i in range(0, len(src), max(1, len(src) // 12))]
        Image.fromarray(np.concatenate(rows, 0)).save(grid)
        out["grid_columns"] = ["source", "real"] + order[1:]
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stain", default="panck")
    ap.add_argument("--pairs", type=Path, default=None, help="folder with testA/ (source) and testB/ (real IHC)")
    ap.add_argument("--pipeline", type=Path, default=CKPT)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--limit", type=int, default=None, help="score this many pairs, evenly spaced")
    ap.add_argument("--routes", default=",".join(ROUTES), help="comma-separated subset of " + ",".join(ROUTES))
    ap.add_argument("--grid", type=Path, default=None, help="PNG: source | real | identity | translator | ...")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    res = run(a.stain, a.pairs, a.pipeline, a.steps, a.guidance, a.limit, a.grid, tuple(a.routes.split(",")))
    print(f"virtual {res['stain']}: {res['n']} held-out pairs, {res['steps']} steps, guidance {res['guidance']}")
    print(f"{'route':<11} {'DAB r':>7} {'DAB rho':>8} {'DAB mean':>9} {'PSNR':>6} {'SSIM':>6}")
    for k, v in res["routes"].items():
        print(f"{k:<11} {v['dab_pearson']:>7.3f} {v['dab_spearman']:>8.3f} {v['dab_virtual_mean']:>9.4f} "
              f"{v['psnr']:>6.2f} {v['ssim']:>6.3f}")
    print(f"real DAB mean {next(iter(res['routes'].values()))['dab_real_mean']:.4f}")
    if {"translator", "identity"} <= set(res["routes"]):
        tr, ident = res["routes"]["translator"]["dab_pearson"], res["routes"]["identity"]["dab_pearson"]
        print(f"translator - identity, DAB Pearson: {tr - ident:+.3f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
