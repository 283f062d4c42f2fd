"""The patcher: which layers of a model become sparse (targeting) and the swap itself.

`sparsify` patches a model's linear layers in place; `unsparsify` takes the patch back out. Targets are every linear
layer, a list of names, a regex, or a ``filter_fn``. Linear layers come in two layouts: ``nn.Linear`` stores its
weight [out, in]; transformers' ``Conv1D`` (GPT-2) stores it [in, out] (``sparse_nlp.layers.base`` says which is
which). The output embedding (the LM head, often tied to the input embedding) is never matched by ``all-linear``:
sparsifying it would also sparsify the tied token embeddings.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from sparse_nlp.config import DENSE, SparsityConfig
from sparse_nlp.layers.base import is_linear, out_in_shape, sparse_layers, weight_out_in
from sparse_nlp.layers.block import BlockSparseLinear, block_grid, pool_blocks
from sparse_nlp.layers.masked import SparseLinear
from sparse_nlp.methods import get_method
from sparse_nlp.topology.allocation import plan_nonzeros

ALL_LINEAR = "all-linear"

FilterFn = Callable[[nn.Module, str], bool]


def _output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the output embedding and of any linear layer whose weight is an embedding's weight (tied)."""
    excluded = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is output and output is not None:
            excluded.add(name)
        elif is_linear(module) and id(module.weight) in embedding_weights:
            excluded.add(name)
    return excluded


