"""benchmarks/bench_equal_quality.py: its --quick mode runs end to end (table, JSON, the served model's greedy check,
a memory probe per model in its own process), and its model specs and ratios are what they say. Timings are not
checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import each other, as their scripts do
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)  # main() asks for huge pages: scoped to the test
    import bench_equal_quality

    threads = torch.get_num_threads()
    yield bench_equal_quality
    torch.set_num_threads(threads)  # main() uses every core


def test_quick_mode_runs_end_to_end(bench, tmp_path, capsys):
    out = tmp_path / "equal_quality.json"
    result = bench.main(["--quick", "--output", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what main returns is what it wrote
    dense, sparse = result["rows"]
    assert (dense["model"], sparse["model"]) == ("dense 128", "momentum 256 / 0.25")
    # equal linear weights: 4x the width at a quarter of the density; the wider embeddings are dense
    assert sparse["linear_nonzeros"] == dense["linear_nonzeros"] == 12 * 128 * 128
    assert sparse["total_nonzeros"] > dense["total_nonzeros"]
    assert sparse["layer_density"] == 0.25 and dense["layer_density"] == 1.0
    assert sparse["updates_timed"] == 1 and sparse["memory"]["updates"] == 1  # each cycle ends with a real update
    assert sparse["same_greedy_tokens"] == {1: True, 2: True}
    assert dense["train_vs_dense"] == 1.0 and sparse["vs_dense_of_width"] == 128
    for row in result["rows"]:
        memory = row["memory"]
        assert memory["state_bytes"] == memory["weights_bytes"] + memory["gradients_bytes"] + memory["optimizer_bytes"]
        assert memory["optimizer_bytes"] == 2 * memory["gradients_bytes"]  # AdamW: two fp32 slots a trainable weight
        assert memory["peak_rss_bytes"] > memory["state_bytes"]
        assert set(row["decode_tokens_per_s"]) == {1, 2} and row["train_tokens_per_s"] > 0
        assert row["model"] in printed
    assert "estimate about" in printed and f"wrote {out}" in printed


def test_sparse_specs_name_width_density_method_and_their_dense_model(bench):
    from equal_quality_models import ModelSpec, parse_sparse

    assert parse_sparse("1024:0.0625", 384) == ModelSpec(1024, 0.0625, "momentum", 384)
    assert parse_sparse("512:0.25:static@448", 384) == ModelSpec(512, 0.25, "static", 448)
    for bad in ("1024", "1024:0.0625:static:x", "wide:0.1", "512:1.5"):
        with pytest.raises(ValueError):
            parse_sparse(bad, 384)
    args = bench.parse_args(["--dense_widths", "384", "448", "--sparse", "1024:0.0625@448", "512:0.25:static"])
    assert [spec.label for spec in args.models] == ["dense 384", "dense 448", "momentum 1024 / 0.0625",
                                                    "static 512 / 0.25"]
    assert [spec.dense_width for spec in args.models[2:]] == [448, 384]  # default: the first dense width
    assert (args.precision, args.batch, args.seq_len, args.layers, args.cycle, args.window) == ("bf16", 16, 128, 4,
                                                                                              20, 2)
    with pytest.raises(SystemExit):
        bench.parse_args(["--dense_widths", "384", "--sparse", "1024:0.0625@448"])  # no such dense model


def test_ratios_are_against_the_paired_dense_model(bench):
    from equal_quality_models import ModelSpec, table_rows

    models = [ModelSpec(384), ModelSpec(448), ModelSpec(1024, 0.0625, "momentum", 448)]

    def training(rate):
        return {"train_tokens_per_s": rate}

    def decode(b1, b8):
        return {"decode_tokens_per_s": {1: b1, 8: b8}}

    rows = table_rows(
        models,
        {"dense 384": training(3000.0), "dense 448": training(2000.0), "momentum 1024 / 0.0625": training(1000.0)},
        {"dense 384": {"state_bytes": 30}, "dense 448": {"state_bytes": 40}, "momentum 1024 / 0.0625": {"state_bytes": 50}},
        {(384, None): decode(90.0, 400.0), (448, None): decode(80.0, 300.0), (1024, 0.0625): decode(40.0, 600.0)})
    sparse = rows[2]
    assert sparse["vs_dense_of_width"] == 448 and sparse["train_vs_dense"] == 0.5
    assert sparse["state_vs_dense"] == 50 / 40 and sparse["decode_vs_dense"] == {1: 0.5, 8: 2.0}
    assert rows[0]["train_vs_dense"] == rows[1]["decode_vs_dense"][8] == 1.0
