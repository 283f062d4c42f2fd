"""The roofline arithmetic of bench_kernels.py (benchmarks/roofline.py): exact floors of small cases worked out by
hand, the regime each one is in, and on a GPU that no measured GEMM beats the floor it is held to."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "roofline.py"
_spec = importlib.util.spec_from_file_location("benchmarks_roofline", _PATH)
roofline = sys.modules["benchmarks_roofline"] = importlib.util.module_from_spec(_spec)  # (its dataclass looks it up)
_spec.loader.exec_module(roofline)
Machine, floor_seconds, op_bytes, op_flops = roofline.Machine, roofline.floor_seconds, roofline.op_bytes, roofline.op_flops


def test_a_small_layer_by_hand():
    # x [8, 32], W [64, 32] in 16-blocks at density 0.25 (2 of 8 blocks live), fp32 (4 bytes).
    # Bytes: one [M, K] and one [M, N] tensor per op, weights left out: 8 * 32 * 4 + 8 * 64 * 4 = 1024 + 2048.
    # FLOPs: 2 M N K = 2 * 8 * 64 * 32 = 32768 dense; a quarter of that on the live blocks.
    for op in ("fwd", "dX", "dW"):
        assert op_bytes(op, 8, 32, 64, 4) == 3072
        assert op_flops(op, 8, 32, 64) == 32768
        assert op_flops(op, 8, 32, 64, density=0.25) == 8192
    # On a machine of 1,000 B/s and 10,000 FLOP/s the sparse op moves bytes for 3.072 s and computes for 0.8192 s:
    # memory-bound, floor 3.072 s. Dense computes for 3.2768 s, longer than its 3.072 s of bytes: compute-bound.
    toy = Machine(bandwidth=1e3, peak=1e4)
    assert floor_seconds("fwd", 8, 32, 64, 0.25, 4, toy) == pytest.approx(3.072)
    assert floor_seconds("fwd", 8, 32, 64, 1.0, 4, toy) == pytest.approx(3.2768)
    assert roofline.percent_of_floor(6.144, 3.072) == pytest.approx(50.0)  # twice the floor: 50%


def test_gpt2_mlp_on_an_h200_by_hand():
    # 768 -> 3072, M = 32,768, bf16, at the rates one H200 measured (4.3 TB/s, 790 TFLOP/s).
    h200 = Machine(bandwidth=4.3e12, peak=790e12)
    assert op_bytes("fwd", 32768, 768, 3072, 2) == 32768 * (768 + 3072) * 2 == 251_658_240
    # density 0.2: bytes 58.5 us, FLOPs 2 * 32768 * 3072 * 768 * 0.2 / 790e12 = 39.1 us: the bytes set the floor
    assert floor_seconds("fwd", 32768, 768, 3072, 0.2, 2, h200) == pytest.approx(251_658_240 / 4.3e12)
    # dense: FLOPs 195.7 us against 58.5 us of bytes: the FLOPs set it
    assert floor_seconds("fwd", 32768, 768, 3072, 1.0, 2, h200) == pytest.approx(2 * 32768 * 3072 * 768 / 790e12)
    assert "4.30 TB/s" in h200.describe() and "790 TFLOP/s" in h200.describe()


def test_unknown_op_and_cpu_device_are_refused():
    with pytest.raises(ValueError, match="unknown op"):
        op_bytes("bwd", 1, 1, 1, 2)
    with pytest.raises(ValueError, match="unknown op"):
        op_flops("bwd", 1, 1, 1)
    with pytest.raises(ValueError, match="CUDA device"):
        roofline.measure_machine(torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a GPU")
def test_no_measured_gemm_beats_its_floor():
    """The floor is a floor: cuBLAS on GPT-2's MLP shape (another shape than the 8192^3 GEMM the peak comes from)
    takes at least its floor on the rates just measured, within 10% for clock and timing noise."""
    device = torch.device("cuda")
    machine = roofline.measure_machine(device, torch.bfloat16)
    m, k, n = 16384, 768, 3072
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    seconds = roofline._gpu_median_seconds(lambda: x @ w.t())
    floor = floor_seconds("fwd", m, k, n, 1.0, 2, machine)
    assert roofline.percent_of_floor(seconds, floor) <= 110.0
