"""Spatial virtual staining (issue 18): a denoiser that sees the source tile, its training task,
two-way guidance, the pair split file and the structure score."""

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from PIL import Image

from synthgen.config import ConfigError, load_train_config
from synthgen.errors import StainError
from synthgen.models.denoiser import Denoiser

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "checkpoints" / "synthgen-small-cmu"


@pytest.fixture(scope="module")
def base() -> Denoiser:
    return Denoiser.from_pretrained(CKPT, subfolder="transformer").eval()


def _perturbed(base: Denoiser, seed: int = 0) -> Denoiser:
    """The adapted model with random (not zero) source weights, so that the source matters."""
    net = Denoiser.with_source_channels(base).eval()
    w = net.pos_embed.proj.weight
    with torch.no_grad():
        w[:, 4:] = torch.randn(w[:, 4:].shape, generator=torch.Generator().manual_seed(seed)) * w[:, :4].std()
    return net


def test_source_channels_start_as_the_base_model(base, tmp_path):
    net = Denoiser.with_source_channels(base).eval()
    assert (net.config.in_channels, net.config.source_channels, net.config.out_channels) == (4, 4, 4)
    g = torch.Generator().manual_seed(0)
    x, src = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    emb, t = torch.randn(3, 1, 128, generator=g), torch.tensor([999, 500, 10])
    with torch.no_grad():
        want = base(x, t, embeddings=emb).sample
        torch.testing.assert_close(net(x, t, embeddings=emb, source_latents=src).sample, want, rtol=0, atol=0)
    net.save_pretrained(tmp_path / "m")
    again = Denoiser.from_pretrained(tmp_path / "m")
    assert (again.config.in_channels, again.config.source_channels) == (4, 4)
    assert again.pos_embed.proj.weight.shape[1] == 8
    with pytest.raises(ValueError, match="pass source_latents"):
        net(x, t, embeddings=emb)
    with pytest.raises(ValueError, match="source_latents must have shape"):
        net(x, t, embeddings=emb, source_latents=src[:, :3])
    with pytest.raises(ValueError, match="no source channels"):
        base(x, t, embeddings=emb, source_latents=src)
    with pytest.raises(ValueError, match="source channels already"):
        Denoiser.with_source_channels(net)
    null = net.null_conditions(3)["source_latents"]  # zeros, as in InstructPix2Pix
    assert null.shape == (3, 4, 1, 1) and not null.any()


def test_image_guidance_is_separate_from_embedding_guidance(base):
    """Image guidance 1 is plain guidance on the embedding with the source in both passes; another
    image scale changes the result; the sampler is deterministic per generator."""
    from synthgen.sampling import make_scheduler, sample_latents

    net = _perturbed(base)
    g = torch.Generator().manual_seed(1)
    conds = {"embeddings": torch.randn(2, 1, 128, generator=g), "source_latents": torch.randn(2, 4, 16, 16, generator=g)}

    def run(**kw):
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return sample_latents(net, make_scheduler("epsilon"), conds, gens, num_steps=4, guidance_scale=2.0, **kw)

    plain = run(guide={"embeddings"})
    once = run(image_guidance_scale=1.0)
    torch.testing.assert_close(run(image_guidance_scale=1.0), once, rtol=0, atol=0)
    # equal up to the batch's summation order (3 passes against 2: the GEMM blocking differs; seen 2e-4)
    torch.testing.assert_close(once, plain, rtol=1e-4, atol=1e-3)
    assert (run(image_guidance_scale=2.0) - plain).abs().mean() > 1e-3
    joint = run()  # no image scale: plain guidance with every condition, the source included, nulled together
    assert (joint - plain).abs().mean() > 1e-3


