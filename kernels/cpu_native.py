"""The compiled CPU path (backend "native"): cpu_kernels.c's fp32 kernels, called through ctypes on cpu.py's pool.

ctypes releases the GIL for the length of each call, so the pool's threads compute side by side; no BLAS is
involved, so torch's thread count is left alone. Tasks:
- Y and dX: chunks of M_CHUNK rows, each one call over every output block;
- dW: M split between the threads on SDD_ROWS boundaries, each thread summing its rows into its own [nnz, b, b]
  buffer (the first writes into the result), the partial sums added at the end.
Operands need unit column stride (rows may be padded); other strides are copied first.
"""
from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import cpu
from .layout import BlockSparseLayout, BlockSparseMatrix
from .native_build import load_native, native_unavailable_reason
from .output_pool import OutputPool

NATIVE_DTYPES = (torch.float32,)
SPLIT_OUTPUTS_MAX_ROWS = 64  # dds of at most this many rows splits its output blocks between threads
SDD_ROWS = 256  # cpu_kernels.c's SDD_ROWS: the dW split between threads falls on its chunks
OUTPUTS = OutputPool()  # Y, dX, dW and scratch of this process's native products: recycled, not faulted in afresh


def available() -> bool:
    """Whether the compiled kernels are built and loaded (built on first call)."""
    return load_native() is not None


def unavailable_reason() -> str:
    return native_unavailable_reason()


def warn_unavailable() -> None:
    """Say once per call site that the fast path is missing, unless the user turned it off."""
    reason = native_unavailable_reason()
    if reason and not reason.startswith("disabled by"):
        warnings.warn(
            f"sparse_nlp: native CPU kernels unavailable ({reason}); block-sparse layers on CPU use the slower "
            "torch path. Install a C compiler (e.g. gcc), or set SPARSE_NLP_NATIVE=0 to silence this.",
            UserWarning, stacklevel=4,
        )


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t itself when its rows are contiguous (unit column stride), else a contiguous copy."""
    if t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


def _ptr(t: torch.Tensor, offset_elements: int = 0) -> int:
    return t.data_ptr() + offset_elements * t.element_size()


def _checked(status: int) -> None:
    if status != 0:
        raise MemoryError("the native block-sparse kernel could not allocate its scratch buffer (out of memory)")


def dds(a: torch.Tensor, b: BlockSparseMatrix, transpose_b: bool, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [M, *] @ (b^T if transpose_b else b) (+ bias), fp32, on live blocks only."""
    out, tasks = _dds_tasks(a, b, transpose_b, bias, split_outputs=True)
    cpu.run_tasks(tasks, a.device, blas=False)
    return out


def _dds_tasks(a, b, transpose_b, bias, split_outputs: bool = False) -> tuple[torch.Tensor, list[Callable[[], None]]]:
    """The product as tasks for cpu.run_tasks: chunks of cpu.M_CHUNK rows. split_outputs: a product of at most
    SPLIT_OUTPUTS_MAX_ROWS rows, called from the caller's thread, is one task that splits the output blocks between
    OpenMP threads instead (decoding: one chunk of rows would otherwise keep one core busy)."""
    lib = load_native()
    layout, blk = b.layout, b.layout.block_size
    if transpose_b:  # output block i = block-row i of W: its blocks transposed, row-major order
        offsets, inputs, n_out = layout.row_offsets, layout.col_indices, layout.block_shape[0]
        stack = _packed_forward_weights(lib, b)
    else:  # output block j = block-column j of W: its blocks as they are, column-major order
        offsets, inputs, n_out = layout.col_offsets, layout.transpose_row_indices, layout.block_shape[1]
        v = b.values.detach().contiguous()
        stack = OUTPUTS.empty(tuple(v.shape), v.dtype, v.device)  # the blocks in the kernel's order and tile layout
        lib.sparse_nlp_pack_blocks(_ptr(v), _ptr(layout.transpose_perm), v.shape[0], blk, 0, _ptr(stack))
    a = _rows(a)
    bias = None if bias is None else bias.detach().contiguous()
    m, lda = a.shape[0], a.stride(0)
    out = OUTPUTS.empty((m, n_out * blk), a.dtype, a.device)
    ldc = out.stride(0)
    bias_ptr = None if bias is None else _ptr(bias)
    threads = torch.get_num_threads()
    if split_outputs and 0 < m <= SPLIT_OUTPUTS_MAX_ROWS and threads > 1 and lib.sparse_nlp_openmp():
        bounds = _output_splits(layout, transpose_b, min(threads, n_out))

        def split() -> None:
            _checked(lib.sparse_nlp_dds_f32_split(
                _ptr(a), lda, m, _ptr(stack), _ptr(offsets), _ptr(inputs), blk, bias_ptr, _ptr(out), ldc,
                _ptr(bounds), bounds.numel() - 1,
            ))

        return out, [split]

    def chunk(m0: int) -> None:
        rows = min(cpu.M_CHUNK, m - m0)
        _checked(lib.sparse_nlp_dds_f32(
            _ptr(a, m0 * lda), lda, rows, _ptr(stack), _ptr(offsets), _ptr(inputs), n_out, blk, bias_ptr,
            _ptr(out, m0 * ldc), ldc,
        ))

    return out, [lambda m0=m0: chunk(m0) for m0 in range(0, m, cpu.M_CHUNK)]


