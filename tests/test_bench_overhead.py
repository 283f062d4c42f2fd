"""benchmarks/bench_overhead.py runs on CPU and reports its table, target line and JSON; timings are not checked."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sparse_nlp.kernels import native_available

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_targets_and_json(bench, tmp_path, capsys):
    backends = (["native"] if native_available() else []) + ["torch"]
    out = tmp_path / "overhead.json"
    result = bench.main(["--rows", "4", "--in_features", "64", "--out_features", "128", "--block", "16",
                         "--density", "0.25", "--backends", *backends, "--samples", "2", "--sample_ms", "1",
                         "--max_calls", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # what main returns is what it wrote
    assert {"date", "commit", "torch", "device", "device_name", "others_cpu_share", "records", "targets"} <= set(result)
    assert [r["backend"] for r in result["records"]] == [bench.BASELINE, *backends]  # F.linear first
    for record in result["records"]:
        for phase in bench.PHASES:
            assert record[f"{phase}_host_us"] > 0 and record[f"{phase}_wall_us"] > 0
            assert len(record[f"{phase}_host_us_samples"]) == 2 and record[f"{phase}_calls"] >= 1
        assert record["backend"] in printed
    assert result["records"][0]["fwd_bwd_ratio"] == 1.0
    if "native" in backends:
        assert len(result["targets"]) == 1 and "CPU native fwd+bwd within 2x" in result["targets"][0]
        assert result["targets"][0].split(": ")[1].split()[0] in ("MET", "MISSED")
        assert result["targets"][0] in printed


def test_default_backends_on_cpu(bench):
    import torch

    expected = (["native"] if native_available() else []) + ["torch", "dense"]
    assert bench.default_backends(torch.device("cpu")) == expected
