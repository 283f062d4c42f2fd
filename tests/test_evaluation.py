"""Perplexity: the sliding windows, the local evaluate metric, and a hand computation on a tiny GPT-2."""
from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from sparse_nlp.lm.evaluation import (
    concatenate_token_ids,
    evaluate_perplexity,
    load_perplexity_metric,
    sliding_windows,
)

VOCAB = 50


@pytest.fixture(scope="module")
def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()  # eval: the hand computation must not see dropout


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (45,), generator=torch.Generator().manual_seed(1))


def hand_perplexity(model, tokens, context_length, stride):
    """One window at a time, log_softmax by hand; token t is scored in the first window that can see it."""
    total_nll, count, scored_until = 0.0, 0, 1
    for begin in range(0, len(tokens) - 1, stride):
        end = min(begin + context_length, len(tokens))
        with torch.no_grad():
            log_probs = torch.log_softmax(model(tokens[begin:end][None]).logits[0].double(), dim=-1)
        for t in range(max(scored_until, begin + 1), end):
            total_nll -= log_probs[t - 1 - begin, tokens[t]].item()  # position t-1 predicts token t
            count += 1
        scored_until = end
        if end == len(tokens):
            break
    return math.exp(total_nll / count), count


@pytest.mark.parametrize("context_length, stride, batch_size", [
    (8, 8, 1),    # non-overlapping blocks
    (8, 8, 4),    # same, batched: the short last window is right-padded
    (16, 5, 3),   # overlapping windows, each token scored once
    (10, 1, 64),  # every window adds one token
])
def test_perplexity_equals_hand_computation(tiny_gpt2, tokens, context_length, stride, batch_size):
    expected, count = hand_perplexity(tiny_gpt2, tokens, context_length, stride)
    result = evaluate_perplexity(tiny_gpt2, tokens, context_length, stride, batch_size=batch_size,
                                 show_progress=False)
    assert result["num_tokens"] == count
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["mean_nll"] == pytest.approx(math.log(expected), rel=1e-5)


def test_non_overlapping_perplexity_matches_the_models_loss_on_blocks(tiny_gpt2, tokens):
    blocks = tokens[:40].view(5, 8)  # what packing into blocks of 8 gives the trainer
    with torch.no_grad():
        loss = tiny_gpt2(input_ids=blocks, labels=blocks).loss
    result = evaluate_perplexity(tiny_gpt2, tokens[:40], context_length=8, show_progress=False)
    assert result["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_model_mode_is_restored(tiny_gpt2, tokens):
    tiny_gpt2.train()
    try:
        evaluate_perplexity(tiny_gpt2, tokens, context_length=8, show_progress=False)
        assert tiny_gpt2.training
    finally:
        tiny_gpt2.eval()


@pytest.mark.parametrize("num_tokens, context_length, stride", [(45, 8, 8), (45, 16, 5), (9, 8, 8), (30, 10, 1)])
def test_sliding_windows_score_every_token_once_with_enough_context(num_tokens, context_length, stride):
    windows = sliding_windows(num_tokens, context_length, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    for begin, end, first in windows:
        assert end - begin <= context_length and first > begin
        if begin > 0 and stride < context_length:
            assert first - begin >= context_length - stride  # left context of the first scored token
    if stride < context_length:
        assert scored == list(range(1, num_tokens))  # nothing skipped
    else:
        assert len(scored) == num_tokens - math.ceil(num_tokens / context_length)  # block starts have no context


@pytest.mark.parametrize("arguments, message", [
    ({"context_length": 1}, "context_length"),
    ({"context_length": 8, "stride": 9}, "stride"),
    ({"context_length": 8, "stride": 0}, "stride"),
    ({"context_length": 128}, "positions"),
    ({"context_length": 8, "batch_size": 0}, "batch_size"),
])
def test_bad_arguments_give_one_clear_line(tiny_gpt2, tokens, arguments, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(tiny_gpt2, tokens, show_progress=False, **arguments)
    with pytest.raises(ValueError, match="1-D"):
        evaluate_perplexity(tiny_gpt2, tokens.view(5, 9), context_length=8, show_progress=False)


def test_metric_loads_offline_from_the_project_and_weighs_every_token_equally():
    metric = load_perplexity_metric()
    metric.add_batch(nll_sum=[2.0], token_count=[1])
    metric.add_batch(nll_sum=[7.0], token_count=[2])
    assert metric.compute() == {"perplexity": pytest.approx(math.exp(3.0)), "mean_nll": 3.0, "num_tokens": 3}
    with pytest.raises(ValueError, match="at least one scored token"):
        load_perplexity_metric().compute(nll_sum=[0.0], token_count=[0])


def test_dataset_token_ids_are_concatenated_in_order(tiny_gpt2, tokens):
    blocks = Dataset.from_dict({"input_ids": tokens[:40].view(5, 8).tolist()}).select([0, 1, 2, 3, 4])
    assert torch.equal(concatenate_token_ids(blocks), tokens[:40])
    from_dataset = evaluate_perplexity(tiny_gpt2, blocks, context_length=8, show_progress=False)
    from_tensor = evaluate_perplexity(tiny_gpt2, tokens[:40], context_length=8, show_progress=False)
    assert from_dataset == from_tensor
