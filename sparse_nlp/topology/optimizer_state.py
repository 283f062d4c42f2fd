"""Reading momentum from any optimizer, and restarting its state where weights are regrown.

- SGD with momentum: ``momentum_buffer``.
- Adam / AdamW (anything with ``exp_avg`` and ``exp_avg_sq``): ``exp_avg / (sqrt(exp_avg_sq) + eps)``, as the
  reference implementation does (``adam="raw"``: ``exp_avg``).
- Any other optimizer (Adagrad, RMSprop, plain SGD, ...): an exponential average of gradients kept here.
The optimizer itself is never wrapped or patched: its state is read, and written at regrown positions.
Under FSDP2 parameters and their state are DTensor shards: momentum is read as a DTensor (the controller gathers it
for an update), and each rank writes the regrown positions of its own shard.

Where a weight is regrown (``regrown_state``): ``reset`` zeroes every slot of the weight's shape; ``fresh`` zeroes
the momentum slots and keeps the gradient-scale slots (``SCALE_SLOTS``); ``keep`` writes nothing. Why keeping the
scale is the fresh start: AdamW bias-corrects with one step count per tensor, t. After a reset, a regrown weight's
``exp_avg_sq`` averages only its k << t squared gradients since regrowth but is divided by 1 - b2^t, not 1 - b2^k:
it reads (1 - b2^k) / (1 - b2^t) of the mean squared gradient, so its steps and its normalised momentum come out too
large (t = 1,000: steps ~5x a fresh parameter's at k = 10; momentum read ~2.6x at the next update, k = 100). The
straight-through mask sends the gradient to absent weights at every step, so their ``exp_avg_sq`` averages t
squared gradients at that very position on the tensor's own clock: what a fresh parameter's bias-corrected
``exp_avg_sq`` estimates, with less noise. Momentum restarts at zero as a fresh parameter's does (``keep`` carries
the momentum gathered while absent into the first steps); not corrected for k, it builds up over ~20 steps, so a
regrown weight's first steps are smaller than an established weight's and grow to them.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from sparse_nlp.parallel.fsdp import is_sharded, local, local_part, positions_mask, shard_like, whole

ADAM_EPS = 1e-8
# Optimizer slots that estimate the gradient's scale, not its direction (AdamW / AMSGrad, Adamax, RMSprop and
# Adadelta, Adagrad): ``regrown_state="fresh"`` keeps them at regrown positions. Every other slot is zeroed there.
SCALE_SLOTS = ("exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "acc_delta", "sum")


def optimizer_momentum(state: dict, adam: str = "normalized") -> Optional[torch.Tensor]:
    """The momentum an optimizer keeps for one parameter, or None if it keeps none.

    ``adam``: how Adam's is read, ``normalized`` (exp_avg / sqrt(exp_avg_sq), the reference's) or ``raw`` (exp_avg).
    """
    if isinstance(state.get("exp_avg"), torch.Tensor) and isinstance(state.get("exp_avg_sq"), torch.Tensor):
        if adam == "raw":
            return state["exp_avg"]
        return state["exp_avg"] / (state["exp_avg_sq"].sqrt() + ADAM_EPS)
    if isinstance(state.get("momentum_buffer"), torch.Tensor):
        return state["momentum_buffer"]
    return None


def scale_slots_from_gradients(
    optimizer: torch.optim.Optimizer, param: torch.nn.Parameter, mean_square: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The gradient-scale slots a fresh weight of ``param`` would hold on the tensor's own clock, given the mean
    square of its gradients (same shape as the slots it fills); ``{}`` where that cannot be said.

    AdamW (and Adam) keep ``exp_avg_sq`` = (1 - b2^t) E[g^2] after t steps of gradients of mean square E[g^2], and
    bias-correct by 1 - b2^t: filled so, a regrown weight's steps are scaled as an established weight's. For block
    layers, whose absent blocks have no optimizer state to keep (``regrown_state="fresh"`` with ``block_size > 1``).
    Other optimizers, and a parameter that has not stepped yet, get ``{}`` (their new state starts at zero).
    """
    state = optimizer.state.get(param, {})
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None or "betas" not in group or not isinstance(state.get("exp_avg_sq"), torch.Tensor):
        return {}
    step = float(state["step"]) if "step" in state else 0.0
    if step < 1:
        return {}
    beta2 = float(group["betas"][1])
    filled = (mean_square * (1 - beta2**step)).to(state["exp_avg_sq"].dtype)
    slots = {"exp_avg_sq": filled}
    if isinstance(state.get("max_exp_avg_sq"), torch.Tensor):  # AMSGrad: the largest seen is at least this
        slots["max_exp_avg_sq"] = filled.clone()
    return slots


