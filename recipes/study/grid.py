"""The NLP-gap study's grid: which runs, their names, their result files, and which are already done.

    grid = plan_grid(densities=[0.1, 0.05], methods=["dense", "small_dense", "momentum", "static"], seeds=[0, 1],
                     seeded_methods=["momentum"], seeded_densities=[0.1], block_methods=["momentum"], block_size=64)
    for run in grid:
        done = load_result(run_dir(output_dir, run), settings)       # None: not finished (or never started)
        ...train it, then write_result(run_dir(output_dir, run), study_result(...), settings)

Each run writes its own ``study_result.json`` into its folder when it has finished (written to a temporary file
and renamed, so a killed study never leaves half a result); a study started again skips those runs, and the
training recipe resumes an unfinished one from its last checkpoint. A result is only reused for the settings it
was trained with: another step budget, model or learning rate is a one-line error, not a silently mixed table.

Methods are sparsity methods (trained fine-grained; block-sparse with ``block_methods``), ``dense`` (the full
model) and the equal-size references:
- ``small_dense``: a narrower dense model with as many linear weights as the sparse ones at that density;
- ``small_dense_total``: one with as many parameters in all as the sparse model's nonzeros, embeddings included
  (both ``study.small_dense``);
- ``magnitude_average``: gradual magnitude pruning whose linear weights averaged over training equal the sparse
  runs' (it starts and ends sparser: ``study.magnitude_budget``);
- ``rigl_own``, ``set_own``: RigL and SET at their own papers' settings instead of the study's (``OWN_SETTINGS``).
A reference's ``density`` is the density it matches, not its own.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

from sparse_nlp.config import DENSE
from sparse_nlp.lm.reporting import RunResult

SMALL_DENSE = "small_dense"
SMALL_DENSE_TOTAL = "small_dense_total"
MAGNITUDE_AVERAGE = "magnitude_average"
DENSE_REFERENCES = (DENSE, SMALL_DENSE, SMALL_DENSE_TOTAL)  # runs without sparsity
RIGL_OWN = "rigl_own"
SET_OWN = "set_own"
# Baselines at their own papers' settings, where the study's differ (docs/study.md says where each comes from):
# - RigL (Evci et al. 2020; google-research/rigl): drop fraction 0.3 decayed by cosine, updates end at 75% of
#   training, ERK; its update interval (100 steps) is the study's already.
# - SET (Mocanu et al. 2018): a constant zeta = 0.3 at every update, Erdos-Renyi layer densities (ERK is the same rule
#   for linear layers: density ~ (n_in + n_out) / (n_in * n_out)). Updates every 100 steps as the study's (the
#   paper's one per epoch would be one update in 1.2 epochs), the last at 15/16 of training (step 1,500 of 1,600): a
#   constant rate would otherwise update on the last step and regrow 30% of every layer as zeros never trained.
OWN_SETTINGS = {
    RIGL_OWN: {"prune_rate": 0.3, "update_end_fraction": 0.75, "distribution": "erk"},
    SET_OWN: {"prune_rate": 0.3, "prune_rate_decay": "constant", "distribution": "erk", "update_end_fraction": 0.9375},
}
# references trained by a sparsity method under another name
SPARSITY_METHOD_OF = {MAGNITUDE_AVERAGE: "magnitude", RIGL_OWN: "rigl", SET_OWN: "set"}
RESULT_FILE = "study_result.json"


@dataclass(frozen=True)
class StudyRun:
    method: str  # a sparsity method, "dense", or a reference: "small_dense", "small_dense_total", "magnitude_average"
    density: float  # target density of the linear layers (a reference: the density it matches); 1.0 for dense
    seed: int
    block_size: int = 1  # 1: fine-grained masks; 64: block-sparse layers

    @property
    def name(self) -> str:
        """The run's folder name, e.g. dense-s0, small_dense-d0.1-s1, momentum-b64-d0.05-s0."""
        if self.method == DENSE:
            return f"dense-s{self.seed}"
        block = f"-b{self.block_size}" if self.block_size > 1 else ""
        return f"{self.method}{block}-d{self.density:g}-s{self.seed}"

    @property
    def is_sparse(self) -> bool:
        return self.method not in DENSE_REFERENCES

    @property
    def sparsity_method(self) -> str:
        """The sparsity method it trains with ("dense" for the dense references)."""
        return DENSE if not self.is_sparse else SPARSITY_METHOD_OF.get(self.method, self.method)


