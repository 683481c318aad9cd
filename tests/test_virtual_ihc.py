"""Virtual IHC: the stain translator on real paired tiles, the stain pipeline and its CLI."""

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image
from tiny_encoders import color_tokens

from synthgen.config import ConfigError, load_train_config
from synthgen.data.cache import build_cache
from synthgen.data.datasets import ImageListDataset
from synthgen.errors import StainError
from synthgen.training.trainer import train


def _deepliif_pairs(data_dir, root, rows, stride=8):
    """Hematoxylin (A) / Ki67 IHC (B) crops of the pixel-registered DeepLIIF strips, 32 px at ~2 um/px,
    from panel rows ``rows`` (a range of crop tops) of both strips."""
    for side in "AB":
        (root / side).mkdir(parents=True, exist_ok=True)
    for name in ("Bladder1", "Lung1"):
        im = Image.open(data_dir / "stains" / "deepliif" / f"{name}.png").convert("RGB")
        ihc = np.asarray(im.crop((0, 0, 512, 512)).resize((128, 128), Image.BOX))
        hem = np.asarray(im.crop((512, 0, 1024, 512)).resize((128, 128), Image.BOX))
        for y in rows:
            for x in range(0, 97, stride):
                Image.fromarray(hem[y:y + 32, x:x + 32]).save(root / "A" / f"{name}_{y:03d}_{x:03d}.png")
                Image.fromarray(ihc[y:y + 32, x:x + 32]).save(root / "B" / f"{name}_{y:03d}_{x:03d}.png")
    return root


