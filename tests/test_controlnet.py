"""Mask branch: zero-init behaviour, mask encoding and errors, pipeline integration, training."""

import json

import numpy as np
import pytest
import torch
from tiny_encoders import color_tokens, pooled_latents

from synthgen.config import ConfigError, load_train_config
from synthgen.data.cache import build_cache
from synthgen.data.datasets import PatchDataset
from synthgen.data.nuclei import procedural_nuclei, segmenter
from synthgen.data.slides import Slide
from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table
from synthgen.errors import MaskError
from synthgen.models.controlnet import ControlledDenoiser, MaskControlNet, mask_to_channels
from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config
from synthgen.models.vae import VAE
from synthgen.pipelines.generate import SynthPipeline
from synthgen.sampling import make_scheduler
from synthgen.training.trainer import train


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return Denoiser(**denoiser_config("tiny")).eval()


def _inputs(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.tensor([10, 600][:b]), torch.randn(b, 1, 32, generator=g)


def test_zero_initialised_branch_leaves_the_base_unchanged(base):
    cn = MaskControlNet.from_denoiser(base, num_layers=1)
    x, t, e = _inputs()
    masks = torch.from_numpy(np.stack([procedural_nuclei(32, 0.3, 4, seed=s) for s in range(2)]))
    ref = base(x, t, embeddings=e).sample
    out = ControlledDenoiser(base, cn)(x, t, mask=masks, embeddings=e).sample
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # copied blocks start as the base's
    torch.testing.assert_close(cn.transformer_blocks[0].attn1.to_q.weight, base.transformer_blocks[0].attn1.to_q.weight)
    # once the branch is non-zero the mask matters, per sample
    with torch.no_grad():
        for p in [*cn.after_proj.parameters(), *cn.before_proj.parameters()]:
            p.normal_(0, 0.1)
    a = ControlledDenoiser(base, cn)(x, t, mask=masks, embeddings=e).sample
    masks2 = masks.clone()
    masks2[1] = 0
    b = ControlledDenoiser(base, cn)(x, t, mask=masks2, embeddings=e).sample
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    # conditioning scale 0 is the base model
    zero = ControlledDenoiser(base, cn, conditioning_scale=0.0)(x, t, mask=masks, embeddings=e).sample
    torch.testing.assert_close(zero, ref)


def test_mask_encoding_keeps_touching_nuclei_apart():
    m = torch.zeros(1, 8, 8, dtype=torch.long)
    m[0, 2:6, 1:4] = 1
    m[0, 2:6, 4:7] = 2  # touches nucleus 1
    ch = mask_to_channels(m)
    assert ch.shape == (1, 2, 8, 8)
    assert torch.equal(ch[0, 0], (m[0] > 0).float())
    assert ch[0, 1, 3, 3] == 1 and ch[0, 1, 3, 4] == 1  # the shared border is marked on both sides
    assert ch[0, 1].sum() < ch[0, 0].sum()
    sem = mask_to_channels(torch.tensor([[[0, 1], [2, 3]]]), mask_classes=3)
    assert sem.shape == (1, 3, 2, 2) and sem.sum() == 3


@pytest.mark.parametrize("mask,match", [
    (torch.zeros(2, 32, 32), "integer labels"),
    (torch.zeros(2, 16, 16, dtype=torch.long), r"\(B, 32, 32\)"),
    (-torch.ones(2, 32, 32, dtype=torch.long), "negative"),
    (torch.zeros(32, 32, dtype=torch.long), r"\(B, H, W\)|\(B, 32, 32\)"),
])
def test_mask_errors_are_clear(base, mask, match):
    cn = MaskControlNet.from_denoiser(base, num_layers=1)
    x, t, e = _inputs()
    with pytest.raises(MaskError, match=match):
        ControlledDenoiser(base, cn)(x, t, mask=mask, embeddings=e)
    with pytest.raises(MaskError, match="mask_classes=2"):
        mask_to_channels(torch.full((1, 4, 4), 3), mask_classes=2)


@pytest.fixture(scope="module")
def pipe(base, tmp_path_factory):
    torch.manual_seed(1)
    cn = MaskControlNet.from_denoiser(base, num_layers=1)
    with torch.no_grad():
        for p in cn.after_proj.parameters():
            p.normal_(0, 0.05)
        cn.before_proj.weight.normal_(0, 0.05)
    p = SynthPipeline(transformer=base, vae=VAE.from_preset("tiny").model.eval(), scheduler=make_scheduler("epsilon"),
                      controlnet=cn)
    folder = tmp_path_factory.mktemp("cn-pipe") / "pipeline"
    p.save_pretrained(folder)
    loaded = SynthPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def test_pipeline_mask_guided_generation(pipe):
    assert isinstance(pipe.controlnet, MaskControlNet)
    e = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(0))
    masks = np.stack([procedural_nuclei(32, 0.3, 4, seed=s) for s in range(3)])
    kw = dict(embeddings=e, seeds=[1, 2, 3], num_inference_steps=4, output_type="pt")
    guided = pipe(masks=masks, **kw).images
    plain = pipe(**kw).images
    assert guided.shape == (3, 3, 32, 32) and not torch.equal(guided, plain)
    # scale 0 switches the branch off; one-by-one equals the batch (masks stay with their condition)
    assert torch.equal(pipe(masks=masks, controlnet_conditioning_scale=0.0, **kw).images, plain)
    one = pipe(embeddings=e[2:], masks=masks[2:], seeds=[3], num_inference_steps=4, output_type="pt").images
    # equal up to a rounding step: BLAS may sum a batch of 1 in another order than a batch of 3
    assert (one[0].int() - guided[2].int()).abs().max() <= 2
    # a mask alone is a valid condition
    assert pipe(masks=masks[:2], num_inference_steps=2, output_type="pt").images.shape == (2, 3, 32, 32)
    with pytest.raises(MaskError, match="32x32"):
        pipe(embeddings=e[:1], masks=np.zeros((1, 64, 64), int), num_inference_steps=2)
    with pytest.raises(ValueError, match="3 entries|masks has 2"):
        pipe(embeddings=e, masks=masks[:2], num_inference_steps=2)