def plan_grid(
    densities: Sequence[float],
    methods: Sequence[str],
    seeds: Sequence[int],
    seeded_methods: Sequence[str] = (),
    seeded_densities: Sequence[float] = (),
    block_methods: Sequence[str] = (),
    block_size: int = 64,
) -> list[StudyRun]:
    """Every run of the study, in training order: the whole grid at the first seed first (so that a study stopped
    half-way already has one full table), then the further seeds of ``seeded_methods`` at ``seeded_densities``
    (dense, which has no density, gets them whenever it is seeded; block runs are seeded as e.g. "momentum-b64")."""
    if not seeds:
        raise ValueError("give at least one seed (--seeds 0).")
    for density in list(densities) + list(seeded_densities):
        if not 0 < density < 1:
            raise ValueError(f"study densities must be in (0, 1), got {density!r}; dense runs are the 'dense' method.")
    first, *more = seeds

    def runs_at(seed: int, density_ok, method_ok) -> list[StudyRun]:
        runs = [StudyRun(DENSE, 1.0, seed)] if DENSE in methods and method_ok(DENSE) else []
        for density in densities:
            if not density_ok(density):
                continue
            runs += [StudyRun(m, density, seed) for m in methods if m != DENSE and method_ok(m)]
            runs += [StudyRun(m, density, seed, block_size) for m in block_methods if method_ok(f"{m}-b{block_size}")]
        return runs

    grid = runs_at(first, lambda d: True, lambda m: True)
    seeded = set(seeded_methods)
    for seed in more:
        grid += runs_at(seed, lambda d: d in seeded_densities, lambda m: m in seeded)
    names = [run.name for run in grid]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"the grid names run {duplicates[0]} twice; list each method, density and seed once.")
    return grid


def run_dir(output_dir: str, run: StudyRun) -> str:
    return os.path.join(output_dir, run.name)


@dataclass
class StudyResult:
    """One finished run: one row of study.csv."""

    name: str
    method: str
    density: float  # target density of the linear layers (1.0 dense; a reference: the density it matches)
    seed: int
    block_size: int
    width: int  # hidden width of the model trained (small-dense runs are narrower)
    linear_nonzeros: int  # nonzero weights of the linear layers at the end of training
    linear_params: int  # the same layers' weights, dense
    other_params: int  # everything else: embeddings (token, position), norms, biases; dense in every run
    nonzero_params: int  # linear_nonzeros + other_params (tied weights once)
    average_params: float  # nonzero params averaged over the training steps (gradual pruning starts dense)
    val_perplexity: float
    test_perplexity: Optional[float]
    # Speed and time; None when not measured (a run killed after its last checkpoint trains no step when resumed).
    tokens_per_second: Optional[float]  # training throughput, all ranks together
    train_seconds: Optional[float]  # training time of the whole run (resumed: earlier sittings at the same speed)
    wall_seconds: Optional[float]  # train_seconds plus model setup, evaluation and saving
    train_tokens: int
    resumed_from_step: int  # 0 unless the run was resumed from a checkpoint
    topology_updates: int
    compute_path: str
    precision: str  # "bf16" (autocast) or "fp32"
    other_load: Optional[float] = None  # share of the cores other processes used while it trained; None: unknown
    loss_history: list = field(default_factory=list)
    density_history: list = field(default_factory=list)
    # [step, training seconds, validation perplexity] per evaluation during training (--eval_strategy steps)
    validation_history: list = field(default_factory=list)

    def run_result(self) -> RunResult:
        """As the training recipe's row (for its plots and tables)."""
        return RunResult(
            run=self.name, method=self.method, density=self.linear_nonzeros / self.linear_params,
            nonzero_params=self.nonzero_params, total_params=self.linear_params + self.other_params,
            val_perplexity=self.val_perplexity, test_perplexity=self.test_perplexity, train_tokens=self.train_tokens,
            tokens_per_second=self.tokens_per_second or 0.0, train_seconds=self.train_seconds or 0.0,
            topology_updates=self.topology_updates, compute_path=self.compute_path,
            loss_history=[tuple(point) for point in self.loss_history], density_history=self.density_history,
            validation_history=[tuple(point) for point in self.validation_history],
        )


