"""What equal quality costs on this CPU: each wide block-sparse model beside the dense model of equal perplexity.

    python benchmarks/bench_equal_quality.py --dense_widths 384 448 \\
        --sparse "1024:0.0625@448" "512:0.25@384" "512:0.25:static@448"    # study shapes, bf16: ~8 min
    python benchmarks/bench_equal_quality.py --quick                        # a tiny smoke run: seconds

The models are the study's (docs/study.md, "Wider and sparser at equal linear weights"): GPT-2, 4 layers, vocab
2,048, heads of 64 (heads = width / 64), no dropout, 16 x 128 tokens a step, bf16 autocast, AdamW. A sparse model is
WIDTH:DENSITY[:METHOD][@DENSE_WIDTH]: block-64 layers at that width and density, trained with sparse momentum (or
METHOD: static keeps its blocks), whose "vs dense" ratios are taken against the dense model of width DENSE_WIDTH,
the one of equal quality (default: the first of --dense_widths). Speed and memory do not depend on trained values:
every model has random weights, and each sparse one sparsify's random block masks at its density.

- training tokens/s: as benchmarks/bench_training.py measures it, with its own functions: whole cycles of --cycle
  optimizer steps, the last --window of them collecting the dense gradient, a real topology update ending each
  (static: neither, as it trains), after one warm-up cycle each; the models interleaved, one cycle each per round;
  the median over --rounds. Default: a cycle of 20 steps with a window of 2, the library's share of window steps
  (SparsityConfig's momentum_window 10 in update_interval 100) with the update itself 5x more frequent than in
  training, so sparse errs low (5 rounds: 100 timed steps a model, about 8 minutes in all); --cycle 100
  --window 10 --rounds 1 is the library's own cycle, one sample a model (about 13 minutes).
- memory: each model in a process of its own (benchmarks/training_memory.py) trains one cycle of window + 1 steps;
  "state" is its weights and buffers + one gradient per trainable parameter + AdamW state, counted from the tensors;
  "peak RSS" is the process's peak resident memory (ru_maxrss) less its resident memory just before the model was
  built: activations, autocast copies, the window's dense-gradient sums and the allocator's slack included (huge
  pages requested, as in the timed runs).
- decode tokens/s at batch 1 and 8: as benchmarks/bench_generate.py measures it, with its own functions: greedy
  `generate` with the KV cache, a 32-token prompt and 64 new tokens, tokens after the first over their time, one
  warm-up call each, models interleaved, the median over --decode_rounds; each sparse model served through
  `sparse_nlp.serving.block_sparse_for_serving` (a plain checkpoint's zero blocks dropped) after a check that it
  decodes the same greedy tokens as its plain form; dense models plainly; fp32 as bench_generate on CPU. A static
  model serves as its sparse-momentum twin of the same shape does (same masks), so it is timed once.

Machine load (the CPU share other processes took) is measured over each part and printed: only a quiet machine's
ratios are worth keeping (docs/study.md).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import bench_generate
import bench_training
import torch
from equal_quality_models import ModelSpec, estimate_seconds, linear_nonzeros, parse_sparse, print_table, table_rows
from training_memory import measure_in_subprocess
from transformers.utils import logging as hf_logging

from sparse_nlp.kernels import huge_page_status, request_huge_pages
from sparse_nlp.lm.machine_load import OtherLoad
from sparse_nlp.lm.reporting import count_parameters, linear_density

# The study's shapes and budget shares; --quick: a model small enough to smoke-test the whole script in seconds.
STUDY = dict(dense_widths=[384, 448], sparse=["1024:0.0625", "512:0.25", "512:0.25:static"], layers=4,
             seq_len=128, batch=16, cycle=20, window=2, rounds=5, decode_rounds=5, prompt=32, new_tokens=64,
             batches=[1, 8])
QUICK = dict(dense_widths=[128], sparse=["256:0.25@128"], layers=1, seq_len=16, batch=2, cycle=2, window=1,
             rounds=1, decode_rounds=1, prompt=4, new_tokens=4, batches=[1, 2])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense_widths", type=int, nargs="+", default=None, help="dense models (default 384 448)")
    parser.add_argument("--sparse", nargs="+", default=None, metavar="WIDTH:DENSITY[:METHOD][@DENSE_WIDTH]",
                        help='sparse models (default "1024:0.0625" "512:0.25" "512:0.25:static")')
    parser.add_argument("--quick", action="store_true", help="a tiny smoke setting (explicit flags still win)")
    parser.add_argument("--layers", type=int, default=None, help="default 4")
    parser.add_argument("--head_size", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq_len", type=int, default=None, help="default 128")
    parser.add_argument("--batch", type=int, default=None, help="sequences a training step (default 16)")
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--precision", choices=sorted(bench_training.AUTOCAST_DTYPES), default="bf16",
                        help="training: bf16 autocast (the study's) or fp32")
    parser.add_argument("--cycle", type=int, default=None, help="steps per timed training cycle (default 20)")
    parser.add_argument("--window", type=int, default=None, help="dense-gradient steps per cycle (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="timed training cycles per model (default 5)")
    parser.add_argument("--decode_rounds", type=int, default=None, help="timed generate calls (default 5)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default 1 8)")
    parser.add_argument("--prompt", type=int, default=None, help="decode prompt tokens (default 32)")
    parser.add_argument("--new_tokens", type=int, default=None, help="decode new tokens (default 64)")
    parser.add_argument("--decode_dtype", choices=sorted(bench_generate.DTYPES), default="fp32")
    parser.add_argument("--output", default="benchmarks/results/equal_quality_cpu.json")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else STUDY).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 1 <= args.window < args.cycle:
        parser.error(f"--window {args.window} must be at least 1 and below --cycle {args.cycle}")
    try:
        args.models = [ModelSpec(width) for width in args.dense_widths] + [
            parse_sparse(spec, args.dense_widths[0]) for spec in args.sparse]
    except ValueError as error:
        parser.error(str(error))
    for spec in args.models:
        if spec.width % args.head_size or spec.width % args.block_size:
            parser.error(f"width {spec.width} must divide by --head_size {args.head_size} and --block_size "
                         f"{args.block_size}")
        if spec.dense_width is not None and spec.dense_width not in args.dense_widths:
            parser.error(f"{spec.label}: its dense width {spec.dense_width} is not in --dense_widths")
    return args


def training_args(args, spec: ModelSpec, cycle: int | None = None) -> list[str]:
    """bench_training.py's flags for one model."""
    return ["--d_model", str(spec.width), "--layers", str(args.layers), "--heads", str(spec.width // args.head_size),
            "--vocab", str(args.vocab), "--seq_len", str(args.seq_len), "--batch", str(args.batch),
            "--block_size", str(args.block_size), "--cycle", str(cycle or args.cycle), "--window", str(args.window),
            "--rounds", str(args.rounds), "--precisions", args.precision]


def decode_args(args, spec: ModelSpec) -> argparse.Namespace:
    """bench_generate.py's arguments for one model."""
    return bench_generate.parse_args([
        "--d_model", str(spec.width), "--layers", str(args.layers), "--heads", str(spec.width // args.head_size),
        "--vocab", str(args.vocab), "--block_size", str(args.block_size), "--prompt", str(args.prompt),
        "--new_tokens", str(args.new_tokens), "--rounds", str(args.decode_rounds), "--dtype", args.decode_dtype])


def time_training(args) -> tuple[dict[str, dict], float | None]:
    """{label: training facts and tokens/s samples}, and the other processes' CPU share meanwhile."""
    device = torch.device("cpu")
    variants = {}
    for spec in args.models:
        flags = bench_training.parse_args(training_args(args, spec) + ["--device", "cpu"])
        shape = (spec.width, args.layers, spec.width // args.head_size)
        variants[spec.label] = bench_training.Variant(flags, shape, device, args.precision, spec.density, spec.method)
    batch = bench_training.training_batch(flags, device)  # the same shape for every model
    with OtherLoad() as load:
        warm = bench_training.warm_up(list(variants.values()), batch, args.cycle)
        print(f"training: warm-up cycle {warm:.0f} s; {args.rounds} timed round(s) will take about "
              f"{warm * args.rounds:.0f} s", flush=True)
        bench_training.time_rounds(list(variants.values()), batch, args.cycle, args.rounds)
    facts = {}
    for label, variant in variants.items():
        nonzero, _ = count_parameters(variant.model)
        facts[label] = {"layer_density": linear_density(variant.model), "linear_nonzeros": linear_nonzeros(variant.model),
                        "total_nonzeros": nonzero, "train_tokens_per_s": statistics.median(variant.tokens_per_second),
                        "train_samples": variant.tokens_per_second, "updates_timed": variant.updates}
    return facts, load.share


def same_greedy_tokens(served, plain, prompt: torch.Tensor, new_tokens: int) -> bool:
    """Whether the served model decodes the same greedy tokens as its plain form."""
    greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, use_cache=True)
    with torch.inference_mode():
        return torch.equal(served.generate(prompt, **greedy), plain.generate(prompt, **greedy))


def time_decode(args) -> tuple[dict[tuple[int, float | None], dict], float | None]:
    """{(width, density): decode tokens/s per batch and the greedy check}, and the others' CPU share meanwhile."""
    dtype = bench_generate.DTYPES[args.decode_dtype]
    served = {}  # one model a shape: a static model serves as its momentum twin does
    for spec in args.models:
        key = (spec.width, spec.density)
        if key in served:
            continue
        decode = decode_args(args, spec)
        model = bench_generate.build_dense(decode) if spec.density is None else bench_generate.build_sparse(
            decode, spec.density)
        served[key] = model.to(dtype=dtype)
    generator = torch.Generator().manual_seed(0)  # bench_generate's prompts: one draw per batch size, in order
    results = {key: {"decode_tokens_per_s": {}, "decode_samples": {}, "same_greedy_tokens": {}} for key in served}
    load = OtherLoad()
    with load:
        for batch in args.batches:
            prompt = torch.randint(1, args.vocab, (batch, args.prompt), generator=generator)
            for (width, density), model in served.items():
                if density is not None:
                    spec = next(s for s in args.models if (s.width, s.density) == (width, density))
                    plain = bench_generate.build_plain_sparse(decode_args(args, spec), density).to(dtype=dtype)
                    same = same_greedy_tokens(model, plain, prompt, args.new_tokens)
                    results[(width, density)]["same_greedy_tokens"][batch] = same
                    if not same:
                        print(f"WARNING: width {width}, density {density}, batch {batch}: the served model's greedy "
                              "tokens differ from its plain form's", flush=True)
            names = {f"{width}:{density}": model for (width, density), model in served.items()}
            samples = bench_generate.interleaved_samples(names, prompt, args.new_tokens, args.decode_rounds)
            for key, name in zip(served, names):
                rates = [rate for _, rate in samples[name]]
                results[key]["decode_tokens_per_s"][batch] = statistics.median(rates)
                results[key]["decode_samples"][batch] = rates
            print(f"decode: batch {batch} done", flush=True)
    return results, load.share


def measure_memory(args) -> dict[str, dict]:
    """{label: training_memory.py's result}, each model in its own process."""
    memory = {}
    for spec in args.models:
        flags = training_args(args, spec, cycle=args.window + 1) + ["--precision", args.precision]
        if spec.density is not None:
            flags += ["--density", str(spec.density), "--method", spec.method]
        memory[spec.label] = measure_in_subprocess(flags)
        print(f"memory: {spec.label} done", flush=True)
    return memory


def main(argv=None) -> dict:
    request_huge_pages()  # as bench_training.py: torch's large CPU tensors on huge pages, before any allocation
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count())
    models = ", ".join(spec.label for spec in args.models)
    print(f"plan: {models}; {args.layers} layers, vocab {args.vocab}, {args.batch} x {args.seq_len} tokens a step, "
          f"{args.precision}; training: 1 warm-up + {args.rounds} timed cycle(s) of {args.cycle} steps (dense dW in "
          f"{args.window}); memory: one cycle of {args.window + 1} steps a model, each in its own process; decode: "
          f"batches {'/'.join(map(str, args.batches))}, 1 warm-up + {args.decode_rounds} call(s) of "
          f"{args.new_tokens} tokens; estimate about {estimate_seconds(args) / 60:.0f} min on a quiet 2-core machine",
          flush=True)
    start = time.perf_counter()
    memory = measure_memory(args)
    training, training_load = time_training(args)
    gc.collect()  # the training models (their hooks hold reference cycles) are gone before decoding
    decode, decode_load = time_decode(args)
    rows = table_rows(args.models, training, memory, decode)
    machine = f"{bench_generate.device_name(torch.device('cpu'))} ({platform.machine()})"
    result = {"args": {k: v for k, v in vars(args).items() if k != "models"}, "machine": machine,
              "torch": torch.__version__, "huge_pages": huge_page_status(),
              "others_cpu_share": {"training": training_load, "decode": decode_load},
              "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    print_table(args, result)
    if args.output:
        bench_training.write_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
