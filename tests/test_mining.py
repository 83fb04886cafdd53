"""mine_hard_negatives on crafted rankings (hand-computed selections) and on tiny real models."""

import math

import pytest
import torch
from datasets import Dataset

from modeling_unime.judge import MLLMJudge
from modeling_unime.mining import mine_hard_negatives
from modeling_unime.tiny import build_tiny_judge, build_tiny_unime

POOL = [(f"c{j}", None) for j in range(12)]


class AngleEmbedder:
    """Candidate cj sits at angle 0.1 * (j + 1) from every query, so retrieval ranks c0, c1, ..., c11; positives
    sit opposite the queries and rank last."""

    def encode(self, texts, images, **kwargs):
        rows = []
        for text in texts:
            if text.startswith("c"):
                angle = 0.1 * (int(text[1:]) + 1)
            elif text.startswith("p"):
                angle = 3.0
            else:
                angle = 0.0
            rows.append([math.cos(angle), math.sin(angle), 0.0])
        return torch.tensor(rows)


class TableJudge:
    """Scores from a table: positives 0.9; candidates by name; everything else 0.1 + 0.01 * j."""

    def __init__(self, table):
        self.table, self.image_root, self.calls = table, None, 0

    def score(self, query_text, query_image, candidates):
        self.calls += 1
        return torch.tensor([self.table.get(text, 0.9 if text.startswith("p") else 0.1 + 0.01 * int(text[1:]))
                             for text, _ in candidates])


def rows(count):
    return Dataset.from_list(
        [{"query_text": f"query {i}", "query_image": None, "pos_text": f"p{i}", "pos_image": None}
         for i in range(count)]
    )


def test_filter_then_cyclical_sampling_by_hand():
    judge = TableJudge({"c0": 0.95, "c3": 0.95})  # two false negatives: above s_pos - beta = 0.89
    mined, stats = mine_hard_negatives(rows(3), AngleEmbedder(), judge,
                                       pool=POOL + [("p0", None), ("p1", None), ("p2", None)], top_k=12, verbose=False)
    # Kept, in rank order: c1 c2 c4 c5 c6 c7 c8 c9 c10 c11; walk 0,5,1,6,2,7,3,8,4,9.
    expected = ["c1", "c7", "c2", "c8", "c4", "c9", "c5", "c10", "c6", "c11"]
    for row in mined:
        assert row["neg_texts"] == expected
        assert row["judge_scores"][0] == pytest.approx(0.9)
        assert row["judge_scores"][1:] == pytest.approx([0.1 + 0.01 * int(text[1:]) for text in expected])
    assert stats.removed_as_false_negative == 3 * 2 and stats.queries_used_fallback == 0


def test_fewer_candidates_cycle_and_own_positive_is_excluded():
    judge = TableJudge({})
    data = rows(2)
    mined, stats = mine_hard_negatives(data, AngleEmbedder(), judge, pool=[("c0", None), ("c1", None), ("p0", None),
                                                                          ("p1", None)], top_k=50, verbose=False)
    # Row 0 retrieves c0, c1 and row 1's positive p1 (its own p0 is excluded); the judge scores p1 like a
    # positive (0.9 > s_pos - beta), so the filter removes it and sampling cycles over c0, c1.
    assert mined[0]["neg_texts"] == ["c0", "c1"] * 5 and mined[1]["neg_texts"] == ["c0", "c1"] * 5
    assert stats.removed_as_false_negative == 2 and stats.queries_short_of_negatives == 2


def test_empty_after_filter_paper_fallback_and_drop():
    everything_high = {f"c{j}": 0.99 for j in range(12)}
    mined, stats = mine_hard_negatives(rows(2), AngleEmbedder(), TableJudge(everything_high), pool=POOL, top_k=12,
                                       verbose=False, seed=3)
    assert stats.queries_used_fallback == 2
    for row in mined:
        assert row["judge_scores"][1:] == [1.0] * 10 and len(set(row["neg_texts"])) == 10
    again, _ = mine_hard_negatives(rows(2), AngleEmbedder(), TableJudge(everything_high), pool=POOL, top_k=12,
                                   verbose=False, seed=3)
    assert again.to_list() == mined.to_list()
    dropped, stats = mine_hard_negatives(rows(2), AngleEmbedder(), TableJudge(everything_high), pool=POOL, top_k=12,
                                         verbose=False, empty_fallback="drop")
    assert len(dropped) == 0 and stats.queries_dropped == 2


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        mine_hard_negatives(rows(0), AngleEmbedder(), TableJudge({}), verbose=False)
    with pytest.raises(ValueError, match="no 'pos_text' column"):
        mine_hard_negatives(Dataset.from_list([{"query_text": "q", "query_image": None}]), AngleEmbedder(),
                            TableJudge({}), verbose=False)


