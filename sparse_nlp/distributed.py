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


def block_values_names(model: torch.nn.Module) -> list[str]:
    """Names of the block-sparse layers' ``values``: they change size at topology updates, so DDP must skip them."""
    from sparse_nlp.block_layers import BlockSparseLinear  # here: block_layers sits above this module

    return [f"{name}.values" if name else "values" for name, module in model.named_modules()
            if isinstance(module, BlockSparseLinear)]


def ignore_block_values_in_ddp(model: torch.nn.Module) -> list[str]:
    """Call before DDP wraps ``model``: DDP leaves the block ``values`` alone; sync them with ``all_reduce_block_grads``."""
    names = block_values_names(model)
    model._ddp_params_and_buffers_to_ignore = names
    return names


@torch.no_grad()
def all_reduce_block_grads(model: torch.nn.Module) -> None:
    """Average the block ``values`` gradients over ranks, in one flat bucket.

    Custom loops call this after every synchronising backward (not inside ``no_sync``), before clipping and the
    optimizer step; a layer without a gradient on every rank must have none on all of them.
    """
    if not is_distributed():
        return
    grads = [p.grad for n, p in model.named_parameters() if n in set(block_values_names(model)) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # (total live-block weights,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
