"""Hard-negative selection (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining": retrieval, false-negative
filter, cyclical sampling) against brute force and hand-computed expectations."""

import math
import random

import numpy as np
import pytest
import torch

from modeling_unime.mining.rules import cyclical_sample, false_negative_filter
from modeling_unime.mining.stats import SelectionStats
from modeling_unime.util.retrieval import chunked_top_k, faiss_top_k

INF = math.inf


def random_unit_vectors(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=-1)


def brute_force_top_k(queries, pool, k, exclude=None, threshold=None):
    similarities = queries @ pool.T
    if exclude is not None:
        for query, excluded in enumerate(exclude):
            if excluded is None:
                continue
            excluded = [excluded] if isinstance(excluded, int) else list(excluded)
            similarities[query, excluded] = -INF
    if threshold is not None:
        similarities[similarities >= threshold] = -INF
    scores, indices = similarities.topk(min(k, pool.shape[0]), dim=1)
    indices[scores == -INF] = -1
    missing = k - scores.shape[1]
    scores = torch.cat([scores, torch.full((queries.shape[0], missing), -INF, dtype=scores.dtype)], dim=1)
    indices = torch.cat([indices, torch.full((queries.shape[0], missing), -1, dtype=torch.long)], dim=1)
    return scores, indices


# ---------------------------------------------------------------------------------------------------------------------
# chunked_top_k
# ---------------------------------------------------------------------------------------------------------------------

NUM_QUERIES, NUM_POOL, DIM = 37, 53, 16
QUERIES = random_unit_vectors(NUM_QUERIES, DIM, seed=0)
POOL = random_unit_vectors(NUM_POOL, DIM, seed=1)
_exclusion_rng = random.Random(2)
# Mixed forms on purpose: a set, a bare int, None, an empty list, a repeated index.
EXCLUDE = [
    None if q % 9 == 4 else (q % NUM_POOL if q % 5 == 0 else set(_exclusion_rng.sample(range(NUM_POOL), 1 + q % 4)))
    for q in range(NUM_QUERIES)
]
EXCLUDE[1] = []
EXCLUDE[2] = [7, 7, 3]


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 16, 37, 53, 64, 1024])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_chunked_top_k_equals_brute_force(chunk_size, k):
    expected_scores, expected_indices = brute_force_top_k(QUERIES, POOL, k)
    scores, indices = chunked_top_k(QUERIES, POOL, k, chunk_size=chunk_size)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_size, query_chunk_size", [(1, None), (5, 3), (11, 37), (53, 1), (100, 8)])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_chunked_top_k_with_exclusions_and_threshold_equals_brute_force(chunk_size, query_chunk_size, threshold):
    k = 20
    expected_scores, expected_indices = brute_force_top_k(QUERIES, POOL, k, EXCLUDE, threshold)
    scores, indices = chunked_top_k(
        QUERIES, POOL, k, chunk_size=chunk_size, exclude=EXCLUDE, similarity_threshold=threshold,
        query_chunk_size=query_chunk_size,
    )
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-12)

    for query, excluded in enumerate(EXCLUDE):
        excluded = set() if excluded is None else {excluded} if isinstance(excluded, int) else set(excluded)
        assert excluded.isdisjoint(indices[query].tolist())
    if threshold is not None:
        assert bool((scores < threshold).all())
        # The threshold must actually bite for this test to mean anything.
        assert (brute_force_top_k(QUERIES, POOL, k, EXCLUDE)[0] >= threshold).any()


def test_chunked_top_k_pads_with_minus_one_and_minus_inf_when_pool_is_small():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    scores, indices = chunked_top_k(queries, pool, k=5, chunk_size=2, exclude=[[0], None])
    assert indices.tolist() == [[1, 2, -1, -1, -1], [2, 1, 0, -1, -1]]
    torch.testing.assert_close(scores[0, :2], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(scores[1, :3], torch.tensor([1.0, 0.8, 0.0]))
    assert scores[0, 2:].tolist() == [-INF] * 3 and scores[1, 3:].tolist() == [-INF] * 2

    # A threshold below every similarity leaves nothing at all.
    scores, indices = chunked_top_k(queries, pool, k=2, similarity_threshold=-1.0)
    assert indices.tolist() == [[-1, -1], [-1, -1]]
    assert scores.tolist() == [[-INF, -INF], [-INF, -INF]]

    scores, indices = chunked_top_k(queries, pool[:0], k=2)
    assert indices.tolist() == [[-1, -1], [-1, -1]]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5, 6, 7])
