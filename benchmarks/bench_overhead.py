"""Host cost of one block-sparse linear call at tiny M, every backend against F.linear on the same shapes.

    python benchmarks/bench_overhead.py                      # CPU: native, torch, dense vs F.linear, ~10 s
    python benchmarks/bench_overhead.py --device cuda        # GPU: triton, dense vs F.linear (bf16), < 60 s
    python benchmarks/bench_overhead.py --rows 1 --json out.json

At M = 16 rows the arithmetic is small, so what a call costs is mostly the host's work: checks, dispatch, autograd,
allocations, launches. Issue 18's targets: the CPU native path's forward + backward within 2x of F.linear's host
time, and on CUDA <= 250 us of host time per call eager (fwd + bwd; 604 us before, ../shared/gpu/BASELINE.md).

How it is timed (a sample = `calls` back-to-back calls of one case; median over samples):
- CPU: the kernels run on the calling thread (or wait for the pool), so wall time per call is the host time.
- CUDA: host time is what the CPU spends issuing the calls: synchronise, start the clock, issue `calls` calls with
  no synchronisation, read the clock; then synchronise again and report that wall time per call as well. At tiny M
  the GPU drains its queue faster than the host fills it, so the issue loop never waits on the device.
- Cases are interleaved (F.linear, native, torch, dense, F.linear, ...; the order rotates each round), so background
  load hits all of them alike; `calls` is calibrated per case so that a sample lasts about --sample_ms.
- forward: under torch.no_grad (inference / decode). forward + backward: y = f(x) then torch.autograd.grad(y,
  (x, W, bias), dY), so no .grad accumulation is timed; x requires grad, as inside a model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sparse_nlp.kernels import (
    BlockSparseLayout,
    BlockSparseMatrix,
    block_sparse_linear,
    native_available,
    resolve_backend,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINE = "F.linear"
PHASES = ("fwd", "fwd_bwd")
CPU_TARGET_RATIO = 2.0  # native fwd+bwd host time / F.linear's, at most
CUDA_TARGET_US = 250.0  # triton fwd+bwd host us per call eager, at most


def default_backends(device: torch.device) -> list[str]:
    """The backends that run on `device` for real (Triton on CPU only interprets: not a host cost worth timing)."""
    if device.type == "cuda":
        return ["triton", "dense"]
    return (["native"] if native_available() else []) + ["torch", "dense"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _cpu_ticks() -> Optional[tuple[int, int, int]]:
    """(all CPUs' busy ticks, all ticks, this process's ticks) from /proc (Linux), else None."""
    try:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = cpu[3] + cpu[4]  # idle + iowait
    return sum(cpu) - idle, sum(cpu), int(own[11]) + int(own[12])  # utime + stime, all threads


def others_cpu_share(before, after) -> Optional[float]:
    """Share of the machine's CPU time that other processes used between two _cpu_ticks() readings."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy, total, own = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / total)


def _commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_cases(args, device: torch.device, dtype: torch.dtype, backends: list[str]) -> dict[str, dict[str, Callable]]:
    """{name: {"fwd": fn, "fwd_bwd": fn}} for F.linear and each backend, all on one x, one weight, one bias."""
    gen = torch.Generator().manual_seed(0)
    k, n = args.in_features, args.out_features
    x = torch.randn(args.rows, k, generator=gen).to(device, dtype).requires_grad_()  # [M, K]
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype)  # [N, K], nn.Linear layout
    bias = torch.zeros(n, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.rows, n, generator=gen).to(device, dtype)  # dY [M, N]
    layout = BlockSparseLayout.random((n, k), args.block, args.density, generator=gen, device=device)
    values = BlockSparseMatrix.from_dense(w, layout).values.requires_grad_()  # [nnz, b, b]
    w_dense = BlockSparseMatrix(values.detach(), layout).to_dense().requires_grad_()  # same weights, masked

    def pair(forward: Callable[[], torch.Tensor], params: tuple) -> dict[str, Callable]:
        def fwd():
            with torch.no_grad():
                forward()

        def fwd_bwd():
            torch.autograd.grad(forward(), params, grad_y)

        return {"fwd": fwd, "fwd_bwd": fwd_bwd}

    cases = {BASELINE: pair(lambda: F.linear(x, w_dense, bias), (x, w_dense, bias))}
    for backend in backends:
        resolve_backend(backend, device, layout, dtype)  # a backend that cannot run here fails now, with its reason
        cases[backend] = pair(
            lambda backend=backend: block_sparse_linear(x, BlockSparseMatrix(values, layout), bias, backend=backend),
            (x, values, bias),
        )
    return cases


