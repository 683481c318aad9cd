"""Mixed precision at inference: dtype resolution, bf16 autocast output against fp32, manifests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from conftest import SMALL

from synthgen.augment import PipelineGenerator
from synthgen.errors import SynthgenError
from synthgen.pipelines.precision import cpu_has_fast_bf16, resolve_dtype


def test_resolve_dtype():
    assert resolve_dtype("fp32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    assert resolve_dtype("auto", "cpu") == resolve_dtype(None, "cpu") == (
        torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    with pytest.raises(ValueError, match="dtype must be one of auto, fp32, bf16, fp16"):
        resolve_dtype("int8", "cpu")


def test_bf16_close_to_fp32_and_reproducible(small_pipe):
    emb = small_pipe.transformer.null_conditions(1)["embeddings"]
    g = torch.Generator().manual_seed(0)
    emb = emb + 0.5 * torch.randn(6, *emb.shape[1:], generator=g)  # six different conditions

    def run(dtype, output_type="pt"):
        return small_pipe(embeddings=emb, seeds=range(6), num_inference_steps=8, dtype=dtype,
                          output_type=output_type).images

    fp32, bf16 = run("fp32"), run("bf16")
    assert torch.equal(bf16, run("bf16"))  # the same seed regenerates exactly at the same dtype
    diff = (fp32.float() - bf16.float()).abs()
    assert 0 < diff.mean() < 4.0, diff.mean()  # grey levels of 255: rounding, not another image
    # each bf16 image is nearest to its own fp32 image (same content), not to another seed's
    d = torch.cdist(bf16.flatten(1).float(), fp32.flatten(1).float())
    assert torch.equal(d.argmin(1), torch.arange(6))
    assert run("bf16", "latent").dtype == torch.float32


def test_cli_records_dtype(tmp_path):
    run_cli(["generate", str(SMALL), "-o", str(tmp_path / "a"), "-n", "2", "--mode", "variations", "--steps", "2",
             "--dtype", "fp32"])
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["dtype"] == "fp32"
    run_cli(["generate", str(SMALL), "-o", str(tmp_path / "b"), "-n", "2", "--mode", "variations", "--steps", "2"])
    auto = json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"]
    assert auto == ("bf16" if cpu_has_fast_bf16() else "fp32")


def test_augment_generator_dtype_in_cache_key():
    a = PipelineGenerator(SMALL, dtype="fp32")
    b = PipelineGenerator(SMALL, dtype="bf16")
    assert a.fingerprint() != b.fingerprint()
    assert PipelineGenerator(SMALL).fingerprint() == (b if cpu_has_fast_bf16() else a).fingerprint()
    with pytest.raises(SynthgenError, match="dtype must be"):
        PipelineGenerator(SMALL, dtype="half-ish")
    refs = torch.from_numpy(np.full((2, 3, 64, 64), 200, np.uint8))
    out = b([0, 0], refs, [1, 2])
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 64, 64)
