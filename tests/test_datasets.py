import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from synthgen.data.datasets import ImageListDataset, PatchDataset
from synthgen.data.masks import check_mask, load_geojson, read_label_map
from synthgen.data.slides import Slide
from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table
from synthgen.errors import MaskError, SynthgenError


@pytest.fixture(scope="module")
def cmu_table(cmu, tmp_path_factory):
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=1.0, size=64), key="cmu")
    path = tmp_path_factory.mktemp("tiles") / "tiles.csv"
    write_tile_table(tiles, path, {"cmu": {"path": str(cmu), "mpp": 0.499}})
    return path, tiles


def test_patch_dataset_reads_table(cmu, cmu_table):
    path, tiles = cmu_table
    ds = PatchDataset(path)
    assert len(ds) == len(tiles) > 50
    item = ds[3]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
    with Slide(cmu) as s:
        t = tiles[3]
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), s.read(t.x, t.y, 64, 1.0))


def test_patch_dataset_workers_match_single_process(cmu_table):
    path, _ = cmu_table
    ds = PatchDataset(path)
    single = torch.cat([b["image"] for b in DataLoader(ds, batch_size=16)])
    multi = torch.cat([b["image"] for b in DataLoader(ds, batch_size=16, num_workers=2)])
    assert torch.equal(single, multi)
    assert ds._handles  # the main process opened its own handle...
    assert pickle.loads(pickle.dumps(ds))._handles == {}  # ...which never travels to a worker


def test_patch_dataset_missing_slide_key(cmu_table):
    path, tiles = cmu_table
    with pytest.raises(SynthgenError, match="no slide file given for slide key.*cmu"):
        PatchDataset(tiles, slides={"other": "x.svs"})


def _square(x, y, s, name="Tumor"):
    ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": [200, 0, 0]}}}


def test_geojson_rasterized_at_patch_mpp(cmu, cmu_table, tmp_path):
    path, tiles = cmu_table
    t = tiles[0]
    # a 100x100 level-0 px square at the tile's top-left, and a stroma square with a hole further on
    outer = _square(t.x + 50, t.y + 50, 60, "Stroma")
    outer["geometry"]["coordinates"].append([[t.x + 70, t.y + 70], [t.x + 90, t.y + 70], [t.x + 90, t.y + 90],
                                             [t.x + 70, t.y + 90], [t.x + 70, t.y + 70]])
    gj = {"type": "FeatureCollection", "features": [_square(t.x, t.y, 20), outer,
                                                     {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}}]}
    ann = tmp_path / "ann.geojson"
    ann.write_text(json.dumps(gj))
    ds = PatchDataset(path, annotations={"cmu": ann}, classes={"Tumor": 1, "Stroma": 2})
    mask = ds[0]["mask"].numpy()
    assert mask.shape == (64, 64)
    scale = 1.0 / 0.499  # level-0 px per patch px
    # the tumour square spans 20 level-0 px = ~10 patch px
    assert mask[5, 5] == 1 and mask[12, 12] == 0
    assert (mask == 1).sum() == pytest.approx((20 / scale) ** 2, rel=0.35)
    # stroma square from ~25 to ~55 px, hole from ~35 to ~45 px
    assert mask[28, 28] == 2 and mask[40, 40] == 0 and mask[52, 52] == 2
    inst = PatchDataset(path, annotations={"cmu": ann}, instance_masks=True)[0]["mask"].numpy()
    assert set(np.unique(inst)) == {0, 1, 2}


def test_geojson_errors(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(MaskError, match=r"bad\.geojson: not valid JSON"):
        load_geojson(bad)
    nogeom = tmp_path / "nogeom.geojson"
    nogeom.write_text(json.dumps([{"type": "Feature", "properties": {}}]))
    with pytest.raises(MaskError, match="feature 0 has no geometry"):
        load_geojson(nogeom)
    with pytest.raises(MaskError, match="no such GeoJSON"):
        load_geojson(tmp_path / "nope.geojson")


def test_image_folder_kather(kather):
    ds = ImageListDataset.from_folder(kather, size=128)
    assert ds.classes == sorted(p.name for p in kather.iterdir())
    assert len(ds) == 24
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["label"] == 0
    labels = [ds[i]["label"] for i in range(len(ds))]
    assert np.bincount(labels).tolist() == [3] * 8


def test_csv_dataset_with_masks(tmp_path, kather):
    img = np.asarray(Image.open(next((kather / "01_TUMOR").iterdir())).convert("RGB"))
    Image.fromarray(img).save(tmp_path / "a.png")
    mask = np.zeros(img.shape[:2], np.uint8)
    mask[10:40, 20:60] = 3
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    Image.fromarray(mask[:100]).save(tmp_path / "short_mask.png")
    (tmp_path / "list.csv").write_text("path,label,mask\na.png,tumor,a_mask.png\n")
    ds = ImageListDataset.from_csv(tmp_path / "list.csv")
    item = ds[0]
    assert ds.classes == ["tumor"] and item["label"] == 0
    assert item["mask"].shape == (150, 150) and int(item["mask"][20, 30]) == 3
    (tmp_path / "bad.csv").write_text("path,mask\na.png,short_mask.png\n")
    with pytest.raises(MaskError, match=r"short_mask\.png: mask is 150x100 px but its image is 150x150 px"):
        ImageListDataset.from_csv(tmp_path / "bad.csv")[0]
    (tmp_path / "nopath.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(SynthgenError, match="needs a 'path' column"):
        ImageListDataset.from_csv(tmp_path / "nopath.csv")


def test_folder_masks_and_label_map_checks(tmp_path):
    (tmp_path / "img" / "x").mkdir(parents=True)
    (tmp_path / "msk" / "x").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / "x" / "p.png")
    Image.fromarray(np.ones((32, 32), np.uint16) * 300).save(tmp_path / "msk" / "x" / "p.png")
    ds = ImageListDataset.from_folder(tmp_path / "img", masks=tmp_path / "msk")
    assert int(ds[0]["mask"][0, 0]) == 300  # 16-bit instance ids survive
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MaskError, match="colour"):
        read_label_map(tmp_path / "rgb.png")
    with pytest.raises(MaskError, match="mask is 32x32 px but its patch is 64x64 px"):
        read_label_map(tmp_path / "msk" / "x" / "p.png", size=(64, 64))
    with pytest.raises(MaskError, match="integers"):
        check_mask(np.zeros((4, 4), np.float32), (4, 4))
    with pytest.raises(MaskError, match="no mask for image"):
        ImageListDataset.from_folder(tmp_path / "img", masks=tmp_path / "nowhere")
