"""SugarCrepe: hand-computed accuracies and groups, embedding each distinct image/caption once, errors that name paths,
the real annotation files with generated images, the pairwise rerank stage."""

import doctest
import hashlib
import json
import os
import warnings

import pytest
import torch
from PIL import Image

from evaluation import sugarcrepe
from evaluation.sugarcrepe import (
    SUGARCREPE_GROUPS,
    SUGARCREPE_IMAGE_INSTRUCTION,
    SUGARCREPE_SUBSETS,
    SugarCrepeExample,
    evaluate_sugarcrepe,
    format_table,
    load_sugarcrepe,
)

IMAGE_VECTORS = {"a.jpg": [1.0, 0.0], "b.jpg": [0.0, 1.0]}
# Raw, unnormalised on purpose: "big near" has the larger dot product with image a but the smaller cosine than "unit x".
CAPTION_VECTORS = {
    "a near": [3.0, 1.0],  # cos with a 0.949, with b 0.316
    "a far": [1.0, 3.0],  # cos with a 0.316, with b 0.949
    "unit x": [2.0, 0.0],  # cos with a 1.0
    "big near": [30.0, 10.0],  # cos with a 0.949, dot 30
    "twin 1": [1.0, 1.0],  # cos 0.707 with both; "twin 2" is the same vector: a tie
    "twin 2": [1.0, 1.0],
}

# (image, caption, negative caption, correct by cosine, correct by the shorter-caption reranker)
FIXTURE = {
    "swap_obj": [
        ("a.jpg", "a near", "a far", True, False),
        ("b.jpg", "a near", "a far", False, False),
        ("a.jpg", "unit x", "big near", True, True),  # a dot product would get this one wrong
        ("a.jpg", "twin 1", "twin 2", False, False),  # tie (and equal lengths): wrong
    ],
    "swap_att": [
        ("b.jpg", "a far", "a near", True, True),
        ("b.jpg", "twin 1", "a near", True, False),
        ("a.jpg", "twin 2", "a near", False, False),
    ],
    "replace_obj": [("a.jpg", "a near", "a far", True, False)],
    "replace_att": [("b.jpg", "a near", "twin 1", False, False)],
    "replace_rel": [
        ("a.jpg", "a far", "twin 1", False, True),
        ("b.jpg", "a far", "twin 2", True, True),
    ],
    "add_obj": [
        ("a.jpg", "unit x", "a near", True, False),
        ("a.jpg", "a near", "unit x", False, False),
    ],
}  # add_att is absent: the "Add" group is incomplete
FIXTURE_SUBSETS = list(FIXTURE)

EXPECTED_SUBSETS = {
    "swap_obj": 2 / 4, "swap_att": 2 / 3, "replace_obj": 1.0, "replace_att": 0.0, "replace_rel": 1 / 2,
    "add_obj": 1 / 2,
}
EXPECTED_GROUPS = {"Replace": (1.0 + 0.0 + 1 / 2) / 3, "Swap": (2 / 4 + 2 / 3) / 2}
EXPECTED_RERANK_SUBSETS = {
    "swap_obj": 1 / 4, "swap_att": 1 / 3, "replace_obj": 0.0, "replace_att": 0.0, "replace_rel": 1.0, "add_obj": 0.0,
}
EXPECTED_RERANK_GROUPS = {"Replace": (0.0 + 0.0 + 1.0) / 3, "Swap": (1 / 4 + 1 / 3) / 2}


class TableEmbedder:
    """Vectors from the tables above; records every encode call."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, images, image_root=None, batch_size=16):
        self.calls.append((list(texts), list(images), image_root, batch_size))
        rows = []
        for text, image in zip(texts, images):
            if image is not None:
                assert text == SUGARCREPE_IMAGE_INSTRUCTION
                assert os.path.isfile(os.path.join(image_root, image))
                rows.append(IMAGE_VECTORS[image])
            else:
                rows.append(CAPTION_VECTORS[text])
        return torch.tensor(rows)

    def items(self, kind):
        return [
            (text, image) for texts, images, _, _ in self.calls for text, image in zip(texts, images)
            if (image is not None) == (kind == "image")
        ]


class ShorterCaptionReranker:
    """P(Yes) = 1 / length of the candidate's text: prefers the shorter caption, equal lengths tie."""

    def __init__(self):
        self.queries = []

    def score(self, query, candidates, image_root=None):
        self.queries.append((query, image_root))
        assert all(image is None for _, image in candidates)
        return torch.tensor([1.0 / len(text) for text, _ in candidates])


