"""Backend "native": cpu_kernels.c's fp32 kernels (built by build.py), called through ctypes on the CPU thread pool.

ctypes releases the GIL for the length of each call, so the pool's threads compute side by side; no BLAS is
involved, so torch's thread count is left alone. Tasks:
- Y and dX: chunks of M_CHUNK rows, each one call over every output block;
- dW: M split between the threads on SDD_ROWS boundaries, each thread summing its rows into its own [nnz, b, b]
  buffer (the first writes into the result), the partial sums added at the end.
Operands need unit column stride (rows may be padded); other strides are copied first.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from ...layout import BlockSparseLayout
from ..cpu_threads import M_CHUNK, run_tasks
from .build import load_native, native_unavailable_reason
from .output_pool import OutputPool

NATIVE_DTYPES = (torch.float32,)
FEW_ROWS = 64  # forward products of at most this many rows go through few_rows_forward
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


def dds(
    a: Tensor, values: Tensor, layout: BlockSparseLayout, transpose_b: bool, bias: Optional[Tensor] = None,
    weights_revision: Optional[int] = None,
) -> Tensor:
    """a [M, *] @ (W^T if transpose_b else W) (+ bias), fp32, on live blocks only; W = values over layout.

    weights_revision: None packs the forward's weights afresh each call. A number keeps the pack on the layout and
    reuses it while the values are the same tensor, at the same version, and the caller passes the same number:
    the caller moves it whenever the values may have changed without moving their version counter (a fused
    optimizer's step: the Trainer's default AdamW changes parameters in place without it)."""
    if transpose_b and 0 < a.shape[0] <= FEW_ROWS:
        return few_rows_forward(a, values, layout, bias, weights_revision)
    out, tasks = _dds_tasks(a, values, layout, transpose_b, bias, weights_revision)
    run_tasks(tasks, a.device, blas=False)
    return out


def few_rows_forward(
    a: Tensor, values: Tensor, layout: BlockSparseLayout, bias: Optional[Tensor] = None,
    weights_revision: Optional[int] = None,
) -> Tensor:
    """Y = a @ W^T (+ bias) for a few rows (decoding, small batches): one C call on the caller's thread. Kept thin:
    at M = 1 the product takes ~20 us, and every microsecond of Python here is a share of each generated token;
    with a weights_revision the weights are not even repacked. One thread: handing half the output blocks to a second
    one (a Python pool: ~70-150 us; OpenMP: a few us, but milliseconds whenever another process holds the other
    core) gained nothing measurable at batch 1 and a few percent at batch 8."""
    packed = _packed_forward_weights(load_native(), values, layout, weights_revision)
    a = _rows(a)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    m = a.shape[0]
    out = torch.empty((m, packed.out_features), dtype=a.dtype)
    _checked(packed.lib.sparse_nlp_dds_f32(
        a.data_ptr(), a.stride(0), m, packed.stack_ptr, packed.offsets_ptr, packed.inputs_ptr, packed.out_blocks,
        packed.block, None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
    ))
    return out


def _dds_tasks(a, values, layout, transpose_b, bias, weights_revision=None) -> tuple[Tensor, list[Callable[[], None]]]:
    """The product as tasks for run_tasks: chunks of M_CHUNK rows."""
    lib = load_native()
    blk, index = layout.block_size, layout.index
    if transpose_b:  # output block i = block-row i of W: its blocks transposed, row-major order
        offsets, inputs, n_out = index.row_offsets, index.col_indices, layout.block_shape[0]
        stack = _packed_forward_weights(lib, values, layout, weights_revision).stack
    else:  # output block j = block-column j of W: its blocks as they are, column-major order
        offsets, inputs, n_out = index.col_offsets, index.transpose_row_indices, layout.block_shape[1]
        v = values.detach().contiguous()
        stack = OUTPUTS.empty(tuple(v.shape), v.dtype, v.device)  # the blocks in the kernel's order and tile layout
        lib.sparse_nlp_pack_blocks(_ptr(v), _ptr(index.transpose_perm), v.shape[0], blk, 0, _ptr(stack))
    a = _rows(a)
    bias = None if bias is None else bias.detach().contiguous()
    m, lda = a.shape[0], a.stride(0)
    out = OUTPUTS.empty((m, n_out * blk), a.dtype, a.device)
    ldc = out.stride(0)
    bias_ptr = None if bias is None else _ptr(bias)

    def chunk(m0: int) -> None:
        rows = min(M_CHUNK, m - m0)
        _checked(lib.sparse_nlp_dds_f32(
            _ptr(a, m0 * lda), lda, rows, _ptr(stack), _ptr(offsets), _ptr(inputs), n_out, blk, bias_ptr,
            _ptr(out, m0 * ldc), ldc,
        ))

    return out, [lambda m0=m0: chunk(m0) for m0 in range(0, m, M_CHUNK)]


PACK_KEY = "native_forward_pack"  # where a kept pack lives in the layout's kernel_cache


class PackedForward:
    """W's live blocks transposed, in the forward kernel's tile layout, with what a few-row call needs as plain
    integers; kept ones also remember what they were packed from (the values, their version, the caller's
    weights revision)."""

    def __init__(self, lib, stack: torch.Tensor, source: torch.Tensor, version: int, revision: Optional[int],
                 layout: BlockSparseLayout):
        self.lib, self.stack, self.source, self.version, self.revision = lib, stack, source, version, revision
        self.block, self.out_blocks = layout.block_size, layout.block_shape[0]
        self.out_features = layout.shape[0]
        self.stack_ptr = stack.data_ptr()
        # Pointers into the layout's index tensors, which live as long as the layout that holds this entry.
        self.offsets_ptr, self.inputs_ptr = layout.index.row_offsets.data_ptr(), layout.index.col_indices.data_ptr()

    def matches(self, values: torch.Tensor, version: int, revision: int) -> bool:
        return (version >= 0 and self.version == version and self.revision == revision
                and self.source.data_ptr() == values.data_ptr()
                and self.stack.shape == values.shape and self.stack.dtype == values.dtype)


def _version(t: torch.Tensor) -> int:
    """t's version counter; -1 for an inference tensor, which has none (its pack is then never reused)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _packed_forward_weights(lib, values: Tensor, layout: BlockSparseLayout, revision: Optional[int]) -> PackedForward:
    """W's live blocks packed for the forward kernel: into a recycled buffer each call (revision None), or kept on
    the layout and repacked only when the values changed: another tensor, an in-place change that moved its version
    counter (load_state_dict, copy_, a foreach optimizer), or another `revision` (what the caller moves for changes
    the counter misses). Decoding then reads the weights once per token instead of copying them first (at M = 1
    the copy cost more than the product)."""
    if revision is None:
        stack = OUTPUTS.empty(tuple(values.shape), values.dtype, values.device)
        lib.sparse_nlp_pack_blocks(_ptr(values.detach().contiguous()), None, values.shape[0], layout.block_size, 1,
                                   _ptr(stack))
        return PackedForward(lib, stack, values, -1, None, layout)
    version = _version(values)
    cache = layout.kernel_cache
    entry = cache.get(PACK_KEY)
    if entry is not None and entry.matches(values, version, revision):
        return entry
    v = values.detach().contiguous()
    fits = entry is not None and entry.stack.shape == v.shape and entry.stack.dtype == v.dtype
    stack = entry.stack if fits else torch.empty_like(v)
    lib.sparse_nlp_pack_blocks(_ptr(v), None, v.shape[0], layout.block_size, 1, _ptr(stack))
    # A detached alias keeps the packed values' storage alive, so no other tensor can take its address while the
    # entry is checked against it; it holds no reference to the parameter itself (swap_tensors still works).
    entry = cache[PACK_KEY] = PackedForward(lib, stack, values.detach(), version, revision, layout)
    return entry


