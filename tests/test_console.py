"""What training prints: one line per topology update whose counts match the masks, and log lines without the
per-layer densities, which still reach trainer.state.log_history; the controller's density history."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import Trainer, TrainerCallback

from sparse_nlp import SparseTrainer, SparsityCallback, SparsityConfig, SparsityController, sparse_layers, sparsify
from sparse_nlp.integrations.console import format_update_line, is_layer_density_key, short_layer_names
from sparse_nlp.layers.block import BlockSparseLinear
from tiny_models import build, example_batch, loss_of
from trainer_helpers import RandomTokens, tiny_args, tiny_gpt2

UPDATE_LINE = re.compile(r"^update (\d+)/(\d+) \(step (\d+)\): prune rate [\d.]+, moved ([\d,]+) weights; "
                         r"densest (\S+) ([\d.]+), sparsest (\S+) ([\d.]+)$", re.MULTILINE)


def test_short_names_drop_the_shared_prefix_but_keep_the_layer_index():
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.3.mlp.c_proj"]
    assert list(short_layer_names(names).values()) == ["h.0.attn.c_attn", "h.0.mlp.c_fc", "h.3.mlp.c_proj"]
    one_block = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    assert list(short_layer_names(one_block).values()) == ["attn.c_attn", "mlp.c_fc"]
    assert short_layer_names(["fc1", "fc2"]) == {"fc1": "fc1", "fc2": "fc2"}
    assert short_layer_names(["model.fc"]) == {"model.fc": "model.fc"}  # nothing to compare with: kept whole


def test_update_line_names_densest_and_sparsest_layer():
    densities = {"transformer.h.0.attn.c_proj": 0.45, "transformer.h.3.mlp.c_proj": 0.17, "transformer.h.1.mlp.c_fc": 0.2}
    update = {"prune_rate": 0.347, "moved": 12345, "removed": 12345}
    assert format_update_line(3, 8, 150, update, densities, 0.2) == (
        "update 3/8 (step 150): prune rate 0.35, moved 12,345 weights; densest h.0.attn.c_proj 0.45, "
        "sparsest h.3.mlp.c_proj 0.17"
    )
    pruning = {"prune_rate": 0.5, "moved": 0, "removed": 900}
    assert "removed 900 weights, density 0.53; every layer 0.53" in format_update_line(
        1, 4, 10, pruning, {"a.fc1": 0.53, "a.fc2": 0.53}, 0.53
    )


def _masks_in_weights(controller) -> list[torch.Tensor]:
    """Every layer's mask at weight granularity (a block mask expanded to its blocks)."""
    masks = []
    for _, layer in controller.layers:
        mask = layer.mask
        if isinstance(layer, BlockSparseLinear):
            b = layer.block_size
            mask = mask.repeat_interleave(b, 0).repeat_interleave(b, 1)
        masks.append(mask.clone())
    return masks


@pytest.mark.parametrize("method, block_size", [("momentum", 1), ("magnitude", 1), ("momentum", 16)])
def test_moved_and_removed_count_the_positions_that_changed(method, block_size):
    model = sparsify(build("gpt2").train(), density=0.25, method=method, block_size=block_size, update_interval=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=6)
    batch, updates = example_batch("gpt2"), 0
    for _ in range(6):
        loss_of("gpt2", model, batch).backward()
        optimizer.step()
        before = _masks_in_weights(controller)
        update = controller.step()
        optimizer.zero_grad()
        if update is None:
            continue
        updates += 1
        after = _masks_in_weights(controller)
        turned_on = sum(int((new & ~old).sum()) for old, new in zip(before, after))
        turned_off = sum(int((old & ~new).sum()) for old, new in zip(before, after))
        assert (update["moved"], update["removed"]) == (turned_on, turned_off)
        if method == "magnitude":  # gradual pruning: nothing grows
            assert update["moved"] == 0 and update["removed"] > 0
        else:  # regrow what was pruned: moved == removed == half the positions that changed state
            changed = sum(int((old ^ new).sum()) for old, new in zip(before, after))
            assert update["moved"] == update["removed"] == changed // 2
            assert update["moved"] > 0  # (the update at step 6, where cosine decay reaches 0, is not scheduled)
    # gradual pruning reaches its target at step 6; the others' update there would prune at rate 0
    assert updates == controller.update_count == controller.planned_updates == (3 if method == "magnitude" else 2)


