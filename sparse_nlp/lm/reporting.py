"""The results table of a training recipe: one row per run, printed, and written as JSON and Markdown.

    rows = [RunResult(run="sparse", method="momentum", density=0.2, ...), RunResult(run="dense", ...)]
    print(format_table(rows)); write_results(rows, "runs/train_lm")   # results.json + results.md

results.json also holds each run's training-loss curve and per-layer density history; results.md a per-layer
density table of each sparse run.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from sparse_nlp.integrations.console import short_layer_names
from sparse_nlp.layers.base import overall_density, sparse_layers
from sparse_nlp.model import find_target_layers


@dataclass
class RunResult:
    run: str  # "sparse" / "dense"
    method: str  # sparsity method ("dense" for the baseline)
    density: float  # density of the sparsified linear layers (1.0 dense)
    nonzero_params: int  # nonzero parameters of the whole model (embeddings included, tied weights once)
    total_params: int  # all parameters of the same model, dense
    val_perplexity: float
    test_perplexity: Optional[float]  # None when the data has no test split
    train_tokens: int  # tokens trained on, all ranks together
    tokens_per_second: float  # training throughput, all ranks together
    train_seconds: float  # wall time of training (evaluation excluded)
    topology_updates: int = 0
    compute_path: str = "dense"  # how the linear layers computed: see describe_compute_path
    loss_history: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss) per log
    density_history: list[dict] = field(default_factory=list)  # controller.density_history: at the start, per update
    other_load: Optional[float] = None  # share of the cores other processes used while it trained (lm.machine_load)
    # (step, training seconds, validation perplexity) per evaluation during training (--eval_strategy steps)
    validation_history: list[tuple] = field(default_factory=list)
    # (step, training seconds, training loss) per log: the loss curve against wall time as well as steps
    loss_curve: list[tuple] = field(default_factory=list)
    width: Optional[int] = None  # hidden size of the trained model (--width_multiplier widens the sparse one)
    linear_nonzeros: int = 0  # nonzero weights of the sparsified linear layers (all of them for a dense run)
    # bytes of weights and buffers (masks included) + one gradient per trainable parameter + optimizer state, as
    # held at the end of training (block layers' dense-gradient window sums, held before each update, not included)
    training_state_bytes: int = 0


COLUMNS = (  # (header, how to format a row)
    ("run", lambda r: r.run),
    ("method", lambda r: r.method),
    ("path", lambda r: r.compute_path),
    ("width", lambda r: "-" if r.width is None else str(r.width)),
    ("density", lambda r: f"{r.density:.3f}"),
    ("linear nonzeros", lambda r: f"{r.linear_nonzeros / 1e6:.2f}M"),
    ("all nonzeros", lambda r: f"{r.nonzero_params / 1e6:.2f}M of {r.total_params / 1e6:.2f}M"),
    ("train memory", lambda r: format_bytes(r.training_state_bytes)),
    ("val ppl", lambda r: _ppl(r.val_perplexity)),
    ("test ppl", lambda r: _ppl(r.test_perplexity)),
    ("tokens/s", lambda r: f"{r.tokens_per_second:,.0f}"),
    ("train time", lambda r: format_duration(r.train_seconds)),
)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(nonzero, total) parameters, each shared tensor once; a sparse layer counts its active weights only."""
    sparse = {id(layer.weight): layer for _, layer in sparse_layers(model)}
    seen, nonzero, total = set(), 0, 0
    for param in model.parameters():  # parameters() already yields a tied tensor once
        if id(param) in seen:
            continue
        seen.add(id(param))
        layer = sparse.get(id(param))
        if layer is None:
            total += param.numel()
            nonzero += param.numel()
        else:  # a block-sparse layer stores only its live blocks: count its dense shape in the total
            total += layer.weight_shape[0] * layer.weight_shape[1]
            nonzero += layer.nonzeros
    return nonzero, total


