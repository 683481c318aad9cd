import json

import pytest
import torch
from pixcell_reference import (
    pixcell_config,
    pixcell_y_pos_embed,
    reference_forward,
    write_pixcell_folder,
)
from safetensors.torch import load_file, save_file

from synthgen.errors import CheckpointError
from synthgen.models.denoiser import Denoiser, condition_pos_embed
from synthgen.models.presets import denoiser_config


@pytest.mark.parametrize("tokens,sample,pe", [(1, 8, 0.5), (16, 16, 2.0)])
def test_pixcell_layout_loads_and_matches_reference(tmp_path, tokens, sample, pe):
    """A random checkpoint in PixCell's exact key layout and config loads into Denoiser, and
    Denoiser's output equals the independent reference forward (PixCell-256-like: 1 token;
    PixCell-1024-like: a 4x4 grid of tokens with y_pos_embed)."""
    cfg = pixcell_config(sample=sample, tokens=tokens, cap=32, pe=pe)
    sd = write_pixcell_folder(tmp_path / "transformer", cfg)
    model = Denoiser.from_pretrained(tmp_path, subfolder="transformer").eval()
    assert model.config.caption_num_tokens == tokens
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, sample, sample, generator=g)
    t = torch.tensor([0, 437, 999])
    emb = torch.randn(3, tokens, 32, generator=g)
    with torch.no_grad():
        ours = model(x, t, embeddings=emb).sample
        ref = reference_forward(sd, cfg, x, t, emb)
        # the null embedding stored in the checkpoint drives the unconditional branch
        null = model.null_conditions(3)["embeddings"]
        ours_null = model(x, t, **model.null_conditions(3)).sample
        ref_null = reference_forward(sd, cfg, x, t, sd["caption_projection.uncond_embedding"].expand(3, -1, -1))
    assert ours.shape == (3, 8, sample, sample)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_null, ref_null, rtol=1e-4, atol=1e-4)
    assert torch.equal(null[0], sd["caption_projection.uncond_embedding"])
    # PixArt/PixCell calling convention (encoder_hidden_states=...) works unchanged
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, encoder_hidden_states=emb).sample, ours)


def test_condition_pos_embed_matches_pixcell():
    for n, base in [(4, 32), (16, 64)]:
        ours = condition_pos_embed(1536, int(n**0.5), base, 2.0, phase=base // n)
        ref = torch.from_numpy(pixcell_y_pos_embed(1536, n, base))[0]
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_save_load_round_trip_is_exact(tmp_path):
    model = Denoiser(**denoiser_config("tiny", num_classes=3, text_channels=12)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = Denoiser.from_pretrained(tmp_path / "m").eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 4, 8, 8)
    cond = {"embeddings": torch.randn(2, 1, 32), "class_labels": torch.tensor([0, 2]), "text": torch.randn(2, 1, 12)}
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([5, 50]), **cond).sample, loaded(x, torch.tensor([5, 50]), **cond).sample)


def test_bad_checkpoints_name_the_keys(tmp_path):
    model = Denoiser(**denoiser_config("tiny", num_classes=3))
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    del sd["class_embedding.weight"]
    sd["extra.weight"] = torch.zeros(2)
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match=r"missing keys: class_embedding\.weight.*unexpected keys: extra\.weight"):
        Denoiser.from_pretrained(tmp_path / "m")
    sd["class_embedding.weight"] = torch.zeros(7, 5)
    del sd["extra.weight"]
    save_file(sd, weights)
    with pytest.raises(ValueError, match=r"class_embedding\.weight expected shape"):
        Denoiser.from_pretrained(tmp_path / "m")


def test_guidance_nulls_and_mixed_batches():
    torch.manual_seed(0)
    model = Denoiser(**denoiser_config("tiny", num_classes=4)).eval()
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 300)
    emb = torch.randn(4, 1, 32)
    labels = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        cond = model(x, t, embeddings=emb, class_labels=labels).sample
        uncond = model(x, t, **model.null_conditions(4)).sample
        assert (cond - uncond).abs().mean() > 1e-3  # the null condition is a different input
        # a batch mixing conditional and null rows equals the rows computed one by one
        drop = torch.tensor([True, False, True, False])
        mixed_in = model.drop_conditions(drop, embeddings=emb, class_labels=labels)
        mixed = model(x, t, **mixed_in).sample
        for i in range(4):
            src = uncond if drop[i] else cond
            torch.testing.assert_close(mixed[i], src[i], rtol=1e-5, atol=1e-5)
        one = model(x[1:2], t[1:2], embeddings=emb[1:2], class_labels=labels[1:2]).sample
        torch.testing.assert_close(one[0], cond[1], rtol=1e-5, atol=1e-5)


def test_condition_errors():
    model = Denoiser(**denoiser_config("tiny", num_classes=2))
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([1])
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, 1, 32\)"):
        model(x, t, embeddings=torch.randn(1, 1, 31), class_labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="pass class_labels"):
        model(x, t, embeddings=torch.randn(1, 1, 32))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 2\)"):
        model(x, t, embeddings=torch.randn(1, 1, 32), class_labels=torch.tensor([5]))
    with pytest.raises(ValueError, match="square number"):
        Denoiser(**denoiser_config("tiny", caption_num_tokens=3))
    with pytest.raises(ValueError, match="at least one condition"):
        Denoiser(**denoiser_config("tiny", use_embeddings=False))


def test_class_only_model_has_no_embedding_null(tmp_path):
    model = Denoiser(**denoiser_config("tiny", use_embeddings=False, num_classes=3)).eval()
    assert "caption_projection.uncond_embedding" not in model.state_dict()
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), class_labels=torch.tensor([0, -1])).sample
    assert out.shape == (2, 4, 8, 8)
    model.save_pretrained(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["use_embeddings"] is False
    Denoiser.from_pretrained(tmp_path / "c")
