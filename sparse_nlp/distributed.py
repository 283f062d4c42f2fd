"""Keeping masks identical on every rank.

Every input of a topology update is already the same on all ranks under DDP: gradients (and so momentum) are
all-reduced, weights are updated identically, random growth draws from a generator seeded identically. The masks
therefore agree by construction; after each update rank 0's masks are broadcast anyway, so that a rank that
drifted (a non-deterministic kernel, a float tie broken differently) is pulled back instead of silently diverging.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def broadcast_masks(masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Overwrite each mask with rank 0's; return, per mask, the flat positions that changed on this rank."""
    changed = []
    for mask in masks:
        as_bytes = mask.to(torch.uint8)  # gloo cannot broadcast bool
        dist.broadcast(as_bytes, src=0)
        received = as_bytes.bool()
        changed.append((received != mask).view(-1).nonzero().squeeze(1))
        mask.copy_(received)
    return changed
