import json
from pathlib import Path

import pytest

from synthgen.config import ConfigError
from synthgen.recipes import load_recipe, plan, run

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "recipes" / "quickstart.yaml"


def _small(tmp_path, *extra):
    return load_recipe(QUICK, [f"output_dir={tmp_path / 'qs'}", "generate.n=4", "generate.steps=2",
                               "evaluate.bootstrap=5", "tile.overlap=0", "rare.n=2", "rare.steps=2", "paired.n=3",
                               "paired.steps=2", "stain.n=2", "stain.steps=2", *extra])


def test_quickstart_end_to_end_then_skips_and_reruns_what_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's paths are relative to the repository
    r = _small(tmp_path)
    assert [a for *_, a in run(r, echo=lambda *_: None)] == ["run"] * 8
    out = tmp_path / "qs"
    m = json.loads((out / "export" / "manifest.json").read_text())
    # the audit drops near copies of real tiles (at 2 sampling steps a variation can be one)
    flagged = m["privacy_audit"]["n_flagged"]
    assert m["privacy_audit"]["n_checked"] == 4 and flagged <= 1 and m["num_items"] == 4 - flagged
    assert m["recipe_sha256"]
    assert json.loads((out / "evaluate" / "fidelity.json").read_text())["overall"]["n_fake"] == 4
    assert f"audit: {flagged} flagged of 4" in (out / "evaluate" / "summary.md").read_text()
    rare = json.loads((out / "rare" / "manifest.json").read_text())  # the shipped prior, class by name
    assert rare["class_name"] == "TUMOR" and rare["num_items"] == 2 and "acceptance_rate" in rare
    assert "rare class TUMOR (prior): 2 images" in (out / "evaluate" / "summary.md").read_text()
    paired = json.loads((out / "paired" / "manifest.json").read_text())  # nuclei masks of real tiles -> pairs
    assert paired["num_items"] == 3 and all((out / "paired" / it["mask"]).exists() for it in paired["items"])
    adherence = json.loads((out / "evaluate" / "masks.json").read_text())
    assert set(adherence["with_and_without_branch"]) >= {"controlnet", "baseline", "dice_gain"}
    assert "mask-guided pairs: 3" in (out / "evaluate" / "summary.md").read_text()
    from PIL import Image

    assert Image.open(out / "evaluate" / "contact_sheet.png").size == (8 * 128, 2 * 128)  # real row + 4 synthetic
    from synthgen.export.writers import verify_export

    assert verify_export(out / "export")["ok"]
    assert [a for *_, a in plan(r)] == ["skip"] * 8
    assert len(list((out / "stain" / "virtual").glob("*.png"))) == 2  # virtual Ki67 of 2 tiles
    assert "virtual ki67: 2 tiles" in (out / "evaluate" / "summary.md").read_text()
    st = json.loads((out / "stain" / "structure.json").read_text())
    assert st["route"] == "embedding" and st["n"] == 2 and 0 <= st["dice"] <= 1  # with structure: the nuclei kept
    assert Image.open(out / "stain" / "contact_sheet.png").size == (2 * 64, 2 * 64)  # at the stain model's 64 px, 1 um/px
    changed = _small(tmp_path, "generate.seed=3")
    assert [a for *_, a in plan(changed)] == ["skip", "skip"] + ["run"] * 6
    run(changed, echo=lambda *_: None)
    m2 = json.loads((out / "export" / "manifest.json").read_text())
    assert m2["generator"]["seed"] == 3 and m2["items"][0]["sha256"] != m["items"][0]["sha256"]


def test_interrupted_generate_resumes_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    r = _small(tmp_path, "generate.n=6")
    import synthgen.pipelines.jobs as jobs

    real = jobs.run_plan
    calls = {"n": 0}

    def dying(pipe, plan_, out, **kw):  # generate 4 of 6 images, then "get killed"
        kw["batch_size"] = 2
        sub = jobs.GenerationPlan(plan_.embeddings[:4], plan_.labels[:4], plan_.seeds[:4], plan_.kind)
        real(pipe, sub, out, **kw)
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "run_plan", dying)  # generate() imports it at call time
    with pytest.raises(KeyboardInterrupt):
        run(r, echo=lambda *_: None)
    assert calls["n"] == 1 and not (tmp_path / "qs" / "export").exists()
    monkeypatch.undo()
    monkeypatch.chdir(REPO)
    rows = run(r, echo=lambda *_: None)
    assert [a for *_, a in rows] == ["skip", "skip"] + ["run"] * 6
    m = json.loads((tmp_path / "qs" / "export" / "manifest.json").read_text())
    flagged = m["privacy_audit"]["n_flagged"]  # near copies of real tiles are dropped from the export
    assert m["privacy_audit"]["n_checked"] == 6 and flagged <= 2
    assert m["num_items"] == 6 - flagged and len({it["seed"] for it in m["items"]}) == 6 - flagged


