"""The torch CPU paths: a blocked path (gathered GEMMs over block-rows) and a masked-dense path, plus the thread
pool that the native kernels (cpu_native.py, the fp32 default where they build) share. The blocked path is the
fallback: other dtypes, and machines without a C compiler.

Blocked path, measured on the dev box (2 cores, MKL):
- Y and dX: each output block gets one GEMM over its live inputs gathered side by side, Y[:, i-block] =
  X[:, cols of row i] @ stack(W_ij^T), per chunk of M_CHUNK rows. Gathers go into per-thread workspaces that
  are reused: a fresh multi-MB allocation costs page faults (a 100 MB output alone costs ~55 ms of faults here).
- dW: one [b, M] @ [M, b] GEMM per live block, b's columns as strided operands (no gather).
- The GEMMs are thin (one block of output columns); MKL runs those badly on 2 threads (~3-40 GF/s) and well on 1
  (~80-90 GF/s). So we split the work into tasks (chunks of M for Y and dX, block-rows for dW), run them on a
  thread pool with BLAS set to one thread for the duration of the call, then restore torch's thread count.
- The per-block loops are TorchScript functions, so a task holds the GIL only to start; in Python the two
  threads queued on each other between GEMMs (fwd+bwd ~4-10% slower at density 0.2, M = 8192).
- Where time still goes (1 thread, 768->3072, d=0.2): GEMMs at ~81 GF/s on hot gathered operands (~90 in
  isolation), ~10% gathering inputs out of a [M, K] activation that does not fit in cache, and dW at ~65% of the
  GEMM peak (each [64, M] @ [M, 64] packs both 2 MB operands from strided memory). cpu_kernels.c reads inputs in
  place instead (no gather, no BLAS packing): 1.33-1.44x this path's fwd+bwd (same run, MLP shapes, 0.2 / 0.1).
"""
from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, List, Optional

import torch

from .layout import BlockSparseLayout, BlockSparseMatrix, gather_blocks

M_CHUNK = 512  # rows per task for Y and dX: the gathered [M_CHUNK, w] operand stays in L2 (1024: ~5% slower)

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()
_workspace = threading.local()


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(n, thread_name_prefix="sparse_nlp_cpu", initializer=torch.set_num_threads,
                                       initargs=(1,))
            _pool_size = n
    return _pool


@contextmanager
def _single_threaded_blas():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_tasks(tasks: list[Callable[[], None]], device: torch.device, blas: bool = True) -> None:
    """Run tasks on the pool on CPU; serially elsewhere or when there is one thread. blas: the tasks call BLAS,
    so torch runs it on one thread per task for the duration (the native kernels call none: nothing to switch)."""
    threads = torch.get_num_threads()
    nested = threading.current_thread().name.startswith("sparse_nlp_cpu")  # never wait on our own pool
    if device.type != "cpu" or threads == 1 or len(tasks) <= 1 or nested:
        for task in tasks:
            task()
        return
    pool = _get_pool(threads)
    with _single_threaded_blas() if blas else nullcontext():
        for future in [pool.submit(_without_grad, task) for task in tasks]:
            future.result()


def _without_grad(task: Callable[[], None]) -> None:
    with torch.no_grad():  # grad mode is per thread: the pool's threads do not inherit the caller's no_grad
        task()


