"""The CPU paths ("native": compiled kernels, "torch": blocked gathered GEMMs, "dense": masked dense) against the
reference, gradcheck in float64, and the automatic dispatch that must never hand CPU tensors to Triton.
The native build itself (cache, fallback, strides) is tested in test_kernels_native.py."""
import pytest
import torch
from kernel_cases import LAYOUTS, SIZE_IDS, SIZES, TOL, make_case, make_layout

from sparse_nlp.kernels import (
    DENSE_THRESHOLD,
    NATIVE_DENSE_THRESHOLD,
    BlockSparseLayout,
    BlockSparseMatrix,
    block_sparse_linear,
    dds,
    dsd,
    resolve_backend,
    sdd,
)
from sparse_nlp.kernels.backends.native import products as native
from sparse_nlp.kernels.testing.reference import reference_dds, reference_linear, reference_sdd

CPU_BACKENDS = ["native", "torch", "dense"]


def skip_without_native(backend):
    if backend == "native" and not native.available():
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_products_match_reference(backend, size, kind, dtype):
    skip_without_native(backend)
    x, dy, bias, w = make_case(*size, kind=kind, dtype=dtype)
    if backend == "native" and dtype != torch.float32:
        with pytest.raises(ValueError, match="backend='native' supports"):
            dds(x, w, True, bias, backend=backend)
        return
    tol = TOL[dtype]
    torch.testing.assert_close(dds(x, w, True, bias, backend=backend), reference_dds(x, w, True, bias), **tol)
    torch.testing.assert_close(dds(dy, w, False, backend=backend), reference_dds(dy, w, False), **tol)
    got = sdd(dy.t(), x, w.layout, backend=backend).values
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, **tol)


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cpu_blocked_path_with_many_row_chunks_on_the_thread_pool(backend, two_threads):
    # M > 1024 rows and several block-rows: tasks run on the pool (torch: one BLAS thread each; native: dW's rows
    # split between the threads and summed)
    skip_without_native(backend)
    x, dy, bias, w = make_case(2600, 96, 64, 16, kind="empty_row")
    torch.testing.assert_close(dds(x, w, True, bias, backend=backend), reference_dds(x, w, True, bias))
    torch.testing.assert_close(dds(dy, w, False, backend=backend), reference_dds(dy, w, False))
    got = sdd(dy.t(), x, w.layout, backend=backend).values
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_dsd_is_the_transposed_dds(backend):
    skip_without_native(backend)
    x, _, _, w = make_case(40, 64, 96, 32)
    torch.testing.assert_close(dsd(w, x.t(), backend=backend), reference_dds(x, w, True).t())
    b = torch.randn(64, 7)
    torch.testing.assert_close(dsd(w, b, transpose_a=True, backend=backend), w.to_dense().t() @ b)


@pytest.fixture
def one_thread():  # gradcheck makes hundreds of tiny calls: OpenMP team start-up would dominate
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("backend", ["torch", "dense"])
@pytest.mark.parametrize("kind", ["random", "empty_row"])
def test_gradcheck_float64(backend, kind, one_thread):
    x, _, bias, w = make_case(4, 32, 48, 16, kind=kind, dtype=torch.float64)
    x = x.view(2, 2, 48).requires_grad_()
    values = w.values.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    fn = lambda x, v, b: block_sparse_linear(x, BlockSparseMatrix(v, w.layout), b, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values, bias))


def test_gradients_reach_a_parameter_and_match_reference():
    x, dy, bias, w = make_case(3 * 11, 64, 96, 32, kind="empty_row")
    values = torch.nn.Parameter(w.values.clone())
    weight = BlockSparseMatrix(values, w.layout)
    x = x.view(3, 11, 96).requires_grad_()
    block_sparse_linear(x, weight).backward(dy.view(3, 11, 64))  # automatic backend on CPU
    got = (x.grad.clone(), values.grad.clone())
    x.grad = values.grad = None
    reference_linear(x, weight).backward(dy.view(3, 11, 64))
    torch.testing.assert_close(got[0], x.grad, **TOL[torch.float32])
    torch.testing.assert_close(got[1], values.grad, **TOL[torch.float32])


def test_no_grad_needed_for_x_or_bias():
    x, _, _, w = make_case(9, 64, 48, 16)
    values = w.values.clone().requires_grad_()
    block_sparse_linear(x, BlockSparseMatrix(values, w.layout)).sum().backward()
    assert values.grad is not None and values.grad.shape == values.shape


def test_auto_dispatch_never_sends_cpu_tensors_to_triton(monkeypatch):
    sparse, dense = BlockSparseLayout.random((64, 640), 32, 0.1), make_layout("dense", 64, 640, 32)
    assert sparse.density <= min(DENSE_THRESHOLD[32], NATIVE_DENSE_THRESHOLD[32])
    assert dense.density > max(DENSE_THRESHOLD[32], NATIVE_DENSE_THRESHOLD[32])
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu, sparse, torch.float32) == ("native" if native.available() else "torch")
    assert resolve_backend(None, cpu, sparse, torch.bfloat16) == "torch"  # the native kernels are fp32
    assert resolve_backend(None, cpu, sparse, torch.float64) == "torch"
    assert resolve_backend(None, cpu, dense) == "dense"
    assert resolve_backend(None, torch.device("cuda"), sparse) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' got cpu tensors"):
        resolve_backend("triton", torch.device("cpu"), sparse)
    x, _, _, w = make_case(9, 64, 48, 16)
    torch.testing.assert_close(block_sparse_linear(x, w), reference_linear(x, w))  # no Triton involved


def test_cpu_block_loops_compile_with_torchscript():
    """The per-block loops run as TorchScript (no GIL between GEMMs); a change TorchScript cannot take must fail
    here rather than silently fall back to the slower Python loop."""
    from sparse_nlp.kernels.backends import torch_blocked

    if not hasattr(torch.jit, "script"):
        pytest.skip("this torch has no TorchScript")
    assert isinstance(torch_blocked._dds_output_blocks_compiled, torch.jit.ScriptFunction)
    assert isinstance(torch_blocked._sdd_block_row_compiled, torch.jit.ScriptFunction)


@pytest.mark.parametrize("backend", ["torch", "dense"])
def test_autocast_computes_in_its_dtype_and_grads_reach_fp32_parameters(backend):
    """The Trainer's --bf16: fp32 values and bias, inputs from autocast'd neighbours in bf16 or fp32."""
    x, dy, bias, w = make_case(1100, 128, 96, 32)
    values = w.values.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    for x_in in (x.detach().clone(), x.detach().bfloat16()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block_sparse_linear(x_in, BlockSparseMatrix(values, w.layout), bias, backend=backend)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), reference_linear(x, w, bias), rtol=3e-2, atol=3e-2)
        values.grad = bias.grad = None
        y.backward(dy.bfloat16())
        assert values.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
        torch.testing.assert_close(bias.grad, dy.sum(0), rtol=3e-2, atol=3e-1)
