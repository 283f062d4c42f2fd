"""The native kernels' few-row path (decoding): one C call over the forward's packed weights, which `linear` with
weights_revision keeps on the layout until the values change, and the layer's inference path through it."""
import pytest
import torch
from kernel_cases import LAYOUTS, make_case

from sparse_nlp.kernels import BlockSparseMatrix, dds, linear
from sparse_nlp.kernels.backends.native import products as native
from sparse_nlp.kernels.testing.reference import reference_dds

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
TOL = dict(rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("m", [1, 3, 8, native.FEW_ROWS, native.FEW_ROWS + 1])
def test_few_rows_on_every_layout_kind(kind, m):
    for block in (16, 64):
        x, dy, bias, w = make_case(m, 5 * block, 3 * block, block, kind=kind)
        torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
        torch.testing.assert_close(dds(dy, w, False, backend="native"), reference_dds(dy, w, False), **TOL)


@torch.no_grad()
def served(x, w, bias):
    """What a frozen layer's forward runs at inference: the public linear, static weights, native backend."""
    return linear(x, w.values, bias, w.layout, "native", weights_revision=0)


@needs_native
def test_packed_weights_follow_in_place_changes_and_new_values():
    x, _, bias, w = make_case(2, 128, 64, 32)
    first = served(x, w, bias)
    cached = w.layout.kernel_cache["native_forward_pack"]
    assert served(x, w, bias).equal(first)
    assert w.layout.kernel_cache["native_forward_pack"] is cached  # same values: not packed again
    with torch.no_grad():
        w.values.mul_(-2.0)  # an in-place change moves the version counter
    torch.testing.assert_close(served(x, w, bias), reference_dds(x, w, True, bias), **TOL)
    other = BlockSparseMatrix(torch.randn_like(w.values), w.layout)  # other values, same layout
    torch.testing.assert_close(served(x, other, bias), reference_dds(x, other, True, bias), **TOL)
    torch.testing.assert_close(served(x, w, bias), reference_dds(x, w, True, bias), **TOL)


@needs_native
@pytest.mark.parametrize("rows", [2, 300])
def test_without_reuse_nothing_is_kept(rows):
    """The default (every op, training, linear without weights_revision): packed afresh each call, nothing left on
    the layout."""
    x, _, bias, w = make_case(rows, 128, 64, 32)
    torch.testing.assert_close(dds(x, w, True, bias, backend="native"), reference_dds(x, w, True, bias), **TOL)
    with torch.no_grad():
        y = linear(x, w.values, bias, w.layout, "native")
    torch.testing.assert_close(y, reference_dds(x, w, True, bias), **TOL)
    assert "native_forward_pack" not in w.layout.kernel_cache


@needs_native
def test_a_fused_optimizer_step_is_seen_by_the_next_inference_call():
    """Fused AdamW changes parameters without moving their version counter: a trainable layer's inference forward
    must not reuse a pack from before the step (this went stale once: a resumed Trainer run lost its losses)."""
    from sparse_nlp.layers.block import BlockSparseLinear

    torch.manual_seed(0)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(128, 128), torch.rand(4, 4) < 0.5, 32)
    x = torch.randn(3, 128)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    with torch.no_grad():
        before = layer(x)
    version = layer.values._version
    layer(x).square().sum().backward()
    optimizer.step()
    assert layer.values._version == version  # the hazard itself
    with torch.no_grad():
        after = layer(x)
    assert not after.equal(before)
    torch.testing.assert_close(after, x @ layer.dense_weight().t() + layer.bias.detach(), **TOL)


@needs_native
def test_frozen_layers_keep_their_pack():
    from sparse_nlp.layers.block import BlockSparseLinear

    layer = BlockSparseLinear.from_dense(torch.nn.Linear(128, 128), torch.eye(4, dtype=torch.bool), 32)
    x = torch.randn(1, 128)
    with torch.no_grad():
        layer(x)
        assert "native_forward_pack" not in layer.layout.kernel_cache  # trainable: repacked each call
        layer.values.requires_grad_(False)
        layer(x)
        kept = layer.layout.kernel_cache["native_forward_pack"]
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias, **TOL)
        assert layer.layout.kernel_cache["native_forward_pack"] is kept


@needs_native
def test_packed_weights_do_not_block_a_topology_update():
    """The cache holds no reference to the parameter: swap_tensors (how a topology update resizes values) works."""
    from sparse_nlp.layers.block import BlockSparseLinear

    layer = BlockSparseLinear.from_dense(torch.nn.Linear(64, 64), torch.eye(4, dtype=torch.bool), 16)
    layer.values.requires_grad_(False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer(x)
        assert "native_forward_pack" in layer.layout.kernel_cache
        new_mask = torch.eye(4, dtype=torch.bool)
        new_mask[0, 1] = True
        layer.set_block_mask(new_mask)
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias, **TOL)


@needs_native
@pytest.mark.parametrize("rows", [1, 5, 200])
def test_layer_inference_path_equals_the_training_path(rows):
    """Under no_grad a native layer calls the C product directly (no operator, no autograd): same outputs."""
    from sparse_nlp.layers.block import BlockSparseLinear

    torch.manual_seed(0)
    layer = BlockSparseLinear.from_dense(torch.nn.Linear(256, 512), torch.rand(8, 4) < 0.4, 64)
    x = torch.randn(2, rows, 256)
    trained = layer(x)
    assert trained.requires_grad
    with torch.no_grad():
        served = layer(x)
    torch.testing.assert_close(served, trained.detach(), **TOL)
    torch.testing.assert_close(served, x @ layer.dense_weight().t() + layer.bias.detach(), **TOL)
