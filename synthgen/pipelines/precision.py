"""Mixed precision at inference: which dtype to autocast to, detected per device.

``auto`` picks bfloat16 where the hardware computes it natively and fast: CPUs with AVX512-BF16
or AMX (read from ``/proc/cpuinfo``; a bf16 matmul there is several times an fp32 one) and CUDA
GPUs with bf16 support (fp16 on older GPUs); everywhere else float32. Autocast lowers matrix
products, convolutions and attention and keeps normalisations and the scheduler's arithmetic in
float32 (PyTorch's autocast op lists), so weights stay float32 and nothing is cast by hand.
"""

from __future__ import annotations

import contextlib
import functools

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHOICES = ("auto", *DTYPES)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX-BF16 flags, Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """The compute dtype for ``dtype`` (``auto``, ``fp32``, ``bf16``, ``fp16``, a torch dtype, or
    None for ``auto``) on ``device``.

    Raises:
        ValueError: an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = "auto" if dtype is None else str(dtype).lower().replace("float32", "fp32").replace("bfloat16", "bf16")
    name = name.replace("float16", "fp16")
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(CHOICES)}, got {dtype!r}")
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` (for manifests and cache keys)."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def autocast(dtype: torch.dtype, device: torch.device | str):
    """``torch.autocast`` to ``dtype`` on ``device``'s type; a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
