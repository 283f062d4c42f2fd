"""Perplexity from accumulated negative log-likelihoods, as an `evaluate` metric that loads offline.

    metric = evaluate.load("<path to this folder>", keep_in_memory=True)
    metric.add_batch(nll_sum=[12.3, 9.8], token_count=[7, 5])   # one row per scored window
    metric.compute()  # {"perplexity": exp(22.1 / 12), "mean_nll": 22.1 / 12, "num_tokens": 12}

Unlike the hub's "perplexity" metric, this one runs no model: the caller scores tokens with the
model it is evaluating (sparse_nlp.lm.evaluation.evaluate_perplexity does) and adds, per window of
text, the summed NLL (natural log) of its scored tokens and their count. Perplexity is then
exp(total NLL / total tokens): every token weighs the same, whichever window it was scored in.
"""
import math

import datasets
import evaluate

_DESCRIPTION = """Perplexity of a causal language model over a token stream: exp of the mean negative
log-likelihood (natural log) over every scored token, from per-window NLL sums and token counts."""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list` of `float`): summed negative log-likelihood (natural log) of the tokens scored in one window.
    token_count (`list` of `int`): how many tokens that window scored.
Returns:
    perplexity (`float`): exp(mean_nll).
    mean_nll (`float`): sum(nll_sum) / sum(token_count), in nats per token.
    num_tokens (`int`): sum(token_count).
Examples:
    >>> metric = evaluate.load("sparse_nlp/lm/metrics/perplexity")
    >>> metric.compute(nll_sum=[2.0, 4.0], token_count=[1, 2])["mean_nll"]
    2.0
"""

_CITATION = """@article{jelinek1977perplexity,
  title={Perplexity---a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L and Bahl, Lalit R and Baker, James K},
  journal={The Journal of the Acoustical Society of America}, volume={62}, number={S1}, year={1977}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "token_count": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, token_count):
        total_tokens = int(sum(token_count))
        if total_tokens <= 0:
            raise ValueError("perplexity needs at least one scored token; the evaluated text is too short")
        mean_nll = float(math.fsum(nll_sum)) / total_tokens
        return {"perplexity": math.exp(mean_nll), "mean_nll": mean_nll, "num_tokens": total_tokens}