def test_spatial_pipeline_needs_sources_and_is_deterministic_per_seed(base, data_dir):
    from synthgen.pipelines.generate import SynthPipeline

    pipe = SynthPipeline.from_pretrained(CKPT)
    pipe.set_progress_bar_config(disable=True)
    spatial = SynthPipeline(_perturbed(base), pipe.vae, pipe.scheduler, image_encoder=pipe.image_encoder)
    spatial.set_progress_bar_config(disable=True)
    strip = np.asarray(Image.open(data_dir / "stains" / "deepliif" / "Lung1.png").convert("RGB"))
    src = np.stack([strip[k * 64 : k * 64 + 64, 512 + k * 64 : 576 + k * 64] for k in range(3)])
    kw = {"images": src, "source_images": src, "num_inference_steps": 3, "output_type": "np"}
    a = spatial(seeds=[5, 6, 7], **kw).images
    np.testing.assert_array_equal(a, spatial(seeds=[5, 6, 7], **kw).images)
    # in a batch of 2 the same items: equal but for float rounding of batch-size-dependent CPU kernels
    # (on an AVX2-only CPU 2 of 24576 values differed by 1 grey level)
    alone = spatial(seeds=[6, 7], images=src[1:], source_images=src[1:], num_inference_steps=3, output_type="np").images
    diff = np.abs(a[1:].astype(int) - alone.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), (diff > 0).mean())
    assert np.abs(a.astype(float) - spatial(seeds=[8, 9, 10], **kw).images).mean() > 1
    with pytest.raises(ValueError, match="pass source_images"):
        spatial(images=src, num_inference_steps=2)
    with pytest.raises(ValueError, match="source_images must be 64 px"):
        spatial(images=src, source_images=src[:, :32, :32], num_inference_steps=2)
    with pytest.raises(ValueError, match="needs a transformer with source channels"):
        pipe(images=src, source_images=src, num_inference_steps=2)


def _deepliif_caches(data_dir, root: Path) -> dict:
    """Hematoxylin (A) / Ki67 (B) pairs of one DeepLIIF field at ~1 um/px, cached with the shipped VAE
    and encoder, as `synthgen pairs` + `synthgen cache` write them."""
    from synthgen.data.cache import build_cache
    from synthgen.data.datasets import ImageListDataset
    from synthgen.data.pair_folders import downsample_pair, write_pair_folders
    from synthgen.data.pairs import deepliif_pair
    from synthgen.encoders.load import load_encoder

    pair = downsample_pair(deepliif_pair(data_dir / "stains" / "deepliif" / "Bladder1.png"), 4)
    write_pair_folders([pair], root / "pairs", 64, stride=16, min_tissue=0.0, dihedral=True)
    enc = {"latents": load_encoder(f"vae:{CKPT}"), "emb": load_encoder(f"ssl:{CKPT / 'image_encoder'}")}
    out = {}
    for side in "AB":
        build_cache(ImageListDataset.from_folder(root / "pairs" / f"train{side}"), root / side, enc, progress=False)
        out[side] = root / side
    return out


def _cfg(caches, out, **over):
    data = {"task": "stain_denoiser", "output_dir": str(out), "steps": 80, "seed": 0,
            "model": {"pretrained": str(CKPT)},
            "data": {"cache": str(caches["A"]), "target_cache": caches["B"] and str(caches["B"]), "num_workers": 0},
            "objective": {"kind": "epsilon", "cfg_dropout": 0.05, "cfg_dropout_embeddings": 0.05,
                          "cfg_dropout_image": 0.05},
            "optim": {"lr": 5e-4, "batch_size": 16, "warmup_steps": 10}, "ema_decay": 0.0, "log_every": 40,
            "checkpoint_every": 80, "sample_every": 0}
    data.update(over)
    return load_train_config(None, data)


def test_stain_denoiser_learns_to_use_the_source(data_dir, tmp_path):
    """After a short fine-tune on real hematoxylin -> Ki67 pairs, the denoiser's error on the IHC
    latents is lower with each pair's own source than with another pair's: it reads the source."""
    from synthgen.data.cache import CacheDataset
    from synthgen.training.trainer import train

    caches = _deepliif_caches(data_dir, tmp_path)
    train(_cfg(caches, tmp_path / "sd"), progress=False)
    net = Denoiser.from_pretrained(tmp_path / "sd" / "model").eval()
    assert net.config.source_channels == 4
    tgt, src = CacheDataset(caches["B"]), CacheDataset(caches["A"])
    idx = list(range(0, len(tgt), 5))
    x0 = torch.stack([tgt[i]["latents"] for i in idx]).float()
    emb = torch.stack([tgt[i]["emb"] for i in idx]).float()
    s = torch.stack([src[i]["latents"] for i in idx]).float()
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    errs = {"own": 0.0, "other": 0.0}
    with torch.no_grad():
        for t in (800, 500, 200):
            noise = torch.randn(x0.shape, generator=g)
            tt = torch.full((len(x0),), t)
            xt = sched.add_noise(x0, noise, tt)
            for key, source in (("own", s), ("other", s.roll(7, 0))):
                pred = net(xt, tt, embeddings=emb, source_latents=source).sample
                errs[key] += (pred - noise).pow(2).mean().item()
    # measured: 0.225 with each pair's own source vs 0.325 with another's (80 steps, one thread)
    assert errs["own"] < 0.9 * errs["other"], errs


