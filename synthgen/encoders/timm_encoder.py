"""Image encoders from timm: pathology foundation models by hub id, local folder or file."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from synthgen.encoders.base import ImageEncoder
from synthgen.errors import CheckpointError, SynthgenError

# Model kwargs each published model needs (from the model cards). Class names are resolved
# when loading: "SwiGLUPacked" -> timm.layers.SwiGLUPacked, "SiLU" -> torch.nn.SiLU.
TIMM_PRESETS: dict[str, dict] = {
    "uni": dict(hub="hf-hub:MahmoodLab/UNI", pooling="model",
                kwargs=dict(init_values=1e-5, dynamic_img_size=True, num_classes=0)),
    "uni2-h": dict(hub="hf-hub:MahmoodLab/UNI2-h", pooling="model",
                   kwargs=dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
                               embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
                               mlp_layer="SwiGLUPacked", act_layer="SiLU", reg_tokens=8, dynamic_img_size=True)),
    "virchow2": dict(hub="hf-hub:paige-ai/Virchow2", pooling="cls+mean",
                     kwargs=dict(mlp_layer="SwiGLUPacked", act_layer="SiLU", num_classes=0)),
    "h-optimus-0": dict(hub="hf-hub:bioptimus/H-optimus-0", pooling="model",
                        kwargs=dict(init_values=1e-5, dynamic_img_size=False, num_classes=0)),
}
_BY_HUB = {v["hub"]: k for k, v in TIMM_PRESETS.items()}


def resolve_layers(kwargs: dict) -> dict:
    import timm.layers

    out = dict(kwargs)
    if isinstance(out.get("mlp_layer"), str):
        out["mlp_layer"] = getattr(timm.layers, out["mlp_layer"])
    if isinstance(out.get("act_layer"), str):
        out["act_layer"] = getattr(torch.nn, out["act_layer"])
    return out


class TimmEncoder(ImageEncoder):
    """A timm backbone as an :class:`ImageEncoder`.

    Args:
        model: a timm model (``num_classes=0`` so that ``model(x)`` is the pooled embedding).
        pooling: ``"model"`` (what the model returns), ``"cls"`` (class token) or
            ``"cls+mean"`` (class token concatenated with the mean patch token, Virchow2).
        grid: crops per side, one token each.
    """

    def __init__(self, model: torch.nn.Module, pooling: str = "model", grid: int = 1):
        super().__init__(grid=grid)
        from timm.data import resolve_data_config

        if pooling not in ("model", "cls", "cls+mean"):
            raise ValueError(f"pooling must be 'model', 'cls' or 'cls+mean', got {pooling!r}")
        self.model = model.eval()
        self.pooling = pooling
        data = resolve_data_config({}, model=model)
        # a ViT's own patch-embedding size wins over the (architecture-default) data config
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        self.input_size = int(img_size[0] if img_size else data["input_size"][-1])
        self.mean, self.std = tuple(data["mean"]), tuple(data["std"])
        feats = int(getattr(model, "num_features", 0) or model.embed_dim)
        self.dim = 2 * feats if pooling == "cls+mean" else feats

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, preset: str | None = None, arch: str | None = None,
                        pooling: str | None = None, grid: int = 1, **model_kwargs) -> TimmEncoder:
        """Load by hub id, local folder or weights file; the same call serves all three.

        Args:
            name_or_path: ``"hf-hub:MahmoodLab/UNI2-h"``; a folder in the hub layout
                (``config.json`` + ``model.safetensors``); or a ``.safetensors``/``.bin``/``.pth`` file
                (needs ``arch``).
            preset: one of :data:`TIMM_PRESETS` (found automatically for their hub ids); gives the
                model kwargs and pooling the model needs.
            arch: timm architecture name for a bare weights file.
            pooling: override the preset's pooling.
            **model_kwargs: extra ``timm.create_model`` arguments (override the preset's).
        """
        import timm

        name = str(name_or_path)
        preset = preset or _BY_HUB.get(name.split("@")[0])
        spec = TIMM_PRESETS.get(preset, {}) if preset else {}
        if preset and not spec:
            raise ValueError(f"unknown timm preset {preset!r}; choose one of: {', '.join(TIMM_PRESETS)}")
        kwargs = resolve_layers({**spec.get("kwargs", {"num_classes": 0}), **model_kwargs})
        path = Path(name)
        try:
            if name.startswith("hf-hub:"):
                model = timm.create_model(name, pretrained=True, **kwargs)
            elif path.is_dir():
                model = timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
            elif path.is_file():
                if arch is None:
                    raise SynthgenError(f"{path}: a bare weights file needs arch= (the timm architecture name)")
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
            else:
                raise SynthgenError(f"{name}: neither a hub id (hf-hub:owner/name), a folder nor a file")
        except SynthgenError:
            raise
        except RuntimeError as e:
            if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
                raise CheckpointError(f"{name}: weights do not match the model ({e})") from e
            raise SynthgenError(f"{name}: cannot load timm model ({e})") from e
        except OSError as e:
            raise SynthgenError(f"{name}: cannot load timm model ({e}); hub ids need network access "
                                "or a local copy (pass its folder instead)") from e
        return cls(model, pooling=pooling or spec.get("pooling", "model"), grid=grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pooling == "model":
            return self.model(x)
        tokens = self.model.forward_features(x)  # (M, prefix + patches, D)
        cls_tok = tokens[:, 0]
        if self.pooling == "cls":
            return cls_tok
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        return torch.cat([cls_tok, tokens[:, prefix:].mean(1)], dim=-1)