def test_chunked_top_k_breaks_ties_by_lower_pool_index(chunk_size):
    # Exactly representable vectors: every duplicate gets a bit-identical similarity, whatever the BLAS kernel.
    e0, e1, e2, half = [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0.5, 0.5, 0.5, 0.5]
    pool = torch.tensor([e1, e0, e0, e2, e0, half, e0])
    queries = torch.tensor([e0, half, e2])
    scores, indices = chunked_top_k(queries, pool, k=7, chunk_size=chunk_size)
    assert indices.tolist() == [
        [1, 2, 4, 6, 5, 0, 3],  # 1.0 x4 by index, then 0.5, then 0.0 x2 by index
        [5, 0, 1, 2, 3, 4, 6],  # 1.0, then 0.5 x6 by index
        [3, 5, 0, 1, 2, 4, 6],
    ]
    scores, indices = chunked_top_k(queries, pool, k=3, chunk_size=chunk_size, exclude=[[2, 4], [5], [3]])
    assert indices.tolist() == [[1, 6, 5], [0, 1, 2], [5, 0, 1]]
    assert scores.tolist() == [[1.0, 1.0, 0.5], [0.5, 0.5, 0.5], [0.5, 0.0, 0.0]]


@pytest.mark.parametrize("chunk_size", [3, 7, 16, 25, 64])
def test_chunked_top_k_orders_forty_ties_by_pool_index_across_chunks(chunk_size):
    """40 bit-identical similarities spread over several chunks: CPU ``torch.sort`` is unstable from 17 entries, so
    the running merge must sort stably for the lower pool index to come first. The reference is Python's stable
    ``sorted`` over similarities computed by hand (0, 0.5 and 1 are exact)."""
    e0, e1, half = [1.0, 0.0], [0.0, 1.0], [0.5, 0.0]
    pool_rows = [e0 if index % 3 != 1 else (half if index % 2 else e1) for index in range(60)]
    exact_similarity = [row[0] for row in pool_rows]  # the query is e0
    assert exact_similarity.count(1.0) == 40
    k = 45
    reference = sorted(range(len(pool_rows)), key=lambda index: -exact_similarity[index])[:k]
    scores, indices = chunked_top_k(torch.tensor([e0]), torch.tensor(pool_rows), k, chunk_size=chunk_size)
    assert indices[0].tolist() == reference
    assert scores[0].tolist() == [exact_similarity[index] for index in reference]


@pytest.mark.parametrize("search, chunk_size", [("chunked", 1), ("chunked", 2), ("chunked", 5), ("faiss", None)])
def test_a_candidate_exactly_at_delta_is_dropped(search, chunk_size):
    """Eq. 1 drops similarity >= delta: pool item 2 sits exactly at delta = 0.5 (exact in float32: only the first
    coordinate meets the query's non-zero one), so it goes, with the one above; the one just below stays."""
    below = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
    first_coordinates = [0.0, 0.75, 0.5, below, 0.25]
    pool = torch.tensor([[value, math.sqrt(1 - value * value)] for value in first_coordinates], dtype=torch.float32)
    query = torch.tensor([[1.0, 0.0]])
    assert (query @ pool.T)[0].tolist() == first_coordinates
    stats = SelectionStats()
    if search == "faiss":
        pytest.importorskip("faiss")
        scores, indices = faiss_top_k(query, pool, 5, similarity_threshold=0.5, stats=stats)
    else:
        scores, indices = chunked_top_k(query, pool, 5, chunk_size=chunk_size, similarity_threshold=0.5, stats=stats)
    assert indices[0].tolist() == [3, 4, 0, -1, -1]
    assert scores[0, :3].tolist() == [below, 0.25, 0.0]
    assert stats.removed_by_threshold == 2 and stats.candidates_retrieved == 3