def _sample(fn: Callable, calls: int, device: torch.device) -> tuple[float, float]:
    """(host, wall) seconds per call over `calls` calls; on CPU the two are one measurement."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = (time.perf_counter() - t0) / calls
        return t, t
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()  # every call issued, none waited for
    torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    return (t1 - t0) / calls, (t2 - t0) / calls


def _calibrate(fn: Callable, device: torch.device, sample_s: float, max_calls: int) -> int:
    """Calls per sample so that one lasts about sample_s (warm-up included: the first calls build kernels)."""
    for _ in range(3):
        fn()
    probe = 5
    _, wall = _sample(fn, probe, device)
    return max(1, min(max_calls, math.ceil(sample_s / max(wall, 1e-9))))


def measure(cases: dict[str, dict[str, Callable]], device: torch.device, samples: int, sample_s: float,
            max_calls: int) -> dict[tuple[str, str], dict]:
    """Interleaved samples of every (case, phase): {(name, phase): {"host": [...], "wall": [...], "calls": n}}."""
    keys = [(name, phase) for phase in PHASES for name in cases]
    calls = {key: _calibrate(cases[key[0]][key[1]], device, sample_s, max_calls) for key in keys}
    out = {key: {"host": [], "wall": [], "calls": calls[key]} for key in keys}
    for r in range(samples):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:  # rotate the order so no case always follows the same one
            host, wall = _sample(cases[key[0]][key[1]], calls[key], device)
            out[key]["host"].append(host)
            out[key]["wall"].append(wall)
    return out


def summarise(raw: dict[tuple[str, str], dict], names: list[str]) -> list[dict]:
    """One record per case: median host/wall us per call for each phase, and the ratio to F.linear's host time."""
    records = []
    for name in names:
        record = {"backend": name}
        for phase in PHASES:
            r = raw[(name, phase)]
            record[f"{phase}_host_us"] = statistics.median(r["host"]) * 1e6
            record[f"{phase}_wall_us"] = statistics.median(r["wall"]) * 1e6
            record[f"{phase}_host_us_samples"] = [round(t * 1e6, 2) for t in r["host"]]
            record[f"{phase}_calls"] = r["calls"]
        records.append(record)
    base = records[0]
    for record in records:
        for phase in PHASES:
            record[f"{phase}_ratio"] = record[f"{phase}_host_us"] / base[f"{phase}_host_us"]
    return records


def table(records: list[dict], cuda: bool) -> list[str]:
    head = f"{'backend':<9} | {'fwd us':>9} {'x lin':>6} | {'f+b us':>9} {'x lin':>6}"
    if cuda:
        head += f" | {'fwd wall':>9} {'f+b wall':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        line = (f"{r['backend']:<9} | {r['fwd_host_us']:>9.1f} {r['fwd_ratio']:>6.2f} | "
                f"{r['fwd_bwd_host_us']:>9.1f} {r['fwd_bwd_ratio']:>6.2f}")
        if cuda:
            line += f" | {r['fwd_wall_us']:>9.1f} {r['fwd_bwd_wall_us']:>9.1f}"
        lines.append(line)
    return lines


def target_lines(records: list[dict], device: torch.device) -> list[str]:
    by_name = {r["backend"]: r for r in records}
    lines = []
    if device.type == "cpu" and "native" in by_name:
        ratio = by_name["native"]["fwd_bwd_ratio"]
        verdict = "MET" if ratio <= CPU_TARGET_RATIO else "MISSED"
        lines.append(f"CPU native fwd+bwd within {CPU_TARGET_RATIO:g}x of F.linear's host time: "
                     f"{verdict} ({ratio:.2f}x)")
    if device.type == "cuda" and "triton" in by_name:
        us = by_name["triton"]["fwd_bwd_host_us"]
        verdict = "MET" if us <= CUDA_TARGET_US else "MISSED"
        lines.append(f"CUDA triton fwd+bwd <= {CUDA_TARGET_US:g} us per call eager: {verdict} ({us:.1f} us host)")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--rows", type=int, default=16, help="M: rows of x (tokens in the call); tiny, so host-bound")
    ap.add_argument("--in_features", type=int, default=768)
    ap.add_argument("--out_features", type=int, default=3072)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--backends", nargs="*", default=None, help="default: every backend that runs on the device")
    ap.add_argument("--samples", type=int, default=15, help="interleaved rounds; the median is reported")
    ap.add_argument("--sample_ms", type=float, default=40.0, help="length of one sample (sets calls per sample)")
    ap.add_argument("--max_calls", type=int, default=5000, help="cap on calls per sample")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results here")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    backends = args.backends if args.backends is not None else default_backends(device)
    cases = make_cases(args, device, dtype, backends)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device={device} ({device_name(device)}) dtype={dtype} M={args.rows} "
          f"{args.in_features}->{args.out_features} block={args.block} density={args.density} "
          f"threads={torch.get_num_threads()} samples={args.samples} torch={torch.__version__}"
          + (f" load={load[0]:.2f}" if load else ""))
    ticks = _cpu_ticks()
    raw = measure(cases, device, args.samples, args.sample_ms / 1e3, args.max_calls)
    others = others_cpu_share(ticks, _cpu_ticks())
    records = summarise(raw, list(cases))
    lines = table(records, device.type == "cuda") + target_lines(records, device)
    if others is not None:
        lines.append(f"other processes used {others:.0%} of the CPUs while this ran (load: a few % is quiet)")
    print("\n".join(lines), flush=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "rows": args.rows, "in_features": args.in_features, "out_features": args.out_features,
        "block": args.block, "density": args.density,
        "threads": torch.get_num_threads(),
        "samples": args.samples,
        "load_before": list(load) if load else None,
        "load_after": list(os.getloadavg()) if load else None,
        "others_cpu_share": others,
        "timing": "CUDA: host = issue time without sync, wall = synchronised" if device.type == "cuda"
        else "CPU: wall time per call (= host time)",
        "records": records,
        "targets": target_lines(records, device),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
