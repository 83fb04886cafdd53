"""MMEB: dataset lists, loading the Hub layout, precision@1 with ties, cache resume, rerank stage, the harness."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from authors_fixtures import authors_get_pred
from datasets import Dataset
from PIL import Image

from conftest import REPO_ROOT, free_port, run_recipe
from evaluation.mmeb import (
    IND_DATASETS,
    MMEB_CATEGORIES,
    MMEB_DATASETS,
    OOD_DATASETS,
    MMEBOptions,
    MMEBTaskResult,
    evaluate_mmeb,
    evaluate_task,
    load_mmeb_dataset,
    predictions_from_scores,
    ranking_from_scores,
)


def test_the_official_dataset_lists():
    assert len(MMEB_DATASETS) == len(set(MMEB_DATASETS)) == 36
    sizes = {category: len(split["IND"]) + len(split["OOD"]) for category, split in MMEB_CATEGORIES.items()}
    assert sizes == {"Classification": 10, "VQA": 10, "Retrieval": 12, "Visual Grounding": 4}
    assert len(IND_DATASETS) == 20 and len(OOD_DATASETS) == 16


def test_tie_rules():
    scores = [torch.tensor([0.9, 0.1, 0.2]), torch.tensor([0.5, 0.5, 0.1]), torch.tensor([0.2, 0.3, 0.9]),
              torch.tensor([0.4]), torch.tensor([0.1, 0.7, 0.7])]
    # argmax (VLM2Vec's np.argmax): the first of the tied top scores wins, so a tie with the positive is correct.
    assert predictions_from_scores(scores) == predictions_from_scores(scores, "argmax") == [0, 0, 2, 0, 1]
    # strict: a tie with the positive counts as wrong.
    assert predictions_from_scores(scores, "strict") == [0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="tie_rule='first'.*argmax, authors, strict"):
        predictions_from_scores(scores, "first")


def test_the_authors_tie_rule_is_their_get_pred_on_tied_and_untied_rows():
    """Scores as float32 rows (one-hot candidates against a query vector give exactly these scores), tied at the top
    with the positive or not, 2 to 60 candidates: the prediction is their pred[0] and the rerank list their pred."""
    rng = np.random.default_rng(7)
    rows, tied = [], []
    for _ in range(1500):
        length = int(rng.integers(2, 61))
        scores = rng.integers(0, 50, length).astype(np.float32) / 64
        if rng.random() < 0.7:   # another candidate (or several) ties the positive for the top score
            copies = rng.choice(np.arange(1, length), int(rng.integers(1, min(length - 1, 5) + 1)), replace=False)
            scores[[0, *copies]] = 1.0
        rows.append(scores)
        tied.append(bool(scores[0] == scores.max() and (scores[1:] == scores[0]).any()))
    replayed = [authors_get_pred(scores, np.eye(len(scores), dtype=np.float32))[1] for scores in rows]

    predictions = predictions_from_scores([torch.from_numpy(scores) for scores in rows], "authors")
    assert predictions == [int(preds[0]) for preds in replayed]
    for scores, preds in zip(rows[:300], replayed):
        assert ranking_from_scores(torch.from_numpy(scores), "authors")[:len(preds)] == preds.tolist()
    # A unique top score: every rule agrees with argmax. The positive tied at the top: numpy's unstable sorts put it
    # first in some rows only, so the rule is neither argmax (always right) nor strict (always wrong).
    untied = [row for row, scores in enumerate(rows) if (scores == scores.max()).sum() == 1]
    assert len(untied) > 100
    assert [predictions[row] for row in untied] == [int(np.argmax(rows[row])) for row in untied]
    tied_right = sum(predictions[row] == 0 for row, is_tied in enumerate(tied) if is_tied)
    assert 0 < tied_right < sum(tied)


def write_mmeb(root, image_root, name, rows):
    """One MMEB dataset folder, and its images: a file named after a colour has that colour (so red.jpg and
    blue.jpg are different images, as their rows mean them to be), the others are red."""
    (root / name).mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(str(root / name / "test-00000-of-00001.parquet"))
    for row in rows:
        for path in [row["qry_img_path"], *row["tgt_img_path"]]:
            if path and not (image_root / path).exists():
                (image_root / path).parent.mkdir(parents=True, exist_ok=True)
                stem = Path(path).stem
                Image.new("RGB", (28, 28), stem if stem in ("red", "blue") else "red").save(image_root / path)


class WordEmbedder:
    """A text's vector is the one-hot of its last word in a fixed vocabulary; an image's is the one-hot of its file
    stem. Counts every item it embeds."""

    vocabulary = ["cat", "dog", "car", "red", "blue", "bird"]

    def __init__(self):
        self.embedded = 0

    def encode(self, texts, images, image_root=None, batch_size=32, **kwargs):
        self.embedded += len(texts)
        rows = []
        for text, image in zip(texts, images):
            word = image.rsplit("/", 1)[-1].split(".")[0] if image else text.split()[-1]
            rows.append(torch.nn.functional.one_hot(torch.tensor(self.vocabulary.index(word)), 6).float())
        return torch.stack(rows)


ROWS = [  # candidate 0 is the positive
    {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-1K/cat.jpg",
     "tgt_text": ["cat", "dog", "car"], "tgt_img_path": ["", "", ""]},
    {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-1K/dog.jpg",
     "tgt_text": ["car", "dog", "bird"], "tgt_img_path": ["", "", ""]},   # wrong: the positive is "car"
    {"qry_text": "Find the picture of a red", "qry_img_path": "",
     "tgt_text": ["<|image_1|> photo", "<|image_1|> photo"],
     "tgt_img_path": ["ImageNet-1K/red.jpg", "ImageNet-1K/blue.jpg"]},
    {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-1K/cat.jpg",
     "tgt_text": ["cat", "cat"], "tgt_img_path": ["", ""]},              # the positive repeated: right only by argmax
]


def test_precision_cache_resume_and_rerank(tmp_path):
    root, image_root = tmp_path / "mmeb", tmp_path / "images"
    write_mmeb(root, image_root, "ImageNet-1K", ROWS)
    write_mmeb(root, image_root, "MSCOCO", ROWS[:1])
    dataset = load_mmeb_dataset("ImageNet-1K", root)
    assert dataset.queries[2] == ("Find the picture of a red", None)
    assert dataset.candidates[2][0] == ("<|image_1|> photo", "ImageNet-1K/red.jpg")

    embedder = WordEmbedder()
    result, _ = evaluate_mmeb(embedder, ["ImageNet-1K", "MSCOCO"], root, image_root, cache_dir=tmp_path / "cache",
                              tie_rule="strict")
    assert result.scores["ImageNet-1K"] == pytest.approx(50.0)  # rows 0 and 2 right, 1 wrong, 3 a tie
    assert result.scores["MSCOCO"] == pytest.approx(100.0)
    assert [row["correct"] for row in result.predictions["ImageNet-1K"]] == [True, False, True, False]
    assert result.ties == {"ImageNet-1K": 1, "MSCOCO": 0} and result.summary()["tie_rule"] == "strict"
    # Each distinct query and candidate embedded once: ImageNet-1K has 3 distinct queries and 6 distinct candidates;
    # MSCOCO's items are all in the cache already.
    first_run = embedder.embedded
    assert first_run == 3 + 6
    summary = result.summary()
    assert summary["means"]["Classification"] == pytest.approx(50.0)
    assert summary["means"]["Overall"] == pytest.approx(75.0)
    assert "Classification" in summary["incomplete"] and "Visual Grounding" in summary["incomplete"]
    assert summary["incomplete"]["Visual Grounding"] == ["RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"]

    # The default, VLM2Vec's argmax: row 3 (the positive repeated) is right. Everything comes from the cache.
    again, _ = evaluate_mmeb(embedder, ["ImageNet-1K"], root, image_root, cache_dir=tmp_path / "cache")
    assert embedder.embedded == first_run and again.scores == {"ImageNet-1K": 75.0}
    assert again.summary()["tie_rule"] == "argmax"
    assert [row["positive_tied"] for row in again.predictions["ImageNet-1K"]] == [False, False, False, True]

    class Reverse:
        """Reverses the embedder's top-k: only that part of the ranking may change."""

        def __init__(self):
            self.lists = []

        def rerank(self, query, candidates, mode="listwise", image_root=None):
            self.lists.append(candidates)
            return list(reversed(range(len(candidates)))), None

    reverse = Reverse()
    _, reranked = evaluate_mmeb(embedder, ["ImageNet-1K"], root, image_root, cache_dir=tmp_path / "cache",
                                reranker=reverse, rerank_top_k=2, tie_rule="strict")
    assert all(len(candidates) == 2 for candidates in reverse.lists)
    # Top-2 per row (strict: ties rank the positive last): row 0 [cat+, dog] -> dog; row 1 [dog, bird] -> bird;
    # row 2 [red+, blue] -> blue; row 3 (a tie) [cat, cat+] -> cat+, the only right answer after reversing.
    assert [row["correct"] for row in reranked.predictions["ImageNet-1K"]] == [False, False, False, True]
    # argmax orders ties by index: row 1 is [dog, car+] (car+ and bird tie at 0), reversed to the positive; row 3 is
    # [cat+, cat], reversed to the copy of the positive: wrong by index, right by content (the default).
    _, reranked = evaluate_mmeb(embedder, ["ImageNet-1K"], root, image_root, cache_dir=tmp_path / "cache",
                                reranker=Reverse(), rerank_top_k=2, rerank_match="index")
    assert [row["correct"] for row in reranked.predictions["ImageNet-1K"]] == [False, True, False, False]

    # One dataset on its own: the result comes back (nothing of the caller's is filled), reranked beside it.
    task = evaluate_task(embedder, dataset, image_root, MMEBOptions(reranker=Reverse(), rerank_top_k=2))
    assert isinstance(task, MMEBTaskResult) and (task.name, task.score, task.ties) == ("ImageNet-1K", 75.0, 1)
    assert [row["correct"] for row in task.reranked_predictions] == [False, True, False, True]
    assert task.reranked_score == pytest.approx(50.0) and task.rerank_match == "content"

    class Repeats:
        """An order that is not distinct positions into the list: refused, naming the query."""

        def rerank(self, query, candidates, mode="listwise", image_root=None):
            return [0, 0], None

    with pytest.raises(ValueError, match=r"Query 0: the reranker returned order \[0, 0\]"):
        evaluate_mmeb(embedder, ["ImageNet-1K"], root, image_root, reranker=Repeats(), rerank_top_k=2)


