"""The default family's data definition: one split file, disjoint splits, labelled tile tables."""

import csv

import pytest

from synthgen.data.datasets import PatchDataset
from synthgen.data.splits import (
    DEFAULT_SPLIT_FILE,
    build_split_tables,
    read_split_file,
    read_tile_labels,
)
from synthgen.errors import SynthgenError


def test_default_split_file_is_disjoint_and_complete(data_dir):
    rows = read_split_file(DEFAULT_SPLIT_FILE)
    sources = {r.source for r in rows}
    assert sources == {"cmu", "monuseg", "consep", "kather2016", "kather2016_224", "histolytics"}
    splits_of = {}
    for r in rows:
        splits_of.setdefault(r.group, set()).add(r.split)
    # only the single-slide sources cross splits (by disjoint regions); every other group is in one split
    crossing = {g for g, s in splits_of.items() if len(s) > 1}
    assert crossing == {"cmu-1", "hgsc_nest", "hgsc_stromal_he"}
    for src in sources - {"cmu", "histolytics"}:
        assert {r.split for r in rows if r.source == src} >= {"train", "test"}, src
    assert {r.label for r in rows if r.source.startswith("kather")} == {
        "TUMOR", "STROMA", "COMPLEX", "LYMPHO", "DEBRIS", "MUCOSA", "ADIPOSE", "EMPTY"}
    n_mon = [r for r in rows if r.source == "monuseg"]
    assert len(n_mon) == 30 and all(r.mpp == 0.2527 for r in n_mon)


def test_tables_are_labelled_at_one_scale_and_never_share_an_image(data_dir, tmp_path):
    tables = build_split_tables(DEFAULT_SPLIT_FILE, tmp_path, mpp=0.5, size=128, train_overlap=64, progress=False)
    assert set(tables) == {"train", "val", "test"}
    groups = {}
    for split, path in tables.items():
        labels = read_tile_labels(path)
        ds = PatchDataset(path)
        assert len(ds) == len(labels) > 100
        assert ds[0]["image"].shape == (3, 128, 128) and ds.tiles[0].mpp == 0.5
        groups[split] = {lab["group"] for lab in labels}
    region_split = {"cmu-1", "hgsc_nest", "hgsc_stromal_he"}
    assert not (groups["train"] & groups["test"]) - region_split
    assert not (groups["train"] & groups["val"]) - region_split
    # the region-split slide: training tiles stay left of the validation band, test tiles right of it
    train_x = [t.x for t, lab in zip(PatchDataset(tables["train"]).tiles, read_tile_labels(tables["train"]), strict=True)
               if lab["group"] == "cmu-1"]
    test_x = [t.x for t, lab in zip(PatchDataset(tables["test"]).tiles, read_tile_labels(tables["test"]), strict=True)
              if lab["group"] == "cmu-1"]
    assert test_x and max(train_x) + 128 <= 0.6 * 2220 + 1 and min(test_x) >= 0.75 * 2220 - 1


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "source", "label", "group", "mpp", "split", "roi", "min_tissue"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_bad_split_files_are_named(cmu, tmp_path):
    row = dict(path=str(cmu), source="cmu", label="", group="s", mpp="", split="train", roi="", min_tissue="0.5")
    with pytest.raises(SynthgenError, match="line 2: split: 'training'"):
        read_split_file(_write(tmp_path / "a.csv", [{**row, "split": "training"}]))
    with pytest.raises(SynthgenError, match="line 3: path: .*nope.png does not exist"):
        read_split_file(_write(tmp_path / "b.csv", [row, {**row, "path": "nope.png"}]))
    with pytest.raises(SynthgenError, match="group 's' is in both train and test"):
        read_split_file(_write(tmp_path / "c.csv", [{**row, "roi": "0 0 0.6 1"}, {**row, "split": "test", "roi": "0.5 0 1 1"}]))
    read_split_file(_write(tmp_path / "d.csv", [{**row, "roi": "0 0 0.6 1"}, {**row, "split": "test", "roi": "0.6 0 1 1"}]))
    with pytest.raises(SynthgenError, match="mpp: must be a positive"):
        read_split_file(_write(tmp_path / "e.csv", [{**row, "mpp": "-1"}]))
    with pytest.raises(SynthgenError, match="lacks column"):
        (tmp_path / "f.csv").write_text("path,split\nx,train\n")
        read_split_file(tmp_path / "f.csv")


def test_splits_cli(cmu, tmp_path, capsys):
    from synthgen.cli import main

    row = dict(path=str(cmu), source="cmu", label="", group="s", mpp="", split="train", roi="0 0 0.6 1",
               min_tissue="0.5")
    f = _write(tmp_path / "s.csv", [row, {**row, "split": "test", "roi": "0.6 0 1 1"}])
    main(["splits", str(f), "-o", str(tmp_path / "t"), "--mpp", "1.0", "--size", "64"])
    out = capsys.readouterr().out
    assert "train:" in out and "test:" in out and (tmp_path / "t" / "test.csv").exists()
    with pytest.raises(SystemExit) as e:
        main(["splits", str(tmp_path / "missing.csv"), "-o", str(tmp_path / "u")])
    assert e.value.code == 1 and "missing.csv: no such split file" in capsys.readouterr().err


