"""Joint conditioning (issue 16, item 4): embedding tokens + class label + tissue-source label,
each with its own learned null; the labelled cache, training and sampling paths."""

import csv
import json
from pathlib import Path

import pytest
import torch
from pixcell_reference import reference_forward
from safetensors.torch import load_file
from tiny_encoders import color_tokens, pooled_latents

from synthgen.config import ConfigError, load_train_config
from synthgen.data.cache import CacheDataset, LabelledTiles, build_cache
from synthgen.data.splits import build_split_tables
from synthgen.errors import CacheError
from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config
from synthgen.models.vae import VAE
from synthgen.pipelines.generate import SynthPipeline
from synthgen.sampling import make_scheduler, sample_latents
from synthgen.training.tasks import DenoiserTask
from synthgen.training.trainer import train

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "synthgen-small-cmu" / "transformer"
KEYS = ("embeddings", "class_labels", "source_labels")


def joint(**over) -> Denoiser:
    """Tiny joint model: 4 embedding tokens (2x2 grid), 3 classes, 2 sources."""
    torch.manual_seed(0)
    kw = dict(caption_num_tokens=4, num_classes=3, num_sources=2, class_names=["a", "b", "c"],
              source_names=["x", "y"])
    return Denoiser(**denoiser_config("tiny", **{**kw, **over})).eval()


def _conds(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"embeddings": torch.randn(n, 4, 32, generator=g), "class_labels": torch.tensor([0, 1, 2, -1, 1, 0])[:n],
            "source_labels": torch.tensor([0, 1, -1, 1, 0, 1])[:n]}


# -- real labelled tiles: split file -> tile tables -> cache ------------------------------------
@pytest.fixture(scope="module")
def labelled(data_dir, tmp_path_factory):
    """A split file of real tiles: Kather ADIPOSE and LYMPHO images (labelled, source kather2016)
    and a CMU region (unlabelled, source cmu) for training; one LYMPHO image for validation.
    Tables at 0.5 um/px, 64 px; a cache of pixel-space 'latents' and 4 colour tokens."""
    root = tmp_path_factory.mktemp("labelled")
    kather = data_dir / "classes" / "kather2016"
    rows = []
    for cls, folder in (("ADIPOSE", "07_ADIPOSE"), ("LYMPHO", "04_LYMPHO")):
        for i, p in enumerate(sorted((kather / folder).iterdir())):
            split = "val" if (cls == "LYMPHO" and i == 2) else "train"
            rows.append([str(p), "kather2016", cls, f"{cls}-{i}", "0.495", split, "", "0"])
    rows.append([str(data_dir / "slides" / "CMU-1-Small-Region.svs"), "cmu", "", "cmu-1", "", "train",
                 "0.3 0.3 0.42 0.42", "0.3"])
    with open(root / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "source", "label", "group", "mpp", "split", "roi", "min_tissue"])
        w.writerows(rows)
    tables = build_split_tables(root / "split.csv", root / "tables", mpp=0.5, size=64, train_overlap=32,
                                progress=False)
    train_ds = LabelledTiles(tables["train"])
    build_cache(train_ds, root / "cache", {"latents": pooled_latents(), "emb": color_tokens()},
                classes=train_ds.classes, shard_size=64, progress=False)
    return root, tables


def test_labelled_cache_stores_label_and_source_ids_with_names(labelled):
    root, tables = labelled
    cache = CacheDataset(root / "cache")
    assert cache.classes == ["ADIPOSE", "LYMPHO"] and cache.sources == ["cmu", "kather2016"]
    config = json.loads((root / "cache" / "config.json").read_text())
    assert config["classes"] == ["ADIPOSE", "LYMPHO"] and config["sources"] == ["cmu", "kather2016"]
    items = [cache[i] for i in range(len(cache))]
    labels = [(it["label"], it["source"]) for it in items]
    # Kather tiles carry their class and source 1; CMU tiles have no class (-1) and source 0
    assert {lab for lab, src in labels if src == 0} == {-1} and {lab for lab, src in labels if src == 1} == {0, 1}
    assert sum(1 for lab, _ in labels if lab == 0) >= 9 and sum(1 for lab, _ in labels if lab == -1) >= 9
    # the val table (LYMPHO only) gets the same ids: names come from the data definition
    val = LabelledTiles(tables["val"])
    assert val.classes == ["ADIPOSE", "LYMPHO"] and set(val.labels.tolist()) == {1}
    assert val.sources == ["cmu", "kather2016"] and set(val.source_ids.tolist()) == {1}
    with pytest.raises(CacheError, match="label LYMPHO not among the names given"):
        LabelledTiles(tables["val"], classes=["ADIPOSE"])