def test_mmeb_scores_by_cosine_not_by_dot_product(tmp_path):
    """Vectors of unequal lengths: the dot product prefers the long wrong candidate, the cosine the positive."""
    vectors = {"cat": [1.0, 0.0], "kitten": [1.0, 0.15], "dog": [3.0, 3.0], "car": [0.2, 2.0]}

    class LengthyEmbedder:
        def encode(self, texts, images, image_root=None, batch_size=32, **kwargs):
            return torch.tensor([vectors[text.split()[-1]] for text in texts])

    root, image_root = tmp_path / "mmeb", tmp_path / "images"
    rows = [{"qry_text": query, "qry_img_path": "", "tgt_text": targets, "tgt_img_path": ["", "", ""]}
            for query, targets in (("a cat", ["kitten", "dog", "car"]), ("a car", ["car", "dog", "cat"]))]
    write_mmeb(root, image_root, "HatefulMemes", rows)
    expected = []
    for row in rows:
        query = np.array(vectors[row["qry_text"].split()[-1]])
        candidates = np.array([vectors[text] for text in row["tgt_text"]])
        cosines = candidates @ query / (np.linalg.norm(candidates, axis=1) * np.linalg.norm(query))
        expected.append(int(np.argmax(cosines)) == 0)
        assert int(np.argmax(candidates @ query)) != 0   # the dot product would get this row wrong
    result, _ = evaluate_mmeb(LengthyEmbedder(), ["HatefulMemes"], root, image_root)
    assert expected == [True, True]
    assert [row["correct"] for row in result.predictions["HatefulMemes"]] == expected
    assert result.scores == {"HatefulMemes": 100.0}


