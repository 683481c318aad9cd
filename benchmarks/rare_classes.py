"""Rare-class modes of the default small pipeline on labelled Kather 2016 tiles: is the shipped
embedding prior class-faithful, and do generated images keep their class?

1. Prior vs real embeddings (the method of ``tests/test_rare.py``): for each class c, the energy
   distance (Szekely & Rizzo) between the real embeddings of c and the prior's samples of each
   class k; the prior is class-faithful for c when k = c is the nearest. Plus the accuracy of a
   nearest-centroid classifier (centroids of the real bank) on the samples, against its accuracy
   on the real embeddings. Measured (a) in-sample, shipped prior vs shipped bank, and (b) held
   out: for each fold j, a prior trained with ``recipes/train/prior_small.yaml`` on tiles != j of
   every class, compared with the embeddings of tile j (never seen by that prior). Reference:
   the same check with the real training embeddings of the fold in place of the samples (what
   a perfect copy of the bank would score).
2. ClassFilter acceptance: images generated per class in prior / variations / interpolation
   mode, re-encoded with the pipeline's SSL encoder, nearest class centroid of the shipped bank.
3. A PNG grid: per class (rows, in class order) 2 real crops then 6 prior-mode images.

``run()`` returns these as ``summary`` rows, each against a reference measured in the same run:
the prior's samples against the real embeddings they imitate (scored the same way), and the
filter's acceptance of generated images against its acceptance of the real bank embeddings
(the real crops, encoded by the same encoder; chance is 1 / 8).

    OMP_NUM_THREADS=1 python benchmarks/rare_classes.py            # about 15 min on 2 CPU cores
    python benchmarks/rare_classes.py --folds 0 --n 16             # shipped prior and filter only
    python benchmarks/run_all.py --quick --only rare_classes       # 1 fold, prior mode, 8 images per class
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "checkpoints" / "synthgen-small-cmu"
TABLE = REPO / "recipes" / "data" / "kather2016.csv"
BANK_OPTS = {"image_mpp": 0.495, "mpp": 1.0, "crop": 64, "stride": 5}  # as in recipes/train/prior_small.yaml
MODES = ("prior", "variations", "interpolation")


def energy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance between two samples (Szekely & Rizzo 2013)."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def nearest_classes(real: torch.Tensor, labels: torch.Tensor, other: torch.Tensor, other_labels: torch.Tensor):
    """For each class c, the class k whose set in ``other`` is nearest (energy distance) to c's real set."""
    k = int(labels.max()) + 1
    dist = [[energy(real[labels == c], other[other_labels == j]) for j in range(k)] for c in range(k)]
    return [min(range(k), key=lambda j, c=c: dist[c][j]) for c in range(k)], dist


def prior_check(prior, real: torch.Tensor, labels: torch.Tensor, train_bank, n: int = 216, seed: int = 1) -> dict:
    """The prior's samples against ``real``; ``train_bank`` (embeddings, labels) gives the centroids
    and, as a reference sampler, the real training embeddings themselves."""
    from synthgen.pipelines.rare import ClassFilter

    k = prior.config.num_classes
    sl = torch.arange(k).repeat_interleave(n)
    samples = prior.sample(sl, generator=torch.Generator().manual_seed(seed))
    nearest, dist = nearest_classes(real, labels, samples, sl)
    ref, _ = nearest_classes(real, labels, *train_bank)
    f = ClassFilter(*train_bank)
    return {"nearest_sample_class": nearest, "classes_ok": sum(int(a == c) for c, a in enumerate(nearest)),
            "reference_train_bank_classes_ok": sum(int(a == c) for c, a in enumerate(ref)),
            "nc_acc_samples": float((f.predict(samples) == sl).float().mean()),
            "nc_acc_real": float((f.predict(real) == labels).float().mean()),
            "nc_acc_train_bank": float((f.predict(train_bank[0]) == train_bank[1]).float().mean()),
            "energy": [[round(v, 3) for v in row] for row in dist]}


def bank_of(ds, encoder, out: Path):
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import CropViews
    from synthgen.workflows.generate import embedding_bank

    views = CropViews(ds, BANK_OPTS["crop"], BANK_OPTS["stride"], dihedral=True)
    build_cache(views, out, {"emb": encoder}, shard_size=4096, classes=ds.classes, progress=False)
    return embedding_bank(out, "emb")


