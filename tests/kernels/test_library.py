"""The torch.library operators (library.py): schema, fake impls, autograd registration and the compiled
(aot_dispatch) path of each agree with its eager result on every backend (Triton under the interpreter here), with
the layout passed as the operator's own tensors."""
import pytest
import torch

from sparse_nlp.kernels import BlockSparseLayout, BlockSparseMatrix, library


@pytest.mark.parametrize("backend", ["native", "torch", "dense", "triton"])
def test_operators_pass_opcheck(backend):
    torch.manual_seed(0)
    layout = BlockSparseLayout.random((48, 32), 16, 0.5)
    index = list(layout.index)
    x = torch.randn(5, 32, requires_grad=True)
    values = torch.randn(layout.num_blocks, 16, 16, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    torch.library.opcheck(library.linear, (x, values, bias, index, 16, backend))
    torch.library.opcheck(library.dds, (x.detach(), values.detach(), index, None, 16, True, backend))
    dy = torch.randn(5, 48)
    torch.library.opcheck(library.sdd, (dy.t(), x.detach(), index, 16, backend))
    torch.library.opcheck(library.linear_backward, (dy, x.detach(), values.detach(), index, 16, True, True, backend))


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_the_operator_reads_the_layout_it_is_given(backend):
    """Two layouts of one shape, the operator called on each in turn: each result follows its own index tensors
    (what the former registry keyed by address could get wrong once an address was reused)."""
    x = torch.randn(7, 64)
    for seed in range(3):
        layout = BlockSparseLayout.random((64, 64), 16, 0.25, generator=torch.Generator().manual_seed(seed))
        values = torch.randn(layout.num_blocks, 16, 16)
        want = x @ BlockSparseMatrix(values, layout).to_dense().t()
        torch.testing.assert_close(library.linear(x, values, None, list(layout.index), 16, backend), want)
