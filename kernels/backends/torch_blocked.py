"""Backend "torch": the blocked pure-torch path (gathered GEMMs over block-rows), any device. The CPU fallback where
the native kernels do not run: other dtypes, machines without a C compiler.

Measured on the dev box (2 cores, MKL):
- Y and dX: each output block gets one GEMM over its live inputs gathered side by side, Y[:, i-block] =
  X[:, cols of row i] @ stack(W_ij^T), per chunk of M_CHUNK rows. Gathers go into per-thread workspaces that
  are reused: a fresh multi-MB allocation costs page faults (a 100 MB output alone costs ~55 ms of faults here).
- dW: one [b, M] @ [M, b] GEMM per live block, b's columns as strided operands (no gather).
- The GEMMs are thin (one block of output columns); MKL runs those badly on 2 threads (~3-40 GF/s) and well on 1
  (~80-90 GF/s). So the work is split into tasks (chunks of M for Y and dX, block-rows for dW) that run on the
  thread pool (cpu_threads.py) with BLAS set to one thread for the duration of the call.
- The per-block loops are TorchScript functions, so a task holds the GIL only to start; in Python the two
  threads queued on each other between GEMMs (fwd+bwd ~4-10% slower at density 0.2, M = 8192).
- Where time still goes (1 thread, 768->3072, d=0.2): GEMMs at ~81 GF/s on hot gathered operands (~90 in
  isolation), ~10% gathering inputs out of a [M, K] activation that does not fit in cache, and dW at ~65% of the
  GEMM peak (each [64, M] @ [M, 64] packs both 2 MB operands from strided memory). The native kernels read inputs
  in place instead (no gather, no BLAS packing): 1.33-1.44x this path's fwd+bwd (same run, MLP shapes, 0.2 / 0.1).

The loops take per-block-row index lists as Python ints (`HostPlan`), built once per layout and kept in the
layout's kernel_cache. A layout rebuilt from its index tensors (the operators under torch.compile) builds its plan
again: O(live blocks) of Python per call, which the compiled CPU torch path pays.
"""
from __future__ import annotations

import threading
import warnings
from typing import Callable, List, Optional

import torch
from torch import Tensor

from ..layout import BlockSparseLayout
from .cpu_threads import M_CHUNK, run_tasks

_workspace = threading.local()


class HostPlan:
    """Per-block-row and per-block-column index lists (python ints) of one layout."""

    def __init__(self, layout: BlockSparseLayout):
        index = layout.index
        self.row_offsets = index.row_offsets.tolist()
        self.col_offsets = index.col_offsets.tolist()
        cols = index.col_indices.tolist()
        rows_t = index.transpose_row_indices.tolist()
        ro, co = self.row_offsets, self.col_offsets
        self.cols_of_row = [cols[ro[i]:ro[i + 1]] for i in range(len(ro) - 1)]  # block-cols live in row i
        self.rows_of_col = [rows_t[co[j]:co[j + 1]] for j in range(len(co) - 1)]  # block-rows live in col j
        # The same lists as index tensors: one index_select gathers a block-row's inputs (cheaper than slice + cat).
        # Views of one tensor each (split), not a tensor per list: the plan is rebuilt per call under torch.compile.
        self.cols_of_row_index = list(torch.split(index.col_indices.long(), [len(c) for c in self.cols_of_row]))
        self.rows_of_col_index = list(torch.split(index.transpose_row_indices.long(), [len(r) for r in self.rows_of_col]))
        self.transpose_perm = index.transpose_perm.long()


def host_plan(layout: BlockSparseLayout) -> HostPlan:
    """The layout's plan, built at its first product and kept on it."""
    plan = layout.kernel_cache.get("torch_host_plan")
    if plan is None:
        plan = layout.kernel_cache["torch_host_plan"] = HostPlan(layout)
    return plan


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


def dds(a: Tensor, values: Tensor, layout: BlockSparseLayout, transpose_b: bool,
        bias: Optional[Tensor] = None) -> Tensor:
    """a [M, K_in] @ (W^T if transpose_b else W) (+ bias) with one gathered GEMM per output block."""
    out, tasks = _dds_tasks(a, values, layout, transpose_b, bias)
    run_tasks(tasks, a.device)
    return out


def _dds_tasks(a, values, layout, transpose_b, bias) -> tuple[Tensor, list[Callable[[], None]]]:
    blk, plan = layout.block_size, host_plan(layout)
    v = values.detach()
    if transpose_b:  # output block i = block-row i of W: stack W_ij^T vertically, row-major order
        inputs_of, indices, offsets = plan.cols_of_row, plan.cols_of_row_index, plan.row_offsets
        stack = v.transpose(1, 2).reshape(-1, blk)
    else:  # output block j = block-column j of W: stack W_ij vertically, column-major order
        inputs_of, indices, offsets = plan.rows_of_col, plan.rows_of_col_index, plan.col_offsets
        stack = v.index_select(0, plan.transpose_perm.to(v.device)).reshape(-1, blk)
    m = a.shape[0]
    out = torch.empty(m, len(inputs_of) * blk, dtype=a.dtype, device=a.device)
    stack_offsets = list(offsets)

    def chunk(m0: int) -> None:
        a_c = a[m0:m0 + M_CHUNK]
        workspace = _buffer("gather", a_c.shape[0] * a.shape[1], a.dtype, a.device)
        _dds_output_blocks_compiled(a_c, out[m0:m0 + M_CHUNK], stack, stack_offsets, indices, bias, workspace, blk)

    return out, [lambda m0=m0: chunk(m0) for m0 in range(0, m, M_CHUNK)]


def sdd(a: Tensor, b: Tensor, layout: BlockSparseLayout) -> Tensor:
    """Live blocks of a [N, M] @ b [M, K], [num_blocks, b, b]: per block-row i, one [blk, M] @ [M, blk] GEMM per
    live block.

    b's column slices go to MKL as strided operands (its packing copies them anyway; gathering them first cost
    ~25% more here). a[i-block] is usually dY^T, a thin strided view: copied once per row to a contiguous [M, blk].
    """
    values, tasks = _sdd_tasks(a, b, layout)
    run_tasks(tasks, a.device)
    return values


def _sdd_tasks(a, b, layout) -> tuple[Tensor, list[Callable[[], None]]]:
    blk, plan = layout.block_size, host_plan(layout)
    m = a.shape[1]
    values = torch.empty(layout.num_blocks, blk, blk, dtype=a.dtype, device=a.device)

    def row(i: int) -> None:
        lhs = _buffer("lhs", m * blk, a.dtype, a.device).view(m, blk)
        rows = a[i * blk:(i + 1) * blk]
        _sdd_block_row_compiled(rows, b, values, plan.row_offsets[i], plan.cols_of_row[i], lhs, blk)

    return values, [lambda i=i: row(i) for i, cols in enumerate(plan.cols_of_row) if cols]


def linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, layout: BlockSparseLayout, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dX = dY @ W and dW = (dY^T @ X) on live blocks, as one batch of tasks (no idle tail between them)."""
    grad_x = grad_values = None
    tasks: list[Callable[[], None]] = []
    if need_w:  # the longer tasks first
        grad_values, more = _sdd_tasks(grad_y.t(), x, layout)
        tasks += more
    if need_x:
        grad_x, more = _dds_tasks(grad_y, values, layout, False, None)
        tasks += more
    run_tasks(tasks, grad_y.device)
    return grad_x, grad_values
