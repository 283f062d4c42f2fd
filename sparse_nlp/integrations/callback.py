"""`SparsityCallback`: sparse training inside any `transformers.Trainer`, as a thin callback.

    trainer = Trainer(model=sparsify(model, 0.2), args=args, ..., callbacks=[SparsityCallback()])

- ``on_train_begin``: builds the :class:`SparsityController` over the Trainer's optimizer (it exists by then) with
  ``total_steps = state.max_steps``; on a resumed run it restores the controller from the checkpoint.
- ``on_optimizer_step``: one controller step per *real* optimizer step. It runs after ``optimizer.step()`` and
  before ``zero_grad`` (gradient-growing methods need the gradient), once per gradient-accumulation cycle. A step
  the fp16 grad scaler skipped (inf/NaN gradients) changed no weight and is not a topology step.
- ``on_save``: writes ``sparsity_controller.pt`` beside the model in each checkpoint. The masks themselves are
  buffers, saved in ``model.safetensors`` with the weights.
- Console: one line per topology update (``print_updates``; rank 0, through tqdm so a progress bar stays intact),
  e.g. ``update 3/8 (step 150): prune rate 0.35, moved 12,345 weights; densest h.0.attn.c_proj 0.45, ...``.
- Logging: ``sparsity/density``, ``sparsity/prune_rate``, ``sparsity/updates`` and, on the first log after each
  topology update, one ``sparsity/<layer>`` density per layer. :class:`SparseTrainer` adds them to the logs before
  they reach ``report_to`` (TensorBoard, ...) and keeps the per-layer ones off the console. With a plain Trainer
  this callback adds them in ``on_log``, after the reporters ran: the three overall metrics reach the printed log,
  and all of them ``trainer.state.log_history``. The controller's ``density_history`` keeps every update's densities.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sparse_nlp.config import SparsityConfig
from sparse_nlp.controller import SparsityController
from sparse_nlp.integrations.console import (
    DENSITY_KEY,
    PRUNE_RATE_KEY,
    UPDATES_KEY,
    format_update_line,
    is_layer_density_key,
    layer_density_key,
)
from sparse_nlp.parallel.ddp import is_distributed

CONTROLLER_FILE = "sparsity_controller.pt"  # controller state, inside each checkpoint folder


class SparsityCallback(TrainerCallback):
    def __init__(
        self, config: Optional[SparsityConfig] = None, *, log_layer_densities: bool = True, print_updates: bool = True
    ):
        self.config = config  # None: the config sparsify() stored on the model
        self.log_layer_densities = log_layer_densities
        self.print_updates = print_updates  # one console line per topology update
        self.controller: Optional[SparsityController] = None
        self.resume_from_checkpoint: Optional[str] = None  # set by SparseTrainer.train; else found in output_dir
        self.skipped_steps = 0  # optimizer steps skipped by the grad scaler (not topology steps)
        self._layers_changed = True  # log per-layer densities at the next log
        self.syncs_block_grads = False  # set by SparseTrainer, which averages block gradients over DDP ranks

    # ---- training events -----------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Optional[torch.nn.Module] = None, optimizer=None, **kwargs) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        # (FSDP2: the model is sharded by now; the controller refuses FSDP1 and block layers under FSDP in one line.)
        self.controller = SparsityController(model, optimizer, self.config, total_steps=state.max_steps)
        if self.controller.resizes_parameters and is_distributed() and not self.syncs_block_grads:
            raise ValueError(
                "block-sparse layers on several processes need SparseTrainer (it keeps DDP off their resizable "
                "values and averages their gradients itself); use SparseTrainer instead of Trainer + SparsityCallback."
            )
        self.skipped_steps = 0
        self._layers_changed = True
        if state.global_step > 0:  # resuming: the Trainer has already loaded weights, masks and optimizer state
            self._load(self._checkpoint_folder(args, state))

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, optimizer=None,
                          **kwargs) -> None:
        if self.controller is None:
            raise RuntimeError("SparsityCallback: optimizer step before on_train_begin; use it through Trainer.train().")
        if getattr(optimizer, "step_was_skipped", False):  # the grad scaler found inf/NaN: no weight changed
            self.skipped_steps += 1
            return
        update = self.controller.step()
        if update is not None:
            self._layers_changed = True
            if self.print_updates and state.is_world_process_zero:
                tqdm.write(self.update_line(update))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self.controller is None:
            return
        saved = self.state_dict()  # on every rank: under FSDP2 it gathers what is sharded
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):  # every rank holds the same state: rank 0 writes it
            torch.save(saved, os.path.join(folder, CONTROLLER_FILE))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict] = None, **kwargs) -> None:
        # Plain-Trainer fallback; SparseTrainer.log has added the metrics already (then this does nothing).
        if logs is None or "loss" not in logs or DENSITY_KEY in logs or self.controller is None:
            return
        metrics = self.log_metrics()
        logs.update({key: value for key, value in metrics.items() if not is_layer_density_key(key)})  # printed next
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    # ---- logging -------------------------------------------------------------------------------------------
    def update_line(self, update: dict) -> str:
        """The console line of the update ``controller.step()`` just returned."""
        controller = self.controller
        return format_update_line(
            controller.update_count, controller.planned_updates, controller.step_count, update,
            controller.density_history[-1]["densities"], controller.density(),
        )

    def log_metrics(self) -> dict[str, float]:
        """Sparsity metrics for the next training log (per-layer densities only after a topology change)."""
        if self.controller is None:
            return {}
        metrics = {
            DENSITY_KEY: self.controller.density(),
            PRUNE_RATE_KEY: self.controller.prune_rate(),
            UPDATES_KEY: self.controller.update_count,
        }
        if self.log_layer_densities and self._layers_changed:
            metrics.update({layer_density_key(r.name): r.density for r in self.controller.report()})
            self._layers_changed = False
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"controller": self.controller.state_dict(), "skipped_steps": self.skipped_steps}

    def _checkpoint_folder(self, args, state) -> str:
        if self.resume_from_checkpoint is not None:
            return self.resume_from_checkpoint
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _load(self, folder: str) -> None:
        path = os.path.join(folder, CONTROLLER_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"cannot resume the sparse run: {path} does not exist (a checkpoint of a dense run, or not this "
                "run's folder? with a plain Trainer, set callback.resume_from_checkpoint to the checkpoint folder)."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.controller.load_state_dict(state["controller"])
        self.skipped_steps = state.get("skipped_steps", 0)
