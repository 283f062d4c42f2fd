"""torch.compile over sparse layers: no graph breaks in them, compiled training equal to eager across topology
updates, one compilation for the whole run, and the Trainer's --torch_compile.

Backend "aot_eager" in most tests: it traces forward and backward through the operators' fake impls and autograd
exactly as Inductor does, without generating code (Inductor takes ~15 s on a tiny GPT-2 on 2 cores; one test uses it
on a single layer).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters
from transformers import TrainerCallback

import test_recipe
from sparse_nlp import SparseTrainer, SparsityConfig, SparsityController, compile_model, sparse_layers, sparsify
from sparse_nlp.layers.block import BlockSparseLinear
from test_recipe import _tiny_flags, train_lm
from tiny_models import build, example_batch
from trainer_helpers import RandomTokens, masks, tiny_args, tiny_gpt2

KINDS = {"fine": 1, "block": 16}  # block_size
text_files = test_recipe.text_files  # the recipe tests' fixture, used here too


def _sparse_gpt2(block_size: int):
    return sparsify(build("gpt2"), density=0.3, block_size=block_size, update_interval=2, prune_rate=0.5).train()


def _logits_loss(model, batch):
    """Next-token loss from the logits (the model's own loss path logs a warning, a graph break outside our layers)."""
    logits = model(input_ids=batch["input_ids"]).logits
    ids = batch["input_ids"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    static = torch._dynamo.config.force_parameter_static_shapes
    yield
    torch._dynamo.config.force_parameter_static_shapes = static  # what compile_model changed, for the other tests
    torch._dynamo.reset()


def test_building_block_layers_changes_no_process_wide_setting_and_compile_model_makes_the_one_it_needs():
    torch._dynamo.config.force_parameter_static_shapes = True  # dynamo's default
    model = _sparse_gpt2(16)
    assert torch._dynamo.config.force_parameter_static_shapes is True
    compile_model(model, backend="aot_eager")
    assert torch._dynamo.config.force_parameter_static_shapes is False


@pytest.mark.parametrize("kind", KINDS)
def test_dynamo_finds_no_graph_break_in_sparse_layers(kind):
    model = _sparse_gpt2(KINDS[kind])
    explanation = torch._dynamo.explain(model)(input_ids=example_batch("gpt2")["input_ids"])
    ours = [reason for reason in explanation.break_reasons
            if any("sparse_nlp" in frame.filename or "/kernels/" in frame.filename for frame in reason.user_stack)]
    assert ours == [] and explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _train(block_size: int, compiled: bool, steps: int = 8) -> dict:
    model = _sparse_gpt2(block_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # One step past the run: the update at its last step prunes at a positive rate, so block layers collect dense
    # gradients at every step (collecting or not is a different graph; real runs have both, here one is enough).
    controller = SparsityController(model, optimizer, total_steps=steps + 1)
    forward = compile_model(model, fullgraph=True, backend="aot_eager") if compiled else model
    run = {"losses": [], "masks": [], "blocks": [], "graphs": [], "updates": 0}
    for step in range(steps):
        loss = _logits_loss(forward, example_batch("gpt2", seed=step))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run["updates"] += controller.step() is not None
        run["losses"].append(loss.item())
        run["masks"].append([layer.mask.clone() for _, layer in sparse_layers(model)])
        run["blocks"].append([tuple(layer.weight.shape) for _, layer in sparse_layers(model)])
        run["graphs"].append(counters["stats"]["unique_graphs"])
    return run


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_equals_eager_across_topology_updates_without_recompiling(kind):
    eager = _train(KINDS[kind], compiled=False)
    compiled = _train(KINDS[kind], compiled=True)
    assert compiled["updates"] == eager["updates"] >= 3
    for step, (got, expected) in enumerate(zip(compiled["masks"], eager["masks"])):
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), f"masks differ after step {step}"
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-5, atol=1e-6)
    if kind == "block":  # the live-block counts did change: the values and index buffers were resized
        assert len(set(map(tuple, compiled["blocks"]))) > 1
    # One graph for the whole run: the block dimension is symbolic from the start, masks change in place.
    assert compiled["graphs"] == [1] * len(compiled["graphs"])


def test_inductor_compiles_a_block_layer_that_is_resized():
    torch.manual_seed(0)
    holder = sparsify(nn.Sequential(nn.Linear(48, 32)), density=0.5, block_size=16)
    layer = holder[0]
    compiled = compile_model(layer, fullgraph=True)  # Inductor, the default backend
    for blocks in ([True, False, True, True, False, False], [True, True, False, True, False, True],
                   [False, True, False, False, False, False]):
        layer.set_block_mask(torch.tensor(blocks).view(2, 3))
        with torch.no_grad():
            layer.values.normal_()
        x = torch.randn(5, 48, requires_grad=True)
        compiled(x).pow(2).sum().backward()
        got = (x.grad.clone(), layer.values.grad.clone())
        x.grad, layer.values.grad = None, None
        layer(x).pow(2).sum().backward()
        torch.testing.assert_close(got, (x.grad, layer.values.grad), rtol=1e-4, atol=1e-5)
        layer.values.grad = None
    assert counters["stats"]["unique_graphs"] == 1  # the backend stayed "native" (density <= 0.75)


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_with_torch_compile_equals_eager(kind, tmp_path):
    graphs = []  # dynamo's graph count after each step

    class CountGraphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs.append(counters["stats"]["unique_graphs"])

    def train(compile_: bool):
        torch._dynamo.reset()
        counters.clear()
        args = tiny_args(tmp_path / str(compile_), torch_compile=compile_, torch_compile_backend="aot_eager")
        # constant rate: the update at the last step happens, so block layers collect dense gradients at every step
        config = SparsityConfig(density=0.25, update_interval=2, block_size=KINDS[kind], prune_rate_decay="constant")
        trainer = SparseTrainer(model=tiny_gpt2(n_embd=64), args=args, train_dataset=RandomTokens(),
                                sparsity_config=config, callbacks=[CountGraphs()] if compile_ else None)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return trainer, losses

    eager, eager_losses = train(False)
    compiled, compiled_losses = train(True)
    # Two graphs (the model's own loss logs a warning: a break outside the sparse layers), compiled at the first
    # step and never again, through every topology update.
    assert graphs == [2] * len(graphs)
    assert compiled.sparsity_controller.update_count == eager.sparsity_controller.update_count >= 2
    assert masks(compiled.model).keys() == masks(eager.model).keys()
    assert all(torch.equal(a, b) for a, b in zip(masks(compiled.model).values(), masks(eager.model).values()))
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-4, atol=1e-5)
    if kind == "block":
        assert any(isinstance(layer, BlockSparseLinear) for _, layer in sparse_layers(compiled.model))


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_trains_with_torch_compile(kind, text_files, tmp_path):
    train, valid, cache = text_files
    flags = _tiny_flags(tmp_path, cache, "--train_file", str(train), "--validation_file", str(valid),
                        "--block_size", str(KINDS[kind]), "--dense_baseline", "false",
                        "--torch_compile", "true", "--torch_compile_backend", "aot_eager")
    (run,) = train_lm.main(flags)
    assert run.topology_updates == 1 and torch.isfinite(torch.tensor(run.val_perplexity))
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile


def test_bench_compile_runs_on_cpu(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compile.py"
    spec = importlib.util.spec_from_file_location("bench_compile", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--warmup", "4", "--steps", "1", "--rounds", "1", "--json", str(tmp_path / "out.json")])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"dense eager", "dense default", "block eager", "block default"}
    assert rows["block default"]["graphs"] == 1  # the warm-up's topology update did not recompile
    assert rows["block default"]["loss"] == pytest.approx(rows["block eager"]["loss"], rel=1e-5)
