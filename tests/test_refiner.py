"""The convolutional refiner after the denoiser's output (U-ViT's 3x3 conv, grown)."""

import json

import pytest
import torch

from synthgen.models.denoiser import Denoiser
from synthgen.models.presets import denoiser_config


def _tiny(**kw):
    return Denoiser(**denoiser_config("small-v2", num_layers=2, num_sources=3, **kw)).eval()


def _inputs(b=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 32, 32, generator=g)
    emb = torch.randn(b, 4, 128, generator=g)
    return x, torch.tensor([5, 500, 999][:b]), emb, torch.tensor([0, 1, -1][:b])


def test_with_refiner_starts_as_the_base_and_then_trains():
    torch.manual_seed(0)
    base = _tiny()
    new = Denoiser.with_refiner(base, 32)
    x, t, emb, src = _inputs()
    with torch.no_grad():
        want = base(x, t, embeddings=emb, source_labels=src).sample
        got = new(x, t, embeddings=emb, source_labels=src).sample
        got_tuple = new(x, t, embeddings=emb, source_labels=src, return_dict=False)[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_tuple, want)
    assert new.config.refine_channels == 32 and base.config.refine_channels == 0
    # one optimiser step moves the output: the zero last layer receives a gradient
    opt = torch.optim.SGD(new.refiner.parameters(), lr=1.0)
    new.train()
    loss = new(x, t, embeddings=emb, source_labels=src).sample.square().mean()
    loss.backward()
    assert new.refiner.conv_out.weight.grad.abs().sum() > 0
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(new.eval()(x, t, embeddings=emb, source_labels=src).sample, want)
    with pytest.raises(ValueError, match="refiner already"):
        Denoiser.with_refiner(new)


def test_refiner_round_trips_and_depends_on_the_timestep(tmp_path):
    torch.manual_seed(1)
    net = _tiny(refine_channels=16, refine_depth=1)
    torch.nn.init.normal_(net.refiner.conv_out.weight, std=0.1)  # a trained refiner is not zero
    net.save_pretrained(tmp_path / "m")
    back = Denoiser.from_pretrained(tmp_path / "m").eval()
    x, t, emb, src = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, embeddings=emb, source_labels=src).sample,
                                   net(x, t, embeddings=emb, source_labels=src).sample)
        r = net.refiner
        pred = torch.zeros_like(x)
        assert not torch.allclose(r(x, pred, torch.tensor([1, 1])), r(x, pred, torch.tensor([900, 900])))


def test_training_config_adds_a_refiner_to_a_pretrained_denoiser(tmp_path):
    from synthgen.config import ConfigError, load_train_config
    from synthgen.training.tasks import DenoiserTask

    _tiny().save_pretrained(tmp_path / "base")
    def config(name, overrides):
        cfg = {"task": "denoiser", "steps": 1, "output_dir": str(tmp_path / "o"),
               "model": {"pretrained": str(tmp_path / "base"), "overrides": overrides}}
        (tmp_path / name).write_text(json.dumps(cfg))
        return load_train_config(tmp_path / name)

    task = DenoiserTask(config("c.json", {"refine_channels": 16}))
    assert task.net.config.refine_channels == 16 and task.net.refiner is not None

    with pytest.raises(ConfigError, match="num_layers'] differ from the pretrained"):
        DenoiserTask(config("d.json", {"num_layers": 5}))
