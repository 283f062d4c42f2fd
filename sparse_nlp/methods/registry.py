"""Methods by name. Add your own with ``register_method(MyMethod)`` (its ``name`` becomes the key)."""
from __future__ import annotations

from sparse_nlp.methods.base import TopologyMethod
from sparse_nlp.methods.magnitude import GradualMagnitude
from sparse_nlp.methods.momentum import SparseMomentum
from sparse_nlp.methods.rigl import RigL
from sparse_nlp.methods.set import SET
from sparse_nlp.methods.static import Static

_METHODS: dict[str, type[TopologyMethod]] = {m.name: m for m in (SparseMomentum, RigL, SET, Static, GradualMagnitude)}


def register_method(method: type[TopologyMethod]) -> type[TopologyMethod]:
    if not method.name:
        raise ValueError(f"{method.__name__} needs a class attribute `name` to be registered.")
    _METHODS[method.name] = method
    return method


def known_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> TopologyMethod:
    if name not in _METHODS:
        raise ValueError(f"unknown sparsity method {name!r}; known methods: {', '.join(sorted(_METHODS))}.")
    return _METHODS[name]()
