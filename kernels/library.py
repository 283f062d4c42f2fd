"""The block-sparse products as torch.library operators, so that torch.compile traces them without graph breaks, and
their eager twin, an autograd Function that skips the dispatcher.

    sparse_nlp::dds     dense  = a @ W (or W^T) + bias          (triton_op: Triton kernels visible to Inductor)
    sparse_nlp::sdd     values = live blocks of a @ b           (triton_op)
    sparse_nlp::linear  y = x @ W^T + bias, differentiable      (triton_op + register_autograd)
    sparse_nlp::linear_backward  (dX, dW) of linear             (triton_op)
    sparse_nlp::host_*  the same products on the other backends (native C, torch, dense, and Triton under
                        TRITON_INTERPRET=1): opaque custom ops with fake impls, which the triton_ops call off CUDA

A layout crosses the op boundary as its own tensors, its LayoutIndex (a list of six int32 tensors), plus its block
size; never as the BlockSparseLayout object and never through a lookup by address. So the number of live blocks is
an ordinary (possibly dynamic) tensor size, a fake impl reads no index values, and an impl rebuilds the layout from
exactly the tensors it was given (BlockSparseLayout.from_index). What a backend derives from a layout is then
derived again per call (the torch path's host plan; the native kernels need none): the compiled CPU torch path pays
that, eager calls never do.

torch.library.triton_op functionally decomposes its body for every device under torch.compile, so each triton_op's
body sends non-CUDA tensors to the opaque host op, and only CUDA tensors with backend "triton" reach `wrap_triton`.

EagerLinear is what `linear` computes, for eager calls: the layout travels as the object itself (what backends cache
on it at hand), and no operator dispatch runs (the op's dispatch and generated autograd cost ~0.2-0.4 ms per forward
+ backward on the 2-core box, more than the native product itself at a few rows). ops.linear picks between the two;
both end in the same backend functions (backends.BACKENDS), so the compiled and the eager tests check the same
products.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import BACKENDS
from .layout import BlockSparseLayout


def _layout(index: list[Tensor], block: int) -> BlockSparseLayout:
    return BlockSparseLayout.from_index(index, block)


# ---- the opaque host ops: native C, torch, dense, and Triton under the interpreter --------------------------------
@torch.library.custom_op("sparse_nlp::host_dds", mutates_args=())
def host_dds(
    a: Tensor, values: Tensor, index: list[Tensor], bias: Optional[Tensor], block: int, transpose_b: bool,
    backend: str,
) -> Tensor:
    return BACKENDS[backend].dds(a, values, _layout(index, block), transpose_b, bias)


@host_dds.register_fake
def _(a, values, index, bias, block, transpose_b, backend):
    n, k = _layout(index, block).shape
    return a.new_empty(a.shape[0], n if transpose_b else k)


@torch.library.custom_op("sparse_nlp::host_sdd", mutates_args=())
def host_sdd(a: Tensor, b: Tensor, index: list[Tensor], block: int, backend: str) -> Tensor:
    return BACKENDS[backend].sdd(a, b, _layout(index, block))


@host_sdd.register_fake
def _(a, b, index, block, backend):
    return a.new_empty(_layout(index, block).num_blocks, block, block)


@torch.library.custom_op("sparse_nlp::host_linear_backward", mutates_args=())
def host_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, index: list[Tensor], block: int, need_x: bool, need_w: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dX, dW) at once (on the CPU thread pool for native and torch); an empty tensor for a gradient not asked for."""
    grad_x, grad_values = BACKENDS[backend].linear_backward(grad_y, x, values, _layout(index, block), need_x, need_w)
    return _or_empty(grad_x, grad_y), _or_empty(grad_values, grad_y)


@host_linear_backward.register_fake
def _(grad_y, x, values, index, block, need_x, need_w, backend):
    return (x.new_empty(x.shape) if need_x else grad_y.new_empty(0),
            values.new_empty(values.shape) if need_w else grad_y.new_empty(0))


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


