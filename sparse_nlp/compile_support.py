"""What lets torch.compile keep one graph for block-sparse layers across topology updates.

A topology update changes a layer's number of live blocks: `values` and the layout's index buffers get a new size
on dim 0. These helpers make that size symbolic in compiled graphs and let the resize happen while compiled guards
hold weak references to the parameter (sparse_nlp/layers/block.py calls them; ``compile_model`` is the public call).
"""
from __future__ import annotations

import copyreg
import weakref
from typing import Callable

import torch


def compile_model(model: torch.nn.Module, **compile_options) -> Callable:
    """``torch.compile(model, **compile_options)`` for a model with block-sparse layers, in a custom training loop:
    first ``let_dynamo_resize_parameters()``, so that topology updates do not recompile. (``SparseTrainer`` with
    ``torch_compile=True`` does the same.) A model without block layers needs nothing: plain torch.compile works."""
    let_dynamo_resize_parameters()
    return torch.compile(model, **compile_options)


def let_dynamo_resize_parameters() -> None:
    """Let torch.compile give the live-block dimension of `values` and the layout buffers a dynamic size.

    A process-wide dynamo setting: changed only where compilation of a block-sparse model is asked for
    (``compile_model``, ``SparseTrainer`` with ``torch_compile``), never by building a layer.

    Dynamo forces every nn.Module parameter and buffer to a static shape by default
    (torch._dynamo.config.force_parameter_static_shapes), so each topology update, which changes the number of live
    blocks, would recompile the model until dynamo's recompile limit (8) sends it back to eager. Turned off, only
    tensors marked dynamic (here: the block dimension) or whose size actually changed get a symbolic size: parameters
    of other modules, whose shapes never change, compile as before.
    """
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and getattr(dynamo.config, "force_parameter_static_shapes", False):
        dynamo.config.force_parameter_static_shapes = False


def mark_block_dim_dynamic(t: torch.Tensor) -> None:
    """Compile dim 0 (the live blocks) with a symbolic size from the start: no recompile at any update.

    Unbacked (size-oblivious) rather than dynamic: a dynamic size is still specialised at 0 and 1, so a layer whose
    count passes through 1 or 0 (tiny layers, or redistribution emptying one) would recompile the model each time.
    """
    decorators = getattr(getattr(torch, "_dynamo", None), "decorators", None)
    mark = getattr(decorators, "mark_unbacked", None)
    if mark is not None and t.dim() > 0:
        mark(t, 0)


def swap_tensors(t1: torch.Tensor, t2: torch.Tensor) -> None:
    """torch.utils.swap_tensors, also when t1 has weak references.

    torch.compile keeps weak references to the parameters of a compiled model (its guards), and swap_tensors refuses
    those ("Cannot swap t1 because it has weakref associated with it"). The references point at the Python object,
    which swapping keeps, with the new contents: the guards then check the new size, which is what they must see.
    So where t1 has weak references the same swap is done with the check skipped.
    """
    if not weakref.getweakrefs(t1):
        torch.utils.swap_tensors(t1, t2)
        return
    if weakref.getweakrefs(t2) or t1._use_count() > 2 or type(t1) is not type(t2):
        raise RuntimeError("cannot resize values: other references hold them; free graphs and copies first")
    if t1._use_count() == 2 and t1.is_leaf:  # what swap_tensors does: poison the old gradient accumulator
        torch.autograd.graph.get_gradient_edge(t1).node.register_prehook(_poisoned)
    for name in ("__dict__", *copyreg._slotnames(type(t1))):
        if hasattr(t1, name) or hasattr(t2, name):
            first, second = getattr(t1, name, _MISSING), getattr(t2, name, _MISSING)
            _set_or_del(t1, name, second)
            _set_or_del(t2, name, first)
    torch._C._swap_tensor_impl(t1, t2)


_MISSING = object()


def _set_or_del(obj, name, value) -> None:
    if value is _MISSING:
        delattr(obj, name)
    else:
        setattr(obj, name, value)


def _poisoned(grad_outputs):
    raise RuntimeError("backward through a graph built before a topology update resized this layer's values")
