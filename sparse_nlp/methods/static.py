"""Static sparsity: the initial random mask is kept for the whole of training (the simplest baseline)."""
from __future__ import annotations

from sparse_nlp.methods.base import TopologyMethod


class Static(TopologyMethod):
    name = "static"
    updates_topology = False
