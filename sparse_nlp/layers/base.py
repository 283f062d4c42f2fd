"""What every sparse layer is: the linear layers it can replace, and the one interface the controller uses.

Linear layers come in two layouts: ``nn.Linear`` stores its weight [out, in]; transformers' ``Conv1D`` (GPT-2)
stores it [in, out]. ``stores_in_out`` is the one place that tells them apart.
"""
from __future__ import annotations

from torch import nn

try:  # transformers is a dependency, but keep the module importable for plain torch models
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def stores_in_out(module: nn.Module) -> bool:
    """True for a layer whose weight is stored [in, out] (transformers' Conv1D), False for nn.Linear's [out, in]."""
    return not isinstance(module, nn.Linear)


def out_in_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D, whatever its stored layout."""
    rows, cols = module.weight.shape
    return (cols, rows) if stores_in_out(module) else (rows, cols)


def weight_out_in(module: nn.Module):
    """The weight of an nn.Linear or a Conv1D as [out, in] (a transposed view for Conv1D)."""
    return module.weight.t() if stores_in_out(module) else module.weight
