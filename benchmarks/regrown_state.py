"""What AdamW does to regrown weights under each ``regrown_state``, and what it costs in perplexity.

    python benchmarks/regrown_state.py                                   # reset, keep, fresh; seed 0; ~1.5 min each
    python benchmarks/regrown_state.py --states reset fresh --seeds 0 1 --output benchmarks/results/x.json

Sparse momentum at ``--density`` on a small GPT-2 (``--layers`` x ``--width``, the study's 2,048-token vocabulary)
on the embedded corpus, with the study's optimizer (AdamW, betas 0.9 / 0.999, weight decay 0.1, linear warm-up over
5% then cosine) in a plain loop, fp32, one thread. Each state trains on the same initial weights and batches.
At every topology update it measures, over the fine-grained layers:

- ``step_ratio_k``: mean |update| of the weights grown there, k steps later (k = 1, 10), over the mean |update| of
  the layers' established weights at that step (the issue's "6-10x larger");
- ``fresh_ratio_k``: the same numerator over what a fresh AdamW parameter (its own step count, zero state at
  regrowth) would have done with the same gradients: 1.0 is "behaves like a fresh parameter";
- ``momentum_ratio``: at the next update, mean |exp_avg / sqrt(exp_avg_sq)| of the weights grown at the previous one
  over that of the established weights (the read that scores layer importance), and ``predicted``
  sqrt((1 - b2^t) / (1 - b2^k)), the inflation that zeroed exp_avg_sq predicts (t the tensor's step, k the steps
  since regrowth);
- ``regrown_in_place``: the share of grown weights that were pruned in that same update (regrown from 0).
Then validation perplexity (sliding windows of seq_length, stride half of it). Updates in the first half of training
and in the second are averaged separately (the bias correction 1 - b2^t still matters early).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from sparse_nlp import SparsityController, sparse_layers, sparsify
from sparse_nlp.config import REGROWN_STATES
from sparse_nlp.lm.data import load_text_dataset, pack_into_blocks, tokenize_texts
from sparse_nlp.lm.evaluation import concatenate_token_ids, evaluate_perplexity
from sparse_nlp.lm.tokenizer import load_tokenizer

BETAS = (0.9, 0.999)  # the Trainer's (and the study's) AdamW betas
AGES = (1, 10)  # steps after regrowth at which update sizes are compared


def load_blocks(seq_length: int, vocab_size: int):
    raw = load_text_dataset()
    tokenizer = load_tokenizer(train_split=raw["train"], vocab_size=vocab_size)
    blocks = pack_into_blocks(tokenize_texts(raw, tokenizer, append_eos=True), seq_length)
    return blocks, tokenizer


def build(args, tokenizer) -> GPT2LMHeadModel:
    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64),
                        vocab_size=len(tokenizer), n_positions=args.seq_length, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, activation_function="gelu_pytorch_tanh",
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config)


class RegrowthProbe:
    """Follows the weights grown at each update: their updates, a fresh parameter's, and their momentum read."""

    def __init__(self, layers, optimizer):
        self.layers, self.optimizer = layers, optimizer
        self.grown: list[torch.Tensor] = []  # per layer: bool mask of the weights grown at the last update
        self.established: list[torch.Tensor] = []
        self.fresh_moments: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: a fresh parameter's m, v
        self.age = None  # optimizer steps since the last update
        self.records: list[dict] = []
        self._before_step: list[torch.Tensor] = []

    def before_update(self):
        self._masks = [layer.mask.clone() for layer in self.layers]
        self._weights = [layer.weight.detach().clone() for layer in self.layers]
        if self.grown:  # the momentum read of the weights grown at the previous update, now (just before this one)
            record = self.records[-1]
            ratios = []
            for layer, grown, established in zip(self.layers, self.grown, self.established):
                state = self.optimizer.state[layer.weight]
                read = (state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)).abs()
                alive = grown & layer.mask
                if alive.any() and established.any():
                    ratios.append(read[alive].mean().item() / read[established].mean().item())
            t = int(self.optimizer.state[self.layers[0].weight]["step"])
            record["momentum_ratio"] = statistics.mean(ratios) if ratios else float("nan")
            record["predicted"] = math.sqrt((1 - BETAS[1] ** t) / (1 - BETAS[1] ** self.age))

    def after_update(self, step: int):
        self.grown, self.established, self.fresh_moments = [], [], []
        grown_total = in_place = 0
        for layer, mask, weight in zip(self.layers, self._masks, self._weights):
            now = layer.mask
            regrown_in_place = mask & now & (layer.weight == 0) & (weight != 0)
            grown = (now & ~mask) | regrown_in_place
            self.grown.append(grown)
            self.established.append(now & mask & ~regrown_in_place)
            self.fresh_moments.append((torch.zeros(int(grown.sum())), torch.zeros(int(grown.sum()))))
            grown_total += int(grown.sum())
            in_place += int(regrown_in_place.sum())
        self.records.append({"step": step, "grown": grown_total, "regrown_in_place": in_place / max(grown_total, 1)})
        self.age = 0

    def before_step(self):
        if self.age is None:
            return
        self.age += 1
        beta1, beta2 = BETAS
        for (m, v), grown, layer in zip(self.fresh_moments, self.grown, self.layers):
            grad = layer.weight.grad[grown]
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if self.age in AGES:
            self._before_step = [layer.weight.detach().clone() for layer in self.layers]

    def after_step(self, lr: float):
        """After optimizer.step, before the controller zeroes masked weights (weight decay is left in: ~1e-4 lr)."""
        if self.age not in AGES:
            return
        beta1, beta2 = BETAS
        k = self.age
        ours, fresh, established = [], [], []
        for (m, v), grown, estab, layer, before in zip(self.fresh_moments, self.grown, self.established,
                                                        self.layers, self._before_step):
            change = (layer.weight.detach() - before).abs()
            fresh_step = lr * (m / (1 - beta1**k)) / ((v / (1 - beta2**k)).sqrt() + 1e-8)
            if grown.any():
                ours.append(change[grown])
                fresh.append(fresh_step.abs())
            established.append(change[estab])
        ours, fresh, established = torch.cat(ours), torch.cat(fresh), torch.cat(established)
        record = self.records[-1]
        record[f"step_ratio_{k}"] = ours.mean().item() / established.mean().item()
        record[f"fresh_ratio_{k}"] = ours.mean().item() / fresh.mean().item()


