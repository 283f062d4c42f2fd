"""The block-sparse products as torch.library operators, so that torch.compile traces them without graph breaks.

    sparse_nlp::dds     dense  = a @ W (or W^T) + bias          (triton_op: Triton kernels visible to Inductor)
    sparse_nlp::sdd     values = live blocks of a @ b           (triton_op)
    sparse_nlp::linear  y = x @ W^T + bias, differentiable      (triton_op + register_autograd)
    sparse_nlp::linear_backward  (dX, dW) of linear             (triton_op)
    sparse_nlp::host_*  the same products on the other backends (native C, torch, dense, and Triton under
                        TRITON_INTERPRET=1): opaque custom ops with fake impls, which the triton_ops call off CUDA

A layout crosses the op boundary as its six int32 index tensors (`layout_tensors`) plus ints (n, k, block), never
as the BlockSparseLayout dataclass, so the number of live blocks is an ordinary (possibly dynamic) tensor size and a
fake impl never reads index values. Inside an impl the layout object is looked up again (`_layout`), so per-layout
work cached on it (the torch path's host plan) is done once per topology, not per call.

torch.library.triton_op functionally decomposes its body for every device under torch.compile, so each triton_op's
body sends non-CUDA tensors to the opaque host op, and only CUDA tensors with backend "triton" reach `wrap_triton`.
Where torch has no triton_op (older builds), the same bodies become plain custom ops with shape-only fake impls.

The operators are what torch.compile sees. Eager calls skip the dispatcher (EagerLinear, and ops.py calls run_dds /
run_sdd directly): its Python dispatch and generated autograd cost more than a native product at a few rows. Both
paths end in the same run_* functions, so the compiled tests and the eager tests check the same products.
"""
from __future__ import annotations

import weakref
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from . import cpu, cpu_native
from .layout import BlockSparseLayout, BlockSparseMatrix

_triton_op = getattr(torch.library, "triton_op", None)
HAS_TRITON_OP = _triton_op is not None and hasattr(torch.library, "wrap_triton")


def layout_tensors(layout: BlockSparseLayout) -> tuple[Tensor, ...]:
    """The index tensors that stand for `layout` in an op's arguments, in the ops' order."""
    return (layout.row_indices, layout.col_indices, layout.row_offsets, layout.transpose_perm,
            layout.transpose_row_indices, layout.col_offsets)


# Layouts by their index tensors' addresses; weak: an entry lives as long as its owner (a layer, a caller's matrix)
# holds the layout, whose tensors keep those addresses from being reused meanwhile.
_LAYOUTS: "weakref.WeakValueDictionary[tuple, BlockSparseLayout]" = weakref.WeakValueDictionary()


def register_layout(layout: BlockSparseLayout) -> BlockSparseLayout:
    """Make `layout` the object the ops find for its index tensors (a layer registers the layout it owns), so that
    what is derived from it once (host plans, packed weights) is found again by every call."""
    _LAYOUTS[_key(layout_tensors(layout), layout.shape, layout.block_size)] = layout
    return layout


def _key(index: tuple[Tensor, ...], shape: tuple[int, int], block: int) -> tuple:
    return (shape, block) + tuple((t.data_ptr(), t.numel(), t._version) for t in index)


def _layout(index: tuple[Tensor, ...], n: int, k: int, block: int) -> BlockSparseLayout:
    """The BlockSparseLayout over these index tensors: the registered one, else a new one for this call."""
    layout = _LAYOUTS.get(_key(index, (n, k), block))
    return layout if layout is not None else BlockSparseLayout((n, k), block, *index)


# ---- the products on every backend, given a layout object: what the ops and the eager path both run ---------------
def run_dds(a: Tensor, w, transpose_b: bool, bias: Optional[Tensor], backend: str) -> Tensor:
    """a @ W (W^T when transpose_b) (+ bias) on `backend`; w has .values and .layout (a BlockSparseMatrix)."""
    if backend == "triton":  # CUDA, or CPU tensors under TRITON_INTERPRET=1: the same launchers
        from . import launchers

        return launchers.dds(a, w, transpose_b, bias)
    if backend == "native":
        return cpu_native.dds(a, w, transpose_b, bias)
    if backend == "dense":
        return cpu.dense_dds(a, w, transpose_b, bias)
    return cpu.blocked_dds(a, w, transpose_b, bias)


def run_sdd(a: Tensor, b: Tensor, layout: BlockSparseLayout, backend: str) -> Tensor:
    """The live blocks of a @ b, [num_blocks, b, b]."""
    if backend == "triton":
        from . import launchers

        return launchers.sdd(a, b, layout)
    if backend == "native":
        return cpu_native.sdd(a, b, layout).values
    if backend == "dense":
        return cpu.dense_sdd(a, b, layout).values
    return cpu.blocked_sdd(a, b, layout).values


