"""The judge dataset: authors' JSON -> Dataset -> authors' JSON is lossless, scores align, bad rows are named."""

import copy
import doctest
import json
import re

import pytest
from datasets import Dataset, load_from_disk

import modeling_unime.data as data_module
from modeling_unime.data import (
    UNIME_FEATURES,
    image_root_of,
    load_official_json,
    resolve_image,
    save_official_json,
)

OFFICIAL_SAMPLE = "unime_v2_official_example_data.json"


def write_like_the_authors(rows, path):
    """The layout of the released file: json.dump(indent=4, ensure_ascii=False), UTF-8, no trailing newline."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=4, ensure_ascii=False)
    return path


def synthetic_row(query_image="images/A-OKVQA/Train/A-OKVQA_image_1.jpg", scores=(0.5, 0.25, 0.125)):
    return {
        "query_text": "<|image_1|>\nRepresent the given image with the following question: What is it?\n",
        "query_image": query_image,
        "pos_text": "a cat",
        "pos_image": "",
        "query_pos_scores": scores[0],
        "hard_negatives": [["a dog", ""], ["a lion", "images/A-OKVQA/Train/A-OKVQA_image_2.jpg"]],
        "hard_negatives_scores": list(scores[1:]),
    }


def synthetic_rows():
    tricky = synthetic_row(query_image="", scores=(0.1 + 0.2, 1e-300, 5e-324))
    tricky["query_text"] = "Champs-Élysées, 東京, naïve café \u2028 \"quoted\" \\ tab\t"
    tricky["pos_image"] = "images/MSCOCO_t2i/Train/COCO_train2014_1.jpg"
    tricky["hard_negatives"] = [["same", ""], ["same", ""]]  # duplicated negatives stay
    text_only = synthetic_row(query_image="", scores=(1.0, 0.0, 0.9999999999999999))
    text_only["hard_negatives"] = [["x", ""], ["y", ""]]
    no_negatives = synthetic_row(scores=(0.75,))
    no_negatives["hard_negatives"] = []
    first = synthetic_row()
    return [first, tricky, copy.deepcopy(first), text_only, no_negatives]  # row 2 duplicates row 0


def assert_bit_identical(values, expected):
    assert [float(v).hex() for v in values] == [float(e).hex() for e in expected]


def test_vendored_files_are_the_recorded_upstream_bytes(shared_data):
    """tests/data/README.md records the sha256 of each vendored file (copied from the upstream repositories)."""
    import hashlib

    readme = (shared_data / "README.md").read_text(encoding="utf-8")
    recorded = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE)
    )
    assert len(recorded) == 8 and OFFICIAL_SAMPLE in recorded
    for name, digest in recorded.items():
        assert hashlib.sha256((shared_data / name).read_bytes()).hexdigest() == digest, name
    for licence in ("unime_v2_official_LICENSE", "sugar-crepe/LICENSE"):
        assert (shared_data / licence).read_text().startswith("MIT License")


def test_real_sample_round_trip_is_byte_identical(shared_data, tmp_path):
    original = shared_data / OFFICIAL_SAMPLE
    dataset = load_official_json(original)
    assert dataset.features == UNIME_FEATURES
    written = tmp_path / "written.json"
    save_official_json(dataset, written)
    assert written.read_bytes() == original.read_bytes()
    assert json.loads(written.read_text(encoding="utf-8")) == json.loads(original.read_text(encoding="utf-8"))


def test_judge_scores_are_positive_then_negatives_for_every_real_row(shared_data):
    raw_rows = json.loads((shared_data / OFFICIAL_SAMPLE).read_text(encoding="utf-8"))
    dataset = load_official_json(shared_data / OFFICIAL_SAMPLE)
    assert len(dataset) == len(raw_rows) == 50
    for raw, row in zip(raw_rows, dataset):
        assert_bit_identical(row["judge_scores"][:1], [raw["query_pos_scores"]])
        assert_bit_identical(row["judge_scores"][1:], raw["hard_negatives_scores"])
        assert row["neg_texts"] == [text for text, _ in raw["hard_negatives"]]
        assert row["neg_images"] == [image or None for _, image in raw["hard_negatives"]]
        assert row["query_image"] == (raw["query_image"] or None)
        assert row["pos_image"] == (raw["pos_image"] or None)
        assert row["source"] == OFFICIAL_SAMPLE
        assert row["task"] != "unknown"
    assert dataset[0]["task"] == "A-OKVQA"


def test_synthetic_round_trip_keeps_duplicates_floats_and_unicode(tmp_path):
    rows = synthetic_rows()
    original = write_like_the_authors(rows, tmp_path / "train_data_synthetic_scores.json")
    dataset = load_official_json(original, image_root=tmp_path / "MMEB-train")

    assert len(dataset) == len(rows)
    assert dataset[0] == dataset[2]
    assert dataset[1]["neg_texts"] == ["same", "same"]
    assert dataset[1]["query_text"] == rows[1]["query_text"]
    assert dataset[1]["query_image"] is None
    assert dataset[0]["neg_images"] == [None, "images/A-OKVQA/Train/A-OKVQA_image_2.jpg"]
    assert_bit_identical(dataset[1]["judge_scores"], [0.1 + 0.2, 1e-300, 5e-324])
    assert dataset[4]["judge_scores"] == [0.75] and dataset[4]["neg_texts"] == []
    assert dataset["task"] == ["A-OKVQA", "MSCOCO_t2i", "A-OKVQA", "unknown", "A-OKVQA"]
    assert set(dataset["source"]) == {"train_data_synthetic_scores.json"}

    assert image_root_of(dataset) == str(tmp_path / "MMEB-train")
    assert dataset[0]["query_image"] == rows[0]["query_image"]  # stored relative, resolved on demand
    resolved = resolve_image(dataset[0]["query_image"], image_root_of(dataset))
    assert resolved == str(tmp_path / "MMEB-train" / rows[0]["query_image"])

    written = tmp_path / "written.json"
    save_official_json(dataset, written)
    assert written.read_bytes() == original.read_bytes()
    assert json.loads(written.read_text(encoding="utf-8")) == rows


def test_empty_file_round_trips(tmp_path):
    original = write_like_the_authors([], tmp_path / "empty.json")
    dataset = load_official_json(original)
    assert len(dataset) == 0 and dataset.features == UNIME_FEATURES
    save_official_json(dataset, tmp_path / "written.json")
    assert (tmp_path / "written.json").read_bytes() == original.read_bytes()


def drop_field(row):
    del row["pos_text"]
    return row


def set_field(field, value):
    def corrupt(row):
        row[field] = value
        return row

    return corrupt


BAD_ROWS = {
    "missing field": (drop_field, "missing field"),
    "unexpected field": (set_field("note", "x"), "unexpected field"),
    "fewer scores than negatives": (set_field("hard_negatives_scores", [0.5]), "2 hard_negatives but 1"),
    "more scores than negatives": (set_field("hard_negatives_scores", [0.5, 0.5, 0.5]), "2 hard_negatives but 3"),
    "score above 1": (set_field("query_pos_scores", 1.5), "query_pos_scores = 1.5"),
    "negative score": (set_field("hard_negatives_scores", [0.5, -0.1]), r"hard_negatives_scores\[1\] = -0.1"),
    "nan score": (set_field("query_pos_scores", float("nan")), "not a finite number"),
    "infinite score": (set_field("hard_negatives_scores", [float("inf"), 0.5]), "not a finite number"),
    "string score": (set_field("query_pos_scores", "0.5"), "not a finite number"),
    "boolean score": (set_field("query_pos_scores", True), "not a finite number"),
    "negative with 3 items": (set_field("hard_negatives", [["a", "", ""], ["b", ""]]), r"hard_negatives\[0\]"),
    "negative with 1 item": (set_field("hard_negatives", [["a", ""], ["b"]]), r"hard_negatives\[1\]"),
    "negative not a list": (set_field("hard_negatives", ["a", ["b", ""]]), r"hard_negatives\[0\]"),
    "null image": (set_field("pos_image", None), "pos_image must be a string"),
    "row not an object": (lambda row: list(row.values()), "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_raises_value_error_naming_file_and_row(case, tmp_path):
    corrupt, problem = BAD_ROWS[case]
    rows = synthetic_rows()
    rows[3] = corrupt(rows[3])
    path = write_like_the_authors(rows, tmp_path / "bad.json")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: row 3: .*{problem}"):
        load_official_json(path)


def test_top_level_must_be_a_list(tmp_path):
    path = write_like_the_authors({"rows": []}, tmp_path / "bad.json")
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_official_json(path)


def test_save_rejects_misaligned_scores_and_leaves_no_file(tmp_path):
    dataset = load_official_json(write_like_the_authors(synthetic_rows(), tmp_path / "ok.json"))
    columns = dataset.to_dict()
    columns["judge_scores"][1] = columns["judge_scores"][1][:2]
    misaligned = Dataset.from_dict(columns, features=UNIME_FEATURES)
    target = tmp_path / "written.json"
    with pytest.raises(ValueError, match="row 1: 2 neg_texts, 2 neg_images and 2 judge_scores"):
        save_official_json(misaligned, target)
    assert list(tmp_path.iterdir()) == [tmp_path / "ok.json"]


def test_save_to_disk_round_trip_keeps_values_exactly(tmp_path):
    original = write_like_the_authors(synthetic_rows(), tmp_path / "train.json")
    dataset = load_official_json(original, image_root="/data/MMEB-train")
    dataset.save_to_disk(tmp_path / "arrow")
    reloaded = load_from_disk(tmp_path / "arrow")

    assert reloaded.features == UNIME_FEATURES
    assert reloaded.to_list() == dataset.to_list()
    for before, after in zip(dataset["judge_scores"], reloaded["judge_scores"]):
        assert_bit_identical(after, before)
    assert image_root_of(reloaded) == "/data/MMEB-train"
    save_official_json(reloaded, tmp_path / "written.json")
    assert (tmp_path / "written.json").read_bytes() == original.read_bytes()


def test_docstring_examples_run():
    results = doctest.testmod(data_module, raise_on_error=False)
    assert results.attempted > 0 and results.failed == 0


def test_judge_row_declares_the_dataset_columns():
    from typing import get_type_hints

    from modeling_unime.data import UNIME_FEATURES, JudgeRow

    assert list(get_type_hints(JudgeRow)) == list(UNIME_FEATURES)


def test_a_broken_json_file_names_the_file_and_the_place(tmp_path):
    from accelerate import PartialState

    from modeling_unime.data import load_official_json
    from modeling_unime.mining.recipe import load_pairs

    broken = tmp_path / "train_data_scores.json"
    broken.write_text('[\n  {"query_text": "a",\n   "pos_text": "b",,\n')
    with pytest.raises(ValueError, match=rf"{broken}: not valid JSON \(the authors' judge-scored training file\): "
                                         r"Expecting property name enclosed in double quotes at line 3, column 20"):
        load_official_json(broken)
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"query_text": "a"}\n\n{"query_text": "b"\n')
    with pytest.raises(ValueError, match=rf"{lines}, line 3: not valid JSON"):
        load_pairs(str(lines), None, PartialState())
