"""MLLMJudge: the score formula, the official-compat rule, and prefix sharing equal to the plain path."""

import math

import pytest
import torch
from PIL import Image

from conftest import tiny_judge
from modeling_unime.judge import JUDGE_INSTRUCTION, MLLMJudge, official_repetition_penalty
from modeling_unime.tiny import build_tiny_judge

QUERY_IMAGE = Image.new("RGB", (112, 84), (200, 30, 30))
CANDIDATES = [
    ("red", None),
    ("a blue square", None),
    ("green", Image.new("RGB", (56, 56), (0, 200, 0))),
    (None, Image.new("RGB", (84, 56), (0, 0, 200))),
    ("What colour is it? red", None),
]




def full_forward_logits(model, processor, prompt, images):
    """Independent reference: a causal-LM forward over the whole vocabulary, logits at the last position."""
    batch = processor(text=[prompt], images=images or None, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[0, -1]


def test_prompt_holds_instruction_query_and_candidate_in_one_user_turn():
    judge = MLLMJudge(*tiny_judge())
    prompt = judge.render(("<|image_1|>\nWhat colour is the shape?", QUERY_IMAGE), ("red", None))
    assert prompt.count("<|im_start|>user") == 1
    user_turn = prompt.split("<|im_start|>user\n")[1]
    assert user_turn.startswith(JUDGE_INSTRUCTION + "Query:<|vision_start|><|image_pad|><|vision_end|>")
    assert user_turn.endswith("What colour is the shape?Candidate:red<|im_end|>\n<|im_start|>assistant\n")
    assert "<|image_1|>" not in prompt


@pytest.mark.parametrize("official_compat", [False, True])
def test_score_equals_hand_computed_softmax(official_compat):
    model, processor = tiny_judge()
    judge = MLLMJudge(model, processor, official_compat=official_compat, prefix_sharing=False)
    yes, no = (processor.tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No"))
    pairs = [(("What colour is the shape?", QUERY_IMAGE), candidate) for candidate in CANDIDATES]
    scores = judge.score_pairs(pairs)
    for (query, candidate), score in zip(pairs, scores):
        images = [image for image in (query[1], candidate[1]) if image is not None]
        logits = full_forward_logits(model, processor, judge.render(query, candidate), images)
        z_yes, z_no = float(logits[yes]), float(logits[no])
        if official_compat:  # HF RepetitionPenaltyLogitsProcessor, written out
            z_yes = z_yes / 1.05 if z_yes > 0 else z_yes * 1.05
            z_no = z_no / 1.05 if z_no > 0 else z_no * 1.05
        expected = math.exp(z_yes) / (math.exp(z_yes) + math.exp(z_no))
        assert abs(float(score) - expected) < 1e-5
    assert scores.max() - scores.min() > 0.05  # the pairs really score differently


def test_official_rule_matches_released_scores_grid():
    # Released scores are sigmoid(k * 0.125 / 1.05): bf16 logit gaps of the same sign through the penalty.
    logits = torch.tensor([[2.5, 1.25], [-0.5, -1.75], [0.0, -0.125]])
    penalised = official_repetition_penalty(logits)
    torch.testing.assert_close(penalised, torch.tensor([[2.5 / 1.05, 1.25 / 1.05], [-0.525, -1.8375], [0.0, -0.13125]]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("query",
                         [("What colour is the shape?", QUERY_IMAGE), ("a red circle", None), (None, QUERY_IMAGE)])
def test_prefix_sharing_equals_plain_path(family, query):
    judge = MLLMJudge(*tiny_judge(family), batch_size=2)
    shared = judge.score(query[0], query[1], CANDIDATES)
    plain = judge.score_pairs([(query, candidate) for candidate in CANDIDATES])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert judge.stats.shared_prefix_pairs == len(CANDIDATES) and judge.stats.boundary_fallbacks == 0


def test_prefix_sharing_positions_matter():
    """Negative control: one position off after the prefix changes the scores far beyond the tolerance."""
    judge = MLLMJudge(*tiny_judge())
    encode_prefix = judge._encode_prefix

    def off_by_one(*args, **kwargs):
        prefix = encode_prefix(*args, **kwargs)
        prefix["next_position"] += 1
        return prefix

    judge._encode_prefix = off_by_one
    query = ("What colour is the shape?", QUERY_IMAGE)
    shifted = judge.score(query[0], query[1], CANDIDATES)
    plain = judge.score_pairs([(query, candidate) for candidate in CANDIDATES])
    assert (shifted - plain).abs().max() > 1e-3


def test_llava_onevision_judge_falls_back_where_the_prefix_is_not_shared():
    """Its template renders every image first, so a candidate image changes the prefix: those pairs go plain."""
    judge = MLLMJudge(*tiny_judge("llava_onevision"))
    query = ("What colour is the shape?", QUERY_IMAGE)
    shared = judge.score(query[0], query[1], CANDIDATES)
    plain = judge.score_pairs([(query, candidate) for candidate in CANDIDATES])
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=0)
    assert judge.stats.boundary_fallbacks == 2


def test_multi_token_answer_word_is_a_clear_error():
    with pytest.raises(ValueError, match="splits 'Certainly' into"):
        MLLMJudge(*tiny_judge(), yes_token="Certainly")


def test_non_finite_logits_name_the_pair():
    judge = MLLMJudge(*tiny_judge())
    with pytest.raises(ValueError, match="non-finite Yes/No logits for 1 pair.*candidate 7"):
        judge.logits_to_scores(torch.tensor([[1.0, 0.0], [float("nan"), 0.0]]), ["candidate 3", "candidate 7"])


def test_missing_candidate_image_names_the_candidate(tmp_path):
    judge = MLLMJudge(*tiny_judge())
    with pytest.raises(ValueError, match=r"candidate 1: image file not found"):
        judge.score("q", None, [("a", None), ("b", str(tmp_path / "missing.png"))])


def test_from_pretrained_places_the_judge_on_the_process_device(tmp_path):
    from accelerate import PartialState

    from modeling_unime.placement import attention_kernels

    model, processor = build_tiny_judge()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    default = MLLMJudge.from_pretrained(tmp_path)
    assert default.model.device == PartialState().device
    assert default.model.dtype == (torch.float32 if default.model.device.type == "cpu" else torch.bfloat16)
    assert attention_kernels(default.model) <= {"sdpa", "flash_attention_2"}
    reference = MLLMJudge(model, processor).score("q", None, CANDIDATES[:2])
    torch.testing.assert_close(default.score("q", None, CANDIDATES[:2]), reference)
    explicit = MLLMJudge.from_pretrained(tmp_path, dtype="bfloat16", device="cpu", attn_implementation="eager",
                                         batch_size=3)
    assert (explicit.model.device.type, explicit.model.dtype, explicit.batch_size) == ("cpu", torch.bfloat16, 3)
    assert attention_kernels(explicit.model) == {"eager"}
    scores = explicit.score("What colour is the shape?", QUERY_IMAGE, CANDIDATES)  # bf16 pixels and hidden states
    assert scores.dtype == torch.float32 and bool(((scores > 0) & (scores < 1)).all())
    with pytest.raises(ValueError, match="flash-attn"):
        MLLMJudge.from_pretrained(tmp_path, device="cpu", attn_implementation="flash_attention_2")


def test_every_judge_mining_calls_is_a_judge(tmp_path):
    """One interface (`modeling_unime.judge.Judge`) for everything mining scores with."""

    from modeling_unime.judge import FingerprintedJudge, Judge
    from modeling_unime.judge.server import ServerJudge
    from modeling_unime.mining import CachedJudge, RootedJudge
    from modeling_unime.scoring_unime import MultimodalScorer
    from modeling_unime.tiny import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, OracleJudge, build_tiny_reranker

    model, processor = tiny_judge()
    judge = MLLMJudge(model, processor)
    reranker, reranker_processor = build_tiny_reranker()
    server = ServerJudge("http://127.0.0.1:9", processor)  # no request is made
    judges = [judge, MultimodalScorer(model, processor), server, CachedJudge(judge, tmp_path, "key"),
              RootedJudge(judge, tmp_path), OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES),
              reranker.scorer(reranker_processor)]
    for each in judges:
        assert isinstance(each, Judge), type(each).__name__
    assert [isinstance(each, FingerprintedJudge) for each in judges] == [False, False, True] + [False] * 4
    assert not isinstance(object(), Judge)