def run(work: Path | None = None, folds: int = 3, n: int = 32, steps: int = 20, guidance: float = 2.0,
        images: bool = True, grid: Path | None = None, modes: tuple[str, ...] = MODES) -> dict:
    """Prior statistics (in-sample and ``folds`` held-out folds) and, with ``images``, filter
    acceptance of ``n`` generated images per class in each of ``modes``; ``summary`` rows.

    Args:
        work: scratch folder for the fold banks and priors (a prior already trained there is
            reused); default a temporary folder, so every fold's prior is trained in this run.
        grid: write the PNG grid here (needs ``"prior"`` in ``modes``); none by default.
    """
    if work is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run(Path(tmp), folds, n, steps, guidance, images, grid, modes)
    work = Path(work)

    from synthgen.config import load_train_config
    from synthgen.data.datasets import ImageListDataset
    from synthgen.models.prior import EmbeddingPrior
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.rare import RareClassSynthesizer
    from synthgen.training.tasks import save_grid
    from synthgen.training.trainer import train
    from synthgen.workflows.generate import embedding_bank

    report: dict = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads"}
    pipe = SynthPipeline.from_pretrained(CKPT)
    pipe.set_progress_bar_config(disable=True)
    enc = pipe.image_encoder.eval()
    bank, labels, names = embedding_bank(CKPT / "bank", "emb")
    prior = EmbeddingPrior.from_pretrained(CKPT / "prior")

    # 1a. in-sample: the shipped prior against the shipped bank
    report["in_sample"] = prior_check(prior, bank, labels, (bank, labels))
    print("in-sample:", {k: v for k, v in report["in_sample"].items() if k != "energy"})

    # 1b. held out: leave tile j of every class out of the bank and the prior
    table = ImageListDataset.from_csv(TABLE, image_mpp=BANK_OPTS["image_mpp"], mpp=BANK_OPTS["mpp"])
    tile_no = [sum(1 for q in range(i) if table.labels[q] == table.labels[i]) for i in range(len(table))]
    report["held_out"] = []
    for j in range(folds):
        fold = work / f"fold{j}"

        def subset(keep):
            idx = [i for i in range(len(table)) if keep(tile_no[i])]
            return ImageListDataset([table.paths[i] for i in idx], [table.labels[i] for i in idx], table.classes,
                                    image_mpp=table.image_mpp, mpp=table.mpp)

        tr_e, tr_l, _ = bank_of(subset(lambda t, j=j: t != j), enc, fold / "bank_train")
        ho_e, ho_l, _ = bank_of(subset(lambda t, j=j: t == j), enc, fold / "bank_holdout")
        t0 = time.time()
        cfg = load_train_config(REPO / "recipes" / "train" / "prior_small.yaml",
                                {"data": {"cache": str(fold / "bank_train")}, "output_dir": str(fold / "prior")})
        if not (fold / "prior" / "model").exists():
            train(cfg, progress=False)
        fold_prior = EmbeddingPrior.from_pretrained(fold / "prior" / "model")
        r = prior_check(fold_prior, ho_e, ho_l, (tr_e, tr_l))
        r["train_s"] = round(time.time() - t0, 1)
        report["held_out"].append(r)
        print(f"fold {j} (held-out tile {j} of each class):", {k: v for k, v in r.items() if k != "energy"})

    # 2. ClassFilter acceptance of generated images, per class and mode
    report["acceptance"], rows = {}, []
    if images:
        synth = RareClassSynthesizer(pipe, bank, labels, prior=prior)
        g = torch.Generator().manual_seed(0)
        for mode in modes:
            t0, rates, predicted = time.time(), {}, {}
            for c, name in enumerate(names):
                res = synth.generate(c, n, mode=mode, seed=c, guidance_scale=guidance, num_inference_steps=steps)
                rates[name] = res.acceptance_rate
                imgs = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in res.images])
                with torch.no_grad():
                    pred = synth.filter.predict(enc(imgs))
                predicted[name] = [names[int(p)] for p in pred]
                if mode == "prior" and grid is not None:
                    rows += [*_real_crops(table, c, 2, g), *imgs[:6]]
            total = sum(rates.values()) / len(rates)
            report["acceptance"][mode] = {"per_class": rates, "mean": total, "seconds": round(time.time() - t0, 1),
                                          "predicted_counts": {k: {p: v.count(p) for p in set(v)}
                                                               for k, v in predicted.items()}}
            print(f"acceptance ({mode}): mean {total:.3f}; " + ", ".join(f"{k} {v:.2f}" for k, v in rates.items()))
    if rows:
        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        save_grid(torch.stack(rows), grid, nrow=8)
        report["grid"] = str(grid)
    report["summary"] = summary_rows(report, len(names), n, steps)
    return report


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summary_rows(report: dict, k: int, n: int, steps: int) -> list[dict]:
    """The ratios of ``report``: the prior against the real embeddings it imitates, scored the
    same way; the filter's acceptance of generated images against its acceptance of real crops."""
    ins, rows = report["in_sample"], []
    rows.append({"measure": f"shipped prior, classes nearest (energy distance) to their own samples, "
                            f"in-sample, of {k}",
                 "reference": "the real bank itself (nearest to itself: the ceiling)",
                 "reference_value": ins["reference_train_bank_classes_ok"], "synthgen_value": ins["classes_ok"]})
    rows.append({"measure": "shipped prior samples, nearest-centroid accuracy (bank centroids), in-sample",
                 "reference": "the real bank embeddings, same centroids",
                 "reference_value": ins["nc_acc_real"], "synthgen_value": ins["nc_acc_samples"]})
    ho = report["held_out"]
    if ho:
        rows.append({"measure": f"fold priors, held-out classes nearest (energy distance) to their own samples, "
                                f"of {len(ho)} fold(s) x {k}",
                     "reference": "the fold's real training embeddings in place of the samples",
                     "reference_value": sum(r["reference_train_bank_classes_ok"] for r in ho),
                     "synthgen_value": sum(r["classes_ok"] for r in ho)})
        rows.append({"measure": f"fold prior samples, nearest-centroid accuracy (fold's training centroids), "
                                f"mean over {len(ho)} fold(s)",
                     "reference": "the fold's real training embeddings, same centroids",
                     "reference_value": sum(r["nc_acc_train_bank"] for r in ho) / len(ho),
                     "synthgen_value": sum(r["nc_acc_samples"] for r in ho) / len(ho)})
    for mode, acc in report["acceptance"].items():
        rows.append({"measure": f"ClassFilter acceptance of generated images, {mode} mode, {n} per class x {k} "
                                f"classes, {steps} steps",
                     "reference": "the real bank embeddings (real crops), same filter",
                     "reference_value": ins["nc_acc_real"], "synthgen_value": acc["mean"],
                     "note": f"chance {1 / k:.3f}"})
    for row in rows:
        row["ratio"] = _ratio(row["synthgen_value"], row["reference_value"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "rare_classes", help="scratch folder")
    ap.add_argument("--folds", type=int, default=3, help="held-out folds (tile j of every class), 0 to skip")
    ap.add_argument("--n", type=int, default=32, help="generated images per class and mode")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--no-images", action="store_true", help="only the prior statistics (sections 1a, 1b)")
    ap.add_argument("--grid", type=Path, default=REPO / "runs" / "rare_classes" / "prior_grid.png")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    report = run(args.work, args.folds, args.n, args.steps, args.guidance, images=not args.no_images,
                 grid=None if args.no_images else args.grid)
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    for row in report["summary"]:
        print(f"{row['measure']}: {row['synthgen_value']:.3g} vs {row['reference_value']:.3g} "
              f"({row['reference']}), ratio {row['ratio']:.2f}")
    print(("" if args.no_images else f"grid -> {args.grid}; ") + f"report -> {args.work / 'report.json'}")
    # nearest-centroid accuracy of prior samples over that of real embeddings (held-out folds when run)
    nc = [row for row in report["summary"] if "nearest-centroid accuracy" in row["measure"]]
    print(f"headline: rare_prior_class_accuracy_vs_real ratio={nc[-1]['ratio']:.4f}")


def _real_crops(table, c: int, k: int, g: torch.Generator) -> list[torch.Tensor]:
    """``k`` random 64 px crops (at 1 um/px) of the class's source tiles, for the grid."""
    idx = [i for i, lab in enumerate(table.labels) if lab == c]
    out = []
    for _ in range(k):
        img = table[idx[int(torch.randint(0, len(idx), (1,), generator=g))]]["image"]
        y, x = torch.randint(0, img.shape[-1] - 63, (2,), generator=g).tolist()
        out.append(img[:, y : y + 64, x : x + 64])
    return out


if __name__ == "__main__":
    main()
