"""Serving: a trained sparse model saved as a plain checkpoint, loaded, rebuilt block-sparse from its zeros,
generates what the plain model generates. And the model just trained generates the same tokens at the served
model's speed: its block layers keep their packed weights between no-grad calls in eval mode, and no later
optimizer step goes unseen."""
import copy
import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from sparse_nlp import SparseTrainer, SparsityConfig, SparsityController, sparse_layers, sparsify, unsparsify
from sparse_nlp.kernels.backends.native import products as native
from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.serving import block_sparse_for_serving, nonzero_block_mask
from tiny_models import TINY_MODELS
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2

needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
GREEDY = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


def _saved_sparse_gpt2(tmp_path, density=0.25, block_size=16):
    torch.manual_seed(0)
    model = sparsify(TINY_MODELS["gpt2"](), density=density, block_size=block_size)
    unsparsify(model).save_pretrained(tmp_path)
    return tmp_path


def test_loaded_checkpoint_serves_block_sparse_with_the_same_outputs(tmp_path):
    path = _saved_sparse_gpt2(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(path).eval()
    served = block_sparse_for_serving(AutoModelForCausalLM.from_pretrained(path), block_size=16).eval()
    layers = sparse_layers(served)
    assert len(layers) == 8 and all(isinstance(layer, BlockSparseLinear) for _, layer in layers)  # 4 per block
    assert served.lm_head.__class__.__name__ == "Linear"  # the LM head (tied to the embedding) stays dense
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(served(prompt).logits, plain(prompt).logits, rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert served.generate(prompt, **settings).equal(plain.generate(prompt, **settings))


def test_live_blocks_are_the_nonzero_ones(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_saved_sparse_gpt2(tmp_path))
    conv = model.transformer.h[0].mlp.c_fc  # GPT-2's Conv1D stores [in, out]
    mask = nonzero_block_mask(conv, 16)
    assert mask.shape == (128 // 16, 32 // 16)
    expected = conv.weight.t().reshape(8, 16, 2, 16).abs().sum(dim=(1, 3)) > 0
    assert mask.equal(expected) and 0 < mask.float().mean() < 1
    block_sparse_for_serving(model, block_size=16)
    assert model.transformer.h[0].mlp.c_fc.block_mask.equal(mask)


def test_dense_layers_stay_dense_and_a_dense_model_is_refused():
    model = TINY_MODELS["gpt2"]()
    with pytest.raises(ValueError, match="no linear layer has at most 50% of its 16x16 blocks nonzero"):
        block_sparse_for_serving(model, block_size=16)
    assert not sparse_layers(model)  # nothing changed
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, 16:].zero_()  # [in, out]: the second half of the outputs
    block_sparse_for_serving(model, block_size=16)
    assert [name for name, _ in sparse_layers(model)] == ["transformer.h.0.mlp.c_fc"]


def test_bad_arguments_say_what_to_do(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_saved_sparse_gpt2(tmp_path))
    with pytest.raises(ValueError, match="max_density must be in"):
        block_sparse_for_serving(model, max_density=0.0)
    with pytest.raises(ValueError, match="not divisible by block_size 24"):
        block_sparse_for_serving(model, block_size=24)
    block_sparse_for_serving(model, block_size=16)
    with pytest.raises(ValueError, match="already has sparse layers"):
        block_sparse_for_serving(model, block_size=16)


# ---- generation right after training ---------------------------------------------------------------------------
def _trained_gpt2(fused: bool = True, steps: int = 3):
    """A tiny GPT-2 with block layers trained a few steps (AdamW, a controller stepped after each optimizer step),
    left in train mode; with its optimizer and controller."""
    torch.manual_seed(0)
    model = sparsify(TINY_MODELS["gpt2"](), density=0.25, block_size=16).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else True)
    controller = SparsityController(model, optimizer, total_steps=100)
    _train(model, optimizer, controller, steps)
    return model, optimizer, controller


def _train(model, optimizer, controller, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1, 64, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()


def _dense_logits(model, ids):
    """A fresh dense computation of the same weights: the model unsparsified (a copy), masked blocks zero."""
    with torch.no_grad():
        return unsparsify(copy.deepcopy(model)).eval()(ids).logits


def _block_layers(model):
    return [layer for _, layer in sparse_layers(model)]


def _kept(layer) -> bool:
    return native.PACK_KEY in layer.layout.kernel_cache


class CountingLibrary:
    """The native library, counting the weight packs it is asked for (delegates everything to the real one)."""

    def __init__(self, library):
        self.library, self.packs = library, 0

    def sparse_nlp_pack_blocks(self, *args):
        self.packs += 1
        return self.library.sparse_nlp_pack_blocks(*args)

    def __getattr__(self, name):
        return getattr(self.library, name)


@needs_native
def test_a_just_trained_model_generates_the_served_and_the_dense_models_tokens():
    model, _, _ = _trained_gpt2()
    served = block_sparse_for_serving(unsparsify(copy.deepcopy(model)), block_size=16).eval()
    dense = unsparsify(copy.deepcopy(model)).eval()
    model.eval()
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens = model.generate(prompt, **GREEDY)
    assert all(_kept(layer) for layer in _block_layers(model))  # the fast path was the one taken
    assert all(layer.values.requires_grad for layer in _block_layers(model))  # no conversion: still trainable
    assert tokens.equal(served.generate(prompt, **GREEDY))
    assert tokens.equal(dense.generate(prompt, **GREEDY))
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, dense(prompt).logits, rtol=1e-4, atol=1e-4)


@needs_native
def test_no_grad_calls_in_eval_mode_pack_a_trained_models_weights_once(monkeypatch):
    model, _, _ = _trained_gpt2()
    library = CountingLibrary(native.load_native())
    monkeypatch.setattr(native, "load_native", lambda: library)
    layers = len(_block_layers(model))
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(prompt)  # train mode: trainable weights are packed afresh on every call
        model(prompt)
    assert library.packs == 2 * layers
    model.eval()
    model.generate(prompt, **GREEDY)  # 12 forwards of every layer
    model.generate(prompt, **GREEDY)
    assert library.packs == 3 * layers  # once each, at the first call after the switch
    model.train()
    assert not any(_kept(layer) for layer in _block_layers(model))  # back to training: the copies are freed
    model.eval()
    with torch.no_grad():
        model(prompt)
    assert library.packs == 4 * layers  # packed again after the switch, once


@needs_native
@pytest.mark.parametrize("fused", [True, False], ids=["fused AdamW", "foreach AdamW"])
def test_an_optimizer_step_taken_in_eval_mode_is_seen_by_the_next_no_grad_call(fused):
    """The model stays in eval mode throughout (no mode switch to rely on): a fused AdamW step moves no version
    counter, and the controller's step hook is what tells the layers."""
    model, optimizer, controller = _trained_gpt2(fused)
    model.eval()
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(prompt).logits
    assert all(_kept(layer) for layer in _block_layers(model))
    versions = [layer.values._version for layer in _block_layers(model)]
    _train(model, optimizer, controller, steps=1, seed=1)
    assert ([layer.values._version for layer in _block_layers(model)] == versions) == fused  # the hazard itself
    _assert_sees_the_new_weights(model, prompt, before)


def _assert_sees_the_new_weights(model, prompt, before):
    """A no-grad forward after a step: new logits, and exactly those of the current weights computed densely."""
    with torch.no_grad():
        after = model(prompt).logits
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(after, _dense_logits(model, prompt), rtol=1e-4, atol=1e-4)


@needs_native
def test_an_optimizer_no_controller_knows_is_seen_across_a_mode_switch():
    """A plain loop, fused AdamW, no controller: training happens in train mode, and switching modes drops the
    kept pack, so evaluation after the next steps sees them."""
    model, _, _ = _trained_gpt2(steps=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    prompt = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        before = model(prompt).logits
    model.train()
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    model.eval()
    _assert_sees_the_new_weights(model, prompt, before)


@needs_native
def test_the_step_hook_goes_with_the_controller():
    model, optimizer, controller = _trained_gpt2(steps=0)
    assert len(optimizer._optimizer_step_post_hooks) == 1  # this optimizer's own hooks (no global one)
    del controller
    gc.collect()
    assert len(optimizer._optimizer_step_post_hooks) == 0


class EvalLossBesideDense(TrainerCallback):
    """Right after each of the Trainer's evaluations (the model still in eval mode, its packs those the evaluation
    kept): the model's loss under no_grad, beside that of a fresh dense copy. (The Trainer's own eval_loss divides
    by all label tokens, not the shifted ones, so it is not compared directly.)"""

    def __init__(self, dataset):
        self.ids = torch.stack([row["input_ids"] for row in dataset])
        self.pairs: list[tuple[float, float]] = []
        self.kept: list[bool] = []

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        self.kept.append(not model.training and all(_kept(layer) for layer in _block_layers(model)))
        with torch.no_grad():
            ours = model(input_ids=self.ids, labels=self.ids).loss.item()
            dense = unsparsify(copy.deepcopy(model)).eval()(input_ids=self.ids, labels=self.ids).loss.item()
        self.pairs.append((ours, dense))


@needs_native
def test_sparse_trainer_evaluations_between_fused_steps_see_each_steps_weights(tmp_path):
    """The Trainer's default optimizer is fused AdamW; evaluating after every step runs the kept-pack path (eval
    mode, no grad, 8 x 16 rows) between steps: each evaluation sees the weights of its step."""
    evaluation = RandomTokens(size=8, seed=1)
    check = EvalLossBesideDense(evaluation)
    trainer = SparseTrainer(
        model=tiny_gpt2(), args=tiny_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1,
                                          per_device_eval_batch_size=8),
        train_dataset=RandomTokens(), eval_dataset=evaluation, callbacks=[check],
        sparsity_config=SparsityConfig(density=0.25, block_size=16),
    )
    assert trainer.args.optim == "adamw_torch_fused"
    trainer.train()
    assert check.kept == [True] * 4
    assert len({ours for ours, _ in check.pairs}) == 4  # the weights moved at each step
    for ours, dense in check.pairs:
        assert ours == pytest.approx(dense, rel=1e-5)
