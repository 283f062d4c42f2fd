"""Compact export: drop MLP hidden units that sparsity left dead, giving a smaller dense model.

A hidden unit of an MLP (``down(act(up(x)))``) can go when its output column in ``down`` is empty (nobody reads
it), or when its input rows in ``up`` are all empty: then it is the constant ``act(bias)``, whose contribution is
folded into ``down``'s bias (impossible without a bias unless the constant is 0, as SiLU-gated Llama units are).
Every layer keeps the same number of units (the largest any layer needs; config files hold one size), the extra
ones zeroed so they contribute exactly 0. The result is a plain transformers model that ``save_pretrained`` /
``from_pretrained`` handle as usual, with the same outputs.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from sparse_nlp.architectures import MLP_LAYOUTS
from sparse_nlp.layers.base import stores_in_out, weight_out_in
from sparse_nlp.model import sparse_layers, unsparsify


def _resize_units(layer: nn.Module, keep: torch.Tensor, is_input: bool) -> None:
    """Keep only the given hidden units: rows of an input projection, columns of the output projection."""
    weight = weight_out_in(layer).detach()
    weight = weight[keep] if is_input else weight[:, keep]
    stored = weight.t() if stores_in_out(layer) else weight
    layer.weight = nn.Parameter(stored.contiguous())
    if is_input and layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if not stores_in_out(layer):
        layer.out_features, layer.in_features = weight.shape
    else:  # Conv1D
        layer.nf = weight.shape[0]


@torch.no_grad()
def compact_export(model: nn.Module) -> nn.Module:
    """A smaller dense copy of ``model`` (sparse or not) without dead MLP units; ``model`` is left unchanged."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MLP_LAYOUTS:
        raise ValueError(f"compact export knows the MLPs of {', '.join(MLP_LAYOUTS)}; got model type {model_type!r}.")
    layout = MLP_LAYOUTS[model_type]
    plain = copy.deepcopy(model).cpu().float()
    if sparse_layers(plain):
        unsparsify(plain)
    blocks = layout.blocks(plain)
    live_units = []
    for block in blocks:
        inputs = [getattr(block, name) for name in layout.inputs]
        output = getattr(block, layout.output)
        width = weight_out_in(inputs[0]).shape[1]
        constant = layout.hidden_of_zero(block, width)  # a unit whose input rows are all empty is this value
        read = weight_out_in(output).ne(0).any(dim=0)
        fed = torch.stack([weight_out_in(layer).ne(0).any(dim=1) for layer in inputs]).any(dim=0)
        foldable = output.bias is not None or constant.eq(0)
        dead = ~read | (~fed & foldable)
        fold = ~fed & read & foldable  # constant units: move their contribution into the output bias
        if fold.any():
            contribution = weight_out_in(output)[:, fold] @ constant[fold]
            if output.bias is not None:
                output.bias += contribution
        live_units.append(~dead)
    size = max(1, max(int(units.sum()) for units in live_units))
    for block, units in zip(blocks, live_units):
        keep = units.nonzero().squeeze(1)
        padding = (~units).nonzero().squeeze(1)[: size - keep.numel()]  # zeroed: they contribute exactly 0
        order = torch.cat([keep, padding])
        for name in layout.inputs:
            layer = getattr(block, name)
            if padding.numel():
                weight_out_in(layer)[padding] = 0
                if layer.bias is not None:
                    layer.bias[padding] = 0
            _resize_units(layer, order, is_input=True)
        output = getattr(block, layout.output)
        if padding.numel():
            weight_out_in(output)[:, padding] = 0
        _resize_units(output, order, is_input=False)
    setattr(plain.config, layout.config_field, size)
    return plain