def test_chunked_top_k_never_forms_a_block_larger_than_query_chunk_by_pool_chunk(monkeypatch):
    num_queries, num_pool, k, query_chunk, pool_chunk = 40, 50, 6, 8, 16
    queries, pool = random_unit_vectors(num_queries, 8, seed=3), random_unit_vectors(num_pool, 8, seed=4)
    similarity_shapes, sort_shapes = [], []
    real_matmul, real_sort = torch.matmul, torch.sort

    def recording_matmul(left, right, *args, **kwargs):
        result = real_matmul(left, right, *args, **kwargs)
        similarity_shapes.append(tuple(result.shape))
        return result

    def recording_sort(tensor, *args, **kwargs):
        sort_shapes.append(tuple(tensor.shape))
        return real_sort(tensor, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", recording_matmul)
    monkeypatch.setattr(torch, "sort", recording_sort)
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda *_: pytest.fail("use torch.matmul, which is monitored"))
    scores, _ = chunked_top_k(queries, pool, k, chunk_size=pool_chunk, query_chunk_size=query_chunk)
    monkeypatch.undo()

    assert len(similarity_shapes) == math.ceil(num_queries / query_chunk) * math.ceil(num_pool / pool_chunk)
    assert max(rows for rows, _ in similarity_shapes) == query_chunk
    assert max(cols for _, cols in similarity_shapes) == pool_chunk
    assert (num_pool - 3 * pool_chunk) in {cols for _, cols in similarity_shapes}  # the ragged last pool chunk
    assert all(rows <= query_chunk and cols <= pool_chunk + k for rows, cols in sort_shapes)
    torch.testing.assert_close(scores, brute_force_top_k(queries, pool, k)[0])


