"""Perplexity under DDP: two gloo ranks split the windows and reduce the sums, and each returns what one process
computes over the whole stream. Runs `torchrun --nproc_per_node 2` on this file (a fresh process, as
tests/test_distributed.py does)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sparse_nlp.lm.evaluation import evaluate_perplexity
from torchrun_helpers import run_two_ranks
from trainer_helpers import tiny_gpt2

STREAM_LENGTH, CONTEXT, STRIDE = 301, 16, 8  # 37 windows: the ranks get 19 and 18


def _perplexity() -> dict:
    stream = torch.randint(0, 64, (STREAM_LENGTH,), generator=torch.Generator().manual_seed(0))
    return evaluate_perplexity(tiny_gpt2(seed=3), stream, context_length=CONTEXT, stride=STRIDE, batch_size=4,
                               show_progress=False)


def test_two_ranks_give_the_single_process_perplexity(tmp_path):
    run_two_ranks(Path(__file__).resolve(), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    alone = _perplexity()
    for result in ranks:
        assert result["num_tokens"] == alone["num_tokens"] == STREAM_LENGTH - 1
        assert result["scored_windows"] < 37  # each rank scored only its share
        # float tolerance: batches hold other windows, so fp32 matmuls block differently
        assert abs(result["perplexity"] - alone["perplexity"]) <= 1e-6 * alone["perplexity"]


if __name__ == "__main__":  # one rank of the torchrun above
    dist.init_process_group("gloo")
    scored = []
    import sparse_nlp.lm.evaluation as evaluation

    original = evaluation._score_windows

    def counting(model, stream, windows, device):
        scored.extend(windows)
        return original(model, stream, windows, device)

    evaluation._score_windows = counting
    result = {**_perplexity(), "scored_windows": len(scored)}
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