@pytest.fixture(scope="module")
def caches(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ihc")
    out = {}
    # held out: the bottom rows of both fields (crops that do not overlap the training crops)
    for split, rows in (("train", range(0, 57, 8)), ("test", range(64, 97, 16))):
        pairs = _deepliif_pairs(data_dir, root / split, rows)
        for side in "AB":
            build_cache(ImageListDataset.from_folder(pairs / side), root / f"{split}{side}",
                        {"emb": color_tokens()}, progress=False)
            out[f"{split}{side}"] = root / f"{split}{side}"
    return out


def _cfg(caches, out, **over):
    data = {"task": "translator", "output_dir": str(out), "steps": 300, "seed": 0,
            "model": {"overrides": {"class_names": ["Ki-67"], "width": 64, "depth": 2}},
            "data": {"cache": str(caches["trainA"]), "target_cache": str(caches["trainB"]), "num_workers": 0},
            "optim": {"lr": 3e-3, "batch_size": 64}, "ema_decay": 0.0, "log_every": 50, "checkpoint_every": 300}
    data.update(over)
    return load_train_config(None, data)


def test_translator_beats_the_identity_baseline_on_held_out_pairs(caches, tmp_path):
    """The translator maps held-out hematoxylin embeddings closer to their true Ki67 IHC embeddings
    than the identity baseline (the source embedding used as the IHC one) does."""
    from synthgen.data.cache import CacheDataset
    from synthgen.models.stain import StainTranslator

    train(_cfg(caches, tmp_path / "tr"), progress=False)
    tr = StainTranslator.from_pretrained(tmp_path / "tr" / "model")
    assert tr.config.class_names == ["ki67"]
    src = torch.stack([it["emb"] for it in CacheDataset(caches["testA"])])
    tgt = torch.stack([it["emb"] for it in CacheDataset(caches["testB"])])
    # the translator is generative: its expected translation (mean of 8 samples) is what is compared
    pred = torch.stack([tr.translate(src, "ki67", generator=torch.Generator().manual_seed(s)) for s in range(8)]).mean(0)
    err_identity = (src - tgt).pow(2).mean().item()
    err_translator = (pred - tgt).pow(2).mean().item()
    # measured: 0.78 x the identity's error (an oracle shifting by the mean training difference: 0.68 x)
    assert err_translator < 0.9 * err_identity, (err_translator, err_identity)
    with pytest.raises(ValueError, match="not trained for 'her2'"):
        tr.translate(src, "HER2")
    with pytest.raises(StainError, match="unknown stain 'blue'"):
        tr.translate(src, "blue")


def test_translator_config_errors(caches, tmp_path):
    with pytest.raises(ConfigError, match="target_cache"):
        train(_cfg(caches, tmp_path / "a", data={"cache": str(caches["trainA"]), "num_workers": 0}), progress=False)
    with pytest.raises(ConfigError, match="same pairs in the same order"):
        train(_cfg(caches, tmp_path / "b", data={"cache": str(caches["trainA"]), "target_cache": str(caches["testB"]),
                                                 "num_workers": 0}), progress=False)
    with pytest.raises(ConfigError, match="unknown stain 'dab-ish'"):
        train(_cfg(caches, tmp_path / "c", model={"overrides": {"class_names": ["dab-ish"]}}), progress=False)


def test_stain_pipeline_and_cli(tmp_path, data_dir):
    """A pipeline folder with stains/ki67 (translator + LoRA adapter) translates a folder of tiles."""
    import json

    from safetensors.torch import save_file

    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.denoiser import Denoiser
    from synthgen.models.presets import denoiser_config, encoder_config
    from synthgen.models.stain import StainTranslator
    from synthgen.models.vae import VAE
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.stain import load_stain, virtual_stain
    from synthgen.sampling import make_scheduler

    torch.manual_seed(0)
    p = SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                      make_scheduler("epsilon"), image_encoder=SSLEncoder(**encoder_config("tiny")).eval())
    folder = tmp_path / "pipe"
    p.save_pretrained(folder)
    runs = tmp_path / "runs"  # the model folders of three training runs, installed with `synthgen add-stain`
    StainTranslator(dim=32, num_classes=1, width=32, depth=1, class_names=["ki67"]).save_pretrained(runs / "translator")
    lora = runs / "lora"
    lora.mkdir()
    w = p.transformer.transformer_blocks[0].attn1.to_q.weight
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, w.shape[1]),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(w.shape[0], 2)}, str(lora / "lora_adapter.safetensors"))
    (lora / "lora_config.json").write_text(json.dumps({"rank": 2, "alpha": 1, "target_modules": ["to_q"]}))
    ihc_vae = VAE.from_preset("tiny").model
    ihc_vae.save_pretrained(runs / "vae")  # a stain's own decoder
    add = ["add-stain", str(folder), "--translator", str(runs / "translator"), "--lora", str(lora), "--vae", str(runs / "vae")]
    run_cli(add + ["--to", "Ki-67"])
    assert sorted(q.name for q in (folder / "stains" / "ki67").iterdir()) == ["lora", "translator", "vae"]
    from synthgen.pipelines.stain import install_stain

    with pytest.raises(StainError, match="exists"):
        install_stain(folder, "ki67", runs / "translator", lora=lora)
    with pytest.raises(StainError, match="not trained for 'her2'"):
        install_stain(folder, "her2", runs / "translator", lora=lora)
    with pytest.raises(StainError, match="give the IHC denoiser"):
        install_stain(folder, "ki67", runs / "translator", overwrite=True)
    p.transformer.save_pretrained(runs / "plain")  # an embedding-route fine-tune goes alone, not beside an adapter
    with pytest.raises(StainError, match="must be a spatial translator"):
        install_stain(folder, "ki67", runs / "translator", lora=lora, transformer=runs / "plain", overwrite=True)
    bad = tmp_path / "bad_lora"
    bad.mkdir()
    save_file({"nope.lora_A.weight": torch.ones(2, 2), "nope.lora_B.weight": torch.ones(2, 2)},
              str(bad / "lora_adapter.safetensors"))
    (bad / "lora_config.json").write_text(json.dumps({"rank": 2, "alpha": 1}))
    with pytest.raises(StainError, match="does not have"):  # checked before the installed stain is touched
        install_stain(folder, "ki67", runs / "translator", lora=bad, overwrite=True)
    assert (folder / "stains" / "ki67" / "lora" / "lora_adapter.safetensors").exists()
    assert sorted(q.name for q in (folder / "stains").iterdir()) == ["ki67"]  # no temporary folder left
    install_stain(folder, "ki67", runs / "translator", lora=lora, vae=runs / "vae", overwrite=True)
    assert sorted(q.name for q in (folder / "stains").iterdir()) == ["ki67"]  # replaced, old copy gone
    ihc, tr = load_stain(folder, "Ki-67")
    assert torch.equal(ihc.vae.decoder.conv_out.weight, ihc_vae.decoder.conv_out.weight)
    q = ihc.transformer.transformer_blocks[0].attn1.to_q.weight
    torch.testing.assert_close(q, w + 0.5 * 2)  # alpha / rank * B A, with B A = 2 everywhere
    tiles = np.asarray(Image.open(data_dir / "stains" / "deepliif" / "Lung1.png").convert("RGB"))[:32, 512:544]
    out = virtual_stain(ihc, tr, np.stack([tiles, tiles[::-1]]), "ki67", num_inference_steps=2)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    with pytest.raises(StainError, match="32x32"):
        virtual_stain(ihc, tr, np.zeros((1, 64, 64, 3), np.uint8), "ki67")
    with pytest.raises(StainError, match="mask branch"):
        virtual_stain(ihc, tr, tiles[None], "ki67", structure=True)
    with pytest.raises(StainError, match="this pipeline has: ki67"):
        load_stain(folder, "her2")
    (tmp_path / "he").mkdir()
    Image.fromarray(tiles).save(tmp_path / "he" / "a.png")
    run_cli(["stain", str(tmp_path / "he"), "--to", "ki67", "--pipeline", str(folder), "-o", str(tmp_path / "v"),
             "--steps", "2"])
    assert Image.open(tmp_path / "v" / "a.png").size == (32, 32)
    ihc_tile = np.asarray(Image.open(data_dir / "stains" / "deepliif" / "Lung1.png").convert("RGB"))[:32, :32]
    (tmp_path / "real").mkdir()
    Image.fromarray(ihc_tile).save(tmp_path / "real" / "a.png")
    Image.fromarray(ihc_tile[::-1]).save(tmp_path / "real" / "b.png")
    with pytest.raises(SystemExit) as e:  # b.png has no virtual tile: refused by name
        from synthgen.cli import main

        main(["eval", "stain", str(tmp_path / "real"), str(tmp_path / "v")])
    assert e.value.code == 2
    (tmp_path / "real" / "b.png").unlink()
    run_cli(["eval", "stain", str(tmp_path / "real"), str(tmp_path / "v"), "--json", str(tmp_path / "s.json")])
    rep = json.loads((tmp_path / "s.json").read_text())
    assert rep["n"] == 1 and 0 <= rep["dab"]["real_mean"] <= 1
    # a slide region, window by window, into a pyramidal TIFF
    slide = data_dir / "slides" / "CMU-1-Small-Region.svs"
    run_cli(["stain", str(slide), "--to", "ki67", "--pipeline", str(folder), "-o", str(tmp_path / "r.tif"),
             "--x", "800", "--y", "1200", "--size", "64", "--steps", "2"])
    assert Image.open(tmp_path / "r.png").size == (64, 64) and (tmp_path / "r.tif").exists()


