"""Shared by the study's tests (recipes/study/): study rows, the tiny study's flags, the runs a study trains."""
from __future__ import annotations

import random
from pathlib import Path

from transformers import GPT2Config

from sparse_nlp.lm.reporting import RunResult
from study import runner
from study.grid import StudyResult, StudyRun, study_result

# The study's model (recipes/study_lm.py's default): 4 layers, width 256, vocabulary 2,048
STUDY_CONFIG = GPT2Config(vocab_size=2048, n_layer=4, n_embd=256, n_head=4, n_positions=128, bos_token_id=0,
                          eos_token_id=0)


def run_result(ppl: float, density: float = 0.5, history=()) -> RunResult:
    return RunResult(run="x", method="magnitude", density=density, nonzero_params=200 + round(400 * density),
                     total_params=600, val_perplexity=ppl, test_perplexity=ppl + 1, train_tokens=1000,
                     tokens_per_second=100.0, train_seconds=10.0, density_history=list(history))


def study_row(method: str, density: float, seed: int, ppl: float, block_size: int = 1) -> StudyResult:
    run = StudyRun(method, density, seed, block_size)
    return study_result(run, run_result(ppl, density), {"a": 100, "b": 300}, total_steps=10, width=32,
                        precision="bf16", setup_seconds=1.0)


WORDS = "the nation people congress year government states united new great war peace law public world".split()


def write_text(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "." for _ in range(lines)) + "\n")
    return path


def study_flags(tmp_path, *extra):
    """The tiny study's flags: a 1-layer, 64-wide GPT-2, 4 steps, dense, small-dense and momentum at 0.5, seed 0."""
    train, valid = write_text(tmp_path / "train.txt", 400, 0), write_text(tmp_path / "valid.txt", 40, 1)
    return [
        "--output_dir", str(tmp_path / "study"), "--data_cache_dir", str(tmp_path / "cache"), "--train_file",
        str(train), "--validation_file", str(valid), "--config_overrides", "n_layer=1,n_embd=64,n_head=2",
        "--seq_length", "32", "--vocab_size", "300", "--max_steps", "4", "--update_interval", "2", "--save_steps", "2",
        "--logging_steps", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--bf16", "false",
        "--densities", "0.5", "--methods", "dense", "small_dense", "momentum", "--block_methods", "none",
        "--seeds", "0", *extra,
    ]


def count_trained_runs(monkeypatch) -> list[str]:
    """The names of the runs the recipe trains from now on (appended as each starts)."""
    trained, original_train_one = [], runner.train_one

    def counting_train_one(run, *args, **kwargs):
        trained.append(run)
        return original_train_one(run, *args, **kwargs)

    monkeypatch.setattr(runner, "train_one", counting_train_one)
    return trained
