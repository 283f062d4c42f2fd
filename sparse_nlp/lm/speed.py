"""The speed side of the recipe's table: block-sparse kernels against dense on the trained model's own layer shapes.

The default sparse run masks weights of a dense layer (fine-grained sparsity saves no compute), so its tokens/s
cannot show what sparsity buys; this measures it in a few seconds, interleaved and with medians, on the shapes the
model has: forward + backward of every sparse-able linear layer, dense vs block-sparse at the same density.

On a GPU it times what training runs there: the run's autocast dtype (bf16/fp16) at no fewer than 8,192 rows, since
below that a layer's time is launches and host work, not the kernels (docs/kernels.md); triton's do_bench, which
synchronises, does the timing. On CPU: fp32 (the native kernels' dtype) at the run's rows per step.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix, block_sparse_linear, resolve_backend
from sparse_nlp.layers.base import out_in_shape
from sparse_nlp.model import find_target_layers


@dataclass(frozen=True)
class KernelSpeed:
    speedup: float  # dense time / block-sparse time, summed over the model's layers (fwd + bwd)
    density: float
    block_size: int
    tokens: int  # rows of each layer input (batch x sequence)
    dtype: torch.dtype
    backend: str = ""  # the kernels' path, e.g. "native" (compiled CPU kernels) or "triton"

    def describe(self) -> str:
        path = f"{self.backend} path, " if self.backend else ""
        return (f"Block-sparse kernels on this model's linear layers (block {self.block_size}, density {self.density:g}, "
                f"{self.tokens:,} tokens, {str(self.dtype).removeprefix('torch.')}, {path}forward + backward, measured now): "
                f"{self.speedup:.2f}x dense. Train with them: --block_size {self.block_size}.")


GPU_MIN_TOKENS = 8192  # rows below which a GPU times host work and launches rather than the kernels


def kernel_speed_settings(
    device: Union[str, torch.device], tokens: int, bf16: bool = False, fp16: bool = False
) -> tuple[int, torch.dtype]:
    """(rows, dtype) the kernel line times for a run on `device` with `tokens` rows a step: on CUDA the training
    dtype at >= GPU_MIN_TOKENS rows, on CPU fp32 (the native kernels' dtype) at the run's own rows."""
    if torch.device(device).type != "cuda":
        return tokens, torch.float32
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    return max(tokens, GPU_MIN_TOKENS), dtype


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: do_bench synchronises and times on the device
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, return_mode="median") / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fns, repeats: int, device: torch.device = torch.device("cpu")) -> list[float]:
    for fn in fns:  # warm-up
        fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):  # interleaved, so load on the machine hits both alike
        for s, fn in zip(samples, fns):
            s.append(_seconds(fn, device))
    return [statistics.median(s) for s in samples]


def measure_kernel_speedup(
    model: nn.Module, tokens: int, density: float = 0.2, block_size: int = 64, repeats: int = 5,
    dtype: torch.dtype = torch.float32,
) -> Optional[KernelSpeed]:
    """Block-sparse vs dense fwd+bwd time over `model`'s target linear layers; None if no layer fits the block."""
    shapes = Counter(out_in_shape(m)[::-1] for _, m in find_target_layers(model))
    shapes = Counter({s: n for s, n in shapes.items() if s[0] % block_size == 0 and s[1] % block_size == 0})
    if not shapes:
        return None
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    dense_total = sparse_total = 0.0
    backends = set()
    for (k, n), count in shapes.items():
        x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype).requires_grad_()
        bias = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, n, device=device, dtype=dtype)
        layout = BlockSparseLayout.random((n, k), block_size, density, generator=generator, device=device)
        values = BlockSparseMatrix.from_dense(weight.detach(), layout).values.requires_grad_()
        sparse = BlockSparseMatrix(values, layout)
        backends.add(resolve_backend(None, device, layout, dtype))

        def dense_step(x=x, weight=weight, bias=bias, grad=grad):  # this shape's tensors, bound now
            torch.autograd.grad(F.linear(x, weight, bias), (x, weight, bias), grad)

        def sparse_step(x=x, sparse=sparse, values=values, bias=bias, grad=grad):
            torch.autograd.grad(block_sparse_linear(x, sparse, bias), (x, values, bias), grad)

        dense_s, sparse_s = _median_seconds([dense_step, sparse_step], repeats, device)
        dense_total += count * dense_s
        sparse_total += count * sparse_s
    return KernelSpeed(dense_total / sparse_total, density, block_size, tokens, dtype, "/".join(sorted(backends)))