def test_task_takes_classes_and_sources_from_the_cache(labelled, tmp_path):
    root, _ = labelled
    task = DenoiserTask(_cfg(root, tmp_path / "t"))
    c = task.net.config
    assert (c.num_classes, c.class_names, c.num_sources, c.source_names) == (
        2, ["ADIPOSE", "LYMPHO"], 2, ["cmu", "kather2016"])
    assert set(task.dataset()[0]) == {"latents", "emb", "label", "source"}
    # a cache without source names cannot condition on sources
    build_cache(_FewTiles(), tmp_path / "plain", {"latents": pooled_latents(), "emb": color_tokens()},
                progress=False)
    with pytest.raises(ConfigError, match="data.use_source: the cache .* has no source names"):
        DenoiserTask(_cfg(tmp_path, tmp_path / "u", data={"cache": str(tmp_path / "plain")}))
    with pytest.raises(ConfigError, match=r"objective.cfg_dropout_labels: must be in \[0, 1\)"):
        _cfg(root, tmp_path / "v", objective={"cfg_dropout_labels": 1.0})


class _FewTiles(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.full((3, 64, 64), 40 * i, dtype=torch.uint8)}


def _cfg(root, out, **over):
    base = {
        "task": "denoiser", "output_dir": str(out), "steps": 60, "seed": 1,
        "model": {"preset": "tiny", "overrides": {"in_channels": 3, "out_channels": 3, "caption_channels": 8,
                                                   "caption_num_tokens": 4}},
        "data": {"cache": str(root / "cache"), "num_workers": 0, "use_labels": True, "use_source": True},
        "objective": {"cfg_dropout": 0.1, "cfg_dropout_embeddings": 0.5, "cfg_dropout_labels": 0.2,
                      "cfg_dropout_sources": 0.2},
        "optim": {"lr": 3e-3, "batch_size": 16, "warmup_steps": 5},
        "log_every": 10, "checkpoint_every": 1000, "ema_decay": 0.9,
    }
    for k, v in over.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) else v
    return load_train_config(None, base)


def _batch(ds, idx):
    return torch.utils.data.default_collate([ds[i] for i in idx])


