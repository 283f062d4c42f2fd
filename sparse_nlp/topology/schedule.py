"""When the topology changes and by how much: update steps, prune-rate decay, training progress."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparse_nlp.config import SparsityConfig


@dataclass(frozen=True)
class TopologySchedule:
    total_steps: int  # optimizer steps in the whole run
    update_interval: int  # optimizer steps between topology updates
    prune_rate: float  # prune rate at step 0
    decay: str = "cosine"  # "cosine": to 0 at the end of the update window (the reference: to 0.005); "constant"
    end_fraction: float = 1.0  # updates stop after this fraction of training
    # True for methods that prune by the rate (sparse momentum, RigL, SET): an update at rate 0 would prune and grow
    # nothing, so it is not scheduled (nor, in block mode, the dense-gradient window before it). Cosine reaches 0
    # exactly at end_step, which is an update step whenever the interval divides it.
    skip_zero_rate: bool = False

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {self.total_steps}.")

    @property
    def end_step(self) -> int:
        """The step at which the prune rate has decayed to 0; no update happens after it."""
        return max(1, math.floor(self.total_steps * self.end_fraction))

    @property
    def last_update_step(self) -> int:
        """The last step that updates the topology (0: none does)."""
        last = (self.end_step // self.update_interval) * self.update_interval
        if self.skip_zero_rate and last > 0 and self.prune_rate_at(last) == 0:
            # cosine is 0 only at end_step; a constant rate of 0 is 0 everywhere
            last = 0 if self.prune_rate_at(self.update_interval) == 0 else last - self.update_interval
        return last

    @property
    def num_updates(self) -> int:
        """How many topology updates the whole run makes."""
        return self.last_update_step // self.update_interval

    def is_update_step(self, step: int) -> bool:
        return 0 < step <= self.last_update_step and step % self.update_interval == 0

    def prune_rate_at(self, step: int) -> float:
        if self.decay == "constant":
            return self.prune_rate
        fraction = min(step / self.end_step, 1.0)
        return 0.5 * self.prune_rate * (1.0 + math.cos(math.pi * fraction))

    def progress(self, step: int) -> float:
        """0 at the start, 1 at the last topology update (gradual pruning reaches its target there)."""
        if self.last_update_step == 0:
            return 1.0
        return min(step / self.last_update_step, 1.0)


def schedule_for(config: "SparsityConfig", total_steps: int) -> TopologySchedule:
    """The schedule a run of ``config`` follows over ``total_steps`` (the controller's)."""
    from sparse_nlp.methods import get_method  # late import: methods import the config

    return TopologySchedule(
        total_steps, config.update_interval, config.prune_rate, config.prune_rate_decay, config.update_end_fraction,
        skip_zero_rate=get_method(config.method).prunes_by_rate,
    )