def run_linear_backward(grad_y: Tensor, x: Tensor, w, need_x: bool, need_w: bool, backend: str):
    """(dX, dW) or None where not asked for: on the CPU pool at once (native, torch), else dds and sdd."""
    if backend == "native":
        return cpu_native.linear_backward(grad_y, x, w, need_x, need_w)
    if backend == "torch" and grad_y.device.type == "cpu":
        return cpu.blocked_linear_backward(grad_y, x, w, need_x, need_w)
    grad_x = run_dds(grad_y, w, False, None, backend) if need_x else None
    grad_values = run_sdd(grad_y.t(), x, w.layout, backend) if need_w else None
    return grad_x, grad_values


# ---- the opaque host ops: native C, torch, dense, and Triton under the interpreter --------------------------------
@torch.library.custom_op("sparse_nlp::host_dds", mutates_args=())
def host_dds(
    a: Tensor, values: Tensor, row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor, transpose_perm: Tensor,
    transpose_row_indices: Tensor, col_offsets: Tensor, bias: Optional[Tensor], n: int, k: int, block: int,
    transpose_b: bool, backend: str,
) -> Tensor:
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    return run_dds(a, BlockSparseMatrix(values, _layout(index, n, k, block)), transpose_b, bias, backend)


@host_dds.register_fake
def _(a, values, row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets, bias,
      n, k, block, transpose_b, backend):
    return a.new_empty(a.shape[0], n if transpose_b else k)


@torch.library.custom_op("sparse_nlp::host_sdd", mutates_args=())
def host_sdd(
    a: Tensor, b: Tensor, row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor, transpose_perm: Tensor,
    transpose_row_indices: Tensor, col_offsets: Tensor, n: int, k: int, block: int, backend: str,
) -> Tensor:
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    return run_sdd(a, b, _layout(index, n, k, block), backend)


@host_sdd.register_fake
def _(a, b, row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets, n, k, block,
      backend):
    return a.new_empty(row_indices.shape[0], block, block)


@torch.library.custom_op("sparse_nlp::host_linear_backward", mutates_args=())
def host_linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor,
    transpose_perm: Tensor, transpose_row_indices: Tensor, col_offsets: Tensor, n: int, k: int, block: int,
    need_x: bool, need_w: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """(dX, dW) at once on the CPU thread pool (native, torch); an empty tensor for a gradient not asked for."""
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    w = BlockSparseMatrix(values, _layout(index, n, k, block))
    grad_x, grad_values = run_linear_backward(grad_y, x, w, need_x, need_w, backend)
    return _or_empty(grad_x, grad_y), _or_empty(grad_values, grad_y)


@host_linear_backward.register_fake
def _(grad_y, x, values, row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets,
      n, k, block, need_x, need_w, backend):
    return _linear_backward_fake(grad_y, x, values, need_x, need_w)


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _linear_backward_fake(grad_y, x, values, need_x, need_w):
    return (x.new_empty(x.shape) if need_x else grad_y.new_empty(0),
            values.new_empty(values.shape) if need_w else grad_y.new_empty(0))


# ---- the triton_ops: Triton launches on CUDA, the host ops elsewhere ----------------------------------------------
def _on_triton(t: Tensor, backend: str) -> bool:
    return backend == "triton" and t.device.type == "cuda"


def _dds(
    a: Tensor, values: Tensor, row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor, transpose_perm: Tensor,
    transpose_row_indices: Tensor, col_offsets: Tensor, bias: Optional[Tensor], n: int, k: int, block: int,
    transpose_b: bool, backend: str,
) -> Tensor:
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    if not _on_triton(a, backend):
        return host_dds(a, values, *index, bias, n, k, block, transpose_b, backend)
    # No checks and no cache: the body also runs on fake tensors, where values and the index tensors have symbolic
    # block counts that need not be provably equal (BlockSparseMatrix would compare them).
    weight = SimpleNamespace(values=values, layout=BlockSparseLayout((n, k), block, *index))
    return run_dds(a, weight, transpose_b, bias, backend)


def _sdd(
    a: Tensor, b: Tensor, row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor, transpose_perm: Tensor,
    transpose_row_indices: Tensor, col_offsets: Tensor, n: int, k: int, block: int, backend: str,
) -> Tensor:
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    if not _on_triton(a, backend):
        return host_sdd(a, b, *index, n, k, block, backend)
    return run_sdd(a, b, BlockSparseLayout((n, k), block, *index), backend)