def gather_rows(old: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Rows ``old[source]``, with zeros where ``source`` is -1 (a block that is new)."""
    survives = source >= 0
    new = old.new_zeros((source.numel(), *old.shape[1:]))
    new[survives] = old[source[survives]]
    return new


@torch.no_grad()
def remap_rows(
    optimizer: Optional[torch.optim.Optimizer], param: torch.nn.Parameter, source: torch.Tensor, old_rows: int
) -> None:
    """After ``param`` (a block layer's live blocks) was resized: every slot that had its old shape ([old_rows, ...])
    follows it, row i of the new slot being old row ``source[i]`` (-1: a new block, whose slots start at 0)."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    old_shape = (old_rows, *param.shape[1:])
    for key, value in list(state.items()):
        if isinstance(value, torch.Tensor) and tuple(value.shape) == old_shape:
            state[key] = gather_rows(value, source)


@torch.no_grad()
def fill_scale_rows(
    optimizer: Optional[torch.optim.Optimizer], param: torch.nn.Parameter, rows: torch.Tensor,
    mean_square: torch.Tensor,
) -> None:
    """Give the new ``rows`` of ``param`` the gradient-scale slots of a fresh weight whose gradients have this mean
    square (``scale_slots_from_gradients``; ``regrown_state="fresh"`` for block layers)."""
    if optimizer is None:
        return
    state = optimizer.state.get(param, {})
    for key, value in scale_slots_from_gradients(optimizer, param, mean_square).items():
        state[key][rows] = value


class LayerMomentum:
    """One layer's view of a ``MomentumTracker``: read its momentum, zero its optimizer slots at positions."""

    def __init__(self, tracker: "MomentumTracker", index: int):
        self.tracker, self.index = tracker, index

    def read(self) -> torch.Tensor:
        return self.tracker.momentum(self.index)

    def reset(self, flat_positions: torch.Tensor, keep_scale: bool = False) -> None:
        self.tracker.reset(self.index, flat_positions, keep_scale)


class MomentumTracker:
    """Momentum per parameter: the optimizer's own where it has one, else a gradient average kept here."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, params: Iterable[torch.nn.Parameter], beta: float,
        adam: str = "normalized",
    ):
        self.optimizer = optimizer
        self.params = list(params)
        self.beta = beta
        self.adam = adam
        self.gradient_average: dict[int, torch.Tensor] = {}  # by index into params

    def _needs_own_average(self, param: torch.nn.Parameter) -> bool:
        return optimizer_momentum(self.optimizer.state.get(param, {})) is None

    def of(self, index: int) -> LayerMomentum:
        return LayerMomentum(self, index)

    @torch.no_grad()
    def observe(self, skip: Iterable[int] = ()) -> None:
        """Fold this step's gradients into the averages of parameters whose optimizer keeps no momentum.

        ``skip``: indices of parameters left out (block layers' live blocks: they resize).
        """
        skipped = set(skip)
        for i, param in enumerate(self.params):
            if i in skipped or param.grad is None or not self._needs_own_average(param):
                continue
            grad = param.grad.detach()
            if i not in self.gradient_average:
                self.gradient_average[i] = torch.zeros_like(grad)
            self.gradient_average[i].mul_(self.beta).add_(grad, alpha=1 - self.beta)

    def momentum(self, index: int) -> torch.Tensor:
        param = self.params[index]
        found = optimizer_momentum(self.optimizer.state.get(param, {}), self.adam)
        if found is not None:
            return found
        if index in self.gradient_average:
            return self.gradient_average[index]
        return torch.zeros_like(param)  # nothing observed yet: no position is preferred

    @torch.no_grad()
    def reset(self, index: int, flat_positions: torch.Tensor, keep_scale: bool = False) -> None:
        """Zero every optimizer slot of the parameter's shape (AdamW: exp_avg and exp_avg_sq) at these positions.

        ``keep_scale``: leave the ``SCALE_SLOTS`` (AdamW: exp_avg_sq) as they are, zero the rest (exp_avg).
        """
        if flat_positions.numel() == 0:
            return
        param = self.params[index]
        slots = [value for slot, value in self.optimizer.state.get(param, {}).items()
                 if isinstance(value, torch.Tensor) and value.shape == param.shape
                 and not (keep_scale and slot in SCALE_SLOTS)]
        if index in self.gradient_average:
            slots.append(self.gradient_average[index])
        if is_sharded(param):  # positions of the whole parameter: this rank zeroes those in its shard
            chosen = local_part(positions_mask(flat_positions, param), param)
            for value in slots:
                local(value)[chosen] = 0
            return
        for value in slots:
            value.view(-1)[flat_positions] = 0

    def state_dict(self) -> dict:
        """Whole tensors (under FSDP2 gathered: call on every rank)."""
        return {"gradient_average": {i: whole(t).clone() for i, t in self.gradient_average.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.gradient_average = {}
        for i, saved in state.get("gradient_average", {}).items():
            param = self.params[int(i)]
            saved = saved.to(local(param).device)
            self.gradient_average[int(i)] = shard_like(saved, param) if is_sharded(param) else saved
