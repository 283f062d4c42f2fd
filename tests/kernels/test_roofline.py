"""The roofline arithmetic of bench_kernels.py, checked on known numbers (the H200 baseline's rates and shapes)."""
import pytest
import torch

from sparse_nlp.kernels.roofline import Machine, floor_seconds, measure_machine, op_bytes, op_flops, percent_of_floor

H200 = Machine(bandwidth=4.3e12, peak=790e12)  # docs: what one H200 measured in bf16


def test_bytes_are_the_activations_read_once_and_written_once():
    # 768->3072, M = 32,768, bf16: X [M, 768] and Y [M, 3072] (fwd), dY and dX (dX), dY and X (dW)
    for op in ("fwd", "dX", "dW"):
        assert op_bytes(op, 32768, 768, 3072, 2) == 32768 * (768 + 3072) * 2 == 251_658_240
    assert op_flops("fwd", 32768, 768, 3072) == 2 * 32768 * 3072 * 768
    assert op_flops("dW", 32768, 768, 3072, density=0.2) == pytest.approx(0.2 * 2 * 32768 * 3072 * 768)


def test_sparse_ops_are_memory_bound_and_cublas_compute_bound():
    ours = floor_seconds("fwd", 32768, 768, 3072, 0.2, 2, H200)
    assert ours == pytest.approx(251_658_240 / 4.3e12)  # 0.0585 ms: bytes, not FLOPs (0.039 ms), set it
    dense = floor_seconds("fwd", 32768, 768, 3072, 1.0, 2, H200)
    assert dense == pytest.approx(2 * 32768 * 3072 * 768 / 790e12)  # 0.196 ms: FLOPs set it
    assert percent_of_floor(0.141e-3, ours) == pytest.approx(41.5, abs=0.1)  # the baseline's 42% row
    assert percent_of_floor(ours, ours) == 100.0
    assert "4.30 TB/s" in H200.describe() and "790 TFLOP/s" in H200.describe()


def test_unknown_op_and_cpu_device_are_refused():
    with pytest.raises(ValueError, match="unknown op"):
        op_bytes("bwd", 1, 1, 1, 2)
    with pytest.raises(ValueError, match="unknown op"):
        op_flops("bwd", 1, 1, 1)
    with pytest.raises(ValueError, match="CUDA device"):
        measure_machine(torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures a GPU")
def test_machine_rates_are_measured_on_the_gpu():
    machine = measure_machine(torch.device("cuda"), torch.bfloat16)
    assert 1e11 < machine.bandwidth < 1e14 and 1e12 < machine.peak < 1e16
