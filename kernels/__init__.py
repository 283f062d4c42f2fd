"""Block-sparse linear kernels (imports as sparse_nlp.kernels).

    layout = BlockSparseLayout.from_block_mask(block_mask, block_size=64)   # [N//64, K//64] bool
    w = BlockSparseMatrix.from_dense(linear.weight.detach(), layout)         # values [num_blocks, 64, 64]
    y = block_sparse_linear(x, w, bias)                                      # x [..., K] -> [..., N]

Triton on CUDA, compiled C kernels (fp32) or a blocked pure-torch path on CPU; see docs/kernels.md. Triton is imported lazily.
"""
from .autograd import BlockSparseLinearFunction, block_sparse_linear
from .layout import BLOCK_SIZES, BlockSparseLayout, BlockSparseMatrix
from .ops import BACKENDS, DENSE_THRESHOLD, NATIVE_DENSE_THRESHOLD, dds, dsd, resolve_backend, sdd

__all__ = [
    "BLOCK_SIZES",
    "BACKENDS",
    "DENSE_THRESHOLD",
    "NATIVE_DENSE_THRESHOLD",
    "BlockSparseLayout",
    "BlockSparseMatrix",
    "BlockSparseLinearFunction",
    "block_sparse_linear",
    "dds",
    "dsd",
    "sdd",
    "resolve_backend",
]