def _output_splits(layout: BlockSparseLayout, transpose_b: bool, parts: int) -> torch.Tensor:
    """int32 output-block boundaries [0, ..., n_out] cutting the live blocks into at most `parts` nearly equal
    shares; computed once per layout, direction and part count."""
    cache = layout.kernel_cache.setdefault("native_output_splits", {})
    key = (transpose_b, parts)
    if key not in cache:
        offsets = (layout.row_offsets if transpose_b else layout.col_offsets).tolist()
        total, n_out = offsets[-1], len(offsets) - 1
        cuts = {bisect.bisect_left(offsets, round(p * total / parts)) for p in range(1, parts)}
        bounds = sorted({0, n_out, *(min(max(c, 0), n_out) for c in cuts)})
        cache[key] = torch.tensor(bounds, dtype=torch.int32)
    return cache[key]


def _packed_forward_weights(lib, b: BlockSparseMatrix) -> torch.Tensor:
    """W's live blocks transposed, in the forward kernel's tile layout, kept on the layout and repacked only when
    the values changed (another tensor, or an in-place change: its version counter moved). Decoding calls the
    forward once per token with the same weights: it then reads the weights once, instead of copying them first
    (the copy cost more than the product at M = 1). In training every step repacks, into the same buffer."""
    values = b.values
    cache = b.layout.kernel_cache
    entry = cache.get("native_forward_pack")
    fresh = (entry is not None and entry.source.data_ptr() == values.data_ptr()
             and entry.version == values._version and entry.stack.shape == values.shape
             and entry.stack.dtype == values.dtype)
    if fresh:
        return entry.stack
    v = values.detach().contiguous()
    stack = entry.stack if entry is not None and entry.stack.shape == v.shape and entry.stack.dtype == v.dtype \
        else torch.empty_like(v)
    lib.sparse_nlp_pack_blocks(_ptr(v), None, v.shape[0], b.layout.block_size, 1, _ptr(stack))
    # A detached alias keeps the packed values' storage alive, so no other tensor can take its address while the
    # entry is checked against it; it holds no reference to the parameter itself (swap_tensors still works).
    cache["native_forward_pack"] = _Packed(stack=stack, source=values.detach(), version=values._version)
    return stack


@dataclass
class _Packed:
    stack: torch.Tensor
    source: torch.Tensor
    version: int


def sdd(a: torch.Tensor, b: torch.Tensor, layout: BlockSparseLayout) -> BlockSparseMatrix:
    """Live blocks of a [N, M] @ b [M, K], fp32. a is usually dY^T, a transposed view: read as dY's rows."""
    values, tasks, finish = _sdd_tasks(a, b, layout)
    cpu.run_tasks(tasks, a.device, blas=False)
    finish()
    return BlockSparseMatrix(values, layout)


def _sdd_tasks(a, b, layout) -> tuple[torch.Tensor, list[Callable[[], None]], Callable[[], None]]:
    lib = load_native()
    blk = layout.block_size
    g, x = _rows(a.t()), _rows(b)  # g = dY [M, N]
    m = x.shape[0]
    values = OUTPUTS.empty((layout.num_blocks, blk, blk), a.dtype, a.device)  # dW: recycled once its grad is freed
    chunks = max(1, math.ceil(m / SDD_ROWS))
    parts = max(1, min(torch.get_num_threads(), chunks))
    bounds = [min(m, round(p * chunks / parts) * SDD_ROWS) for p in range(parts + 1)]
    partials = [values] + [OUTPUTS.empty(tuple(values.shape), values.dtype, values.device) for _ in range(parts - 1)]
    offsets, cols = layout.row_offsets, layout.col_indices

    def part(p: int) -> None:
        m0, m1 = bounds[p], bounds[p + 1]
        _checked(lib.sparse_nlp_sdd_f32(
            _ptr(g, m0 * g.stride(0)), g.stride(0), _ptr(x, m0 * x.stride(0)), x.stride(0), m1 - m0,
            _ptr(offsets), _ptr(cols), layout.block_shape[0], blk, _ptr(partials[p]), 0,
        ))

    def finish() -> None:
        for partial in partials[1:]:
            values.add_(partial)

    return values, [lambda p=p: part(p) for p in range(parts)], finish


def linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor, w: BlockSparseMatrix, need_x: bool, need_w: bool
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dX = dY @ W and dW = dY^T @ X on live blocks, as one batch of tasks (dW's longer tasks first)."""
    grad_x = grad_values = None
    tasks: list[Callable[[], None]] = []
    finish: Callable[[], None] = lambda: None
    if need_w:
        grad_values, more, finish = _sdd_tasks(grad_y.t(), x, w.layout)
        tasks += more
    if need_x:
        grad_x, more = _dds_tasks(grad_y, w, False, None)
        tasks += more
    cpu.run_tasks(tasks, grad_y.device, blas=False)
    finish()
    return grad_x, grad_values
