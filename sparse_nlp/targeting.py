"""Which modules get sparsified: every linear layer, a list of names, a regex, or a ``filter_fn``.

Linear layers come in two layouts: ``nn.Linear`` stores its weight [out, in]; transformers' ``Conv1D`` (GPT-2)
stores it [in, out]. Both are supported. The output embedding (the LM head, often tied to the input embedding)
is never matched by ``all-linear``: sparsifying it would also sparsify the tied token embeddings.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence, Union

from torch import nn

try:  # transformers is a dependency, but keep the module importable for plain torch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
ALL_LINEAR = "all-linear"

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


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
