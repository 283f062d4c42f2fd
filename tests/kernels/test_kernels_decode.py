"""The native kernels' few-row path (decoding): one C call over the forward's packed weights, which are kept on the
layout until the values change, and the layer's inference path that calls it directly."""
import pytest
import torch
from kernel_cases import LAYOUTS, make_case

from sparse_nlp.kernels import BlockSparseMatrix, cpu_native, dds
from sparse_nlp.kernels.reference import reference_dds

needs_native = pytest.mark.skipif(
    not cpu_native.available(), reason=f"native kernels unavailable: {cpu_native.unavailable_reason()}"
)
TOL = dict(rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("m", [1, 3, 8, cpu_native.FEW_ROWS, cpu_native.FEW_ROWS + 1])
def test_few_rows_on_every_layout_kind(kind, m):
    for block in (16, 64):
        x, dy, bias, w = make_case(m, 5 * block, 3 * block, block, kind=kind)
        torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
        torch.testing.assert_close(dds(dy, w, False, backend="native"), reference_dds(dy, w, False), **TOL)


@needs_native
def test_packed_weights_follow_in_place_changes_and_new_values():
    x, _, bias, w = make_case(2, 128, 64, 32)
    first = dds(x, w, True, bias, backend="native")
    cached = w.layout.kernel_cache["native_forward_pack"]
    assert dds(x, w, True, bias, backend="native").equal(first)
    assert w.layout.kernel_cache["native_forward_pack"] is cached  # same values: not packed again
    with torch.no_grad():
        w.values.mul_(-2.0)  # an optimizer step's in-place change
    torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
    other = BlockSparseMatrix(torch.randn_like(w.values), w.layout)  # other values, same layout
    torch.testing.assert_close(dds(x, other, True, bias, backend="native"),
                               reference_dds(x, other, True, bias), **TOL)
    torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)


@needs_native
def test_packed_weights_do_not_block_a_topology_update():
    """The cache holds no reference to the parameter: swap_tensors (how a topology update resizes values) works."""
    from sparse_nlp.block_layers import BlockSparseLinear

    layer = BlockSparseLinear.from_dense(torch.nn.Linear(64, 64), torch.eye(4, dtype=torch.bool), 16)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
        new_mask = torch.eye(4, dtype=torch.bool)
        new_mask[0, 1] = True
        layer.set_block_mask(new_mask)
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias, **TOL)


@needs_native
@pytest.mark.parametrize("rows", [1, 5, 200])
def test_layer_inference_path_equals_the_training_path(rows):
    """Under no_grad a native layer calls the C product directly (no operator, no autograd): same outputs."""
    from sparse_nlp.block_layers import BlockSparseLinear

    torch.manual_seed(0)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(256, 512), torch.rand(8, 4) < 0.4, 64)
    x = torch.randn(2, rows, 256)
    trained = layer(x)
    assert trained.requires_grad
    with torch.no_grad():
        served = layer(x)
    torch.testing.assert_close(served, trained.detach(), **TOL)
    torch.testing.assert_close(served, x @ layer.dense_weight().t() + layer.bias.detach(), **TOL)
