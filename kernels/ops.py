"""The three products of a block-sparse linear layer, in stk naming (layout of output, left, right operand):

    dds(a, w, transpose_b)  dense  = dense a @ sparse w (or w^T)      Y = dds(X, W, True), dX = dds(dY, W)
    dsd(w, b, transpose_a)  dense  = sparse w (or w^T) @ dense b      Y^T = dsd(W, X^T)
    sdd(a, b, layout)       sparse = dense a @ dense b, live blocks   dW = sdd(dY^T, X, W.layout)

Each checks its inputs (one-line ValueErrors) and dispatches to a backend:

    "triton"  Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, as the tests do)
    "native"  compiled C kernels (cpu_native.py, cpu_kernels.c): CPU, fp32; built at first use
    "torch"   the blocked pure-torch path (cpu.py): gathered GEMMs over block-rows, any device
    "dense"   masked dense: build W densely, one GEMM (faster than "torch" at high density)
    None      automatic: CUDA -> "triton" ("dense" for fp64 or a fully dense layout); CPU -> "native" for fp32
              where it builds, else "torch"; "dense" above NATIVE_DENSE_THRESHOLD / DENSE_THRESHOLD[block]

These ops are not differentiable; `block_sparse_linear` (autograd.py) is. Past the checks each runs its product
directly in eager calls, and its torch.library operator (custom_ops.py) under torch.compile, which traces it without a
graph break.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cpu_native, custom_ops
from .layout import BlockSparseLayout, BlockSparseMatrix

# CPU, per block size: above this density the masked-dense GEMM beats the blocked path, so "auto" switches to
# "dense". Measured fwd+bwd break-even on the 2-core dev box, 768->3072, M=8192 (docs/kernels.md).
# The torch path: 16-blocks ~0.2 (1.0x at 0.2), 32-blocks ~0.4 (1.05x at 0.4), 64-blocks ~0.6 (1.06x at 0.6, 0.88x
# at 0.75), 128-blocks 1.7x at 0.4 (same as 64 at 0.35, so 0.6 too).
DENSE_THRESHOLD = {16: 0.2, 32: 0.4, 64: 0.6, 128: 0.6}
# The native kernels (median of 3, interleaved): 16-blocks 1.58x at 0.6, 1.31x at 0.8; 32-blocks 1.42x at 0.6, 1.05x
# at 0.8; 64-blocks 1.46-1.76x fwd / bwd at 0.6, 1.29x fwd+bwd at 0.8; 128-blocks 1.25x at 0.6, 1.06x at 0.8.
NATIVE_DENSE_THRESHOLD = {16: 0.75, 32: 0.6, 64: 0.75, 128: 0.6}
BACKENDS = ("triton", "native", "torch", "dense")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(
    backend: Optional[str], device: torch.device, layout: BlockSparseLayout, dtype: Optional[torch.dtype] = None
) -> str:
    """The backend a call will use: `backend` if given (checked), else the automatic choice.

    On CUDA the automatic choice is Triton, except where it cannot win or cannot run: a fully dense layout and
    dtypes the kernels lack (fp64) go to cuBLAS through "dense".
    """
    if backend is None or backend == "auto":
        if device.type == "cuda":
            if (dtype is not None and dtype not in TRITON_DTYPES) or layout.density >= 1.0:
                return "dense"
            return "triton"
        native = device.type == "cpu" and dtype in (None, *cpu_native.NATIVE_DTYPES)
        if native and not cpu_native.available():
            cpu_native.warn_unavailable()
            native = False
        threshold = (NATIVE_DENSE_THRESHOLD if native else DENSE_THRESHOLD)[layout.block_size]
        if layout.density > threshold:
            return "dense"
        return "native" if native else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS} or None for automatic")
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got {device.type}; use None or 'triton'")
        if dtype is not None and dtype not in cpu_native.NATIVE_DTYPES:
            raise ValueError(f"backend='native' supports {cpu_native.NATIVE_DTYPES}, got {dtype}; use backend='torch'")
        if not cpu_native.available():
            raise ValueError(f"backend='native' is unavailable here: {cpu_native.unavailable_reason()}; "
                             "use backend='torch'")
    if backend == "triton" and device.type != "cuda":
        from .launchers import interpreting

        if not interpreting():
            raise ValueError(
                f"backend='triton' got {device.type} tensors; Triton needs CUDA tensors "
                "(or TRITON_INTERPRET=1 set before import, for tests); use backend='torch' on CPU"
            )
    return backend


def _check_dense(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} is {t.dtype} but the sparse weight is {dtype}; cast one to match")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the sparse weight is on {device}; move one to match")


def _check_triton_dtype(backend: str, dtype: torch.dtype) -> None:
    if backend == "triton" and dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' supports {TRITON_DTYPES}, got {dtype}; use backend='torch'")


def check_bias(bias: Optional[torch.Tensor], n: int, dtype: torch.dtype, device: torch.device) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if bias.dtype != dtype or bias.device != device:
        raise ValueError(
            f"bias is {bias.dtype} on {bias.device} but the weight is {dtype} on {device}; cast/move it to match"
        )


def dds(
    a: torch.Tensor,
    b: BlockSparseMatrix,
    transpose_b: bool = False,
    bias: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Dense = dense `a` [M, *] @ sparse `b` (b^T when transpose_b), plus `bias` over output columns.

    With b = W [N, K]: transpose_b=True is the forward Y = X W^T (a is [M, K], out [M, N]);
    transpose_b=False is dX = dY W (a is [M, N], out [M, K]).
    """
    if not isinstance(b, BlockSparseMatrix):
        raise ValueError(f"b must be a BlockSparseMatrix, got {type(b).__name__}")
    _check_dense("a", a, b.dtype, b.device)
    n, k = b.shape
    inner, n_out = (k, n) if transpose_b else (n, k)
    if a.shape[1] != inner:
        raise ValueError(
            f"a has {a.shape[1]} columns but the sparse operand{'^T' if transpose_b else ''} has {inner} rows "
            f"(weight shape {b.shape}); pass transpose_b={not transpose_b} or fix the input"
        )
    check_bias(bias, n_out, b.dtype, b.device)
    backend = resolve_backend(backend, a.device, b.layout, a.dtype)
    _check_triton_dtype(backend, a.dtype)
    values, bias = b.values.detach(), None if bias is None else bias.detach()
    if not torch.compiler.is_compiling():
        return custom_ops.run_dds(a, BlockSparseMatrix(values, b.layout), transpose_b, bias, backend)
    index = custom_ops.layout_tensors(b.layout)
    return custom_ops.dds(a, values, *index, bias, n, k, b.block_size, transpose_b, backend)


