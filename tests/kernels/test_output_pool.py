"""OutputPool: a buffer is handed out again only once every tensor using it is gone."""
import pytest
import torch

from sparse_nlp.kernels.backends.native.output_pool import OutputPool

# Reuse needs torch's storage use count (a private API, absent from older releases such as 2.6); without it the pool
# hands out fresh buffers, which test_without_the_use_count_api_nothing_is_reused checks on every release.
needs_use_count = pytest.mark.skipif(not hasattr(torch._C, "_storage_Use_Count"),
                                     reason="this torch has no storage use count: the pool never reuses")

CPU = torch.device("cpu")


@needs_use_count
def test_a_freed_output_is_reused_and_a_live_one_is_not():
    pool = OutputPool()
    y = pool.empty((4, 8), torch.float32, CPU)
    assert y.shape == (4, 8) and y.dtype == torch.float32 and y.is_contiguous()
    ptr = y.data_ptr()
    z = pool.empty((4, 8), torch.float32, CPU)
    assert z.data_ptr() != ptr  # y is alive
    del y
    w = pool.empty((8, 4), torch.float32, CPU)  # same size, other shape
    assert w.data_ptr() == ptr and w.shape == (8, 4)


@needs_use_count
def test_views_and_saved_tensors_keep_a_buffer_in_use():
    pool = OutputPool()
    y = pool.empty((16,), torch.float32, CPU)
    ptr = y.data_ptr()
    view = y[:4]
    del y
    assert pool.empty((16,), torch.float32, CPU).data_ptr() != ptr  # the view still reads the buffer
    del view

    x = torch.randn(16, requires_grad=True)
    y = pool.empty((16,), torch.float32, CPU)
    assert y.data_ptr() == ptr
    y.copy_(x.detach())
    loss = (y.requires_grad_() * y).sum()  # mul saves y for its backward
    del y
    assert pool.empty((16,), torch.float32, CPU).data_ptr() != ptr
    loss.backward()
    del loss
    assert pool.empty((16,), torch.float32, CPU).data_ptr() == ptr


@needs_use_count
def test_dtype_and_size_must_match():
    pool = OutputPool()
    ptr = pool.empty((10,), torch.float32, CPU).data_ptr()
    assert pool.empty((10,), torch.float64, CPU).data_ptr() != ptr
    assert pool.empty((11,), torch.float32, CPU).data_ptr() != ptr
    assert pool.empty((10,), torch.float32, CPU).data_ptr() == ptr


@needs_use_count
def test_free_buffers_beyond_the_cap_are_dropped():
    pool = OutputPool(max_free_bytes=3 * 106 * 4)
    for n in range(100, 107):  # at the 7th (~400 bytes each), the cap keeps the newest three free ones, then adds it
        pool.empty((n,), torch.float32, CPU)
    assert len(pool) == 4
    pool.clear()
    assert len(pool) == 0


def test_without_the_use_count_api_nothing_is_reused(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    pool = OutputPool()
    pool.empty((32,), torch.float32, CPU)
    assert len(pool) == 0
    z = pool.empty((32,), torch.float32, CPU)
    assert z.shape == (32,)


def test_a_layer_output_from_the_pool_takes_in_place_changes():
    from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix, block_sparse_linear

    layout = BlockSparseLayout.random((128, 64), 64, 0.5, generator=torch.Generator().manual_seed(0))
    values = torch.randn(layout.num_blocks, 64, 64, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    y = block_sparse_linear(x, BlockSparseMatrix(values, layout), None, backend="native")
    y.add_(1.0)  # e.g. a residual added in place
    y.sum().backward()
    expected = torch.ones(8, 128) @ BlockSparseMatrix(values.detach(), layout).to_dense()
    torch.testing.assert_close(x.grad, expected)
