"""The native kernels' few-row path (decoding): the output blocks split between threads, and the forward's packed
weights kept on the layout until the values change."""
import pytest
import torch
from kernel_cases import LAYOUTS, make_case

from sparse_nlp.kernels import BlockSparseMatrix, cpu_native, dds
from sparse_nlp.kernels.reference import reference_dds

needs_native = pytest.mark.skipif(
    not cpu_native.available(), reason=f"native kernels unavailable: {cpu_native.unavailable_reason()}"
)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@needs_native
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("m", [1, 3, 8, cpu_native.SPLIT_OUTPUTS_MAX_ROWS, cpu_native.SPLIT_OUTPUTS_MAX_ROWS + 1])
def test_few_rows_split_over_output_blocks(kind, m, two_threads):
    for block in (16, 64):
        x, dy, bias, w = make_case(m, 5 * block, 3 * block, block, kind=kind)
        torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
        torch.testing.assert_close(dds(dy, w, False, backend="native"), reference_dds(dy, w, False), **TOL)


@needs_native
@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64])
def test_output_splits_cover_every_block_once(parts):
    _, _, _, w = make_case(4, 7 * 16, 5 * 16, 16, kind="empty_row")
    for transpose_b, n_out in ((True, 7), (False, 5)):
        bounds = cpu_native._output_splits(w.layout, transpose_b, parts).tolist()
        assert bounds[0] == 0 and bounds[-1] == n_out and bounds == sorted(set(bounds))
        assert len(bounds) - 1 <= parts


@needs_native
def test_packed_weights_follow_in_place_changes_and_new_values():
    x, _, bias, w = make_case(2, 128, 64, 32)
    first = dds(x, w, True, bias, backend="native")
    cached = w.layout.kernel_cache["native_forward_pack"].stack
    assert dds(x, w, True, bias, backend="native").equal(first)
    assert w.layout.kernel_cache["native_forward_pack"].stack is cached  # same values: not packed again
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