def test_nulls_are_distinct_learned_and_unlabelled_tiles_train_only_the_null_class(labelled, tmp_path):
    root, _ = labelled
    task = DenoiserTask(_cfg(root, tmp_path / "t", objective={"cfg_dropout": 0.0, "cfg_dropout_embeddings": 0.0,
                                                               "cfg_dropout_labels": 0.0, "cfg_dropout_sources": 0.0}))
    net, ds = task.net, task.dataset()
    nulls = {"embeddings": net.caption_projection.uncond_embedding, "class": net.class_embedding.weight[2],
             "source": net.source_embedding.weight[2]}
    assert not torch.equal(nulls["class"], nulls["source"])
    assert all(not torch.equal(nulls["embeddings"][i], nulls["class"]) for i in range(4))
    unlabelled = [i for i in range(len(ds)) if ds[i]["label"] == -1][:8]
    labelled_ = [i for i in range(len(ds)) if ds[i]["label"] == 0][:8]
    g = torch.Generator().manual_seed(0)
    # an unlabelled batch: only the null class row learns (and only the cmu source row)
    task(_batch(ds, unlabelled), g).backward()
    grad = net.class_embedding.weight.grad
    assert grad[:2].abs().max() == 0 and grad[2].abs().max() > 0
    sgrad = net.source_embedding.weight.grad
    assert sgrad[0].abs().max() > 0 and sgrad[1:].abs().max() == 0
    assert net.caption_projection.uncond_embedding.grad is None or net.caption_projection.uncond_embedding.grad.abs().max() == 0
    net.zero_grad()
    # a labelled batch trains its class row, not the null
    task(_batch(ds, labelled_), g).backward()
    grad = net.class_embedding.weight.grad
    assert grad[0].abs().max() > 0 and grad[1:].abs().max() == 0
    # with guidance dropout each null learns: a few steps move all three
    task = DenoiserTask(_cfg(root, tmp_path / "t2", objective={"cfg_dropout": 0.3}))
    before = {k: v.detach().clone() for k, v in task.net.state_dict().items()}
    opt = torch.optim.Adam(task.net.parameters(), lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        task(_batch(ds, range(step * 8, step * 8 + 16)), g).backward()
        opt.step()
    after = task.net.state_dict()
    assert not torch.equal(before["caption_projection.uncond_embedding"], after["caption_projection.uncond_embedding"])
    assert not torch.equal(before["class_embedding.weight"][2], after["class_embedding.weight"][2])
    assert not torch.equal(before["source_embedding.weight"][2], after["source_embedding.weight"][2])


def test_guidance_dropout_per_condition(labelled, tmp_path):
    root, _ = labelled
    task = DenoiserTask(_cfg(root, tmp_path / "t", objective={"cfg_dropout": 0.0, "cfg_dropout_embeddings": 0.0,
                                                               "cfg_dropout_labels": 0.5, "cfg_dropout_sources": 0.0}))
    n = 2000
    conds = {"embeddings": torch.zeros(n, 4, 8), "class_labels": torch.zeros(n, dtype=torch.long),
             "source_labels": torch.zeros(n, dtype=torch.long)}
    drops = task._drops(n, conds, torch.Generator().manual_seed(0), "cpu")
    assert not drops["embeddings"].any() and not drops["source_labels"].any()
    assert 0.45 < drops["class_labels"].float().mean() < 0.55
    # joint dropout (cfg_dropout) drops every condition of the same items, then each its own
    task = DenoiserTask(_cfg(root, tmp_path / "t2", objective={"cfg_dropout": 0.2, "cfg_dropout_embeddings": 0.1,
                                                                "cfg_dropout_labels": 0.1, "cfg_dropout_sources": 0.1}))
    drops = task._drops(n, conds, torch.Generator().manual_seed(0), "cpu")
    every = drops["embeddings"] & drops["class_labels"] & drops["source_labels"]
    assert 0.18 < every.float().mean() < 0.25
    assert 0.26 < drops["class_labels"].float().mean() < 0.33  # 1 - 0.8 * 0.9
    # cfg_dropout alone: one mask for all, drawn exactly as before (one uniform per item)
    task = DenoiserTask(_cfg(root, tmp_path / "t3", objective={"cfg_dropout": 0.3, "cfg_dropout_embeddings": 0.0,
                                                                "cfg_dropout_labels": 0.0, "cfg_dropout_sources": 0.0}))
    drop = task._drops(n, conds, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(drop, torch.rand(n, generator=torch.Generator().manual_seed(5)) < 0.3)


def test_label_conditioned_model_trained_briefly_responds_to_the_label(labelled, tmp_path):
    """300 tiny steps on real tiles (about 7 s); then, with the embedding at its null (nothing
    about colour), the ADIPOSE label gives brighter samples than LYMPHO, as the real classes are,
    the null class lies between, and guidance on the class alone widens the gap."""
    root, _ = labelled
    train(_cfg(root, tmp_path / "run", steps=300, optim={"lr": 1e-2}), progress=False)
    model = Denoiser.from_pretrained(tmp_path / "run" / "model").eval()
    cache = CacheDataset(root / "cache")
    real = {c: torch.stack([cache[i]["latents"] for i in range(len(cache)) if cache[i]["label"] == c]).mean()
            for c in (0, 1)}
    gap = float(real[0] - real[1])
    assert gap > 0.5  # ADIPOSE is far brighter than LYMPHO

    def brightness(label, scale=1.0):
        n = 12
        conds = {"embeddings": model.null_conditions(n)["embeddings"], "class_labels": torch.full((n,), label),
                 "source_labels": torch.ones(n, dtype=torch.long)}
        gens = [torch.Generator().manual_seed(s) for s in range(n)]
        z = sample_latents(model, make_scheduler("epsilon", "ddim"), conds, gens, num_steps=10,
                           guidance_scale=scale, guide={"class_labels"})
        return float(z.mean())

    adipose, lympho, anyclass = brightness(0), brightness(1), brightness(-1)
    assert adipose - lympho > 0.25 * gap, (adipose, lympho, gap)
    assert lympho < anyclass < adipose  # the null class: the marginal (CMU tiles included)
    assert brightness(0, 2.0) - brightness(1, 2.0) > max(0.5 * gap, adipose - lympho)


# -- the denoiser ---------------------------------------------------------------------------------
def test_dropping_each_condition_changes_the_output_and_equals_its_null():
    model = joint()
    x, t = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((6,), 400)
    c = _conds()
    with torch.no_grad():
        full = model(x, t, **c).sample
        outs = {}
        for key in KEYS:
            dropped = model.drop_conditions({key: torch.ones(6, dtype=torch.bool)}, **c)
            for other in set(KEYS) - {key}:
                assert torch.equal(dropped[other], c[other])
            outs[key] = model(x, t, **dropped).sample
            explicit = dict(c, **{key: model.null_conditions(6)[key]})
            torch.testing.assert_close(outs[key], model(x, t, **explicit).sample, rtol=0, atol=0)
    for key, out in outs.items():
        rows = torch.ones(6, dtype=torch.bool) if key == "embeddings" else c[key] >= 0  # -1: already the null
        assert ((out - full).abs().flatten(1).amax(1)[rows] > 1e-4).all(), key
        torch.testing.assert_close(out[~rows], full[~rows], rtol=0, atol=0)  # already null: unchanged
    for a in KEYS:
        for b in KEYS:
            if a < b:
                assert (outs[a] - outs[b]).abs().max() > 1e-4
    # a model with sources samples the null source when none is given
    no_source = {k: v for k, v in c.items() if k != "source_labels"}
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, **no_source).sample,
                                   model(x, t, **dict(c, source_labels=torch.full((6,), -1))).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"source labels must be in \[0, 2\)"):
        model(x, t, **dict(c, source_labels=torch.full((6,), 5)))
    with pytest.raises(ValueError, match="source_names has 1 names for 2 ids"):
        joint(source_names=["x"])


