"""Backend "triton": the launchers of kernels.py's Triton kernels. Pick tiles, allocate the output, launch; no input
checks here (ops.py does them).

They run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (how the tests run them). kernels.py, and with
it triton, is imported at the first launch, so `import sparse_nlp.kernels` works where triton is missing.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ...layout import BlockSparseLayout


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    from . import kernels  # lazy: triton is optional for `import sparse_nlp.kernels`

    return kernels


def _launch(kernel, like: torch.Tensor):
    """`kernel` through torch.library.wrap_triton while torch.compile traces the triton_ops of library.py (`like`
    is then a fake or functional tensor), so that Inductor sees the launch; the kernel itself in eager calls (no
    dispatch) and under the interpreter (CPU tensors never reach wrap_triton there)."""
    if interpreting() or not _traced(like):
        return kernel
    return torch.library.wrap_triton(kernel)


def _traced(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor))


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's bf16 (and fp16 dot) arithmetic is wrong: upcast right after tl.load there, never on GPU.
    return interpreting() and dtype != torch.float32


def _kernel_out(out: torch.Tensor) -> torch.Tensor:
    """Where the kernel stores: `out`, or an fp32 stand-in under the interpreter, whose fp32->bf16 cast truncates
    instead of rounding; `_finish` then rounds it into `out` with torch."""
    return out.float() if _upcast(out.dtype) else out


def _finish(kernel_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if kernel_out is not out:
        out.copy_(kernel_out)
    return out


def _input_precision(dtype: torch.dtype):
    # fp32 follows torch's own matmul setting, so "faster than dense" compares like with like; fp16/bf16 tiles
    # go to the tensor cores whatever this says (None: Triton's default).
    if interpreting():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if tf32_enabled() else "ieee"
    return None


def tf32_enabled() -> bool:
    """Whether torch's own fp32 matmuls on CUDA use TF32, read without mixing torch's two precision APIs.

    Once the new `fp32_precision` API has been used (transformers does for --tf32), reading the legacy
    `allow_tf32` (or get_float32_matmul_precision) raises, so only the new API is read.
    """
    precision = torch.backends.cuda.matmul.fp32_precision
    if precision == "none":  # inherits the backend-wide setting
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def _shared_memory_bytes(device: Optional[torch.device]) -> int:
    """Shared memory a block may opt into (H100/H200: 227 KiB); 160 KiB where torch does not say."""
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        found = getattr(props, "shared_memory_per_block_optin", 0)
        if found:
            return int(found) - 8 * 1024  # leave room for Triton's own scratch
    return 160 * 1024


def _stages(tile_elems: int, dtype: torch.dtype, most: int, device: Optional[torch.device] = None) -> int:
    """Pipeline depth whose shared-memory buffers fit (fp32 at block 128: 2 stages on an H100, not 1)."""
    per_stage = tile_elems * dtype.itemsize
    return max(1, min(most, _shared_memory_bytes(device) // per_stage))


def _dds_tiles(block: int, dtype: torch.dtype, device: Optional[torch.device] = None) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, num_stages); one config, no autotune (multi-config autotune fails in the interpreter)."""
    if block == 128:
        block_m, warps = 64, 8  # acc 64x128 fp32 = 32 KiB of registers across 8 warps
    else:
        block_m, warps = 128, 4
    return block_m, warps, _stages(block_m * block + block * block, dtype, 3 if block >= 64 else 4, device)


