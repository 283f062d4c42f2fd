"""The recipe's kernel-speed line: measured on a model's own layer shapes, None when no layer fits the block.

No assertion here is about real wall-clock speed: the clock is replaced by scripted times wherever a number is
checked, so what is tested is which layers are timed, on what, and the arithmetic that turns times into the ratio.
"""
from __future__ import annotations

import statistics
import types

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_nlp.kernels import BlockSparseLayout, resolve_backend
from sparse_nlp.lm import speed as speed_module
from sparse_nlp.lm.speed import GPU_MIN_TOKENS, kernel_speed_settings, measure_kernel_speedup


def _gpt2(width: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def _mlp() -> nn.Module:
    """Block 32: shapes (in, out) (32, 64) once, (64, 64) twice; (64, 40) does not divide and is left out."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 40))


def _scripted_times(k: int, n: int) -> tuple[float, float]:
    """(dense s, sparse s) a fake clock gives the layer shape (in k, out n): different ratios per shape, so that
    weighting by count changes the result."""
    return {(32, 64): (3.0, 1.0), (64, 64): (5.0, 4.0)}[(k, n)]


def test_the_ratio_is_count_weighted_dense_over_sparse_medians_and_each_side_times_the_same_weights(monkeypatch):
    """Each distinct block-divisible shape is timed once, dense against block-sparse on the same input, bias and
    weight (the sparse side holds the dense weight's live blocks at the asked density); the ratio is the sum over
    layers of dense medians over the sum of sparse medians."""
    dense_calls, sparse_calls, timed = [], [], []
    real_block_sparse_linear = speed_module.block_sparse_linear

    def dense_linear(x, weight, bias):
        dense_calls.append((x, weight, bias))
        return torch.nn.functional.linear(x, weight, bias)

    def sparse_linear(x, sparse, bias):
        sparse_calls.append((x, sparse, bias))
        return real_block_sparse_linear(x, sparse, bias)

    def fake_median_seconds(fns, repeats, device=torch.device("cpu")):
        assert repeats == 3 and device == torch.device("cpu")
        dense_step, sparse_step = fns
        dense_step()  # each side runs for real once, so that the arguments it times are recorded
        sparse_step()
        (x, weight, bias), (x_sparse, sparse, bias_sparse) = dense_calls[-1], sparse_calls[-1]
        assert x_sparse is x and bias_sparse is bias
        n, k = weight.shape
        assert x.shape == (48, k) and sparse.shape == (n, k)
        blocks = sparse.layout.block_mask()
        assert blocks.sum().item() == max(1, round(0.5 * blocks.numel()))  # the asked density, in whole blocks
        live = blocks.repeat_interleave(32, 0).repeat_interleave(32, 1)
        torch.testing.assert_close(sparse.to_dense(), torch.where(live, weight.detach(), torch.zeros(())))
        timed.append((k, n))
        return list(_scripted_times(k, n))

    monkeypatch.setattr(speed_module, "F", types.SimpleNamespace(linear=dense_linear))
    monkeypatch.setattr(speed_module, "block_sparse_linear", sparse_linear)
    monkeypatch.setattr(speed_module, "_median_seconds", fake_median_seconds)
    speed = measure_kernel_speedup(_mlp(), tokens=48, density=0.5, block_size=32, repeats=3)

    assert timed == [(32, 64), (64, 64)]  # once per distinct shape, in model order; (64, 40) left out
    assert speed.speedup == pytest.approx((1 * 3.0 + 2 * 5.0) / (1 * 1.0 + 2 * 4.0))  # 13 / 9, not mean(3, 1.25)
    assert (speed.density, speed.block_size, speed.tokens, speed.dtype) == (0.5, 32, 48, torch.float32)
    assert "1.44x dense" in speed.describe()


def test_median_seconds_warms_each_up_untimed_then_times_them_interleaved_and_takes_medians(monkeypatch):
    log, clock = [], iter([5.0, 2.0, 1.0, 9.0, 3.0, 4.0])  # scripted: a, b, a, b, a, b

    def fake_seconds(fn, device):
        fn()
        log.append("timed")
        return next(clock)

    monkeypatch.setattr(speed_module, "_seconds", fake_seconds)
    medians = speed_module._median_seconds([lambda: log.append("a"), lambda: log.append("b")], repeats=3)
    assert log == ["a", "b"] + ["a", "timed", "b", "timed"] * 3
    assert medians == [statistics.median([5.0, 1.0, 3.0]), statistics.median([2.0, 9.0, 4.0])] == [3.0, 4.0]


def test_a_cpu_sample_is_the_perf_counter_difference_around_one_call(monkeypatch):
    calls = []
    clock = iter([10.0, 10.25])
    monkeypatch.setattr(speed_module, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert speed_module._seconds(lambda: calls.append(1), torch.device("cpu")) == 0.25
    assert calls == [1]


def test_a_real_measurement_names_the_settings_and_the_path_it_timed():
    speed = measure_kernel_speedup(_gpt2(64), tokens=64, density=0.5, block_size=16, repeats=1)
    assert (speed.density, speed.block_size, speed.tokens) == (0.5, 16, 64)
    assert "block 16, density 0.5" in speed.describe() and "--block_size 16" in speed.describe()
    layout = BlockSparseLayout.random((64, 64), 16, 0.5)
    assert speed.backend == resolve_backend(None, torch.device("cpu"), layout, torch.float32)  # the path timed
    assert f"{speed.backend} path" in speed.describe()


def test_no_line_when_no_layer_divides_by_the_block():
    assert measure_kernel_speedup(_gpt2(40), tokens=32, density=0.5, block_size=64, repeats=1) is None


def test_a_gpu_times_the_training_dtype_at_no_fewer_than_8192_rows_and_a_cpu_fp32_at_the_runs_rows():
    assert GPU_MIN_TOKENS == 8192  # the module's docstring and docs/kernels.md say 8,192
    assert kernel_speed_settings("cuda", 1536, bf16=True) == (8192, torch.bfloat16)
    assert kernel_speed_settings(torch.device("cuda", 0), 16384, fp16=True) == (16384, torch.float16)
    assert kernel_speed_settings("cuda", 1536) == (8192, torch.float32)
    assert kernel_speed_settings(torch.device("cpu"), 1536, bf16=True) == (1536, torch.float32)  # as before


def test_the_kernel_line_says_the_dtype_and_rows_it_timed():
    speed = measure_kernel_speedup(_gpt2(64), tokens=48, density=0.5, block_size=16, repeats=1, dtype=torch.bfloat16)
    assert speed.dtype == torch.bfloat16 and "48 tokens, bfloat16" in speed.describe()