def test_cache_cli_keeps_class_and_source_of_a_labelled_table(data_dir, tmp_path):
    import json

    from safetensors.torch import load_file

    from synthgen.cli import main
    from synthgen.models.vae import VAE

    tables = build_split_tables(DEFAULT_SPLIT_FILE, tmp_path / "t", mpp=0.5, size=128, progress=False)
    VAE.from_preset("tiny").save_pretrained(tmp_path / "vae")
    main(["cache", str(tables["test"]), "-o", str(tmp_path / "c"), "-e", f"latents=vae:{tmp_path / 'vae'}",
          "--crop", "64", "--crop-stride", "64"])
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert "TUMOR" in config["classes"] and "monuseg" in config["sources"]
    shard = load_file(sorted((tmp_path / "c").glob("shard-*.safetensors"))[0])
    labels, rows = shard["label"], read_tile_labels(tables["test"])
    first = rows[0]  # 4 crops per 128 px tile, in table order
    expect = config["classes"].index(first["label"]) if first["label"] else -1
    assert labels[:4].tolist() == [expect] * 4
    assert shard["source"][:4].tolist() == [config["sources"].index(first["source"])] * 4


def _write_masked(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "source", "label", "group", "mpp", "split", "roi", "min_tissue", "mask"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_mask_column_gives_tiles_their_label_map_at_the_tile_scale(tmp_path):
    import numpy as np
    from PIL import Image

    from synthgen.data.masks import write_label_map

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 200, (160, 240, 3), dtype=np.uint8)).save(tmp_path / "im.png")
    Image.fromarray(rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "plain.png")
    yy, xx = np.mgrid[:160, :240]
    labels = (yy // 10) * 24 + xx // 10 + 1  # a 10 px block code: where each tile pixel came from
    write_label_map(tmp_path / "im_mask.png", labels)
    row = dict(path="im.png", source="a", label="", group="g", mpp="0.25", split="train", roi="", min_tissue="0",
               mask="im_mask.png")
    other = dict(row, path="plain.png", group="h", split="test", mask="")
    f = _write_masked(tmp_path / "s.csv", [row, other])
    tables = build_split_tables(f, tmp_path / "t", mpp=0.5, size=32, progress=False)
    mixed = PatchDataset(tables["train"])
    assert "mask" in mixed[0] and "mask" not in PatchDataset(tables["test"])[0]  # only tables whose images all have one
    tables = build_split_tables(f, tmp_path / "m", mpp=0.5, size=32, masked_only=True, progress=False)
    assert set(tables) == {"train"}  # the unmasked test image is dropped
    ds = PatchDataset(tables["train"])
    assert len(ds) == 6  # 120 x 80 px at 0.5 um/px: 3 x 2 tiles of 32 px
    for i in (0, len(ds) - 1):
        t, m = ds.tiles[i], ds[i]["mask"].numpy()
        assert m.shape == (32, 32)
        # output pixel (r, c) samples level-0 pixel (y + 2r + 1, x + 2c + 1): exact labels, never blended
        expect = labels[int(t.y) + 1:int(t.y) + 64:2, int(t.x) + 1:int(t.x) + 64:2]
        np.testing.assert_array_equal(m, expect)
    with pytest.raises(SynthgenError, match="line 2: mask: .*gone.png does not exist"):
        read_split_file(_write_masked(tmp_path / "b.csv", [dict(row, mask="gone.png")]))
    with pytest.raises(SynthgenError, match="no row has a mask"):
        build_split_tables(_write_masked(tmp_path / "c.csv", [other]), tmp_path / "n", masked_only=True, progress=False)


def test_expert_nuclei_masks_sit_on_dark_nuclei(data_dir, tmp_path):
    """MoNuSeg/CoNSeP tiles of the default definition carry their expert instance maps, aligned:
    masked pixels are much darker than the rest (a transposed or shifted map would not be)."""
    tables = build_split_tables(DEFAULT_SPLIT_FILE, tmp_path, mpp=0.5, size=128, masked_only=True, progress=False)
    ds = PatchDataset(tables["test"])
    assert {r["source"] for r in read_tile_labels(tables["test"])} == {"monuseg", "consep"}
    gaps = []
    for i in range(0, len(ds), max(1, len(ds) // 12)):
        item = ds[i]
        grey, fg = item["image"].float().mean(0), item["mask"] > 0
        if 0.05 < fg.float().mean() < 0.9:
            gaps.append(float(grey[~fg].mean() - grey[fg].mean()))
    assert len(gaps) >= 8 and min(gaps) > 15, gaps