def test_tiny_models_end_to_end_scores_match_the_judge(capsys):
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    judge = MLLMJudge(*build_tiny_judge())
    data = Dataset.from_list(
        [{"query_text": f"What colour is shape {i}?", "query_image": None, "pos_text": colour, "pos_image": None}
         for i, colour in enumerate(["red", "blue", "green", "yellow", "red blue", "teal"])]
    )
    mined, stats = mine_hard_negatives(data, embedder, judge, top_k=5, num_negatives=4, beta=0.0)
    assert len(mined) == 6
    for row in mined:
        assert row["pos_text"] not in row["neg_texts"]
        fallback = row["judge_scores"][1:] == [1.0] * len(row["neg_texts"])  # the paper's empty-set rule
        texts = [row["pos_text"]] if fallback else [row["pos_text"], *row["neg_texts"]]
        expected = judge.score_pairs([((row["query_text"], None), (text, None)) for text in texts])
        got = torch.tensor(row["judge_scores"][: len(texts)]).float()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert fallback or all(score <= row["judge_scores"][0] + 1e-9 for score in row["judge_scores"][1:])
    output = capsys.readouterr().out
    assert "time per stage" in output and "histogram" in output


def test_missing_image_is_named_before_any_model_runs(tmp_path):
    data = Dataset.from_list([
        {"query_text": "q0", "query_image": None, "pos_text": "a", "pos_image": None},
        {"query_text": "q1", "query_image": "shapes/missing.png", "pos_text": "b", "pos_image": None},
    ])
    with pytest.raises(ValueError, match=r"1 of 1 query/positive image file\(s\) not found .*row 1 query_image "
                                         r"'shapes/missing.png'"):
        mine_hard_negatives(data, AngleEmbedder(), TableJudge({}), image_root=tmp_path, verbose=False)


def test_faiss_retrieval_mines_the_same_rows():
    pytest.importorskip("faiss")
    pool = POOL + [("p0", None), ("p1", None), ("p2", None)]
    exact, _ = mine_hard_negatives(rows(3), AngleEmbedder(), TableJudge({"c0": 0.95}), pool=pool, top_k=12,
                                   verbose=False)
    fast, _ = mine_hard_negatives(rows(3), AngleEmbedder(), TableJudge({"c0": 0.95}), pool=pool, top_k=12,
                                  retrieval="faiss", verbose=False)
    assert fast.to_list() == exact.to_list()
    with pytest.raises(ValueError, match="retrieval='annoy'"):
        mine_hard_negatives(rows(3), AngleEmbedder(), TableJudge({}), retrieval="annoy", verbose=False)


def test_duplicate_rows_and_weak_positives_are_kept_and_counted(capsys):
    data = Dataset.from_list(rows(3).to_list() + [rows(3)[0]])
    judge = TableJudge({f"c{j}": 0.95 for j in range(12)})  # every candidate above the positive's 0.9
    mined, stats = mine_hard_negatives(data, AngleEmbedder(), judge, pool=POOL, top_k=12, seed=2)
    assert len(mined) == 4
    same_pair = ("query_text", "query_image", "pos_text", "pos_image")
    assert [mined[3][key] for key in same_pair] == [mined[0][key] for key in same_pair]
    assert stats.duplicate_rows == 1 and stats.queries_positive_below_all == 4
    report = capsys.readouterr().out
    assert "duplicate (query, positive) rows, kept as given" in report
    assert "the judge scored the positive below every candidate" in report


def test_cache_dir_makes_a_repeated_call_free(tmp_path):
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    data = rows(4)
    judge = MLLMJudge(*build_tiny_judge())
    first, _ = mine_hard_negatives(data, embedder, judge, top_k=3, num_negatives=2, cache_dir=tmp_path, verbose=False)
    embedder.encode = lambda *args, **kwargs: pytest.fail("embeddings should come from the cache")
    judge.score = lambda *args, **kwargs: pytest.fail("judge scores should come from the cache")
    again, _ = mine_hard_negatives(data, embedder, judge, top_k=3, num_negatives=2, cache_dir=tmp_path, verbose=False)
    assert again.to_list() == first.to_list()


@pytest.mark.filterwarnings("ignore::modeling_unime.mining.DegenerateMiningWarning")
def test_the_callers_judge_is_left_as_it_was_and_gets_paths_under_the_image_root(tmp_path):
    """The run's image root reaches the judge through the paths it is given (resolved), not through its attributes."""
    (tmp_path / "shapes").mkdir()
    for name in ("q0", "q1", "p0", "p1"):
        (tmp_path / "shapes" / f"{name}.png").write_bytes(b"")
    data = Dataset.from_list([{"query_text": f"query {i}", "query_image": f"shapes/q{i}.png", "pos_text": f"p{i}",
                               "pos_image": f"shapes/p{i}.png"} for i in range(2)])

    class RecordingJudge:
        def __init__(self):
            self.image_root, self.seen = "/somewhere/else", []

        def score(self, query_text, query_image, candidates):
            self.seen += [query_image, *(image for _, image in candidates)]
            return torch.tensor([0.9 if text.startswith("p") else 0.1 for text, _ in candidates])

    for cache_dir in (None, tmp_path / "cache"):
        judge = RecordingJudge()
        before = dict(vars(judge))
        mine_hard_negatives(data, AngleEmbedder(), judge, image_root=tmp_path, cache_dir=cache_dir, top_k=2,
                            verbose=False)
        assert vars(judge) == {**before, "seen": judge.seen}
        assert judge.seen and {str(tmp_path / "shapes" / f"{name}.png") for name in ("q0", "q1", "p0", "p1")} == set(
            judge.seen)
