"""`SparsityConfig`: every sparsity setting in one dataclass that `HfArgumentParser` reads from the command line."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

DISTRIBUTIONS = ("uniform", "erk")
INITS = ("random", "magnitude")
BLOCK_SIZES = (1, 16, 32, 64, 128)  # 1 = fine-grained; the others are the block-sparse kernels' sizes
BLOCK_MOMENTA = ("exact", "fast")
ADAM_MOMENTA = ("normalized", "raw")
REGROWN_STATES = ("reset", "fresh", "keep")
BLOCK_SCORES = ("optimizer", "collected")
FUSED_QKV = ("joint", "split")
DENSE = "dense"  # not a sparsity method: recipes train the dense baseline when they see it


@dataclass
class SparsityConfig:
    density: float = field(
        default=0.2,
        metadata={"help": "Fraction of weights kept in the sparsified layers, in (0, 1]. 0.2: 5x fewer weights."},
    )
    method: str = field(
        default="momentum",
        metadata={"help": "How the topology changes: momentum (sparse momentum), rigl, set, static, magnitude; dense: no sparsity."},
    )
    target_modules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Module names to sparsify (suffix match, e.g. c_fc q_proj). Default: every nn.Linear and "
            "transformers Conv1D except the output embedding ('all-linear')."
        },
    )
    target_regex: Optional[str] = field(
        default=None, metadata={"help": "Regex over full module names selecting the layers to sparsify."}
    )
    distribution: str = field(
        default="uniform",
        metadata={"help": "Per-layer density: uniform (same for every layer) or erk (RigL's Erdos-Renyi-kernel)."},
    )
    init: str = field(
        default="random",
        metadata={"help": "Initial mask: random (training from scratch) or magnitude (keep the largest pretrained weights)."},
    )
    prune_rate: float = field(
        default=0.5, metadata={"help": "Fraction of each layer's active weights pruned at the first topology update."}
    )
    prune_rate_decay: str = field(
        default="cosine", metadata={"help": "How the prune rate decays over training: cosine (to 0) or constant."}
    )
    update_interval: int = field(
        default=100, metadata={"help": "Optimizer steps between topology updates."}
    )
    update_end_fraction: float = field(
        default=1.0,
        metadata={"help": "Topology updates stop after this fraction of training (RigL uses 0.75; the reference 1.0)."},
    )
    initial_density: float = field(
        default=1.0,
        metadata={
            "help": "Gradual pruning (magnitude) only: the density it starts at, pruned on the cubic schedule down to "
            "density. 1: from dense (Zhu & Gupta); lower: from an `init` mask at this density (a smaller weight "
            "budget over training)."
        },
    )
    momentum_beta: float = field(
        default=0.9,
        metadata={"help": "Decay of the gradient average used as momentum when the optimizer keeps no momentum."},
    )
    adam_momentum: str = field(
        default="normalized",
        metadata={
            "help": "How momentum is read from Adam/AdamW: normalized (exp_avg / sqrt(exp_avg_sq), as the reference) "
            "or raw (exp_avg)."
        },
    )
    regrown_state: str = field(
        default="reset",
        metadata={
            "help": "Optimizer state of regrown weights (fine-grained masks): reset (every slot zeroed; AdamW's "
            "per-tensor bias correction then makes their first steps and momentum read several times too large), "
            "fresh (momentum zeroed, gradient scale such as exp_avg_sq kept: steps no larger than a fresh "
            "parameter's) or keep (all the state gathered from the straight-through gradients while absent, as the "
            "reference since v1.0). Block layers: reset or fresh (new blocks' exp_avg_sq from the gradients "
            "collected before the update). docs/study.md measures the three."
        },
    )
    fused_qkv: str = field(
        default="joint",
        metadata={
            "help": "Fused query/key/value projections (GPT-2's c_attn, GPT-NeoX, Falcon, Phi-3): joint (one topology "
            "unit per layer) or split (q, k and v are separate units with their own budgets, as three layers)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the initial masks and random growth."})
    block_size: int = field(
        default=1,
        metadata={
            "help": "1: fine-grained masks. 16/32/64/128: block-sparse layers that store, compute and move whole "
            "blocks (faster than dense; layer dims must divide by it)."
        },
    )
    block_momentum: str = field(
        default="fast",
        metadata={
            "help": "Momentum of absent blocks (block_size > 1). exact: dense weight gradient every step up to the "
            "last update, like the reference. fast: dense gradient only in a short window before each update, "
            "sparse otherwise."
        },
    )
    momentum_window: int = field(
        default=10, metadata={"help": "With block_momentum=fast: steps of dense gradients before each update."}
    )
    block_scores: str = field(
        default="optimizer",
        metadata={
            "help": "Block momentum (block_size > 1). optimizer: live blocks from the optimizer, absent ones from "
            "the collected gradients (pruned blocks mostly grow back in place); collected: every block from the "
            "collected gradients on one scale (pruned blocks compete with absent ones)."
        },
    )

    def __post_init__(self):
        from sparse_nlp.methods import get_method, known_methods  # late import: methods import the config

        if not isinstance(self.density, (int, float)) or math.isnan(self.density) or not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density!r}; e.g. density=0.2 keeps 20% of weights.")
        if self.method != DENSE and self.method not in known_methods():
            methods = ", ".join(known_methods() + [DENSE])
            raise ValueError(f"unknown sparsity method {self.method!r}; known methods: {methods}.")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}.")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}.")
        if (not isinstance(self.initial_density, (int, float)) or math.isnan(self.initial_density)
                or not self.density <= self.initial_density <= 1):
            raise ValueError(f"initial_density must be in [density, 1] = [{self.density:g}, 1], got "
                             f"{self.initial_density!r}.")
        if self.initial_density < 1 and self.method != DENSE and not get_method(self.method).starts_dense:
            raise ValueError(f"initial_density={self.initial_density:g} is for gradual pruning (method magnitude); "
                             f"{self.method} starts at density.")
        if not 0 <= self.prune_rate < 1:
            raise ValueError(f"prune_rate must be in [0, 1), got {self.prune_rate!r}.")
        if self.prune_rate_decay not in ("cosine", "constant"):
            raise ValueError(f"unknown prune_rate_decay {self.prune_rate_decay!r}; choose cosine or constant.")
        if int(self.update_interval) != self.update_interval or self.update_interval < 1:
            raise ValueError(f"update_interval must be a positive integer, got {self.update_interval!r}.")
        if not 0 < self.update_end_fraction <= 1:
            raise ValueError(f"update_end_fraction must be in (0, 1], got {self.update_end_fraction!r}.")
        if not 0 <= self.momentum_beta < 1:
            raise ValueError(f"momentum_beta must be in [0, 1), got {self.momentum_beta!r}.")
        if self.adam_momentum not in ADAM_MOMENTA:
            raise ValueError(f"unknown adam_momentum {self.adam_momentum!r}; choose normalized or raw.")
        if self.regrown_state not in REGROWN_STATES:
            raise ValueError(f"unknown regrown_state {self.regrown_state!r}; choose {', '.join(REGROWN_STATES)}.")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size!r}.")
        if self.block_momentum not in BLOCK_MOMENTA:
            raise ValueError(f"unknown block_momentum {self.block_momentum!r}; choose exact or fast.")
        if int(self.momentum_window) != self.momentum_window or self.momentum_window < 1:
            raise ValueError(f"momentum_window must be a positive integer, got {self.momentum_window!r}.")
        if self.block_scores not in BLOCK_SCORES:
            raise ValueError(f"unknown block_scores {self.block_scores!r}; choose optimizer or collected.")
        if self.regrown_state == "keep" and self.block_size > 1:
            raise ValueError("regrown_state=keep needs fine-grained masks (block_size 1): block-sparse layers keep no "
                             "optimizer state for absent blocks; use reset, or fresh (their gradient scale from the "
                             "gradients collected before the update).")
        if self.fused_qkv not in FUSED_QKV:
            raise ValueError(f"unknown fused_qkv {self.fused_qkv!r}; choose joint or split.")
        if self.fused_qkv == "split" and self.block_size > 1:
            raise ValueError("fused_qkv=split needs fine-grained masks (block_size 1); block layers move whole blocks.")
        if self.target_modules is not None and self.target_regex is not None:
            raise ValueError("give either target_modules or target_regex, not both.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "SparsityConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sparsity option(s) {unknown}; known options: {sorted(known)}.")
        return cls(**values)
