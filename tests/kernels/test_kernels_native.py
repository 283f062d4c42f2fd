"""The compiled CPU kernels: built into a cache at first use, held against the reference on the shapes that
exercise their tiling (rows not a multiple of the 6-row tile, dW split between threads), strided operands, and
the fallback to the torch path where they cannot be built."""
import platform

import pytest
import torch
from kernel_cases import make_case

from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix, block_sparse_linear, dds, resolve_backend, sdd
from sparse_nlp.kernels.backends.native import build as native_build
from sparse_nlp.kernels.backends.native import products as native
from sparse_nlp.kernels.testing.reference import reference_dds, reference_linear, reference_sdd

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache and a forgotten library; the real one is reloaded afterwards."""
    monkeypatch.setenv(native_build.CACHE_ENV, str(tmp_path))
    native_build.reset_native_cache()
    yield tmp_path
    monkeypatch.undo()
    native_build.reset_native_cache()


def test_builds_once_into_the_cache(fresh_build):
    if native_build.load_native() is None:
        pytest.skip(native_build.native_unavailable_reason())
    built = list(fresh_build.glob("cpu_kernels-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob("*.so.*")) and len(list(fresh_build.iterdir())) == 1
    assert native_build.load_native().sparse_nlp_vector_width() in (8, 16)
    stamp = built[0].stat().st_mtime_ns
    native_build.reset_native_cache()
    assert native_build.load_native() is not None and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_failing_compiler_falls_back_to_the_torch_path(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", "false")  # exists, exits 1
    assert native_build.load_native() is None
    assert "compiling cpu_kernels.c failed" in native_build.native_unavailable_reason()
    assert not list(fresh_build.glob("*.so")) and not list(fresh_build.glob("tmp*"))  # no half-written library left
    layout = BlockSparseLayout.random((64, 64), 16, 0.125)
    with pytest.warns(UserWarning, match="native CPU kernels unavailable"):
        assert resolve_backend(None, torch.device("cpu"), layout, torch.float32) == "torch"
    with pytest.raises(ValueError, match="backend='native' is unavailable here: compiling"):
        resolve_backend("native", torch.device("cpu"), layout, torch.float32)
    x, _, bias, w = make_case(40, 64, 48, 16)
    with pytest.warns(UserWarning, match="native CPU kernels unavailable"):
        torch.testing.assert_close(block_sparse_linear(x, w, bias), reference_linear(x, w, bias))


def test_disabled_by_environment(fresh_build, monkeypatch, recwarn):
    monkeypatch.setenv(native_build.DISABLE_ENV, "0")
    assert native_build.load_native() is None
    assert "disabled by SPARSE_NLP_NATIVE=0" in native_build.native_unavailable_reason()
    layout = BlockSparseLayout.random((64, 64), 16, 0.125)
    assert resolve_backend(None, torch.device("cpu"), layout, torch.float32) == "torch"
    assert not [w for w in recwarn if "native" in str(w.message)]  # asked for: no warning


def test_native_backend_rejects_other_devices_and_dtypes():
    layout = BlockSparseLayout.random((64, 64), 16, 0.125)
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        resolve_backend("native", torch.device("cuda"), layout, torch.float32)
    with pytest.raises(ValueError, match="supports"):
        resolve_backend("native", torch.device("cpu"), layout, torch.float64)


@needs_native
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 6, 97, 600])
def test_products_over_tile_edges(block, m):
    # rows: below, at and past the 6-row tile and the 96-row copy chunk; 600 > the 512-row task chunk
    x, dy, bias, w = make_case(m, 2 * block, 3 * block, block)
    torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
    torch.testing.assert_close(dds(dy, w, False, backend="native"), reference_dds(dy, w, False), **TOL)
    got = sdd(dy.t(), x, w.layout, backend="native").values
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 flags")
def test_eight_wide_build_without_avx512(fresh_build, monkeypatch):
    """The code a CPU without AVX-512 gets (8-wide vectors, 6 x 16 tiles), built here by switching AVX-512 off."""
    monkeypatch.setenv(native_build.EXTRA_FLAGS_ENV, "-mno-avx512f")
    lib = native_build.load_native()
    if lib is None:
        pytest.skip(native_build.native_unavailable_reason())
    assert lib.sparse_nlp_vector_width() == 8
    for block in (16, 32, 64, 128):
        x, dy, bias, w = make_case(97, 2 * block, 3 * block, block)
        torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
        torch.testing.assert_close(dds(dy, w, False, backend="native"), reference_dds(dy, w, False), **TOL)
        got = sdd(dy.t(), x, w.layout, backend="native").values
        torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, rtol=1e-4, atol=1e-3)


@needs_native
def test_no_rows_gives_zero_gradients_and_empty_outputs():
    x, dy, bias, w = make_case(0, 64, 32, 16)
    assert dds(x, w, True, bias, backend="native").shape == (0, 64)
    got = sdd(dy.t(), x, w.layout, backend="native").values
    assert got.shape == w.values.shape and not got.any()


@needs_native
def test_strided_operands():
    x, dy, bias, w = make_case(70, 64, 96, 32)
    wide = torch.randn(70, 200)
    wide[:, 50:146] = x
    x_view = wide[:, 50:146]  # rows padded: row stride 200, not 96
    torch.testing.assert_close(dds(x_view, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
    x_t = x.t().contiguous().t()  # column-major: copied to rows first
    torch.testing.assert_close(dds(x_t, w, True, None, backend="native"), reference_dds(x, w, True), **TOL)
    dy_rows = dy.contiguous()
    got = sdd(dy_rows.t(), x_t, w.layout, backend="native").values
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, rtol=1e-4, atol=1e-3)
    got = sdd(dy.t().contiguous(), x, w.layout, backend="native").values  # a's rows are dY's columns
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, rtol=1e-4, atol=1e-3)


@needs_native
def test_training_step_matches_the_torch_path():
    x, dy, bias, w = make_case(300, 128, 192, 64, kind="empty_row")
    grads = {}
    for backend in ("native", "torch"):
        values = torch.nn.Parameter(w.values.clone())
        b = torch.nn.Parameter(bias.clone())
        xin = x.clone().requires_grad_()
        y = block_sparse_linear(xin, BlockSparseMatrix(values, w.layout), b, backend=backend)
        y.backward(dy)
        grads[backend] = (y.detach(), xin.grad, values.grad, b.grad)
    for got, want in zip(grads["native"], grads["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