def test_a_reranker_picking_a_repeated_copy_of_the_positive_is_right_by_content_not_by_index(tmp_path):
    """The authors' rerank scorer compares the pick's (text, image) with the positive's: a copy of the positive at
    another index is right; under "index" only candidate 0 is."""
    root, image_root = tmp_path / "mmeb", tmp_path / "images"
    write_mmeb(root, image_root, "ImageNet-R", [
        {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-R/cat.jpg",
         "tgt_text": ["cat", "cat", "dog"], "tgt_img_path": ["", "", ""]},   # the positive and a copy of it
        {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-R/dog.jpg",
         "tgt_text": ["dog", "cat", "car"], "tgt_img_path": ["", "", ""]},
    ])

    class PicksTheSecond:
        """Puts the embedder's second candidate first."""

        def rerank(self, query, candidates, mode="listwise", image_root=None):
            return [1, 0, *range(2, len(candidates))], None

    results = {}
    for rerank_match in ("content", "index"):
        _, reranked = evaluate_mmeb(WordEmbedder(), ["ImageNet-R"], root, image_root, reranker=PicksTheSecond(),
                                    rerank_top_k=2, rerank_match=rerank_match)
        results[rerank_match] = reranked
    # Row 0 (argmax order [0, 1, 2]): the pick is candidate 1, the positive's copy. Row 1: the pick is a negative.
    assert [row["prediction"] for row in results["content"].predictions["ImageNet-R"]] == [1, 1]
    assert [row["correct"] for row in results["content"].predictions["ImageNet-R"]] == [True, False]
    assert [row["correct"] for row in results["index"].predictions["ImageNet-R"]] == [False, False]
    assert results["content"].scores == {"ImageNet-R": 50.0} and results["index"].scores == {"ImageNet-R": 0.0}
    assert results["content"].summary()["rerank_match"] == "content"
    # The authors' rule is the default, and a rule that does not exist is refused with the choices.
    _, default = evaluate_mmeb(WordEmbedder(), ["ImageNet-R"], root, image_root, reranker=PicksTheSecond(),
                               rerank_top_k=2)
    assert default.scores == results["content"].scores
    with pytest.raises(ValueError, match="rerank_match='first'.*content, index"):
        MMEBOptions(rerank_match="first")