def write_fixture(folder, subsets=FIXTURE, images=("a.jpg", "b.jpg")):
    annotations, image_root = folder / "annotations", folder / "images"
    annotations.mkdir()
    image_root.mkdir()
    for name, rows in subsets.items():
        data = {
            str(index): {"filename": image, "caption": caption, "negative_caption": negative}
            for index, (image, caption, negative, _, _) in enumerate(rows)
        }
        (annotations / f"{name}.json").write_text(json.dumps(data))
    for image in images:
        Image.new("RGB", (8, 8), "gray").save(image_root / image)
    return annotations, image_root


def evaluate_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # row counts differ from the public release
        return evaluate_sugarcrepe(*args, **kwargs)


def test_expected_values_follow_the_fixture_flags():
    for name, rows in FIXTURE.items():
        assert EXPECTED_SUBSETS[name] == pytest.approx(sum(row[3] for row in rows) / len(rows))
        assert EXPECTED_RERANK_SUBSETS[name] == pytest.approx(sum(row[4] for row in rows) / len(rows))


def test_constants():
    assert sum(SUGARCREPE_SUBSETS.values()) == 7511
    assert sorted(member for members in SUGARCREPE_GROUPS.values() for member in members) == sorted(SUGARCREPE_SUBSETS)


def test_hand_computed_accuracies_groups_and_incomplete_group(tmp_path):
    annotations, image_root = write_fixture(tmp_path)
    result = evaluate_quietly(TableEmbedder(), annotations, image_root, subsets=FIXTURE_SUBSETS)
    assert result["subsets"] == pytest.approx(EXPECTED_SUBSETS)
    assert result["groups"] == pytest.approx(EXPECTED_GROUPS)
    assert result["incomplete_groups"] == {"Add": ["add_att"]}
    assert result["counts"] == {name: len(rows) for name, rows in FIXTURE.items()}
    assert "rerank" not in result
    table = format_table(result)
    assert "Add     incomplete: missing add_att" in table and f"{100 * EXPECTED_GROUPS['Swap']:.2f}" in table


def test_distinct_images_and_captions_embedded_once(tmp_path):
    annotations, image_root = write_fixture(tmp_path)
    embedder = TableEmbedder()
    evaluate_quietly(embedder, annotations, image_root, subsets=FIXTURE_SUBSETS, batch_size=7)
    # 13 examples over 2 images and 6 distinct captions (26 caption slots).
    assert sorted(embedder.items("image")) == [(SUGARCREPE_IMAGE_INSTRUCTION, name) for name in ("a.jpg", "b.jpg")]
    assert sorted(text for text, _ in embedder.items("text")) == sorted(CAPTION_VECTORS)
    assert all(root == image_root and batch_size == 7 for _, _, root, batch_size in embedder.calls)


def test_cache_dir_reuses_embeddings(tmp_path):
    annotations, image_root = write_fixture(tmp_path)
    first, second = TableEmbedder(), TableEmbedder()
    expected = evaluate_quietly(first, annotations, image_root, subsets=FIXTURE_SUBSETS, cache_dir=tmp_path / "cache")
    again = evaluate_quietly(second, annotations, image_root, subsets=FIXTURE_SUBSETS, cache_dir=tmp_path / "cache")
    assert len(first.items("image")) == 2 and len(first.items("text")) == 6
    assert second.calls == []
    assert again == expected
    assert expected["subsets"] == pytest.approx(EXPECTED_SUBSETS)


def test_rerank_stage_with_shorter_caption_reranker(tmp_path):
    annotations, image_root = write_fixture(tmp_path)
    reranker = ShorterCaptionReranker()
    result = evaluate_quietly(TableEmbedder(), annotations, image_root, subsets=FIXTURE_SUBSETS, reranker=reranker)
    assert result["subsets"] == pytest.approx(EXPECTED_SUBSETS)
    rerank = result["rerank"]
    assert rerank["subsets"] == pytest.approx(EXPECTED_RERANK_SUBSETS)
    assert rerank["groups"] == pytest.approx(EXPECTED_RERANK_GROUPS)
    assert rerank["incomplete_groups"] == {"Add": ["add_att"]}
    assert rerank["counts"] == result["counts"]
    assert len(reranker.queries) == sum(len(rows) for rows in FIXTURE.values())
    assert reranker.queries[0] == ((SUGARCREPE_IMAGE_INSTRUCTION, "a.jpg"), image_root)

    image_only = ShorterCaptionReranker()
    evaluate_quietly(TableEmbedder(), annotations, image_root, subsets=["swap_obj"], reranker=image_only,
                     rerank_query_text=None)
    assert image_only.queries[1][0] == (None, "b.jpg")


