"""The block-sparse format: index metadata, transposed order, dense round trips, and one-line input errors."""
import dataclasses

import pytest
import torch
from kernel_cases import make_case, make_layout

from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix, LayoutIndex, block_sparse_linear, dds, sdd
from sparse_nlp.kernels.backends.triton.launchers import interpreting


def test_layout_indices_and_transposed_order():
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    layout = BlockSparseLayout.from_block_mask(mask, 16)
    assert layout.shape == (64, 48) and layout.block_size == 16 and layout.num_blocks == 6
    index = layout.index
    assert isinstance(index, LayoutIndex) and all(t.dtype == torch.int32 for t in index)
    assert index.row_indices.tolist() == [0, 0, 2, 2, 3, 3]
    assert index.col_indices.tolist() == [0, 2, 0, 1, 1, 2]
    assert index.row_offsets.tolist() == [0, 2, 2, 4, 6]
    # column-major: (0,0) (2,0) | (2,1) (3,1) | (0,2) (3,2)
    assert index.transpose_perm.tolist() == [0, 2, 3, 4, 1, 5]
    assert index.transpose_row_indices.tolist() == [0, 2, 2, 3, 0, 3]
    assert index.col_offsets.tolist() == [0, 2, 4, 6]
    assert torch.equal(layout.block_mask(), mask)
    assert layout.device == torch.device("cpu") and layout.to("cpu") is layout
    assert abs(layout.density - 0.5) < 1e-9


def test_a_layout_is_rebuilt_from_its_index_tensors_alone():
    """What the operators do with the tensors they are given (library.py): the same layout, the same tensors."""
    layout = make_layout("empty_row", 64, 96, 32)
    rebuilt = BlockSparseLayout.from_index(list(layout.index), 32)
    assert rebuilt.shape == layout.shape and rebuilt.block_size == 32
    assert all(a is b for a, b in zip(rebuilt.index, layout.index))
    assert torch.equal(rebuilt.block_mask(), layout.block_mask())


def test_layout_is_immutable():
    layout = make_layout("random", 64, 48, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.block_size = 32


def test_from_dense_to_dense_round_trip_keeps_live_blocks_only():
    layout = make_layout("empty_row", 64, 96, 32)
    dense = torch.randn(64, 96)
    w = BlockSparseMatrix.from_dense(dense, layout)
    expect = dense * layout.block_mask().repeat_interleave(32, 0).repeat_interleave(32, 1)
    assert torch.equal(w.to_dense(), expect)
    assert w.values.shape == (layout.num_blocks, 32, 32)


def test_element_mask_and_random_layouts():
    mask = torch.zeros(64, 32, dtype=torch.bool)
    mask[17, 3] = True  # block (1, 0)
    layout = BlockSparseLayout.from_element_mask(mask, 16)
    assert layout.block_mask().nonzero().tolist() == [[1, 0]]
    rnd = BlockSparseLayout.random((128, 256), 64, 0.25, generator=torch.Generator().manual_seed(0))
    assert rnd.num_blocks == 2 and rnd.shape == (128, 256)


def _one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_inputs_raise_one_line_value_errors():
    x, dy, bias, w = make_case(9, 64, 48, 16)
    mask = torch.ones(4, 3, dtype=torch.bool)
    _one_line_value_error(lambda: BlockSparseLayout.from_block_mask(mask, 48), "block_size=48 is not supported")
    _one_line_value_error(lambda: BlockSparseLayout.from_element_mask(torch.ones(64, 40), 16), "not divisible")
    _one_line_value_error(lambda: BlockSparseLayout.random((100, 64), 32, 0.5), "not divisible")
    _one_line_value_error(lambda: BlockSparseMatrix.from_dense(torch.randn(64, 32), w.layout), "layout is")
    _one_line_value_error(lambda: BlockSparseMatrix(torch.randn(2, 16, 16), w.layout), "values must have shape")
    _one_line_value_error(lambda: block_sparse_linear(x.double(), w), "cast/move one to match")
    _one_line_value_error(lambda: block_sparse_linear(x.to("meta"), w), "cast/move one to match")
    _one_line_value_error(lambda: block_sparse_linear(x[:, :32], w), "expects last dim 48")
    _one_line_value_error(lambda: block_sparse_linear(x, w, bias[:10]), "bias must have shape")
    _one_line_value_error(lambda: block_sparse_linear(x, w, bias.double()), "bias is")
    _one_line_value_error(lambda: block_sparse_linear(x, w, backend="cuda"), "unknown backend")
    _one_line_value_error(lambda: dds(x, w, transpose_b=False), "pass transpose_b=True")
    _one_line_value_error(lambda: dds(x.double(), w, True, backend="torch"), "cast one to match")
    _one_line_value_error(lambda: sdd(dy.t(), x.half(), w.layout), "make them match")
    _one_line_value_error(lambda: sdd(dy.t()[:32], x, w.layout), "does not give the layout's shape")
    _one_line_value_error(lambda: block_sparse_linear(x, w.to_dense()), "must be a BlockSparseMatrix")
    # The device check comes before the dtype check: Triton takes CPU tensors only under the interpreter (the suite
    # without a GPU); with a GPU, CPU tensors get the device message and the dtype message is checked on CUDA tensors.
    w64 = BlockSparseMatrix(w.values.double(), w.layout)
    on_cpu = "backend='triton' supports" if interpreting() else "backend='triton' got cpu tensors"
    _one_line_value_error(lambda: dds(x.double(), w64, True, backend="triton"), on_cpu)
    if torch.cuda.is_available():
        w64_cuda, x64_cuda = w64.to("cuda"), x.double().cuda()
        _one_line_value_error(lambda: dds(x64_cuda, w64_cuda, True, backend="triton"), "backend='triton' supports")
