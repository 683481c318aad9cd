"""An independent PixCell forward pass, written from the PixArt/PixCell equations with plain
torch ops on a state dict, and a writer of random checkpoints in PixCell's diffusers layout
(``PixCellTransformer2DModel``: cvlab-stonybrook/PixCell, controlnet/pixcell_transformer_2d.py).

Nothing here imports synthgen or diffusers' model classes: it is the yardstick they are
measured against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def pixcell_config(inner_heads=2, head_dim=8, layers=2, in_ch=4, sample=8, patch=2, cap=32, tokens=1, pe=1.0):
    inner = inner_heads * head_dim
    return {
        "_class_name": "PixCellTransformer2DModel", "_diffusers_version": "0.32.2",
        "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": head_dim,
        "attention_type": "default", "caption_channels": cap, "caption_num_tokens": tokens,
        "cross_attention_dim": inner, "dropout": 0.0, "in_channels": in_ch, "interpolation_scale": pe,
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "norm_num_groups": 32, "norm_type": "ada_norm_single",
        "num_attention_heads": inner_heads, "num_embeds_ada_norm": 1000, "num_layers": layers,
        "out_channels": 2 * in_ch, "patch_size": patch, "sample_size": sample, "upcast_attention": False,
        "use_additional_conditions": False,
    }


def pixcell_y_pos_embed(dim: int, num_tokens: int, base_size: int, interpolation_scale: float = 2.0) -> np.ndarray:
    """PixCell's UNIPosEmbed buffer, in numpy (grid scaled to base_size, phase base_size // N)."""
    g = int(round(num_tokens**0.5))
    phase = base_size // num_tokens
    pos = np.arange(g, dtype=np.float32) / (g / base_size) / interpolation_scale
    gw, gh = np.meshgrid(pos, pos)  # xy indexing: w varies along columns

    def one(d, p):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(p.reshape(-1) + phase, omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    return np.concatenate([one(dim // 2, gw), one(dim // 2, gh)], 1)[None].astype(np.float32)


def random_pixcell_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, cap, n = cfg["patch_size"], cfg["caption_channels"], cfg["caption_num_tokens"]

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "pos_embed.proj.weight": r(inner, cfg["in_channels"], p, p), "pos_embed.proj.bias": r(inner),
        "adaln_single.emb.timestep_embedder.linear_1.weight": r(inner, 256),
        "adaln_single.emb.timestep_embedder.linear_1.bias": r(inner),
        "adaln_single.emb.timestep_embedder.linear_2.weight": r(inner, inner),
        "adaln_single.emb.timestep_embedder.linear_2.bias": r(inner),
        "adaln_single.linear.weight": r(6 * inner, inner), "adaln_single.linear.bias": r(6 * inner),
        "caption_projection.linear_1.weight": r(inner, cap), "caption_projection.linear_1.bias": r(inner),
        "caption_projection.linear_2.weight": r(inner, inner), "caption_projection.linear_2.bias": r(inner),
        "caption_projection.uncond_embedding": r(n, cap, s=1.0),
        "scale_shift_table": r(2, inner),
        "proj_out.weight": r(p * p * cfg["out_channels"], inner), "proj_out.bias": r(p * p * cfg["out_channels"]),
    }
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        sd[b + "scale_shift_table"] = r(6, inner)
        for a in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                sd[f"{b}{a}.{proj}.weight"] = r(inner, inner)
                sd[f"{b}{a}.{proj}.bias"] = r(inner)
        sd[b + "ff.net.0.proj.weight"] = r(4 * inner, inner)
        sd[b + "ff.net.0.proj.bias"] = r(4 * inner)
        sd[b + "ff.net.2.weight"] = r(inner, 4 * inner)
        sd[b + "ff.net.2.bias"] = r(inner)
    if n > 1:
        base = cfg["sample_size"] // p
        sd["y_pos_embed.y_pos_embed"] = torch.from_numpy(pixcell_y_pos_embed(cap, n, base))
    return sd


def write_pixcell_folder(folder: Path, cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    sd = random_pixcell_state_dict(cfg, seed)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    return sd


# -- the forward pass ----------------------------------------------------------------------
def _sincos_2d(dim: int, gh: int, gw: int, base_size: int, interp: float) -> torch.Tensor:
    """PixArt image positional embedding (MAE sin-cos, grid scaled to base_size / interp)."""
    ys = np.arange(gh, dtype=np.float32) / (gh / base_size) / interp
    xs = np.arange(gw, dtype=np.float32) / (gw / base_size) / interp
    gx, gy = np.meshgrid(xs, ys)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    return torch.from_numpy(np.concatenate([one(dim // 2, gx), one(dim // 2, gy)], 1)).float()


def _timestep_features(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Sinusoidal timestep features, cos first (flip_sin_to_cos), frequencies exp(-ln(1e4) i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _attention(x, ctx, sd, prefix, heads):
    B, L, D = x.shape
    q = F.linear(x, sd[prefix + "to_q.weight"], sd[prefix + "to_q.bias"])
    k = F.linear(ctx, sd[prefix + "to_k.weight"], sd[prefix + "to_k.bias"])
    v = F.linear(ctx, sd[prefix + "to_v.weight"], sd[prefix + "to_v.bias"])
    def split(z):
        return z.view(B, -1, heads, D // heads).transpose(1, 2)
    w = (split(q) @ split(k).transpose(-1, -2)) / math.sqrt(D // heads)
    o = (w.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, L, D)
    return F.linear(o, sd[prefix + "to_out.0.weight"], sd[prefix + "to_out.0.bias"])


def reference_forward(sd: dict, cfg: dict, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """PixCell transformer output (B, out_channels, H, W) for latents x, timesteps t, UNI tokens emb."""
    B, _, H, W = x.shape
    p, heads = cfg["patch_size"], cfg["num_attention_heads"]
    inner = heads * cfg["attention_head_dim"]
    gh, gw = H // p, W // p
    # patch embedding + fixed sin-cos positions
    h = F.conv2d(x, sd["pos_embed.proj.weight"], sd["pos_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + _sincos_2d(inner, gh, gw, cfg["sample_size"] // p, cfg["interpolation_scale"])[None]
    # adaLN-single: timestep MLP, then one linear to the 6 modulation vectors shared by all blocks
    te = F.linear(_timestep_features(t), sd["adaln_single.emb.timestep_embedder.linear_1.weight"],
                  sd["adaln_single.emb.timestep_embedder.linear_1.bias"])
    te = F.linear(F.silu(te), sd["adaln_single.emb.timestep_embedder.linear_2.weight"],
                  sd["adaln_single.emb.timestep_embedder.linear_2.bias"])
    mod = F.linear(F.silu(te), sd["adaln_single.linear.weight"], sd["adaln_single.linear.bias"])
    # condition tokens: + y_pos_embed (N > 1), then the caption MLP (GELU tanh)
    if "y_pos_embed.y_pos_embed" in sd:
        emb = emb + sd["y_pos_embed.y_pos_embed"]
    c = F.linear(emb, sd["caption_projection.linear_1.weight"], sd["caption_projection.linear_1.bias"])
    c = F.linear(F.gelu(c, approximate="tanh"), sd["caption_projection.linear_2.weight"],
                 sd["caption_projection.linear_2.bias"])
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        s_msa, sc_msa, g_msa, s_mlp, sc_mlp, g_mlp = (sd[b + "scale_shift_table"][None] + mod.view(B, 6, -1)).chunk(6, 1)
        n = F.layer_norm(h, (inner,), eps=1e-6) * (1 + sc_msa) + s_msa
        h = h + g_msa * _attention(n, n, sd, b + "attn1.", heads)
        h = h + _attention(h, c, sd, b + "attn2.", heads)  # PixArt: no norm before cross-attention
        n = F.layer_norm(h, (inner,), eps=1e-6) * (1 + sc_mlp) + s_mlp
        f = F.gelu(F.linear(n, sd[b + "ff.net.0.proj.weight"], sd[b + "ff.net.0.proj.bias"]), approximate="tanh")
        h = h + g_mlp * F.linear(f, sd[b + "ff.net.2.weight"], sd[b + "ff.net.2.bias"])
    shift, scale = (sd["scale_shift_table"][None] + te[:, None]).chunk(2, dim=1)
    h = F.layer_norm(h, (inner,), eps=1e-6) * (1 + scale) + shift
    h = F.linear(h, sd["proj_out.weight"], sd["proj_out.bias"])
    oc = cfg["out_channels"]
    h = h.view(B, gh, gw, p, p, oc).permute(0, 5, 1, 3, 2, 4)
    return h.reshape(B, oc, gh * p, gw * p)
