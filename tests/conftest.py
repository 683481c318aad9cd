"""Shared fixtures: the real data in ../shared/data and small files made from it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# No test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SYNTHGEN_TEST_DATA", REPO.parent / "shared" / "data"))
CMU = DATA / "slides" / "CMU-1-Small-Region.svs"
TCGA = DATA / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
KATHER = DATA / "classes" / "kather2016"
SMALL = REPO / "checkpoints" / "synthgen-small-cmu"  # the shipped default pipeline
V2 = REPO / "checkpoints" / "synthgen-v2"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not CMU.exists():
        pytest.fail(f"real test data not found at {DATA}: put shared/ beside the repo or set SYNTHGEN_TEST_DATA")
    return DATA


@pytest.fixture(scope="session")
def cmu(data_dir) -> Path:
    return CMU


@pytest.fixture(scope="session")
def tcga(data_dir) -> Path:
    return TCGA


@pytest.fixture(scope="session")
def kather(data_dir) -> Path:
    return KATHER


def _shipped(folder: Path):
    from synthgen.pipelines.generate import SynthPipeline

    p = SynthPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def small_pipe():
    """The shipped default pipeline, loaded once for the session (tests must not modify it)."""
    return _shipped(SMALL)


@pytest.fixture(scope="session")
def v2_pipe():
    """The shipped v2 pipeline, loaded once for the session (tests must not modify it)."""
    return _shipped(V2)


def block_pattern(blocks: int = 64, block: int = 16, seed: int = 0) -> np.ndarray:
    """(blocks*block)^2 RGB image of constant-colour blocks: exact under 2x/4x averaging."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (blocks, blocks, 3), dtype=np.uint8)
    return np.kron(base, np.ones((block, block, 1), np.uint8))


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory) -> tuple[Path, np.ndarray, float]:
    """A 3-level pyramidal TIFF at 0.25 um/px written by tifffile, with its level-0 pixels."""
    import tifffile

    img = block_pattern()
    mpp = 0.25
    path = tmp_path_factory.mktemp("tiff") / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        for i in range(3):
            level = img[:: 2**i, :: 2**i]
            res = 1e4 / (mpp * 2**i)  # pixels per centimetre
            tw.write(level, tile=(128, 128), photometric="rgb", compression="zlib",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
    return path, img, mpp