def test_missing_annotation_file_names_path_and_source(tmp_path):
    annotations, image_root = write_fixture(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        evaluate_sugarcrepe(TableEmbedder(), annotations, image_root)  # all seven: add_att.json is absent
    message = str(error.value)
    assert str(annotations / "add_att.json") in message and "github.com/RAIVNLab/sugar-crepe" in message


def test_missing_images_listed_before_any_embedding(tmp_path):
    annotations, image_root = write_fixture(tmp_path, images=("a.jpg",))
    embedder = TableEmbedder()
    with pytest.raises(FileNotFoundError) as error:
        evaluate_quietly(embedder, annotations, image_root, subsets=FIXTURE_SUBSETS)
    message = str(error.value)
    assert "1 of 2" in message and str(image_root / "b.jpg") in message and repr(str(image_root)) in message
    assert embedder.calls == []


def test_malformed_entry_names_file_and_id(tmp_path):
    (tmp_path / "swap_obj.json").write_text(json.dumps({
        "0": {"filename": "a.jpg", "caption": "x", "negative_caption": "y"},
        "17": {"filename": "a.jpg", "caption": "x"},
    }))
    with pytest.raises(ValueError, match=r"swap_obj\.json, id '17': field 'negative_caption'"):
        load_sugarcrepe(tmp_path, ["swap_obj"])
    (tmp_path / "swap_att.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"swap_att\.json: expected a JSON object"):
        load_sugarcrepe(tmp_path, ["swap_att"])
    with pytest.raises(ValueError, match="Unknown SugarCrepe subset"):
        load_sugarcrepe(tmp_path, ["swap_verb"])


def test_load_warns_on_unexpected_row_count(tmp_path):
    annotations, _ = write_fixture(tmp_path)
    with pytest.warns(UserWarning, match="public release has 245"):
        loaded = load_sugarcrepe(annotations, ["swap_obj"])
    assert loaded["swap_obj"][2] == SugarCrepeExample("2", "a.jpg", "unit x", "big near")


# ---------------------------------------------------------------------------------------------- real annotations


def _unit(key: str, dim: int = 16) -> list[float]:
    vector = torch.tensor(list(hashlib.sha256(key.encode()).digest()[:dim]), dtype=torch.float32) - 127.5
    return (vector / vector.norm()).tolist()


class HashEmbedder:
    """A unit vector per caption text and per image colour (read from the file, so image_root must resolve)."""

    def __init__(self):
        self.image_items = 0

    def encode(self, texts, images, image_root=None, batch_size=16):
        rows = []
        for text, image in zip(texts, images):
            if image is not None:
                self.image_items += 1
                with Image.open(os.path.join(image_root, image)) as picture:
                    rows.append(_unit(f"image {picture.getpixel((0, 0))}"))
            else:
                rows.append(_unit(text))
        return torch.tensor(rows)


def test_real_annotation_files_load_with_expected_counts(shared_data):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a row count unlike the public release's would warn
        loaded = load_sugarcrepe(shared_data / "sugar-crepe")
    assert {name: len(rows) for name, rows in loaded.items()} == SUGARCREPE_SUBSETS
    assert all(row.filename.endswith(".jpg") for rows in loaded.values() for row in rows)


def test_real_annotation_files_end_to_end_with_generated_images(shared_data, tmp_path):
    annotations = shared_data / "sugar-crepe"
    filenames = sorted({row.filename for rows in load_sugarcrepe(annotations).values() for row in rows})
    for filename in filenames:
        colour = tuple(hashlib.md5(filename.encode()).digest()[:3])
        Image.new("RGB", (8, 8), colour).save(tmp_path / filename, format="PNG")  # .jpg names, PNG bytes: both fine
    embedder = HashEmbedder()
    result = evaluate_sugarcrepe(embedder, annotations, tmp_path, batch_size=256)
    assert embedder.image_items == len(filenames)
    assert result["counts"] == SUGARCREPE_SUBSETS
    assert set(result["subsets"]) == set(SUGARCREPE_SUBSETS)
    assert set(result["groups"]) == {"Replace", "Swap", "Add"} and result["incomplete_groups"] == {}
    subsets = result["subsets"]
    assert result["groups"]["Swap"] == pytest.approx((subsets["swap_obj"] + subsets["swap_att"]) / 2)
    # Random vectors: about chance.
    assert all(0.3 < accuracy < 0.7 for accuracy in result["subsets"].values())
    assert "Replace" in format_table(result)


def test_docstring_examples_run():
    failures, attempted = doctest.testmod(sugarcrepe, optionflags=doctest.NORMALIZE_WHITESPACE)[:2]
    assert attempted > 0 and failures == 0
