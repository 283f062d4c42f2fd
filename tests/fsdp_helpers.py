"""Run accelerate's FSDP path on CPU ranks, for tests only.

accelerate turns FSDP on only for GPU-type backends: on gloo CPU ranks ``TrainingArguments(fsdp=True, ...)`` quietly
trains with DDP instead. ``fsdp_on_cpu()`` applies the FSDP plugin the Trainer built anyway, so that the Trainer
prepares the model with accelerate's ``fully_shard`` path (as on GPUs) and the tests here exercise it on CPU.
"""
from __future__ import annotations

import contextlib

from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils import DistributedType
from transformers import Trainer

FSDP2_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["GPT2Block"], "state_dict_type": "SHARDED_STATE_DICT"}


@contextlib.contextmanager
def fsdp_on_cpu():
    """Inside: Trainers built with an FSDP config shard the model on CPU ranks as they would on GPUs."""
    original = Trainer.create_accelerator_and_postprocess

    def create(self):
        original(self)
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create
    try:
        yield
    finally:
        Trainer.create_accelerator_and_postprocess = original
