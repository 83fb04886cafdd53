"""Recall@k for retrieval with one or more relevant candidates per query (image-text retrieval protocol)."""

import datasets
import evaluate

_DESCRIPTION = """
Recall@k as used for zero-shot image-text retrieval (Flickr30K, COCO, ShareGPT4V, Urban1K): a query is a hit at k
when ANY of its relevant candidates is among its top k ranked candidates; recall@k is the fraction of hit queries.
With 5 captions per image, an image query (image->text) hits when any of its 5 captions is in the top k; a caption
query (text->image) has its single image as the relevant item.

The metric takes rankings, not a similarity matrix, because `evaluate` stores inputs row by row: each prediction is
one query's ranked candidate indices (best first), truncated to at least max(k) items, or to all the candidates when
there are fewer (a k larger than the list then counts the whole list). Each reference is the list of that query's
relevant candidate indices; duplicates in it change nothing. Ties between scores are broken by whoever ranks
(`modeling_unime.util.retrieval.chunked_top_k` puts the lower candidate index first).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): ranked candidate indices per query, best first.
    references (`list` of `list` of `int`): relevant candidate indices per query (at least one each).
    k (`int` or `list` of `int`, defaults to `[1, 5, 10]`): the cut-offs.

Returns:
    recall@<k> (`float`) for each k: fraction of queries with a relevant candidate in their top k, in [0, 1].

Examples:
    >>> metric = evaluate.load("evaluation/metrics/retrieval_recall")
    >>> metric.compute(predictions=[[3, 0, 1], [2, 1, 0]], references=[[0, 4], [0]], k=[1, 2, 3])
    {'recall@1': 0.0, 'recall@2': 0.5, 'recall@3': 1.0}
"""

_CITATION = """
@article{karpathy2015deep,
  title={Deep Visual-Semantic Alignments for Generating Image Descriptions},
  author={Karpathy, Andrej and Fei-Fei, Li},
  journal={CVPR},
  year={2015}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references, k=(1, 5, 10)) -> dict:
        cutoffs = [k] if isinstance(k, int) else list(k)
        valid = [isinstance(cutoff, int) and not isinstance(cutoff, bool) and cutoff >= 1 for cutoff in cutoffs]
        if not cutoffs or not all(valid):
            raise ValueError(f"k must be a positive int or a non-empty list of positive ints; got {k!r}.")
        if len(predictions) == 0:
            raise ValueError("retrieval_recall needs at least one query; got empty predictions.")
        hit_ranks = []
        for query, (ranking, relevant) in enumerate(zip(predictions, references)):
            if len(relevant) == 0:
                # Recall is undefined for such a query; counting it as a miss would silently lower every score.
                raise ValueError(f"Query {query} has no relevant candidate (references[{query}] is empty).")
            relevant_set = set(relevant)
            hit_ranks.append(next((rank for rank, index in enumerate(ranking) if index in relevant_set), None))
        return {
            f"recall@{cutoff}": sum(rank is not None and rank < cutoff for rank in hit_ranks) / len(hit_ranks)
            for cutoff in cutoffs
        }