def _name_matches(name: str, target_modules: Union[str, Sequence[str], None], target_regex: Optional[str]) -> bool:
    if target_regex is not None:
        return re.fullmatch(target_regex, name) is not None
    if target_modules is None or target_modules == ALL_LINEAR or list(target_modules) == [ALL_LINEAR]:
        return True
    if isinstance(target_modules, str):  # a single string other than all-linear is a regex, as in PEFT
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_layers(
    model: nn.Module,
    target_modules: Union[str, Sequence[str], None] = None,
    target_regex: Optional[str] = None,
    filter_fn: Optional[FilterFn] = None,
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to sparsify, in model order. Raises a one-line ValueError when nothing matches."""
    uses_all_linear = target_regex is None and (
        target_modules is None or target_modules == ALL_LINEAR or list(target_modules) == [ALL_LINEAR]
    )
    excluded = _output_embedding_names(model) if uses_all_linear else set()
    linear_names = [name for name, m in model.named_modules() if is_linear(m)]
    matched = []
    for name, module in model.named_modules():
        if not is_linear(module) or name in excluded:
            continue
        if not _name_matches(name, target_modules, target_regex):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        matched.append((name, module))
    if not matched:
        candidates = ", ".join(linear_names[:12]) + (", ..." if len(linear_names) > 12 else "")
        wanted = target_regex or target_modules or ALL_LINEAR
        raise ValueError(
            f"no linear layer matched target {wanted!r}"
            + (" and filter_fn" if filter_fn is not None else "")
            + f"; linear layers in this model: {candidates or 'none'}."
        )
    return matched


CONFIG_ATTRIBUTE = "sparsity_config"


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model``'s submodule ``name`` is (a dotted path)."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)  # where sparsify leaves its config on the model, for trainers to find


def check_divisible(targets: list[tuple[str, nn.Module]], block_size: int) -> None:
    for name, module in targets:
        shape = out_in_shape(module)
        if shape[0] % block_size or shape[1] % block_size:
            raise ValueError(
                f"{name} has weight shape {list(shape)}, not divisible by block_size {block_size}; choose a block size "
                "that divides it, or leave the layer out with target_modules/filter_fn."
            )


def _config_from(density: Optional[float], config: Optional[SparsityConfig], options: dict) -> SparsityConfig:
    if density is not None:
        options = {"density": density, **options}
    names = {f.name for f in dataclasses.fields(SparsityConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"sparsify() got unknown option(s) {unknown}; known options: {sorted(names)}.")
    return dataclasses.replace(config, **options) if config is not None else SparsityConfig(**options)


def _initial_mask(magnitude: torch.Tensor, nonzeros: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """Mask over units (weights or blocks) of the given |w| (or block mean |w|) tensor."""
    flat = torch.zeros(magnitude.numel(), dtype=torch.bool)
    if init == "random":
        keep = torch.randperm(magnitude.numel(), generator=generator)[:nonzeros]
    else:  # magnitude: the largest pretrained weights or blocks (ties: lower index first)
        scores = torch.nan_to_num(magnitude.detach().float().reshape(-1).cpu(), nan=-1.0)
        keep = torch.sort(scores, descending=True, stable=True).indices[:nonzeros]
    flat[keep] = True
    return flat.view(magnitude.shape)


def _unit_magnitude(module: nn.Module, block_size: int) -> torch.Tensor:
    """|w| per unit the topology moves: weights in stored layout, or blocks over the [out, in] grid."""
    if block_size == 1:
        return module.weight.detach().abs()
    return pool_blocks(weight_out_in(module), block_size)


@torch.no_grad()
def sparsify(
    model: nn.Module,
    density: Optional[float] = None,
    *,
    config: Optional[SparsityConfig] = None,
    filter_fn: Optional[FilterFn] = None,
    **options,
) -> nn.Module:
    """Make ``model``'s linear layers sparse, in place, and return the model.

    ``density`` (default 0.2) and any :class:`SparsityConfig` field (``method``, ``target_modules``,
    ``target_regex``, ``distribution``, ``init``, ``seed``, ...) may be given as keywords, or a whole ``config``.
    ``filter_fn(module, name) -> bool`` further restricts the targets. Masked weights are set to zero; the mask is
    a buffer of each patched layer (saved in ``state_dict``). Nothing is changed if any check fails.
    """
    config = _config_from(density, config, options)
    if config.method == DENSE:
        raise ValueError("method 'dense' means no sparsity: train the model as it is, without sparsify().")
    if sparse_layers(model):
        raise ValueError("this model is already sparsified; call sparse_nlp.unsparsify(model) first to re-sparsify.")
    targets = find_target_layers(model, config.target_modules, config.target_regex, filter_fn)
    if any(name == "" for name, _ in targets):
        raise ValueError("sparsify() patches layers inside a model; wrap a bare linear layer in an nn.Module first.")
    method = get_method(config.method)
    block = config.block_size
    if block > 1:
        check_divisible(targets, block)
    unit_shapes = [tuple(m.weight.shape) if block == 1 else block_grid(out_in_shape(m), block) for _, m in targets]
    planned = plan_nonzeros(unit_shapes, config.density, config.distribution)  # weights, or blocks
    # where each layer starts: at its planned count, or (gradual pruning) dense or at initial_density
    starts = planned if not method.starts_dense else plan_nonzeros(unit_shapes, config.initial_density,
                                                                   config.distribution)
    generator = torch.Generator().manual_seed(config.seed)
    masks = []  # all masks first, so a failure leaves the model untouched
    for (_, module), shape, nonzeros in zip(targets, unit_shapes, starts):
        if method.starts_dense and config.initial_density == 1:
            masks.append(torch.ones(shape, dtype=torch.bool))
        else:
            masks.append(_initial_mask(_unit_magnitude(module, block), nonzeros, config.init, generator))
    for (name, module), mask, target, start in zip(targets, masks, planned, starts):
        initial = start if method.starts_dense and config.initial_density < 1 else None  # None: dense start
        if block == 1:
            layer = SparseLinear(module, mask, target_units=target, initial_units=initial)
        else:
            layer = BlockSparseLinear.from_dense(module, mask, block, target_units=target, initial_units=initial)
        replace_module(model, name, layer)
    setattr(model, CONFIG_ATTRIBUTE, config)
    return model


@torch.no_grad()
def unsparsify(model: nn.Module) -> nn.Module:
    """Give back a plain model, in place: every sparse layer replaced by its base layer with masked weights zeroed.

    The result holds no sparse_nlp objects, so vanilla transformers can ``save_pretrained``/``from_pretrained`` it.
    """
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("this model has no sparse layers; nothing to unsparsify.")
    for name, layer in layers:
        replace_module(model, name, layer.to_base_layer())
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model
