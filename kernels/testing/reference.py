"""Pure-torch reference of the three products: dense masked matmuls in float32 (float64 stays float64).

Used only by tests, which hold the Triton kernels and the CPU path against these. Slow on purpose: it builds the
dense weight and never looks at the layout's index structure beyond `to_dense`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..layout import BlockSparseLayout, BlockSparseMatrix, gather_blocks


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def reference_dds(
    a: torch.Tensor, b: BlockSparseMatrix, transpose_b: bool = False, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """a @ b (or a @ b^T) [+ bias], b sparse, computed densely; result in a's dtype."""
    w = _wide(b.to_dense())
    out = _wide(a) @ (w.t() if transpose_b else w)
    if bias is not None:
        out = out + _wide(bias)
    return out.to(a.dtype)


def reference_sdd(a: torch.Tensor, b: torch.Tensor, layout: BlockSparseLayout) -> BlockSparseMatrix:
    """The live blocks of a @ b, computed densely then gathered."""
    full = _wide(a) @ _wide(b)
    return BlockSparseMatrix(gather_blocks(full, layout).to(a.dtype), layout)


def reference_linear(
    x: torch.Tensor, weight: BlockSparseMatrix, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """x [..., K] -> [..., N] with the dense masked weight; differentiable (autograd through to_dense)."""
    w = weight.to_dense()
    y = _wide(x) @ _wide(w).t()
    if bias is not None:
        y = y + _wide(bias)
    return y.to(x.dtype)
