"""Write ``default_v2.csv``, the split file of the default model family (run once; the CSV is committed).

    python recipes/data/make_default_v2.py            # from the repository root, ../shared beside it

Every H&E source of ``../shared/data`` that can be read at 0.5 um/px, with image- or slide-disjoint
splits drawn with a fixed seed (about 70 / 15 / 15 % of the groups of each source):

- ``cmu``: CMU-1-Small-Region.svs (0.499 um/px, skin, CC0). One slide: split by region, x in
  [0, 0.6) train, [0.6, 0.75) val, [0.75, 1] test.
- ``monuseg``: 30 images at 0.2527 um/px (7 organs, CC BY-NC-SA 4.0). Group = image. Mask: the
  nuclei instance map (12 from the expert polygons, 18 rebuilt from their colour rendering).
- ``consep``: 432 patches of 27 colorectal images at 0.25 um/px (40x; research use). Group = image id.
  Mask: the expert nuclei instance map (``Inst``).
- The histolytics instance masks are left out of the mask column: a segmentation model made them.
- ``kather2016``: 24 tiles at 0.495 um/px, 8 classes (CC BY 4.0); ``kather2016_224``: 100 tiles
  resampled by their copy's author from 150 to 224 px, i.e. 150 * 0.495 / 224 = 0.3315 um/px.
  Group = tile (no slide ids survive in the 224 copy; no tile of it matched a 150 px tile on a
  16x16 thumbnail); split within each class.
- ``histolytics``: two 1500x1500 ovarian carcinoma crops with no resolution in the data. Their
  mpp is estimated as 0.36 um/px by matching the median nucleus area of the stroma crop's
  instance masks (228 px) to MoNuSeg's expert median (29.9 um^2): sqrt(29.9 / 228). One crop of
  each kind: split by region like the CMU slide (BSD-3-Clause).

Left out, and why: the TCGA frozen section (no resolution in its metadata, and at 4443 px wide a
heavily downsampled copy: it cannot be read at 0.5 um/px), ``stardist_histo.jpg`` (unknown scale,
one small field), the ANHIR/CIMA H&E sections (about 5 um/px: ten times too coarse) and the
DeepLIIF panels (IHC and hematoxylin only, not H&E).
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path("../../../shared/data")  # relative to this folder, as written in the CSV
SEED = 0


def _split_groups(groups: list[str], rng: random.Random, val: float = 0.15, test: float = 0.15) -> dict[str, str]:
    groups = sorted(groups)
    rng.shuffle(groups)
    n = len(groups)
    n_test = max(1, round(test * n))
    n_val = max(1, round(val * n)) if n >= 3 else 0
    return {g: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, g in enumerate(groups)}


def main() -> None:
    rng = random.Random(SEED)
    rows = []

    def add(path, source, label, group, mpp, split, roi="", min_tissue=0.5, mask=""):
        rows.append(dict(path=str(path), source=source, label=label, group=group, mpp=mpp, split=split,
                         roi=roi, min_tissue=min_tissue, mask=str(mask)))

    cmu = DATA / "slides/CMU-1-Small-Region.svs"
    for split, roi in (("train", "0 0 0.6 1"), ("val", "0.6 0 0.75 1"), ("test", "0.75 0 1 1")):
        add(cmu, "cmu", "", "cmu-1", "", split, roi)

    mon = sorted((HERE / DATA / "nuclei/monuseg/images").glob("*.png"))
    assign = _split_groups([p.stem for p in mon], rng)
    for p in mon:
        add(DATA / "nuclei/monuseg/images" / p.name, "monuseg", "", p.stem, 0.2527, assign[p.stem], min_tissue=0.3,
            mask=DATA / "nuclei/monuseg/instances" / p.name)

    con = sorted((HERE / DATA / "nuclei/consep/train/Images").glob("*.jpg"))
    ids = {p.name: re.match(r"train_(\d+)_", p.name).group(1) for p in con}
    assign = _split_groups(sorted(set(ids.values())), rng)
    for p in con:
        add(DATA / "nuclei/consep/train/Images" / p.name, "consep", "", f"consep-{ids[p.name]}", 0.25,
            assign[ids[p.name]], min_tissue=0.0, mask=DATA / "nuclei/consep/train/Inst" / f"{p.stem}.png")

    for folder, source, mpp, pattern in (("classes/kather2016", "kather2016", 0.495, "*.tif"),
                                         ("classes/kather2016_224", "kather2016_224", 0.3315, "*.png")):
        for cls_dir in sorted((HERE / DATA / folder).iterdir()):
            label = cls_dir.name.split("_", 1)[1]
            files = sorted(cls_dir.glob(pattern))
            if source == "kather2016":  # 3 per class: two to train, one to test
                rng.shuffle(files)
                assign = {f.name: s for f, s in zip(files, ["train", "train", "test"], strict=True)}
            else:
                assign = _split_groups([f.name for f in files], rng, val=0.15, test=0.2)
            for f in files:
                add(DATA / folder / cls_dir.name / f.name, source, label, f"{source}-{label}-{f.stem}", mpp,
                    assign[f.name], min_tissue=0.0)

    for name in ("hgsc_nest", "hgsc_stromal_he"):
        p = DATA / "images/histolytics" / f"{name}.jpg"
        for split, roi in (("train", "0 0 0.6 1"), ("val", "0.6 0 0.8 1"), ("test", "0.8 0 1 1")):
            add(p, "histolytics", "", name, 0.36, split, roi, min_tissue=0.3)

    out = HERE / "default_v2.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
