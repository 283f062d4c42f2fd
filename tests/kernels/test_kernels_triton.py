"""The Triton kernels under TRITON_INTERPRET=1 (set by tests/conftest.py) against the pure-torch reference."""
import os

import pytest
import torch
from kernel_cases import LAYOUTS, SIZE_IDS, SIZES, TOL, make_case

from sparse_nlp.kernels import BlockSparseMatrix, block_sparse_linear, dds, dsd, sdd
from sparse_nlp.kernels.backends.triton import launchers
from sparse_nlp.kernels.testing.reference import reference_dds, reference_linear, reference_sdd

interpreted = pytest.mark.skipif(  # CPU tensors through the interpreter; on a GPU see test_kernels_cuda.py
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)"
)
pytestmark = interpreted


def _three_products(x, dy, bias, w, backend):
    y = dds(x, w, transpose_b=True, bias=bias, backend=backend)
    dx = dds(dy, w, transpose_b=False, backend=backend)
    dw = sdd(dy.t(), x, w.layout, backend=backend).values
    return y, dx, dw


def _check_against_reference(x, dy, bias, w, backend="triton"):
    y, dx, dw = _three_products(x, dy, bias, w, backend)
    tol = TOL[x.dtype]
    torch.testing.assert_close(y, reference_dds(x, w, True, bias), **tol)
    torch.testing.assert_close(dx, reference_dds(dy, w, False), **tol)
    torch.testing.assert_close(dw, reference_sdd(dy.t(), x, w.layout).values, **tol)


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_triton_fp32_products_match_reference(size, kind):
    _check_against_reference(*make_case(*size, kind=kind))


@pytest.mark.parametrize("size", SIZES, ids=SIZE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_precision_products_match_reference(size, dtype):
    _check_against_reference(*make_case(*size, kind="empty_row", dtype=dtype))


def test_triton_sdd_split_reduction_sums_partials():
    x, dy, _, w = make_case(300, 64, 96, 32, dtype=torch.bfloat16)
    split = launchers.sdd(dy.t(), x, w.layout, num_splits=3)  # 3 ranges of M, fp32 partials summed
    torch.testing.assert_close(split, reference_sdd(dy.t(), x, w.layout).values, **TOL[torch.bfloat16])


def test_triton_strided_inputs_and_dsd():
    x, dy, _, w = make_case(40, 64, 96, 32)
    xt = x.t().contiguous().t()  # column-major x: the kernels take any strides
    torch.testing.assert_close(dds(xt, w, True, backend="triton"), reference_dds(x, w, True), **TOL[x.dtype])
    y_t = dsd(w, x.t(), backend="triton")  # W @ X^T = Y^T
    torch.testing.assert_close(y_t, reference_dds(x, w, True).t(), **TOL[x.dtype])


def test_triton_linear_forward_backward_with_batch_dims():
    x, dy, bias, w = make_case(2 * 19, 64, 48, 16, kind="empty_row")
    x = x.view(2, 19, 48).requires_grad_()
    values = w.values.clone().requires_grad_()
    bias = bias.clone().requires_grad_()
    w = BlockSparseMatrix(values, w.layout)
    y = block_sparse_linear(x, w, bias, backend="triton")
    y.backward(dy.view(2, 19, 64))
    got = (y, x.grad, values.grad, bias.grad)
    for t in (x, values, bias):
        t.grad = None
    y_ref = reference_linear(x, w, bias)
    y_ref.backward(dy.view(2, 19, 64))
    want = (y_ref, x.grad, values.grad, bias.grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
