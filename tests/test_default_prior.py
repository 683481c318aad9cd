"""The labelled embedding bank and embedding prior shipped with the default pipeline, the tools
that build the bank (resampling to the model's scale, crops and dihedral views, class names in the
cache) and the CLI defaults that use them."""

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from synthgen.cli import main
from synthgen.data.cache import CacheDataset, build_cache
from synthgen.data.datasets import CropViews, ImageListDataset
from synthgen.models.prior import EmbeddingPrior
from synthgen.pipelines.rare import ClassFilter
from synthgen.workflows.generate import embedding_bank

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "synthgen-small-cmu"
CLASSES = ["ADIPOSE", "COMPLEX", "DEBRIS", "EMPTY", "LYMPHO", "MUCOSA", "STROMA", "TUMOR"]


@pytest.fixture(scope="module")
def shipped():
    embs, labels, names = embedding_bank(CKPT / "bank", "emb")
    return embs, labels, names, EmbeddingPrior.from_pretrained(CKPT / "prior")


def test_resample_to_mpp_crops_and_dihedral_views(kather):
    tile = sorted((kather / "01_TUMOR").iterdir())[0]
    ds = ImageListDataset([tile], [7], image_mpp=0.495, mpp=1.0)
    assert ds[0]["image"].shape == (3, 74, 74)  # 150 px at 0.495 um/px = 74.25 um
    views = CropViews(ds, 64, stride=5, dihedral=True)
    assert len(views) == 9 * 8 and views.offsets[-1] == (10, 10)
    base, item = views[0]["image"], views[8 * 4 + 5]  # crop 4 (offset 5, 5), view 5: rot90 then mirror
    assert torch.equal(item["image"], torch.rot90(ds[0]["image"][:, 5:69, 5:69], 1, (-2, -1)).flip(-1))
    assert item["label"] == 7 and item["source"] == 0 and item["index"] == 37
    assert len({tuple(views[v]["image"].flatten()[:64].tolist()) for v in range(8)}) == 8  # 8 distinct views
    assert torch.equal(base, ds[0]["image"][:, :64, :64])
    with pytest.raises(Exception, match="does not fit"):
        CropViews(ds, 80)
    with pytest.raises(Exception, match="image_mpp and mpp together"):
        ImageListDataset([tile], image_mpp=0.5)


def test_cache_keeps_class_names(kather, tmp_path):
    from tiny_encoders import color_tokens

    ds = ImageListDataset.from_folder(kather, size=32)
    build_cache(ds, tmp_path / "c", {"emb": color_tokens()}, classes=ds.classes, progress=False)
    assert CacheDataset(tmp_path / "c").classes == ds.classes == sorted(p.name for p in kather.iterdir())


def test_shipped_bank_and_prior_load_and_match(shipped, kather):
    from synthgen.encoders.ssl import SSLEncoder

    embs, labels, names, prior = shipped
    CacheDataset(CKPT / "bank").verify()
    assert names == CLASSES and prior.config.class_names == CLASSES and prior.config.num_classes == 8
    assert embs.shape == (1728, 1, 128) and torch.isfinite(embs).all()
    assert torch.bincount(labels).tolist() == [216] * 8
    # the bank was made by the shipped encoder: its first item is the first TUMOR tile's first crop
    enc = SSLEncoder.from_pretrained(CKPT / "image_encoder").eval()
    tile = sorted((kather / "01_TUMOR").iterdir())[0]
    item = CropViews(ImageListDataset([tile], [7], image_mpp=0.495, mpp=1.0), 64, 5, dihedral=True)[0]
    with torch.no_grad():
        torch.testing.assert_close(enc(item["image"][None])[0], embs[0], atol=1e-4, rtol=1e-4)
    assert labels[0] == CLASSES.index("TUMOR")


def test_shipped_prior_samples_are_nearest_their_own_class(shipped):
    """The statistic of tests/test_rare.py on the shipped prior and bank (SSL embeddings)."""
    embs, labels, _, prior = shipped
    sl = torch.arange(8).repeat_interleave(100)
    samples = prior.sample(sl, generator=torch.Generator().manual_seed(1))

    def energy(a, b):  # energy distance (Szekely & Rizzo)
        a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        return 2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()

    for c in range(8):
        d = torch.stack([energy(embs[labels == c], samples[sl == k]) for k in range(8)])
        assert int(d.argmin()) == c, (CLASSES[c], d)
    f = ClassFilter(embs, labels)
    real_acc = (f.predict(embs) == labels).float().mean()
    assert (f.predict(samples) == sl).float().mean() >= real_acc - 0.1


def test_cli_prior_mode_from_the_default_pipeline(tmp_path):
    out = tmp_path / "p"
    run_cli(["generate", str(CKPT), "-o", str(out), "-n", "3", "--mode", "prior", "--class", "TUMOR",
             "--steps", "2", "--filter"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["mode"] == "prior" and m["class"] == 7 and m["class_name"] == "TUMOR" and m["num_items"] == 3
    assert [it["label"] for it in m["items"]] == [7] * 3 and all(isinstance(it["accepted"], bool) for it in m["items"])
    assert len(list((out / "images").glob("*.png"))) == 3 and 0 <= m["acceptance_rate"] <= 1


def test_cli_class_variations_from_the_shipped_bank(tmp_path):
    """Class-wise variations and interpolation with no --cache: the pipeline's bank, by id or name."""
    run_cli(["generate", str(CKPT), "-o", str(tmp_path / "v"), "-n", "2", "--class", "4", "--steps", "2"])
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert m["mode"] == "variations" and m["class_name"] == "LYMPHO"
    run_cli(["generate", str(CKPT), "-o", str(tmp_path / "i"), "-n", "2", "--class", "lympho", "--mode",
             "interpolation", "--steps", "2"])
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["class"] == 4


@pytest.mark.parametrize("cls, msg", [("KIDNEY", "unknown class"), ("8", "no such class id")])
def test_cli_unknown_class_is_a_clear_error(tmp_path, capsys, cls, msg):
    with pytest.raises(SystemExit) as e:
        main(["generate", str(CKPT), "-o", str(tmp_path / "x"), "-n", "2", "--mode", "prior", "--class", cls])
    err = capsys.readouterr().err
    assert e.value.code == 1 and msg in err and "7 TUMOR" in err
    assert not (tmp_path / "x").exists()
