"""The local `evaluate` metric modules: offline loading and hand-computed cases."""

import doctest
import math

import evaluate
import pytest

import evaluation.metrics as metrics_package
from evaluation.metrics import METRICS_DIR, available_metrics, load_metric

NAMES = ("precision_at_1", "retrieval_recall", "pairwise_accuracy")
INPUTS = {
    "precision_at_1": ["predictions", "references"],
    "retrieval_recall": ["predictions", "references"],
    "pairwise_accuracy": ["positive_scores", "negative_scores"],
}


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_load_works_offline_from_the_folder(name):
    module = evaluate.load(str((METRICS_DIR / name).resolve()))
    assert isinstance(module, evaluate.Metric)
    assert list(module.features) == INPUTS[name]
    assert isinstance(load_metric(name), evaluate.Metric)


def test_available_metrics_and_unknown_name_lists_them():
    assert available_metrics() == sorted(NAMES)
    with pytest.raises(ValueError) as error:
        load_metric("recall")
    message = str(error.value)
    assert str(METRICS_DIR) in message and all(name in message for name in NAMES)


def test_package_docstring_example_runs():
    assert doctest.testmod(metrics_package).failed == 0


# ------------------------------------------------------------------------------------------- precision_at_1


def test_precision_at_1_by_hand():
    metric = load_metric("precision_at_1")
    assert metric.compute(predictions=[0, 2, 0, 1], references=[0, 0, 0, 0]) == {"precision_at_1": 0.5}
    assert metric.compute(predictions=[3], references=[3]) == {"precision_at_1": 1.0}
    # Duplicate queries count once each.
    assert metric.compute(predictions=[1, 1, 1, 0], references=[1, 1, 1, 1]) == {"precision_at_1": 0.75}


def test_precision_at_1_ties_are_decided_by_the_caller():
    # Scores [0.5, 0.5, 0.1] tie the positive (candidate 0) with candidate 1: argmax says 0, the pessimistic rule
    # of evaluation.mmeb says 1; the metric scores whatever it is given.
    metric = load_metric("precision_at_1")
    assert metric.compute(predictions=[0], references=[0])["precision_at_1"] == 1.0
    assert metric.compute(predictions=[1], references=[0])["precision_at_1"] == 0.0


def test_precision_at_1_incremental_batches():
    metric = load_metric("precision_at_1")
    metric.add_batch(predictions=[0, 1], references=[0, 0])
    metric.add_batch(predictions=[0], references=[0])
    assert metric.compute()["precision_at_1"] == pytest.approx(2 / 3)


def test_precision_at_1_empty_raises():
    with pytest.raises(ValueError, match="at least one"):
        load_metric("precision_at_1").compute(predictions=[], references=[])


# ----------------------------------------------------------------------------------------- retrieval_recall


def test_recall_five_captions_per_image_any_in_top_k_is_a_hit():
    metric = load_metric("retrieval_recall")
    # Image 0's captions are 0-4, image 1's are 5-9 (the standard 5-captions protocol).
    rankings = [
        [7, 3, 9, 8, 6, 5, 0, 1, 2, 4],   # first own caption at rank 2
        [5, 0, 1, 2, 3, 4, 6, 7, 8, 9],   # own caption at rank 1
    ]
    relevant = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert metric.compute(predictions=rankings, references=relevant, k=[1, 2, 5, 10]) == {
        "recall@1": 0.5, "recall@2": 1.0, "recall@5": 1.0, "recall@10": 1.0,
    }


def test_recall_text_to_image_single_relevant_and_default_ks():
    metric = load_metric("retrieval_recall")
    rankings = [[0] + list(range(1, 10)), list(range(1, 11)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0], [11] * 10]
    relevant = [[0], [5], [0], [0]]
    # Query 0 hit at rank 1; query 1 (image 5) at rank 5; query 2 at rank 10; query 3 never.
    assert metric.compute(predictions=rankings, references=relevant) == {
        "recall@1": 0.25, "recall@5": 0.5, "recall@10": 0.75,
    }


