"""precision@1: the fraction of queries whose top-ranked candidate is the positive (MMEB's metric)."""

import datasets
import evaluate

_DESCRIPTION = """
precision@1 over ranked candidate lists: a query scores 1 when the index of its top-ranked candidate equals the
index of its positive, else 0; the result is the mean over queries. On MMEB-eval the positive is candidate 0, so
``references`` is all zeros there.

Ties are decided upstream, by whoever turns scores into ``predictions``: this metric only compares integers. This
package's MMEB caller (`evaluation.mmeb.predictions_from_scores`) offers three rules: ``"argmax"`` (the default, as
VLM2Vec's official scorer: the first index wins a tie, so a tie with the positive, candidate 0, counts as correct),
``"authors"`` (the UniME-V2 authors' scorer: numpy's argpartition and argsort over the top 10 decide a tie) and
``"strict"`` (a tie with the positive counts as wrong, so a constant, collapsed embedder scores 0 instead of 100).
The evaluation recipe reports which rule it used.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): index of the top-ranked candidate of each query.
    references (`list` of `int`): index of the positive candidate of each query.

Returns:
    precision_at_1 (`float`): fraction of queries with ``prediction == reference``, in [0, 1].

Examples:
    >>> metric = evaluate.load("evaluation/metrics/precision_at_1")
    >>> metric.compute(predictions=[0, 2, 0, 1], references=[0, 0, 0, 0])
    {'precision_at_1': 0.5}
"""

_CITATION = """
@inproceedings{jiang2025vlm2vec,
  title={VLM2Vec: Training Vision-Language Models for Massive Multimodal Embedding Tasks},
  author={Jiang, Ziyan and Meng, Rui and Yang, Xinyi and Yavuz, Semih and Zhou, Yingbo and Chen, Wenhu},
  booktitle={ICLR},
  year={2025}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PrecisionAt1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        if len(predictions) == 0:
            raise ValueError("precision_at_1 needs at least one query; got empty predictions.")
        correct = sum(int(prediction) == int(reference) for prediction, reference in zip(predictions, references))
        return {"precision_at_1": correct / len(predictions)}
