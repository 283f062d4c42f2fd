"""The recipes' ``--width_multiplier``: the sparse run trains a wider model at the per-layer density that keeps its
nonzero linear weights at ``--density`` x the base dense model's; the dense baseline keeps the base width.

    sparse_model_args, sparse_sparsity = widened_sparse_run(model_args, sparsity)   # raises one-line ValueErrors
    train_one("sparse", sparse_sparsity, sparse_model_args, ...)                   # e.g. n_embd 1024, density 0.0625
    train_one("dense", dense_sparsity, model_args, ...)                            # n_embd 256

The base model is the one ``model_args`` describe (``DEFAULT_MODEL`` or ``--config_name``, with
``--config_overrides``); the sparse run's ``model_args`` carry the widening in their config overrides, so
``training.build_model`` builds it as it builds any new model. The arithmetic is ``sparse_nlp.width``'s.
"""
from __future__ import annotations

import dataclasses

from sparse_nlp import SparsityConfig
from sparse_nlp.lm.arguments import ModelArguments
from sparse_nlp.lm.training import base_model_config
from sparse_nlp.width import check_width_multiplier, plan_widening


def widened_sparse_run(model_args: ModelArguments,
                       sparsity: SparsityConfig) -> tuple[ModelArguments, SparsityConfig]:
    """The sparse run's ``(model_args, sparsity)``: the base model widened by ``model_args.width_multiplier`` (as
    ``--config_overrides`` with the widened fields set or added; ``width_multiplier`` 1.0 in the copy, since it describes
    the widened model itself) and ``sparsity`` at density / multiplier^2. A multiplier of 1 returns both unchanged.
    The inputs are not modified; the dense baseline keeps using them."""
    multiplier = model_args.width_multiplier
    check_width_multiplier(multiplier)
    if multiplier == 1:
        return model_args, sparsity
    if model_args.model_name_or_path:
        raise ValueError(f"--width_multiplier {multiplier:g} builds a new, wider model and cannot keep the pretrained "
                         f"weights of --model_name_or_path {model_args.model_name_or_path}; to train its architecture "
                         f"widened from scratch, pass --config_name {model_args.model_name_or_path} instead.")
    plan = plan_widening(base_model_config(model_args), multiplier, sparsity)
    overrides = dict(item.split("=", 1) for item in model_args.config_overrides.split(",")) \
        if model_args.config_overrides else {}
    overrides.update({name: str(value) for name, value in plan.changes.items()})  # widened values replace given ones
    overrides = ",".join(f"{name}={value}" for name, value in overrides.items())
    return dataclasses.replace(model_args, config_overrides=overrides, width_multiplier=1.0), plan.sparsity
