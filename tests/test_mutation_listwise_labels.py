"""The listwise target's closing ")" is labelled exactly where it carries information (issue 21, mutation pass).

`MultimodalScorer.score_listwise` reads a list of K candidates as a first digit, then, where a two-digit index
exists with that first digit, ")" against a second digit. For K = 10 that is the case after "1": ")" means position
1, "0" means position 10. So training must label ")" for position 1 of a list of 10 (and of any longer list), and
must not where nothing else can follow the digit (K = 9). The expectation is derived here from the answer strings
themselves, not from the trainer's rule.
"""

from __future__ import annotations

import pytest

from modeling_unime.scoring_unime import LISTWISE_ANSWER_PREFIX, listwise_answer
from modeling_unime.tiny import build_tiny_processor
from trainers.reranker_trainer import RerankerCollator, listwise_answer_segments


def close_decides_between_answers(position: int, count: int) -> bool:
    """Whether another valid answer of a list of ``count`` shares the text up to ``position``'s digits: then the
    token after them (")" or a further digit) is what tells the two apart."""
    typed = LISTWISE_ANSWER_PREFIX + str(position)
    return any(listwise_answer(other).startswith(typed) for other in range(1, count + 1) if other != position)


@pytest.mark.parametrize("count", range(1, 31))
def test_close_is_labelled_where_another_index_shares_the_digits(count):
    for position in range(1, count + 1):
        segments = listwise_answer_segments(position, count)
        assert "".join(text for text, _ in segments) == listwise_answer(position)
        assert [text for text, labelled in segments if labelled][0] == str(position)
        close_labelled = dict((text, labelled) for text, labelled in segments)[")"]
        assert close_labelled == close_decides_between_answers(position, count), (position, count)


def test_the_boundary_lists_of_nine_and_ten():
    assert close_decides_between_answers(1, 10) and not close_decides_between_answers(1, 9)
    assert listwise_answer_segments(1, 10)[-1] == (")", True)
    assert listwise_answer_segments(1, 9)[-1] == (")", False)
    assert listwise_answer_segments(10, 10)[-1] == (")", False)  # "10" is the only index starting with "10"


def labelled_tokens(collator: RerankerCollator, position: int, count: int) -> list[str]:
    """The tokens the collator labels for a list of ``count`` texts whose answer is ``position``."""
    candidates = [(f"shade {index}", None) for index in range(count)]
    prompt = collator.prompts.render_listwise(("Which shade is red?", None), candidates, answer="")
    batch = collator.batch([(prompt, listwise_answer_segments(position, count), [])])
    input_ids, labels = batch["input_ids"][0], batch["labels"][0]
    return [collator.prompts.tokenizer.decode([token]) for token in input_ids[labels != -100].tolist()]


def test_the_collator_labels_the_close_after_one_in_a_list_of_ten():
    collator = RerankerCollator(build_tiny_processor("qwen2_5_vl"), listwise_negatives=9)
    assert labelled_tokens(collator, 1, 10) == ["1", ")"]
    assert labelled_tokens(collator, 1, 9) == ["1"]
    assert "".join(labelled_tokens(collator, 10, 10)) == "10"
    assert labelled_tokens(collator, 2, 10) == ["2"]
