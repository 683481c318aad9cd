"""Image encoders from transformers ``AutoModel`` vision backbones (DINOv2, Phikon-v2, ...)."""

from __future__ import annotations

import os

import torch

from synthgen.encoders.base import ImageEncoder
from synthgen.errors import SynthgenError


class HFEncoder(ImageEncoder):
    """A transformers vision model as an :class:`ImageEncoder`.

    Preprocessing (size, mean, std) comes from the model's image-processor config; images are
    resized as a whole (no center crop) so the patch's full field of view is encoded.

    Args:
        model: a transformers vision model returning ``last_hidden_state``.
        size: input side in pixels.
        mean, std: normalisation.
        pooling: ``"cls"`` (first token, Phikon-v2), ``"mean"`` (mean of patch tokens) or
            ``"pooler"`` (the model's ``pooler_output``).
    """

    def __init__(self, model: torch.nn.Module, size: int, mean, std, pooling: str = "cls", grid: int = 1):
        super().__init__(grid=grid)
        if pooling not in ("cls", "mean", "pooler"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'pooler', got {pooling!r}")
        self.model = model.eval()
        self.input_size, self.mean, self.std, self.pooling = int(size), tuple(mean), tuple(std), pooling
        self.dim = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, pooling: str = "cls", grid: int = 1,
                        trust_remote_code: bool = False, **kwargs) -> HFEncoder:
        """Load from a hub id (``"owkin/phikon-v2"``) or a local folder saved with ``save_pretrained``."""
        from transformers import AutoImageProcessor, AutoModel

        try:
            model = AutoModel.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code, **kwargs)
            proc = AutoImageProcessor.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
        except OSError as e:
            raise SynthgenError(f"{name_or_path}: cannot load transformers model or its image processor ({e})") from e
        side = _side(getattr(proc, "crop_size", None)) or _side(getattr(proc, "size", None))
        if not side:
            raise SynthgenError(f"{name_or_path}: image processor config gives no input size")
        return cls(model, side, proc.image_mean, proc.image_std, pooling=pooling, grid=grid)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        if self.pooling == "pooler":
            return out.pooler_output
        h = out.last_hidden_state
        return h[:, 0] if self.pooling == "cls" else h[:, 1:].mean(1)


def _side(size) -> int | None:
    """Input side from an image processor's size/crop_size (int, dict or transformers SizeDict)."""
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        v = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if v:
            return int(v)
    return None