def train(args, state: str, seed: int, blocks, tokenizer) -> dict:
    torch.manual_seed(seed)
    model = sparsify(build(args, tokenizer), density=args.density, method="momentum", regrown_state=state,
                     update_interval=args.interval, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=BETAS, weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(0.05 * args.steps), args.steps)
    controller = SparsityController(model, optimizer, total_steps=args.steps)
    layers = [layer for _, layer in sparse_layers(model)]
    probe = RegrowthProbe(layers, optimizer)
    train_ids = torch.tensor(blocks["train"]["input_ids"])
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train_ids[torch.randint(len(train_ids), (args.batch,), generator=order)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        probe.before_step()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        probe.after_step(lr)
        update_now = controller.schedule.is_update_step(controller.step_count + 1)
        if update_now:
            probe.before_update()
        controller.step()
        if update_now:
            probe.after_update(step)
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    ppl = evaluate_perplexity(model, concatenate_token_ids(blocks["validation"]), context_length=args.seq_length,
                              stride=args.seq_length // 2, batch_size=32, show_progress=False)["perplexity"]
    halves = {}
    for name, late in (("first_half", False), ("second_half", True)):
        chosen = [r for r in probe.records if (r["step"] > args.steps // 2) == late]
        halves[name] = {key: round(statistics.mean(r[key] for r in chosen if key in r and not math.isnan(r[key])), 3)
                        for key in ("step_ratio_1", "step_ratio_10", "fresh_ratio_1", "fresh_ratio_10",
                                    "momentum_ratio", "predicted", "regrown_in_place")
                        if any(key in r and not math.isnan(r[key]) for r in chosen)}
    return {"state": state, "seed": seed, "val_perplexity": round(ppl, 3), "train_seconds": round(seconds, 1),
            "final_loss": round(loss.item(), 4), **halves, "updates": probe.records}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", nargs="+", default=list(REGROWN_STATES), choices=REGROWN_STATES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--interval", type=int, default=50, help="steps between updates (16 in 800, as the study)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_length", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    blocks, tokenizer = load_blocks(args.seq_length, args.vocab_size)
    results = []
    for seed in args.seeds:
        for state in args.states:
            result = train(args, state, seed, blocks, tokenizer)
            results.append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "updates"}), flush=True)
    print("\n| regrown_state | seed | val ppl | step / established (k=1, 10) | step / fresh (k=1, 10) "
          "| momentum read / established (predicted) | regrown in place |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for half in ("first_half", "second_half"):
            h = r[half]
            print(f"| {r['state']} ({half.replace('_', ' ')}) | {r['seed']} | {r['val_perplexity']} "
                  f"| {h.get('step_ratio_1')} / {h.get('step_ratio_10')} | {h.get('fresh_ratio_1')} / "
                  f"{h.get('fresh_ratio_10')} | {h.get('momentum_ratio')} ({h.get('predicted')}) "
                  f"| {h.get('regrown_in_place')} |")
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
