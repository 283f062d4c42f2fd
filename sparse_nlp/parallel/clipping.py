"""Gradient clipping by the norm of what the optimizer applies.

A fine-grained sparse layer's mask is straight-through in the backward (``sparse_nlp.layers.masked``): its weight gradient is
dense, so that the optimizer's momentum of *absent* weights is real (sparse momentum grows where it is largest).
Those gradients never move the model (the masked weights are zeroed after every step), but a clip by the plain
total norm counts them, and so clips a sparse model harder than a dense one: an effective learning-rate cut that
has nothing to do with sparsity (recipes/train_lm.py's model at initialization, density 0.2, one batch of the corpus:
total norm 3.79, active 3.45).

    clip_active_grad_norm_(model, max_norm=1.0)   # instead of torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)

The norm counts active positions only; the clip coefficient then scales *every* gradient, absent positions
included, so the momentum statistics of absent weights see the same scale as the weights they compete with.
Block-sparse layers store live blocks only, so their gradients are all active. For a model without sparse layers
this is exactly ``torch.nn.utils.clip_grad_norm_``. ``SparseTrainer`` clips sparse runs this way (``max_grad_norm``;
under DDP the gradients are already all-reduced when it clips); dense runs keep the Trainer's own clip.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from sparse_nlp.layers.masked import SparseLinear
from sparse_nlp.parallel.fsdp import whole


def _masks_by_parameter(model: nn.Module) -> dict[int, torch.Tensor]:
    return {id(m.weight): m.mask for m in model.modules() if isinstance(m, SparseLinear)}


def _active_grads(model: nn.Module) -> tuple[list[nn.Parameter], list[torch.Tensor]]:
    """Parameters with a gradient, and their gradients at active positions (absent ones 0, copies)."""
    masks = _masks_by_parameter(model)
    params = [p for p in model.parameters() if p.grad is not None]  # a tied tensor comes once
    grads = [p.grad if id(p) not in masks else torch.where(masks[id(p)], p.grad, 0) for p in params]
    return params, grads


@torch.no_grad()
def active_grad_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm of all gradients, fine-grained sparse layers' weight gradients at active positions only."""
    return get_total_norm(_active_grads(model)[1])


@torch.no_grad()
def clip_active_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale all gradients by ``min(1, max_norm / (active norm + 1e-6))``; return the active norm before clipping.

    torch's own norm and scaling (``get_total_norm``, ``clip_grads_with_norm_``): on a model without fine-grained
    sparse layers this is ``torch.nn.utils.clip_grad_norm_``, bit for bit.
    """
    params, grads = _active_grads(model)
    total = get_total_norm(grads)  # FSDP2: a DTensor, reduced over the ranks' shards
    clip_grads_with_norm_(params, max_norm, total)
    return whole(total)


# Where the Trainer's clip is not a plain clip over local gradients: sharded or engine-managed parameters.
ENGINE_CLIPPING = ("FSDP", "DEEPSPEED", "XLA", "MEGATRON_LM")


def supports_active_clipping(accelerator) -> bool:
    """True where the Trainer clips gradients this module can read: whole local tensors (one process, DDP: already
    all-reduced) or FSDP2's DTensor shards (their norms are reduced over ranks by DTensor itself).

    Under FSDP1, DeepSpeed, XLA or Megatron the engine owns the clip; there the Trainer's plain clip stays.
    """
    if getattr(accelerator, "is_fsdp2", False):
        return True
    return getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type)) not in ENGINE_CLIPPING