def dds(a: Tensor, values: Tensor, layout: BlockSparseLayout, transpose_b: bool,
        bias: Optional[Tensor] = None) -> Tensor:
    """out [M, N_out] = a [M, K_in] @ (W^T if transpose_b else W) (+ bias); W = values over layout, the sparse
    operand."""
    blk, index = layout.block_size, layout.index
    m = a.shape[0]
    n_out = layout.shape[0] if transpose_b else layout.shape[1]
    out = torch.empty(m, n_out, dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    v = values
    if transpose_b:  # Y = X W^T: walk block-rows of W; tile[k, n] = W_block[n, k]
        offsets, inner, perm = index.row_offsets, index.col_indices, index.row_offsets  # perm unused
        stride_vk, stride_vn, has_perm = v.stride(2), v.stride(1), False
    else:  # dX = dY W: walk block-columns of W through the column-major permutation; tile = W_block
        offsets, inner, perm = index.col_offsets, index.transpose_row_indices, index.transpose_perm
        stride_vk, stride_vn, has_perm = v.stride(1), v.stride(2), True
    block_m, warps, stages = _dds_tiles(blk, a.dtype, a.device)
    grid = dds_grid(m, n_out, blk, block_m)
    kout = _kernel_out(out)
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[n] at unit stride
    _launch(_kernels().dds_kernel, a)[grid](
        a, v, kout, bias if bias is not None else kout,
        offsets, inner, perm,
        m,
        a.stride(0), a.stride(1),
        v.stride(0), stride_vk, stride_vn,
        kout.stride(0), kout.stride(1),
        HAS_PERM=has_perm, HAS_BIAS=bias is not None, UPCAST=_upcast(a.dtype),
        INPUT_PRECISION=_input_precision(a.dtype), BLOCK=blk, BLOCK_M=block_m, NUM_N=n_out // blk,
        num_warps=warps, num_stages=stages,
    )
    return _finish(kout, out)


def dds_grid(m: int, n_out: int, block: int, block_m: int) -> tuple[int]:
    """One flat grid axis of (output block, M tile) pairs, output blocks fastest (neighbours share rows of `a` in
    L2). Axis 0 allows 2^31 - 1 programs; axes 1 and 2 only 65,535, which M = 8.4M rows of 128 would exceed."""
    return ((n_out // block) * triton_cdiv(m, block_m),)


def _num_splits(num_blocks: int, m: int, device: torch.device) -> int:
    """Split the M reduction when live blocks alone would leave SMs idle (aim: ~4 programs per SM)."""
    if device.type != "cuda" or not isinstance(m, int):
        return 1
    if not isinstance(num_blocks, int):
        # Under torch.compile the live-block count is symbolic (one graph for every topology): split by M alone,
        # as the count-based rule does for ~60 blocks on 132 SMs (768 -> 3072 at block 64, density 0.1).
        return max(1, min(8, m // 2048))
    if num_blocks == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // num_blocks)
    return max(1, min(want, m // 1024))  # keep >= 1024 rows per split so partials stay cheap


def sdd(a: Tensor, b: Tensor, layout: BlockSparseLayout, num_splits: Optional[int] = None) -> Tensor:
    """values [num_blocks, blk, blk] of (a [N, M] @ b [M, K]) on the live blocks of `layout`."""
    blk = layout.block_size
    m = a.shape[1]
    nnz = layout.num_blocks
    out = torch.empty(nnz, blk, blk, dtype=a.dtype, device=a.device)
    if isinstance(nnz, int) and nnz == 0:  # a symbolic count (torch.compile) launches an empty grid instead
        return out
    if m == 0:
        return out.zero_()
    splits = num_splits or _num_splits(nnz, m, a.device)
    block_m = 64 if blk == 128 else 128
    per_split = triton_cdiv(triton_cdiv(m, splits), block_m) * block_m
    splits = triton_cdiv(m, per_split)
    if splits == 1:
        partial = _kernel_out(out)
    else:  # fp32 partial sums, one slab per range of M
        partial = torch.empty(splits, nnz, blk, blk, dtype=torch.float32, device=a.device)
    stride_os = 0 if splits == 1 else partial.stride(0)
    pstrides = partial.stride()[-3:]
    _launch(_kernels().sdd_kernel, a)[(nnz, splits)](
        a, b, partial,
        layout.index.row_indices, layout.index.col_indices,
        m, per_split,
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        stride_os, *pstrides,
        UPCAST=_upcast(a.dtype), INPUT_PRECISION=_input_precision(a.dtype), BLOCK=blk, BLOCK_M=block_m,
        num_warps=8 if blk == 128 else 4, num_stages=_stages(2 * blk * block_m, a.dtype, 3, a.device),
    )
    if splits > 1:
        return out.copy_(partial.sum(0))
    return _finish(partial, out)


def linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, layout: BlockSparseLayout, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The backward from the other two products: dX = dds(dY, W) walks W's column-major order (no transposed copy
    of W), dW = sdd(dY^T, X) computes only the live blocks."""
    grad_x = dds(grad_y, values, layout, False) if need_x else None
    return grad_x, sdd(grad_y.t(), x, layout) if need_w else None


def triton_cdiv(x: int, y: int) -> int:
    return -(-x // y)
