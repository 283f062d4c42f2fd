"""bench_generate.py: what it times and the arithmetic of its table, with scripted clocks (the speed itself is
measured by running the script; nothing here asserts on real wall-clock time)."""
import importlib.util
import json
import statistics
import types
from pathlib import Path

import pytest
import torch

from sparse_nlp.layers.block import BlockSparseLinear
from sparse_nlp.model import sparsify, unsparsify

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
TINY = ["--d_model", "64", "--layers", "1", "--heads", "2", "--vocab", "96", "--block_size", "16",
        "--prompt", "4", "--new_tokens", "4", "--rounds", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sparse_variant_is_block_sparse_at_its_density_and_generates_the_plain_models_tokens(bench):
    """What is timed as 'block 16, density 0.25' is the served model of a plain checkpoint with that many live
    blocks, and it decodes the same greedy tokens as that plain model."""
    args = bench.parse_args(TINY + ["--densities", "0.25", "--new_tokens", "8"])
    served = bench.build_sparse(args, 0.25)
    layers = [m for m in served.modules() if isinstance(m, BlockSparseLinear)]
    assert len(layers) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj; the LM head stays dense
    live = sum(m.layout.num_blocks for m in layers)
    grid = sum(m.layout.block_shape[0] * m.layout.block_shape[1] for m in layers)
    assert live / grid == pytest.approx(0.25, abs=0.02)

    # the plain checkpoint the served model was rebuilt from: the same seed, sparsified alike, unsparsified
    plain = unsparsify(sparsify(bench.build_dense(args), density=0.25, block_size=args.block_size)).eval()
    prompt = torch.randint(1, args.vocab, (2, args.prompt), generator=torch.Generator().manual_seed(0))
    greedy = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        torch.testing.assert_close(served(prompt).logits, plain(prompt).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(served.generate(prompt, **greedy), plain.generate(prompt, **greedy))


def test_time_generate_is_first_token_latency_and_decode_tokens_per_second_from_the_streamers_stamps(bench,
                                                                                                   monkeypatch):
    """generate hands the streamer the prompt, then each new token: 1 + new_tokens stamps, between the call's own
    two. First-token latency is stamp 1 - stamp 0; decode tokens/s is batch x (new_tokens - 1) over stamp[-1] -
    stamp 1; the whole call is its end - its start."""
    tokens = [100.5 + 0.25 * i for i in range(1, 6)]
    stamps = iter([99.75, 100.0, 100.5] + tokens + [101.875])  # call, prompt, first token, 5 more tokens, call end
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(stamps)))
    args = bench.parse_args(TINY + ["--new_tokens", "6"])
    model = bench.build_dense(args)
    prompt = torch.randint(1, args.vocab, (3, args.prompt), generator=torch.Generator().manual_seed(0))
    first, rate, call = bench.time_generate_call(model, prompt, new_tokens=6)
    assert first == 0.5
    assert rate == pytest.approx(3 * 5 / (5 * 0.25))  # 12 tokens/s
    assert call == 2.125
    assert next(stamps, None) is None  # exactly 2 + 1 + 6 stamps were taken


def test_the_trained_variant_is_the_model_right_after_training_and_the_served_one_holds_its_weights(bench):
    """'trained': block layers whose values still require grad, weights moved by the optimizer, eval mode; the
    served variant: the same weights rebuilt from their plain form, values frozen; both decode the plain model's
    greedy tokens."""
    args = bench.parse_args(TINY + ["--new_tokens", "8"])
    untrained = sparsify(bench.build_dense(args), density=0.25, block_size=args.block_size)
    trained = bench.build_trained(args, 0.25)
    served = bench.served_copy(trained, args.block_size)
    plain = bench.plain_copy(trained)
    assert not trained.training and not served.training
    layers = [m for m in trained.modules() if isinstance(m, BlockSparseLinear)]
    assert len(layers) == 4 and all(m.values.requires_grad for m in layers)
    assert not torch.equal(layers[0].values, untrained.transformer.h[0].attn.c_attn.values)  # trained: moved
    assert all(not m.values.requires_grad for m in served.modules() if isinstance(m, BlockSparseLinear))
    prompt = torch.randint(1, args.vocab, (2, args.prompt), generator=torch.Generator().manual_seed(0))
    tokens = bench.greedy_tokens(plain, prompt, 8)
    assert bench.greedy_tokens(trained, prompt, 8).equal(tokens)
    assert bench.greedy_tokens(served, prompt, 8).equal(tokens)