def test_recall_duplicates_and_single_int_k():
    metric = load_metric("retrieval_recall")
    # A relevant index listed twice, and a ranking repeating an index, still count one hit per query.
    assert metric.compute(predictions=[[2, 2, 0], [1, 0, 2]], references=[[0, 0], [1, 1]], k=1) == {"recall@1": 0.5}
    assert metric.compute(predictions=[[2, 2, 0], [1, 0, 2]], references=[[0, 0], [1, 1]], k=3) == {"recall@3": 1.0}


def test_recall_k_larger_than_the_candidates_counts_the_whole_list():
    metric = load_metric("retrieval_recall")
    assert metric.compute(predictions=[[1, 0], [1, 0]], references=[[0], [2]], k=[1, 10]) == {
        "recall@1": 0.0, "recall@10": 0.5,
    }


def test_recall_ties_follow_the_given_order():
    # Two candidates with equal scores: chunked_topk lists the lower index first, and the metric reads the order.
    metric = load_metric("retrieval_recall")
    assert metric.compute(predictions=[[0, 1]], references=[[0]], k=1) == {"recall@1": 1.0}
    assert metric.compute(predictions=[[0, 1]], references=[[1]], k=1) == {"recall@1": 0.0}


@pytest.mark.parametrize("k", [0, [1, -5], [], [1.5], True])
def test_recall_bad_k_raises(k):
    with pytest.raises(ValueError, match="k must be"):
        load_metric("retrieval_recall").compute(predictions=[[0]], references=[[0]], k=k)


def test_recall_query_without_relevant_raises():
    with pytest.raises(ValueError, match="Query 1 has no relevant"):
        load_metric("retrieval_recall").compute(predictions=[[0], [1]], references=[[0], []], k=1)


# ---------------------------------------------------------------------------------------- pairwise_accuracy


def test_pairwise_accuracy_strict_ties_and_nan_are_wrong():
    metric = load_metric("pairwise_accuracy")
    assert metric.compute(positive_scores=[0.9, 0.2, 0.5, 0.7], negative_scores=[0.1, 0.3, 0.5, 0.6]) == {
        "accuracy": 0.5
    }
    assert metric.compute(positive_scores=[math.nan, 1.0], negative_scores=[0.0, math.nan]) == {"accuracy": 0.0}
    # A collapsed model (equal scores everywhere) gets 0, not a free point.
    assert metric.compute(positive_scores=[0.3] * 4, negative_scores=[0.3] * 4) == {"accuracy": 0.0}


def test_pairwise_accuracy_duplicates_and_tiny_margins():
    metric = load_metric("pairwise_accuracy")
    result = metric.compute(positive_scores=[0.5, 0.5, 0.5], negative_scores=[0.5 - 1e-12, 0.5 - 1e-12, 0.6])
    assert result["accuracy"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------- recall_at_k over embeddings (evaluation.retrieval)


def test_recall_at_k_ranks_the_whole_pool_when_k_reaches_its_size():
    """Three candidates, k up to 10: a query whose relevant candidate ranks last is a hit at every k >= 3, so the
    search must return all three (not max(k) clipped one short). Expected values from a full argsort in numpy."""
    import numpy as np
    import torch

    from evaluation.retrieval import recall_at_k

    queries = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    candidates = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)
    relevant = [[2], [0], [2]]   # query 0's candidate ranks third, query 1's third, query 2's second
    order = np.argsort(-(queries @ candidates.T), axis=1, kind="stable")
    expected = {f"recall@{k}": float(np.mean([any(item in order[row, :k] for item in relevant[row])
                                               for row in range(len(relevant))])) for k in (1, 2, 3, 10)}
    assert expected == {"recall@1": 0.0, "recall@2": 1 / 3, "recall@3": 1.0, "recall@10": 1.0}
    assert recall_at_k(torch.from_numpy(queries), torch.from_numpy(candidates), relevant, ks=(1, 2, 3, 10)) == \
        pytest.approx(expected)
