"""The sharpness terms of the VAE objective and the discriminator trained in the same loop."""

import pytest
import torch
import torch.nn.functional as F

from synthgen.config import ConfigError, load_train_config
from synthgen.data.slides import Slide
from synthgen.models.discriminator import (
    PatchDiscriminator,
    frequency_loss,
    generator_adversarial_loss,
    gradient_loss,
    hinge_d_loss,
)
from synthgen.training.trainer import train


@pytest.fixture(scope="module")
def tiles(cmu):
    with Slide(cmu) as s:
        return torch.stack([torch.from_numpy(s.read(600 + 64 * i, 900, 64, mpp=0.5)).permute(2, 0, 1)
                            for i in range(8)])


def test_blur_is_penalised_by_gradient_and_frequency_terms(tiles):
    x = tiles.float() / 127.5 - 1
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    shifted = (x + 0.05).clamp(-1, 1)  # a colour shift of about the same L1 size, no blur
    assert F.l1_loss(blurred, x) < 2 * F.l1_loss(shifted, x)
    assert gradient_loss(blurred, x) > 3 * gradient_loss(shifted, x)
    assert frequency_loss(blurred, x) > 3 * frequency_loss(shifted, x)
    assert gradient_loss(x, x) == 0 and frequency_loss(x, x) == 0


def test_generator_term_leaves_the_discriminator_alone(tiles):
    d = PatchDiscriminator(width=8, num_layers=2)
    fake = (tiles.float() / 127.5 - 1).requires_grad_()
    generator_adversarial_loss(d, fake).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    loss = hinge_d_loss(d(fake.detach()), d(fake.detach() * 0))
    loss.backward()
    assert all(p.grad is not None for p in d.parameters())


def _cfg(cmu_table, out, **objective):
    return load_train_config(None, {
        "task": "vae", "output_dir": str(out), "steps": 12, "seed": 0, "model": {"preset": "tiny"},
        "data": {"tiles": str(cmu_table), "crop": 32, "crop_stride": 32, "dihedral": True, "num_workers": 0},
        "objective": {"gradient_weight": 1.0, "frequency_weight": 1.0, "adversarial_weight": 0.1,
                      "adversarial_start": 4, "disc_width": 8, "disc_layers": 2, **objective},
        "optim": {"lr": 2e-3, "batch_size": 8}, "log_every": 4, "checkpoint_every": 4, "ema_decay": 0.0})


@pytest.fixture(scope="module")
def cmu_table(cmu, tmp_path_factory):
    from synthgen.data.tiling import TileSpec, tile_slide, write_tile_table

    root = tmp_path_factory.mktemp("vae-tiles")
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=1.0, size=64, min_tissue=0.5), key="cmu")[:24]
    return write_tile_table(tiles, root / "t.csv", {"cmu": {"path": str(cmu)}})


def test_adversarial_vae_trains_saves_only_the_autoencoder_and_resumes_exactly(cmu_table, tmp_path):
    from safetensors.torch import load_file

    full = train(_cfg(cmu_table, tmp_path / "full"), progress=False)
    part = train(_cfg(cmu_table, tmp_path / "part"), stop_at=6, progress=False)  # after the adversarial start
    assert part.interrupted
    rest = train(_cfg(cmu_table, tmp_path / "part"), resume="latest", progress=False)
    a, b = full.model.state_dict(), rest.model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    saved = load_file(tmp_path / "full" / "model" / "diffusion_pytorch_model.safetensors")
    assert not any("disc" in k for k in saved) and set(saved) == {k.removeprefix("model.") for k in a}
    # the discriminator was trained: its weights moved from their initialisation
    ckpt = sorted((tmp_path / "full" / "checkpoints").glob("step-*"))[-1]
    state = load_file(ckpt / "model.safetensors")
    disc = {k: v for k, v in state.items() if k.startswith("disc.")}
    torch.manual_seed(0)
    assert disc and any(not torch.equal(v, PatchDiscriminator(width=8, num_layers=2).state_dict()[k[5:]])
                        for k, v in disc.items())


def test_bad_sharpness_settings_are_named(cmu_table, tmp_path):
    with pytest.raises(ConfigError, match="objective.adversarial_weight: must be >= 0"):
        _cfg(cmu_table, tmp_path, adversarial_weight=-1)
    with pytest.raises(ConfigError, match="data.crop_stride, data.dihedral: need data.crop"):
        load_train_config(None, {"task": "vae", "output_dir": "x", "steps": 1, "data": {"dihedral": True}})
