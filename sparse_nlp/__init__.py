"""sparse_nlp: train sparse transformers for language.

    model = sparse_nlp.sparsify(model, density=0.2)              # patch linear layers in place
    controller = sparse_nlp.SparsityController(model, optimizer, total_steps=10_000)
    ... loss.backward(); optimizer.step(); controller.step(); optimizer.zero_grad()

    plan = sparse_nlp.plan_widening(config, 4, SparsityConfig(density=1.0))   # 4x wider, as many nonzero weights
"""
from sparse_nlp.compile_support import compile_model
from sparse_nlp.config import SparsityConfig
from sparse_nlp.controller import LayerReport, SparsityController
from sparse_nlp.layers.base import SparseLayer
from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.layers.masked import SparseLinear
from sparse_nlp.methods import TopologyMethod, known_methods, register_method
from sparse_nlp.model import sparse_layers, sparsify, unsparsify
from sparse_nlp.width import WideningPlan, plan_widening, widen_config, widened_layer_density

__all__ = [
    "BlockSparseLinear",
    "SparseLayer",
    "compile_model",
    "SparsityConfig",
    "SparsityController",
    "LayerReport",
    "SparseLinear",
    "TopologyMethod",
    "known_methods",
    "register_method",
    "sparse_layers",
    "sparsify",
    "unsparsify",
    "WideningPlan",
    "plan_widening",
    "widen_config",
    "widened_layer_density",
]

# Trainer integration, imported on first use: transformers.Trainer takes seconds to import.
_LAZY = {"SparseTrainer": "sparse_nlp.integrations.trainer", "SparsityCallback": "sparse_nlp.integrations.callback"}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sparse_nlp' has no attribute {name!r}")
