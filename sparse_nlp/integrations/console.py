"""What sparse training shows on the console: one line per topology update, and training logs without the
per-layer densities.

    update 3/8 (step 150): prune rate 0.35, moved 12,345 weights; densest h.0.attn.c_proj 0.45, sparsest h.3.mlp.c_proj 0.17

The per-layer densities (``sparsity/<layer>`` log keys) still reach ``report_to`` backends (TensorBoard, W&B, ...)
and ``trainer.state.log_history``: :func:`hide_layer_densities` only swaps the Trainer's log printer (the tqdm
progress callback, or the plain printer under ``disable_tqdm``) for one that leaves them out of what it prints.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from transformers.trainer_callback import CallbackHandler, PrinterCallback, ProgressCallback

# Training-log keys. Every other "sparsity/..." key is one layer's density.
DENSITY_KEY = "sparsity/density"  # overall density of the sparse layers
PRUNE_RATE_KEY = "sparsity/prune_rate"
UPDATES_KEY = "sparsity/updates"  # topology updates so far
LAYER_KEY_PREFIX = "sparsity/"


def layer_density_key(layer_name: str) -> str:
    return LAYER_KEY_PREFIX + layer_name


def is_layer_density_key(key: str) -> bool:
    return key.startswith(LAYER_KEY_PREFIX) and key not in (DENSITY_KEY, PRUNE_RATE_KEY, UPDATES_KEY)


def short_layer_names(names: Sequence[str]) -> dict[str, str]:
    """Full name -> name without the dotted prefix all share, e.g. transformer.h.0.attn.c_proj -> h.0.attn.c_proj.

    The last part of a name is always kept, and a layer index keeps the part before it ("h.0", not "0").
    """
    parts = [name.split(".") for name in names]
    if len(parts) < 2:
        return {name: name for name in names}
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    if common and any(p[common].isdigit() for p in parts):
        common -= 1
    return {name: ".".join(p[common:]) for name, p in zip(names, parts)}


def format_update_line(
    index: int, total: int, step: int, update: Mapping[str, float], densities: Mapping[str, float], density: float
) -> str:
    """One topology update in a line. ``update``: the statistics ``SparsityController.update()`` returns;
    ``densities``: layer name -> density after the update; ``density``: overall density after it."""
    moved, removed = int(update["moved"]), int(update["removed"])
    if moved == removed:  # the method regrew what it pruned
        change = f"moved {moved:,} weights"
    elif moved == 0:  # gradual pruning
        change = f"removed {removed:,} weights, density {density:.2f}"
    else:
        change = f"removed {removed:,} and grew {moved:,} weights, density {density:.2f}"
    line = f"update {index}/{total} (step {step}): prune rate {update['prune_rate']:.2f}, {change}"
    if not densities:
        return line
    short = short_layer_names(list(densities))
    densest = max(densities, key=densities.get)
    sparsest = min(densities, key=densities.get)
    if densities[densest] == densities[sparsest]:
        return f"{line}; every layer {densities[densest]:.2f}"
    return f"{line}; densest {short[densest]} {densities[densest]:.2f}, sparsest {short[sparsest]} {densities[sparsest]:.2f}"


def _without_layer_densities(logs):
    return None if logs is None else {k: v for k, v in logs.items() if not is_layer_density_key(k)}


class CompactPrinterCallback(PrinterCallback):
    """The Trainer's log printer (``disable_tqdm=True``) without per-layer densities."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_without_layer_densities(logs), **kwargs)


class CompactProgressCallback(ProgressCallback):
    """The Trainer's progress bar and log lines without per-layer densities."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return super().on_log(args, state, control, logs=_without_layer_densities(logs), **kwargs)


_COMPACT = {PrinterCallback: CompactPrinterCallback, ProgressCallback: CompactProgressCallback}


def hide_layer_densities(handler: CallbackHandler) -> None:
    """Swap the Trainer's own log printer for its compact form, in place (its position, hence the order of
    callbacks, is kept). A printer of another class (a subclass of the user's, a notebook's) is left alone."""
    for i, callback in enumerate(handler.callbacks):
        compact = _COMPACT.get(type(callback))
        if compact is not None:
            replacement = compact()
            vars(replacement).update(vars(callback))  # e.g. ProgressCallback's max_str_len
            handler.callbacks[i] = replacement
