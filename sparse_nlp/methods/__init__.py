"""Sparsity methods: strategies over one shared topology update (see base.py)."""
from sparse_nlp.methods.base import LayerPlan, LayerState, TopologyMethod, update_layer_topology
from sparse_nlp.methods.registry import get_method, known_methods, register_method

__all__ = ["LayerPlan", "LayerState", "TopologyMethod", "update_layer_topology", "get_method", "known_methods", "register_method"]
