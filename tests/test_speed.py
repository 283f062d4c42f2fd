"""The recipe's kernel-speed line: measured on a model's own layer shapes, None when no layer fits the block."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_nlp.lm.speed import kernel_speed_settings, measure_kernel_speedup


def _gpt2(width: int) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=width, n_head=2, vocab_size=64, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))


def test_speedup_is_measured_on_the_models_block_divisible_layers():
    speed = measure_kernel_speedup(_gpt2(64), tokens=64, density=0.5, block_size=16, repeats=2)
    assert speed is not None and speed.speedup > 0
    assert (speed.density, speed.block_size, speed.tokens) == (0.5, 16, 64)
    assert "block 16, density 0.5" in speed.describe() and "--block_size 16" in speed.describe()
    from sparse_nlp.kernels import cpu_native

    assert speed.backend == ("native" if cpu_native.available() else "torch")  # the path that was timed
    assert f"{speed.backend} path" in speed.describe()


def test_no_line_when_no_layer_divides_by_the_block():
    assert measure_kernel_speedup(_gpt2(40), tokens=32, density=0.5, block_size=64, repeats=1) is None


def test_a_gpu_times_the_training_dtype_at_no_fewer_than_8192_rows_and_a_cpu_fp32_at_the_runs_rows():
    assert kernel_speed_settings("cuda", 1536, bf16=True) == (8192, torch.bfloat16)
    assert kernel_speed_settings(torch.device("cuda", 0), 16384, fp16=True) == (16384, torch.float16)
    assert kernel_speed_settings("cuda", 1536) == (8192, torch.float32)
    assert kernel_speed_settings(torch.device("cpu"), 1536, bf16=True) == (1536, torch.float32)  # as before


def test_the_kernel_line_says_the_dtype_and_rows_it_timed():
    speed = measure_kernel_speedup(_gpt2(64), tokens=48, density=0.5, block_size=16, repeats=1, dtype=torch.bfloat16)
    assert speed.dtype == torch.bfloat16 and "48 tokens, bfloat16" in speed.describe()
