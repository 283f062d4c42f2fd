"""Mixed precision: SparseTrainer with --bf16 (autocast over fp32 parameters) through block-sparse layers on CPU,
the same code path a GPU takes (there the blocks run the Triton kernels in bf16)."""
from __future__ import annotations

import torch

from sparse_nlp import SparseTrainer, SparsityConfig, sparse_layers
from sparse_nlp.layers.block import BlockSparseLinear
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2


def test_sparse_trainer_trains_block_sparse_layers_in_bf16(tmp_path):
    model = tiny_gpt2()
    config = SparsityConfig(density=0.5, block_size=16, update_interval=3, momentum_window=2)
    trainer = SparseTrainer(model=model, args=tiny_args(tmp_path, bf16=True, max_steps=9),
                            train_dataset=RandomTokens(), sparsity_config=config)
    before = {name: layer.values.detach().clone() for name, layer in sparse_layers(trainer.model)}
    output = trainer.train()
    layers = sparse_layers(trainer.model)
    assert layers and all(isinstance(layer, BlockSparseLinear) for _, layer in layers)
    assert trainer.sparsity_controller.update_count == 2  # steps 3, 6; step 9's would prune at rate 0: skipped
    assert torch.isfinite(torch.tensor(output.training_loss))
    for _, layer in layers:
        assert layer.values.dtype == torch.float32  # parameters stay fp32; autocast computes in bf16
        assert torch.isfinite(layer.values).all()
    changed = [name for name, layer in layers
               if layer.values.shape != before[name].shape or not torch.equal(layer.values.detach(), before[name])]
    assert changed == [name for name, _ in layers]  # every block layer trained (bf16 grads reached fp32 values)