def test_density_history_has_the_start_and_every_update_and_survives_a_checkpoint():
    model = sparsify(build("gpt2").train(), density=0.25, update_interval=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    controller = SparsityController(model, optimizer, total_steps=6)
    batch = example_batch("gpt2")
    for _ in range(6):
        loss_of("gpt2", model, batch).backward()
        optimizer.step()
        controller.step()
        optimizer.zero_grad()
    history = controller.density_history
    assert [record["step"] for record in history] == [0, 2, 4]  # (step 6's update would prune at rate 0)
    assert history[-1]["densities"] == {report.name: report.density for report in controller.report()}
    restored = SparsityController(model, torch.optim.AdamW(model.parameters()), total_steps=6)
    restored.load_state_dict(controller.state_dict())
    assert restored.density_history == history


def _update_lines(text: str) -> list[tuple]:
    return UPDATE_LINE.findall(text)


class RecordLogs(TrainerCallback):
    """Sees the logs as report_to backends do (they run before the printer, on the same dict)."""

    def __init__(self):
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


@pytest.mark.parametrize("progress_bar", [False, True])
def test_console_shows_update_lines_not_layer_densities(tmp_path, capsys, progress_bar):
    reporter = RecordLogs()
    trainer = SparseTrainer(
        model=tiny_gpt2(), args=tiny_args(tmp_path, max_steps=6, disable_tqdm=not progress_bar),
        train_dataset=RandomTokens(), sparsity_config=SparsityConfig(density=0.3, update_interval=2),
        callbacks=[reporter],
    )
    trainer.train()
    printed = capsys.readouterr()
    console = printed.out + printed.err
    lines = _update_lines(console)
    assert [(index, total, step) for index, total, step, *_ in lines] == [("1", "2", "2"), ("2", "2", "4")]
    final = trainer.sparsity_controller.density_history[-1]["densities"]
    *_, densest, densest_value, sparsest, sparsest_value = lines[-1]
    assert float(densest_value) == pytest.approx(max(final.values()), abs=0.005)
    assert float(sparsest_value) == pytest.approx(min(final.values()), abs=0.005)
    assert "'loss'" in console and "sparsity/density" in console  # the usual log lines, overall density included
    assert "sparsity/transformer" not in console  # ... but no per-layer density
    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in step_logs if "sparsity/transformer.h.0.mlp.c_fc" in entry] == [1, 2, 4]
    assert sum("sparsity/transformer.h.0.mlp.c_fc" in logs for logs in reporter.seen) == 3  # what report_to gets


def test_plain_trainer_prints_update_lines_and_keeps_layer_densities_in_the_history(tmp_path, capsys):
    model = sparsify(tiny_gpt2(), 0.25, update_interval=3)
    trainer = Trainer(model=model, args=tiny_args(tmp_path), train_dataset=RandomTokens(), callbacks=[SparsityCallback()])
    trainer.train()
    console = capsys.readouterr().out
    assert len(_update_lines(console)) == 1  # step 3 (step 6's would prune at rate 0)
    assert "sparsity/density" in console and "sparsity/transformer" not in console
    layer_keys = [key for entry in trainer.state.log_history for key in entry if is_layer_density_key(key)]
    assert len(layer_keys) == 2 * len(sparse_layers(model))  # first log and the log after the update


def test_update_lines_can_be_turned_off(tmp_path, capsys):
    trainer = SparseTrainer(
        model=tiny_gpt2(), args=tiny_args(tmp_path, max_steps=4), train_dataset=RandomTokens(),
        sparsity_config=SparsityConfig(density=0.3, update_interval=2), callbacks=[SparsityCallback(print_updates=False)],
    )
    trainer.train()
    assert trainer.sparsity_controller.update_count == 1 and not _update_lines(capsys.readouterr().out)