def test_the_branch_records_the_strength_it_runs_at(pipe, tmp_path):
    e = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(0))
    masks = np.stack([procedural_nuclei(32, 0.3, 4, seed=s) for s in range(2)])
    kw = dict(embeddings=e, masks=masks, seeds=[1, 2], num_inference_steps=3, output_type="pt")
    at_1, at_2 = pipe(controlnet_conditioning_scale=1.0, **kw).images, pipe(controlnet_conditioning_scale=2.0, **kw).images
    assert torch.equal(pipe(**kw).images, at_1) and not torch.equal(at_1, at_2)  # no recorded strength: 1
    pipe.controlnet.register_to_config(conditioning_scale=2.0)
    try:
        pipe.save_pretrained(tmp_path / "p")
        loaded = SynthPipeline.from_pretrained(tmp_path / "p")
        loaded.set_progress_bar_config(disable=True)
        assert loaded.controlnet.config.conditioning_scale == 2.0
        assert torch.equal(loaded(**kw).images, at_2)  # the recorded strength is the default
        assert torch.equal(loaded(controlnet_conditioning_scale=1.0, **kw).images, at_1)
    finally:
        pipe.controlnet.register_to_config(conditioning_scale=1.0)


def test_masks_need_a_controlnet(base):
    p = SynthPipeline(transformer=base, vae=VAE.from_preset("tiny").model.eval(), scheduler=make_scheduler("epsilon"))
    with pytest.raises(ValueError, match="controlnet"):
        p(embeddings=torch.zeros(1, 1, 32), masks=np.zeros((1, 32, 32), int))


