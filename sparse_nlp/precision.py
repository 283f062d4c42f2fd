"""Where bf16 is fast: the one check the library and the recipes share."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def has_fast_bf16(device_type: str) -> bool:
    """True on CUDA GPUs with bf16 and on CPUs whose oneDNN has native bf16 (AVX512-BF16 or AMX).

    Elsewhere bf16 matmuls are emulated and slower than fp32, so callers keep fp32 there.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
