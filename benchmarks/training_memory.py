"""Peak memory of training one model, measured in a process of its own (bench_equal_quality.py starts one each).

    python benchmarks/training_memory.py --d_model 1024 --heads 16 --density 0.0625 --vocab 2048 --seq_len 128 \\
        --batch 16 --cycle 3 --window 2                 # prints one JSON line

Builds the model as bench_training.py's Variant does (its flags: --d_model, --layers, --heads, --vocab, --seq_len,
--batch, --block_size, --cycle, --window), sparsified at --density with --method unless dense, and trains one full
cycle: the steps without the dense gradient, the --window steps that collect it, the topology update that ends it.
What the window and the update hold does not grow with the cycle's length, so a cycle of window + 1 steps reaches
the peak of a long one. Reported:

- ``state_bytes``: weights and buffers + one gradient per trainable parameter (what backward holds until
  zero_grad) + AdamW's state, counted from the tensors after the cycle. Not in it: activations, autocast's bf16
  copies, the window's dense-gradient sums.
- ``peak_rss_bytes``: the process's peak resident memory (getrusage ru_maxrss), everything included: torch,
  transformers, the allocator's slack, activations, the window and the update.
- ``peak_above_start_bytes``: that peak less the resident memory just before the model was built (imports and the
  batch), i.e. what building and training the model added at its peak. Linux only (None elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from bench_training import AUTOCAST_DTYPES, Variant, parse_args, training_batch
from transformers.utils import logging as hf_logging

from sparse_nlp.kernels import request_huge_pages

SCRIPT = Path(__file__).resolve()


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux /proc/self/status VmRSS), or None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def peak_resident_bytes() -> int:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of weights and buffers, of one gradient per trainable parameter, and of the optimizer's state."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    params = list(model.parameters())  # a tied tensor once
    weights = size(params) + size(model.buffers())
    gradients = size(p for p in params if p.requires_grad)
    optimizer_state = size(value for state in optimizer.state.values() for value in state.values()
                           if torch.is_tensor(value) and value.dim() > 0)
    return {"weights_bytes": weights, "gradients_bytes": gradients, "optimizer_bytes": optimizer_state,
            "state_bytes": weights + gradients + optimizer_state}


def measure(argv=None) -> dict:
    """Build and train one model for one cycle in this process; its memory as described above."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--density", type=float, default=None, help="block-sparse at this density (default: dense)")
    parser.add_argument("--method", default="momentum", help="how the blocks move (static: they do not)")
    parser.add_argument("--precision", choices=sorted(AUTOCAST_DTYPES), default="bf16")
    own, rest = parser.parse_known_args(argv)
    args = parse_args(rest + ["--device", "cpu"])  # bench_training's flags and defaults for the rest
    torch.set_num_threads(os.cpu_count())
    device = torch.device("cpu")
    batch = training_batch(args, device)
    start = resident_bytes()
    variant = Variant(args, (args.d_model, args.layers, args.heads), device, own.precision, own.density, own.method)
    variant.train_cycle(batch, args.cycle)
    peak = peak_resident_bytes()
    return {"density": own.density, "method": None if own.density is None else own.method,
            "precision": own.precision, "steps": args.cycle, "window": args.window, "updates": variant.updates,
            **state_bytes(variant.model, variant.optimizer), "peak_rss_bytes": peak,
            "peak_above_start_bytes": None if start is None else peak - start}


def measure_in_subprocess(argv: list[str]) -> dict:
    """measure(argv) in a fresh Python process (its peak memory is this model's alone)."""
    done = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{SCRIPT.name} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    request_huge_pages()  # as bench_training.py's timed runs: before torch allocates
    hf_logging.set_verbosity_error()
    result = measure(argv)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