def _buffer(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable flat buffer of at least `numel` elements."""
    key = (slot, dtype, device)
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.numel() < numel:
        buf = bufs[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _dds_output_blocks(
    a: torch.Tensor,
    out: torch.Tensor,
    stack: torch.Tensor,
    offsets: List[int],
    indices: List[torch.Tensor],
    bias: Optional[torch.Tensor],
    workspace: torch.Tensor,
    blk: int,
) -> None:
    """out[:, n-block] = a[:, live inputs of n] @ stack[rows of n] (+ bias) for every output block n.

    The live inputs are gathered side by side with one index_select over a's [rows, K/blk, blk] view into
    `workspace` (a view for any strides, e.g. dsd's transposed operand); a single live input is used in place. Compiled with TorchScript below: the loop then runs without the GIL, so the pool's
    threads do not queue on each other between GEMMs (~10% on 2 threads here).
    """
    rows = a.shape[0]
    for n in range(len(indices)):
        o = out[:, n * blk:(n + 1) * blk]
        index = indices[n]
        count = index.numel()
        if count == 0:
            if bias is None:
                o.zero_()
            else:
                o.copy_(bias[n * blk:(n + 1) * blk].expand(rows, blk))
            continue
        if count == 1:
            j = int(index[0])
            x = a[:, j * blk:(j + 1) * blk]
        else:
            gathered = workspace[:rows * count * blk].view(rows, count, blk)
            x = torch.index_select(a.unflatten(1, (-1, blk)), 1, index, out=gathered).view(rows, -1)
        w = stack[offsets[n] * blk:offsets[n + 1] * blk]
        if bias is None:
            torch.mm(x, w, out=o)
        else:
            torch.addmm(bias[n * blk:(n + 1) * blk], x, w, out=o)


def _sdd_block_row(
    a_rows: torch.Tensor, b: torch.Tensor, values: torch.Tensor, first: int, cols: List[int], lhs: torch.Tensor, blk: int
) -> None:
    """values[first + t] = a_rows @ b[:, cols[t]-block]: a_rows (a [blk, M] view, usually dY^T's strided rows) is
    copied once into the contiguous workspace `lhs` [M, blk]; b's column blocks go to the GEMM as strided operands
    (its packing copies them anyway; gathering them first cost ~25% more here)."""
    lhs.copy_(a_rows.t())
    for t in range(len(cols)):
        j = cols[t]
        torch.mm(lhs.t(), b[:, j * blk:(j + 1) * blk], out=values[first + t])


def _script(fn):
    """TorchScript `fn` where this torch has TorchScript; the plain function (same result, GIL held) where not.

    torch 2.13 marks torch.jit.script deprecated (torch.compile cannot take this data-dependent loop without a
    recompile per layout), so its warning is silenced here; tests/kernels check that these loops do compile, so a
    change TorchScript cannot take fails loudly instead of quietly losing the speed.
    """
    if not hasattr(torch.jit, "script"):
        return fn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        return torch.jit.script(fn)


_dds_output_blocks_compiled = _script(_dds_output_blocks)
_sdd_block_row_compiled = _script(_sdd_block_row)


def blocked_dds(
    a: torch.Tensor,
    b: BlockSparseMatrix,
    transpose_b: bool,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """a [M, K_in] @ (b^T if transpose_b else b) (+ bias) with one gathered GEMM per output block."""
    out, tasks = _dds_tasks(a, b, transpose_b, bias, out)
    run_tasks(tasks, a.device)
    return out


def _dds_tasks(a, b, transpose_b, bias, out) -> tuple[torch.Tensor, list[Callable[[], None]]]:
    layout, blk = b.layout, b.layout.block_size
    plan = layout.host_plan
    v = b.values.detach()
    if transpose_b:  # output block i = block-row i of W: stack W_ij^T vertically, row-major order
        inputs_of, indices, offsets = plan.cols_of_row, plan.cols_of_row_index, plan.row_offsets
        stack = v.transpose(1, 2).reshape(-1, blk)
    else:  # output block j = block-column j of W: stack W_ij vertically, column-major order
        inputs_of, indices, offsets = plan.rows_of_col, plan.rows_of_col_index, plan.col_offsets
        stack = v.index_select(0, plan.transpose_perm.to(v.device)).reshape(-1, blk)
    m = a.shape[0]
    if out is None:
        out = torch.empty(m, len(inputs_of) * blk, dtype=a.dtype, device=a.device)
    stack_offsets = list(offsets)

    def chunk(m0: int) -> None:
        a_c = a[m0:m0 + M_CHUNK]
        workspace = _buffer("gather", a_c.shape[0] * a.shape[1], a.dtype, a.device)
        _dds_output_blocks_compiled(a_c, out[m0:m0 + M_CHUNK], stack, stack_offsets, indices, bias, workspace, blk)

    return out, [lambda m0=m0: chunk(m0) for m0 in range(0, m, M_CHUNK)]


def blocked_sdd(a: torch.Tensor, b: torch.Tensor, layout: BlockSparseLayout) -> BlockSparseMatrix:
    """Live blocks of a [N, M] @ b [M, K]: per block-row i, one [blk, M] @ [M, blk] GEMM per live block.

    b's column slices go to MKL as strided operands (its packing copies them anyway; gathering them first cost
    ~25% more here). a[i-block] is usually dY^T, a thin strided view: copied once per row to a contiguous [M, blk].
    """
    values, tasks = _sdd_tasks(a, b, layout)
    run_tasks(tasks, a.device)
    return BlockSparseMatrix(values, layout)


def _sdd_tasks(a, b, layout) -> tuple[torch.Tensor, list[Callable[[], None]]]:
    blk, plan = layout.block_size, layout.host_plan
    m = a.shape[1]
    values = torch.empty(layout.num_blocks, blk, blk, dtype=a.dtype, device=a.device)

    def row(i: int) -> None:
        lhs = _buffer("lhs", m * blk, a.dtype, a.device).view(m, blk)
        rows = a[i * blk:(i + 1) * blk]
        _sdd_block_row_compiled(rows, b, values, plan.row_offsets[i], plan.cols_of_row[i], lhs, blk)

    return values, [lambda i=i: row(i) for i, cols in enumerate(plan.cols_of_row) if cols]


def blocked_linear_backward(
    grad_y: torch.Tensor, x: torch.Tensor, w: BlockSparseMatrix, need_x: bool, need_w: bool
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dX = dY @ W and dW = (dY^T @ X) on live blocks, as one batch of tasks (no idle tail between them)."""
    grad_x = grad_values = None
    tasks: list[Callable[[], None]] = []
    if need_w:  # the longer tasks first
        grad_values, more = _sdd_tasks(grad_y.t(), x, w.layout)
        tasks += more
    if need_x:
        grad_x, more = _dds_tasks(grad_y, w, False, None, None)
        tasks += more
    run_tasks(tasks, grad_y.device)
    return grad_x, grad_values


def dense_dds(
    a: torch.Tensor, b: BlockSparseMatrix, transpose_b: bool, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Masked-dense path: build W densely and call one GEMM (wins at high density)."""
    w = b.to_dense().detach()
    w = w.t() if transpose_b else w
    return torch.mm(a, w) if bias is None else torch.addmm(bias, a, w)


def dense_sdd(a: torch.Tensor, b: torch.Tensor, layout: BlockSparseLayout) -> BlockSparseMatrix:
    """Masked-dense path: the full product, then its live blocks."""
    return BlockSparseMatrix(gather_blocks(torch.mm(a, b), layout), layout)
