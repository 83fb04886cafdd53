"""The easy-vqa demo world: attributes from answers, MMEB-style tasks, the blind baseline, the oracle judge."""

import pytest

from evaluation.demo.easyvqa import (
    CAPTIONS,
    COLOURS,
    SHAPES,
    EasyVQASplit,
    blind_baseline,
    build_tasks,
    image_attributes,
    training_pairs,
)
from modeling_unime.tiny import OracleJudge, question_kind

QA = [
    ("what color is the shape?", "red", 0),
    ("is there not a circle?", "no", 0),          # negated + "no": the circle is there
    ("what is the blue shape?", "triangle", 1),
    ("is there a green shape?", "no", 1),           # negative evidence is not used
    ("does the image contain a rectangle?", "yes", 2),
    ("what color is the shape?", "teal", 2),
    ("is there a red shape?", "no", 3),             # image 3 stays unknown
]


def test_kinds_and_attributes_from_answers():
    assert question_kind("what color is the shape?") == "colour"
    assert question_kind("what shape is in the image?") == "shape"
    assert question_kind("what is the blue shape?") == "shape"
    assert question_kind("is there a red shape?") == "yes/no"
    attributes = image_attributes(*zip(*QA))
    assert attributes[0] == {"colour": "red", "shape": "circle"}
    assert attributes[1] == {"colour": "blue", "shape": "triangle"}
    assert attributes[2] == {"colour": "teal", "shape": "rectangle"}
    assert attributes[3] == {}


def tiny_split():
    images = {index: f"img/{index}.png" for index in range(4)}
    return EasyVQASplit(images, image_attributes(*zip(*QA)), QA)


def test_tasks_have_the_mmeb_shape_and_yes_no_is_left_out():
    split = tiny_split()
    assert [len(c) for c in build_tasks(split, seed=0)["caption_to_image"].candidates] == [3, 3, 3]  # 1 + 2 others
    for index in range(4, 14):
        split.images[index] = f"img/{index}.png"
        split.attributes[index] = {"colour": "yellow", "shape": "circle"}
    tasks = build_tasks(split, seed=0)
    assert len(tasks["vqa_colour"]) == 2 and len(tasks["vqa_shape"]) == 1  # 3 "what" questions, no yes/no
    assert [len(candidates) for candidates in tasks["vqa_colour"].candidates] == [8, 8]
    assert tasks["vqa_shape"].candidates[0][0] == ("triangle", None) and len(tasks["vqa_shape"].candidates[0]) == 3
    assert len(tasks["image_to_caption"]) == 13 and len(CAPTIONS) == 24
    assert tasks["image_to_caption"].candidates[0][0] == ("a red circle", None)
    assert sorted(text for text, _ in tasks["image_to_caption"].candidates[0]) == sorted(CAPTIONS)
    first = tasks["caption_to_image"]
    assert first.queries[0] == ("a red circle", None) and first.candidates[0][0] == (None, "img/0.png")
    assert len(first.candidates[0]) == 10 and "img/0.png" not in [image for _, image in first.candidates[0][1:]]
    pairs = training_pairs(split, {"vqa_shape": tasks["vqa_shape"]})
    assert pairs == [{"query_text": "what is the blue shape?", "query_image": "img/1.png", "pos_text": "triangle",
                      "pos_image": None, "task": "vqa_shape"}]


def test_oracle_grades_partial_credit():
    judge = OracleJudge(COLOURS, SHAPES,
                        {"a.png": {"colour": "red", "shape": "circle"}, "b.png": {"colour": "red", "shape": "square"}})
    assert judge.score("what color is the shape?", "a.png", [("red", None), ("blue", None)]).tolist() == \
        pytest.approx([0.95, 0.05])
    assert judge.score("what shape is in the image?", "a.png", [("circle", None), ("triangle", None)]).tolist() == \
        pytest.approx([0.95, 0.05])
    captions = [("a red circle", None), ("a red triangle", None), ("a blue circle", None), ("a green triangle", None)]
    assert judge.score("Find a caption", "a.png", captions).tolist() == pytest.approx([0.95, 0.5, 0.5, 0.05])
    images = [(None, "a.png"), (None, "b.png")]
    assert judge.score("a red circle", None, images).tolist() == pytest.approx([0.95, 0.5])
    # the wrong kind of candidate for the task is a miss, whatever it shows: the mining pool mixes every task
    assert judge.score("what color is the shape?", "a.png", [(None, "a.png"), ("red", "a.png")]).tolist() == \
        pytest.approx([0.05, 0.05])
    assert judge.score("Find a caption", "a.png", [(None, "a.png"), (None, "b.png")]).tolist() == \
        pytest.approx([0.05, 0.05])
    assert judge.score("a red circle", None, [("a red circle", None), ("a red square", None)]).tolist() == \
        pytest.approx([0.05, 0.05])


def test_real_easyvqa_blind_baseline_and_oracle():
    pytest.importorskip("easy_vqa")
    from evaluation.demo.easyvqa import load_easyvqa, oracle_for

    train, test = load_easyvqa("train"), load_easyvqa("test")
    assert sum(1 for image in train.images if train.caption(image)) / len(train.images) > 0.85
    tasks = build_tasks(test, seed=0)
    assert {name: len(task) for name, task in tasks.items()} == {
        "vqa_colour": 1280, "vqa_shape": 1257, "image_to_caption": 880, "caption_to_image": 880}
    blind = blind_baseline(train, tasks)
    # The values measured independently in shared/notes/demo-world-easyvqa.md (full test set): 0.120 and 0.348.
    assert blind["vqa_colour"] == pytest.approx(12.0, abs=0.1) and blind["vqa_shape"] == pytest.approx(34.8, abs=0.1)
    assert blind["caption_to_image"] == pytest.approx(10.0)
    oracle = oracle_for(train, test)
    for name in ("vqa_shape", "image_to_caption"):
        task = tasks[name]
        assert all(int(oracle.score(q[0], q[1], c).argmax()) == 0 for q, c in zip(task.queries[:200], task.candidates))
