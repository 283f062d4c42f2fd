"""block_sparse_linear: y = x W^T + bias with W block-sparse, differentiable w.r.t. x, W.values and bias.

The differentiable operator is `sparse_nlp::linear` (custom_ops.py) under torch.compile, and custom_ops.EagerLinear,
the same products without the dispatcher, in eager calls; both build the backward from the other two products:
dX = dds(dY, W) walks W's column-major order (no transposed copy of W), dW = sdd(dY^T, X) computes only the live
blocks. This module adds the checks and autocast around them.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import custom_ops, ops
from .layout import BlockSparseLayout, BlockSparseMatrix


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    castable = t is not None and t.dtype != dtype and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return t.to(dtype) if castable else t


def autocast_operands(
    x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Under autocast (the Trainer's --bf16 / --fp16) compute in its dtype, as nn.Linear does: x, values and bias
    are cast here, outside the operator, so gradients flow back through the casts to fp32 values and bias.
    Only fp32/fp16/bf16 tensors are cast (autocast leaves fp64 alone too)."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") and not torch.amp.is_autocast_available(device_type):
        return x, values, bias  # (torch 2.11's dynamo cannot trace is_autocast_available: asked only off CPU/CUDA)
    if not torch.is_autocast_enabled(device_type):
        return x, values, bias
    dtype = torch.get_autocast_dtype(device_type)
    return _cast(x, dtype), _cast(values, dtype), _cast(bias, dtype)


def linear(
    x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor], n: int, k: int, block: int, backend: str,
    layout: Optional[BlockSparseLayout] = None, index: Optional[tuple[torch.Tensor, ...]] = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N], unchecked: callers (the layer, `block_sparse_linear`) have checked the operands and
    resolved the backend. Eager calls with the `layout` object run EagerLinear (no dispatcher); under torch.compile
    (or given only `index`, custom_ops.layout_tensors of the layout) the `sparse_nlp::linear` operator runs."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # leading batch dims flattened: a view when x is contiguous
    if layout is not None and not torch.compiler.is_compiling():
        y = custom_ops.EagerLinear.apply(x2, values, bias, layout, backend)  # [M, N]
    else:
        index = index if index is not None else custom_ops.layout_tensors(layout)
        y = custom_ops.linear(x2, values, bias, *index, n, k, block, backend)
    return y.view(*lead, n)


class BlockSparseLinearFunction:
    """The former autograd.Function's entry point, kept for callers: apply(x [M, K], values, bias, layout, backend)."""

    @staticmethod
    def apply(x, values, bias, layout: BlockSparseLayout, backend: str) -> torch.Tensor:
        return linear(x, values, bias, *layout.shape, layout.block_size, backend, layout=layout)


def block_sparse_linear(
    x: torch.Tensor,
    weight: BlockSparseMatrix,
    bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] = x @ W^T + bias, W a BlockSparseMatrix of shape [N, K] (nn.Linear layout).

    backend: None picks automatically (CUDA -> "triton", CPU -> "native" (fp32, where it builds) or "torch", or
    "dense" above the density thresholds in ops.py); "triton" / "native" / "torch" / "dense" force one
    (see ops.py).
    """
    if not isinstance(weight, BlockSparseMatrix):
        raise ValueError(f"weight must be a BlockSparseMatrix, got {type(weight).__name__}")
    x, values, bias = autocast_operands(x, weight.values, bias)
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight {weight.shape} expects last dim {k}")
    if x.dtype != values.dtype or x.device != values.device:
        raise ValueError(
            f"x is {x.dtype} on {x.device} but the weight is {values.dtype} on {values.device}; "
            "cast/move one to match"
        )
    ops.check_bias(bias, n, values.dtype, values.device)
    layout = weight.layout
    backend = ops.resolve_backend(backend, x.device, layout, x.dtype)
    return linear(x, values, bias, n, k, layout.block_size, backend, layout=layout)
