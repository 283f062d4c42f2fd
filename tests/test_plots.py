"""The recipe's training plot: a PNG of loss, validation perplexity and per-layer density, every run in every panel."""
from __future__ import annotations

from sparse_nlp.architectures import is_attention_layer
from sparse_nlp.lm.plots import write_training_plot
from sparse_nlp.lm.reporting import RunResult

LAYERS = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
          "transformer.h.0.mlp.c_proj"]


def _result(run: str, density: float, with_history: bool) -> RunResult:
    history = [{"step": step, "densities": {name: density + 0.01 * i * step for i, name in enumerate(LAYERS)}}
               for step in (0, 5, 10)] if with_history else []
    return RunResult(
        run=run, method="momentum" if with_history else "dense", density=density, nonzero_params=1, total_params=2,
        val_perplexity=10.0, test_perplexity=None, train_tokens=1, tokens_per_second=1.0, train_seconds=1.0,
        loss_history=[(5, 4.0), (10, 3.5), (15, 3.2)], density_history=history,
        loss_curve=[(5, 1.0, 4.0), (10, 2.0, 3.5), (15, 3.0, 3.2)], validation_history=[(10, 2.0, 40.0), (15, 3.0, 33.0)],
    )


def test_attention_and_mlp_layers_are_told_apart():
    attention = ["transformer.h.0.attn.c_attn", "model.layers.1.self_attn.q_proj", "bert.encoder.layer.0.attention.self.query",
                 "model.decoder.layers.0.self_attn.out_proj"]
    mlp = ["transformer.h.0.mlp.c_fc", "model.layers.1.mlp.down_proj", "bert.encoder.layer.0.intermediate.dense",
           "model.decoder.layers.0.fc1"]
    assert all(map(is_attention_layer, attention)) and not any(map(is_attention_layer, mlp))


def test_training_plot_is_written_as_png(tmp_path):
    path = tmp_path / "training.png"
    assert write_training_plot([_result("sparse", 0.2, True), _result("dense", 1.0, False)], str(path)) == str(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_every_panel_shows_each_run(tmp_path):
    from matplotlib.figure import Figure

    drawn = {}
    original = Figure.savefig

    def keep_axes(figure, path, **kwargs):
        drawn.update({axes.get_title(): len(axes.lines) for axes in figure.axes})
        return original(figure, path, **kwargs)

    Figure.savefig = keep_axes
    try:
        write_training_plot([_result("sparse", 0.2, True), _result("dense", 1.0, False)], str(tmp_path / "t.png"))
    finally:
        Figure.savefig = original
    for title in ("Training loss", "Training loss against training time", "Validation perplexity during training",
                  "Validation perplexity against training time"):
        assert drawn[title] == 2, title  # sparse and dense
    assert drawn["Per-layer density (sparse run)"] == len(LAYERS)
