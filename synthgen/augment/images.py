"""Image types of the augmentation API: what users hand in (PIL, uint8 or float tensors, HWC
arrays) to the uint8 (3, H, W) tensors the generators take, and back."""

from __future__ import annotations

import numpy as np
import torch

from synthgen.errors import SynthgenError


def as_uint8(image) -> torch.Tensor:
    """uint8 (3, H, W) (or (B, 3, H, W)) tensor of a uint8 / [0, 1] float tensor, PIL image or HWC array."""
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image
        if image.is_floating_point():
            return (image.clamp(0, 1) * 255).round().to(torch.uint8)
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3:
        return torch.from_numpy(image).permute(2, 0, 1)
    raise SynthgenError(f"unsupported image type {type(image).__name__}; use uint8 or [0, 1] float "
                        "tensors (3, H, W), HWC uint8 arrays or PIL images")


def like(template, img: torch.Tensor):
    """The synthetic uint8 (3, H, W) image in the type of the real one."""
    if isinstance(template, torch.Tensor):
        return img if template.dtype == torch.uint8 else img.float() / 255
    if isinstance(template, np.ndarray):
        return img.permute(1, 2, 0).numpy()
    from PIL import Image

    return Image.fromarray(img.permute(1, 2, 0).numpy())
