"""The public block-sparse ops: checks, the backend choice, and one call each.

The three products, in stk naming (layout of output, left, right operand), not differentiable:

    dds(a, w, transpose_b)  dense  = dense a @ sparse w (or w^T)      Y = dds(X, W, True), dX = dds(dY, W)
    dsd(w, b, transpose_a)  dense  = sparse w (or w^T) @ dense b      Y^T = dsd(W, X^T)
    sdd(a, b, layout)       sparse = dense a @ dense b, live blocks   dW = sdd(dY^T, X, W.layout)

and the differentiable linear layer, y = x W^T + bias:

    block_sparse_linear(x, w, bias, backend)   checked; backend None picks one
    linear(x, values, bias, layout, backend)   unchecked: the one call behind a layer's forward, whose checks and
                                               backend choice happen once per topology, not per call

Each runs on one backend (backends.BACKENDS, a module each):

    "triton"  Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1, as the tests do)
    "native"  compiled C kernels (backends/native/): CPU, fp32; built at first use
    "torch"   the blocked pure-torch path (backends/torch_blocked.py): gathered GEMMs over block-rows, any device
    "dense"   masked dense: build W densely, one GEMM (faster than "torch" at high density)
    None      automatic: CUDA -> "triton" ("dense" for fp64 or a fully dense layout); CPU -> "native" for fp32
              where it builds, else "torch"; "dense" above NATIVE_DENSE_THRESHOLD / DENSE_THRESHOLD[block]

Past the checks, eager calls run the backend's function directly (linear through library.EagerLinear), and
torch.compile traces the torch.library operators of library.py instead, without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import library
from .backends import BACKENDS as _BACKEND_MODULES
from .backends.native import products as native
from .backends.triton.launchers import interpreting
from .layout import BlockSparseLayout, BlockSparseMatrix

# CPU, per block size: above this density the masked-dense GEMM beats the blocked path, so "auto" switches to
# "dense". Measured fwd+bwd break-even on the 2-core dev box, 768->3072, M=8192 (docs/kernels.md).
# The torch path: 16-blocks ~0.2 (1.0x at 0.2), 32-blocks ~0.4 (1.05x at 0.4), 64-blocks ~0.6 (1.06x at 0.6, 0.88x
# at 0.75), 128-blocks 1.7x at 0.4 (same as 64 at 0.35, so 0.6 too).
DENSE_THRESHOLD = {16: 0.2, 32: 0.4, 64: 0.6, 128: 0.6}
# The native kernels (median of 3, interleaved): 16-blocks 1.58x at 0.6, 1.31x at 0.8; 32-blocks 1.42x at 0.6, 1.05x
# at 0.8; 64-blocks 1.46-1.76x fwd / bwd at 0.6, 1.29x fwd+bwd at 0.8; 128-blocks 1.25x at 0.6, 1.06x at 0.8.
NATIVE_DENSE_THRESHOLD = {16: 0.75, 32: 0.6, 64: 0.75, 128: 0.6}
BACKENDS = tuple(_BACKEND_MODULES)  # ("triton", "native", "torch", "dense")
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
        use_native = device.type == "cpu" and dtype in (None, *native.NATIVE_DTYPES)
        if use_native and not native.available():
            native.warn_unavailable()
            use_native = False
        threshold = (NATIVE_DENSE_THRESHOLD if use_native else DENSE_THRESHOLD)[layout.block_size]
        if layout.density > threshold:
            return "dense"
        return "native" if use_native else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS} or None for automatic")
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, got {device.type}; use None or 'triton'")
        if dtype is not None and dtype not in native.NATIVE_DTYPES:
            raise ValueError(f"backend='native' supports {native.NATIVE_DTYPES}, got {dtype}; use backend='torch'")
        if not native.available():
            raise ValueError(f"backend='native' is unavailable here: {native.unavailable_reason()}; "
                             "use backend='torch'")
    if backend == "triton" and device.type != "cuda":
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
    if torch.compiler.is_compiling():
        return library.dds(a, values, list(b.layout.index), bias, b.block_size, transpose_b, backend)
    return _BACKEND_MODULES[backend].dds(a, values, b.layout, transpose_b, bias)


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
    if torch.compiler.is_compiling():
        return BlockSparseMatrix(library.sdd(a, b, list(layout.index), layout.block_size, backend), layout)
    return BlockSparseMatrix(_BACKEND_MODULES[backend].sdd(a, b, layout), layout)


def linear(
    x: Tensor, values: Tensor, bias: Optional[Tensor], layout: BlockSparseLayout, backend: str, *,
    weights_revision: Optional[int] = None,
) -> Tensor:
    """x [..., K] -> [..., N] = x @ W^T + bias, W = `values` [num_blocks, b, b] over `layout` ([N, K]),
    differentiable w.r.t. x, values and bias. Unchecked: the caller has checked the operands and resolved `backend`
    (resolve_backend); block_sparse_linear is the checked call. One call for every setting:

    - under torch.compile: the `sparse_nlp::linear` operator over the layout's index tensors (library.py);
    - eager, gradients off, backend "native" (generation, evaluation): the C product directly, no autograd and no
      dispatch, which at a few rows cost more than the product;
    - eager otherwise: library.EagerLinear, the same products without the dispatcher, the layout object at hand.

    weights_revision: None (the default) packs the weights afresh on each native no-grad call. A number lets that
    path keep its packed copy on the layout between calls, while the values are the same tensor at the same
    version and the caller passes the same number. The caller promises to pass another number whenever the values
    may have changed without moving their version counter: fused optimizers (the Trainer's default AdamW) change
    parameters in place without moving it. BlockSparseLinear passes its weights_revision (see its forward).
    """
    n, k = layout.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # leading batch dims flattened: a view when x is contiguous
    if torch.compiler.is_compiling():
        y = library.linear(x2, values, bias, list(layout.index), layout.block_size, backend)
    elif backend == "native" and not torch.is_grad_enabled():
        y = native.dds(x2, values, layout, True, bias, weights_revision=weights_revision)
    else:
        y = library.EagerLinear.apply(x2, values, bias, layout, backend)  # [M, N]
    return y.view(*lead, n)


def release_kept_weights(layout: BlockSparseLayout) -> None:
    """Free what `linear` keeps of the weights on `layout` (the native pack, a copy of the live blocks), for a
    layer that will not reuse it soon (one going back to training)."""
    native.release_packed_weights(layout)


def block_sparse_linear(
    x: Tensor, weight: BlockSparseMatrix, bias: Optional[Tensor] = None, backend: Optional[str] = None
) -> Tensor:
    """x [..., K] -> [..., N] = x @ W^T + bias, W a BlockSparseMatrix of shape [N, K] (nn.Linear layout),
    differentiable w.r.t. x, weight.values and bias; computed in autocast's dtype under autocast.

    backend: None picks automatically (CUDA -> "triton", CPU -> "native" (fp32, where it builds) or "torch", or
    "dense" above the density thresholds); "triton" / "native" / "torch" / "dense" force one.
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
    check_bias(bias, n, values.dtype, values.device)
    backend = resolve_backend(backend, x.device, weight.layout, x.dtype)
    return linear(x, values, bias, weight.layout, backend)


def autocast_operands(
    x: Tensor, values: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
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


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    castable = t is not None and t.dtype != dtype and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return t.to(dtype) if castable else t