def test_variants_run_interleaved_after_one_warm_up_each_and_the_table_is_medians_and_their_ratio(bench,
                                                                                              monkeypatch):
    args = bench.parse_args(TINY + ["--densities", "0.25", "--batches", "2", "--rounds", "3", "--new_tokens", "4"])
    served, trained = "block 16, density 0.25", "block 16, density 0.25, trained"
    calls = []
    scripted = {  # (first-token s, decode tokens/s, whole call s) per timed round, after one warm-up call each
        "dense": [(0.010, 100.0, 0.4), (0.030, 80.0, 0.2), (0.020, 120.0, 0.1)],
        served: [(0.004, 300.0, 0.1), (0.002, 250.0, 0.05), (0.009, 150.0, 0.2)],
        trained: [(0.005, 280.0, 0.08), (0.003, 200.0, 0.05), (0.001, 100.0, 0.16)],
    }
    counters = {name: -1 for name in scripted}  # -1: the warm-up call
    names = {}  # id(model) -> variant name, filled as the variants are built

    def fake_timer(model, prompt, new_tokens):
        name = names[id(model)]
        assert prompt.shape == (2, args.prompt) and new_tokens == args.new_tokens
        calls.append(name)
        i = counters[name]
        counters[name] += 1
        return (99.0, 1.0, 9.0) if i < 0 else scripted[name][i]

    real_served_copy, real_build_trained = bench.served_copy, bench.build_trained

    def build_trained(a, density):
        model = real_build_trained(a, density)
        names[id(model)] = f"block {a.block_size}, density {density}, trained"
        return model

    def served_copy(model, block_size):
        copy = real_served_copy(model, block_size)
        names[id(copy)] = names[id(model)].removesuffix(", trained")
        return copy

    real_build_dense = bench.build_dense

    def build_dense(a):
        model = real_build_dense(a)
        names.setdefault(id(model), "dense")  # the first one built is the dense variant
        return model

    monkeypatch.setattr(bench, "build_dense", build_dense)
    monkeypatch.setattr(bench, "build_trained", build_trained)
    monkeypatch.setattr(bench, "served_copy", served_copy)
    monkeypatch.setattr(bench, "time_generate_call", fake_timer)
    args.dtype = "fp32"
    report = bench.run(args)

    assert calls == ["dense", served, trained] * 4  # warm-up, then interleaved rounds
    rows = {r["variant"]: r for r in report["results"]}
    assert rows["dense"]["first_token_ms"] == pytest.approx(20.0)  # median of 10, 30, 20 ms
    assert rows["dense"]["decode_tokens_per_s"] == 100.0 and rows["dense"]["vs_dense"] == 1.0
    assert rows[served]["first_token_ms"] == pytest.approx(4.0)
    assert rows[served]["decode_tokens_per_s"] == statistics.median([300.0, 250.0, 150.0]) == 250.0
    assert rows[served]["vs_dense"] == 2.5  # the ratio of the medians; the median of the ratios is 3.0
    # whole call: batch x new tokens over the median call time
    assert rows["dense"]["call_tokens_per_s"] == pytest.approx(2 * 4 / 0.2)
    assert rows[served]["call_tokens_per_s"] == pytest.approx(2 * 4 / 0.1)
    assert rows[trained]["call_tokens_per_s"] == pytest.approx(2 * 4 / 0.08)
    assert rows[served]["call_vs_dense"] == pytest.approx(2.0)
    assert rows[trained]["call_vs_served"] == pytest.approx(0.1 / 0.08)
    assert rows[served]["call_vs_served"] == 1.0 and rows["dense"]["call_vs_served"] is None
    assert [rows[n]["path"] for n in ("dense", served, trained)] == ["dense", "served", "trained"]
    assert rows[served]["density"] == rows[trained]["density"] == 0.25 and rows["dense"]["density"] is None
    assert rows[served]["same_greedy_tokens"] is True and rows[trained]["same_greedy_tokens"] is True
    assert rows["dense"]["same_greedy_tokens"] is None
    assert rows[trained]["call_s_samples"] == [0.08, 0.05, 0.16]  # the rounds' own times, in order


