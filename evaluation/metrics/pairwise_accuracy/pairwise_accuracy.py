"""Pairwise accuracy: the fraction of pairs where the positive outscores the negative (SugarCrepe's metric)."""

import math

import datasets
import evaluate

_DESCRIPTION = """
Pairwise accuracy: each example is one (positive score, negative score) pair, e.g. sim(image, caption) and
sim(image, negative_caption) in SugarCrepe. An example is correct iff the positive score is STRICTLY greater than
the negative one. An exact tie counts as wrong, so a model that gives every caption the same score gets 0 rather
than a free 50% or 100%; a NaN score also counts as wrong (every comparison with NaN is false).
"""

_KWARGS_DESCRIPTION = """
Args:
    positive_scores (`list` of `float`): score of the correct item of each pair.
    negative_scores (`list` of `float`): score of the wrong item of each pair.

Returns:
    accuracy (`float`): fraction of pairs with ``positive_score > negative_score``, in [0, 1].

Examples:
    >>> metric = evaluate.load("evaluation/metrics/pairwise_accuracy")
    >>> metric.compute(positive_scores=[0.9, 0.2, 0.5, 0.7], negative_scores=[0.1, 0.3, 0.5, 0.6])
    {'accuracy': 0.5}
"""

_CITATION = """
@inproceedings{hsieh2023sugarcrepe,
  title={SugarCrepe: Fixing Hackable Benchmarks for Vision-Language Compositionality},
  author={Hsieh, Cheng-Yu and Zhang, Jieyu and Ma, Zixian and Kembhavi, Aniruddha and Krishna, Ranjay},
  booktitle={NeurIPS Datasets and Benchmarks},
  year={2023}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PairwiseAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"positive_scores": datasets.Value("float64"), "negative_scores": datasets.Value("float64")}
            ),
        )

    def _compute(self, positive_scores, negative_scores) -> dict:
        if len(positive_scores) == 0:
            raise ValueError("pairwise_accuracy needs at least one pair; got empty positive_scores.")
        # None (a missing score) is stored as null by Arrow: treat it like NaN, a wrong answer.
        correct = sum(
            positive is not None and negative is not None and not math.isnan(positive) and positive > negative
            for positive, negative in zip(positive_scores, negative_scores)
        )
        return {"accuracy": correct / len(positive_scores)}
