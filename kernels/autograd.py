"""block_sparse_linear: y = x W^T + bias with W block-sparse, differentiable w.r.t. x, W.values and bias.

The backward is built from the other two products: dX = dds(dY, W) walks W's column-major order (no transposed
copy of W), dW = sdd(dY^T, X) computes only the live blocks.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu, cpu_native, ops
from .layout import BlockSparseLayout, BlockSparseMatrix


class BlockSparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, layout: BlockSparseLayout, backend: str):  # x: [M, K]
        w = BlockSparseMatrix(values, layout)
        y = ops.dds(x, w, transpose_b=True, bias=bias, backend=backend)  # [M, N]
        ctx.save_for_backward(x, values)
        ctx.layout, ctx.backend = layout, backend
        return y

    @staticmethod
    def backward(ctx, grad_y):  # grad_y: [M, N]
        x, values = ctx.saved_tensors
        grad_y = grad_y.contiguous() if grad_y.stride(-1) != 1 else grad_y  # e.g. expanded grads of .sum()
        w = BlockSparseMatrix(values, ctx.layout)
        grad_x = grad_values = grad_bias = None
        if ctx.backend == "native":  # both products on the thread pool at once
            grad_x, grad_values = cpu_native.linear_backward(grad_y, x, w, *ctx.needs_input_grad[:2])
        elif ctx.backend == "torch" and grad_y.device.type == "cpu":
            grad_x, grad_values = cpu.blocked_linear_backward(grad_y, x, w, *ctx.needs_input_grad[:2])
        else:
            grad_x, grad_values = _backward_products(ctx, grad_y, x, w)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_values, grad_bias, None, None


def _backward_products(ctx, grad_y, x, w):
    """dX = dds(dY, W) and dW = sdd(dY^T, X) through ops (Triton, dense, or torch off-CPU)."""
    grad_x = grad_values = None
    if ctx.needs_input_grad[0]:
        grad_x = ops.dds(grad_y, w, transpose_b=False, backend=ctx.backend)  # [M, K]
    if ctx.needs_input_grad[1]:
        grad_values = ops.sdd(grad_y.t(), x, ctx.layout, backend=ctx.backend).values  # [nnz, b, b]
    return grad_x, grad_values


def _autocast_operands(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: Optional[torch.Tensor]
) -> tuple[torch.Tensor, BlockSparseMatrix, Optional[torch.Tensor]]:
    """Under autocast (the Trainer's --bf16 / --fp16) compute in its dtype, as nn.Linear does: x, values and bias
    are cast here, outside the autograd Function, so gradients flow back through the casts to fp32 values and bias.
    Only fp32/fp16/bf16 tensors are cast (autocast leaves fp64 alone too)."""
    device_type = x.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        castable = t is not None and t.dtype != dtype and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return t.to(dtype) if castable else t

    values = cast(weight.values)
    weight = weight if values is weight.values else BlockSparseMatrix(values, weight.layout)
    return cast(x), weight, cast(bias)


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
    x, weight, bias = _autocast_operands(x, weight, bias)
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)} but the weight {weight.shape} expects last dim {k}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"x is {x.dtype} on {x.device} but the weight is {weight.dtype} on {weight.device}; "
            "cast/move one to match"
        )
    ops.check_bias(bias, n, weight.dtype, weight.device)
    backend = ops.resolve_backend(backend, x.device, weight.layout, x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # leading batch dims flattened: a view when x is contiguous
    y = BlockSparseLinearFunction.apply(x2, weight.values, bias, weight.layout, backend)
    return y.view(*lead, n)