def _linear(
    x: Tensor, values: Tensor, bias: Optional[Tensor], row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor,
    transpose_perm: Tensor, transpose_row_indices: Tensor, col_offsets: Tensor, n: int, k: int, block: int,
    backend: str,
) -> Tensor:
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    return _dds(x, values, *index, bias, n, k, block, True, backend)


def _linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, row_indices: Tensor, col_indices: Tensor, row_offsets: Tensor,
    transpose_perm: Tensor, transpose_row_indices: Tensor, col_offsets: Tensor, n: int, k: int, block: int,
    need_x: bool, need_w: bool, backend: str,
) -> tuple[Tensor, Tensor]:
    """dX = dds(dY, W) and dW = sdd(dY^T, X): the backward is built from the other two products."""
    index = (row_indices, col_indices, row_offsets, transpose_perm, transpose_row_indices, col_offsets)
    if not _on_triton(grad_y, backend):
        return host_linear_backward(grad_y, x, values, *index, n, k, block, need_x, need_w, backend)
    grad_x = _dds(grad_y, values, *index, None, n, k, block, False, backend) if need_x else grad_y.new_empty(0)
    grad_values = _sdd(grad_y.t(), x, *index, n, k, block, backend) if need_w else grad_y.new_empty(0)
    return grad_x, grad_values


def _define(name: str, fn, fake):
    """A triton_op where torch has one; else a custom op over the same body with a shape-only fake impl."""
    if HAS_TRITON_OP:
        return _triton_op(f"sparse_nlp::{name}", fn, mutates_args=())
    op = torch.library.custom_op(f"sparse_nlp::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


dds = _define(
    "dds", _dds,
    lambda a, values, *index_and_ints: a.new_empty(a.shape[0], index_and_ints[-5] if index_and_ints[-2]
                                                   else index_and_ints[-4]),
)
sdd = _define("sdd", _sdd, lambda a, b, row_indices, *rest: a.new_empty(row_indices.shape[0], rest[-2], rest[-2]))
linear = _define("linear", _linear, lambda x, values, bias, *index_and_ints: x.new_empty(x.shape[0],
                                                                                         index_and_ints[-4]))
linear_backward = _define(
    "linear_backward", _linear_backward,
    lambda grad_y, x, values, *rest: _linear_backward_fake(grad_y, x, values, rest[-3], rest[-2]),
)


# ---- autograd of linear --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, values, bias, *index_and_ints = inputs
    ctx.save_for_backward(x, values, *index_and_ints[:6])
    ctx.ints = tuple(index_and_ints[6:])  # n, k, block, backend
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, values, *index = ctx.saved_tensors
    n, k, block, backend = ctx.ints
    need_x, need_w, need_bias = ctx.needs_input_grad[:3]
    if grad_y.stride(-1) != 1:  # e.g. the expanded gradient of .sum()
        grad_y = grad_y.contiguous()
    grad_x = grad_values = None
    if need_x or need_w:
        grad_x, grad_values = linear_backward(grad_y, x, values, *index, n, k, block, need_x, need_w, backend)
    grad_bias = grad_y.sum(0) if need_bias and ctx.has_bias else None
    return (grad_x if need_x else None, grad_values if need_w else None, grad_bias) + (None,) * 10


linear.register_autograd(_backward, setup_context=_setup_context)


# ---- eager: the same products without the dispatcher -----------------------------------------------------------------
class EagerLinear(torch.autograd.Function):
    """What `linear` computes, for eager calls: the layout travels as the object itself (its host plans and packed
    weights at hand), and no operator dispatch runs (the op's dispatch and generated autograd cost ~0.2-0.4 ms per
    forward + backward on the 2-core box, more than the native product itself at a few rows). Under torch.compile
    `linear` is the operator instead (autograd.linear picks)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Optional[Tensor], layout: BlockSparseLayout, backend: str):
        ctx.save_for_backward(x, values)
        ctx.layout, ctx.backend = layout, backend
        return run_dds(x, BlockSparseMatrix(values, layout), True, bias, backend)  # [M, N]

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, values = ctx.saved_tensors
        if grad_y.stride(-1) != 1:  # e.g. the expanded gradient of .sum()
            grad_y = grad_y.contiguous()
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        grad_x, grad_values = run_linear_backward(grad_y, x, BlockSparseMatrix(values, ctx.layout), need_x, need_w,
                                                  ctx.backend)
        return grad_x, grad_values, grad_y.sum(0) if need_bias else None, None, None
