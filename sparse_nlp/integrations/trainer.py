"""`SparseTrainer`: a `transformers.Trainer` that trains a sparse model (or, with method "dense", a dense one).

    trainer = SparseTrainer(model=model, args=training_args, train_dataset=..., sparsity_config=SparsityConfig(0.2))
    trainer.train()                                   # sparsifies the model first if it is not sparse yet
    trainer.sparsity_controller.report()              # per-layer nonzeros and densities

Everything sparse happens in :class:`SparsityCallback` (which works in a plain Trainer too); this class adds:
- the settings: ``sparsity_config=`` or the config ``sparsify`` stored on the model (``model.sparsity_config``);
- sparsity metrics in the training logs *before* they reach ``report_to`` (TensorBoard, W&B, ...), with the
  per-layer densities kept off the console (see ``sparse_nlp.integrations.console``: one line per topology update instead);
- a check, before anything is loaded, that ``resume_from_checkpoint`` is a checkpoint of this model and these
  sparsity settings (a one-line ``ValueError`` instead of a state-dict size-mismatch wall);
- under DDP, no per-forward buffer broadcast (unless ``ddp_broadcast_buffers`` is set): the masks are buffers, and
  the controller already makes every rank hold rank 0's masks after each topology update
  (see ``sparse_nlp.parallel.ddp``), so re-sending them at every forward would only cost bandwidth. It is passed to
  DDP under the name the installed torch knows (``forward_sync_buffers`` from torch 2.13, whose
  ``broadcast_buffers`` warns on every rank), not through ``args``, which stay as given;
- block-sparse layers under DDP: DDP skips their resizable ``values`` and this trainer averages their gradients
  after each synchronising backward (``training_step``), before clipping and the optimizer step;
- FSDP2 (``fsdp=True, fsdp_config={"version": 2}``, or accelerate's FSDP config) for fine-grained layers: masks
  are sharded beside their weights (``sparse_nlp.parallel.fsdp``); FSDP1, DeepSpeed and block-sparse layers under FSDP
  are refused at start with one line saying what to use instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from accelerate.utils import DistributedDataParallelKwargs
from safetensors import safe_open
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from sparse_nlp.compile_support import let_dynamo_resize_parameters
from sparse_nlp.config import DENSE, SparsityConfig
from sparse_nlp.controller import SparsityController
from sparse_nlp.integrations.callback import CONTROLLER_FILE, SparsityCallback
from sparse_nlp.integrations.console import hide_layer_densities
from sparse_nlp.model import CONFIG_ATTRIBUTE, sparse_layers, sparsify
from sparse_nlp.parallel.clipping import clip_active_grad_norm_, supports_active_clipping
from sparse_nlp.parallel.ddp import (
    NO_FORWARD_BUFFER_SYNC,
    all_reduce_block_grads,
    block_values_names,
    ignore_block_values_in_ddp,
)
from sparse_nlp.parallel.fsdp import BLOCK_LAYERS_REFUSAL, DEEPSPEED_REFUSAL, FSDP1_REFUSAL

MATCHED_SETTINGS = ("density", "method", "distribution", "block_size")  # a resumed or pre-sparsified run must agree on these


class SparseTrainer(Trainer):
    def __init__(self, model: Optional[torch.nn.Module] = None, args: Optional[TrainingArguments] = None, *trainer_args,
                 sparsity_config: Optional[SparsityConfig] = None, **kwargs) -> None:
        if model is None:
            raise ValueError("SparseTrainer needs a model (model_init is not supported: sparsify needs the model).")
        config = _resolve_config(model, sparsity_config)
        if config.method != DENSE and not sparse_layers(model):
            sparsify(model, config=config)
        self.sparsity_config = config
        sparse = config.method != DENSE
        # DDP (wrapped at train time) must skip the block values; their gradients are averaged in training_step.
        self._block_values = ignore_block_values_in_ddp(model) if sparse else []
        if self._block_values and args is not None and args.torch_compile:
            let_dynamo_resize_parameters()  # compilation asked for: one graph through every topology update
        super().__init__(model, args, *trainer_args, **kwargs)
        self.sparsity_callback: Optional[SparsityCallback] = None
        if not sparse:
            return
        if self.is_deepspeed_enabled:
            raise ValueError(DEEPSPEED_REFUSAL)
        if self.is_fsdp_enabled:
            if getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
                raise ValueError(FSDP1_REFUSAL)
            if any(layer.resizable_parameters for _, layer in sparse_layers(model)):
                raise ValueError(BLOCK_LAYERS_REFUSAL)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, SparsityCallback)]
        self.sparsity_callback = found[0] if found else SparsityCallback(config)
        if not found:
            self.add_callback(self.sparsity_callback)
        self.sparsity_callback.syncs_block_grads = True
        hide_layer_densities(self.callback_handler)

    @property
    def sparsity_controller(self) -> Optional[SparsityController]:
        """The controller of the current (or last) training run; None before train() and for dense runs."""
        return self.sparsity_callback.controller if self.sparsity_callback is not None else None

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, trial=None,
              ignore_keys_for_eval: Optional[list[str]] = None, **kwargs) -> TrainOutput:
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            check_checkpoint(self.model, resume_from_checkpoint, self.sparsity_config)
        if self.sparsity_callback is not None:
            self.sparsity_callback.resume_from_checkpoint = resume_from_checkpoint or None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint or None, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.sparsity_callback is not None and "loss" in logs:  # training-step logs only, not eval/summary
            logs.update(self.sparsity_callback.log_metrics())
        super().log(logs, start_time)

    def _wrap_model(self, model, training=True, dataloader=None):
        model = super()._wrap_model(model, training, dataloader)
        # Here, just before accelerator.prepare wraps the model in DDP: transformers 4.x rebuilds accelerate's DDP
        # settings from args in _wrap_model, 5.x in __init__. ddp_broadcast_buffers, when set, is the user's to keep.
        if training and self.sparsity_callback is not None and self.args.ddp_broadcast_buffers is None:
            self.accelerator.ddp_handler = _without_forward_buffer_sync(self.accelerator.ddp_handler)
        return model

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._block_values and self.accelerator.sync_gradients:  # the synchronising backward (not under no_sync)
            all_reduce_block_grads(self.model)  # a no-op on one process
        return loss

    def _clip_grad_norm(self, model):
        # Sparse runs clip by the norm of what the optimizer applies, without absent weights (sparse_nlp.parallel.clipping).
        if self.sparsity_callback is None or not supports_active_clipping(self.accelerator):
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16 loss scaling: true gradients first (a no-op otherwise)
        return clip_active_grad_norm_(model, self.args.max_grad_norm)

    def _issue_warnings_after_load(self, load_result) -> None:
        # Checkpoints store tied weights once (lm_head.weight is the token embedding): not a missing key.
        tied = set(getattr(self.model, "_tied_weights_keys", None) or ())
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(type(load_result)(missing, load_result.unexpected_keys))


@dataclass
class _DDPKwargs(DistributedDataParallelKwargs):
    """accelerate's DDP settings plus torch's ``forward_sync_buffers``, which accelerate has no field for yet."""

    forward_sync_buffers: Optional[bool] = None  # None: not passed (accelerate passes only settings off their default)


def _without_forward_buffer_sync(handler: Optional[DistributedDataParallelKwargs]) -> _DDPKwargs:
    """A copy of accelerate's DDP settings (None: the defaults) that DDP reads as: no buffer sync at each forward."""
    handler = handler if handler is not None else DistributedDataParallelKwargs()
    settings = {f.name: getattr(handler, f.name) for f in fields(DistributedDataParallelKwargs)}
    return _DDPKwargs(**{**settings, **NO_FORWARD_BUFFER_SYNC})


