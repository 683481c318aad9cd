"""Turn an encoder spec string (CLI, recipes) into a callable images -> features."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from synthgen.errors import SynthgenError

if TYPE_CHECKING:  # torch loads with the encoder, not with the CLI
    import torch

SPEC_HELP = (
    "KIND:SOURCE with KIND one of vae (AutoencoderKL folder or hub id, e.g. vae:checkpoints/vae), "
    "ssl (synthgen SSL encoder folder), timm (timm:hf-hub:MahmoodLab/UNI2-h or timm:/folder), "
    "hf (transformers AutoModel id or folder); or MODULE:FACTORY, a zero-argument callable "
    "returning a function uint8 (B,3,H,W) -> tensor (B,...). Options after '#': subfolder=NAME "
    "(vae, e.g. vae:stabilityai/stable-diffusion-3.5-large#subfolder=vae), grid=N (timm/hf: an NxN "
    "grid of crops, one token each, e.g. PixCell-1024's timm:hf-hub:MahmoodLab/UNI2-h#grid=4)"
)


def load_encoder(spec: str, device: str | torch.device = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """Load the encoder a spec names (see :data:`SPEC_HELP`), in eval mode on ``device``.

    Raises:
        SynthgenError: malformed spec, or a module/factory that cannot be imported.
    """
    kind, sep, source = spec.partition(":")
    if not sep or not kind or not source:
        raise SynthgenError(f"encoder spec {spec!r}: expected {SPEC_HELP}")
    source, _, opt_text = source.partition("#")
    opts = _options(spec, opt_text, {"vae": ("subfolder",), "timm": ("grid",), "hf": ("grid",)}.get(kind, ()))
    if kind == "vae":
        from synthgen.loading import component_subfolder
        from synthgen.models.vae import VAE

        subfolder = opts.get("subfolder") or component_subfolder(source, "vae")
        model = VAE.from_pretrained(source, subfolder=subfolder)
    elif kind == "ssl":
        from synthgen.encoders.ssl import SSLEncoder

        model = SSLEncoder.from_pretrained(source)
    elif kind == "timm":
        from synthgen.encoders.timm_encoder import TimmEncoder

        model = TimmEncoder.from_pretrained(source, grid=int(opts.get("grid", 1)))
    elif kind == "hf":
        from synthgen.encoders.hf_encoder import HFEncoder

        model = HFEncoder.from_pretrained(source, grid=int(opts.get("grid", 1)))
    else:
        return _factory(kind, source)()
    return model.to(device).eval()


def _options(spec: str, text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    opts = {}
    for part in filter(None, text.split(",")):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise SynthgenError(f"encoder spec {spec!r}: unknown option {part!r} "
                                f"(this kind takes: {', '.join(allowed) or 'no options'})")
        if key == "grid" and not value.isdigit():
            raise SynthgenError(f"encoder spec {spec!r}: grid must be a positive integer, got {value!r}")
        opts[key] = value
    return opts


def _factory(module: str, attr: str) -> Callable:
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SynthgenError(f"encoder spec {module}:{attr}: cannot import {module!r} / {attr!r} ({e})") from e
    if not callable(obj):
        raise SynthgenError(f"encoder spec {module}:{attr}: not callable")
    return obj