def test_shipped_panck_translator_beats_identity_in_dab_correlation(data_dir):
    """The shipped virtual-PanCytokeratin model (trained on the ANHIR rat-kidney pairs outside the
    band 0.4-0.6 of the width) on held-out pairs of that band: the DAB-positive area of its virtual
    IHC follows the real IHC's from patch to patch; the identity baseline (the H&E embedding decoded
    as IHC) does not (benchmarks/virtual_stain.py, 32 pairs, 8 steps)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.virtual_stain import run

    res = run("panck", steps=8, limit=32, routes=("identity", "translator"))["routes"]
    tr, ident = res["translator"], res["identity"]
    # measured: Pearson 0.84 vs -0.35 (106 pairs, 20 steps: 0.87 vs -0.47; real-embedding ceiling 0.85)
    assert tr["dab_pearson"] > 0.6 and tr["dab_pearson"] > ident["dab_pearson"] + 0.5, res
    assert tr["dab_spearman"] > ident["dab_spearman"] + 0.3, res
    assert abs(tr["dab_virtual_mean"] - tr["dab_real_mean"]) < 0.05, res  # about the right amount of DAB


def test_keep_glass_keeps_the_sources_glass_and_leaves_tissue_alone(data_dir):
    """Slide regions: the translator only knows tissue, so glass in the source stays glass."""
    from synthgen.data.slides import Slide
    from synthgen.pipelines.stain import keep_glass

    with Slide(data_dir / "slides" / "CMU-1-Small-Region.svs") as s:
        region = s.read(0, 0, 192, 5.0)  # the top-left corner: skin with glass around it
    from synthgen.data.pairs import GLASS_OD
    from synthgen.data.registration import optical_density

    glass = optical_density(region) < GLASS_OD
    assert 0.3 < glass.mean() < 0.9
    rng = np.random.default_rng(0)
    virtual = rng.integers(60, 200, region.shape, dtype=np.uint8)
    out = keep_glass(region, virtual)
    from scipy.ndimage import binary_erosion

    deep_glass, deep_tissue = binary_erosion(glass, iterations=6), binary_erosion(~glass, iterations=6)
    colour = np.median(region[glass], axis=0)
    assert np.abs(out[deep_glass].astype(float) - colour).max() <= 1  # glass: the source's glass colour
    np.testing.assert_array_equal(out[deep_tissue], virtual[deep_tissue])  # tissue: untouched
    tissue_only = np.full_like(region, (170, 90, 150))
    np.testing.assert_array_equal(keep_glass(tissue_only, virtual), virtual)
    with pytest.raises(StainError, match="differ in size"):
        keep_glass(region, virtual[:10])
