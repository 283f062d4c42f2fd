"""`sparsify` patches a model's linear layers in place; `unsparsify` takes the patch back out."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from sparse_nlp.allocation import plan_nonzeros
from sparse_nlp.config import DENSE, SparsityConfig
from sparse_nlp.layers import SparseLinear
from sparse_nlp.methods import get_method
from sparse_nlp.targeting import FilterFn, find_target_layers

CONFIG_ATTRIBUTE = "sparsity_config"  # where sparsify leaves its config on the model, for trainers to find


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseLinear]]:
    """The model's sparse layers (name, module), in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLinear)]


def _config_from(density: Optional[float], config: Optional[SparsityConfig], options: dict) -> SparsityConfig:
    if density is not None:
        options = {"density": density, **options}
    names = {f.name for f in dataclasses.fields(SparsityConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"sparsify() got unknown option(s) {unknown}; known options: {sorted(names)}.")
    return dataclasses.replace(config, **options) if config is not None else SparsityConfig(**options)


def _initial_mask(weight: torch.Tensor, nonzeros: int, init: str, generator: torch.Generator) -> torch.Tensor:
    flat = torch.zeros(weight.numel(), dtype=torch.bool)
    if init == "random":
        keep = torch.randperm(weight.numel(), generator=generator)[:nonzeros]
    else:  # magnitude: the largest pretrained weights (ties: lower index first)
        magnitude = torch.nan_to_num(weight.detach().float().abs().reshape(-1).cpu(), nan=-1.0)
        keep = torch.sort(magnitude, descending=True, stable=True).indices[:nonzeros]
    flat[keep] = True
    return flat.view(weight.shape)


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
    planned = plan_nonzeros([tuple(m.weight.shape) for _, m in targets], config.density, config.distribution)
    generator = torch.Generator().manual_seed(config.seed)
    masks = []  # all masks first, so a failure leaves the model untouched
    for (_, module), nonzeros in zip(targets, planned):
        if method.starts_dense:
            masks.append(torch.ones_like(module.weight, dtype=torch.bool, device="cpu"))
        else:
            masks.append(_initial_mask(module.weight, nonzeros, config.init, generator))
    for (name, module), mask, nonzeros in zip(targets, masks, planned):
        parent_name, _, child_name = name.rpartition(".")
        layer = SparseLinear(module, mask)
        layer.target_nonzeros = nonzeros
        setattr(model.get_submodule(parent_name), child_name, layer)
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
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.to_base_layer())
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    return model
