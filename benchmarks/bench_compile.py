"""Compiled vs eager training step time, dense and block-sparse GPT-2, side by side.

    python benchmarks/bench_compile.py --device cuda                    # GPT-2 small, 16 x 1,024 tokens, bf16
    python benchmarks/bench_compile.py --device cuda --modes eager default reduce-overhead
    python benchmarks/bench_compile.py                                  # CPU smoke: a tiny GPT-2, seconds

A step is what a user pays per optimizer step: forward (with the loss), backward, AdamW, and the sparsity
controller's step; one topology update happens in the warm-up, so compiled variants are timed after it (the update
must not recompile them: the dynamo graph count is printed per variant). Variants run interleaved, ``--steps`` steps
each per round after ``--warmup`` steps, and the table reports the median step time over rounds and each variant's
ratio to eager dense. ``--json`` writes the table and the machine.

On CUDA the defaults are GPT-2 small (12 x 768, vocab 8,192), 16 x 1,024 tokens a step, bf16 autocast, block 64 at
density 0.1. On CPU: 2 x 32 width, 2 x 64 tokens, fp32, block 16 at density 0.25, the backend "aot_eager" unless
``--backend`` says otherwise (Inductor's C++ build takes minutes on small machines).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from sparse_nlp import SparsityConfig, SparsityController, sparsify
from sparse_nlp.compile_support import let_dynamo_resize_parameters

PRESETS = {  # (width, layers, heads, vocab, batch, tokens, block, density)
    "cuda": (768, 12, 12, 8192, 16, 1024, 64, 0.1),
    "cpu": (32, 2, 2, 256, 2, 64, 16, 0.25),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", nargs="+", default=["eager", "default"],
                        help="eager and/or torch.compile modes (default, reduce-overhead, max-autotune-no-cudagraphs)")
    parser.add_argument("--backend", default=None, help="torch.compile backend (CUDA: inductor; CPU: aot_eager)")
    parser.add_argument("--kinds", nargs="+", default=["dense", "block"], choices=["dense", "block"])
    parser.add_argument("--block_size", type=int, default=None)
    parser.add_argument("--density", type=float, default=None)
    parser.add_argument("--bf16", default=None, choices=["true", "false"], help="autocast bf16 (default: on CUDA)")
    parser.add_argument("--warmup", type=int, default=6, help="steps before timing; a topology update is among them")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


class Variant:
    """One model, its optimizer and controller, and a step function (eager or compiled)."""

    def __init__(self, args, kind: str, mode: str, preset):
        width, layers, heads, vocab, batch, tokens, block, density = preset
        torch.manual_seed(0)
        config = GPT2Config(n_embd=width, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=tokens,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config).to(args.device).train()
        self.name, self.kind, self.mode = f"{kind} {mode}", kind, mode
        self.controller = None
        self.optimizer = None
        if kind == "block":
            # One or two updates inside the warm-up, none while timing (update_end_fraction): the window ends a step
            # after the warm-up, so that the update at its last step prunes at a positive rate (at rate 0 it would
            # not be scheduled) and the warm-up collects dense gradients throughout.
            total = args.warmup + 1 + args.rounds * args.steps
            sparsify(self.model, config=SparsityConfig(
                density=args.density or density, block_size=args.block_size or block,
                update_interval=max(2, args.warmup // 2), update_end_fraction=(args.warmup + 1.5) / total))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        if kind == "block":
            self.controller = SparsityController(self.model, self.optimizer, total_steps=total)
        if mode != "eager" and kind == "block":
            let_dynamo_resize_parameters()  # what compile_model does: one graph through every topology update
        self.loss = _loss if mode == "eager" else torch.compile(_loss, mode=None if mode == "default" else mode,
                                                                backend=args.backend)
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (batch, tokens), generator=generator).to(args.device)
        self.autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.bf16)
        self.times: list[float] = []
        self.graphs = 0

    def step(self) -> float:
        with self.autocast:
            loss = self.loss(self.model, self.ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.controller is not None:
            self.controller.step()
        return loss.detach()


def _loss(model, ids):
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict:
    device_type = torch.device(args.device).type
    preset = PRESETS["cuda" if device_type == "cuda" else "cpu"]
    args.bf16 = device_type == "cuda" if args.bf16 is None else args.bf16 == "true"
    if args.backend is None:
        args.backend = "inductor" if device_type == "cuda" else "aot_eager"
    hf_logging.set_verbosity_error()
    variants = [Variant(args, kind, mode, preset) for kind in args.kinds for mode in args.modes]
    warmup_s = {}
    for v in variants:  # compile happens here, one variant at a time, so each graph count is its own
        torch._dynamo.reset()
        counters.clear()
        start = time.perf_counter()
        for _ in range(args.warmup):
            v.step()
        _sync(args.device)
        warmup_s[v.name] = time.perf_counter() - start
        v.graphs = counters["stats"]["unique_graphs"]
        v.loss_after_warmup = float(v.step())
    for _ in range(args.rounds):  # interleaved rounds: machine load drifts alike for every variant
        for v in variants:
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            _sync(args.device)
            v.times.append((time.perf_counter() - start) / args.steps)
    base = {kind: statistics.median(next(v for v in variants if v.kind == kind).times) for kind in args.kinds}
    rows = []
    for v in variants:
        median = statistics.median(v.times)
        rows.append({"variant": v.name, "step_ms": 1e3 * median, "vs_eager_same_kind": base[v.kind] / median,
                     "vs_first_variant": statistics.median(variants[0].times) / median,
                     "warmup_s": warmup_s[v.name], "graphs": v.graphs if v.mode != "eager" else None,
                     "loss": v.loss_after_warmup})
    width, layers, heads, vocab, batch, tokens, block, density = preset
    return {
        "machine": {"device": torch.cuda.get_device_name() if device_type == "cuda" else platform.processor()
                    or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": {"width": width, "layers": layers, "vocab": vocab, "batch": batch, "tokens": tokens,
                  "block": args.block_size or block, "density": args.density or density, "bf16": args.bf16,
                  "backend": args.backend},
        "rows": rows,
    }


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"{m['layers']} x {m['width']}, {m['batch']} x {m['tokens']} tokens, bf16={m['bf16']}, block {m['block']} "
          f"at density {m['density']}, backend {m['backend']}; {result['machine']}")
    print("| variant | step ms | vs eager (same model) | vs first row | warm-up s | dynamo graphs |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        graphs = "-" if r["graphs"] is None else r["graphs"]
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['vs_eager_same_kind']:.2f}x | {r['vs_first_variant']:.2f}x "
              f"| {r['warmup_s']:.1f} | {graphs} |")


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