def dsd(
    a: BlockSparseMatrix, b: torch.Tensor, transpose_a: bool = False, backend: Optional[str] = None
) -> torch.Tensor:
    """Dense = sparse `a` (a^T when transpose_a) @ dense `b`. Computed as (b^T @ a^T)^T, a transposed view."""
    if not isinstance(a, BlockSparseMatrix):
        raise ValueError(f"a must be a BlockSparseMatrix, got {type(a).__name__}")
    if b.dim() != 2:
        raise ValueError(f"b must be 2-D, got shape {tuple(b.shape)}")
    return dds(b.t(), a, transpose_b=not transpose_a, backend=backend).t()


def sdd(
    a: torch.Tensor, b: torch.Tensor, layout: BlockSparseLayout, backend: Optional[str] = None
) -> BlockSparseMatrix:
    """Sparse = dense `a` [N, M] @ dense `b` [M, K], computed only on the live blocks of `layout` ([N, K]).

    dW of a linear layer is sdd(dY.t(), X, W.layout): strided views are fine, nothing is copied to transpose.
    """
    if not isinstance(layout, BlockSparseLayout):
        raise ValueError(f"layout must be a BlockSparseLayout, got {type(layout).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"a and b must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"a is {a.dtype} on {a.device}, b is {b.dtype} on {b.device}; make them match")
    if a.device != layout.device:
        raise ValueError(f"inputs are on {a.device} but the layout is on {layout.device}; use layout.to(device)")
    if (a.shape[0], b.shape[1]) != tuple(layout.shape) or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"a {tuple(a.shape)} @ b {tuple(b.shape)} does not give the layout's shape {layout.shape}"
        )
    backend = resolve_backend(backend, a.device, layout, a.dtype)
    _check_triton_dtype(backend, a.dtype)
    if not torch.compiler.is_compiling():
        return BlockSparseMatrix(custom_ops.run_sdd(a, b, layout, backend), layout)
    index = custom_ops.layout_tensors(layout)
    return BlockSparseMatrix(custom_ops.sdd(a, b, *index, *layout.shape, layout.block_size, backend), layout)
