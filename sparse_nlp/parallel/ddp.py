"""Several processes (DDP): the same masks, weights and topology decisions on every rank.

Every input of a topology update is the same on all ranks: gradients (and so momentum) are all-reduced, weights
are updated identically, random growth draws from a generator seeded identically. The masks therefore agree by
construction; after each update rank 0's masks are broadcast anyway, so that a rank that drifted (a
non-deterministic kernel, a float tie broken differently) is pulled back instead of silently diverging.

Block-sparse layers store their live blocks in ``values``, which changes size at every topology update; DDP's
reducer cannot follow that. So DDP skips them (``ignore_block_values_in_ddp``, before wrapping) and their gradients
are averaged here, in one flat bucket, after each synchronising backward (``all_reduce_block_grads``;
``SparseTrainer`` does both). The dense gradient a block layer collects for the momentum of its blocks is a
per-rank sum over the local batch: ``all_reduce_dense_grads`` averages each step's over ranks before the layer
folds it into its sums (their squares too, so those must be of the whole batch's gradient).
``check_block_values_agree`` makes a custom loop that forgot the gradient sync fail loudly at the first update.

The masks are buffers, and they already agree: ``NO_FORWARD_BUFFER_SYNC`` are the DDP arguments that stop DDP
re-sending them at every forward, under the name this torch knows.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch
import torch.distributed as dist

from sparse_nlp.layers.base import SparseLayer

# torch 2.13 deprecated DDP's broadcast_buffers (a FutureWarning on every rank) for forward_sync_buffers, its
# per-forward half: with it off, DDP still copies rank 0's buffers once when it wraps the model, which for the masks
# only confirms what the controller guarantees. Older torch has only broadcast_buffers, which skips that copy too.
_DDP_ARGUMENTS = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGUMENTS
                          else {"broadcast_buffers": False})


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


def _resizable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every sparse layer's parameter that changes size at topology updates (block values)."""
    return [(f"{name}.{attribute}" if name else attribute, getattr(module, attribute))
            for name, module in model.named_modules() if isinstance(module, SparseLayer)
            for attribute in module.resizable_parameters]


def block_values_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that change size at topology updates (block layers' ``values``): DDP must skip them."""
    return [name for name, _ in _resizable(model)]


def ignore_block_values_in_ddp(model: torch.nn.Module) -> list[str]:
    """Call before DDP wraps ``model``: DDP leaves the block ``values`` alone; sync them with ``all_reduce_block_grads``."""
    names = block_values_names(model)
    if names:  # torch's own entry point for it (documented in DDP's source); it replaces any earlier list: extend it
        already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", None) or [])
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, already + [name for name in names if name not in already])
    return names


def _average_in_place(tensors: Sequence[torch.Tensor]) -> None:
    """Average tensors over ranks with one all-reduce of a flat fp32 bucket (gloo has no AVG: sum, then divide)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


@torch.no_grad()
def all_reduce_block_grads(model: torch.nn.Module) -> None:
    """Average the block ``values`` gradients over ranks, in one flat bucket.

    Custom loops call this after every synchronising backward (not inside ``no_sync``), before clipping and the
    optimizer step; a layer without a gradient on every rank must have none on all of them.
    """
    if not is_distributed():
        return
    # Every training step under DDP: one walk over the modules.
    _average_in_place([param.grad for _, param in _resizable(model) if param.grad is not None])


@torch.no_grad()
def all_reduce_dense_grads(layers: Sequence[torch.nn.Module]) -> None:
    """Average over ranks the dense gradient each block layer collected in this optimizer step."""
    if not is_distributed():
        return
    _average_in_place([step for layer in layers if (step := layer.dense_gradient_step()) is not None])


@torch.no_grad()
def check_block_values_agree(layers: Sequence[tuple[str, torch.nn.Module]]) -> None:
    """Raise a one-line error if a layer's resizable parameters (block values, which DDP skips) differ across ranks
    (their gradients were not synced)."""
    layers = [(name, layer) for name, layer in layers if layer.resizable_parameters]
    if not is_distributed() or not layers:
        return
    sums = torch.stack([sum(getattr(layer, attribute).detach().double().sum() for attribute in layer.resizable_parameters)
                        for _, layer in layers])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).nonzero().view(-1)
    if differ.numel():
        raise RuntimeError(
            f"block-sparse layer {layers[int(differ[0])][0]} holds different values on different ranks: call "
            "sparse_nlp.parallel.ddp.ignore_block_values_in_ddp(model) before wrapping it in DDP and "
            "all_reduce_block_grads(model) after each synchronising backward (SparseTrainer does both)."
        )


class Replicas:
    """What the ranks of a DDP run do to stay one model through a topology update; in one process, nothing.

    Every input of an update is the same on every rank, so the masks agree by construction; each layer's new mask is
    still overwritten with rank 0's (``agree_on``), so that a rank that drifted is pulled back instead of silently
    diverging, and the positions that changed here are returned for their optimizer state to restart.
    """

    def agree_on(self, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Overwrite each mask with rank 0's; per mask, the flat positions that changed on this rank (none alone)."""
        if not is_distributed():
            return [mask.new_zeros(0, dtype=torch.long) for mask in masks]
        return broadcast_masks(masks)

    def average_dense_gradients(self, layers: Sequence[torch.nn.Module]) -> None:
        all_reduce_dense_grads(layers)

    def check_values_agree(self, layers: Sequence[tuple[str, torch.nn.Module]]) -> None:
        check_block_values_agree(layers)