def test_controlnet_trains_from_a_mask_cache(cmu, tmp_path):
    """The branch trains through the one training loop on real tiles with pseudo-label masks."""
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=1.0, size=64, min_tissue=0.5, roi=(0, 0, 0.5, 0.5)), key="cmu")
    write_tile_table(tiles, tmp_path / "tiles.csv", {"cmu": {"path": str(cmu)}})
    build_cache(PatchDataset(tmp_path / "tiles.csv"), tmp_path / "cache",
                {"latents": pooled_latents(), "emb": color_tokens(), "mask": segmenter()}, progress=False)
    base_cfg = {"model": {"preset": "tiny", "overrides": {"in_channels": 3, "out_channels": 3, "caption_channels": 8,
                                                          "caption_num_tokens": 4}},
                "data": {"cache": str(tmp_path / "cache"), "num_workers": 0},
                "optim": {"lr": 3e-3, "batch_size": 8}, "ema_decay": 0.0, "log_every": 2}
    res = train(load_train_config(None, {"task": "denoiser", "output_dir": str(tmp_path / "base"), "steps": 4,
                                         **base_cfg}), progress=False)
    cfg = {**base_cfg, "task": "controlnet", "output_dir": str(tmp_path / "cn"), "steps": 12,
           "model": {"pretrained": str(res.output_dir / "model"), "overrides": {"num_layers": 1}}}
    out = train(load_train_config(None, cfg), progress=False)
    cn = MaskControlNet.from_pretrained(out.output_dir / "model")
    assert cn.config.downscale == 8 and cn.config.num_layers == 1
    assert any(p.abs().sum() > 0 for p in cn.after_proj.parameters())  # the zero layers learned
    losses = [json.loads(line)["loss"] for line in (tmp_path / "cn" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses))
    # the base denoiser was not touched
    before = Denoiser.from_pretrained(res.output_dir / "model").state_dict()
    assert all(torch.equal(v, before[k]) for k, v in Denoiser.from_pretrained(res.output_dir / "model").state_dict().items())
    with pytest.raises(ConfigError, match="pretrained"):
        train(load_train_config(None, {**cfg, "output_dir": str(tmp_path / "bad"), "model": {"preset": "tiny"}}),
              progress=False)
    # model.branch continues the trained branch (its weights, not a fresh copy of the base's blocks)
    cont = {**cfg, "output_dir": str(tmp_path / "cn2"), "steps": 2, "optim": {"lr": 1e-9, "batch_size": 8},
            "model": {"pretrained": cfg["model"]["pretrained"], "branch": str(out.output_dir / "model")}}
    again = MaskControlNet.from_pretrained(train(load_train_config(None, cont), progress=False).output_dir / "model")
    assert all(torch.allclose(v, cn.state_dict()[k], atol=1e-6) for k, v in again.state_dict().items())  # lr ~0
    with pytest.raises(ConfigError, match="cannot change a continued branch"):
        train(load_train_config(None, {**cont, "output_dir": str(tmp_path / "bad2"),
                                       "model": {**cont["model"], "overrides": {"num_layers": 1}}}), progress=False)


def test_paired_generation_job_and_segmentation_export(pipe, tmp_path):
    """A job with condition masks writes image/mask pairs; the export keeps them paired and hashed."""
    from synthgen.data.masks import read_label_map, write_label_map
    from synthgen.export.writers import export_dataset, verify_export
    from synthgen.pipelines.jobs import GenerationPlan, merge_manifest, run_plan

    for i in range(3):
        write_label_map(tmp_path / f"m{i}.png", procedural_nuclei(32, 0.3, 4, seed=i))
    files = [tmp_path / f"m{i % 3}.png" for i in range(5)]
    e = torch.randn(5, 1, 32, generator=torch.Generator().manual_seed(0))
    plan = GenerationPlan(e, [None] * 5, list(range(5)), "variations", masks=files)
    out = tmp_path / "gen"
    assert run_plan(pipe, plan, out, num_inference_steps=2, batch_size=2, progress=False) == 5
    (out / "masks" / "0000004.png").unlink()  # a lost mask: the item is redone on rerun
    assert run_plan(pipe, plan, out, num_inference_steps=2, batch_size=2, progress=False) == 1
    man = json.loads(merge_manifest(out, 5, {"mode": "variations"}).read_text())
    assert [it["mask_source"] for it in man["items"]] == [f.name for f in files]
    np.testing.assert_array_equal(read_label_map(out / man["items"][3]["mask"]), read_label_map(files[0]))
    for fmt in ("imagefolder", "webdataset"):
        exp = export_dataset(out, tmp_path / f"export-{fmt}", fmt)
        m = json.loads((exp / "manifest.json").read_text())
        assert all("mask" in r and "mask_sha256" in r for r in m["items"])
        assert verify_export(exp)["ok"]
        assert "segmentation pairs" in (exp / "DATASHEET.md").read_text()
    assert (tmp_path / "export-imagefolder" / "masks" / "unlabelled" / "0000000.png").exists()


def test_cache_keeps_user_masks(kather, tmp_path):
    """Label maps that come with a dataset (files, GeoJSON) are cached as they are, for the branch."""
    from PIL import Image

    from synthgen.data.cache import CacheDataset
    from synthgen.data.datasets import ImageListDataset
    from synthgen.data.masks import write_label_map

    src = sorted(kather.rglob("*.tif"))[:3]
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    want = []
    for i, f in enumerate(src):
        Image.open(f).convert("RGB").resize((64, 64)).save(tmp_path / "img" / f"{i}.png")
        want.append(procedural_nuclei(64, 0.2, 7, seed=i))
        write_label_map(tmp_path / "msk" / f"{i}.png", want[-1])
    ds = ImageListDataset.from_folder(tmp_path / "img", masks=tmp_path / "msk")
    build_cache(ds, tmp_path / "cache", {"latents": pooled_latents()}, progress=False)
    cache = CacheDataset(tmp_path / "cache")
    assert "mask" in cache.keys
    for i in range(3):
        np.testing.assert_array_equal(cache[i]["mask"].numpy(), want[i])
