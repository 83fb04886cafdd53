"""Bad input to the embedder, the reranker and the judge: a clear error naming what is wrong, never a silent result."""

import warnings

import pytest
import torch
from PIL import Image

from modeling_unime.judge import MLLMJudge
from modeling_unime.scoring_unime import as_item
from modeling_unime.tiny import build_tiny_judge, build_tiny_reranker, build_tiny_unime

RED = Image.new("RGB", (56, 56), (220, 20, 20))


@pytest.fixture(scope="module")
def embedder():
    model, processor = build_tiny_unime("qwen2_vl")
    model.processor = processor
    return model


@pytest.fixture(scope="module")
def reranker():
    model, processor = build_tiny_reranker("qwen2_5_vl")
    model.processor = processor
    return model


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(batch_size=-2), "batch_size must be a positive integer"),
        (dict(truncate_dim=0), "truncate_dim must be a positive integer or None, got 0"),
        (dict(truncate_dim=65), "truncate_dim=65 is larger than the embedding size 64"),
        (dict(truncate_dim=True), "truncate_dim must be a positive integer or None, got True"),
        (dict(truncate_dim=-1), "truncate_dim must be a positive integer or None, got -1"),
        (dict(truncate_dim=8.0), "truncate_dim must be a positive integer or None, got 8.0"),
    ],
)
def test_encode_refuses_bad_sizes(embedder, arguments, message):
    with pytest.raises(ValueError, match=message):
        embedder.encode(texts=["a red car"], **arguments)


@pytest.mark.parametrize("dim", [0, True, -1])
def test_forward_refuses_a_bad_truncation(embedder, dim):
    batch = embedder.processor(texts=["a red car"])
    with pytest.raises(ValueError, match="truncate_dim must be a positive integer"):
        embedder(**batch, truncate_dim=dim)


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        (dict(texts=123), TypeError, "texts must be a string, a list of strings .* got int"),
        (dict(texts={"text": "a"}), TypeError, "texts must be a string, a list of strings .* got dict"),
        (dict(texts=["a red car"], instruction=["x"]), TypeError, "instruction must be one string .* got list"),
        (dict(texts=["a red car", "   "]), ValueError, r"Row 1: the row has only whitespace \('   '\)"),
        (dict(texts=["a red car", "\n\t"]), ValueError, "Row 1: the row has only whitespace"),
    ],
)
def test_encode_names_bad_texts_and_instructions(embedder, arguments, error, message):
    with pytest.raises(error, match=message):
        embedder.encode(**arguments)


def test_encode_accepts_any_sequence_of_texts(embedder):
    import numpy
    from datasets import Dataset

    texts = ["a red car", "a blue sky"]
    reference = embedder.encode(texts=texts)
    column = Dataset.from_dict({"text": texts})["text"]
    for given in (tuple(texts), column, numpy.array(texts)):
        assert torch.equal(embedder.encode(texts=given), reference)


def test_encode_checks_every_image_before_the_first_forward(embedder, tmp_path, monkeypatch):
    RED.save(tmp_path / "red.png")
    images = ["red.png"] * 39 + ["missing.png"] + ["red.png"] * 3 + ["gone.png"]
    forwards = []
    original = type(embedder).forward
    monkeypatch.setattr(type(embedder), "forward", lambda self, *a, **k: forwards.append(1) or original(self, *a, **k))
    with pytest.raises(ValueError, match=r"Row 39: image file not found: .*missing.png.*; 1 more missing \(row 43: "
                                         r".*gone.png.*\); checked before encoding, nothing was encoded"):
        embedder.encode(images=images, image_root=tmp_path, batch_size=4)
    assert forwards == []
    assert embedder.encode(images=images[:3], image_root=tmp_path, batch_size=2).shape[0] == 3 and forwards


@pytest.mark.parametrize("method", ["rerank", "score"])
@pytest.mark.parametrize("candidates", ["abc", RED, {"text": "red"}])
def test_reranker_refuses_a_single_candidate_not_in_a_list(reranker, method, candidates):
    with pytest.raises(TypeError, match="candidates must be a list of candidates .* wrap a single candidate"):
        getattr(reranker, method)("What colour?", candidates)