BROKEN = [
    ({"name": "x", "output_dir": "o"}, r"no steps"),
    ({"name": "x", "output_dir": "o", "tilee": {}}, r"tilee: unknown field \(allowed: name, output_dir, tile"),
    ({"name": "x", "output_dir": "o", "tile": {"slides": ["a.svs"], "mpp": "fast"}}, r"tile\.mpp: expected a number"),
    ({"name": "x", "output_dir": "o", "tile": {"mpp": 1.0}}, r"tile\.slides: required field is missing"),
    ({"name": "x", "output_dir": "o", "tile": {"slides": ["a"]}, "cache": {"encoders": {}},
      "generate": {"pipeline": "p", "n": 2, "mode": "dream"}},
     r"generate\.mode: 'dream' is not one of variations, prior, interpolation, class"),
    ({"name": "x", "output_dir": "o", "cache": {"encoders": {"emb": "ssl:x"}}}, r"cache: needs a tile step"),
    ({"name": "x", "output_dir": "o", "tile": {"slides": ["a"]}, "export": {}}, r"export.source: needs a generate step"),
    ({"name": "x", "output_dir": "o", "tile": {"slides": ["a"]}, "generate": {"pipeline": "p", "n": 2}},
     r"generate\.mode: 'variations' draws real embeddings from a cache step"),
    ({"name": "x", "output_dir": "o", "tile": {"slides": ["a"]}, "cache": {"encoders": {}},
      "generate": {"pipeline": "p", "n": 2}, "export": {"format": "zip"}},
     r"export\.format: 'zip' is not one of imagefolder, webdataset, hf"),
    ({"output_dir": "o", "tile": {"slides": ["a"]}}, r"name: required field is missing"),
]


@pytest.mark.parametrize("data,match", BROKEN)
def test_broken_recipes_get_precise_messages(tmp_path, data, match):
    f = tmp_path / "r.yaml"
    f.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        load_recipe(f)


def test_unreadable_recipes(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("tile: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_recipe_train_step_uses_the_recipe_cache(cmu, tmp_path):
    train_cfg = tmp_path / "den.yaml"
    train_cfg.write_text(json.dumps({
        "task": "denoiser", "output_dir": "ignored", "steps": 3,
        "model": {"preset": "tiny", "overrides": {"in_channels": 3, "out_channels": 3, "caption_channels": 8,
                                                   "caption_num_tokens": 4}},
        "data": {"num_workers": 0}, "optim": {"batch_size": 4}, "log_every": 1}))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "train-only", "output_dir": str(tmp_path / "out"),
        "tile": {"slides": [str(cmu)], "mpp": 2.0, "size": 64},
        "cache": {"encoders": {"latents": "tiny_encoders:pooled_latents", "emb": "tiny_encoders:color_tokens"}},
        "train": {"config": str(train_cfg), "overrides": {"optim": {"lr": 1e-3}}}}))
    r = load_recipe(recipe)
    run(r, echo=lambda *_: None)
    cfg = json.loads((tmp_path / "out" / "train" / "config.json").read_text())
    assert cfg["data"]["cache"] == str(tmp_path / "out" / "cache") and cfg["optim"]["lr"] == 1e-3
    assert (tmp_path / "out" / "train" / "model" / "config.json").exists()
    train_cfg.write_text(train_cfg.read_text().replace('"steps": 3', '"steps": 4'))  # editing the file reruns train
    assert [a for *_, a in plan(r)] == ["skip", "skip", "run"]


def test_gpu_scale_recipes_validate():
    """The PixCell-scale recipes and the 8-GPU training config are valid as shipped (they need a GPU
    and the hub to run; here they must at least parse, name real presets and hub specs)."""
    from synthgen.config import load_train_config
    from synthgen.models.presets import denoiser_config

    for name, tokens in (("pixcell_256", 1), ("pixcell_1024", 16)):
        r = load_recipe(REPO / "recipes" / f"{name}.yaml")
        assert r.tile.mpp == 0.5 and "MahmoodLab/UNI2-h" in r.cache.encoders["emb"]
        assert ("#grid=4" in r.cache.encoders["emb"]) == (tokens == 16)
    cfg = load_train_config(REPO / "recipes" / "train" / "pixcell_256_8gpu.yaml")
    assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing
    assert denoiser_config(cfg.model.preset)["caption_channels"] == 1536


def test_encoder_spec_options(tmp_path):
    from synthgen.encoders.load import load_encoder
    from synthgen.errors import SynthgenError
    from synthgen.models.vae import VAE

    VAE.from_preset("tiny").model.save_pretrained(tmp_path / "pipe" / "vae")
    enc = load_encoder(f"vae:{tmp_path / 'pipe'}#subfolder=vae")  # same as the automatic subfolder
    assert enc.downscale == load_encoder(f"vae:{tmp_path / 'pipe'}").downscale
    with pytest.raises(SynthgenError, match="unknown option 'grid=4'"):
        load_encoder(f"vae:{tmp_path / 'pipe'}#grid=4")
    with pytest.raises(SynthgenError, match="grid must be a positive integer"):
        load_encoder("timm:hf-hub:MahmoodLab/UNI2-h#grid=four")


def test_recipe_tile_step_is_the_tile_command(cmu, tmp_path):
    """The recipe step runs the command's workflow: it refuses two copies of one slide (same content
    key) as `synthgen tile` does, and its cache records the tiles' scale."""
    import shutil

    from synthgen.data.cache import CacheDataset
    from synthgen.errors import SynthgenError

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(cmu, tmp_path / name / cmu.name)
    f = tmp_path / "r.yaml"
    f.write_text(json.dumps({"name": "dup", "output_dir": str(tmp_path / "o"),
                             "tile": {"slides": [str(tmp_path / "a"), str(tmp_path / "b")], "mpp": 4.0, "size": 32}}))
    with pytest.raises(SynthgenError, match="same slide key"):
        run(load_recipe(f), echo=lambda *_: None)
    enc = "ssl:" + str(REPO / "checkpoints" / "synthgen-small-cmu" / "image_encoder")
    f.write_text(json.dumps({"name": "one", "output_dir": str(tmp_path / "o2"),
                             "tile": {"slides": [str(tmp_path / "a")], "mpp": 4.0, "size": 64},
                             "cache": {"encoders": {"emb": enc}}}))
    run(load_recipe(f), echo=lambda *_: None)
    assert CacheDataset(tmp_path / "o2" / "cache").mpp == 4.0