def test_stain_denoiser_config_errors(tmp_path):
    from synthgen.training.tasks import StainDenoiserTask

    caches = {"A": tmp_path / "a", "B": tmp_path / "b"}
    with pytest.raises(ConfigError, match="model.pretrained"):
        StainDenoiserTask(_cfg(caches, tmp_path, model={}))
    with pytest.raises(ConfigError, match="lora.rank"):
        StainDenoiserTask(_cfg(caches, tmp_path, lora={"rank": 4}))
    with pytest.raises(ConfigError, match="target_cache"):
        StainDenoiserTask(_cfg({"A": caches["A"], "B": None}, tmp_path))
    with pytest.raises(ConfigError, match="cfg_dropout_image"):
        _cfg(caches, tmp_path, objective={"cfg_dropout_image": 1.5})


def test_structure_score_follows_the_layout(data_dir):
    """Dice of source nuclei vs virtual nuclei: near 1 for the source itself, high for the real Ki67
    of the same DeepLIIF field, low for it shifted by a cell or for unrelated tiles."""
    from synthgen.data.pair_folders import downsample_pair
    from synthgen.data.pairs import deepliif_pair
    from synthgen.metrics.stain import stain_report, structure_score

    pair = downsample_pair(deepliif_pair(data_dir / "stains" / "deepliif" / "Lung1.png"), 2)  # 256 px, 0.5 um/px
    src, ihc = pair.load()
    crops = lambda a: np.stack([a[y : y + 64, x : x + 64] for y in (0, 88, 176) for x in (0, 88, 176)])  # noqa: E731
    s, r = crops(src), crops(ihc)
    assert structure_score(s, s)["dice"] > 0.9  # 0.97: the virtual side counts DAB too
    aligned = structure_score(s, r)["dice"]
    shifted = structure_score(s, np.roll(r, 10, axis=2))["dice"]
    unrelated = structure_score(s, r[::-1])["dice"]
    # measured: aligned 0.84, shifted 0.23, unrelated 0.20
    assert aligned > 0.7 and aligned > shifted + 0.4 and aligned > unrelated + 0.4, (aligned, shifted, unrelated)
    glass = np.full_like(s, 245)
    assert structure_score(glass, glass)["dice"] != structure_score(glass, glass)["dice"]  # NaN: no nuclei anywhere
    rep = stain_report(r, r, source=s, encoder_free=True, per_patch=False)
    assert rep["structure"]["dice"] == rep["structure_real"]["dice"] == aligned
    assert rep["fd_free"] < 1e-6


