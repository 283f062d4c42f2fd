"""FSDP2 (``torch.distributed.fsdp.fully_shard``): fine-grained sparse layers whose weights are DTensor shards.

``fully_shard`` turns every parameter into a DTensor shard (by default its dim 0 split over the ranks) and leaves
buffers whole. A fine-grained layer's mask is then sharded exactly like its weight, beside it
(``SparseLinear.apply_mask`` does it the first time it meets a sharded weight): each rank keeps and applies the mask
rows of its own weight rows, so the masked weights are exactly zero on every shard after every optimizer step.

- Forward: FSDP all-gathers the weight, which is therefore already exactly sparse; the layer uses it as it is (the
  straight-through mask would change nothing there and would cost an all-gather of the mask at every forward). The
  weight gradient stays dense, as on one process: FSDP reduce-scatters it, and the optimizer's momentum of absent
  weights is real.
- Topology update (every ``update_interval`` steps): prune, redistribution and growth need a whole layer (top-k over
  its weights and momentum), so the controller gathers each sparse layer's mask, and its weight, momentum (and
  gradient, for RigL) when the method reads them (``SparseLinear.layer_state``: a ``LayerState`` whose tensors are
  gathered at first read), decides on every rank from the same gathered bytes, takes rank 0's decision (one broadcast of the whole
  mask, as under DDP), and every rank writes its own shard back: mask rows, zeros at grown positions, optimizer state
  reset at grown positions.
- Every collective here is called on every rank (topology updates, checkpoints, clipping); a count shown in logs
  (``SparseLinear.nonzeros``) is kept per layer instead of being summed over ranks, because logging and printing
  happen on rank 0 alone.
"""
from __future__ import annotations

import torch

try:  # torch.distributed can be absent from a build (some macOS wheels)
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - no distributed build
    DTensor = None


def is_sharded(tensor) -> bool:
    """True for a DTensor (a parameter, gradient, optimizer state or mask sharded by FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather: call on every rank); a plain tensor is returned as it is."""
    if not is_sharded(tensor):
        return tensor
    if tensor.dtype == torch.bool:  # gloo cannot all-gather bool
        return tensor.to(torch.uint8).full_tensor().bool()
    return tensor.full_tensor()


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, the same on every rank) as a DTensor sharded like ``like``; no communication."""
    return distribute_tensor(tensor, like.device_mesh, like.placements, src_data_rank=None)


def local_part(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole ``tensor``, laid out as ``like``'s local shard (``like`` not sharded: ``tensor``)."""
    if not is_sharded(like):
        return tensor
    part = shard_like(tensor, like).to_local()
    if part.shape != like.to_local().shape:  # a sharding DTensor cannot reproduce (not FSDP2's even chunks)
        raise RuntimeError(
            f"cannot shard a mask like its weight: local shapes {tuple(part.shape)} != {tuple(like.to_local().shape)}; "
            "shard the model with fully_shard's default placements."
        )
    return part


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def positions_mask(flat_positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole bool tensor of ``like``'s shape, True at ``flat_positions``."""
    chosen = torch.zeros(like.shape, dtype=torch.bool, device=flat_positions.device)
    chosen.view(-1)[flat_positions] = True
    return chosen


# ---- what trains under which sharding engine (one-line refusals for the rest) -----------------------------------
DEEPSPEED_REFUSAL = (
    "sparse training does not support DeepSpeed: ZeRO flattens the weights that the masks describe; shard with FSDP2 "
    "instead (TrainingArguments(fsdp=True, fsdp_config={'version': 2}), or accelerate launch --config_file "
    "recipes/accelerate_fsdp_config.yaml), or train with DDP."
)
FSDP1_REFUSAL = (
    "sparse training needs FSDP version 2 (fully_shard): FSDP1 flattens the weights that the masks describe; set "
    "fsdp_config={'version': 2} (accelerate: fsdp_version: 2)."
)
BLOCK_LAYERS_REFUSAL = (
    "block-sparse layers (block_size > 1) do not train under FSDP: their values change size at every topology update, "
    "which FSDP's fixed shards cannot follow (and they hold only live blocks already); train them with DDP "
    "(accelerate launch --multi_gpu), or use block_size=1 under FSDP2."
)


def check_sharded_training(model: torch.nn.Module, has_block_layers: bool) -> None:
    """Raise the one-line refusal if ``model`` is wrapped in a way sparse training cannot follow.

    ``has_block_layers``: some sparse layer has parameters that resize at updates (``resizable_parameters``).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel  # FSDP1

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(FSDP1_REFUSAL)
    if has_block_layers and any(is_sharded(p) for p in model.parameters()):
        raise ValueError(BLOCK_LAYERS_REFUSAL)


def whole_state_dict(model: torch.nn.Module) -> dict:
    """The model's state dict with whole tensors on CPU, under FSDP2 gathered (call on every rank; every rank gets it).

    For saving a final model as a plain transformers checkpoint: ``model.save_pretrained(folder, state_dict=...)``.
    """
    if not any(is_sharded(p) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
