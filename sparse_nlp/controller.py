"""`SparsityController`: drives the topology of a sparsified model during training, beside any optimizer.

Call ``step()`` after every ``optimizer.step()`` (and before ``zero_grad``): it zeroes masked weights, keeps the
momentum statistics, advances the schedule and updates the topology when due. The optimizer is never wrapped.

Each update's statistics come back from ``step()`` / ``update()``; ``density_history`` keeps every layer's density
at the start and after each update (saved with the controller, so a resumed run keeps the whole history).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.topology.block_scores import block_layer_state
from sparse_nlp.config import SparsityConfig
from sparse_nlp.parallel.ddp import all_reduce_dense_grads, broadcast_masks, check_block_values_agree, is_distributed
from sparse_nlp.topology.fused_qkv import q_k_v_slices
from sparse_nlp.methods import LayerState, get_method, update_layer_topology
from sparse_nlp.topology.optimizer_state import MomentumTracker
from sparse_nlp.topology.schedule import schedule_for
from sparse_nlp.parallel.fsdp import (
    GatheredLayerState,
    check_sharded_training,
    is_sharded,
    local,
    local_part,
    positions_mask,
)
from sparse_nlp.model import CONFIG_ATTRIBUTE, sparse_layers


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
            raise ValueError("the model has no sparse layers; call sparse_nlp.model(model, ...) first.")
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
        self.block_layers = [layer for _, layer in self.layers if isinstance(layer, BlockSparseLinear)]
        self.unit_slices = self._unit_slices(model)  # per layer: [None] (the whole layer), or its q/k/v slices
        check_sharded_training(model, bool(self.block_layers))  # FSDP1, or block layers under FSDP: one line
        self.apply_masks()  # under FSDP2: shards each mask like its weight (sparse_nlp.parallel.fsdp)
        # Fine-grained layers: momentum from the optimizer, or a gradient average kept here (block layers: see
        # block_topology). Indexed by position in self.layers.
        self.momentum = MomentumTracker(
            optimizer, [layer.weight for _, layer in self.layers], config.momentum_beta, config.adam_momentum
        )
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # growth draws; distinct from the init's
        self.step_count = 0
        self.update_count = 0
        self.density_history: list[dict] = [self._density_record()]  # {"step": s, "densities": {layer: density}}
        self._plan_dense_grad_collection()

    # ---- training-loop hooks -------------------------------------------------------------------------------
    def step(self) -> Optional[dict]:
        """After each optimizer step. Returns the update's statistics when the topology changed, else None."""
        self.apply_masks()
        if self.method.needs_momentum:
            self.momentum.observe(skip=self.block_layers)
        self._fold_dense_grads()
        self.step_count += 1
        stats = None
        if self.schedule is not None and self.schedule.is_update_step(self.step_count):
            stats = self.update()
        self._plan_dense_grad_collection()
        return stats

    # ---- dense gradients of block-sparse layers (the momentum of absent blocks) -----------------------------
    def _collects_dense_grads(self) -> bool:
        return bool(self.block_layers) and self.schedule is not None and (
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
        for layer in self.block_layers:
            layer.collect_dense_grad = collect

    def _fold_dense_grads(self) -> None:
        beta = self.config.momentum_beta if self.config.block_momentum == "exact" else None
        if is_distributed():  # each rank's step is of its local batch: average first (the squares need the whole)
            all_reduce_dense_grads(self.block_layers)
        squares = ((self.config.block_scores == "collected" and self.config.adam_momentum == "normalized")
                   or self.config.regrown_state == "fresh")  # fresh: new blocks' gradient scale from the window
        for layer in self.block_layers:
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
        before = [self._whole_mask(layer).clone() for _, layer in self.layers]
        if is_distributed() and self.block_layers:  # (the dense gradients were averaged over ranks at every step)
            check_block_values_agree([(n, l) for n, l in self.layers if isinstance(l, BlockSparseLinear)])
        prune_rate = self.schedule.prune_rate_at(self.step_count)
        states = [self._layer_state(i, name, layer) for i, (name, layer) in enumerate(self.layers)]
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
            if isinstance(states[i], GatheredLayerState) and (n + 1 == len(units) or units[n + 1][0] != i):
                states[i].release()  # FSDP2: the layer's gathered floats are done with; its new mask stays
        for i, ((_, layer), state) in enumerate(zip(self.layers, states)):
            grown = torch.cat(grown_in[i])
            if isinstance(layer, BlockSparseLinear):  # the state was a copy over blocks: move the blocks now
                if is_distributed():  # rank 0's blocks, before the values move (they must match the mask)
                    broadcast_masks([state.mask])
                fresh = self.config.regrown_state == "fresh"
                layer.set_block_mask(state.mask, self.optimizer,
                                     regrown_scale=layer.dense_grad_mean_square() if fresh else None)
            elif is_sharded(layer.mask):  # FSDP2: the state was a gathered copy; each rank writes its shard back
                self._write_sharded_update(i, layer, state.mask, grown)
            elif self.config.regrown_state != "keep":  # reset: every slot zeroed; fresh: the gradient scale kept
                self.momentum.reset(i, grown, keep_scale=self.config.regrown_state == "fresh")
            active = layer.nonzeros if is_sharded(layer.mask) else int(layer.mask.sum())  # units: weights or blocks
            if active != expected[i]:  # cannot happen unless a method breaks the contract: fail loudly
                raise RuntimeError(f"{state.name}: {active} active units after update, planned {expected[i]}.")
        if self.config.block_momentum == "fast":  # the next window starts afresh
            for layer in self.block_layers:
                layer.clear_dense_grad()
        if is_distributed():  # fine-grained layers: rank 0's masks, and fresh momentum where this rank's differed
            fine = [i for i, (_, layer) in enumerate(self.layers)
                    if not isinstance(layer, BlockSparseLinear) and not is_sharded(layer.mask)]
            for i, changed in zip(fine, broadcast_masks([self.layers[i][1].mask for i in fine])):
                self.momentum.reset(i, changed, keep_scale=self.config.regrown_state == "fresh")
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

    @torch.no_grad()
    def _write_sharded_update(self, index: int, layer, mask: torch.Tensor, grown: torch.Tensor) -> None:
        """FSDP2: rank 0's whole new ``mask`` into every rank's shard; zero weights and state at grown positions."""
        reset = [grown] if self.config.regrown_state != "keep" else []
        if is_distributed():  # every rank decided from the same gathered bytes; rank 0's decision wins anyway
            reset += broadcast_masks([mask])
        layer.write_mask(mask)
        weight = layer.weight.data
        local(weight).masked_fill_(local_part(positions_mask(grown, weight), weight), 0)  # regrown in place: from 0
        for positions in reset:
            self.momentum.reset(index, positions, keep_scale=self.config.regrown_state == "fresh")

    @staticmethod
    def _whole_mask(layer) -> torch.Tensor:
        return layer.mask if isinstance(layer, BlockSparseLinear) else layer.whole_mask()

    def _changed_weights(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[int, int]:
        """(turned on, turned off) weights between the whole masks ``before`` and ``after``, counted in weights.

        ``after``: the updated states' masks (the layer's own, or under FSDP2 the whole copy its shards were written
        from), so nothing is gathered a second time.
        """
        turned_on = turned_off = 0
        for (_, layer), old, now in zip(self.layers, before, after):
            unit = layer.block_size**2 if isinstance(layer, BlockSparseLinear) else 1
            turned_on += int((now & ~old).sum()) * unit
            turned_off += int((old & ~now).sum()) * unit
        return turned_on, turned_off

    def _layer_state(self, index: int, name: str, layer) -> LayerState:
        if isinstance(layer, BlockSparseLinear):
            return block_layer_state(
                name, layer, self.optimizer, self.method, self.generator, self.config.adam_momentum,
                self.config.block_scores,
            )
        gradient = None
        if self.method.needs_gradient:
            gradient = layer.weight.grad
            if gradient is None:
                raise ValueError(
                    f"method {self.config.method!r} grows by gradient but {name} has none: call controller.step() "
                    "after optimizer.step() and before optimizer.zero_grad()."
                )
        momentum = (lambda: self.momentum.momentum(index)) if self.method.needs_momentum else (lambda: None)
        initial = getattr(layer, "initial_nonzeros", None)  # where gradual pruning starts (None: dense)
        if is_sharded(layer.mask):  # FSDP2: whole copies, gathered when read; _write_sharded_update writes back
            sources = {"weight": lambda: layer.weight.data, "momentum": momentum, "gradient": lambda: gradient}
            return GatheredLayerState(name, layer.whole_mask(), sources, layer.target_nonzeros, self.generator, initial)
        return LayerState(name=name, weight=layer.weight.data, mask=layer.mask, momentum=momentum(), gradient=gradient,
                          target_nonzeros=layer.target_nonzeros, generator=self.generator, initial_nonzeros=initial)

    # ---- reporting -----------------------------------------------------------------------------------------
    def report(self) -> list[LayerReport]:
        return [LayerReport(name, layer.weight_shape, layer.nonzeros, layer.density) for name, layer in self.layers]

    def density(self) -> float:
        """Overall density of the sparse layers."""
        return sum(l.nonzeros for _, l in self.layers) / sum(l.weight_shape[0] * l.weight_shape[1] for _, l in self.layers)

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
            "dense_grads": {name: state for name, layer in self.layers if isinstance(layer, BlockSparseLinear)
                            and (state := layer.dense_grad_state()) is not None},
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
            if not isinstance(layer, BlockSparseLinear):
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
        # Absent in checkpoints of older versions: the history then starts here.
        self.density_history = list(state.get("density_history") or [self._density_record()])
        self.generator.set_state(state["generator"])
        self.momentum.load_state_dict(state["momentum"])
        collected = state.get("dense_grads", {})  # absent in checkpoints of older versions
        for name, layer in self.layers:
            if isinstance(layer, BlockSparseLinear):
                layer.load_dense_grad_state(collected.get(name))
