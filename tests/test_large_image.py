import numpy as np
import pytest
import torch

from synthgen.data.slides import Slide
from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config
from synthgen.models.vae import VAE
from synthgen.pipelines.generate import SynthPipeline
from synthgen.pipelines.large_image import generate_large, window_starts, write_pyramidal_tiff
from synthgen.sampling import make_scheduler


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = SynthPipeline(Denoiser(**denoiser_config("tiny")).eval(), VAE.from_preset("tiny").model.eval(),
                      make_scheduler("epsilon"))
    p.set_progress_bar_config(disable=True)
    return p


def test_window_starts_cover_the_canvas():
    assert window_starts(8, 8, 4) == [0]
    s = window_starts(24, 8, 4)
    assert s[0] == 0 and s[-1] == 16 and all(b - a <= 4 for a, b in zip(s, s[1:], strict=False))


def test_canvas_shape_and_reproducibility(pipe):
    emb = torch.randn(1, 32, generator=torch.Generator().manual_seed(0))
    a = generate_large(pipe, emb, size=96, seed=3, num_inference_steps=4, progress=False)
    b = generate_large(pipe, emb, size=96, seed=3, num_inference_steps=4, progress=False)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8 and np.array_equal(a, b)


def test_large_image_in_bf16_is_close_to_fp32(small_pipe):
    """The canvas samples under the pipeline's autocast (bf16 on CPUs with native bf16) and stays
    close to fp32, like a tile; guidance_interval reaches the one sampling loop."""
    from conftest import SMALL

    from synthgen.workflows.generate import embedding_bank

    emb = embedding_bank(SMALL / "bank")[0][:4].reshape(2, 2, 1, -1)
    kw = dict(size=96, seed=3, num_inference_steps=4, progress=False)
    fp32 = generate_large(small_pipe, emb, dtype="fp32", **kw).astype(int)
    bf16 = generate_large(small_pipe, emb, dtype="bf16", **kw).astype(int)
    assert np.abs(fp32 - bf16).mean() < 3
    interval = generate_large(small_pipe, emb, dtype="fp32", guidance_interval=(0.5, 1.0), **kw).astype(int)
    assert np.abs(fp32 - interval).mean() > 0.1  # the first half of the steps ran without guidance


def test_embedding_grid_shape_is_checked(pipe):
    with pytest.raises(ValueError, match=r"needs 3x3 windows"):
        generate_large(pipe, torch.randn(2, 2, 1, 32), size=64, progress=False)
    with pytest.raises(ValueError, match="multiple of"):
        generate_large(pipe, torch.randn(1, 32), size=30, progress=False)


def test_pyramidal_tiff_opens_in_openslide(tmp_path):
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), np.ones((16, 16, 1), np.uint8))  # 640 px
    path = write_pyramidal_tiff(tmp_path / "synthetic.tif", img, mpp=0.5)
    with Slide(path) as s:
        assert s.vendor == "generic-tiff" and s.mpp == pytest.approx(0.5)
        assert s.level_count == 3 and s.dimensions == (640, 640)
        np.testing.assert_array_equal(s.read(64, 96, 128), img[96:224, 64:192])
        np.testing.assert_array_equal(s.read(0, 0, 64, mpp=1.0), img[:128:2, :128:2])
    assert not list(tmp_path.glob(".*tmp"))
