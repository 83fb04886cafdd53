"""The demo world: the `easy-vqa` package (PyPI, MIT) as MMEB-style tasks, a blind baseline and an oracle judge.

easy-vqa has 64x64 images of one coloured shape (8 colours x 3 shapes), with question/answer pairs. Each image's
colour and shape are read from its answers (positive evidence only: "what" questions, "yes" to "is there a red
shape?", "no" to "is there not a circle?"); images whose colour or shape stays unknown are left out of the tasks.

Tasks (candidate 0 is the positive, as in MMEB):

- ``vqa_colour`` / ``vqa_shape``: the colour and shape questions with the image; candidates are every answer of
  that type (8 colours, 3 shapes). Yes/no questions are left out: 74% of easy-vqa's questions are yes/no and a
  text-only model answers them from the question alone (shared/notes/demo-world-easyvqa.md).
- ``image_to_caption``: the image with the retrieval instruction; candidates are the 24 captions "a <colour> <shape>".
- ``caption_to_image``: a caption; candidates are its image and 9 images with other captions (fewer when the split
  has fewer).

`oracle_for` builds `modeling_unime.tiny.OracleJudge` over the ground-truth attributes: graded partial credit (a match
0.95, one attribute in common 0.5, none 0.05): a stand-in for a strong MLLM judge that isolates the training method from
judge quality.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeling_unime.tiny import OracleJudge, question_kind

from ..mmeb import MMEBDataset

COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")
CAPTIONS = tuple(f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES)
IMAGE_INSTRUCTION = "<|image_1|> Find an image caption describing the given image."
TASKS = ("vqa_colour", "vqa_shape", "image_to_caption", "caption_to_image")


def _require_easy_vqa():
    try:
        import easy_vqa
    except ImportError as error:
        raise ImportError('The demo world needs the easy-vqa package: pip install "unime-v2[demo]"') from error
    return easy_vqa


def image_attributes(questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]) -> dict[int, dict]:
    """Colour and shape of each image from positive evidence in its questions and answers."""
    attributes: dict[int, dict[str, str]] = {}
    for question, answer, image in zip(questions, answers, image_ids):
        known = attributes.setdefault(image, {})
        named_colour = next((colour for colour in COLOURS if f" {colour} " in f" {question} "), None)
        named_shape = next((shape for shape in SHAPES if shape in question), None)
        if question.startswith("what"):
            if answer in COLOURS:
                known["colour"] = answer
                if named_shape:
                    known["shape"] = named_shape
            elif answer in SHAPES:
                known["shape"] = answer
                if named_colour:
                    known["colour"] = named_colour
            continue
        negated = " not " in f" {question} " or question.startswith("is no ")
        present = (answer == "yes") != negated
        if present and named_colour:
            known["colour"] = named_colour
        if present and named_shape:
            known["shape"] = named_shape
    return attributes


@dataclass
class EasyVQASplit:
    """One split: image paths, their attributes, the colour and shape questions, and every question for baselines."""

    images: dict[int, str]
    attributes: dict[int, dict[str, str]]
    questions: list[tuple[str, str, int]]

    def caption(self, image: int) -> str | None:
        known = self.attributes.get(image, {})
        return f"a {known['colour']} {known['shape']}" if {"colour", "shape"} <= known.keys() else None


def load_easyvqa(
    split: str = "train", image_dir: str | os.PathLike | None = None, image_size: int = 112
) -> EasyVQASplit:
    """Load a split; with ``image_dir`` the images are resized to ``image_size`` (16 visual tokens at 112) and saved
    there once, and their paths point to the copies."""
    easy_vqa = _require_easy_vqa()
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: use 'train' or 'test'.")
    questions, answers, image_ids = (easy_vqa.get_train_questions() if split == "train"
                                     else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    if image_dir is not None:
        from PIL import Image

        folder = Path(image_dir) / split
        folder.mkdir(parents=True, exist_ok=True)
        resized = {}
        for image, path in paths.items():
            target = folder / f"{image}.png"
            if not target.exists():
                with Image.open(path) as opened:
                    opened.convert("RGB").resize((image_size, image_size), Image.NEAREST).save(target)
            resized[image] = str(target)
        paths = resized
    return EasyVQASplit(dict(paths), image_attributes(questions, answers, image_ids),
                        list(zip(questions, answers, image_ids)))


def build_tasks(data: EasyVQASplit, seed: int = 0, limit: int | None = None) -> dict[str, MMEBDataset]:
    """The four MMEB-style tasks of a split (``limit`` rows each at most, sampled with ``seed``)."""
    rng = random.Random(seed)
    rows: dict[str, tuple[list, list]] = {task: ([], []) for task in TASKS}
    for question, answer, image in data.questions:
        kind = question_kind(question)
        if kind == "yes/no" or image not in data.attributes:
            continue
        options = COLOURS if kind == "colour" else SHAPES
        queries, candidates = rows[f"vqa_{kind}"]
        queries.append((question, data.images[image]))
        candidates.append([(answer, None)] + [(option, None) for option in options if option != answer])
    captioned = [image for image in sorted(data.images) if data.caption(image)]
    by_caption: dict[str, list[int]] = {}
    for image in captioned:
        by_caption.setdefault(data.caption(image), []).append(image)
    for image in captioned:
        caption = data.caption(image)
        queries, candidates = rows["image_to_caption"]
        queries.append((IMAGE_INSTRUCTION, data.images[image]))
        candidates.append([(caption, None)] + [(other, None) for other in CAPTIONS if other != caption])
        others = [other for other in captioned if data.caption(other) != caption]
        queries, candidates = rows["caption_to_image"]
        queries.append((caption, None))
        negatives = rng.sample(others, min(9, len(others)))
        candidates.append([(None, data.images[image])] + [(None, data.images[other]) for other in negatives])
    tasks = {}
    for task, (queries, candidates) in rows.items():
        keep = list(range(len(queries)))
        if limit is not None and len(keep) > limit:
            keep = sorted(rng.sample(keep, limit))
        tasks[task] = MMEBDataset(task, [queries[i] for i in keep], [candidates[i] for i in keep])
    return tasks


def training_pairs(data: EasyVQASplit, tasks: dict[str, MMEBDataset]) -> list[dict[str, Any]]:
    """(query, positive) rows of the tasks, in the mining schema (image paths absolute)."""
    return [
        {"query_text": query[0] or "", "query_image": query[1], "pos_text": candidates[0][0] or "",
         "pos_image": candidates[0][1], "task": name}
        for name, task in tasks.items()
        for query, candidates in zip(task.queries, task.candidates)
    ]


def blind_baseline(train: EasyVQASplit, test_tasks: dict[str, MMEBDataset]) -> dict[str, float]:
    """Precision@1 (%) of a model that never looks at the image: the majority training answer per question text
    (VQA), the majority caption (image->caption), and the expected chance of a random pick (caption->image)."""
    majority: dict[str, Counter] = {}
    for question, answer, _ in train.questions:
        majority.setdefault(question, Counter())[answer] += 1
    caption_counts = Counter(train.caption(image) for image in train.images if train.caption(image))
    scores = {}
    for name, task in test_tasks.items():
        if name.startswith("vqa_"):
            guesses = [majority[query[0]].most_common(1)[0][0] if query[0] in majority else None
                       for query in task.queries]
            correct = [guess == candidates[0][0] for guess, candidates in zip(guesses, task.candidates)]
            scores[name] = 100 * sum(correct) / max(len(correct), 1)
        elif name == "image_to_caption":
            top = caption_counts.most_common(1)[0][0]
            scores[name] = 100 * sum(candidates[0][0] == top for candidates in task.candidates) / max(len(task), 1)
        else:
            scores[name] = 100 * sum(1 / len(candidates) for candidates in task.candidates) / max(len(task), 1)
    return scores


def oracle_for(*splits: EasyVQASplit) -> OracleJudge:
    """The ground-truth judge (`modeling_unime.tiny.OracleJudge`) over the images of the given splits."""
    return OracleJudge(COLOURS, SHAPES, {split.images[image]: attributes for split in splits
                                         for image, attributes in split.attributes.items() if image in split.images})


__all__ = [
    "COLOURS", "SHAPES", "CAPTIONS", "TASKS", "EasyVQASplit", "blind_baseline", "build_tasks",
    "image_attributes", "load_easyvqa", "oracle_for", "training_pairs",
]
