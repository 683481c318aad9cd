import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_encoders import color_tokens, nan_tokens, pooled_latents  # noqa: E402 (tests/ is on sys.path)
from torch.utils.data import DataLoader

from synthgen.data.cache import CacheDataset, build_cache
from synthgen.data.datasets import ImageListDataset, PatchDataset
from synthgen.data.slides import Slide
from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table
from synthgen.errors import CacheError

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def table(cmu, tmp_path_factory):
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=1.0, size=64), key="cmu")
    path = tmp_path_factory.mktemp("cache-tiles") / "tiles.csv"
    write_tile_table(tiles, path, {"cmu": {"path": str(cmu), "mpp": 0.499}})
    return path


def _encoders():
    return {"latents": pooled_latents(), "emb": color_tokens()}


def test_cache_round_trip(table, tmp_path):
    ds = PatchDataset(table)
    out = build_cache(ds, tmp_path / "c", _encoders(), shard_size=40, batch_size=16, progress=False)
    cache = CacheDataset(out)
    assert len(cache) == len(ds)
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) == (len(ds) + 39) // 40
    assert index["item_shapes"]["latents"] == [3, 8, 8] and index["item_shapes"]["emb"] == [4, 8]
    for i in (0, 39, 40, len(ds) - 1):
        item = cache[i]
        img = ds[i]["image"][None]
        assert item["index"] == i
        torch.testing.assert_close(item["latents"], pooled_latents()(img)[0], rtol=0, atol=0)
        torch.testing.assert_close(item["emb"], color_tokens()(img)[0], rtol=0, atol=0)
    batch = next(iter(DataLoader(cache, batch_size=8, shuffle=True, num_workers=2)))
    assert batch["latents"].shape == (8, 3, 8, 8) and batch["emb"].shape == (8, 4, 8)
    cache.verify()
    with pytest.raises(CacheError, match="cache has no vae"):
        CacheDataset(out, keys=["vae"])


def test_cache_labels_and_float16(kather, tmp_path):
    ds = ImageListDataset.from_folder(kather, size=64)
    out = build_cache(ds, tmp_path / "c", {"emb": color_tokens()}, shard_size=10, dtype=torch.float16, progress=False)
    cache = CacheDataset(out)
    assert [cache[i]["label"] for i in range(len(cache))] == ds.labels
    assert cache[0]["emb"].dtype == torch.float16


def test_cache_refuses_other_config_and_nan(table, tmp_path):
    ds = PatchDataset(table)
    build_cache(ds, tmp_path / "c", {"emb": color_tokens()}, shard_size=64, progress=False)
    with pytest.raises(CacheError, match="another configuration.*shard_size"):
        build_cache(ds, tmp_path / "c", {"emb": color_tokens()}, shard_size=32, progress=False)
    with pytest.raises(CacheError, match=r"encoder 'emb' returned NaN/Inf for dataset item\(s\) \[2\]"):
        build_cache(ds, tmp_path / "n", {"emb": nan_tokens()}, shard_size=64, batch_size=8, progress=False)
    assert not list((tmp_path / "n").glob("shard-*"))  # nothing half-written
    with pytest.raises(CacheError, match="no index.json"):
        CacheDataset(tmp_path / "n")


def test_tampered_shard_is_detected(table, tmp_path):
    out = build_cache(PatchDataset(table), tmp_path / "c", {"emb": color_tokens()}, shard_size=64, progress=False)
    shard = out / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00000.safetensors: checksum differs"):
        CacheDataset(out).verify()


def _cli(args, **kw):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(kw.pop("env", {}))
    return [sys.executable, "-m", "synthgen", *args], env


def test_killed_cache_resumes_to_identical_content(table, tmp_path):
    args = ["cache", str(table), "--encoder", "latents=tiny_encoders:pooled_latents",
            "--encoder", "emb=tiny_encoders:slow_color_tokens", "--shard-size", "16", "--batch-size", "8",
            "--num-workers", "0"]
    cmd, env = _cli([*args, "-o", str(tmp_path / "killed")], env={"SYNTHGEN_TEST_DELAY": "0.25"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "killed").glob("shard-*.safetensors"))) < 2:
        assert proc.poll() is None, "cache run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((tmp_path / "killed").glob("shard-*.safetensors"))
    assert not (tmp_path / "killed" / "index.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}
    # resume, and a clean uninterrupted run to compare with
    for name in ("killed", "clean"):
        cmd, env = _cli([*args, "-o", str(tmp_path / name)], env={"SYNTHGEN_TEST_DELAY": "0"})
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    for p in done:  # finished shards were skipped, not recomputed
        assert p.stat().st_mtime_ns == mtimes[p.name]
    killed = json.loads((tmp_path / "killed" / "index.json").read_text())
    clean = json.loads((tmp_path / "clean" / "index.json").read_text())
    assert killed == clean
    assert len(clean["shards"]) > len(done)
    for s in clean["shards"]:
        a = load_file(tmp_path / "killed" / s["file"])
        b = load_file(tmp_path / "clean" / s["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "killed").glob(".*tmp*"))


def test_cli_builtin_encoder_kinds(table, tmp_path):
    """`synthgen cache -e latents=vae:DIR -e emb=ssl:DIR` caches what those models compute."""
    from synthgen.cli import main
    from synthgen.encoders.ssl import SSLEncoder
    from synthgen.models.presets import encoder_config
    from synthgen.models.vae import VAE

    torch.manual_seed(0)
    vae, enc = VAE.from_preset("tiny").eval(), SSLEncoder(**encoder_config("tiny")).eval()
    vae.save_pretrained(tmp_path / "vae")
    enc.save_pretrained(tmp_path / "ssl")
    main(["cache", str(table), "-o", str(tmp_path / "c"), "-e", f"latents=vae:{tmp_path / 'vae'}",
          "-e", f"emb=ssl:{tmp_path / 'ssl'}", "--num-workers", "0", "--shard-size", "50"])
    cache = CacheDataset(tmp_path / "c")
    img = PatchDataset(table)[7]["image"][None]
    with torch.no_grad():
        torch.testing.assert_close(cache[7]["latents"], vae.encode(img)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache[7]["emb"], enc(img)[0], rtol=1e-5, atol=1e-5)
    assert cache[7]["latents"].shape == (4, 16, 16) and cache[7]["emb"].shape == (1, 32)