def training_state_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Bytes a training step keeps between steps: weights and buffers, one gradient per trainable parameter, and the
    optimizer's state. A block-sparse layer's weights are its live blocks only, so all three shrink with density;
    a fine-grained layer holds dense weights, gradients and state plus its mask."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    params = list(model.parameters())  # a tied tensor once
    total = sum(size(p) for p in params) + sum(size(b) for b in model.buffers())
    total += sum(size(p) for p in params if p.requires_grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def format_bytes(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count else "-"


def comparison_line(rows: Sequence[RunResult]) -> Optional[str]:
    """One line for the first sparse row against the dense row: speed, perplexity gap and memory, or None."""
    dense = next((r for r in rows if r.method == "dense" and r.run == "dense"), None)
    sparse = next((r for r in rows if r.method != "dense"), None)
    if dense is None or sparse is None or not dense.tokens_per_second:
        return None
    speed = sparse.tokens_per_second / dense.tokens_per_second
    gap = sparse.val_perplexity / dense.val_perplexity - 1
    line = (f"The {sparse.run} model ({sparse.compute_path}, density {sparse.density:.2f}) trained at "
            f"{speed:.2f}x the dense model's tokens/s (topology updates and their dense-gradient windows included), "
            f"validation perplexity {gap:+.1%} against dense")
    if sparse.training_state_bytes and dense.training_state_bytes:
        line += f", in {sparse.training_state_bytes / dense.training_state_bytes:.2f}x its training memory"
    return line + "."


def format_table(rows: Sequence[RunResult]) -> str:
    """A plain-text table (also valid Markdown)."""
    return aligned_table([[header for header, _ in COLUMNS]] + [[fmt(row) for _, fmt in COLUMNS] for row in rows])


def aligned_table(cells: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the first is the header) as an aligned Markdown table."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_results(rows: Sequence[RunResult], output_dir: str, notes: Sequence[str] = ()) -> tuple[str, str]:
    """Write results.json and results.md into ``output_dir``; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, md_path = os.path.join(output_dir, "results.json"), os.path.join(output_dir, "results.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"runs": [asdict(r) for r in rows], "notes": list(notes)}, f, indent=2)
        f.write("\n")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(format_table(rows) + "\n")
        f.writelines(f"\n{note}\n" for note in notes)
        for row in rows:
            if row.density_history:
                f.write(f"\nPer-layer density of the {row.run} run, by training step:\n\n")
                f.write(format_density_table(row.density_history) + "\n")
    return json_path, md_path


def format_density_table(history: Sequence[dict], max_columns: int = 9) -> str:
    """Layers as rows, steps as columns (the start, the last update and evenly spaced ones between)."""
    if len(history) > max_columns:
        picks = sorted({round(i * (len(history) - 1) / (max_columns - 1)) for i in range(max_columns)})
        history = [history[i] for i in picks]
    names = list(history[0]["densities"])
    short = short_layer_names(names)
    header = ["layer"] + [f"step {record['step']}" for record in history]
    body = [[short[name]] + [f"{record['densities'].get(name, math.nan):.3f}" for record in history] for name in names]
    return aligned_table([header] + body)


def _ppl(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if math.isfinite(value) else str(value)


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s"


def count_linear_nonzeros(model: nn.Module) -> int:
    """Nonzero weights of the sparse layers; for a model without any, the weights of the layers ``sparsify`` would
    target by default (every linear layer but the LM head), so that sparse and dense rows count the same layers."""
    layers = sparse_layers(model)
    if layers:
        return sum(layer.nonzeros for _, layer in layers)
    try:
        targets = find_target_layers(model)
    except ValueError:  # no linear layer to target
        return 0
    return sum(int(layer.weight.numel()) for _, layer in targets)


@torch.no_grad()
def linear_density(model: nn.Module) -> float:
    """Density of the sparse layers (1.0 for a model without any)."""
    return overall_density(sparse_layers(model))


def describe_compute_path(model: nn.Module) -> str:
    """How the linear layers compute, e.g. "dense", "masked dense", "block 64: torch x14, dense x2".

    Block-sparse layers name the kernel backend each one dispatches to at its current density and device
    (triton on GPU; on CPU the native or blocked torch path, or masked dense above the measured break-even density).
    """
    layers = [layer for _, layer in sparse_layers(model)]
    if not layers:
        return "dense"
    counts: dict[str, int] = {}
    for layer in layers:
        path = layer.compute_path()
        counts[path] = counts.get(path, 0) + 1
    if list(counts) == ["masked dense"]:
        return "masked dense"
    usage = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda item: -item[1]))
    return f"block {layers[0].unit_size ** 0.5:.0f}: {usage}"
