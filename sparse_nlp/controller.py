"""`SparsityController`: drives the topology of a sparsified model during training, beside any optimizer.

Call ``step()`` after every ``optimizer.step()`` (and before ``zero_grad``): it zeroes masked weights, keeps the
momentum statistics, advances the schedule and updates the topology when due. The optimizer is never wrapped; the
controller registers one step post-hook on it (``register_step_post_hook``, that optimizer only), which tells the
sparse layers their weights may have changed (fused optimizers do not move the version counter that kept copies of
the weights are checked against); it is removed when the controller is garbage-collected.

Each update's statistics come back from ``step()`` / ``update()``; ``density_history`` keeps every layer's density
at the start and after each update (saved with the controller, so a resumed run keeps the whole history).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from sparse_nlp.config import SparsityConfig
from sparse_nlp.layers.base import overall_density, sparse_layers
from sparse_nlp.methods import get_method, update_layer_topology
from sparse_nlp.model import CONFIG_ATTRIBUTE
from sparse_nlp.parallel.ddp import Replicas
from sparse_nlp.parallel.fsdp import check_sharded_training
from sparse_nlp.topology.context import UpdateContext
from sparse_nlp.topology.fused_qkv import q_k_v_slices
from sparse_nlp.topology.optimizer_state import MomentumTracker
from sparse_nlp.topology.schedule import schedule_for


@dataclass(frozen=True)
class LayerReport:
    name: str
    shape: tuple[int, ...]
    nonzeros: int
    density: float


class SparsityController:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Optional[SparsityConfig] = None,
        *,
        total_steps: Optional[int] = None,
    ):
        self.layers = sparse_layers(model)
        if not self.layers:
            raise ValueError("the model has no sparse layers; call sparse_nlp.sparsify(model, ...) first.")
        config = config if config is not None else getattr(model, CONFIG_ATTRIBUTE, None)
        if config is None:
            raise ValueError("no sparsity config: pass config=SparsityConfig(...) or sparsify the model with sparse_nlp.")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in self.layers if id(layer.weight) not in held]
        if missing:
            raise ValueError(
                f"the optimizer does not hold the weights of {len(missing)} sparse layer(s) (e.g. {missing[0]}); "
                "build the optimizer from model.parameters() after sparsify()."
            )
        self.config = config
        self.optimizer = optimizer
        self.method = get_method(config.method)
        self.schedule = None
        if self.method.updates_topology:
            if total_steps is None or total_steps < 1:
                raise ValueError(
                    f"method {config.method!r} schedules its updates over training: pass total_steps=<number of "
                    "optimizer steps>."
                )
            self.schedule = schedule_for(config, total_steps)
        self.unit_slices = self._unit_slices(model)  # per layer: [None] (the whole layer), or its q/k/v slices
        # Layers that store only their live units (block layers: their values resize): they collect a dense-gradient
        # window for the momentum of absent units, and DDP skips their values.
        self._windowed = [i for i, (_, layer) in enumerate(self.layers) if layer.resizable_parameters]
        self.resizes_parameters = bool(self._windowed)
        check_sharded_training(model, self.resizes_parameters)  # FSDP1, or block layers under FSDP: one line
        self.apply_masks()  # under FSDP2: shards each mask like its weight (sparse_nlp.parallel.fsdp)
        # Momentum from the optimizer, or a gradient average kept here (not for block layers: see
        # topology/block_scores.py). Indexed by position in self.layers.
        self.momentum = MomentumTracker(
            optimizer, [layer.weight for _, layer in self.layers], config.momentum_beta, config.adam_momentum
        )
        self.replicas = Replicas()
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # growth draws; distinct from the init's
        self.step_count = 0
        self.update_count = 0
        self.density_history: list[dict] = [self._density_record()]  # {"step": s, "densities": {layer: density}}
        self._plan_dense_grad_collection()
        # The hook holds the layers, not the controller, so that dropping the controller removes it.
        hook = optimizer.register_step_post_hook(_weights_changed_hook([layer for _, layer in self.layers]))
        weakref.finalize(self, hook.remove)

    # ---- training-loop hooks -------------------------------------------------------------------------------
    def step(self) -> Optional[dict]:
        """After each optimizer step. Returns the update's statistics when the topology changed, else None."""
        self.apply_masks()
        if self.method.needs_momentum:
            self.momentum.observe(skip=self._windowed)
        self._fold_dense_grads()
        self.step_count += 1
        stats = None
        if self.schedule is not None and self.schedule.is_update_step(self.step_count):
            stats = self.update()
        self._plan_dense_grad_collection()
        return stats

    # ---- dense gradients of block-sparse layers (the momentum of absent blocks) -----------------------------
    def _collects_dense_grads(self) -> bool:
        return self.resizes_parameters and self.schedule is not None and (
            self.method.needs_momentum or self.method.needs_gradient or self.config.regrown_state == "fresh"
        )  # fresh: new blocks take their gradient scale from the window, whatever the method scores

    def _plan_dense_grad_collection(self) -> None:
        """Tell block layers whether the next step's backward should also compute the dense dW."""
        collect = False
        if self._collects_dense_grads():
            if self.config.block_momentum == "exact":  # every step up to the last update, none after it
                collect = self.step_count < self.schedule.last_update_step
            else:  # fast: only in the window of steps just before the next update
                upcoming = self.step_count + 1
                interval = self.config.update_interval
                next_update = -(-upcoming // interval) * interval
                collect = next_update <= self.schedule.last_update_step and next_update - upcoming < self.config.momentum_window
        for i in self._windowed:
            self.layers[i][1].collect_dense_gradients(collect)

    def _fold_dense_grads(self) -> None:
        beta = self.config.momentum_beta if self.config.block_momentum == "exact" else None
        layers = [self.layers[i][1] for i in self._windowed]
        if not layers:
            return
        # each rank's step is of its local batch: average first (the squares need the whole batch's)
        self.replicas.average_dense_gradients(layers)
        squares = ((self.config.block_scores == "collected" and self.config.adam_momentum == "normalized")
                   or self.config.regrown_state == "fresh")  # fresh: new blocks' gradient scale from the window
        for layer in layers:
            layer.end_step(beta, squares)

    def apply_masks(self) -> None:
        for _, layer in self.layers:
            layer.apply_mask()

    @property
    def planned_updates(self) -> int:
        """Topology updates in the whole run (0 for a static mask)."""
        return self.schedule.num_updates if self.schedule is not None else 0

    @torch.no_grad()
    def update(self) -> dict:
        """Update the topology now (prune, redistribute, grow). Returns the update's statistics:

        - ``prune_rate``; ``pruned`` / ``grown``: units (weights, or blocks of block-sparse layers) the plans pruned
          and grew; a unit regrown where it was just pruned counts in both;
        - ``moved``: weights now active at a position that was absent before the update (block layers: blocks x
          block_size^2); ``removed``: weights absent at a position that was active. A method that regrows what it
          prunes (sparse momentum, RigL, SET) has ``moved == removed``; gradual pruning has ``moved == 0``.
        """
        if self.schedule is None:  # static: the mask never changes
            return {"prune_rate": 0.0, "pruned": 0, "grown": 0, "moved": 0, "removed": 0}
        before = [layer.whole_mask().clone() for _, layer in self.layers]
        self.replicas.check_values_agree(self.layers)  # what DDP does not sync (block values) agrees over ranks
        prune_rate = self.schedule.prune_rate_at(self.step_count)
        context = UpdateContext(self.optimizer, self.method, self.config, self.generator, self.replicas)
        contexts = [context.for_layer(self.momentum.of(i)) for i in range(len(self.layers))]
        states = [layer.layer_state(name, contexts[i]) for i, (name, layer) in enumerate(self.layers)]
        # The topology units the method sees: a layer, or with fused_qkv="split" each of q, k, v of a fused one.
        units = [(i, piece, piece.unit_state(state) if piece is not None else state)
                 for i, state in enumerate(states) for piece in self.unit_slices[i]]
        plans = self.method.plan([unit for _, _, unit in units], prune_rate, self.schedule.progress(self.step_count))
        expected = [0] * len(self.layers)
        grown_in = [[] for _ in self.layers]
        for n, ((i, piece, unit), plan) in enumerate(zip(units, plans)):
            expected[i] += unit.nonzeros - plan.prune + plan.grow
            prune_scores = self.method.prune_scores(unit)
            grow_scores = self.method.grow_scores(unit) if plan.grow else None
            grown = update_layer_topology(unit, plan, prune_scores, grow_scores)
            grown_in[i].append(piece.write_back(states[i], unit, grown) if piece is not None else grown)
            if n + 1 == len(units) or units[n + 1][0] != i:
                states[i].release()  # the layer's floats are done with (FSDP2: gathered copies); its new mask stays
        for i, ((_, layer), state) in enumerate(zip(self.layers, states)):
            layer.apply_update(state, torch.cat(grown_in[i]), contexts[i])  # the same on every rank
            if layer.active_units != expected[i]:  # cannot happen unless a method breaks the contract: fail loudly
                raise RuntimeError(f"{state.name}: {layer.active_units} active units after update, planned {expected[i]}.")
        if self.config.block_momentum == "fast":  # the next window starts afresh
            for _, layer in self.layers:
                layer.clear_dense_gradients()
        self.apply_masks()
        self.update_count += 1
        self.density_history.append(self._density_record())
        moved, removed = self._changed_weights(before, [state.mask for state in states])
        return {
            "prune_rate": prune_rate,
            "pruned": sum(p.prune for p in plans),
            "grown": sum(p.grow for p in plans),
            "moved": moved,
            "removed": removed,
        }

    def _unit_slices(self, model: nn.Module) -> list[list]:
        if self.config.fused_qkv == "joint":
            return [[None] for _ in self.layers]
        slices = [q_k_v_slices(model, name, layer) or [None] for name, layer in self.layers]
        if all(pieces == [None] for pieces in slices):
            raise ValueError("fused_qkv=split: no sparse layer is a fused q/k/v projection (GPT-2's c_attn, GPT-NeoX, "
                             "Falcon, Phi-3 have one); leave fused_qkv=joint for this model.")
        return slices

    def _changed_weights(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[int, int]:
        """(turned on, turned off) weights between the whole masks ``before`` and ``after``, counted in weights.

        ``after``: the updated states' masks (the layer's own, or under FSDP2 the whole copy its shards were written
        from), so nothing is gathered a second time.
        """
        turned_on = turned_off = 0
        for (_, layer), old, now in zip(self.layers, before, after):
            turned_on += int((now & ~old).sum()) * layer.unit_size
            turned_off += int((old & ~now).sum()) * layer.unit_size
        return turned_on, turned_off

    # ---- reporting -----------------------------------------------------------------------------------------
    def report(self) -> list[LayerReport]:
        return [LayerReport(name, layer.weight_shape, layer.nonzeros, layer.density) for name, layer in self.layers]

    def density(self) -> float:
        """Overall density of the sparse layers."""
        return overall_density(self.layers)

    def prune_rate(self) -> float:
        return self.schedule.prune_rate_at(self.step_count) if self.schedule is not None else 0.0

    def _density_record(self) -> dict:
        return {"step": self.step_count, "densities": {r.name: r.density for r in self.report()}}

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Controller state. The masks themselves are buffers in the model's ``state_dict``."""
        return {
            "config": self.config.to_dict(),
            "step_count": self.step_count,
            "update_count": self.update_count,
            "generator": self.generator.get_state(),
            "momentum": self.momentum.state_dict(),
            "density_history": list(self.density_history),
            "layers": {name: {"shape": list(layer.weight_shape), "nonzeros": layer.nonzeros} for name, layer in self.layers},
            # block layers inside a momentum window: the gradients collected so far (a resumed run scores the same)
            "dense_grads": {name: state for name, layer in self.layers
                            if (state := layer.dense_gradient_state()) is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore; load the model's state_dict (masks) first. Refuses state from another model or density."""
        saved = state["config"]
        for key in ("density", "method", "distribution", "block_size"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"checkpoint was made with {key}={saved.get(key)!r} but this run has {key}="
                    f"{getattr(self.config, key)!r}; resume with the same sparsity settings."
                )
        for _, layer in self.layers:  # FSDP2: masks loaded into their shards are counted again
            layer.recount()
        ours = {name: list(layer.weight_shape) for name, layer in self.layers}
        theirs = {name: entry["shape"] for name, entry in state["layers"].items()}
        if ours != theirs:
            differing = sorted((set(ours) ^ set(theirs)) or {n for n in ours if ours[n] != theirs[n]})
            raise ValueError(
                f"checkpoint is from a different model: sparse layers differ (e.g. {differing[0]}); "
                "resume with the model the checkpoint was trained with."
            )
        for name, layer in self.layers:
            if layer.nonzeros != state["layers"][name]["nonzeros"]:
                raise ValueError(
                    f"{name} holds {layer.nonzeros} active weights but the checkpoint says "
                    f"{state['layers'][name]['nonzeros']}; load the model's state_dict (with its masks) first."
                )
        self.step_count = state["step_count"]
        self.update_count = state["update_count"]
        self.density_history = list(state["density_history"])
        self.generator.set_state(state["generator"])
        self.momentum.load_state_dict(state["momentum"])
        for name, layer in self.layers:
            layer.load_dense_gradient_state(state["dense_grads"].get(name))


def _weights_changed_hook(layers: list):
    """An optimizer step post-hook that tells `layers` their weights may have changed."""

    def weights_changed(optimizer, args, kwargs) -> None:
        for layer in layers:
            layer.mark_weights_changed()

    return weights_changed