def test_chunked_top_k_scores_half_precision_in_float32():
    queries, pool = torch.randn(3, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    scores, indices = chunked_top_k(queries, pool, 2, chunk_size=1)
    assert scores.dtype == torch.float32
    assert torch.equal(indices, torch.topk(queries.float() @ pool.float().T, 2).indices)


def test_chunked_top_k_records_stats():
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pool = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    stats = SelectionStats()
    chunked_top_k(queries, pool, k=3, chunk_size=3, exclude=[[0], {2, 2}], similarity_threshold=0.7, stats=stats)
    # query 0: pool 0 excluded, pool 3 (0.8) over delta -> {1, 2}; query 1: pool 2 excluded, pool 1 (0.8) over -> {0, 3}
    assert (stats.candidates_retrieved, stats.removed_by_threshold, stats.removed_as_positive) == (4, 2, 2)
    assert stats.queries == 0  # counted by the caller, once per selected query


def test_chunked_top_k_rejects_bad_inputs():
    pool = random_unit_vectors(5, 4, seed=5).float()
    queries = pool[:2].clone()
    with pytest.raises(ValueError, match="outside"):
        chunked_top_k(queries, pool, 2, exclude=[[5], None])
    with pytest.raises(ValueError, match="2 queries"):
        chunked_top_k(queries, pool, 2, exclude=[[1]])
    with pytest.raises(ValueError, match="row 1"):
        chunked_top_k(torch.tensor([[1.0, 0, 0, 0], [math.nan, 0, 0, 0]]), pool, 2)
    with pytest.raises(ValueError, match="sizes differ"):
        chunked_top_k(queries[:, :3], pool, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_top_k(queries, pool, 2, chunk_size=0)
    with pytest.raises(ValueError, match="similarity_threshold"):
        chunked_top_k(queries, pool, 2, similarity_threshold=math.nan)
    assert chunked_top_k(queries, pool, 0)[1].shape == (2, 0)


# ---------------------------------------------------------------------------------------------------------------------
# false_negative_filter
# ---------------------------------------------------------------------------------------------------------------------


def test_false_negative_filter_keeps_the_boundary_and_drops_just_above():
    positive, beta = 0.5, 0.01
    alpha = positive - beta
    kept = false_negative_filter([alpha, alpha + 1e-6, 0.2, positive, 0.9, 0.0], positive, beta=beta)
    assert isinstance(kept, np.ndarray) and kept.dtype == bool
    assert kept.tolist() == [True, False, True, False, False, True]
    # 0.3 - 0.1 is 0.19999999999999998 in binary floating point; 0.2 still sits on the boundary and is kept.
    assert false_negative_filter([0.2, 0.2000001], 0.3, beta=0.1).tolist() == [True, False]
    assert false_negative_filter([], 0.5).tolist() == []


def test_false_negative_filter_returns_a_tensor_for_tensor_scores():
    kept = false_negative_filter(torch.tensor([0.95, 0.3, 0.85]), torch.tensor(0.9), beta=0.01)
    assert kept.dtype == torch.bool and kept.tolist() == [False, True, True]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_false_negative_filter_refuses_non_finite_scores(bad):
    scores = [0.1, 0.2, bad, 0.3, bad]
    with pytest.raises(ValueError, match=r"candidate 2 .*2 non-finite.*on_nonfinite='drop'"):
        false_negative_filter(scores, 0.9)
    assert false_negative_filter(scores, 0.9, on_nonfinite="drop").tolist() == [True, True, False, True, False]
    with pytest.raises(ValueError, match="positive_score"):
        false_negative_filter([0.1], bad)
    with pytest.raises(ValueError, match="on_nonfinite"):
        false_negative_filter([0.1], 0.9, on_nonfinite="keep")


# ---------------------------------------------------------------------------------------------------------------------
# cyclical_sample
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_candidates, expected",
    [
        (23, [0, 5, 10, 15, 20, 1, 6, 11, 16, 21]),
        (12, [0, 5, 10, 1, 6, 11, 2, 7, 3, 8]),
        (10, [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]),
        (7, [0, 5, 1, 6, 2, 3, 4, 0, 5, 1]),  # walk order 0 5 1 6 2 3 4, then again from its start
        (3, [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]),
        (1, [0] * 10),
    ],
)
def test_cyclical_sample_walk(num_candidates, expected):
    positions, used_fallback = cyclical_sample(list(range(100, 100 + num_candidates)))
    assert positions == expected and used_fallback is False
    assert cyclical_sample(num_candidates) == (expected, False)


def test_cyclical_sample_other_settings():
    assert cyclical_sample(list("abcdefgh"), num_negatives=4, interval=3) == ([0, 3, 6, 1], False)
    assert cyclical_sample(6, num_negatives=6, interval=1) == ([0, 1, 2, 3, 4, 5], False)
    assert cyclical_sample(6, num_negatives=0) == ([], False)


@pytest.mark.parametrize("make_rng", [lambda: random.Random(7), lambda: np.random.default_rng(7)])
def test_cyclical_sample_paper_fallback_is_distinct_and_reproducible(make_rng):
    fallback_pool = [f"candidate {i}" for i in range(50)]
    positions, used_fallback = cyclical_sample([], fallback_pool=fallback_pool, rng=make_rng())
    assert used_fallback is True
    assert len(positions) == 10 and len(set(positions)) == 10
    assert all(isinstance(p, int) and 0 <= p < 50 for p in positions)
    assert cyclical_sample([], fallback_pool=fallback_pool, rng=make_rng()) == (positions, True)
    assert positions != list(range(10))  # actually random, not the head of the pool


def test_cyclical_sample_paper_fallback_with_a_small_pool_uses_it_evenly():
    positions, used_fallback = cyclical_sample([], fallback_pool=4, rng=random.Random(0))
    assert used_fallback is True and len(positions) == 10
    assert sorted(positions.count(p) for p in range(4)) == [2, 2, 3, 3]
    assert set(positions[:4]) == set(positions[4:8]) == {0, 1, 2, 3}


def test_cyclical_sample_paper_fallback_draws_from_the_given_rng():
    """The fallback is the caller's generator's draw: each seed gives its own positions, the very ones that
    generator yields for a sample of 10 from range(50)."""
    draws = {}
    for seed in range(5):
        positions, _ = cyclical_sample([], fallback_pool=50, rng=random.Random(seed))
        assert positions == random.Random(seed).sample(range(50), 10)
        numpy_positions, _ = cyclical_sample([], fallback_pool=50, rng=np.random.default_rng(seed))
        assert numpy_positions == np.random.default_rng(seed).choice(50, size=10, replace=False).tolist()
        draws[seed] = tuple(positions)
    assert len(set(draws.values())) == 5


def test_walk_seeds_the_fallback_per_row():
    """Rows whose candidates all fail the false-negative filter fall back to a random draw seeded by
    ``seed * 1_000_003 + row``: two rows with the same scores draw differently, the same row always alike."""
    from modeling_unime.mining.config import MiningConfig
    from modeling_unime.mining.selection import walk

    config = MiningConfig(num_negatives=4, beta=0.01, seed=3)
    scores = [0.99] * 20  # every candidate above s_pos - beta: nothing survives the filter
    selections = [walk(scores, 0.5, config, row_index=row) for row in range(4)]
    assert all(selection.used_fallback and selection.ranked == [] for selection in selections)
    for row, selection in enumerate(selections):
        assert selection.positions == random.Random(3 * 1_000_003 + row).sample(range(20), 4)
        assert walk(scores, 0.5, config, row_index=row).positions == selection.positions
    assert len({tuple(selection.positions) for selection in selections}) == 4
    other_seed = MiningConfig(num_negatives=4, beta=0.01, seed=4)
    assert walk(scores, 0.5, other_seed, row_index=0).positions != selections[0].positions


def test_cyclical_sample_drop_and_bad_fallback():
    assert cyclical_sample([], empty_fallback="drop", fallback_pool=50) == ([], True)
    with pytest.raises(ValueError, match="empty_fallback"):
        cyclical_sample(list(range(20)), empty_fallback="random")
    with pytest.raises(ValueError, match="fallback_pool"):
        cyclical_sample([], empty_fallback="paper")
    with pytest.raises(ValueError, match="empty"):
        cyclical_sample([], fallback_pool=[])
    with pytest.raises(ValueError, match="interval"):
        cyclical_sample(5, interval=0)
    with pytest.raises(TypeError, match="rng"):
        cyclical_sample([], fallback_pool=50, rng=7)


# ---------------------------------------------------------------------------------------------------------------------
# SelectionStats
# ---------------------------------------------------------------------------------------------------------------------


def test_selection_stats_update_merge_and_summary():
    worker_a, worker_b = SelectionStats(), SelectionStats()
    worker_a.update(queries=150, candidates_retrieved=7_000, removed_by_threshold=300, removed_as_positive=160,
                    removed_as_false_negative=3_000, used_fallback=2, dropped=5, short_of_negatives=18)
    worker_b.update(queries=50, candidates_retrieved=2_876, removed_by_threshold=21, removed_as_positive=74,
                    removed_as_false_negative=1_321, used_fallback=True, short_of_negatives=6)
    total = worker_a.merge(worker_b)
    assert worker_a.queries == 150  # merge does not mutate
    assert (total.queries, total.candidates_retrieved, total.removed_by_threshold, total.removed_as_positive) == (
        200, 9_876, 321, 234)
    assert (total.removed_as_false_negative, total.queries_used_fallback, total.queries_dropped,
            total.queries_short_of_negatives) == (4_321, 3, 5, 24)

    summary = total.summary()
    for count in ["200", "9,876", "321", "234", "4,321", "43.8% of retrieved", "1.5% of queries", "2.5% of queries",
                  "12.0% of queries"]:
        assert count in summary, count
    assert "12.0% of queries had fewer than 10 unique negatives: raise top_k or lower beta." in summary
    assert "empty_fallback='drop'" in summary
    assert "similarity_threshold" in summary


def test_selection_stats_edge_cases():
    assert "no query was recorded" in SelectionStats().summary()
    assert "none: every query got its negatives." in SelectionStats(queries=10, candidates_retrieved=500).summary()
    with pytest.raises(ValueError, match="grow"):
        SelectionStats().update(queries=-1)
    with pytest.raises(ValueError, match="merge"):
        SelectionStats(num_negatives=10).merge(SelectionStats(num_negatives=8))


def healthy(**changes) -> SelectionStats:
    """1,000 queries x 50 candidates, a judge that puts the positive above 90% of them, 0.5% fallback."""
    counts = dict(queries=1_000, candidates_retrieved=50_000, removed_as_false_negative=5_000,
                  queries_used_fallback=5, candidates_judged=50_000, candidates_below_positive=45_000,
                  score_gap_sum=20_000.0)
    return SelectionStats(**{**counts, **changes})


def test_a_healthy_selection_has_no_warning():
    stats = healthy()
    assert stats.degenerate_warnings(beta=0.01) == [] and stats.warning_block(0.01) == ""
    assert "WARNING" not in stats.summary(beta=0.01)
    assert stats.mean_score_gap == pytest.approx(0.4)


@pytest.mark.parametrize("changes, flagged", [
    (dict(queries_used_fallback=100), False),                      # exactly 10%: not above the line
    (dict(queries_used_fallback=101), True),
    (dict(queries_used_fallback=60, queries_dropped=41), True),    # dropped queries count too
    (dict(removed_as_false_negative=45_000), False),               # exactly 90%
    (dict(removed_as_false_negative=45_001), True),
    (dict(candidates_below_positive=30_000), False),               # exactly 60%
    (dict(candidates_below_positive=29_999), True),
    (dict(candidates_judged=49, candidates_below_positive=0), False),  # too few judged pairs to tell
])
def test_degenerate_run_thresholds(changes, flagged):
    stats = healthy(**changes)
    assert bool(stats.degenerate_warnings(beta=0.01)) is flagged
    assert ("WARNING: degenerate mining run" in stats.summary(beta=0.01)) is flagged


def test_degenerate_warning_names_causes_and_fixes():
    stats = healthy(queries_used_fallback=854, removed_as_false_negative=49_000, candidates_below_positive=19_000,
                    score_gap_sum=190.0)
    block = stats.warning_block(beta=0.01)
    assert block.startswith("WARNING: degenerate mining run")
    assert all(line.startswith("WARNING:") for line in block.splitlines())
    for fact in ("85.4% of queries (854 of 1000)", "98.0% of the retrieved candidates", "above only 38.0%",
                 "0.0038 (below beta = 0.01)", "a judge at chance", "lower beta below that gap", "raise top_k",
                 "empty_fallback: drop"):
        assert fact in block, fact
    # The summary ends with the block; with beta 0 it does not advise lowering beta.
    assert stats.summary(beta=0.01).endswith(block)
    assert "lower beta" not in healthy(queries_used_fallback=854).warning_block(beta=0.0)
    merged = stats.merge(healthy())
    assert merged.score_gap_sum == pytest.approx(20_190.0) and merged.candidates_judged == 100_000


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_faiss_top_k_equals_chunked_top_k(threshold):
    pytest.importorskip("faiss")
    queries, pool = random_unit_vectors(23, 16, seed=5).float(), random_unit_vectors(97, 16, seed=6).float()
    exclude = [[row % 97, (row * 7) % 97] for row in range(23)]
    exact_stats, faiss_stats = SelectionStats(), SelectionStats()
    exact = chunked_top_k(queries, pool, 12, chunk_size=10, exclude=exclude, similarity_threshold=threshold,
                               stats=exact_stats)
    fast = faiss_top_k(queries, pool, 12, exclude=exclude, similarity_threshold=threshold, stats=faiss_stats)
    assert torch.equal(fast[1], exact[1])
    torch.testing.assert_close(fast[0], exact[0].float(), atol=1e-6, rtol=0)
    assert faiss_stats == exact_stats


def test_faiss_top_k_pads_a_small_pool():
    pytest.importorskip("faiss")
    queries, pool = random_unit_vectors(2, 4, seed=1).float(), random_unit_vectors(3, 4, seed=2).float()
    scores, indices = faiss_top_k(queries, pool, 5, exclude=[[0], None])
    assert (indices[0] >= 0).sum() == 2 and (indices[1] >= 0).sum() == 3
    assert indices[0, 2:].tolist() == [-1, -1, -1] and torch.isinf(scores[0, 2:]).all()
