"""Virtual IHC on held-out pairs: every route, and a pix2pix trained on the same pairs, in one run.

Routes compared on the same source tiles, seeds and steps (``synthgen.pipelines.stain``):

- ``source``: the H&E tile itself taken as the IHC (keeps the layout, not the stain);
- ``identity``: the H&E embedding used as the IHC embedding, decoded by the IHC denoiser;
- ``translator``: the H&E embedding translated to an IHC embedding (PixCell's route);
- ``structure``: the translator plus the source's nuclei through the mask branch;
- ``spatial``: the spatial translator: the IHC denoiser also sees the source tile's latents
  (``task: stain_denoiser``), with the translated embedding;
- ``pix2pix``: ``benchmarks/_pix2pix.py`` trained on the same training pairs (``--pix2pix DIR``);
- ``oracle``: the real IHC tile's own embedding decoded (the embedding route's ceiling).

Scores (``synthgen.metrics.stain.stain_report``): Pearson and Spearman correlation over patches of
the DAB-positive area fraction (colour deconvolution) of virtual vs real IHC, mean fractions,
PSNR and SSIM, the Frechet distance of hand-crafted features (encoder-free) and of the pipeline's
SSL encoder, and the structure score (Dice of the source's nuclei vs the virtual tile's). The
translator, structure and spatial routes run ``--seeds`` seeds (mean and sd over them); the
references (identity, oracle) one. Reference rows in the same run:
the real IHC of the same places against the source (structure), and real IHC training tiles
of other places against the test tiles (the real-vs-real floor of both FDs).

With ``--table`` (default in the CLI: ``recipes/data/stain_pairs.csv``) the held-out pairs are
the test rows of the split file for the stain, scored together and per image pair.

Held-out pairs: for ``panck`` the ANHIR rat-kidney H&E / PanCytokeratin sections, registered by
their landmarks, 64 px patches of the band 0.4-0.6 of the width (stride 32): the band that
the shipped PanCK model was trained without (``checkpoints/synthgen-small-cmu/README.md``). For ``ki67`` the DeepLIIF Lung1 strip
(hematoxylin -> Ki67, aligned, 4x downsampled to ~1 um/px, 64 px, stride 16): the shipped Ki67
demo was trained on Bladder1 only. ``--pairs DIR`` takes any folder with ``testA``/``testB``.

    OMP_NUM_THREADS=2 python benchmarks/virtual_stain.py --stain ki67 --pix2pix runs/ki67/pix2pix \
        --json runs/vstain_ki67.json --grid runs/vstain_ki67.png
    python benchmarks/virtual_stain.py --stain panck --no-table    # the older kidney-band pairs only
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
TABLE = REPO / "recipes" / "data" / "stain_pairs.csv"


def held_out_pairs(stain: str, folder: Path, table: Path | None = None) -> Path:
    """Write the held-out pairs of ``stain`` into ``folder``; returns it (testA/testB inside).

    With ``table``: the test rows of that pair split file (64 px, test stride 32, as the training
    pairs were cut) and one view of its training pairs at stride 64; without: the older
    single-source pairs (kidney band, DeepLIIF Lung1)."""
    from synthgen.data.pair_folders import downsample_pair, table_pairs, write_pair_folders
    from synthgen.data.pairs import deepliif_pair, register_sections

    if table is not None:  # train/ (stride 64, one view) holds the real-vs-real floor's tiles of other places
        found, bands = table_pairs(table, stain)
        write_pair_folders(found, folder, 64, stride=64, test_stride=32, holdout=bands)
        return folder
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
ALL_ROUTES = ("source", "identity", "translator", "structure", "spatial", "pix2pix", "oracle")
SEEDED = ("translator", "structure", "spatial")  # the routes compared: --seeds seeds; the references one


def _group(name: str) -> str:
    return name.rsplit("_", 2)[0]  # <pair name>_<x>_<y>.png


def _scores(real, imgs, src, encoder, free: bool) -> dict:
    from synthgen.metrics.stain import stain_report

    r = stain_report(real, imgs, encoder, per_patch=False, source=src, encoder_free=free)
    out = {"dab_pearson": r["dab"]["pearson"], "dab_spearman": r["dab"]["spearman"],
           "dab_virtual_mean": r["dab"]["virtual_mean"], "dab_real_mean": r["dab"]["real_mean"],
           "psnr": r["psnr"], "ssim": r["ssim"], "structure": r["structure"]["dice"],
           "structure_real": r["structure_real"]["dice"]}
    if free:
        out["fd_free"] = r["fd_free"]
    if "fd" in r:
        out["fd"] = r["fd"]
    return out


def _mean_sd(runs: list[dict]) -> dict:
    out = {}
    for k in runs[0]:
        v = np.array([r[k] for r in runs], np.float64)
        out[k] = float(v.mean())
        if len(runs) > 1:
            out[k + "_sd"] = float(v.std(ddof=1))
    return out


def run(stain: str = "panck", pairs: Path | None = None, pipeline: Path = CKPT, steps: int = 20,
        guidance: float = 2.0, limit: int | None = None, grid: Path | None = None,
        routes: tuple[str, ...] = ROUTES, table: Path | None = None, pix2pix: Path | None = None,
        seeds: int = 1, image_guidance: float | None = None, fd: bool = False) -> dict:
    """Score ``routes`` on the held-out pairs; ``fd`` adds both Frechet distances and the
    real-vs-real floor (needs ``table`` or ``pairs`` with trainB for the floor)."""
    from synthgen.pipelines.stain import load_stain, virtual_stain

    with tempfile.TemporaryDirectory() as tmp:
        folder = pairs or held_out_pairs(stain, Path(tmp), table)
        src, real, names = read_split(folder, limit)
        floor = None
        if fd and (table is not None or (pairs is not None and (pairs / "trainB").is_dir())):
            floor = _floor_tiles(folder, len(real))
    emb_pipe = spatial_pipe = translator = None
    if any(r in routes for r in ("identity", "translator", "structure", "oracle")):
        emb_pipe, translator = load_stain(pipeline, stain, route="embedding")
    if "spatial" in routes:
        spatial_pipe, translator = load_stain(pipeline, stain, route="spatial")
    encoder = None
    if fd:
        from synthgen.encoders.load import load_encoder

        encoder = load_encoder(f"ssl:{pipeline / 'image_encoder'}")
    n = len(src)
    makers = {
        "source": lambda k: src,
        "identity": lambda k: emb_pipe(embeddings=emb_pipe.encode_images(src), seeds=[k * 100000 + i for i in range(n)],
                                       num_inference_steps=steps, guidance_scale=guidance, output_type="np").images,
        "translator": lambda k: virtual_stain(emb_pipe, translator, src, stain, seeds=[k * 100000 + i for i in range(n)],
                                              num_inference_steps=steps, guidance_scale=guidance),
        "structure": lambda k: virtual_stain(emb_pipe, translator, src, stain, seeds=[k * 100000 + i for i in range(n)],
                                             num_inference_steps=steps, guidance_scale=guidance, structure=True),
        "spatial": lambda k: virtual_stain(spatial_pipe, translator, src, stain, seeds=[k * 100000 + i for i in range(n)],
                                           num_inference_steps=steps, guidance_scale=guidance,
                                           image_guidance_scale=image_guidance),
        "pix2pix": lambda k: _pix2pix(pix2pix, src),
        "oracle": lambda k: emb_pipe(embeddings=emb_pipe.encode_images(real), seeds=[k * 100000 + i for i in range(n)],
                                     num_inference_steps=steps, guidance_scale=guidance, output_type="np").images,
    }
    groups = sorted({_group(nm) for nm in names})
    gidx = {g: [i for i, nm in enumerate(names) if _group(nm) == g] for g in groups}
    out = {"stain": stain, "n": n, "steps": steps, "guidance": guidance, "image_guidance": image_guidance,
           "seeds": seeds, "groups": {g: len(v) for g, v in gidx.items()}, "routes": {}, "by_group": {}}
    images = {}
    for name in routes:
        if name == "structure" and emb_pipe.controlnet is None or name == "pix2pix" and pix2pix is None:
            continue
        runs, by_group, t = [], {g: [] for g in groups}, time.perf_counter()
        for k in range(seeds if name in SEEDED else 1):
            imgs = makers[name](k)
            images.setdefault(name, imgs)
            runs.append(_scores(real, imgs, src, encoder, fd))
            for g, ix in gidx.items():
                if len(ix) >= 2:
                    by_group[g].append(_scores(real[ix], imgs[ix], src[ix], None, False))
        out["routes"][name] = {**_mean_sd(runs), "seconds": time.perf_counter() - t}
        out["by_group"][name] = {g: _mean_sd(v) for g, v in by_group.items() if v}
    if floor is not None:
        out["floor"] = _floor(real, floor, encoder)
    if grid is not None:
        from PIL import Image

        order = [k for k in ALL_ROUTES if k in images and k != "source"]
        rows = [np.concatenate([src[i], real[i]] + [images[k][i] for k in order], 1)
                for i in range(0, n, max(1, n // 12))]
        Image.fromarray(np.concatenate(rows, 0)).save(grid)
        out["grid_columns"] = ["source", "real"] + order
    return out


def _pix2pix(folder: Path, src: np.ndarray) -> np.ndarray:
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks._pix2pix import translate

    return translate(folder, src)


def _floor_tiles(folder: Path, n: int) -> np.ndarray:
    """Up to ``n`` real IHC training tiles of ``folder/trainB`` (other places than the test tiles)."""
    from PIL import Image

    files = sorted((folder / "trainB").glob("*.png"))
    pick = np.random.default_rng(0).choice(len(files), size=min(n, len(files)), replace=False)
    return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in sorted(pick)])


def _floor(real: np.ndarray, other: np.ndarray, encoder) -> dict:
    """Real IHC training tiles (one view each, other places) vs the real test tiles: both FDs."""
    from synthgen.metrics.handcrafted import handcrafted_fd
    from synthgen.metrics.stain import encoder_frechet_distance

    return {"n": len(other), "fd_free": handcrafted_fd(real, other),
            "fd": encoder_frechet_distance(real, other, encoder) if encoder is not None else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stain", default="panck")
    ap.add_argument("--pairs", type=Path, default=None, help="folder with testA/ (source) and testB/ (real IHC)")
    ap.add_argument("--table", type=Path, default=TABLE, help="pair split file whose test rows to score")
    ap.add_argument("--no-table", action="store_true", help="the older single-source held-out pairs")
    ap.add_argument("--pipeline", type=Path, default=CKPT)
    ap.add_argument("--pix2pix", type=Path, default=None, help="a benchmarks/_pix2pix.py output folder")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--image-guidance", type=float, default=None)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of each diffusion route")
    ap.add_argument("--limit", type=int, default=None, help="score this many pairs, evenly spaced")
    ap.add_argument("--routes", default=",".join(ALL_ROUTES), help="comma-separated subset of " + ",".join(ALL_ROUTES))
    ap.add_argument("--grid", type=Path, default=None, help="PNG: source | real | routes ...")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    table = None if a.no_table or a.pairs else a.table
    res = run(a.stain, a.pairs, a.pipeline, a.steps, a.guidance, a.limit, a.grid, tuple(a.routes.split(",")),
              table=table, pix2pix=a.pix2pix, seeds=a.seeds, image_guidance=a.image_guidance, fd=True)
    print(f"virtual {res['stain']}: {res['n']} held-out pairs {res['groups']}, {res['steps']} steps, "
          f"guidance {res['guidance']}, image guidance {res['image_guidance']}, {res['seeds']} seeds")
    print(f"{'route':<11} {'DAB r':>7} {'DAB rho':>8} {'DAB mean':>9} {'PSNR':>6} {'SSIM':>6} {'struct':>7} "
          f"{'FD free':>8} {'FD enc':>8}")
    for k, v in res["routes"].items():
        print(f"{k:<11} {v['dab_pearson']:>7.3f} {v['dab_spearman']:>8.3f} {v['dab_virtual_mean']:>9.4f} "
              f"{v['psnr']:>6.2f} {v['ssim']:>6.3f} {v['structure']:>7.3f} {v.get('fd_free', float('nan')):>8.2f} "
              f"{v.get('fd', float('nan')):>8.2f}")
    first = next(iter(res["routes"].values()))
    print(f"real IHC: DAB mean {first['dab_real_mean']:.4f}, structure vs source {first['structure_real']:.3f}")
    if "floor" in res:
        f = res["floor"]
        print(f"floor, real training tiles of other places ({f['n']}): FD free {f['fd_free']:.2f}, FD enc {f['fd']:.2f}")
    for k, groups in res["by_group"].items():
        print(f"  {k:<10} " + "; ".join(f"{g}: DAB r {v['dab_pearson']:.2f} SSIM {v['ssim']:.3f} struct "
                                          f"{v['structure']:.2f}" for g, v in groups.items()))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))
    if {"spatial", "pix2pix"} <= set(res["routes"]):
        print(f"headline: virtual_{res['stain']}_spatial_vs_pix2pix_ssim "
              f"ratio={res['routes']['spatial']['ssim'] / res['routes']['pix2pix']['ssim']:.4f}")
    return res


if __name__ == "__main__":
    main()
