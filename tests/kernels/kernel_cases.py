"""Shared cases for the kernel tests (a plain module: tests/conftest.py is the suite's): small shapes (the Triton interpreter runs every program in numpy)."""
import torch

from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix

# (M, N, K, block): M never a multiple of the block, N != K.
SIZES = [(37, 64, 48, 16), (70, 96, 128, 32), (33, 128, 192, 64), (20, 256, 128, 128)]
LAYOUTS = ["random", "empty_row", "dense", "empty"]


def make_layout(kind: str, n: int, k: int, block: int, seed: int = 0) -> BlockSparseLayout:
    nb, kb = n // block, k // block
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":
        mask = torch.ones(nb, kb, dtype=torch.bool)
    elif kind == "empty":
        mask = torch.zeros(nb, kb, dtype=torch.bool)
    else:
        mask = torch.rand(nb, kb, generator=g) < 0.5
        mask[0, 0] = True  # never all empty
        if kind == "empty_row":
            mask[-1] = False  # a fully empty block-row of W (and so an output block of zeros)
            mask[:, -1] = False  # and an empty block-column (a block of dX that is all zeros)
            mask[0, 0] = True
    return BlockSparseLayout.from_block_mask(mask, block)


def make_case(m, n, k, block, kind="random", dtype=torch.float32, seed=0):
    """(x [M, K], dy [M, N], bias [N], weight) with unit-scale entries."""
    g = torch.Generator().manual_seed(seed)
    layout = make_layout(kind, n, k, block, seed)
    w = BlockSparseMatrix.from_dense((torch.randn(n, k, generator=g) / k**0.5).to(dtype), layout)
    x = torch.randn(m, k, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return x, dy, bias, w


TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float64: dict(rtol=1e-10, atol=1e-10),
}

SIZE_IDS = ["M{}_N{}_K{}_b{}".format(*s) for s in SIZES]