# ---- the triton_ops: Triton launches on CUDA, the host ops elsewhere ----------------------------------------------
def _on_triton(t: Tensor, backend: str) -> bool:
    return backend == "triton" and t.device.type == "cuda"


def _dds(
    a: Tensor, values: Tensor, index: list[Tensor], bias: Optional[Tensor], block: int, transpose_b: bool,
    backend: str,
) -> Tensor:
    if not _on_triton(a, backend):
        return host_dds(a, values, index, bias, block, transpose_b, backend)
    # No checks and no cache: the body also runs on fake tensors, where values and the index tensors have symbolic
    # block counts that need not be provably equal.
    return BACKENDS["triton"].dds(a, values, _layout(index, block), transpose_b, bias)


def _sdd(a: Tensor, b: Tensor, index: list[Tensor], block: int, backend: str) -> Tensor:
    if not _on_triton(a, backend):
        return host_sdd(a, b, index, block, backend)
    return BACKENDS["triton"].sdd(a, b, _layout(index, block))


def _linear(x: Tensor, values: Tensor, bias: Optional[Tensor], index: list[Tensor], block: int, backend: str) -> Tensor:
    return _dds(x, values, index, bias, block, True, backend)


def _linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, index: list[Tensor], block: int, need_x: bool, need_w: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """dX = dds(dY, W) and dW = sdd(dY^T, X): the backward is built from the other two products."""
    if not _on_triton(grad_y, backend):
        return host_linear_backward(grad_y, x, values, index, block, need_x, need_w, backend)
    grad_x = _dds(grad_y, values, index, None, block, False, backend) if need_x else grad_y.new_empty(0)
    grad_values = _sdd(grad_y.t(), x, index, block, backend) if need_w else grad_y.new_empty(0)
    return grad_x, grad_values


dds = torch.library.triton_op("sparse_nlp::dds", _dds, mutates_args=())
sdd = torch.library.triton_op("sparse_nlp::sdd", _sdd, mutates_args=())
linear = torch.library.triton_op("sparse_nlp::linear", _linear, mutates_args=())
linear_backward = torch.library.triton_op("sparse_nlp::linear_backward", _linear_backward, mutates_args=())


# ---- autograd of linear --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, values, bias, index, block, backend = inputs
    ctx.save_for_backward(x, values, *index)
    ctx.block, ctx.backend = block, backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, values, *index = ctx.saved_tensors
    need_x, need_w, need_bias = ctx.needs_input_grad[:3]
    if grad_y.stride(-1) != 1:  # e.g. the expanded gradient of .sum()
        grad_y = grad_y.contiguous()
    grad_x = grad_values = None
    if need_x or need_w:
        grad_x, grad_values = linear_backward(grad_y, x, values, index, ctx.block, need_x, need_w, ctx.backend)
    grad_bias = grad_y.sum(0) if need_bias and ctx.has_bias else None
    return grad_x if need_x else None, grad_values if need_w else None, grad_bias, [None] * len(index), None, None


linear.register_autograd(_backward, setup_context=_setup_context)


# ---- eager: the same products without the dispatcher ---------------------------------------------------------------
class EagerLinear(torch.autograd.Function):
    """y = x [M, K] @ W^T + bias as `linear` computes it, for eager calls: the layout object itself, no dispatcher."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Optional[Tensor], layout: BlockSparseLayout, backend: str):
        ctx.save_for_backward(x, values)
        ctx.layout, ctx.backend = layout, backend
        return BACKENDS[backend].dds(x, values, layout, True, bias)  # [M, N]

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, values = ctx.saved_tensors
        if grad_y.stride(-1) != 1:  # e.g. the expanded gradient of .sum()
            grad_y = grad_y.contiguous()
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        grad_x, grad_values = BACKENDS[ctx.backend].linear_backward(grad_y, x, values, ctx.layout, need_x, need_w)
        return grad_x, grad_values, grad_y.sum(0) if need_bias else None, None, None
