"""The bad-input corpus: each case runs one ``synthgen`` command on a bad input and checks the
exit status, that no traceback escapes, and that stderr names the file or field at fault.

The commands run in-process (``synthgen.cli.main``), so an exception other than SystemExit
fails the case (a traceback in the terminal). Inputs are tiny; the shipped pipeline and the
real CMU slide provide the tissue where it matters.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synthgen.cli import main

REPO = Path(__file__).resolve().parents[1]
PIPE = REPO / "checkpoints" / "synthgen-small-cmu"
SSL = f"ssl:{PIPE / 'image_encoder'}"


def _live_lock(folder: Path, name: str = ".synthgen.lock") -> Path:
    """A lock owned by a live process of this host (pid 1, which never exits)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "generate"}))
    return folder


def _gen_output(root: Path, n: int = 3) -> Path:
    """A finished `synthgen generate` output (images + manifest), made without a model."""
    from synthgen._io import sha256_file

    (root / "images").mkdir(parents=True)
    items = []
    rng = np.random.default_rng(0)
    for i in range(n):
        rel = f"images/{i:07d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / rel)
        items.append({"index": i, "file": rel, "seed": i, "label": 0, "condition": "class", "accepted": None,
                      "sha256": sha256_file(root / rel)})
    (root / "manifest.json").write_text(json.dumps({"model_sha256": None, "mode": "class", "num_items": n,
                                                    "items": items}))
    return root


@pytest.fixture(scope="module")
def w(cmu, tmp_path_factory) -> Path:
    """A workspace of bad (and a few good) inputs, shared by every case."""
    root = tmp_path_factory.mktemp("bad")
    (root / "bad.svs").write_text("not a slide")
    (root / "cmu.svs").symlink_to(cmu)
    (root / "empty").mkdir()
    (root / "afile").write_text("a file, not a folder")
    (root / "cols.csv").write_text("a,b\n1,2\n")
    (root / "badrow.csv").write_text("slide_key,x,y,mpp,size,tissue_fraction\nk,ten,0,1.0,32,0.9\n")
    # a real tile table (tissue matters for the cache cases)
    tiles = root / "tiles.csv"
    main_ok(["tile", str(cmu), "--mpp", "4.0", "--size", "16", "-o", str(tiles)])
    # pipelines with one component missing or broken (symlinks to the shipped one)
    for name, drop in [("no_transformer", "transformer"), ("no_index", "model_index.json"),
                       ("broken_vae", "vae"), ("no_weights", "image_encoder")]:
        p = root / name
        p.mkdir()
        for c in PIPE.iterdir():
            if c.name != drop:
                (p / c.name).symlink_to(c)
    (root / "broken_vae" / "vae").mkdir()
    (root / "broken_vae" / "vae" / "config.json").write_text("{not json")
    (root / "no_weights" / "image_encoder").mkdir()
    shutil.copy(PIPE / "image_encoder" / "config.json", root / "no_weights" / "image_encoder")
    # condition masks
    for name, arr in [("neg", np.full((64, 64), -1, np.int32)), ("small", np.ones((8, 8), np.uint8))]:
        (root / f"masks_{name}").mkdir()
        Image.fromarray(arr).save(root / f"masks_{name}" / ("m.tif" if name == "neg" else "m.png"))
    (root / "masks_rgb").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "masks_rgb" / "m.png")
    # recipes and train configs
    slide = str(cmu)
    recipes = {
        "neg_mpp": {"tile": {"slides": [slide], "mpp": -1.0}},
        "zero_size": {"tile": {"slides": [slide], "size": 0}},
        "bad_roi": {"tile": {"slides": [slide], "roi": [0, 0, 2, 1]}},
        "overlap": {"tile": {"slides": [slide], "size": 32, "overlap": 32}},
        "unknown": {"tile": {"slides": [slide], "mppp": 1.0}},
        "gen": {"generate": {"pipeline": str(PIPE), "n": 4, "mode": "class", "label": 0}},
        "flagged": {"tile": {"slides": [slide]}, "generate": {"pipeline": str(PIPE), "n": 4, "mode": "class"},
                    "export": {"max_flagged": 2.0}},
        "cache_bs": {"tile": {"slides": [slide]}, "cache": {"encoders": {"emb": SSL}, "batch_size": 0}},
    }
    for name, body in recipes.items():
        (root / f"r_{name}.yaml").write_text(json.dumps({"name": name, "output_dir": str(root / "r_out"), **body}))
    (root / "bad.yaml").write_text("name: [unclosed\n")
    train = {"task": "denoiser", "output_dir": str(root / "train_out"), "steps": 2,
             "model": {"preset": "tiny"}, "data": {"cache": str(root / "nocache"), "num_workers": 0}}
    (root / "train.yaml").write_text(json.dumps(train))
    (root / "train_unknown.yaml").write_text(json.dumps({**train, "stepz": 3}))
    (root / "train_locked.yaml").write_text(json.dumps({**train, "output_dir": str(_live_lock(root / "tlock"))}))
    # generate outputs for export / verify
    _gen_output(root / "gen")
    _gen_output(root / "gen_missing")
    (root / "gen_missing" / "images" / "0000001.png").unlink()
    _gen_output(root / "gen_tampered")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "gen_tampered" / "images" / "0000002.png")
    (root / "nest").mkdir()
    _gen_output(root / "nest" / "src")
    main_ok(["export", str(root / "gen"), "-o", str(root / "exp")])
    shutil.copytree(root / "exp", root / "exp_tampered")
    victim = next((root / "exp_tampered").rglob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"x")
    return root


