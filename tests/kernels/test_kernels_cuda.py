"""The compiled Triton kernels on a CUDA GPU (tests/conftest.py leaves TRITON_INTERPRET unset there), against the
pure-torch reference: fp32/fp16/bf16, blocks 16-128, M >= 2048 and not a multiple of the tile, dsd's transposed
output, the split-M dW reduction, and offsets past 2^31. Skipped where there is no GPU."""
import os

import pytest
import torch
from kernel_cases import TOL, make_case

from sparse_nlp.kernels import BlockSparseMatrix, block_sparse_linear, dds, dsd, sdd
from sparse_nlp.kernels.backends.triton import launchers
from sparse_nlp.kernels.testing.reference import reference_dds, reference_linear, reference_sdd

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs the compiled kernels only"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# GPU tolerances: fp32 may run on TF32 tensor cores when torch's own matmuls do.
CUDA_TOL = {torch.float32: dict(rtol=2e-2, atol=2e-2), torch.float16: TOL[torch.float16],
            torch.bfloat16: TOL[torch.bfloat16]}


def _on_gpu(*tensors):
    return [t.to("cuda") for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("m", [2048 + 37, 4099])
def test_compiled_products_match_reference(dtype, block, m):
    x, dy, bias, w = _on_gpu(*make_case(m, 4 * block, 3 * block, block, kind="empty_row", dtype=dtype))
    tol = CUDA_TOL[dtype]
    torch.testing.assert_close(dds(x, w, True, bias, backend="triton"), reference_dds(x, w, True, bias), **tol)
    torch.testing.assert_close(dds(dy, w, False, backend="triton"), reference_dds(dy, w, False), **tol)
    got = sdd(dy.t(), x, w.layout, backend="triton").values
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, **tol)
    y_t = dsd(w, x.t(), backend="triton")  # a transposed view of Y
    torch.testing.assert_close(y_t, reference_dds(x, w, True).t(), **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_split_m_dw_sums_partials(dtype):
    x, dy, _, w = _on_gpu(*make_case(8192 + 5, 256, 192, 64, dtype=dtype))
    got = launchers.sdd(dy.t(), x, w.layout, num_splits=4)
    torch.testing.assert_close(got, reference_sdd(dy.t(), x, w.layout).values, **CUDA_TOL[dtype])


def test_compiled_linear_under_bf16_autocast_trains_fp32_parameters():
    x, dy, bias, w = _on_gpu(*make_case(3000, 256, 128, 64))
    values, bias = w.values.clone().requires_grad_(), bias.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = block_sparse_linear(x, BlockSparseMatrix(values, w.layout), bias)
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert values.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), reference_linear(x, BlockSparseMatrix(values.detach(), w.layout), bias),
                               **CUDA_TOL[torch.bfloat16])


def test_dw_store_offsets_past_2_31():
    # 17 splits x 8,192 live 128-blocks x 128 x 128 fp32 partials = 2.1e9 elements: int32 offsets would wrap
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    from sparse_nlp.kernels import BlockSparseLayout

    layout = BlockSparseLayout.from_block_mask(torch.ones(64, 128, dtype=torch.bool), 128).to("cuda")
    splits, m = 17, 17 * 64  # 64-row ranges (block 128 tiles M by 64)
    assert splits * layout.num_blocks * 128 * 128 > 2**31
    a = torch.randn(8192, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, 16384, device="cuda", dtype=torch.bfloat16)
    got = launchers.sdd(a, b, layout, num_splits=splits)
    want = a[-128:].float() @ b[:, -128:].float()  # the last live block, whose partials sit past 2^31
    torch.testing.assert_close(got[-1].float(), want, rtol=2e-2, atol=2e-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_automatic_dispatch_on_cuda_matches_reference(dtype):
    """backend=None: Triton for fp32/bf16, cuBLAS ("dense") for fp64 instead of an error."""
    x, dy, bias, w = _on_gpu(*make_case(1000, 512, 256, 64, dtype=dtype))
    tol = CUDA_TOL.get(dtype, TOL[torch.float64])
    torch.testing.assert_close(dds(x, w, True, bias), reference_dds(x, w, True, bias), **tol)
    torch.testing.assert_close(dds(dy, w, False), reference_dds(dy, w, False), **tol)
    torch.testing.assert_close(sdd(dy.t(), x, w.layout).values, reference_sdd(dy.t(), x, w.layout).values, **tol)
