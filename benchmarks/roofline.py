"""The roofline floor of a linear layer's three products, dense or block-sparse, and the GPU figures it needs.

    machine = measure_machine(torch.device("cuda"), torch.bfloat16)     # HBM bytes/s and GEMM FLOP/s, measured now
    floor = floor_seconds("fwd", m=32768, k=768, n=3072, density=0.1, element_size=2, machine=machine)
    print(f"{floor / seconds:.0%} of the floor")

A layer y = x W^T with x [M, K], W [N, K] (block-sparse at `density`) has three products: the forward (Y = X W^T),
dX = dY W and dW = dY^T X (on live blocks only when sparse). The floor of one is the longer of two times, as if the
op ran at full HBM bandwidth and at the full GEMM rate at once:

    floor = max(bytes / bandwidth, useful FLOPs / peak)
    bytes = the dense operands read once and the dense output written once: X and Y (fwd), dY and dX (dX), dY and X (dW)
    useful FLOPs = 2 M N K density (2 M N K for cuBLAS)

The weight and its gradient (N K elements, times density when sparse) are left out of the bytes: on GPT-2 MLP shapes
a dense weight adds 2-2.5% to the activations' bytes at M = 32,768 (8-10% at M = 8,192), so a memory-bound floor
errs low by at most that. At densities 0.1-0.2 every op of ours is memory-bound (the activations set the floor),
which is why fwd+bwd cannot gain 1/density over cuBLAS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OPS = ("fwd", "dX", "dW")


@dataclass(frozen=True)
class Machine:
    bandwidth: float  # bytes/s: a large device-to-device copy, read + write bytes over its time
    peak: float  # FLOP/s: a large dense GEMM in the benchmark's dtype

    def describe(self) -> str:
        return f"HBM {self.bandwidth / 1e12:.2f} TB/s, GEMM {self.peak / 1e12:.0f} TFLOP/s"


def op_bytes(op: str, m: int, k: int, n: int, element_size: int) -> int:
    """Bytes of the dense [M, *] operands read once and the dense [M, *] output written once (weights left out)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; use one of {OPS}")
    return m * (k + n) * element_size  # each op touches one [M, K] and one [M, N] tensor: X, Y / dY, dX / dY, X


def op_flops(op: str, m: int, k: int, n: int, density: float = 1.0) -> float:
    """Useful multiply-adds x 2: only live blocks count for a block-sparse weight."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; use one of {OPS}")
    return 2.0 * m * n * k * density


def floor_seconds(op: str, m: int, k: int, n: int, density: float, element_size: int, machine: Machine) -> float:
    """The time no kernel can beat on `machine`: max(bytes / bandwidth, useful FLOPs / peak)."""
    return max(op_bytes(op, m, k, n, element_size) / machine.bandwidth,
               op_flops(op, m, k, n, density) / machine.peak)


def percent_of_floor(seconds: float, floor: float) -> float:
    """How close a measured time is to its floor: 100 means at the roofline."""
    return 100.0 * floor / seconds


def _gpu_median_seconds(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """HBM bytes/s of one device-to-device copy of `nbytes` (1 GiB: far beyond L2), counting its read and its write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = _gpu_median_seconds(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def measure_peak(device: torch.device, dtype: torch.dtype, size: int = 8192) -> float:
    """FLOP/s of one cuBLAS GEMM [size, size] @ [size, size] in `dtype` (8192: 1.1 TFLOP, large enough to saturate)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = _gpu_median_seconds(lambda: a @ b)
    return 2.0 * size**3 / seconds


def measure_machine(device: torch.device, dtype: torch.dtype) -> Machine:
    """Bandwidth and GEMM peak of this GPU, measured now (about a second); the floor's two rates."""
    if device.type != "cuda":
        raise ValueError(f"the roofline is measured on a CUDA device, got {device.type}")
    machine = Machine(measure_bandwidth(device), measure_peak(device, dtype))
    torch.cuda.empty_cache()  # the 2 GiB of copy buffers and the GEMM operands
    return machine
