"""bench_generate.py runs end to end on a tiny model (the speed itself is measured by running the script)."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_reports_every_variant_and_the_targets(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "gen.json"
    report = bench.main(["--d_model", "64", "--layers", "1", "--heads", "2", "--vocab", "96", "--block_size", "16",
                         "--prompt", "4", "--new_tokens", "4", "--rounds", "1", "--batches", "1", "2",
                         "--densities", "0.25", "--json", str(out)])
    rows = {(r["batch"], r["variant"]) for r in report["results"]}
    assert rows == {(b, v) for b in (1, 2) for v in ("dense", "block 16, density 0.25")}
    assert all(r["decode_tokens_per_s"] > 0 and r["first_token_ms"] > 0 for r in report["results"])
    assert json.loads(out.read_text())["results"] == report["results"]
    printed = capsys.readouterr().out
    assert "| 2 | block 16, density 0.25 |" in printed
    assert "target batch 1, density 0.1: >= 2.5x dense decode tokens/s: NOT RUN" in printed
