"""Run accelerate's FSDP path on CPU ranks, for tests only.

accelerate turns FSDP on only for GPU-type backends: on gloo CPU ranks ``TrainingArguments(fsdp=True, ...)`` (or
the environment ``accelerate launch --config_file <FSDP config>`` sets) quietly trains with DDP instead.
``fsdp_on_cpu()`` applies the FSDP plugin built from either anyway, so that the Trainer prepares the model with
accelerate's ``fully_shard`` path (as on GPUs) and the tests here exercise it on CPU.
"""
from __future__ import annotations

import contextlib
import os

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
        from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate launch's config
        if self.args.fsdp_plugin_args is not None or from_launcher:  # (for each Trainer: the state is shared, and reset)
            state = self.accelerator.state
            if state.distributed_type != DistributedType.FSDP:
                state.fsdp_plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
                state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    Trainer.create_accelerator_and_postprocess = create
    try:
        yield
    finally:
        Trainer.create_accelerator_and_postprocess = original


def launcher_environment(config_file: str) -> dict[str, str]:
    """The FSDP variables ``accelerate launch --config_file <config_file>`` sets for the processes it starts."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", config_file, "train.py"])
    environment = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {key: value for key, value in environment.items() if "FSDP" in key}