def release_packed_weights(layout: BlockSparseLayout) -> None:
    """Drop the pack kept on `layout` (and the values' storage its entry holds), if there is one."""
    if "kernel_cache" in layout.__dict__:  # a cached_property not yet read: nothing kept, and none made here
        layout.kernel_cache.pop(PACK_KEY, None)


def sdd(a: Tensor, b: Tensor, layout: BlockSparseLayout) -> Tensor:
    """Live blocks of a [N, M] @ b [M, K], [num_blocks, b, b], fp32. a is usually dY^T, a transposed view: read as
    dY's rows."""
    values, tasks, finish = _sdd_tasks(a, b, layout)
    run_tasks(tasks, a.device, blas=False)
    finish()
    return values


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
    offsets, cols = layout.index.row_offsets, layout.index.col_indices

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
    grad_y: Tensor, x: Tensor, values: Tensor, layout: BlockSparseLayout, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dX = dY @ W and dW = dY^T @ X on live blocks, as one batch of tasks (dW's longer tasks first)."""
    grad_x = grad_values = None
    tasks: list[Callable[[], None]] = []
    finish: Callable[[], None] = lambda: None
    if need_w:
        grad_values, more, finish = _sdd_tasks(grad_y.t(), x, layout)
        tasks += more
    if need_x:
        grad_x, more = _dds_tasks(grad_y, values, layout, False, None)
        tasks += more
    run_tasks(tasks, grad_y.device, blas=False)
    finish()
    return grad_x, grad_values