def test_a_repeated_positive_scores_100_under_argmax_and_0_under_strict(tmp_path):
    root, image_root = tmp_path / "mmeb", tmp_path / "images"
    write_mmeb(root, image_root, "VisDial", [
        {"qry_text": "<|image_1|>\nRepresent the given image.\n", "qry_img_path": "VisDial/dog.jpg",
         "tgt_text": ["a photo of a dog", "a photo of a dog", "a photo of a cat"], "tgt_img_path": ["", "", ""]},
    ])
    for tie_rule, expected in (("argmax", 100.0), ("strict", 0.0)):
        result, _ = evaluate_mmeb(WordEmbedder(), ["VisDial"], root, image_root, tie_rule=tie_rule)
        assert result.scores == {"VisDial": expected} and result.ties == {"VisDial": 1}


def test_missing_dataset_and_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no parquet file in .*ImageNet-A.*TIGER-Lab/MMEB-eval"):
        load_mmeb_dataset("ImageNet-A", tmp_path)
    with pytest.raises(ValueError, match="not an MMEB-eval dataset"):
        load_mmeb_dataset("ImageNet-2K", tmp_path)
    with pytest.raises(ValueError, match="CIFAR-100 is in the Hub repo but not one of MMEB's 36"):
        load_mmeb_dataset("CIFAR-100", tmp_path)
    root, image_root = tmp_path / "mmeb", tmp_path / "images"
    write_mmeb(root, image_root, "N24News", ROWS[:2])
    (image_root / "ImageNet-1K" / "dog.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 MMEB dataset 'N24News' image file\(s\) not found .*"
                                                r"ImageNet-1K/dog.jpg.*images.zip"):
        evaluate_mmeb(WordEmbedder(), ["N24News"], root, image_root)
    # The first image decides where the images are; when it is nowhere, the folders tried are named.
    (image_root / "ImageNet-1K" / "cat.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"its image 'ImageNet-1K/cat.jpg' is under none of .*images.zip"):
        evaluate_mmeb(WordEmbedder(), ["N24News"], root, image_root)
    # Without image_root, images.zip left packed in the clone is pointed out with the command to unpack it.
    (root / "images.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"images.zip is there but not unpacked: run `unzip .*eval_images`"):
        evaluate_mmeb(WordEmbedder(), ["N24News"], root)


def test_harness_end_to_end_on_a_tiny_model_in_under_a_minute(tmp_path, monkeypatch, capsys):

    root, image_root = tmp_path / "mmeb", tmp_path / "images"
    write_mmeb(root, image_root, "VOC2007", ROWS[:2])
    write_mmeb(root, image_root, "CIRR", ROWS[2:3])
    urban = tmp_path / "Urban1k"
    (urban / "image").mkdir(parents=True)
    (urban / "caption").mkdir()
    for index, colour in enumerate(["red", "blue", "green"], start=1):
        Image.new("RGB", (28, 28), colour).save(urban / "image" / f"{index}.jpg")
        (urban / "caption" / f"{index}.txt").write_text(f"a long caption about something {colour}\n")
    sugar = tmp_path / "sugar-crepe"
    sugar.mkdir()
    coco = tmp_path / "val2017"
    coco.mkdir()
    Image.new("RGB", (28, 28), "red").save(coco / "000000000001.jpg")
    for subset in ("swap_att", "swap_obj"):
        (sugar / f"{subset}.json").write_text(json.dumps({"0": {
            "filename": "000000000001.jpg", "caption": "a red square", "negative_caption": "a square red"}}))
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: tiny:qwen2_vl\nreranker: tiny:qwen2_5_vl\noutput_dir: {tmp_path / 'out'}\n"
        f"mmeb: {{root: {root}, image_root: {image_root}, datasets: [VOC2007, CIRR], rerank_top_k: 2}}\n"
        f"retrieval: {{urban1k: {{folder: {urban}, rerank_top_k: 2}}}}\n"
        f"sugarcrepe: {{annotations: {sugar}, image_root: {coco}, subsets: [swap_att, swap_obj]}}\n"
    )
    run_recipe(monkeypatch, "run_evaluation.py", "--config", str(config))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["mmeb"]) == {"embedder", "embedder + rerank"}
    assert set(results["mmeb"]["embedder"]["datasets"]) == {"VOC2007", "CIRR"}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| model | Classification | VQA | Retrieval | Visual Grounding | IND | OOD | Overall |" in table
    assert (tmp_path / "out" / "predictions" / "mmeb" / "VOC2007.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "out" / "predictions" / "mmeb_rerank" / "CIRR.jsonl").is_file()
    assert set(results["retrieval"]["urban1k"]) == {"embedder", "embedder + rerank"}
    assert set(results["retrieval"]["urban1k"]["embedder"]) == {"image_to_text", "text_to_image"}
    assert (set(results["sugarcrepe"]["subsets"]) == {"swap_att", "swap_obj"}
            and "Swap" in results["sugarcrepe"]["groups"])
    assert "image->text R@1" in table and "| embedder + rerank |" in table and "Replace | Swap | Add" in table
    output = capsys.readouterr().out
    assert "## MMEB" in output and "## SugarCrepe" in output

    # The script itself, encoding split over 2 processes: same results.
    import os
    import subprocess

    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(port), str(REPO_ROOT / "recipes" / "run_evaluation.py"), "--config", str(config),
         "--output_dir", str(tmp_path / "two")],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["mmeb"] == results["mmeb"] and two["retrieval"] == results["retrieval"]
    assert two["sugarcrepe"]["subsets"] == results["sugarcrepe"]["subsets"]
