"""Perplexity of any causal LM (sparse or dense) on a held-out token stream, through `evaluate`.

    stream = concatenate_token_ids(tokenized["test"])      # one long 1-D LongTensor
    evaluate_perplexity(model, stream, context_length=256, stride=128)
    # {"perplexity": 61.2, "mean_nll": 4.11, "num_tokens": 104805}

Under DDP (torch.distributed initialised, several ranks) the windows are split across ranks and the NLL and token
sums all-reduced: every rank returns the perplexity of the whole stream, in 1/world of the time.

Sliding window, as in the Hugging Face perplexity guide: windows of `context_length` tokens start
every `stride` tokens; each window scores only the tokens no earlier window scored, so every token
after the first is scored exactly once, with at least `context_length - stride` tokens of left
context (fewer only inside the first window). stride == context_length gives non-overlapping blocks,
where the first token of each block has no context and is not scored: the same tokens, and so the
same perplexity, as exp(loss) over the stream packed into blocks of `context_length`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import evaluate
import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset
from tqdm.auto import tqdm

from sparse_nlp.parallel.ddp import is_distributed

PERPLEXITY_METRIC = Path(__file__).resolve().parent / "metrics" / "perplexity"  # local: evaluate.load needs no hub
IGNORE_INDEX = -100  # label of positions that are not scored (the convention of torch and transformers)


def load_perplexity_metric() -> evaluate.Metric:
    """The project's perplexity metric (sums NLL and token counts), loaded from its folder, offline."""
    return evaluate.load(str(PERPLEXITY_METRIC), keep_in_memory=True)


def concatenate_token_ids(dataset: Dataset, column: str = "input_ids") -> torch.Tensor:
    """All token ids of a tokenized or packed split, in row order, as one 1-D LongTensor."""
    if column not in dataset.column_names:
        raise ValueError(f"dataset has no {column!r} column (it has {dataset.column_names}); tokenize it first")
    table = dataset.select_columns([column]).with_format("arrow")[:]
    flat = pc.list_flatten(table[column]).to_numpy()
    return torch.from_numpy(flat.astype(np.int64, copy=False))


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: the model reads tokens[begin:end] and scores [first_target:end]."""
    if not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
    if not isinstance(stride, int) or not 1 <= stride <= context_length:
        raise ValueError(f"stride must be an integer in [1, context_length={context_length}], got {stride!r}")
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    windows, scored_until = [], 1  # token 0 has no context, so it is never scored
    for begin in range(0, num_tokens - 1, stride):
        end = min(begin + context_length, num_tokens)
        first_target = max(scored_until, begin + 1)  # a window cannot score its own first token
        if first_target < end:
            windows.append((begin, end, first_target))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def evaluate_perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor | Sequence[int] | Dataset,
    context_length: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> dict:
    """{"perplexity", "mean_nll", "num_tokens"} of `model` on a token stream (see the module docstring).

    `model` is any causal LM called as model(input_ids=..., attention_mask=...).logits; `token_ids` is
    a 1-D stream or a Dataset whose "input_ids" are concatenated. stride defaults to context_length.
    The model runs in eval mode under no_grad on `device` (default: where its parameters are) and is
    put back in its previous mode afterwards. Logits are upcast to float32 before the softmax.
    """
    stream = _as_stream(token_ids)
    stride = context_length if stride is None else stride
    windows = sliding_windows(len(stream), context_length, stride)
    max_positions = _max_positions(model)
    if max_positions is not None and context_length > max_positions:
        raise ValueError(f"context_length={context_length} exceeds the model's {max_positions} positions")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    metric = load_perplexity_metric()
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    windows = windows[rank::world]  # under DDP each rank scores every world-th window; the sums are reduced below
    was_training = model.training
    model.eval()
    nll_parts, token_total = [], 0
    try:
        with torch.no_grad(), tqdm(total=len(windows), desc="Perplexity", unit="window",
                                   disable=not show_progress) as progress:
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size]
                nll_sums, token_counts = _score_windows(model, stream, batch, device)
                nll_parts += nll_sums
                token_total += sum(token_counts)
                progress.update(len(batch))
    finally:
        model.train(was_training)
    nll_total = math.fsum(nll_parts)
    if world > 1:  # every rank returns the perplexity of the whole stream
        sums = torch.tensor([nll_total, float(token_total)], dtype=torch.float64,
                            device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(sums)
        nll_total, token_total = sums[0].item(), int(round(sums[1].item()))
    metric.add_batch(nll_sum=[nll_total], token_count=[token_total])
    return metric.compute()


def _score_windows(model, stream: torch.Tensor, windows: list[tuple[int, int, int]],
                   device: torch.device) -> tuple[list[float], list[int]]:
    """Summed NLL and count of the scored tokens of each window, run as one right-padded batch."""
    width = max(end - begin for begin, end, _ in windows)
    input_ids = torch.zeros(len(windows), width, dtype=torch.long)  # pad id 0: masked and never scored
    attention_mask = torch.zeros(len(windows), width, dtype=torch.long)
    labels = torch.full((len(windows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (begin, end, first_target) in enumerate(windows):
        input_ids[row, :end - begin] = stream[begin:end]
        attention_mask[row, :end - begin] = 1
        labels[row, first_target - begin:end - begin] = stream[first_target:end]
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits  # (B, T, V)
    targets = labels[:, 1:].to(device)  # logits at position t predict the token at t + 1
    vocab = logits.shape[-1]  # rows of [B * (T - 1), V]: the softmax runs along contiguous memory (~2x faster on
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), targets.reshape(-1),  # CPU than (B, V, T))
                          ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)  # 0 where ignored
    return nll.double().sum(dim=1).tolist(), (targets != IGNORE_INDEX).sum(dim=1).tolist()


def _as_stream(token_ids) -> torch.Tensor:
    if isinstance(token_ids, Dataset):
        return concatenate_token_ids(token_ids)
    stream = torch.as_tensor(token_ids, dtype=torch.long)
    if stream.dim() != 1:
        raise ValueError(f"token_ids must be one 1-D stream, got shape {tuple(stream.shape)}; "
                         "flatten it or use concatenate_token_ids")
    return stream.cpu()


def _max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
