import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from synthgen.data.slides import Slide
from synthgen.data.tiling import TileSpec, tile_slide
from synthgen.errors import CheckpointError
from synthgen.models.vae import VAE, StrictAutoencoderKL, reconstruction_metrics, to_uint8, vae_loss

# The published SD3.5 VAE config (vae/config.json), with channel widths reduced for a CPU test.
SD35_LAYOUT = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.31.0.dev0", "act_fn": "silu",
    "block_out_channels": [8, 16, 16, 16], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": None, "latents_std": None,
    "layers_per_block": 1, "mid_block_add_attention": True, "norm_num_groups": 4, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False,
}


@pytest.fixture(scope="module")
def real_tiles(cmu):
    with Slide(cmu) as s:
        tiles = tile_slide(s, TileSpec(mpp=2.0, size=32), key="cmu")[:96]
        arr = [torch.from_numpy(s.read(t.x, t.y, t.size, t.mpp)).permute(2, 0, 1) for t in tiles]
    return torch.stack(arr)


def _write_sd35_folder(root):
    cfg = {k: v for k, v in SD35_LAYOUT.items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = StrictAutoencoderKL(**cfg)
    model.save_pretrained(root / "vae")
    (root / "vae" / "config.json").write_text(json.dumps(SD35_LAYOUT))  # exactly the published fields
    return model


def test_sd35_layout_loads_with_its_scale_and_shift(tmp_path, real_tiles):
    ref = _write_sd35_folder(tmp_path)
    keys = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors").keys()
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in keys)  # SD3 has no quant convs
    vae = VAE.from_pretrained(tmp_path, subfolder="vae").eval()
    assert (vae.scaling_factor, vae.shift_factor, vae.latent_channels, vae.downscale) == (1.5305, 0.0609, 16, 8)
    x = real_tiles[:4]
    with torch.no_grad():
        z = vae.encode(x)
        raw = ref.encode(x.float() / 127.5 - 1).latent_dist.mode()
        torch.testing.assert_close(z, (raw - 0.0609) * 1.5305)
        out = vae.decode(z)
        torch.testing.assert_close(out, ref.decode(raw).sample, rtol=1e-5, atol=1e-5)
    assert z.shape == (4, 16, 4, 4) and out.shape == (4, 3, 32, 32)


def test_round_trip_and_strict_loading(tmp_path):
    vae = VAE.from_preset("tiny")
    vae.save_pretrained(tmp_path / "v")
    loaded = VAE.from_pretrained(tmp_path / "v")
    a, b = vae.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    weights = tmp_path / "v" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd.pop("decoder.conv_out.weight")
    save_file(sd, weights)
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.conv_out\.weight"):
        VAE.from_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match="unknown VAE preset 'huge'"):
        VAE.from_preset("huge")


def test_vae_objective_learns_on_real_tiles(real_tiles):
    torch.manual_seed(0)
    vae = VAE.from_preset("tiny")
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(60):
        batch = real_tiles[(step * 16) % 96 : (step * 16) % 96 + 16]
        loss, parts = vae_loss(vae, batch, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["l1"])
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    metrics = reconstruction_metrics(vae.eval(), real_tiles)
    assert 10 < metrics["psnr"] < 60 and 0 < metrics["ssim"] <= 1
    # calibration gives the latents zero mean and unit variance, stored in the config
    shift, scale = vae.calibrate(real_tiles)
    with torch.no_grad():
        z = vae.encode(real_tiles)
    assert abs(float(z.mean())) < 1e-3 and abs(float(z.std()) - 1) < 1e-3
    assert vae.model.config.shift_factor == shift and vae.model.config.scaling_factor == scale


def test_metrics_and_uint8_helpers():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(to_uint8(x.float() / 127.5 - 1), x)

    class Identity(VAE):
        def encode(self, images, sample=False, generator=None):
            return images.float() / 127.5 - 1

        def decode(self, latents):
            return latents

    m = reconstruction_metrics(Identity(StrictAutoencoderKL(norm_num_groups=4, block_out_channels=(8,))), x)
    assert m["psnr"] == float("inf") or m["psnr"] > 90
    assert m["ssim"] == pytest.approx(1.0)
