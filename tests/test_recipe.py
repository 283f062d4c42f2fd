"""recipes/train_lm.py end to end on tiny settings: local text, a local pretrained model, one-line errors."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_nlp.lm.sequence_length as sequence_length
import train_lm  # recipes/train_lm.py (pytest's pythonpath: recipes/)
from sparse_nlp.lm import arguments, training
from trainer_helpers import tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "train_lm.py"
WORDS = ("the nation people congress year government states united new great war peace law public world will "
         "must our we have has been not this that which all by for with from power men work free").split()


def _write_text(path: Path, lines: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + "." for _ in range(lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    return _write_text(folder / "train.txt", 600, 0), _write_text(folder / "valid.txt", 60, 1), folder / "cache"


def _tiny_flags(output_dir, cache, *extra):
    return [
        "--output_dir", str(output_dir), "--data_cache_dir", str(cache), "--config_overrides", "n_layer=1,n_embd=32,n_head=2",
        "--seq_length", "32", "--vocab_size", "300", "--max_steps", "4", "--update_interval", "2", "--save_steps", "2",
        "--logging_steps", "2", "--per_device_train_batch_size", "16", "--disable_tqdm", "true", "--block_size", "1",
        *extra,
    ]


def test_local_text_trains_sparse_and_dense(text_files, tmp_path, capsys):
    train, valid, cache = text_files
    results = train_lm.main(_tiny_flags(tmp_path, cache, "--train_file", str(train), "--validation_file", str(valid)))
    sparse, dense = results
    assert (sparse.run, sparse.method, dense.run, dense.method) == ("sparse", "momentum", "dense", "dense")
    assert sparse.density == pytest.approx(0.2, abs=1e-3) and dense.density == 1.0
    assert sparse.topology_updates == 1 and sparse.train_tokens == dense.train_tokens == 4 * 16 * 32
    assert sparse.nonzero_params < dense.nonzero_params == dense.total_params == sparse.total_params
    assert all(torch.isfinite(torch.tensor(r.val_perplexity)) for r in results) and sparse.test_perplexity is None
    printed = capsys.readouterr().out
    assert "| run " in printed and "| sparse" in printed and "| dense " in printed
    # one compact line per topology update; per-layer densities only in the results files (and report_to)
    assert "update 1/1 (step 2): prune rate " in printed and "(step 4)" not in printed  # step 4: rate 0, skipped
    assert "sparsity/transformer" not in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["run"] for r in saved["runs"]] == ["sparse", "dense"]
    history = saved["runs"][0]["density_history"]
    assert [record["step"] for record in history] == [0, 2] and len(history[-1]["densities"]) == 4
    assert saved["runs"][1]["density_history"] == []
    assert [step for step, _ in saved["runs"][0]["loss_history"]] == [2, 4] == [s for s, _ in saved["runs"][1]["loss_history"]]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("| run") and "| h.0.attn.c_attn " not in markdown and "| attn.c_attn " in markdown
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert f"{tmp_path / 'results.md'} and {tmp_path / 'training.png'}." in printed
    # the final sparse model is a plain transformers model whose zeros are the mask
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    weight = final.transformer.h[0].mlp.c_fc.weight
    assert 0 < (weight != 0).float().mean() < 0.5


def test_pretrained_model_from_a_local_folder(text_files, tmp_path):
    train, valid, cache = text_files
    from sparse_nlp.lm.tokenizer import train_bpe_tokenizer

    folder = tmp_path / "pretrained"
    tiny_gpt2().save_pretrained(folder)
    train_bpe_tokenizer(train.read_text().splitlines(), vocab_size=300).save_pretrained(folder)  # 300 > 64 tokens
    flags = _tiny_flags(tmp_path / "out", cache, "--train_file", str(train), "--model_name_or_path", str(folder))
    with pytest.raises(SystemExit, match="^error: tokenizer has 300 tokens but .* embeds 64"):
        train_lm.main(flags)
    tokenizer = train_bpe_tokenizer(train.read_text().splitlines(), vocab_size=257 + 30)
    model = tiny_gpt2()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    flags = [f for f in flags if f != "n_layer=1,n_embd=32,n_head=2"]
    flags.remove("--config_overrides")
    flags[flags.index("--seq_length") + 1] = "16"  # the tiny model has 16 positions
    _, _, sparsity, _ = train_lm.parse_args(flags)
    assert sparsity.init == "magnitude"  # a pretrained model keeps its largest weights
    (sparse, dense) = train_lm.main(flags)
    assert sparse.density == pytest.approx(0.2, abs=1e-3) and dense.density == 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "sparse_momentum"], "unknown sparsity method 'sparse_momentum'"),
        (["--density", "1.5"], "density must be in (0, 1]"),
        (["--density", "0"], "density must be in (0, 1]"),
        (["--train_file", "/nonexistent/train.txt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(extra, message, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(_tiny_flags(tmp_path, tmp_path / "cache", *extra))
    text = str(exit_info.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text


def test_bad_text_files_are_one_line(text_files, tmp_path):
    train, _, cache = text_files
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 na\xefve\n".encode("latin-1"))
    for bad, message in ((empty, "is empty"), (latin1, "is not UTF-8")):
        for flags in (["--train_file", str(bad)], ["--train_file", str(train), "--validation_file", str(bad)]):
            with pytest.raises(SystemExit) as exit_info:
                train_lm.main(_tiny_flags(tmp_path / "out", cache, *flags))
            text = str(exit_info.value.code)
            assert text.startswith("error: ") and message in text and "\n" not in text


def test_resume_from_another_density_or_model_is_one_line(text_files, tmp_path):
    train, valid, cache = text_files
    data = ["--train_file", str(train), "--validation_file", str(valid), "--dense_baseline", "false"]
    train_lm.main(_tiny_flags(tmp_path / "a", cache, *data))
    checkpoint = str(tmp_path / "a" / "sparse" / "checkpoint-4")
    for extra, message in (
        (["--density", "0.5"], "was trained with density=0.2 but this run has density=0.5"),
        (["--config_overrides", "n_layer=1,n_embd=16,n_head=2"], "is from a different model"),
        (["--method", "dense"], "is from a sparse run but this run is dense"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            train_lm.main(_tiny_flags(tmp_path / "b", cache, *data, "--resume_from_checkpoint", checkpoint, *extra))
        text = str(exit_info.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, text
    with pytest.raises(SystemExit, match="resumes one run"):
        train_lm.main(_tiny_flags(tmp_path / "c", cache, *data[:4], "--resume_from_checkpoint", checkpoint))
    resumed = train_lm.main(_tiny_flags(tmp_path / "a", cache, *data, "--resume_from_checkpoint", "last",
                                        "--max_steps", "6"))
    # Step 2 updated in the first run (its step 4 was its last, at prune rate 0: no update); the resumed run's
    # schedule over 6 steps has its last update at step 4, already behind it, and none at 6 (rate 0).
    assert resumed[0].topology_updates == 1 and resumed[0].train_tokens == 6 * 16 * 32
    assert [record["step"] for record in resumed[0].density_history] == [0, 2]  # the history survived


def test_use_all_cores_undoes_the_launchers_single_thread(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        cores = len(os.sched_getaffinity(0))
        assert training.use_all_cores() == (cores if cores > 1 else None)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's choice is kept
        assert training.use_all_cores() is None
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cuda", [False, True])
def test_bf16_by_default_only_where_it_is_fast_and_never_over_the_users_choice(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(arguments, "has_fast_bf16", lambda device_type: True)
    on_cpu = [] if cuda else ["--use_cpu", "true"]
    assert arguments.with_default_precision(["--max_steps", "5"]) == ["--max_steps", "5", "--bf16", "true", *on_cpu]
    assert arguments.with_default_precision(["--use_cpu", "--x"]) == ["--use_cpu", "--x", "--bf16", "true"]
    for chosen in (["--bf16", "false"], ["--bf16=false"], ["--fp16"], ["--fp16", "true"]):
        assert arguments.with_default_precision(chosen) == chosen
    if not cuda:  # the training recipe keeps fp32 on CPU even where bf16 is fast
        assert arguments.with_default_precision(["--max_steps", "5"], bf16_on_cpu=False) == ["--max_steps", "5"]
    monkeypatch.setattr(arguments, "has_fast_bf16", lambda device_type: False)  # emulated bf16: slower, stay fp32
    assert arguments.with_default_precision(["--max_steps", "5"]) == ["--max_steps", "5"]


@pytest.mark.parametrize("device, bf16, expected", [("cuda", True, (8192, torch.bfloat16)),
                                                    ("cpu", True, (16 * 32, torch.float32))])
def test_kernel_line_times_the_training_dtype_at_8192_rows_or_more_on_a_gpu(monkeypatch, device, bf16, expected):
    from types import SimpleNamespace

    timed = {}
    monkeypatch.setattr(train_lm, "build_model", lambda model_args, tokenizer: torch.nn.Identity())
    monkeypatch.setattr(train_lm, "measure_kernel_speedup",
                        lambda model, tokens, dtype, **kwargs: timed.update(tokens=tokens, dtype=dtype))
    sparsity = train_lm.SparsityConfig(density=0.2, block_size=1)  # a fine-grained run: what blocks would gain
    training_args = SimpleNamespace(device=torch.device(device), per_device_train_batch_size=16, bf16=bf16, fp16=False)
    assert train_lm.kernel_speed_note(SimpleNamespace(seq_length=32), sparsity, training_args, None) is None
    assert (timed["tokens"], timed["dtype"]) == expected


def test_accelerate_launch_runs_the_recipe(text_files, tmp_path):
    train, valid, cache = text_files
    # The `accelerate` this interpreter installed (its venv may not be on PATH), as a user's shell would find it.
    launcher = Path(sys.executable).with_name("accelerate")
    command = [str(launcher) if launcher.exists() else "accelerate", "launch", str(RECIPE), *_tiny_flags(tmp_path, cache, "--train_file", str(train),
               "--validation_file", str(valid), "--dense_baseline", "false")]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| sparse" in done.stdout
    if len(os.sched_getaffinity(0)) > 1:
        assert "Training on the CPU with" in done.stdout
    assert "Traceback" not in done.stderr
    worrying = [line for line in done.stderr.splitlines() if "warn" in line.lower() and "accelerate launch" not in line
                and "To avoid this warning" not in line]
    assert not worrying, worrying


def test_block_sparse_run_says_which_path_ran_and_resumes(text_files, tmp_path):
    train, valid, cache = text_files
    flags = _tiny_flags(tmp_path, cache, "--train_file", str(train), "--validation_file", str(valid),
                        "--block_size", "16", "--dense_baseline", "false")
    (first,) = train_lm.main(flags)
    assert first.compute_path.startswith("block 16: ")
    assert first.density == pytest.approx(10 / 48)  # 48 blocks of 16x16 in the sparse layers, 20% rounded: 10
    assert first.nonzero_params < first.total_params
    assert "| path" in (tmp_path / "results.md").read_text()
    # resume the finished run for two more steps: live-block counts moved, the checkpoint still loads
    flags[flags.index("--max_steps") + 1] = "6"
    (resumed,) = train_lm.main(flags + ["--resume_from_checkpoint", "last"])
    assert resumed.train_tokens == 6 * 16 * 32 and resumed.density == pytest.approx(10 / 48)


def test_block_sparse_run_beside_fine_grained_and_dense_reports_speed_and_memory(text_files, tmp_path, capsys):
    train, valid, cache = text_files
    flags = _tiny_flags(tmp_path, cache, "--train_file", str(train), "--validation_file", str(valid),
                        "--block_size", "16", "--fine_grained_baseline", "true", "--eval_steps", "2")
    block, fine, dense = train_lm.main(flags)
    assert (block.run, fine.run, dense.run) == ("sparse", "fine-grained", "dense")
    assert block.compute_path.startswith("block 16: ") and fine.compute_path == "masked dense"
    assert dense.compute_path == "dense" and block.width == fine.width == dense.width == 32
    # the same linear layers counted in each row: 32x96, 32x32, 32x128, 128x32 at density 1 in the dense model
    assert dense.linear_nonzeros == 32 * (96 + 32 + 128 + 128)
    assert block.linear_nonzeros == 10 * 16 * 16 and fine.linear_nonzeros == pytest.approx(0.2 * dense.linear_nonzeros, abs=2)
    # live blocks only: weights, gradients and AdamW state shrink; fine-grained holds dense ones plus its masks
    assert block.training_state_bytes < dense.training_state_bytes < fine.training_state_bytes
    assert [step for step, _, _ in block.validation_history] == [2, 4]  # the curve in training.png
    assert [(step, loss) for step, _, loss in dense.loss_curve] == dense.loss_history
    assert all(seconds is not None and seconds > 0 for _, seconds, _ in dense.loss_curve)
    printed = capsys.readouterr().out
    assert "The sparse model (block 16: " in printed and "x the dense model's tokens/s" in printed
    assert "train memory" in printed.splitlines()[[i for i, line in enumerate(printed.splitlines())
                                                   if line.startswith("| run")][-1]]
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_width_multiplier_trains_a_wider_sparse_model_with_the_dense_models_linear_weights(text_files, tmp_path,
                                                                                             capsys):
    train, valid, cache = text_files
    flags = _tiny_flags(tmp_path, cache, "--train_file", str(train), "--validation_file", str(valid),
                        "--block_size", "16", "--width_multiplier", "2", "--density", "0.5", "--max_steps", "2")
    sparse, dense = train_lm.main(flags)
    assert (sparse.width, dense.width) == (64, 32)
    assert sparse.density == pytest.approx(0.125, abs=0.01)  # 0.5 / 2^2 per layer
    assert sparse.linear_nonzeros == dense.linear_nonzeros // 2  # --density of the base dense model's weights
    printed = capsys.readouterr().out
    assert "--width_multiplier 2: the sparse model is 2x wider" in printed


@pytest.mark.parametrize("flags, message", [
    (["--width_multiplier", "0.5"], "width_multiplier must be a number >= 1"),
    (["--width_multiplier", "1.25"], "not a whole number"),  # 2 heads x 1.25
    (["--width_multiplier", "2", "--method", "dense"], "--method dense trains none"),
    (["--width_multiplier", "2", "--density", "0.001"], "without a live"),
])
def test_width_multiplier_bad_combinations_fail_in_one_line(text_files, tmp_path, flags, message):
    train, valid, cache = text_files
    base = _tiny_flags(tmp_path, cache, "--train_file", str(train), "--validation_file", str(valid),
                       "--block_size", "16")
    with pytest.raises(SystemExit, match=message) as error:
        train_lm.main(base + flags)
    assert "\n" not in str(error.value)


def test_recipe_defaults_train_block_sparse_and_evaluate_for_the_curve(tmp_path):
    _, _, sparsity, training_args = train_lm.parse_args(["--output_dir", str(tmp_path)])
    assert sparsity.block_size == 32 and sparsity.density == 0.2 and not training_args.bf16  # fp32 on CPU
    assert training_args.eval_strategy == "steps" and training_args.eval_steps == 50


def test_warmup_is_a_fifth_of_the_run_by_default(tmp_path):
    def warmup_of(*flags):
        *_, training_args = train_lm.parse_args(["--output_dir", str(tmp_path), *flags])
        return training_args.get_warmup_steps(training_args.max_steps)  # what the Trainer's scheduler is built with

    assert warmup_of() == 60  # the default run: 60 of 300 steps (a fifth, as measured in docs/default_run.md)
    assert warmup_of("--max_steps", "40") == 8  # a short fine-tune reaches its peak learning rate
    assert warmup_of("--max_steps", "40", "--warmup_steps", "20") == 20  # a count is still a count


def test_a_warmup_as_long_as_the_run_is_warned_once_before_any_data_loads(tmp_path, capsys):
    def warning_for(*flags):
        return train_lm.warmup_warning(train_lm.parse_args(["--output_dir", str(tmp_path), *flags])[-1])

    assert warning_for() is None and warning_for("--max_steps", "100", "--warmup_steps", "99") is None
    assert warning_for("--max_steps", "100", "--warmup_steps", "0.99") is None  # 99 steps
    assert warning_for("--max_steps", "100", "--warmup_steps", "100") is not None  # the peak only at the very end
    with pytest.raises(SystemExit, match="does not exist"):  # the warning comes first, then the bad input stops it
        train_lm.main(_tiny_flags(tmp_path, tmp_path / "cache", "--train_file", "/nonexistent/train.txt",
                                  "--max_steps", "100", "--warmup_steps", "500"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --warmup_steps 500 warms up for 500 steps but the run has 100 (--max_steps): the learning rate rises "
        "all run to 0.0002, not --learning_rate 0.001, and never decays; pass a fraction of the run (e.g. "
        "--warmup_steps 0.2) or fewer steps."
    ]


class _Stop(Exception):
    """Raised by a patched step of the recipe: the run got that far."""


def _stop_at(monkeypatch, name):
    def stop(*args, **kwargs):
        raise _Stop(name)

    monkeypatch.setattr(training, name, stop)  # the steps of prepare_data (sparse_nlp.lm.training)


def test_a_sequence_length_the_corpus_cannot_hold_fails_in_one_line_with_the_largest_that_fits(
        text_files, tmp_path, monkeypatch):
    train, valid, cache = text_files
    monkeypatch.setattr(sequence_length, "available_memory", lambda device: 2**50)  # only the corpus limits here
    data = ["--train_file", str(train), "--validation_file", str(valid)]
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(_tiny_flags(tmp_path, cache, *data, "--seq_length", "100000"))
    text = str(exit_info.value.code)
    assert re.fullmatch(r"error: --seq_length 100000 leaves the (train|validation) split 0 sequence\(s\) of that "
                        r"length, fewer than .*; use --seq_length \d+ or less, or more text\.", text), text
    largest = int(re.search(r"use --seq_length (\d+)", text).group(1))
    _stop_at(monkeypatch, "pack_into_blocks")  # past the check: stop before packing and training
    with pytest.raises(_Stop):
        train_lm.main(_tiny_flags(tmp_path, cache, *data, "--seq_length", str(largest)))
    with pytest.raises(SystemExit, match=f"^error: --seq_length {largest + 1} leaves the "):
        train_lm.main(_tiny_flags(tmp_path, cache, *data, "--seq_length", str(largest + 1)))
    assert not (tmp_path / "sparse").exists()


def test_a_sequence_length_memory_cannot_hold_fails_in_one_line_before_tokenizing(text_files, tmp_path, monkeypatch):
    train, valid, cache = text_files
    monkeypatch.setattr(sequence_length, "available_memory", lambda device: 64 * 2**20)
    _stop_at(monkeypatch, "tokenize_texts")
    with pytest.raises(SystemExit) as exit_info:  # 16 x 100,000 tokens need GiB
        train_lm.main(_tiny_flags(tmp_path, cache, "--train_file", str(train), "--seq_length", "100000"))
    text = str(exit_info.value.code)
    assert re.fullmatch(r"error: --seq_length 100000 does not fit in memory: a training step of 16 sequences of "
                        r"100000 tokens needs about [\d.]+ GiB, the cpu has 0.1 GiB free; use --seq_length \d+ or "
                        r"less, or a smaller --per_device_train_batch_size\.", text), text
    largest = int(re.search(r"use --seq_length (\d+)", text).group(1))
    assert 32 < largest < 100000
    with pytest.raises(_Stop):  # the suggested length passes the memory check
        train_lm.main(_tiny_flags(tmp_path, cache, "--train_file", str(train), "--seq_length", str(largest)))


def test_validation_during_training_gives_a_curve_and_leaves_the_training_as_it_was(text_files, tmp_path):
    train, valid, cache = text_files
    flags = _tiny_flags(tmp_path / "plain", cache, "--train_file", str(train), "--validation_file", str(valid),
                        "--dense_baseline", "false")
    (plain,) = train_lm.main(flags + ["--eval_strategy", "no"])
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "evaluated")
    (evaluated,) = train_lm.main(flags + ["--eval_strategy", "steps", "--eval_steps", "2"])
    assert plain.validation_history == []
    assert [step for step, _, _ in evaluated.validation_history] == [2, 4]
    seconds = [s for _, s, _ in evaluated.validation_history]
    assert 0 < seconds[0] < seconds[1] <= evaluated.train_seconds
    assert all(1 < ppl < 300 for _, _, ppl in evaluated.validation_history)  # vocabulary 300
    assert evaluated.loss_history == plain.loss_history  # evaluating draws no randomness and changes no weight
    assert evaluated.val_perplexity == plain.val_perplexity