def test_pair_split_file_cuts_each_row_as_it_says(data_dir, tmp_path, capsys):
    """One row per image pair: training-only rows, held-out images and held-out bands; errors name
    the file and line."""
    d = data_dir / "stains"
    table = tmp_path / "pairs.csv"
    table.write_text(
        "stain,name,source,target,source_landmarks,target_landmarks,deepliif,downsample,test\n"
        f"Ki-67,bladder,{d / 'deepliif/Bladder1.png'},,,,1,4,\n"
        f"ki67,lung,{d / 'deepliif/Lung1.png'},,,,1,4,all\n"
        f"panck,kidney,{d / 'anhir-rat-kidney/Rat-Kidney_HE.jpg'},{d / 'anhir-rat-kidney/Rat-Kidney_PanCytokeratin.jpg'},"
        f"{d / 'anhir-rat-kidney/Rat-Kidney_HE.csv'},{d / 'anhir-rat-kidney/Rat-Kidney_PanCytokeratin.csv'},0,1,0.4:0.6\n")
    run_cli(["pairs", str(table), "--stain", "ki67", "-o", str(tmp_path / "ki67"), "--size", "64", "--stride", "32",
             "--test-stride", "32", "--min-tissue", "0"])
    train = {p.name.split("_")[0] for p in (tmp_path / "ki67" / "trainA").glob("*.png")}
    test = {p.name.split("_")[0] for p in (tmp_path / "ki67" / "testA").glob("*.png")}
    assert train == {"bladder"} and test == {"lung"}
    assert len(list((tmp_path / "ki67" / "testB").glob("*.png"))) == 4  # a 125 px aligned panel, 64 px at stride 32
    run_cli(["pairs", str(table), "--stain", "panck", "-o", str(tmp_path / "panck"), "--size", "64"])
    w = Image.open(d / "anhir-rat-kidney/Rat-Kidney_HE.jpg").size[0]
    xs = lambda sub: [int(p.stem.split("_")[1]) for p in (tmp_path / "panck" / sub).glob("*.png")]  # noqa: E731
    assert xs("testA") and all(0.4 * w - 1 <= x and x + 64 <= 0.6 * w + 1 for x in xs("testA"))
    assert xs("trainA") and all(x + 64 <= 0.4 * w + 1 or x >= 0.6 * w - 1 for x in xs("trainA"))

    from synthgen.data.pair_folders import table_pairs

    bad = tmp_path / "bad.csv"
    bad.write_text(table.read_text().replace(",1,4,all", ",1,4,0.7:0.2"))
    with pytest.raises(StainError, match=r"bad.csv, line 3 \(lung\).*x0:x1"):
        table_pairs(bad, "ki67")
    bad.write_text(table.read_text().replace("Lung1.png", "Lung9.png"))
    with pytest.raises(StainError, match=r"line 3 \(lung\): source .*Lung9.png does not exist"):
        table_pairs(bad, "ki67")
    with pytest.raises(StainError, match="no pairs for stain 'her2'"):
        table_pairs(table, "her2")
    from synthgen.cli import main

    for args, msg in ((["--stain", "ki67", "--holdout", "0.1:0.2"], "drop --holdout"), ([], "needs --stain")):
        with pytest.raises(SystemExit) as e:
            main(["pairs", str(table), "-o", str(tmp_path / "x"), *args])
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_spatial_region_is_translated_window_by_window(base, data_dir):
    """A large source region: overlapping windows, each from its own pixels, blended into one image,
    the same for the same seed; clear errors for a region under a window and a non-spatial model."""
    from synthgen.data.slides import Slide
    from synthgen.models.stain import StainTranslator
    from synthgen.pipelines.generate import SynthPipeline
    from synthgen.pipelines.stain import virtual_stain_region

    pipe = SynthPipeline.from_pretrained(CKPT)
    spatial = SynthPipeline(_perturbed(base), pipe.vae, pipe.scheduler, image_encoder=pipe.image_encoder)
    spatial.set_progress_bar_config(disable=True)
    tr = StainTranslator.from_pretrained(CKPT / "stains" / "ki67" / "translator")
    with Slide(data_dir / "slides" / "CMU-1-Small-Region.svs") as s:
        region = s.read(800, 1200, 100, 1.0)
    out = virtual_stain_region(spatial, tr, region, "ki67", seed=3, num_inference_steps=2, progress=False)
    assert out.shape == region.shape and out.dtype == np.uint8 and out.std() > 3
    again = virtual_stain_region(spatial, tr, region, "ki67", seed=3, num_inference_steps=2, progress=False)
    np.testing.assert_array_equal(out, again)
    with pytest.raises(StainError, match="at least one 64 px window"):
        virtual_stain_region(spatial, tr, region[:40], "ki67", progress=False)
    with pytest.raises(StainError, match="needs a spatial translator"):
        virtual_stain_region(pipe, tr, region, "ki67", progress=False)


def test_translator_items_do_not_depend_on_the_batch():
    """With one generator per item, an item's translated embedding depends on its seed alone."""
    from synthgen.models.stain import StainTranslator

    tr = StainTranslator.from_pretrained(CKPT / "stains" / "ki67" / "translator")
    src = torch.randn(5, 1, 128, generator=torch.Generator().manual_seed(0))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = tr.translate(src, "ki67", generator=gens([10, 11, 12, 13, 14]), num_steps=4)
    torch.testing.assert_close(tr.translate(src[2:4], "ki67", generator=gens([12, 13]), num_steps=4), full[2:4])
    assert not torch.allclose(full[0], full[1])
    with pytest.raises(ValueError, match="2 generators for 5 items"):
        tr.translate(src, "ki67", generator=gens([1, 2]))
