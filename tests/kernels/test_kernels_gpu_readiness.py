"""Defects a first GPU user would hit, pinned on the CPU: TF32 reading, CUDA dispatch, strided bias, the launch
grid, pipelining at block 128 (the compiled-kernel tests themselves are in test_kernels_cuda.py)."""
import os
import subprocess
import sys

import pytest
import torch
from kernel_cases import TOL, make_case, make_layout

from sparse_nlp.kernels import dds, resolve_backend
from sparse_nlp.kernels.backends.triton import launchers
from sparse_nlp.kernels.testing.reference import reference_dds

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)"
)


def test_tf32_is_read_without_mixing_torchs_precision_apis():
    # transformers' --tf32 sets the new fp32_precision API; after that torch raises on the legacy readers. Run in
    # a fresh process: the "mixed APIs" state cannot be undone in this one.
    script = """
import torch
from sparse_nlp.kernels.backends.triton import launchers
launchers.interpreting = lambda: False  # the compiled-kernel path, where fp32 follows torch's TF32 setting
matmul = torch.backends.cuda.matmul
set_tf32 = lambda on: setattr(matmul, "fp32_precision", "tf32" if on else "ieee")
set_tf32(True)
assert launchers.tf32_enabled() and launchers._input_precision(torch.float32) == "tf32"
set_tf32(False)
assert not launchers.tf32_enabled() and launchers._input_precision(torch.float32) == "ieee"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_cuda_dispatch_falls_back_where_triton_cannot_win_or_run():
    cuda = torch.device("cuda")
    sparse, dense = make_layout("random", 128, 128, 32), make_layout("dense", 128, 128, 32)
    assert resolve_backend(None, cuda, sparse, torch.bfloat16) == "triton"
    assert resolve_backend(None, cuda, dense, torch.bfloat16) == "dense"  # density 1.0: cuBLAS
    assert resolve_backend(None, cuda, sparse, torch.float64) == "dense"  # no fp64 kernels: cuBLAS, not an error


@interpreted
def test_triton_forward_takes_a_strided_bias():
    x, _, bias, w = make_case(40, 64, 96, 32)
    strided = torch.stack([bias, -bias], dim=1)[:, 0]  # stride 2
    assert not strided.is_contiguous()
    got = dds(x, w, True, strided, backend="triton")
    torch.testing.assert_close(got, reference_dds(x, w, True, bias), **TOL[torch.float32])


def test_dds_grid_puts_all_tiles_on_axis_0():
    # 70,000 M tiles of 128 rows: more than grid axes 1 and 2 allow (65,535)
    grid = launchers.dds_grid(70_000 * 128, 768, 64, 128)
    assert grid == (12 * 70_000,) and grid[0] < 2**31


def test_fp32_block_128_is_pipelined_where_shared_memory_allows(monkeypatch):
    monkeypatch.setattr(launchers, "_shared_memory_bytes", lambda device: 227 * 1024 - 8 * 1024)  # H100 / H200
    _, _, stages = launchers._dds_tiles(128, torch.float32, torch.device("cuda"))
    assert stages >= 2
