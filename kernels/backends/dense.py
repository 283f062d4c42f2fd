"""Backend "dense": masked dense. Build W densely and run one GEMM; wins at high density (ops.py's thresholds), and
is cuBLAS on CUDA where the Triton kernels cannot win or run (fp64, a fully dense layout)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..layout import BlockSparseLayout, gather_blocks, scatter_blocks


def dds(a: Tensor, values: Tensor, layout: BlockSparseLayout, transpose_b: bool,
        bias: Optional[Tensor] = None) -> Tensor:
    """a @ W (W^T when transpose_b) (+ bias) with W built densely."""
    w = scatter_blocks(values.detach(), layout)  # [N, K]
    w = w.t() if transpose_b else w
    return torch.mm(a, w) if bias is None else torch.addmm(bias, a, w)


def sdd(a: Tensor, b: Tensor, layout: BlockSparseLayout) -> Tensor:
    """The full product a @ b, then its live blocks [num_blocks, b, b]."""
    return gather_blocks(torch.mm(a, b), layout)


def linear_backward(
    grad_y: Tensor, x: Tensor, values: Tensor, layout: BlockSparseLayout, need_x: bool, need_w: bool
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """dX = dY @ W and dW = the live blocks of dY^T @ X."""
    grad_x = dds(grad_y, values, layout, False) if need_x else None
    return grad_x, sdd(grad_y.t(), x, layout) if need_w else None
