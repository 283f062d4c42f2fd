"""The equal-quality reading: log-log interpolation on the dense curve, the multipliers, and a report from files."""
from __future__ import annotations

import json
import math

import pytest

from study.equal_quality import ModelPoint, interpolate_log, match_dense, model_points


def _point(width, linear, total, ppl, method="dense"):
    return ModelPoint(name=f"{method} {width}", width=width, density=1.0, linear_nonzeros=linear,
                      total_nonzeros=total, val_perplexity=ppl, val_spread=None, seeds=1, method=method)


def test_interpolation_is_linear_in_log_log_and_refuses_to_extrapolate():
    xs, ys = [1e6, 4e6], [40.0, 20.0]  # perplexity halves over a 4x size: at 30, x = 1e6 * 4 ** (log(4/3) / log 2)
    assert interpolate_log(xs, ys, 30.0) == pytest.approx(1e6 * 4 ** (math.log(40 / 30) / math.log(2)))
    assert interpolate_log(xs, ys, 40.0) == pytest.approx(1e6) and interpolate_log(xs, ys, 20.0) == pytest.approx(4e6)
    assert interpolate_log(xs, ys, 45.0) is None and interpolate_log(xs, ys, 15.0) is None


def test_a_sparse_model_between_two_dense_widths_gets_both_multipliers():
    dense = [_point(256, 3e6, 4e6, 41.0), _point(320, 5e6, 6e6, 38.0), _point(384, 7e6, 8e6, 34.0)]
    sparse = _point(1024, 3e6, 5e6, 36.0, method="momentum")
    match = match_dense(sparse, dense)
    assert 5e6 < match.dense_linear_nonzeros < 7e6 and 320 < match.dense_width < 384
    assert match.linear_multiplier == pytest.approx(match.dense_linear_nonzeros / 3e6)
    assert match.total_multiplier == pytest.approx(match.dense_total_nonzeros / 5e6)
    assert match_dense(_point(1024, 3e6, 5e6, 50.0, method="momentum"), dense).linear_multiplier is None


def test_report_from_result_files(tmp_path):
    from study_equal_quality import main

    def write(folder, name, method, width, linear, total, ppl, seed):
        run = tmp_path / folder / name
        run.mkdir(parents=True)
        result = {"name": name, "method": method, "density": 1.0 if method == "dense" else 0.0625, "seed": seed,
                  "block_size": 1 if method == "dense" else 64, "width": width, "linear_nonzeros": linear,
                  "linear_params": linear, "other_params": total - linear, "nonzero_params": total,
                  "average_params": total, "val_perplexity": ppl, "test_perplexity": ppl, "tokens_per_second": 1.0,
                  "train_seconds": 1.0, "wall_seconds": 1.0, "train_tokens": 1, "resumed_from_step": None,
                  "topology_updates": 0, "compute_path": "dense", "precision": "bf16", "other_load": 0.0}
        (run / "study_result.json").write_text(json.dumps({"settings": {}, "result": result}))

    write("d256", "dense-s0", "dense", 256, 3e6, 4e6, 41.0, 0)
    write("d256", "dense-s1", "dense", 256, 3e6, 4e6, 41.5, 1)
    write("d384", "dense-s0", "dense", 384, 7e6, 8e6, 34.0, 0)
    write("wide", "momentum-b64-d0.0625-s0", "momentum", 1024, 3e6, 5e6, 36.7, 0)
    (match,) = main(["--dense", str(tmp_path / "d256"), str(tmp_path / "d384"), "--sparse", str(tmp_path / "wide"),
                     "--output_dir", str(tmp_path / "out")])
    assert match.sparse.width == 1024 and 1.5 < match.linear_multiplier < 7e6 / 3e6
    report = (tmp_path / "out" / "equal_quality.md").read_text()
    assert "41.25 ± 0.35 (2 seeds)" in report and "momentum, block 64, density 0.0625, width 1024" in report
    assert (tmp_path / "out" / "equal_quality.png").read_bytes()[:4] == b"\x89PNG"


def test_model_points_average_seeds():
    class Run:  # the StudyResult fields model_points reads
        def __init__(self, seed, ppl):
            self.method, self.width, self.density, self.block_size = "dense", 256, 1.0, 1
            self.linear_nonzeros, self.nonzero_params, self.val_perplexity, self.seed = 10, 20, ppl, seed

    (point,) = model_points([Run(0, 40.0), Run(1, 42.0)])
    assert point.val_perplexity == 41.0 and point.seeds == 2 and point.val_spread == pytest.approx(math.sqrt(2))