def test_batch_composition_does_not_change_per_item_outputs():
    model = joint()
    x, t = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 100, 300, 500, 700, 999])
    c = model.drop_conditions({"embeddings": torch.tensor([0, 1, 0, 0, 1, 0]).bool(),
                               "class_labels": torch.tensor([0, 0, 1, 0, 0, 0]).bool()}, **_conds())
    with torch.no_grad():
        batch = model(x, t, **c).sample
        for i in range(6):
            one = model(x[i : i + 1], t[i : i + 1], **{k: v[i : i + 1] for k, v in c.items()}).sample
            torch.testing.assert_close(one[0], batch[i], rtol=1e-5, atol=1e-5)
        perm = torch.tensor([5, 3, 1, 0, 2, 4])
        shuffled = model(x[perm], t[perm], **{k: v[perm] for k, v in c.items()}).sample
        torch.testing.assert_close(shuffled, batch[perm], rtol=1e-5, atol=1e-5)


def test_small_v2_preset_takes_grid_tokens_class_and_source():
    cfg = denoiser_config("small-v2", num_classes=8, num_sources=6)
    assert (cfg["sample_size"], cfg["patch_size"], cfg["caption_num_tokens"]) == (32, 4, 4)
    model = Denoiser(**cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), embeddings=torch.randn(2, 4, 128),
                    class_labels=torch.tensor([3, -1]), source_labels=torch.tensor([0, 5])).sample
    assert out.shape == (2, 4, 32, 32) and torch.isfinite(out).all()
    assert model.condition_tokens(torch.randn(2, 4, 128), torch.tensor([3, -1]), source_labels=None).shape == (2, 6, 128)


def test_old_single_token_checkpoint_loads_unchanged(tmp_path):
    """The shipped single-token model: its config has none of the new fields, it loads with no
    new weights and its forward pass equals the independent PixCell reference."""
    raw = json.loads((SHIPPED / "config.json").read_text())
    assert "num_sources" not in raw and "class_names" not in raw
    model = Denoiser.from_pretrained(SHIPPED).eval()
    c = model.config
    assert (c.num_sources, c.class_names, c.source_names, c.num_classes) == (0, None, None, 0)
    sd = load_file(SHIPPED / "diffusion_pytorch_model.safetensors")
    assert set(model.state_dict()) == set(sd)
    assert model.source_embedding is None and model.class_embedding is None
    assert set(model.null_conditions(2)) == {"embeddings"}
    ref_cfg = dict(raw, interpolation_scale=1.0)  # PixArt's default for a 16-latent model
    g = torch.Generator().manual_seed(0)
    x, t, emb = torch.randn(3, 4, 16, 16, generator=g), torch.tensor([0, 421, 999]), torch.randn(3, 1, 128, generator=g)
    with torch.no_grad():
        ours = model(x, t, embeddings=emb).sample
        torch.testing.assert_close(ours, reference_forward(sd, ref_cfg, x, t, emb), rtol=1e-4, atol=1e-4)
        null = model(x, t, **model.null_conditions(3)).sample
        torch.testing.assert_close(null, reference_forward(sd, ref_cfg, x, t, sd["caption_projection.uncond_embedding"]
                                                            .expand(3, -1, -1)), rtol=1e-4, atol=1e-4)
        # the one-mask drop_conditions of old callers still drops everything
        d = model.drop_conditions(torch.tensor([True, False, True]), embeddings=emb)
        torch.testing.assert_close(model(x, t, **d).sample[[0, 2]], null[[0, 2]], rtol=0, atol=0)
    model.save_pretrained(tmp_path / "m")
    again = Denoiser.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(x, t, embeddings=emb).sample, ours)


