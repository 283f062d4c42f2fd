"""The block-sparse weight format: which blocks of W [N, K] are live (layout) and their values (matrix).

A weight in nn.Linear layout, W [N, K] = [out_features, in_features], is cut into b x b blocks; block (i, j)
covers rows i*b:(i+1)*b and columns j*b:(j+1)*b. Only live blocks are stored, in row-major order:

    values[p]              the b x b block at (row_indices[p], col_indices[p])
    row_offsets[i]         live blocks of block-row i are p in [row_offsets[i], row_offsets[i+1])
    transpose_perm[q]      the same blocks in column-major order: p = transpose_perm[q]
    col_offsets[j]         live blocks of block-column j are q in [col_offsets[j], col_offsets[j+1])

The column-major order is what dX = dY @ W walks (output block-column j of dX sums over block-column j of W),
so the backward reads the same `values` through `transpose_perm` and never builds a transposed copy of W.

The six index tensors travel together as one `LayoutIndex` (a NamedTuple): a layout holds one, a layer keeps one as
buffers, and the torch.library operators (library.py) take one as their layout argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

BLOCK_SIZES = (16, 32, 64, 128)  # tl.dot needs >= 16; 128 is the largest tile that fits one program's registers


def check_block_size(block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size} is not supported; use one of {BLOCK_SIZES}")


def check_divisible(shape: tuple[int, int], block_size: int) -> None:
    n, k = shape
    if n % block_size or k % block_size:
        raise ValueError(
            f"weight shape {tuple(shape)} is not divisible by block_size={block_size}; "
            f"pick a block size that divides both dims (one of {BLOCK_SIZES}) or pad the layer"
        )


class LayoutIndex(NamedTuple):
    """The index tensors of a layout, all int32: its live blocks in row-major order, then in column-major order."""

    row_indices: Tensor  # [nnz] block-row of each live block, row-major order
    col_indices: Tensor  # [nnz] block-column of each live block
    row_offsets: Tensor  # [N//b + 1] CSR offsets into the row-major order
    transpose_perm: Tensor  # [nnz] row-major positions listed in column-major order
    transpose_row_indices: Tensor  # [nnz] row_indices[transpose_perm] (what dX's kernel reads)
    col_offsets: Tensor  # [K//b + 1] CSC offsets into the column-major order


@dataclass(frozen=True, eq=False)
class BlockSparseLayout:
    """Immutable index metadata of a block-sparse [N, K] weight. Build with `from_block_mask`."""

    shape: tuple[int, int]  # (N, K) of the dense weight
    block_size: int
    index: LayoutIndex

    @classmethod
    def from_index(cls, index: Sequence[Tensor], block_size: int) -> "BlockSparseLayout":
        """The layout over these six index tensors (a LayoutIndex, or a list of them in its order, as the operators
        get them); its shape is read off the offsets' lengths, no index value is read."""
        index = LayoutIndex(*index)
        n = (index.row_offsets.shape[0] - 1) * block_size
        k = (index.col_offsets.shape[0] - 1) * block_size
        return cls((n, k), block_size, index)

    @classmethod
    def from_block_mask(cls, block_mask: torch.Tensor, block_size: int) -> "BlockSparseLayout":
        """Layout whose live blocks are the True entries of `block_mask` [N//b, K//b]."""
        check_block_size(block_size)
        if block_mask.dim() != 2:
            raise ValueError(f"block_mask must be 2-D [N//b, K//b], got shape {tuple(block_mask.shape)}")
        mask = block_mask.to(torch.bool)
        nb, kb = mask.shape
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order
        perm = torch.argsort(cols * nb + rows)  # column-major order, ties impossible
        row_offsets = torch.zeros(nb + 1, dtype=torch.long, device=mask.device)
        row_offsets[1:] = torch.cumsum(mask.sum(1), 0)
        col_offsets = torch.zeros(kb + 1, dtype=torch.long, device=mask.device)
        col_offsets[1:] = torch.cumsum(mask.sum(0), 0)
        index = LayoutIndex(rows, cols, row_offsets, perm, rows[perm], col_offsets)
        return cls((nb * block_size, kb * block_size), block_size,
                   LayoutIndex(*(t.to(torch.int32).contiguous() for t in index)))

    @classmethod
    def from_element_mask(cls, mask: torch.Tensor, block_size: int) -> "BlockSparseLayout":
        """Layout of an element mask [N, K]: a block is live when any of its entries is."""
        check_block_size(block_size)
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D [N, K], got shape {tuple(mask.shape)}")
        check_divisible(tuple(mask.shape), block_size)
        n, k = mask.shape
        b = block_size
        blocks = mask.to(torch.bool).reshape(n // b, b, k // b, b).any(dim=3).any(dim=1)
        return cls.from_block_mask(blocks, block_size)

    @classmethod
    def random(
        cls,
        shape: tuple[int, int],
        block_size: int,
        density: float,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
    ) -> "BlockSparseLayout":
        """Uniformly random layout with round(density * #blocks) live blocks (at least one)."""
        check_block_size(block_size)
        check_divisible(tuple(shape), block_size)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        nb, kb = shape[0] // block_size, shape[1] // block_size
        live = max(1, round(density * nb * kb))
        order = torch.randperm(nb * kb, generator=generator)[:live]
        mask = torch.zeros(nb * kb, dtype=torch.bool)
        mask[order] = True
        return cls.from_block_mask(mask.view(nb, kb), block_size).to(device or "cpu")

    @property
    def num_blocks(self) -> int:
        return self.index.row_indices.numel()

    @property
    def block_shape(self) -> tuple[int, int]:
        """(N//b, K//b): the grid of blocks."""
        return self.shape[0] // self.block_size, self.shape[1] // self.block_size

    @property
    def density(self) -> float:
        nb, kb = self.block_shape
        return self.num_blocks / max(1, nb * kb)

    @property
    def device(self) -> torch.device:
        return self.index.row_indices.device

    def to(self, device) -> "BlockSparseLayout":
        device = torch.device(device)
        if device == self.device:
            return self
        return BlockSparseLayout(self.shape, self.block_size, LayoutIndex(*(t.to(device) for t in self.index)))

    def block_mask(self) -> torch.Tensor:
        """The bool mask [N//b, K//b] this layout was built from."""
        mask = torch.zeros(self.block_shape, dtype=torch.bool, device=self.device)
        mask[self.index.row_indices.long(), self.index.col_indices.long()] = True
        return mask

    @cached_property
    def kernel_cache(self) -> dict:
        """What a backend derives from this layout (and its weights) once rather than per call: the torch path's
        host plan, the native kernels' packed weights. It lives and dies with the layout object, which a topology
        change replaces; an eager call passes the object itself, so the cache is found without any lookup."""
        return {}

    def __repr__(self) -> str:
        return (
            f"BlockSparseLayout(shape={self.shape}, block_size={self.block_size}, "
            f"num_blocks={self.num_blocks}, density={self.density:.3f}, device={self.device})"
        )


class BlockSparseMatrix:
    """A block-sparse W [N, K]: `values` [num_blocks, b, b] (may be an nn.Parameter) over a `layout`."""

    def __init__(self, values: torch.Tensor, layout: BlockSparseLayout):
        b = layout.block_size
        if values.dim() != 3 or tuple(values.shape) != (layout.num_blocks, b, b):
            raise ValueError(
                f"values must have shape [num_blocks, b, b] = {(layout.num_blocks, b, b)}, "
                f"got {tuple(values.shape)}; build them with BlockSparseMatrix.from_dense(weight, layout)"
            )
        if values.device != layout.device:
            raise ValueError(
                f"values are on {values.device} but the layout is on {layout.device}; move both with .to(device)"
            )
        self.values = values
        self.layout = layout

    @classmethod
    def from_dense(cls, dense: torch.Tensor, layout: BlockSparseLayout) -> "BlockSparseMatrix":
        """Gather the live blocks of a dense [N, K] weight (entries outside live blocks are dropped)."""
        if tuple(dense.shape) != tuple(layout.shape):
            raise ValueError(f"dense weight has shape {tuple(dense.shape)} but the layout is {layout.shape}")
        layout = layout.to(dense.device)
        return cls(gather_blocks(dense, layout), layout)

    def to_dense(self) -> torch.Tensor:
        """The dense [N, K] weight, zeros outside live blocks (differentiable w.r.t. values)."""
        return scatter_blocks(self.values, self.layout)

    def to(self, device) -> "BlockSparseMatrix":
        return BlockSparseMatrix(self.values.to(device), self.layout.to(device))

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return f"BlockSparseMatrix(dtype={self.dtype}, layout={self.layout})"


def gather_blocks(dense: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """[N, K] -> [num_blocks, b, b]: the live blocks of a dense matrix, row-major order."""
    b = layout.block_size
    nb, kb = layout.block_shape
    grid = dense.reshape(nb, b, kb, b).transpose(1, 2)  # [nb, kb, b, b]
    return grid[layout.index.row_indices.long(), layout.index.col_indices.long()].contiguous()


def scatter_blocks(values: torch.Tensor, layout: BlockSparseLayout) -> torch.Tensor:
    """[num_blocks, b, b] -> [N, K] with zeros outside live blocks."""
    b = layout.block_size
    nb, kb = layout.block_shape
    grid = values.new_zeros(nb, kb, b, b)
    grid = grid.index_put((layout.index.row_indices.long(), layout.index.col_indices.long()), values)
    return grid.transpose(1, 2).reshape(nb * b, kb * b)
