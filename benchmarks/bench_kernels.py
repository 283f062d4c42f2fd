"""Block-sparse linear vs dense nn.functional.linear: forward, backward, forward+backward, one table.

    python benchmarks/bench_kernels.py --quick          # CPU: 5 GPT-2 shapes, 64-blocks, densities 0.2/0.1: ~2-3 min on 2 cores
    python benchmarks/bench_kernels.py                  # full grid: densities 0.5/0.2/0.1/0.05 x blocks 32/64/128
    python benchmarks/bench_kernels.py --dtype bf16     # on GPU; adds torch's bsr_dense_mm (forward) as yardstick

Dense and ours are timed interleaved (dense, ours, dense, ours, ...) and the median is reported, so background
load hits both alike. CPU: time.perf_counter with torch using every core; GPU: triton.testing.do_bench.
Ratio = dense time / our time (higher is better). Does not import datasets/evaluate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

# No THP_MEM_ALLOC_ENABLE here: importing sparse_nlp asks torch for huge pages (kernels/huge_pages.py), so this
# script times what a plain user script gets.

import torch
import torch.nn.functional as F

from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix, block_sparse_linear, resolve_backend
from sparse_nlp.kernels.huge_pages import huge_page_status
from sparse_nlp.kernels.native_build import load_native, native_unavailable_reason

# The targets this benchmark checks (forward+backward vs dense, block 64): (device, dtype, shapes, density, ratio).
TARGETS = [
    ("cpu", torch.float32, [(768, 3072), (3072, 768)], 0.2, 3.0),
    ("cpu", torch.float32, [(768, 3072), (3072, 768)], 0.1, 5.0),
    ("cpu", torch.float32, [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (768, 768)], 0.5, 1.0),
    ("cuda", torch.bfloat16, [(1024, 4096), (4096, 1024)], 0.2, 4.0),
]
SHAPES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024), (768, 768)]  # (in, out) of GPT-2 small/medium
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _timer(device: torch.device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=5, rep=50, return_mode="median") / 1e3

    def cpu_time(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return cpu_time


def _interleaved(timer, fns: list, repeats: int) -> list[float]:
    """Median seconds of each fn, measured round-robin after one warm-up call each."""
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for s, fn in zip(samples, fns):
            s.append(timer(fn))
    return [statistics.median(s) for s in samples]


def _cases(x, w_dense, bias, w_sparse, backend):
    """(fwd, bwd, fwd+bwd) closures for dense and ours. bwd replays one saved graph (autograd.grad with
    retain_graph), so no .grad accumulation is timed."""
    grad = torch.randn(x.shape[0], w_dense.shape[0], dtype=x.dtype, device=x.device)

    def make(forward, params):
        def fwd():
            with torch.no_grad():
                forward()

        def fwd_bwd():
            torch.autograd.grad(forward(), params, grad)

        y = forward()

        def bwd():
            torch.autograd.grad(y, params, grad, retain_graph=True)

        return fwd, bwd, fwd_bwd

    dense = make(lambda: F.linear(x, w_dense, bias), (x, w_dense, bias))
    ours = make(lambda: block_sparse_linear(x, w_sparse, bias, backend=backend), (x, w_sparse.values, bias))
    return dense, ours


def _bsr_fwd(x, w_sparse):
    """torch's Triton BSR kernel (GPU only) on the same weight: Y^T = W_bsr @ X^T."""
    from torch.sparse._triton_ops import bsr_dense_mm

    b = w_sparse.block_size
    w_bsr = w_sparse.to_dense().detach().to_sparse_bsr((b, b))
    xt = x.t().contiguous()
    return lambda: bsr_dense_mm(w_bsr, xt)