# -- the pipeline ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.manual_seed(0)
    p = SynthPipeline(transformer=joint(), vae=VAE.from_preset("tiny").model.eval(),
                      scheduler=make_scheduler("epsilon"))
    folder = tmp_path_factory.mktemp("pipe-v2") / "pipeline"
    p.save_pretrained(folder)
    loaded = SynthPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _run(pipe, **kw):
    kw = {"num_inference_steps": 4, "output_type": "latent", "guidance_scale": 2.0, **kw}
    return pipe(**kw).images


def test_pipeline_takes_labels_and_sources_by_name_or_id(pipe):
    emb = _conds(3)["embeddings"]
    by_name = _run(pipe, embeddings=emb, labels=["a", "c", None], sources=["y", "x", "y"], seeds=[1, 2, 3])
    by_id = _run(pipe, embeddings=emb, class_labels=[0, 2, -1], sources=[1, 0, 1], seeds=[1, 2, 3])
    torch.testing.assert_close(by_name, by_id)
    one = _run(pipe, embeddings=emb, labels="b", sources="x", seeds=[1, 2, 3])  # one value for every condition
    torch.testing.assert_close(one, _run(pipe, embeddings=emb, labels=[1, 1, 1], sources=[0, 0, 0], seeds=[1, 2, 3]))
    # no sources= is the null source
    torch.testing.assert_close(_run(pipe, embeddings=emb, labels="b", seeds=[1, 2, 3]),
                               _run(pipe, embeddings=emb, labels="b", sources=[None] * 3, seeds=[1, 2, 3]))
    assert (by_name - one).abs().max() > 1e-4
    with pytest.raises(ValueError, match="labels: unknown name 'd' \\(give one of a, b, c\\)"):
        _run(pipe, embeddings=emb, labels=["a", "d", "c"])
    with pytest.raises(ValueError, match="give labels= or class_labels=, not both"):
        _run(pipe, embeddings=emb, labels="a", class_labels=[0, 0, 0])
    with pytest.raises(ValueError, match="sources has 2 entries but the other conditions have 3"):
        _run(pipe, embeddings=emb, labels="a", sources=["x", "y"])
    with pytest.raises(ValueError, match="guide: unknown condition"):
        _run(pipe, embeddings=emb, labels="a", guide=["colour"])


def test_guidance_acts_on_the_chosen_conditions(pipe):
    emb = _conds(2)["embeddings"]
    kw = {"embeddings": emb, "seeds": [4, 5]}
    plain = _run(pipe, **kw, labels=[None, None], guidance_scale=1.0)
    # guiding only the class when the class is the null one leaves the conditional model alone
    assert torch.allclose(_run(pipe, **kw, labels=[None, None], guide=["labels"]), plain, atol=1e-5)
    # the default guides the joint condition: it changes the samples
    joint_guided = _run(pipe, **kw, labels=[None, None])
    assert (joint_guided - plain).abs().max() > 1e-3
    torch.testing.assert_close(joint_guided, _run(pipe, **kw, labels=[None, None], guide=["embeddings", "labels", "sources"]))
    assert (_run(pipe, **kw, labels=["a", "b"], guide=["labels"]) - _run(pipe, **kw, labels=["a", "b"])).abs().max() > 1e-3


def test_pipeline_batches_do_not_change_images(pipe):
    c = _conds(5)
    kw = {"embeddings": c["embeddings"], "labels": ["a", None, "c", "b", None], "sources": ["x", "y", None, "y", "x"],
          "seeds": [7, 8, 9, 10, 11]}
    whole = _run(pipe, **kw, batch_size=5)
    torch.testing.assert_close(_run(pipe, **kw, batch_size=2), whole, rtol=1e-4, atol=1e-4)
    alone = _run(pipe, embeddings=c["embeddings"][3:4], labels=["b"], sources=["y"], seeds=[10])
    torch.testing.assert_close(alone[0], whole[3], rtol=1e-4, atol=1e-4)