def main_ok(args: list[str]) -> None:
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), e


def run(args: list, capsys) -> tuple[int, str]:
    """Exit status and stderr of one in-process command; any other exception fails the test."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    _, err = capsys.readouterr()
    return code, err


# (id, args (a function of the workspace), exit status, what stderr must name)
CASES = [
    # -- tile
    ("tile-missing-file", lambda w: ["tile", w / "nope.svs", "-o", w / "t.csv"], 1, "nope.svs"),
    ("tile-corrupt-slide", lambda w: ["tile", w / "bad.svs", "-o", w / "t.csv"], 1, "bad.svs"),
    ("tile-negative-mpp", lambda w: ["tile", w / "bad.svs", "--mpp", "-1"], 2, "--mpp"),
    ("tile-bad-roi", lambda w: ["tile", w / "bad.svs", "--roi", "0,0,2,1"], 2, "roi"),
    ("tile-overlap-ge-size", lambda w: ["tile", w / "bad.svs", "--size", "32", "--overlap", "32"], 2, "overlap"),
    ("tile-no-slides", lambda w: ["tile", w / "empty"], 2, "empty"),
    ("tile-out-under-a-file", lambda w: ["tile", w / "cmu.svs", "--mpp", "4", "--size", "16", "-o",
                                         w / "afile" / "t.csv"], 1, "afile"),
    # -- cache
    ("cache-encoder-syntax", lambda w: ["cache", w / "tiles.csv", "-o", w / "c1", "-e", "latents"], 2, "--encoder"),
    ("cache-encoder-missing", lambda w: ["cache", w / "tiles.csv", "-o", w / "c1", "-e",
                                         f"emb=ssl:{w / 'no_encoder'}"], 1, "no_encoder"),
    ("cache-table-columns", lambda w: ["cache", w / "cols.csv", "-o", w / "c1", "-e", f"emb={SSL}"], 1, "cols.csv"),
    ("cache-table-row", lambda w: ["cache", w / "badrow.csv", "-o", w / "c1", "-e", f"emb={SSL}"], 1, "badrow.csv"),
    ("cache-mpp-alone", lambda w: ["cache", w / "empty", "-o", w / "c1", "-e", f"emb={SSL}", "--mpp", "1"], 2,
     "--image-mpp"),
    ("cache-source-missing", lambda w: ["cache", w / "nope.csv", "-o", w / "c1", "-e", f"emb={SSL}"], 2, "nope.csv"),
    ("cache-locked", lambda w: ["cache", w / "tiles.csv", "-o", _live_lock(w / "clock"), "-e", f"emb={SSL}"], 1,
     "clock"),
    # -- train
    ("train-missing-config", lambda w: ["train", w / "nope.yaml"], 1, "nope.yaml"),
    ("train-bad-yaml", lambda w: ["train", w / "bad.yaml"], 1, "bad.yaml"),
    ("train-unknown-field", lambda w: ["train", w / "train_unknown.yaml"], 1, "stepz"),
    ("train-negative-lr", lambda w: ["train", w / "train.yaml", "-o", "optim.lr=-1"], 1, "optim.lr"),
    ("train-bad-override", lambda w: ["train", w / "train.yaml", "-o", "steps"], 1, "steps"),
    ("train-missing-cache", lambda w: ["train", w / "train.yaml"], 1, "nocache"),
    ("train-locked", lambda w: ["train", w / "train_locked.yaml"], 1, "tlock"),
    # -- generate
    ("gen-no-transformer", lambda w: ["generate", w / "no_transformer", "-o", w / "g1", "-n", 1], 1, "transformer/"),
    ("gen-no-model-index", lambda w: ["generate", w / "no_index", "-o", w / "g1", "-n", 1], 1, "model_index.json"),
    ("gen-broken-vae", lambda w: ["generate", w / "broken_vae", "-o", w / "g1", "-n", 1], 1, "vae/config.json"),
    ("gen-no-weights", lambda w: ["generate", w / "no_weights", "-o", w / "g1", "-n", 1], 1, "image_encoder/"),
    ("gen-masks-negative", lambda w: ["generate", PIPE, "-o", w / "g2", "-n", 1, "--steps", 1, "--masks",
                                      w / "masks_neg"], 1, "m.tif"),
    ("gen-masks-colour", lambda w: ["generate", PIPE, "-o", w / "g3", "-n", 1, "--steps", 1, "--masks",
                                    w / "masks_rgb"], 1, "masks_rgb/m.png"),
    ("gen-masks-size", lambda w: ["generate", PIPE, "-o", w / "g4", "-n", 1, "--steps", 1, "--masks",
                                  w / "masks_small"], 1, "masks_small/m.png"),
    ("gen-masks-empty", lambda w: ["generate", PIPE, "-o", w / "g5", "-n", 1, "--masks", w / "empty"], 1, "empty"),
    ("gen-unknown-class", lambda w: ["generate", PIPE, "-o", w / "g6", "-n", 1, "--class", "NOSUCH"], 1, "NOSUCH"),
    ("gen-embedding-key", lambda w: ["generate", PIPE, "-o", w / "g6", "-n", 1, "--cache", PIPE / "bank",
                                     "--embedding-key", "nope"], 1, "nope"),
    ("gen-mode-mask", lambda w: ["generate", PIPE, "-o", w / "g6", "-n", 1, "--mode", "mask"], 1, "--masks"),
    ("gen-locked", lambda w: ["generate", PIPE, "-o", _live_lock(w / "glock"), "-n", 1], 1, "glock"),
    # -- stain
    ("stain-unknown", lambda w: ["stain", w / "masks_rgb", "--to", "nosuchstain", "-o", w / "s1", "--pipeline",
                                 PIPE], 2, "nosuchstain"),
    ("stain-source-missing", lambda w: ["stain", w / "nope", "--to", "ki67", "-o", w / "s1"], 2, "nope"),
    ("stain-eval-unpaired", lambda w: ["eval", "stain", w / "gen" / "images", w / "empty"], 2, "empty"),
    # -- export
    ("export-out-inside-source", lambda w: ["export", w / "gen", "-o", w / "gen" / "inside"], 1, "inside"),
    ("export-source-inside-out", lambda w: ["export", w / "nest" / "src", "-o", w / "nest"], 1, "contains"),
    ("export-no-manifest", lambda w: ["export", w / "empty", "-o", w / "e1"], 1, "empty"),
    ("export-out-exists", lambda w: ["export", w / "gen", "-o", w / "exp"], 1, "exp"),
    ("export-missing-item", lambda w: ["export", w / "gen_missing", "-o", w / "e2"], 1, "0000001.png"),
    ("export-tampered", lambda w: ["export", w / "gen_tampered", "-o", w / "e3"], 1, "0000002.png"),
    ("export-flag-without-audit", lambda w: ["export", w / "gen", "-o", w / "e4", "--drop-flagged"], 2,
     "--audit-against"),
    ("export-locked", lambda w: ["export", w / "gen", "-o", w / "e5",
                                 *([] if _live_lock(w, ".e5.lock") else [])], 1, ".e5.lock"),
    # -- verify
    ("verify-no-manifest", lambda w: ["verify", w / "empty"], 1, "empty"),
    ("verify-tampered", lambda w: ["verify", w / "exp_tampered"], 1, ".png"),
    ("verify-not-a-folder", lambda w: ["verify", w / "afile"], 2, "afile"),
    # -- eval
    ("eval-fidelity-empty", lambda w: ["eval", "fidelity", w / "empty", w / "gen" / "images"], 1, "empty"),
    ("eval-fidelity-encoder", lambda w: ["eval", "fidelity", w / "gen" / "images", w / "gen" / "images", "-e",
                                         "ssl:/nope/enc"], 1, "/nope/enc"),
    ("eval-report-partial", lambda w: ["eval", "report", w / "gen" / "images", w / "gen" / "images", "-o", w / "rep",
                                       "--utility-train", w / "empty"], 2, "--utility-test"),
    ("eval-masks-pairs", lambda w: ["eval", "masks", PIPE, w / "empty"], 2, "empty"),
    # -- run (recipes: checked at load, so --dry-run catches them)
    ("run-negative-mpp", lambda w: ["run", w / "r_neg_mpp.yaml", "--dry-run"], 1, "tile.mpp"),
    ("run-zero-size", lambda w: ["run", w / "r_zero_size.yaml", "--dry-run"], 1, "tile.size"),
    ("run-bad-roi", lambda w: ["run", w / "r_bad_roi.yaml", "--dry-run"], 1, "tile.roi"),
    ("run-overlap", lambda w: ["run", w / "r_overlap.yaml", "--dry-run"], 1, "tile.overlap"),
    ("run-unknown-field", lambda w: ["run", w / "r_unknown.yaml", "--dry-run"], 1, "tile.mppp"),
    ("run-override-n", lambda w: ["run", w / "r_gen.yaml", "--dry-run", "-o", "generate.n=0"], 1, "generate.n"),
    ("run-override-steps", lambda w: ["run", w / "r_gen.yaml", "--dry-run", "-o", "generate.steps=-3"], 1,
     "generate.steps"),
    ("run-max-flagged", lambda w: ["run", w / "r_flagged.yaml", "--dry-run"], 1, "export.max_flagged"),
    ("run-cache-batch", lambda w: ["run", w / "r_cache_bs.yaml", "--dry-run"], 1, "cache.batch_size"),
    ("run-missing-recipe", lambda w: ["run", w / "nope.yaml", "--dry-run"], 1, "nope.yaml"),
    ("run-bad-yaml", lambda w: ["run", w / "bad.yaml", "--dry-run"], 1, "bad.yaml"),
]


def test_corpus_is_large_and_covers_every_command():
    assert len(CASES) >= 40
    commands = {c[0].split("-")[0] for c in CASES}
    assert {"tile", "cache", "train", "gen", "stain", "export", "verify", "eval", "run"} <= commands


@pytest.mark.parametrize("make_args, code, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(w, capsys, make_args, code, needle):
    got, err = run(make_args(w), capsys)
    assert "Traceback" not in err, err
    assert got == code, err
    assert needle in err, err
    assert "Error: :" not in err, err
    assert err.count("Error:") <= 1, err  # one message


def test_value_error_of_a_config_object_is_one_line(monkeypatch, capsys):
    """A range check of a config object that escapes (a ValueError) is a message, not a traceback."""
    import synthgen.recipes

    def bad(*a, **k):
        raise ValueError("TileSpec.mpp = -1.0: must be a positive number of microns per pixel")

    monkeypatch.setattr(synthgen.recipes, "load_recipe", bad)
    code, err = run(["run", "any.yaml"], capsys)
    assert code == 1 and "TileSpec.mpp" in err and "Traceback" not in err


def test_verbose_shows_the_traceback(w):
    """-v prints the traceback above the one-line message; without it there is none."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "synthgen", "run", str(w / "r_neg_mpp.yaml"), "--dry-run"]
    quiet = subprocess.run(args, capture_output=True, text=True, env=env)
    loud = subprocess.run([*args[:3], "-v", *args[3:]], capture_output=True, text=True, env=env)
    assert quiet.returncode == loud.returncode == 1
    assert "Traceback" not in quiet.stderr and "tile.mpp" in quiet.stderr
    assert "Traceback" in loud.stderr and loud.stderr.strip().splitlines()[-1].startswith("Error: tile.mpp")