def target_lines(records: list[dict], device: torch.device, dtype: torch.dtype) -> list[str]:
    """One line per target this run measured: the worst forward+backward ratio over its shapes, met or missed."""
    lines = []
    for target_device, target_dtype, shapes, density, ratio in TARGETS:
        if (device.type, dtype) != (target_device, target_dtype):
            continue
        rows = [r for r in records if (r["in"], r["out"]) in shapes and r["block"] == 64
                and abs(r["density"] - density) < 0.01]
        if len(rows) < len(shapes):
            continue  # not all of its shapes measured in this run
        worst = min(r["fwd_bwd_ratio"] for r in rows)
        verdict = "met" if worst >= ratio else "MISSED"
        lines.append(f"target: density {density}, block 64, fwd+bwd >= {ratio:g}x dense on "
                     f"{', '.join(f'{k}->{n}' for k, n in shapes)}: worst {worst:.2f}x, {verdict}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="block 64 only, densities 0.2/0.1 (the targets), 3 repeats")
    ap.add_argument("--tokens", type=int, default=8192, help="M: rows of x (batch x sequence)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="force a backend (triton/native/torch/dense); default automatic")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--densities", type=float, nargs="*", default=None)
    ap.add_argument("--blocks", type=int, nargs="*", default=None)
    ap.add_argument("--shapes", type=str, nargs="*", default=None, help="e.g. 768x3072 (in x out)")
    ap.add_argument("--output", default=None, help="also write the rows here as JSON")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.set_num_threads(os.cpu_count())
    densities = args.densities or ([0.2, 0.1] if args.quick else [0.5, 0.2, 0.1, 0.05])
    blocks = args.blocks or ([64] if args.quick else [32, 64, 128])
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    repeats = args.repeats or (3 if args.quick and device.type == "cpu" else 7)
    timer = _timer(device)
    gen = torch.Generator().manual_seed(0)
    print(f"device={device} dtype={dtype} M={args.tokens} threads={torch.get_num_threads()} repeats={repeats}")
    if device.type == "cpu":
        lib = load_native()
        print(f"native CPU kernels: {lib.sparse_nlp_vector_width()}-wide fp32 vectors" if lib is not None
              else f"native CPU kernels unavailable ({native_unavailable_reason()}): torch path")
    head = f"{'in->out':>11} {'b':>3} {'dens':>5} | " + " | ".join(
        f"{p + ' dense':>10} {'ours':>7} {'x':>5}" for p in ("fwd", "bwd", "f+b")
    )
    if device.type == "cuda":
        head += f" | {'bsr fwd':>8} {'x':>5}"
    head += "  backend"
    print(head)
    records = []
    for k, n in shapes:
        x = torch.randn(args.tokens, k, device=device, generator=None).to(dtype).requires_grad_()
        w_dense = (torch.randn(n, k, device=device) / k**0.5).to(dtype).requires_grad_()
        bias = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
        for b in blocks:
            for d in densities:
                layout = BlockSparseLayout.random((n, k), b, d, generator=gen, device=device)
                values = BlockSparseMatrix.from_dense(w_dense.detach(), layout).values.requires_grad_()
                w_sparse = BlockSparseMatrix(values, layout)
                dense, ours = _cases(x, w_dense, bias, w_sparse, args.backend)
                row = f"{k:>5}->{n:<5} {b:>3} {layout.density:>5.2f} | "
                cols = []
                record = {"in": k, "out": n, "block": b, "density": layout.density,
                          "backend": resolve_backend(args.backend, device, layout, dtype)}
                for phase, dense_fn, ours_fn in zip(("fwd", "bwd", "fwd_bwd"), dense, ours):
                    td, to = _interleaved(timer, [dense_fn, ours_fn], repeats)
                    cols.append(f"{td * 1e3:>8.1f}ms {to * 1e3:>6.1f} {td / to:>5.2f}")
                    record.update({f"{phase}_dense_s": td, f"{phase}_ours_s": to, f"{phase}_ratio": td / to})
                records.append(record)
                row += " | ".join(cols)
                if device.type == "cuda":
                    td, tb = _interleaved(timer, [dense[0], _bsr_fwd(x.detach(), w_sparse)], repeats)
                    row += f" | {tb * 1e3:>6.2f}ms {td / tb:>5.2f}"
                    record["bsr_fwd_ratio"] = td / tb
                print(f"{row}  {record['backend']}", flush=True)
    for line in target_lines(records, device, dtype):
        print(line)
    if args.output:
        meta = {"device": str(device), "dtype": str(dtype), "tokens": args.tokens, "threads": torch.get_num_threads(),
                "repeats": repeats, "huge_pages": huge_page_status(), "torch": torch.__version__}
        with open(args.output, "w") as f:
            json.dump({**meta, "rows": records}, f, indent=1)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
