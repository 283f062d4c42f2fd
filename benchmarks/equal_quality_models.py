"""The models bench_equal_quality.py compares: their specs, their linear nonzeros, the a-priori time of the run, and
the table of results."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from sparse_nlp.layers.base import sparse_layers
from sparse_nlp.lm.reporting import aligned_table
from sparse_nlp.model import find_target_layers

# Training seconds a token on the 2-core development machine (bf16 autocast, 16 x 128 tokens, quiet), from the
# study's tokens/s (docs/results/study_wider/comparison.md): dense 4 x 256: 7,874; block-64 sparse momentum at
# width 512 / 0.25: 3,629 and 1,024 / 0.0625: 2,103. Only for the estimate printed before the run.
DENSE_256_TOKEN_S = 1 / 7874
SPARSE_TOKEN_S = {512: 1 / 3629, 1024: 1 / 2103}  # in between and beyond: linear in width
PROCESS_START_S = 6  # a memory probe's interpreter, torch and transformers imports


@dataclass(frozen=True)
class ModelSpec:
    width: int
    density: Optional[float] = None  # None: dense
    method: str = "momentum"  # sparse only: how its blocks move (static: they do not)
    dense_width: Optional[int] = None  # sparse only: the equal-quality dense model its "vs dense" ratios are against

    @property
    def label(self) -> str:
        if self.density is None:
            return f"dense {self.width}"
        return f"{self.method} {self.width} / {self.density:g}"


def parse_sparse(text: str, default_dense_width: int) -> ModelSpec:
    """'WIDTH:DENSITY[:METHOD][@DENSE_WIDTH]', e.g. '1024:0.0625@448' or '512:0.25:static@384'."""
    spec, _, dense = text.partition("@")
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"sparse model {text!r}: expected WIDTH:DENSITY[:METHOD][@DENSE_WIDTH]")
    try:
        width, density = int(parts[0]), float(parts[1])
        dense_width = int(dense) if dense else default_dense_width
    except ValueError:
        raise ValueError(f"sparse model {text!r}: WIDTH, DENSITY and DENSE_WIDTH must be numbers") from None
    if not 0 < density < 1:
        raise ValueError(f"sparse model {text!r}: density must be in (0, 1)")
    return ModelSpec(width, density, parts[2] if len(parts) == 3 else "momentum", dense_width)


def linear_nonzeros(model: nn.Module) -> int:
    """Nonzero weights of the linear layers sparsify targets (all but the LM head): a dense model's are all of them."""
    layers = sparse_layers(model)
    if layers:
        return sum(layer.nonzeros for _, layer in layers)
    return sum(module.weight.numel() for _, module in find_target_layers(model))


def training_token_seconds(spec: ModelSpec, layers: int, vocab: int) -> float:
    """A guess at one training token's seconds, from the study's speeds (dense: scaled by its weights)."""
    if spec.density is None:
        def weights(width: int, depth: int) -> int:
            return 12 * depth * width * width + vocab * width

        return DENSE_256_TOKEN_S * weights(spec.width, layers) / weights(256, 4)
    (w0, s0), (w1, s1) = sorted(SPARSE_TOKEN_S.items())
    return (s0 + (s1 - s0) * (spec.width - w0) / (w1 - w0)) * layers / 4


def estimate_seconds(args) -> float:
    """Training (warm-up and timed cycles), memory probes and decoding, on a quiet 2-core machine."""
    tokens = args.batch * args.seq_len
    token_s = [max(training_token_seconds(spec, args.layers, args.vocab), 1e-6) for spec in args.models]
    training = (1 + args.rounds) * args.cycle * tokens * sum(token_s)
    memory = sum(PROCESS_START_S + (args.window + 1) * tokens * s for s in token_s)
    # decoding: a token's forward is about a third of its training step; per call, each batch row's new tokens
    calls = (1 + args.decode_rounds) * len({(spec.width, spec.density) for spec in args.models})
    decode = calls * args.new_tokens * sum(args.batches) * sum(token_s) / len(token_s) / 3
    return training + memory + 2 * decode  # 2x: the greedy checks and the models' builds


def table_rows(models: list[ModelSpec], training: dict, memory: dict, decode: dict) -> list[dict]:
    """One row a model: what it is, its training speed and memory, its decoding speed, and the ratios to its dense
    model of equal quality (dense rows: to themselves)."""
    rows = []
    for spec in models:
        dense = ModelSpec(spec.dense_width) if spec.density is not None else spec
        train, dense_train = training[spec.label], training[dense.label]
        served, dense_served = decode[(spec.width, spec.density)], decode[(dense.width, None)]
        rows.append({
            "model": spec.label, "width": spec.width, "density": spec.density, "method": spec.method
            if spec.density is not None else "dense", "vs_dense_of_width": dense.width, **train,
            "train_vs_dense": train["train_tokens_per_s"] / dense_train["train_tokens_per_s"],
            "memory": memory[spec.label],
            "state_vs_dense": memory[spec.label]["state_bytes"] / memory[dense.label]["state_bytes"],
            **served, "decode_vs_dense": {batch: rate / dense_served["decode_tokens_per_s"][batch]
                                          for batch, rate in served["decode_tokens_per_s"].items()},
        })
    return rows


def _mb(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def print_table(args, result: dict) -> None:
    load = result["others_cpu_share"]
    print(f"\nGPT-2 {args.layers} layers, vocab {args.vocab}, heads of {args.head_size}, block {args.block_size}; "
          f"{result['machine']}, torch {result['torch']}; training {args.batch} x {args.seq_len} tokens a step, "
          f"{args.precision}, AdamW, median of {args.rounds} interleaved cycles of {args.cycle} steps (dense dW in "
          f"{args.window}, a topology update at the end); decode {args.decode_dtype}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, greedy, KV cache, median of {args.decode_rounds}; other processes' CPU "
          f"share: training {_share(load['training'])}, decode {_share(load['decode'])}\n")
    batches = args.batches
    header = ["model", "width", "layer density", "linear nonzeros", "total nonzeros", "train tokens/s", "vs dense",
              "state MB", "peak RSS MB", *[f"decode b{b} tokens/s" for b in batches],
              *[f"b{b} vs dense" for b in batches], "same greedy tokens"]
    cells = [header]
    for row in result["rows"]:
        against = "" if row["density"] is None else f" ({row['vs_dense_of_width']})"
        checks = row["same_greedy_tokens"].values()
        cells.append([
            row["model"], str(row["width"]), f"{row['layer_density']:.4g}", f"{row['linear_nonzeros']:,}",
            f"{row['total_nonzeros']:,}", f"{row['train_tokens_per_s']:,.0f}", f"{row['train_vs_dense']:.2f}x{against}",
            _mb(row["memory"]["state_bytes"]), _mb(row["memory"]["peak_above_start_bytes"]),
            *[f"{row['decode_tokens_per_s'][b]:,.1f}" for b in batches],
            *[f"{row['decode_vs_dense'][b]:.2f}x" for b in batches],
            "-" if not checks else ("yes" if all(checks) else "NO"),
        ])
    print(aligned_table(cells))


def _share(share: Optional[float]) -> str:
    return "unknown" if share is None else f"{share:.0%}"
