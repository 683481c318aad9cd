"""Quality of a v2 pipeline (128 px at 0.5 um/px) on a split of the default data definition,
judged without the pipeline's own encoder and against references measured in the same run.

Data: ``recipes/data/default_v2.csv`` tiled by ``synthgen splits`` (``--data``, built if absent),
and its masked images (``--masked-only``: MoNuSeg and CoNSeP with expert nuclei; ``--mask-data``).
Image- and slide-disjoint from training. ``--split val`` for choices, ``test`` to report.

1. **Variations**: every tile of the split, with its own embedding, class and source
   (``pipe(images=tiles, labels=..., sources=...)``), once per seed; **source-only**: the same
   classes and sources, no reference (null embedding). Each set's encoder-free FD
   (:func:`synthgen.metrics.handcrafted.encoder_free_report`, hand-crafted stain / texture /
   nuclei / sharpness features at the 0.5 um/px nucleus size) against the split's real tiles,
   as a ratio to the real-vs-real floor of the same run, mean +- std over seeds; references in
   the same table: real training tiles (other images), a 1 px blur and a stain shift of the real
   tiles. Beside it the FD in the pipeline's own encoder space, for contrast only.
2. **Source fidelity, encoder-free**: a logistic regression on the hand-crafted features of the
   real training tiles predicts the tissue source (6 sources); its accuracy on the split's real
   tiles is the ceiling, on the generated images the fidelity of the source condition.
3. **Mask adherence** on the masked tiles: the expert instance map with the tile's embedding,
   the same without the branch (same seeds), and the mask alone; the generated image is
   re-segmented with ``synthgen.data.nuclei.segment_nuclei`` and scored against the expert map
   (Dice, object F1 at IoU 0.5). Ceiling: the same pseudo-labeller on the real tile, which is
   weak against expert maps (Dice about 0.4), so the segmenter-free :func:`nuclear_contrast`
   (hematoxylin inside minus outside the mask's nuclei) is reported beside it. ``--mask-scales``
   compares strengths of the mask branch (``controlnet_conditioning_scale``; choose on ``val``),
   ``--masks-only`` runs this section alone, ``--skip-masks`` all but it. Beside each arm, the encoder-free FD of its images
   against the masked real tiles over the floor: what a stronger branch costs in realism.
4. **Beside the previous default** (``--v1 PIPELINE``, a 64 px model at 1 um/px): both judged at
   1 um/px, the real tiles and the v2 images box-downsampled 2x, v1's variations made from the
   downsampled tiles; the same encoder-free report at the 1 um/px nucleus size.
5. A grid (``OUT/grid.png``): real tiles, their variations, source-only samples, and mask-guided
   samples with the mask's outlines.

    OMP_NUM_THREADS=2 python benchmarks/default_v2_quality.py checkpoints/synthgen-v2 --split test
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
MPP = 0.5
SEG_DIAMETER_PX = 10  # the pseudo-labeller's nucleus size: best object F1 against the expert maps on val (7-18 tried)


def nuclear_contrast(images: np.ndarray, masks: np.ndarray) -> float:
    """Mean hematoxylin optical density inside the mask's nuclei minus outside them, averaged
    over images: 0.041 on the v2 test tiles with their own expert masks, about 0 for an image
    that ignores its mask. It needs no segmenter, so it holds where the pseudo-labeller is weak."""
    from skimage.color import rgb2hed

    vals = []
    for im, m in zip(images, masks, strict=True):
        h, fg = rgb2hed(im)[..., 0], m > 0
        if 0 < fg.mean() < 1:
            vals.append(float(h[fg].mean() - h[~fg].mean()))
    return float(np.mean(vals))


def _load(table: Path, limit: int | None = None, seed: int = 0):
    from synthgen.data.cache import LabelledTiles

    ds = LabelledTiles(table)
    idx = list(range(len(ds)))
    if limit is not None and limit < len(ds):
        idx = sorted(torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit].tolist())
    items = [ds[i] for i in idx]
    images = torch.stack([it["image"] for it in items])
    labels = [ds.classes[it["label"]] if it["label"] >= 0 else None for it in items]
    sources = [ds.sources[it["source"]] for it in items]
    masks = np.stack([it["mask"].numpy() for it in items]) if "mask" in items[0] else None
    return images, labels, sources, masks


def _summary(reports: list[dict]) -> dict:
    r = np.array([x["ratio_to_floor"] for x in reports])
    return {"ratio_mean": float(r.mean()), "ratio_std": float(r.std()), "per_seed": r.tolist(),
            "fd_mean": float(np.mean([x["synthetic"]["mean"] for x in reports])),
            "floor_mean": float(np.mean([x["floor"]["mean"] for x in reports]))}


def run(pipeline: Path, out: Path, split: str = "test", data: Path = REPO / "runs" / "data" / "v2",
        mask_data: Path = REPO / "runs" / "data" / "v2_masks", seeds=(0, 1, 2), steps: int = 12,
        guidance: float = 2.0, n_splits: int = 10, v1: Path | None = None, mask_scales=(1.0,),
        masks_only: bool = False, skip_masks: bool = False) -> dict:
    from _data import v2_tables  # this folder's helper (the script's own directory is on sys.path)
    from PIL import Image
    from skimage.segmentation import find_boundaries
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from synthgen.data.nuclei import nucleus_diameter_px, segment_nuclei
    from synthgen.metrics.fidelity import frechet_distance
    from synthgen.metrics.handcrafted import encoder_free_report, handcrafted_features
    from synthgen.metrics.masks import mask_adherence
    from synthgen.metrics.plots import image_grid
    from synthgen.pipelines.generate import SynthPipeline

    out.mkdir(parents=True, exist_ok=True)
    diameter = nucleus_diameter_px(MPP)
    real, labels, sources, _ = _load(v2_tables(data) / f"{split}.csv")
    n = len(real)
    train, _, train_sources, _ = _load(data / "train.csv")
    pipe = SynthPipeline.from_pretrained(pipeline)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="pt", batch_size=32)
    timing, sets = {}, {"variations": [], "source-only": []}
    for s in seeds if not masks_only else ():
        ids = [s * 100_000 + i for i in range(n)]
        t0 = time.perf_counter()
        sets["variations"].append(pipe(images=real, labels=labels, sources=sources, seeds=ids, **kw).images)
        timing.setdefault("variations_s", []).append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sets["source-only"].append(pipe(labels=labels, sources=sources, seeds=ids, **kw).images)
        timing.setdefault("source_only_s", []).append(time.perf_counter() - t0)

    free, references, enc_fd, source_acc = {}, {}, {}, {}
    if not masks_only:
        t0 = time.perf_counter()
        f_real = handcrafted_features(real, diameter)
        feats = {k: [handcrafted_features(x, diameter) for x in v] for k, v in sets.items()}
        free = {k: _summary([encoder_free_report(real, x, seed=j, n_splits=n_splits, diameter=diameter, real_features=f_real,
                                                 synth_features=f) for j, (x, f) in enumerate(zip(v, feats[k], strict=True))])
                for k, v in sets.items()}
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
        ref = encoder_free_report(real, train[pick], seed=0, n_splits=n_splits, diameter=diameter, real_features=f_real)
        references = {"real training tiles (other images)": ref["ratio_to_floor"],
                      "real, Gaussian blur sigma 1 px": ref["ratio_blurred"],
                      "real, stain shift": ref["ratio_color_shifted"], "floor": 1.0}
        timing["features_s"] = time.perf_counter() - t0

        enc = pipe.image_encoder
        with torch.no_grad():
            e_real = enc(real).reshape(n, -1)
            enc_fd = {k: float(np.mean([float(frechet_distance(e_real, enc(x).reshape(n, -1))) for x in v]))
                      for k, v in sets.items()}
            enc_fd["real training tiles (other images)"] = float(frechet_distance(e_real, enc(train[pick]).reshape(n, -1)))

        f_train = handcrafted_features(train, diameter)
        scaler = StandardScaler().fit(f_train)
        clf = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(f_train), train_sources)
        y = np.array(sources)
        source_acc = {"real tiles (ceiling)": float((clf.predict(scaler.transform(f_real)) == y).mean())}
        for k, v in feats.items():
            source_acc[k] = float(np.mean([(clf.predict(scaler.transform(f)) == y).mean() for f in v]))

    at_1um = {}
    if v1 is not None and not masks_only:
        down = lambda x: torch.nn.functional.avg_pool2d(x.float(), 2).round().to(torch.uint8)  # noqa: E731
        old = SynthPipeline.from_pretrained(v1)
        old.set_progress_bar_config(disable=True)
        r64, d1 = down(real), nucleus_diameter_px(1.0)
        f64 = handcrafted_features(r64, d1)
        reps = {"v1 variations": [], "v2 variations (downsampled)": []}
        for j, s in enumerate(seeds):
            ids = [s * 100_000 + i for i in range(n)]
            ims = old(images=r64, seeds=ids, **kw).images
            for name, x in (("v1 variations", ims), ("v2 variations (downsampled)", down(sets["variations"][j]))):
                reps[name].append(encoder_free_report(r64, x, seed=j, n_splits=n_splits, diameter=d1, real_features=f64))
        at_1um = {k: _summary(v) for k, v in reps.items()}
        ref64 = encoder_free_report(r64, down(train[pick]), seed=0, n_splits=n_splits, diameter=d1, real_features=f64)
        at_1um["real training tiles (other images, downsampled)"] = {"ratio_mean": ref64["ratio_to_floor"]}
        at_1um["real, Gaussian blur sigma 1 px"] = {"ratio_mean": ref64["ratio_blurred"]}

    hwc = lambda x: x.permute(0, 2, 3, 1).numpy()  # noqa: E731
    adherence, mask_images, m_real = {}, {}, torch.zeros(0)
    if pipe.controlnet is not None and not skip_masks:  # the mask section needs a mask branch
        m_real, m_labels, m_sources, m_masks = _load(v2_tables(mask_data, masked_only=True) / f"{split}.csv")
        seg = lambda im: segment_nuclei(im, diameter=SEG_DIAMETER_PX)  # noqa: E731
        f_mreal = handcrafted_features(m_real, diameter)
        for j, s in enumerate(seeds):
            ids = [s * 100_000 + i for i in range(len(m_real))]
            arms = {"embedding, no mask (same seeds)": dict(images=m_real, sources=m_sources)}
            for sc in mask_scales:  # the mask branch's strength (controlnet_conditioning_scale)
                at = "" if sc == 1.0 else f" @ scale {sc:g}"
                arms[f"mask + embedding{at}"] = dict(images=m_real, masks=m_masks, sources=m_sources,
                                                     controlnet_conditioning_scale=sc)
                arms[f"mask alone{at}"] = dict(masks=m_masks, controlnet_conditioning_scale=sc)
            for name, cond in arms.items():
                pt = pipe(seeds=ids, **cond, **kw).images
                ims = hwc(pt)
                mask_images.setdefault(name, ims)
                rep = mask_adherence(ims, m_masks, seg)
                realism = encoder_free_report(m_real, pt, seed=j, n_splits=n_splits, diameter=diameter,
                                              real_features=f_mreal)["ratio_to_floor"]  # the price of a strong branch
                adherence.setdefault(name, []).append({k: rep[k] for k in ("dice", "object_f1")} | {
                    "contrast": nuclear_contrast(ims, m_masks), "fd_vs_floor": realism})
        keys = ("dice", "object_f1", "contrast", "fd_vs_floor")
        adherence = {k: {m: float(np.mean([r[m] for r in v])) for m in keys} | {
            "dice_std": float(np.std([r["dice"] for r in v]))} for k, v in adherence.items()}
        ceiling = mask_adherence(hwc(m_real), m_masks, seg)
        adherence["real tile (ceiling)"] = {k: ceiling[k] for k in ("dice", "object_f1")} | {
            "contrast": nuclear_contrast(hwc(m_real), m_masks), "fd_vs_floor": 1.0}

    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(n, generator=g)[:12].tolist()
    mpick = torch.randperm(max(len(m_real), 1), generator=g)[:12].tolist()

    def outline(ims, masks):
        ims = ims.copy()
        for im, m in zip(ims, masks, strict=True):
            im[find_boundaries(m)] = (0, 255, 0)
        return list(ims)

    rows = [("real", [real[i] for i in pick])] + [(k, [v[0][i] for i in pick]) for k, v in sets.items() if v]
    if mask_images:  # outlined: the real tile and both arms at the first strength; the other strengths plain
        at = "" if mask_scales[0] == 1.0 else f" @ scale {mask_scales[0]:g}"
        first = (f"mask + embedding{at}", f"mask alone{at}")
        rows += [("real + mask", outline(hwc(m_real[mpick]), m_masks[mpick]))]
        rows += [(k.replace("mask + embedding", "mask + emb").replace(" @ scale ", " @"),
                  outline(mask_images[k][mpick], m_masks[mpick])) for k in first]
        rows += [(k.replace("mask + embedding @ scale ", "m+e @"), list(v[mpick])) for k, v in mask_images.items()
                 if k.startswith("mask + embedding") and k != first[0]]
    image_grid(rows, tile=128).save(out / "grid.png")
    for k, v in ((k, v) for k, v in sets.items() if v):  # the first seed's images, for looking at
        d = out / k
        d.mkdir(exist_ok=True)
        for i, im in enumerate(v[0]):
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")

    result = {"pipeline": str(pipeline), "split": split, "n_tiles": n, "n_mask_tiles": len(m_real),
              "seeds": list(seeds), "steps": steps, "guidance": guidance, "encoder_free": free,
              "references": references, "encoder_fd_own_encoder": enc_fd, "source_accuracy": source_acc,
              "mask_adherence": adherence, "at_1um_per_px": at_1um, "timing": timing, "grid": str(out / "grid.png")}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--split", choices=["val", "test"], default="test")
    ap.add_argument("--out", type=Path, default=None, help="default: runs/v2_quality/<split>")
    ap.add_argument("--data", type=Path, default=REPO / "runs" / "data" / "v2")
    ap.add_argument("--mask-data", type=Path, default=REPO / "runs" / "data" / "v2_masks")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=12, help="DPM-Solver++ steps")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--mask-scales", type=float, nargs="+", default=[1.0],
                    help="strengths of the mask branch to compare (controlnet_conditioning_scale; choose on val)")
    ap.add_argument("--masks-only", action="store_true", help="only the mask-adherence section")
    ap.add_argument("--skip-masks", action="store_true", help="no mask-adherence section")
    ap.add_argument("--v1", type=Path, default=None, help="the previous default pipeline, judged beside at 1 um/px "
                    "(e.g. checkpoints/synthgen-small-cmu)")
    a = ap.parse_args()
    out = a.out or REPO / "runs" / "v2_quality" / a.split
    t0 = time.perf_counter()
    r = run(a.pipeline, out, a.split, a.data, a.mask_data, tuple(a.seeds), a.steps, a.guidance, v1=a.v1,
            mask_scales=tuple(a.mask_scales), masks_only=a.masks_only, skip_masks=a.skip_masks)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{r['pipeline']} on {r['split']} ({r['n_tiles']} tiles, {r['n_mask_tiles']} with expert masks), "
          f"{r['steps']} steps, guidance {r['guidance']}, seeds {r['seeds']}")
    print("encoder-free FD / real-vs-real floor (mean +- std over seeds):")
    for k, v in r["encoder_free"].items():
        print(f"  {k:40s} {v['ratio_mean']:7.2f}x +- {v['ratio_std']:.2f}   (FD {v['fd_mean']:.1f}, floor {v['floor_mean']:.1f})")
    for k, v in r["references"].items():
        print(f"  {k:40s} {v:7.2f}x")
    print("own-encoder FD (for contrast):", {k: round(v, 2) for k, v in r["encoder_fd_own_encoder"].items()})
    print("source accuracy (hand-crafted-feature classifier trained on real training tiles):",
          {k: round(v, 3) for k, v in r["source_accuracy"].items()})
    print("mask adherence vs expert masks:")
    for k, v in r["mask_adherence"].items():
        print(f"  {k:35s} Dice {v['dice']:.3f}  object F1 {v['object_f1']:.3f}  nuclear H contrast {v['contrast']:.3f}"
              f"  encoder-free FD / floor {v['fd_vs_floor']:.2f}x")
    if r["at_1um_per_px"]:
        print("at 1 um/px, encoder-free FD / floor:")
        for k, v in r["at_1um_per_px"].items():
            print(f"  {k:48s} {v['ratio_mean']:7.2f}x" + (f" +- {v['ratio_std']:.2f}" if "ratio_std" in v else ""))
    print(f"grid: {r['grid']}")
    if r["encoder_free"]:
        print(f"headline: default_v2_variations_vs_floor ratio={1 / r['encoder_free']['variations']['ratio_mean']:.4f}")


if __name__ == "__main__":
    main()