def test_targets_are_judged_on_the_devices_own_rows_and_a_missing_row_is_not_run(bench):
    def report(device, rows):
        return {"args": {"device": device},
                "results": [{"path": p, "density": d, "batch": b, "vs_dense": v, "call_vs_served": c}
                            for p, d, b, v, c in rows]}

    cpu = bench.target_lines(report("cpu", [("served", 0.1, 1, 2.5, 1.0), ("trained", 0.1, 1, 9.0, 0.95),
                                            ("served", 0.1, 8, 2.99, 1.0), ("trained", 0.1, 8, 9.0, 0.89),
                                            ("served", 0.2, 1, 9.0, 1.0)]))
    assert cpu == ["target batch 1, density 0.1: >= 2.5x dense decode tokens/s: 2.50x, MET",
                   "target batch 8, density 0.1: >= 3.0x dense decode tokens/s: 2.99x, MISSED",
                   "target batch 1, density 0.1: trained >= 0.9x served whole-call tokens/s: 0.95x, MET",
                   "target batch 8, density 0.1: trained >= 0.9x served whole-call tokens/s: 0.89x, MISSED"]
    assert bench.target_lines(report("cuda:0", [("served", 0.1, 8, 5.0, 1.0)])) == [
        "target batch 1, density 0.1: >= 2.0x dense decode tokens/s: NOT RUN"]


@pytest.mark.parametrize("device, dtype", [("cpu", "fp32"), ("cuda", "bf16")])
def test_the_documented_defaults(bench, monkeypatch, device, dtype):
    """The module docstring's settings: GPT-2 width 768 x 6 layers, vocab 8,192, prompt 32, 64 new tokens, block 64,
    batch 1 and 8, density 0.2 and 0.1; fp32 on CPU, bf16 on CUDA."""
    seen = {}

    def fake_run(args):
        seen.update(vars(args))
        return {"device": "fake", "dtype": args.dtype, "torch": "", "args": vars(args), "results": []}

    monkeypatch.setattr(bench, "run", fake_run)
    bench.main(["--device", device])
    assert {k: seen[k] for k in ("d_model", "layers", "heads", "vocab", "prompt", "new_tokens", "block_size",
                                 "batches", "densities", "dtype")} == {
        "d_model": 768, "layers": 6, "heads": 12, "vocab": 8192, "prompt": 32, "new_tokens": 64, "block_size": 64,
        "batches": [1, 8], "densities": [0.2, 0.1], "dtype": dtype}


def test_tiny_run_reports_every_variant_and_the_targets(bench, tmp_path, capsys):
    out = tmp_path / "gen.json"
    report = bench.main(TINY + ["--batches", "1", "2", "--densities", "0.25", "--json", str(out)])
    rows = {(r["batch"], r["variant"]) for r in report["results"]}
    assert rows == {(b, v) for b in (1, 2)
                    for v in ("dense", "block 16, density 0.25", "block 16, density 0.25, trained")}
    assert all(r["vs_dense"] == 1.0 for r in report["results"] if r["variant"] == "dense")
    assert all(r["same_greedy_tokens"] for r in report["results"] if r["variant"] != "dense")
    assert json.loads(out.read_text())["results"] == report["results"]
    printed = capsys.readouterr().out
    assert "| 2 | block 16, density 0.25 |" in printed and "| 2 | block 16, density 0.25, trained |" in printed
    assert "target batch 1, density 0.1: >= 2.5x dense decode tokens/s: NOT RUN" in printed
    assert "target batch 2, density 0.25: trained >= 0.9x served whole-call tokens/s: " in printed