def average_linear_nonzeros(history: Sequence[dict], layer_sizes: dict[str, int], total_steps: int) -> float:
    """Nonzero linear weights averaged over steps 0..total_steps, from the controller's density history
    (each record holds from its step to the next record's)."""
    if not history or total_steps < 1:
        raise ValueError("need a density history and at least one step.")
    area = 0.0
    for i, record in enumerate(history):
        missing = sorted(set(layer_sizes) - set(record["densities"]))
        if missing:
            raise ValueError(f"the density history has no {missing[0]}; is it from another model?")
        end = history[i + 1]["step"] if i + 1 < len(history) else total_steps
        nonzeros = sum(record["densities"][name] * size for name, size in layer_sizes.items())
        area += nonzeros * max(0, min(end, total_steps) - record["step"])
    return area / total_steps


def study_result(
    run: StudyRun, result: RunResult, layer_sizes: dict[str, int], *, total_steps: int, width: int, precision: str,
    setup_seconds: float, resumed_from_step: int = 0,
) -> StudyResult:
    """The study's row of a finished training run (``layer_sizes``: the trained model's linear layers)."""
    linear_params = sum(layer_sizes.values())
    linear_nonzeros = round(result.density * linear_params)
    other_params = result.nonzero_params - linear_nonzeros
    if result.density_history:
        average = other_params + average_linear_nonzeros(result.density_history, layer_sizes, total_steps)
    else:
        average = float(result.nonzero_params)
    speed = result.tokens_per_second if result.tokens_per_second > 0 else None  # 0: no step trained in this sitting
    train_seconds = result.train_seconds if not resumed_from_step else result.train_tokens / speed if speed else None
    return StudyResult(
        name=run.name, method=run.method, density=run.density, seed=run.seed, block_size=run.block_size, width=width,
        linear_nonzeros=linear_nonzeros, linear_params=linear_params, other_params=other_params,
        nonzero_params=result.nonzero_params, average_params=average, val_perplexity=result.val_perplexity,
        test_perplexity=result.test_perplexity, tokens_per_second=speed, train_seconds=train_seconds,
        wall_seconds=setup_seconds + train_seconds if train_seconds is not None else None,
        train_tokens=result.train_tokens,
        resumed_from_step=resumed_from_step, topology_updates=result.topology_updates,
        compute_path=result.compute_path, precision=precision, loss_history=[list(p) for p in result.loss_history],
        density_history=list(result.density_history), other_load=result.other_load if speed else None,
        validation_history=[list(point) for point in result.validation_history],
    )


# ---- result files ---------------------------------------------------------------------------------------------
def write_result(folder: str, result: StudyResult, settings: dict) -> str:
    """Write the run's result file atomically (temporary file, then rename); return its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RESULT_FILE)
    staging = path + ".tmp"
    with open(staging, "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "result": asdict(result)}, f, indent=1)
        f.write("\n")
    os.replace(staging, path)
    return path


# The flags that select a saved run's precision, for the error when it differs (the recipes choose bf16 by default
# only where bf16 is fast, so a study moved to another machine may meet this).
PRECISION_FLAGS = {"bf16": "--bf16 true (and --use_cpu true on a machine without a GPU)", "fp32": "--bf16 false"}


def load_result(folder: str, settings: dict, added_settings: Optional[dict] = None) -> Optional[StudyResult]:
    """The finished run's result, or None if it has not finished. A ValueError if it finished with other settings.

    ``added_settings``: flattened keys (``"sparsity.regrown_state"``) of settings that did not exist when older
    result files were written, with the value every run had then; a file without the key is read as having it.
    """
    path = os.path.join(folder, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    theirs = _flatten(saved["settings"])
    ours = _flatten(json.loads(json.dumps(settings)))  # the same JSON round trip: tuples become lists
    for key, value in (added_settings or {}).items():
        section = key.rsplit(".", 1)[0] if "." in key else None
        if key not in theirs and (section is None or any(k.startswith(section + ".") for k in theirs)):
            theirs[key] = value  # (a key inside a section only where the file has that section: not for dense runs)
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            remedy = "use another --output_dir (or delete that run's folder to train it again)"
            if key == "training.precision" and theirs.get(key) in PRECISION_FLAGS:
                # the default precision follows the machine (bf16 where it is fast): name the flag that matches
                remedy = f"to continue this study here add {PRECISION_FLAGS[theirs[key]]}, or {remedy}"
            raise ValueError(
                f"{path} was trained with {key}={theirs.get(key)!r} but this study has {key}={ours.get(key)!r}; "
                f"{remedy}."
            )
    known = {f.name for f in fields(StudyResult)}
    return StudyResult(**{key: value for key, value in saved["result"].items() if key in known})


def _flatten(settings: dict, prefix: str = "") -> dict:
    """{"training": {"max_steps": 4}} -> {"training.max_steps": 4}"""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