def _resolve_config(model, given: Optional[SparsityConfig]) -> SparsityConfig:
    stored = getattr(model, CONFIG_ATTRIBUTE, None)
    if given is None:
        if stored is None and not sparse_layers(model):
            raise ValueError(
                "no sparsity settings: pass sparsity_config=SparsityConfig(...) (method='dense' for a dense run) "
                "or a model made by sparse_nlp.sparsify()."
            )
        return stored
    if sparse_layers(model):
        if given.method == DENSE:
            raise ValueError("sparsity_config says method='dense' but the model is sparsified; unsparsify it first.")
        if stored is not None:
            for key in MATCHED_SETTINGS:
                if getattr(given, key) != getattr(stored, key):
                    raise ValueError(
                        f"the model was sparsified with {key}={getattr(stored, key)!r} but sparsity_config has "
                        f"{key}={getattr(given, key)!r}; pass the same settings (or none, to use the model's)."
                    )
    return given


# ---- checkpoint checks -------------------------------------------------------------------------------------
def _checkpoint_shapes(folder: str) -> Optional[dict[str, list[int]]]:
    """Tensor name -> shape in a checkpoint's safetensors file(s), read from headers only; None if not found."""
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted({os.path.join(folder, name) for name in json.load(f)["weight_map"].values()})
    else:
        return None
    shapes = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def check_checkpoint(model: torch.nn.Module, folder: str, config: SparsityConfig) -> None:
    """Raise a one-line ValueError unless ``folder`` is a checkpoint of this model with these sparsity settings."""
    if not os.path.isdir(folder):
        raise ValueError(f"checkpoint folder {folder} does not exist.")
    controller_file = os.path.join(folder, CONTROLLER_FILE)
    sparse = config.method != DENSE
    if sparse and os.path.isfile(controller_file):
        saved = torch.load(controller_file, map_location="cpu", weights_only=True)["controller"]["config"]
        for key in MATCHED_SETTINGS:
            if saved.get(key) != getattr(config, key):
                raise ValueError(
                    f"checkpoint {folder} was trained with {key}={saved.get(key)!r} but this run has "
                    f"{key}={getattr(config, key)!r}; resume with the same sparsity settings."
                )
    theirs = _checkpoint_shapes(folder)
    if theirs is None:
        return  # not a safetensors checkpoint (e.g. DeepSpeed/FSDP): the Trainer's own loading checks it
    ours = model.state_dict()
    ours_sparse, theirs_sparse = (any(k.endswith((".mask", ".block_mask")) for k in keys) for keys in (ours, theirs))
    resizable = set(block_values_names(model))
    if ours_sparse != theirs_sparse:
        what, this = ("a sparse", "dense") if theirs_sparse else ("a dense", "sparse")
        raise ValueError(f"checkpoint {folder} is from {what} run but this run is {this}; resume with the same --method.")
    stored = {t.data_ptr() for key, t in ours.items() if key in theirs}
    for key, tensor in ours.items():
        if key in resizable and key in theirs and list(tensor.shape[1:]) == theirs[key][1:]:
            continue  # live blocks: their number moves with the topology
        if key in theirs and list(tensor.shape) != theirs[key]:
            raise ValueError(
                f"checkpoint {folder} is from a different model: {key} has shape {theirs[key]} there but "
                f"{list(tensor.shape)} here."
            )
        if key not in theirs and tensor.data_ptr() not in stored:  # tied weights are saved once
            raise ValueError(f"checkpoint {folder} is from a different model: it has no {key}.")
    unexpected = sorted(set(theirs) - set(ours))
    if unexpected:
        raise ValueError(f"checkpoint {folder} is from a different model: this model has no {unexpected[0]}.")
    if sparse and not os.path.isfile(controller_file):
        raise ValueError(f"checkpoint {folder} holds no sparsity state ({CONTROLLER_FILE} is missing).")