@pytest.mark.parametrize("top_k", [-1, 0, True, 1.5])
def test_rerank_refuses_a_bad_top_k(reranker, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        reranker.rerank("What colour?", ["red", "blue", "green"], top_k=top_k, mode="pairwise")


def test_rerank_top_k_keeps_the_best_and_accepts_any_iterable(reranker):
    candidates = ["red", "blue", "green"]
    order, scores = reranker.rerank("What colour?", candidates, mode="pairwise")
    assert sorted(order) == [0, 1, 2] and order == sorted(range(3), key=lambda index: (-float(scores[index]), index))
    top, _ = reranker.rerank("What colour?", iter(candidates), top_k=2, mode="pairwise")
    assert top == order[:2]
    assert reranker.rerank("What colour?", candidates, top_k=10, mode="pairwise")[0] == order


@pytest.mark.parametrize(
    ("query", "candidates", "message"),
    [
        ("What colour?", ["red", None], "candidate 1 is None"),
        ("What colour?", ["red", ""], "candidate 1 has neither text nor image"),
        ("What colour?", ["red", (None, None)], "candidate 1 has neither text nor image"),
        ("What colour?", ["red", ("a", "b", "c")], "candidate 1: a sequence item must be"),
        ("What colour?", ["red", {"txt": "blue"}], r"candidate 1: unknown keys \['txt'\]"),
        ("What colour?", ["red", 3], "candidate 1: unsupported type int"),
        ("", ["red"], "the query has neither text nor image"),
        ("  ", ["red"], "the query has only whitespace"),
        ("What colour?", ["red", " "], "candidate 1 has only whitespace"),
        (None, ["red"], "the query is None"),
        ((None, None), ["red"], "the query has neither text nor image"),
    ],
)
@pytest.mark.parametrize("mode", ["pairwise", "listwise"])
def test_reranker_refuses_empty_or_missing_items(reranker, query, candidates, message, mode):
    with pytest.raises(ValueError, match=message):
        reranker.rerank(query, candidates, mode=mode)


def test_judge_and_reranker_share_one_input_convention(reranker):
    """A bare string is a text candidate for both (the judge used to fail with 'too many values to unpack')."""
    judge = MLLMJudge(*build_tiny_judge("qwen2_5_vl"))
    strings = judge.score("What colour?", None, ["red", "blue"])
    pairs = judge.score("What colour?", None, [("red", None), ("blue", None)])
    dicts = judge.score("What colour?", None, [{"text": "red"}, {"text": "blue"}])
    assert torch.equal(strings, pairs) and torch.equal(strings, dicts)
    with pytest.raises(ValueError, match="candidate 0 is None"):
        judge.score("What colour?", None, [None])
    with pytest.raises(ValueError, match="the query has neither text nor image"):
        judge.score(None, None, ["red"])
    image_scores = reranker.score("What is shown?", [RED, (None, RED), {"image": RED}])
    assert torch.allclose(image_scores, image_scores[0].expand(3))


def test_a_text_that_names_an_image_file_is_a_text_with_a_warning(tmp_path):
    path = tmp_path / "photo.jpg"
    RED.save(path)
    with pytest.warns(UserWarning, match=r"taken as a text, though it names an image file: pass \(None, "):
        assert as_item(str(path), "the query") == (str(path), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert as_item(("", str(path))) == (None, str(path))      # the documented way to pass an image path
        assert as_item("photo.jpg") == ("photo.jpg", None)         # no such file: no warning
        assert as_item(path) == (None, path)                       # a PathLike is an image


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inference_calls_leave_the_callers_mode_also_on_errors(mode):
    """encode / score / rerank switch dropout off for themselves only (`modeling_unime.modeling_unime.evaluation_mode`):
    a Trainer's model is still training after an evaluation call, even one that failed."""
    model, processor = build_tiny_unime("qwen2_vl")
    reranker, reranker_processor = build_tiny_reranker("qwen2_5_vl")
    for module in (model, reranker):
        module.train(mode == "train")
    model.encode(texts=["a red car"], processor=processor)
    with pytest.raises(ValueError, match="neither text nor image"):
        model.encode(texts=[""], processor=processor)
    reranker.score("a red car", ["red", "blue"], processor=reranker_processor)
    reranker.rerank("a red car", ["red", "blue"], processor=reranker_processor)
    with pytest.raises(ValueError):
        reranker.rerank("a red car", [None], processor=reranker_processor)
    for module in (model, reranker):
        assert module.training is (mode == "train")
        assert all(child.training is (mode == "train") for child in module.modules())
