"""MMEB-V2 evaluation (78 tasks: 36 image, 18 video, 24 visual-document), as VLM2Vec-V2 scores it.

Every rule below was read from the public VLM2Vec code, ``TIGER-AI-Lab/VLM2Vec`` at commit
``6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16`` (`VLM2VEC_COMMIT`); each docstring names the file. This is our own
implementation of those rules, not their code.

**Tasks** (`MMEB_V2_TASKS`, `MMEB_V2_CATEGORIES`). The 78 names, their modality and order are
``modality2dataset`` of ``experiments/report_score_v2.py``; the per-task loader (``dataset_parser``), frame folder,
row limit and ``eval_type`` come from ``experiments/public/eval/{image,video,visdoc}.yaml``; the Hub repo of each
task's annotations from ``src/constant/dataset_hf_path.py``. ``eval_type: local`` ranks each query's own candidate
list, ``global`` ranks every candidate of the task (``eval.py``). The categories (image: Classification, VQA,
Retrieval, Visual Grounding; video: CLS, QA, RET, MRET; visdoc: ViDoRe-V1, ViDoRe-V2, VisRAG, OOD) follow the order
of that list (10/10/12/4, 5/5/5/3, 10/4/6/4).

**Data as users get it** (`prepare_mmeb_v2`), under one ``root``:

- ``root``: a clone of ``TIGER-Lab/MMEB-V2`` with its archives unpacked as ``experiments/public/data/download_data.sh``
  does: ``video-tasks/frames/{video_cls,video_ret,video_mret,video_qa}/<Dataset>/...`` (pre-extracted frames, one
  folder per video) and ``image-tasks/`` (``mmeb_v1.tar.gz``: the MMEB-V1 images).
- ``annotation_root`` (default ``root/annotations``): the Hub dataset repos VLM2Vec reads at evaluation time, each
  downloaded to ``<annotation_root>/<owner>/<name>`` (``huggingface-cli download VLM2Vec/MSR-VTT --repo-type dataset
  --local-dir annotations/VLM2Vec/MSR-VTT``): parquet (or JSON lines) files as the Hub stores them, found through the
  ``configs:`` of the repo's README or the usual ``<config>/<split>-*.parquet`` / ``data/<split>-*.parquet`` names.
- Visual documents: BEIR-style ``queries`` / ``qrels`` / ``corpus`` configs. The corpus pages are written once as
  image files, ``root/visdoc-tasks/<folder>/<corpus-id>.png`` (VisRAG: the name truncated with an md5 suffix), exactly
  where VLM2Vec writes them (``src/data/eval_dataset/{vidore,visrag}_dataset.py``), unless ``pages_dir`` is given.
- Image tasks are delegated to `evaluation.mmeb` (the MMEB-V1 set): their rows come from a clone of
  ``TIGER-Lab/MMEB-eval`` (default ``<annotation_root>/TIGER-Lab/MMEB-eval``) and their images from
  ``root/image-tasks`` when it exists. VLM2Vec-V2 rebuilds the same texts from ``ziyjiang/MMEB_Test_Instruct``
  ("to stay consistent with v1 eval", ``src/data/eval_dataset/image_*.py``).

**Videos** are lists of frame files: a folder's ``.jpg`` / ``.jpeg`` / ``.png`` files in natural order, and
``num_frames`` of them (8, the yaml's ``num_frames``) at ``np.linspace(0, n - 1, num_frames, dtype=int)``; a folder
with fewer frames gives all of them (``load_frames``, ``sample_frames``, ``process_video_frames`` of
``src/utils/vision_utils/vision_utils.py``). MomentSeeker uses every frame of its folders (8 were saved), as its
loader does. Missing frames are an error here (VLM2Vec would extract them from raw videos with ffmpeg). The sampled
frame paths go to ``encode(videos=...)`` as a list per row; `UniMEV2Processor`'s defaults keep such a list as it is
(``video_num_frames`` None, at most ``video_max_frames`` 64 frames), while a processor set to ``video_num_frames``
would sample it again.

**Texts.** Each row's text is VLM2Vec's (``process_input_text`` of ``src/model/processor.py``: ``instruction + " " +
text``) without the leading ``<|video_pad|> `` / ``<|image_pad|> `` token, which the embedder puts first for a row
with a video or an image (UniME-V2's prompt ``[<|image_pad|> ][instruction ][text]``).

**Scoring** (`rank_scores`, `hit_at_k`, `ndcg_linear_at_k`): cosine similarities of L2-normalised float32 embeddings
(VLM2Vec runs with ``--normalize true`` and takes ``np.dot``), ranked by ``np.argsort(-scores)`` (``eval.py``; the
`TIE_RULES` say what a tie does), then ``RankingMetrics`` of ``src/utils/eval_utils/metrics.py``: hit@k (any label
in the top k), ``ndcg_linear@k`` (gain ``rel / log2(rank + 1)``, rank 1-based, graded relevance from the qrels, IDCG
from the qrels' grades sorted). Main metric: hit@1 for image and video tasks, ``ndcg_linear@5`` for visual documents
(``modality2metric``); scores are reported in %.

**Averages** (`mmeb_v2_means`): a modality's score is the plain mean over its tasks, not over its categories
(``experiments/report_score_v2.py`` prints "Average of VIDEO ... (from N datasets)"); the overall score is the mean
over all 78 tasks. Check: the task means of ``experiments/public/all_scores/v2.0.0/VLM2Vec-V2.0-Qwen2VL-2B.json``
are 64.9 / 34.6 / 65.4 and 58.0 overall (`PUBLISHED_MMEB_V2`); the means of its category means would be 66.5 / 34.8
/ 59.8. Category scores are plain means over their tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling_unime.util.embedding_cache import embed_with_cache

from .mmeb import MMEB_CATEGORIES, MMEBDataset, MMEBOptions, evaluate_task, prepare_mmeb
from .rerank import rerank_head

VLM2VEC_REPO = "TIGER-AI-Lab/VLM2Vec"
VLM2VEC_COMMIT = "6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16"
# VLM2Vec-V2's evaluation (experiments/public/eval/eval_8gpu.sh: the defaults of src/arguments.py, resize_use_processor
# true, no image_resolution) gives its Qwen2-VL processor size {shortest_edge: resize_min_pixels, longest_edge:
# resize_max_pixels} (src/model/processor.py), which bounds every frame: 4*28*28 to 1280*28*28 pixels.
VLM2VEC_FRAME_PIXELS = (28 * 28 * 4, 28 * 28 * 1280)
"""The commit of VLM2Vec every rule of this module was read at."""
MMEB_V2_HUB_ID = "TIGER-Lab/MMEB-V2"
MMEB_EVAL_HUB_ID = "TIGER-Lab/MMEB-eval"

MODALITIES = ("image", "video", "visdoc")
MODALITY_TITLES = {"image": "Image", "video": "Video", "visdoc": "VisDoc"}
MODALITY_METRIC = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}
"""``modality2metric`` of ``experiments/report_score_v2.py``."""
METRIC_KS = (1, 5, 10)
"""The k of every reported metric (``RankingMetrics(k_list=(1, 5, 10))``)."""

TIE_RULES = {
    "numpy": "VLM2Vec's eval.py: np.argsort(-scores) (quicksort, not stable), so numpy decides the order of tied "
             "candidates; reproduces VLM2Vec's ranking on the same numpy and CPU",
    "stable": "tied candidates keep their candidate order",
    "strict": "a tied relevant candidate comes after the irrelevant ones it ties with, so a tie never helps",
}

# ------------------------------------------------------------------------------------------------ the task table

MMEB_V2_CATEGORIES: dict[str, dict[str, list[str]]] = {
    # report_score_v2.py's image list is MMEB-V1's 36 datasets; their categories are MMEB's (evaluation.mmeb).
    "image": {category: split["IND"] + split["OOD"] for category, split in MMEB_CATEGORIES.items()},
    "video": {
        "CLS": ["K700", "SmthSmthV2", "HMDB51", "UCF101", "Breakfast"],
        "QA": ["MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA"],
        "RET": ["DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2"],
        "MRET": ["QVHighlight", "Charades-STA", "MomentSeeker"],
    },
    "visdoc": {
        "ViDoRe-V1": ["ViDoRe_arxivqa", "ViDoRe_docvqa", "ViDoRe_infovqa", "ViDoRe_tabfquad", "ViDoRe_tatdqa",
                      "ViDoRe_shiftproject", "ViDoRe_syntheticDocQA_artificial_intelligence",
                      "ViDoRe_syntheticDocQA_energy", "ViDoRe_syntheticDocQA_government_reports",
                      "ViDoRe_syntheticDocQA_healthcare_industry"],
        "ViDoRe-V2": ["ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
                      "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual"],
        "VisRAG": ["VisRAG_ArxivQA", "VisRAG_ChartQA", "VisRAG_MP-DocVQA", "VisRAG_SlideVQA", "VisRAG_InfoVQA",
                   "VisRAG_PlotQA"],
        "OOD": ["ViDoSeek-page", "ViDoSeek-doc", "MMLongBench-page", "MMLongBench-doc"],
    },
}

PUBLISHED_MMEB_V2 = {
    # Task means of experiments/public/all_scores/v2.0.0/VLM2Vec-V2.0-Qwen2VL-2B.json (VLM2Vec at VLM2VEC_COMMIT).
    "VLM2Vec/VLM2Vec-V2.0": {"Image": 64.9, "Video": 34.6, "VisDoc": 65.4, "Overall": 58.0},
}


@dataclass(frozen=True)
class MMEBV2Task:
    """One MMEB-V2 task as VLM2Vec evaluates it.

    Attributes:
        name: the name in ``experiments/report_score_v2.py`` (and of VLM2Vec's ``<name>_score.json``).
        modality, category: see `MMEB_V2_CATEGORIES`.
        metric: the main metric (`MODALITY_METRIC`).
        eval_type: ``"local"`` (each query's own candidates) or ``"global"`` (every candidate of the task).
        parser: VLM2Vec's ``dataset_parser`` (the loader family).
        hub: ``(repo, config, split)`` of the annotations (``src/constant/dataset_hf_path.py``).
        frames: the frame folder under the MMEB-V2 root (video tasks; the yaml's ``frame_root``).
        pages: the page-image folder under the root (visual documents; the yaml's ``image_root``).
        max_rows: the yaml's ``num_sample_per_subset`` (the first rows only), None for every row.
    """

    name: str
    modality: str
    category: str
    eval_type: str
    parser: str
    hub: tuple[str, str | None, str]
    frames: str | None = None
    pages: str | None = None
    max_rows: int | None = None

    @property
    def metric(self) -> str:
        return MODALITY_METRIC[self.modality]

    @property
    def title(self) -> str:
        return f"{MODALITY_TITLES[self.modality]}/{self.category}"


def _video_tasks() -> list[MMEBV2Task]:
    """``experiments/public/eval/video.yaml`` and ``src/constant/dataset_hf_path.py``."""
    rows = [  # name, category, parser, hub (repo, config, split), frame folder, eval_type, max_rows
        ("K700", "CLS", "video_classification", ("VLM2Vec/Kinetics-700", None, "test"), "video_cls/K700", "global"),
        ("SmthSmthV2", "CLS", "ssv2", ("VLM2Vec/SmthSmthV2", None, "test"), "video_cls/SSv2", "local", 1000),
        ("HMDB51", "CLS", "video_classification", ("VLM2Vec/HMDB51", None, "test"), "video_cls/HMDB51", "global"),
        ("UCF101", "CLS", "video_classification", ("VLM2Vec/UCF101", None, "test"), "video_cls/UCF101", "global"),
        ("Breakfast", "CLS", "video_classification", ("VLM2Vec/Breakfast", None, "test"), "video_cls/Breakfast",
         "global"),
        ("MVBench", "QA", "mvbench", ("VLM2Vec/MVBench", None, "train"), "video_qa/MVBench", "local"),
        ("Video-MME", "QA", "videomme", ("VLM2Vec/Video-MME", None, "test"), "video_qa/Video-MME", "local"),
        ("NExTQA", "QA", "nextqa", ("VLM2Vec/NExTQA", "MC", "test"), "video_qa/NExTQA", "local"),
        ("EgoSchema", "QA", "egoschema", ("VLM2Vec/EgoSchema", "Subset", "test"), "video_qa/EgoSchema", "local"),
        ("ActivityNetQA", "QA", "activitynetqa", ("VLM2Vec/ActivityNetQA", None, "test"), "video_qa/ActivityNetQA",
         "local"),
        ("DiDeMo", "RET", "didemo", ("VLM2Vec/DiDeMo", None, "test"), "video_ret/DiDeMo", "global"),
        ("MSR-VTT", "RET", "msrvtt", ("VLM2Vec/MSR-VTT", "test_1k", "test"), "video_ret/MSR-VTT", "global"),
        ("MSVD", "RET", "msvd", ("VLM2Vec/MSVD", None, "test"), "video_ret/MSVD", "global"),
        ("VATEX", "RET", "vatex", ("VLM2Vec/VATEX", None, "test"), "video_ret/VATEX", "global"),
        ("YouCook2", "RET", "youcook2", ("lmms-lab/YouCook2", None, "val"), "video_ret/YouCook2", "global"),
        ("QVHighlight", "MRET", "moment_retrieval", ("VLM2Vec/QVHighlight", None, "test"), "video_mret/QVHighlight",
         "local"),
        ("Charades-STA", "MRET", "moment_retrieval", ("VLM2Vec/Charades-STA", None, "test"),
         "video_mret/Charades_STA", "local"),
        ("MomentSeeker", "MRET", "momentseeker", ("VLM2Vec/MomentSeeker", None, "test"), "video_mret/MomentSeeker",
         "local"),
    ]
    return [MMEBV2Task(name, "video", category, eval_type, parser, hub, frames="video-tasks/frames/" + frames,
                       max_rows=rest[0] if rest else None)
            for name, category, parser, hub, frames, eval_type, *rest in rows]


def _visdoc_tasks() -> list[MMEBV2Task]:
    """``experiments/public/eval/visdoc.yaml`` (every task ``eval_type: global``) and
    ``src/constant/dataset_hf_path.py``. The ``-page`` OOD sets read the ``*-page-fixed`` repos (VLM2Vec issue #167)."""
    vidore_v1 = {"arxivqa": "arxivqa_test_subsampled_beir", "docvqa": "docvqa_test_subsampled_beir",
                 "infovqa": "infovqa_test_subsampled_beir", "tabfquad": "tabfquad_test_subsampled_beir",
                 "tatdqa": "tatdqa_test_beir", "shiftproject": "shiftproject_test_beir"}
    vidore_v1.update({f"syntheticDocQA_{topic}": f"syntheticDocQA_{topic}_test_beir" for topic in (
        "artificial_intelligence", "energy", "government_reports", "healthcare_industry")})
    rows = [(f"ViDoRe_{key}", "ViDoRe-V1", "vidore", f"vidore/{repo}", "test", f"ViDoRe_{key}")
            for key, repo in vidore_v1.items()]
    rows += [
        ("ViDoRe_esg_reports_human_labeled_v2", "ViDoRe-V2", "vidore", "vidore/esg_reports_human_labeled_v2", "test",
         "esg_reports_human_labeled_v2"),
        ("ViDoRe_biomedical_lectures_v2_multilingual", "ViDoRe-V2", "vidore", "vidore/biomedical_lectures_v2", "test",
         "biomedical_lectures_v2_multilingual"),
        ("ViDoRe_economics_reports_v2_multilingual", "ViDoRe-V2", "vidore", "vidore/economics_reports_v2", "test",
         "economics_reports_v2_multilingual"),
        ("ViDoRe_esg_reports_v2_multilingual", "ViDoRe-V2", "vidore", "vidore/esg_reports_v2", "test",
         "esg_reports_v2_multilingual"),
    ]
    rows += [(f"VisRAG_{name}", "VisRAG", "visrag", f"openbmb/VisRAG-Ret-Test-{name}", "train", f"VisRAG_{name}")
             for name in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")]
    rows += [
        ("ViDoSeek-page", "OOD", "vidore", "VLM2Vec/ViDoSeek-page-fixed", "test", "ViDoSeek-page"),
        ("ViDoSeek-doc", "OOD", "vidore", "VLM2Vec/ViDoSeek", "test", "ViDoSeek-doc"),
        ("MMLongBench-page", "OOD", "vidore", "VLM2Vec/MMLongBench-page-fixed", "test", "MMLongBench-page"),
        ("MMLongBench-doc", "OOD", "vidore", "VLM2Vec/MMLongBench-doc", "test", "MMLongBench-doc"),
    ]
    return [MMEBV2Task(name, "visdoc", category, "global", parser, (repo, None, split), pages="visdoc-tasks/" + folder)
            for name, category, parser, repo, split, folder in rows]


def _image_tasks() -> list[MMEBV2Task]:
    """``experiments/public/eval/image.yaml``: every image task is ``eval_type: local``."""
    return [MMEBV2Task(name, "image", category, "local", "mmeb", (MMEB_EVAL_HUB_ID, name, "test"))
            for category, names in MMEB_V2_CATEGORIES["image"].items() for name in names]


def _task_table() -> dict[str, MMEBV2Task]:
    table = {task.name: task for task in [*_image_tasks(), *_video_tasks(), *_visdoc_tasks()]}
    listed = [name for categories in MMEB_V2_CATEGORIES.values() for names in categories.values() for name in names]
    if sorted(listed) != sorted(table):
        raise AssertionError("the MMEB-V2 task table and MMEB_V2_CATEGORIES disagree")
    for task in table.values():
        if task.name not in MMEB_V2_CATEGORIES[task.modality][task.category]:
            raise AssertionError(f"{task.name}: category {task.category!r} disagrees with MMEB_V2_CATEGORIES")
    return {name: table[name] for name in listed}


MMEB_V2_TASKS: dict[str, MMEBV2Task] = _task_table()
MMEB_V2_TASK_NAMES = list(MMEB_V2_TASKS)


def select_tasks(tasks: str | Sequence[str] | None = None) -> list[MMEBV2Task]:
    """Tasks by name, by modality (``"image"``, ``"video"``, ``"visdoc"``) or by ``"<modality>/<category>"``
    (``"video/MRET"``), in the table's order; every task when None.

    >>> [task.name for task in select_tasks(["video/MRET"])]
    ['QVHighlight', 'Charades-STA', 'MomentSeeker']
    """
    if tasks is None:
        return list(MMEB_V2_TASKS.values())
    wanted = [tasks] if isinstance(tasks, str) else list(tasks)
    chosen: set[str] = set()
    for item in wanted:
        if item in MMEB_V2_TASKS:
            chosen.add(item)
        elif item in MODALITIES:
            chosen.update(name for names in MMEB_V2_CATEGORIES[item].values() for name in names)
        elif "/" in item and item.split("/", 1)[0] in MODALITIES and \
                item.split("/", 1)[1] in MMEB_V2_CATEGORIES[item.split("/", 1)[0]]:
            modality, category = item.split("/", 1)
            chosen.update(MMEB_V2_CATEGORIES[modality][category])
        else:
            categories = [f"{modality}/{category}" for modality in MODALITIES
                          for category in MMEB_V2_CATEGORIES[modality]]
            raise ValueError(f"{item!r} is not an MMEB-V2 task, modality or category; modalities: "
                             f"{', '.join(MODALITIES)}; categories: {', '.join(categories)}; tasks: "
                             f"{', '.join(MMEB_V2_TASK_NAMES)}.")
    return [task for name, task in MMEB_V2_TASKS.items() if name in chosen]


def annotation_repos(tasks: str | Sequence[str] | None = None) -> list[str]:
    """The Hub dataset repos the tasks read (their annotations; TIGER-Lab/MMEB-eval for the image tasks), each to
    be downloaded to ``<annotation_root>/<repo>``.

    >>> annotation_repos("video/MRET")
    ['VLM2Vec/QVHighlight', 'VLM2Vec/Charades-STA', 'VLM2Vec/MomentSeeker']
    """
    return list(dict.fromkeys(task.hub[0] for task in select_tasks(tasks)))


# ------------------------------------------------------------------------------------------------ texts

# The instructions of VLM2Vec's loaders (src/data/eval_dataset/*.py), used as there.
VIDEO_CLS_INSTRUCTIONS = {  # video_classification_utils.py, DATASET_INSTRUCTION (by task name)
    "K700": "Recognize the category of the video content.",
    "SmthSmthV2": "What actions or object interactions are being performed by the person in the video?",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video. ",
}
VIDEO_RET_INSTRUCTIONS = {  # TASK_INST_QRY of msrvtt/msvd/didemo/vatex/youcook2_dataset.py
    "MSR-VTT": "Find a video that contains the following visual content:",
    "MSVD": "Find the video snippet that corresponds to the given summary:",
    "DiDeMo": "Find a video that includes the following described scenes:",
    "VATEX": "Select a video that fits the description provided:",
    "YouCook2": "Find a video that demonstrates the following action while making a recipe:",
}
VIDEO_TARGET_INSTRUCTION = "Understand the content of the provided video."
MOMENT_INSTRUCTION = "Find the clip that corresponds to the described scene in the given video:"
MOMENTSEEKER_INSTRUCTIONS = {  # momentseeker_dataset.py, by the query's kind
    "text": "Find the clip that corresponds to the given text:",
    "image": "Select the video clip that aligns with the given text and image:",
    "video": "Find the clip that corresponds to the given sentence and video segment:",
}
MOMENTSEEKER_TARGET_INSTRUCTION = "Understand the content of the provided video clip."
VIDEO_QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. "
                   "Return only the exact text of your chosen answer. Question: ")
VISDOC_QUERY_INSTRUCTION = "Find a document image that matches the given query:"
VISDOC_TARGET_INSTRUCTION = "Understand the content of the provided document image."
MVBENCH_SUBSETS = (  # mvbench_dataset.py, subset_meta: the Hub configs, concatenated in this order
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change",
    "fine_grained_pose", "character_order", "egocentric_navigation", "counterfactual_inference",
)


def join_instruction(instruction: str, text: str | None = None) -> str:
    """``process_input_text`` of ``src/model/processor.py`` without the media token: the instruction, then a space and
    the text when there is one (an empty text adds nothing).

    >>> join_instruction("Find a video:", "a dog"), join_instruction("Find a video:", "")
    ('Find a video: a dog', 'Find a video:')
    """
    return f"{instruction} {text}" if text else instruction


def multiple_choice(question: str, candidates: Sequence[str], answer: Any) -> tuple[str, list[str], str]:
    """``qa_template`` of ``src/utils/vision_utils/vision_utils.py``: the question followed by ``Options:`` and one
    ``(A) ...`` line per candidate (trailing whitespace stripped), the lettered options, and the lettered answer (the
    letter of the last candidate equal to ``answer``; ``(@)`` when none is, which no option matches).

    >>> multiple_choice("Q?", ["red", "blue"], "blue")
    ('Q?\\nOptions:\\n(A) red\\n(B) blue', ['(A) red', '(B) blue'], '(B) blue')
    """
    options = [f"({chr(ord('A') + index)}) {candidate}" for index, candidate in enumerate(candidates)]
    text = (f"{question}\nOptions:\n" + "".join(option + "\n" for option in options)).rstrip()
    position = max((index for index, candidate in enumerate(candidates) if candidate == answer), default=-1)
    return text, options, f"({chr(ord('A') + position)}) {answer}"


def option_text(option: str) -> str:
    """The candidate text of a lettered option (Video-MME, EgoSchema): what follows the first ``". "``, stripped of
    dots and spaces, as ``o[o.find('. '):].strip('. ')`` of their loaders does (an option without ``". "`` keeps
    only its last character there, and here).

    >>> option_text("B. A red car."), option_text("xyz")
    ('A red car', 'z')
    """
    return option[option.find(". "):].strip(". ")


def visrag_page_name(corpus_id: str) -> str:
    """The file name VLM2Vec gives a VisRAG page (``visrag_dataset.py``): the name's stem cut to 50 characters,
    ``_`` and the first 8 hex digits of the md5 of the whole name, then its extension.

    >>> visrag_page_name("a.png")
    'a_32d3ca5e.png'
    """
    stem, extension = os.path.splitext(corpus_id)
    return f"{stem[:50]}_{hashlib.md5(corpus_id.encode('utf-8')).hexdigest()[:8]}{extension}"


def page_file_name(task: MMEBV2Task, corpus_id: Any) -> str:
    """The page image file of a corpus id: ``<corpus-id>.png`` (``vidore_dataset.py``) or `visrag_page_name`."""
    return visrag_page_name(str(corpus_id)) if task.parser == "visrag" else f"{corpus_id}.png"


# ------------------------------------------------------------------------------------------------ frames

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
"""``IMAGE_EXTENSIONS`` of ``vision_utils.py``: the files of a frame folder that are frames (case-insensitive)."""


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def list_frames(folder: str | os.PathLike) -> list[str]:
    """A folder's frame files in natural order (``frame_2`` before ``frame_10``), as ``load_frames`` lists them; []
    when the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted((entry.name for entry in os.scandir(folder)
                    if os.path.splitext(entry.name)[1].lower() in FRAME_EXTENSIONS), key=_natural_key)
    return [os.fspath(folder / name) for name in names]


def sample_frames(frames: Sequence[str], num_frames: int | None) -> list[str]:
    """``num_frames`` of ``frames`` at ``np.linspace(0, n - 1, num_frames, dtype=int)``; all of them when there are
    no more than ``num_frames`` or ``num_frames`` is None (``process_video_frames``).

    >>> sample_frames([f"f{i}" for i in range(20)], 8)
    ['f0', 'f2', 'f5', 'f8', 'f10', 'f13', 'f16', 'f19']
    """
    if num_frames is None or num_frames >= len(frames):
        return list(frames)
    return [frames[index] for index in np.linspace(0, len(frames) - 1, num_frames, dtype=int)]


# ------------------------------------------------------------------------------------------------ annotation files

TABLE_EXTENSIONS = (".parquet", ".jsonl", ".json")


def _readme_configs(folder: Path) -> list[dict[str, Any]]:
    readme = folder / "README.md"
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    if end < 0:
        return []
    import yaml

    try:
        header = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        return []
    configs = header.get("configs") if isinstance(header, dict) else None
    return [config for config in configs or [] if isinstance(config, dict)]


def _glob_all(folder: Path, patterns: Iterable[str]) -> list[Path]:
    found: list[Path] = []
    for pattern in patterns:
        found += [path for path in sorted(folder.glob(pattern))
                  if path.is_file() and path.suffix in TABLE_EXTENSIONS and path not in found]
    return found


def annotation_files(folder: str | os.PathLike, config: str | None, split: str) -> list[Path]:
    """The data files of one config and split of a Hub dataset repo downloaded to ``folder``.

    Looked up, in order: the ``configs:`` of the repo's README (``config_name``, ``data_files`` as ``{split, path}``
    entries or plain patterns), then the layouts ``push_to_hub`` writes (``<config>/<split>-*.parquet``,
    ``data/<split>-*.parquet``, ``<split>-*.parquet``, ``<split>.jsonl``...). [] when nothing matches.
    """
    folder = Path(folder)
    name = config or "default"
    for entry in _readme_configs(folder):
        if entry.get("config_name", "default") != name:
            continue
        data_files = entry.get("data_files")
        if isinstance(data_files, (str, dict)):
            data_files = [data_files]
        patterns, loose = [], []
        for item in data_files or []:
            if isinstance(item, dict):
                if item.get("split") == split:
                    paths = item.get("path")
                    patterns += [paths] if isinstance(paths, str) else list(paths or [])
            else:
                loose.append(str(item))
        files = _glob_all(folder, patterns)
        if not files and loose:
            everything = _glob_all(folder, loose)
            files = [path for path in everything if split in path.relative_to(folder).as_posix()] or everything
        if files:
            return files
    stems = [f"{split}-*", f"{split}.*", f"{split}/*", f"{split}_*"]
    prefixes = [f"{config}/", f"data/{config}/"] if config else ["data/", "", "default/"]
    return _glob_all(folder, [prefix + stem for prefix in prefixes for stem in stems])


def _iter_table(path: Path, columns: Sequence[str] | None = None) -> Iterable[dict[str, Any]]:
    """The rows of a parquet file in batches (a corpus of page images need not fit in memory), else of a JSON file."""
    if path.suffix != ".parquet":
        yield from _read_table(path, columns)
        return
    import pyarrow.parquet as parquet

    for batch in parquet.ParquetFile(path).iter_batches(batch_size=64, columns=list(columns) if columns else None):
        yield from batch.to_pylist()


def _read_table(path: Path, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as parquet

        return parquet.read_table(path, columns=list(columns) if columns else None).to_pylist()
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # {column: [values]}
        keys = list(data)
        return [dict(zip(keys, values)) for values in zip(*(data[key] for key in keys))]
    return list(data)


def hub_folder(annotation_root: str | os.PathLike, repo: str) -> Path:
    """Where a Hub repo is expected: ``<annotation_root>/<owner>/<name>``."""
    return Path(annotation_root) / repo


def download_hint(repo: str, folder: Path) -> str:
    return f"`huggingface-cli download {repo} --repo-type dataset --local-dir {folder}`"


def read_annotations(
    task: MMEBV2Task, annotation_root: str | os.PathLike, config: str | None = None, split: str | None = None,
    columns: Sequence[str] | None = None, repo: str | None = None,
) -> list[dict[str, Any]]:
    """The rows of one config / split of a task's annotation repo (default: the task's ``hub`` entry), read from its
    local copy (`annotation_files`; when none of those names match, ``datasets.load_dataset`` on the folder).

    Raises:
        FileNotFoundError: the folder or the files are missing; the message names the task, the folder expected and
            the command that downloads the repo.
        ValueError: a file is a Git LFS pointer.
    """
    from .data_files import check_not_lfs_pointers

    repo = repo or task.hub[0]
    config = config if config is not None else task.hub[1]
    split = split or task.hub[2]
    folder = hub_folder(annotation_root, repo)
    wanted = f"config {config!r}, split {split!r}" if config else f"split {split!r}"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"MMEB-V2 task {task.name!r}: no annotation folder {folder} (the Hub dataset {repo}, {wanted}, which "
            f"VLM2Vec reads at evaluation time). Download it with {download_hint(repo, folder)}."
        )
    files = annotation_files(folder, config, split)
    if not files:
        try:
            import datasets

            table = datasets.load_dataset(os.fspath(folder), config, split=split)
        except Exception as error:  # noqa: BLE001 - reported with what was looked for
            raise FileNotFoundError(
                f"MMEB-V2 task {task.name!r}: no data files for {wanted} in {folder} (looked for the README's "
                f"configs, {config or 'data'}/{split}-*.parquet and {split}.jsonl; datasets.load_dataset said: "
                f"{type(error).__name__}: {error}). Download the repo with {download_hint(repo, folder)}."
            ) from error
        return table.select_columns(list(columns)).to_list() if columns else table.to_list()
    check_not_lfs_pointers(files, f"MMEB-V2 task {task.name!r}")
    rows: list[dict[str, Any]] = []
    for path in files:
        rows += _read_table(path, columns)
    return rows


# ------------------------------------------------------------------------------------------------ datasets

MediaItem = tuple[str | None, str | None, tuple[str, ...] | None]
"""(text, image path, frame paths): one row to embed; None where the row has no such part."""


@dataclass
class MMEBV2Dataset:
    """One task, ready to embed and score.

    Attributes:
        queries: one `MediaItem` per query.
        labels: each query's relevant candidate names.
        corpus: every candidate name of the task -> its content, in VLM2Vec's order (``generate_cand_dataset`` of
            ``src/data/eval_dataset/base_eval_dataset.py``: each query's candidates in row order, then the extra
            corpus; the first content of a name wins). A ``global`` task ranks all of it.
        candidates: ``local`` tasks: each query's candidate names (a name may repeat); None for ``global`` tasks.
        rel_scores: graded relevance of each label (visual documents), else None (binary).
        mmeb: image tasks: the `evaluation.mmeb` dataset and its image folder, scored there.
        source: where the data came from (for results.json).
    """

    task: MMEBV2Task
    queries: list[MediaItem] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)
    corpus: dict[str, MediaItem] = field(default_factory=dict)
    candidates: list[list[str]] | None = None
    rel_scores: list[list[float]] | None = None
    mmeb: tuple[MMEBDataset, str | None] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.mmeb[0]) if self.mmeb is not None else len(self.queries)

    def add_candidates(self, names: Sequence[str], items: Sequence[MediaItem]) -> None:
        for name, item in zip(names, items):
            self.corpus.setdefault(name, item)


@dataclass(frozen=True)
class MMEBV2Paths:
    """Where the data of a run lies (see the module docstring)."""

    root: Path
    annotation_root: Path
    image_tasks_root: Path
    image_root: Path | None = None
    pages_dir: Path | None = None
    num_frames: int | None = 8

    @classmethod
    def make(cls, root: str | os.PathLike, annotation_root: str | os.PathLike | None = None,
             image_tasks_root: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
             pages_dir: str | os.PathLike | None = None, num_frames: int | None = 8) -> MMEBV2Paths:
        if num_frames is not None and (isinstance(num_frames, bool) or int(num_frames) < 1):
            raise ValueError(f"num_frames must be a positive integer (or None for every frame), got {num_frames!r}.")
        root = Path(os.path.expanduser(os.fspath(root)))
        annotations = Path(annotation_root) if annotation_root is not None else root / "annotations"
        image_tasks = Path(image_tasks_root) if image_tasks_root is not None else annotations / MMEB_EVAL_HUB_ID
        if image_root is None and (root / "image-tasks").is_dir():
            image_root = root / "image-tasks"
        return cls(root, annotations, image_tasks, Path(image_root) if image_root is not None else None,
                   Path(pages_dir) if pages_dir is not None else None,
                   None if num_frames is None else int(num_frames))


_FRAME_ARCHIVES = {  # experiments/public/data/download_data.sh, run in video-tasks/frames/
    "video_cls": "mkdir -p video_cls && tar -xzf video_cls.tar.gz -C video_cls",
    "video_ret": "mkdir -p video_ret && tar -xzf video_ret.tar.gz -C video_ret",
    "video_mret": "tar -xzf video_mret.tar.gz",
    "video_qa": "cat video_qa.tar.gz-0{0..4} | tar -xz",
}


def _frames_hint(task: MMEBV2Task, paths: MMEBV2Paths) -> str:
    group = task.frames.split("/")[2]
    return (f"The frames come from {MMEB_V2_HUB_ID} (`git clone https://huggingface.co/datasets/{MMEB_V2_HUB_ID}`): in "
            f"{paths.root / 'video-tasks' / 'frames'} run `{_FRAME_ARCHIVES[group]}`. VLM2Vec extracts frames of "
            "missing videos from the raw videos with ffmpeg; this harness reads the published frames only.")


class _FrameReader:
    """Reads a task's frame folders, collecting the missing ones so that one error names them all."""

    def __init__(self, task: MMEBV2Task, paths: MMEBV2Paths) -> None:
        self.task, self.paths = task, paths
        self.base = paths.root / task.frames
        self.missing: list[str] = []
        self.seen = 0
        if not self.base.is_dir():
            raise FileNotFoundError(
                f"MMEB-V2 task {task.name!r}: no frame folder {self.base}. {_frames_hint(task, paths)}")

    def frames(self, folder: Path, sample: bool = True, num_frames: int | None = None) -> tuple[str, ...]:
        self.seen += 1
        found = list_frames(folder)
        if not found:
            self.missing.append(os.fspath(folder))
            return ()
        return tuple(sample_frames(found, num_frames or self.paths.num_frames) if sample else found)

    def check(self) -> None:
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
            raise FileNotFoundError(
                f"MMEB-V2 task {self.task.name!r}: {len(self.missing)} of {self.seen} frame folders are missing or "
                f"hold no .jpg/.jpeg/.png frame (first: {shown}). {_frames_hint(self.task, self.paths)}")


def _first(rows: list[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    return rows if limit is None else rows[:limit]


def _require(task: MMEBV2Task, rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if rows:
        absent = [column for column in columns if column not in rows[0]]
        if absent:
            raise ValueError(f"MMEB-V2 task {task.name!r}: the annotations lack the column(s) {absent} (columns: "
                             f"{sorted(rows[0])}); is the folder a copy of {task.hub[0]}?")


def _row_limit(task: MMEBV2Task, max_rows: int | None) -> int | None:
    limits = [limit for limit in (task.max_rows, max_rows) if limit is not None]
    return min(limits) if limits else None


def _load_video_classification(task, paths, rows, reader) -> MMEBV2Dataset:
    """``video_classification_datasets.py`` (``global``: every query against the row labels, then the task's label
    list, `VIDEO_CLS_LABELS`) and ``ssv2_dataset.py`` (``local``: each row's ``neg_text`` list)."""
    local = task.parser == "ssv2"
    _require(task, rows, ["video_id", "pos_text"] + (["neg_text"] if local else []))
    dataset = MMEBV2Dataset(task, candidates=[] if local else None)
    instruction = VIDEO_CLS_INSTRUCTIONS[task.name]
    for row in rows:
        frames = reader.frames(reader.base / str(row["video_id"]))
        dataset.queries.append((instruction, None, frames))
        label = row["pos_text"]
        dataset.labels.append([label])
        names = list(row["neg_text"]) if local else [label]
        dataset.add_candidates(names, [(name, None, None) for name in names])
        if local:
            dataset.candidates.append(names)
    if not local:
        labels = VIDEO_CLS_LABELS[task.name].split("|")
        dataset.add_candidates(labels, [(name, None, None) for name in labels])
    return dataset


def _load_video_retrieval(task, paths, rows, reader) -> MMEBV2Dataset:
    """``msrvtt/msvd/didemo/vatex/youcook2_dataset.py``: a caption query against every video of the task."""
    columns = {"msrvtt": ("video_id", "caption"), "msvd": ("video_id", "caption"), "didemo": ("video", "caption"),
               "vatex": ("videoID", "enCap"), "youcook2": ("id", "sentence")}[task.parser]
    _require(task, rows, columns)
    dataset = MMEBV2Dataset(task)
    for row in rows:
        if task.parser == "didemo":
            name = os.path.splitext(os.path.basename(row["video"]))[0]
        else:
            name = str(row[columns[0]])
        caption = row[columns[1]]
        if task.parser in ("msvd", "vatex"):  # a list of captions: the first is the query
            caption = caption[0]
        dataset.queries.append((join_instruction(VIDEO_RET_INSTRUCTIONS[task.name], caption), None, None))
        dataset.labels.append([name])
        if name not in dataset.corpus:
            dataset.add_candidates([name], [(VIDEO_TARGET_INSTRUCTION, None, reader.frames(reader.base / name))])
    return dataset


def _load_video_qa(task, paths, rows, reader) -> MMEBV2Dataset:
    """``mvbench/videomme/nextqa/egoschema/activitynetqa_dataset.py``: a video and a multiple-choice question against
    its options (``local``). A candidate's name is its option as the loader lists it; its text may be shorter
    (`option_text`)."""
    dataset = MMEBV2Dataset(task, candidates=[])
    required = {"mvbench": ["subset", "question", "video", "candidates", "answer"],
                "videomme": ["question", "videoID", "options", "answer"],
                "nextqa": ["video", "question", "answer", "a0", "a1", "a2", "a3", "a4"],
                "egoschema": ["video_idx", "question", "answer", "option"],
                "activitynetqa": ["video_name", "question", "answer"]}[task.parser]
    _require(task, rows, required)
    for row in rows:
        question = row["question"]
        if task.parser == "mvbench":
            text, names, label = multiple_choice(f"{VIDEO_QA_PROMPT} {question}", row["candidates"], row["answer"])
            texts, folder = names, reader.base / row["subset"] / str(row["video"])
        elif task.parser == "videomme":
            names = list(row["options"])
            text = f"{VIDEO_QA_PROMPT} {question}\n" + "\n".join(names)
            texts, label = [option_text(name) for name in names], names["ABCD".index(row["answer"])]
            folder = reader.base / str(row["videoID"])
        elif task.parser == "nextqa":
            names = [row[f"a{index}"] for index in range(5)]
            text = multiple_choice(f"{VIDEO_QA_PROMPT} {question}", names, row["answer"])[0]
            texts, label, folder = names, names[int(row["answer"])], reader.base / str(row["video"])
        elif task.parser == "egoschema":
            names = list(row["option"])
            text = f"{VIDEO_QA_PROMPT} {question + ' '.join(names)}"
            texts, label = [option_text(name) for name in names], names[int(row["answer"])]
            folder = reader.base / str(row["video_idx"])
        else:  # activitynetqa
            names = ["yes", "no"]
            text, texts, label = f"{VIDEO_QA_PROMPT} {question}? (A) yes; (B) no.", names, row["answer"]
            folder = reader.base / f"v_{row['video_name']}"
        dataset.queries.append((text, None, reader.frames(folder)))
        dataset.labels.append([label])
        dataset.candidates.append(list(names))
        dataset.add_candidates(names, [(candidate, None, None) for candidate in texts])
    return dataset


def _load_moment_retrieval(task, paths, rows, reader) -> MMEBV2Dataset:
    """``moment_retrieval_datasets.py`` (QVHighlight, Charades-STA): the query video (``<video>/query/``) and the
    description against the clip folders beside it; the folders named ``positive*`` are the labels.

    VLM2Vec lists the clip folders in ``os.listdir`` order (which only decides ties) and keeps the last ``positive*``
    folder as the label; here they are sorted, and every ``positive*`` folder is a label (the same when, as
    published, each video has one)."""
    _require(task, rows, ["query", "video_path"])
    dataset = MMEBV2Dataset(task, candidates=[])
    for row in rows:
        folder = reader.base / os.path.splitext(os.path.basename(row["video_path"]))[0]
        query_frames = reader.frames(folder / "query")
        clips = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name != "query") \
            if folder.is_dir() else []
        names = [os.fspath(folder / clip) for clip in clips]
        positives = [os.fspath(folder / clip) for clip in clips if clip.startswith("positive")]
        if folder.is_dir() and not positives:
            raise FileNotFoundError(f"MMEB-V2 task {task.name!r}: {folder} has no positive* clip folder (its "
                                    f"folders: {clips}). {_frames_hint(task, paths)}")
        dataset.queries.append((join_instruction(MOMENT_INSTRUCTION, row["query"]), None, query_frames))
        dataset.labels.append(positives)
        dataset.candidates.append(names)
        dataset.add_candidates(names, [(VIDEO_TARGET_INSTRUCTION, None, reader.frames(Path(name))) for name in names])
    return dataset


def _load_momentseeker(task, paths, rows, reader) -> MMEBV2Dataset:
    """``momentseeker_dataset.py``: a text, image (``query_<input_frames>``) or video (``video_frames/<input with / as
    _>``) query against its positive and negative clips (``video_frames/<output_path with / as _, before .mp4>``);
    every frame of a folder is used (8 were saved)."""
    _require(task, rows, ["query", "positive_frames", "negative_frames", "input_frames"])
    dataset = MMEBV2Dataset(task, candidates=[])
    frames_dir = reader.base / "video_frames"
    missing_images: list[str] = []
    for row in rows:
        query, given = row["query"], row["input_frames"] or ""
        if given.endswith(".mp4"):
            folder = frames_dir / given.split(".mp4")[0].replace("/", "_")
            item = (join_instruction(MOMENTSEEKER_INSTRUCTIONS["video"], query), None,
                    reader.frames(folder, sample=False))
        elif given.endswith(".jpg"):
            image = reader.base / f"query_{given}"
            if not image.is_file():
                missing_images.append(os.fspath(image))
            item = (join_instruction(MOMENTSEEKER_INSTRUCTIONS["image"], query), os.fspath(image), None)
        else:
            item = (join_instruction(MOMENTSEEKER_INSTRUCTIONS["text"], query), None, None)
        positives = [frames_dir / entry["output_path"].replace("/", "_").split(".mp4")[0]
                     for entry in row["positive_frames"]]
        negatives = [frames_dir / entry["output_path"].replace("/", "_").split(".mp4")[0]
                     for entry in row["negative_frames"]]
        names = [os.fspath(folder) for folder in positives + negatives]
        dataset.queries.append(item)
        dataset.labels.append([os.fspath(folder) for folder in positives])
        dataset.candidates.append(names)
        for name in names:
            if name not in dataset.corpus:
                dataset.add_candidates([name], [(MOMENTSEEKER_TARGET_INSTRUCTION, None,
                                                 reader.frames(Path(name), sample=False))])
    if missing_images:
        raise FileNotFoundError(f"MMEB-V2 task {task.name!r}: {len(missing_images)} query image(s) missing (first: "
                                f"{missing_images[0]}). {_frames_hint(task, paths)}")
    return dataset


def qrels_mapping(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``load_qrels_mapping`` of ``src/utils/dataset_utils.py``: query id -> {corpus id: grade}, keeping grades above 0
    and the highest grade of a repeated pair, in file order (ids as strings).

    >>> qrels_mapping([{"query-id": 1, "corpus-id": "a", "score": 1}, {"query-id": 1, "corpus-id": "a", "score": 2},
    ...                {"query-id": 1, "corpus-id": "b", "score": 0}])
    {'1': {'a': 2}}
    """
    mapping: dict[str, dict[str, float]] = {}
    for row in rows:
        if row["score"] > 0:
            grades = mapping.setdefault(str(row["query-id"]), {})
            corpus_id = str(row["corpus-id"])
            grades[corpus_id] = max(grades.get(corpus_id, 0), row["score"])
    return mapping


def _write_pages(task: MMEBV2Task, paths: MMEBV2Paths, folder: Path, needed: set[str]) -> int:
    """Write the pages of ``needed`` corpus ids from the corpus files to ``folder`` (as VLM2Vec's ``corpus_prepare``:
    the decoded image saved under its page name, the format following the extension). Returns how many."""
    from PIL import Image

    repo, _, split = task.hub
    files = annotation_files(hub_folder(paths.annotation_root, repo), "corpus", split)
    written = 0
    folder.mkdir(parents=True, exist_ok=True)
    for path in files:
        for row in _iter_table(path, ["corpus-id", "image"]):
            corpus_id = str(row["corpus-id"])
            if corpus_id not in needed:
                continue
            image = row["image"]
            data = image.get("bytes") if isinstance(image, dict) else image
            if not data and isinstance(image, dict) and image.get("path"):
                data = (hub_folder(paths.annotation_root, repo) / image["path"]).read_bytes()
            if not data:
                raise ValueError(f"MMEB-V2 task {task.name!r}: corpus page {corpus_id!r} has no image bytes in {path}.")
            target = folder / page_file_name(task, corpus_id)
            picture = Image.open(io.BytesIO(data))
            if target.suffix.lower() in (".jpg", ".jpeg") and picture.mode not in ("RGB", "L"):
                picture = picture.convert("RGB")
            temporary = target.with_name(target.name + ".part")
            picture.save(temporary, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"))
            os.replace(temporary, target)
            needed.discard(corpus_id)
            written += 1
    return written


def _load_visdoc(task, paths, max_rows) -> MMEBV2Dataset:
    """``vidore_dataset.py`` / ``visrag_dataset.py``: BEIR ``queries`` / ``qrels`` / ``corpus``; a text query
    against every page of the corpus (``global``), graded by the qrels. The candidates are the qrels' pages of each
    query in order, then the rest of the corpus (``generate_cand_dataset``). VLM2Vec fails on a query without a
    positive qrel; such queries are skipped here (and counted in ``source``).

    With ``max_rows`` (a smoke test) only the first queries are read, and the corpus is cut to their pages and the
    first ``max_rows`` others."""
    queries = read_annotations(task, paths.annotation_root, "queries", columns=None)
    _require(task, queries, ["query-id", "query"])
    qrels = qrels_mapping(read_annotations(task, paths.annotation_root, "qrels", columns=["query-id", "corpus-id",
                                                                                          "score"]))
    corpus_ids = [str(row["corpus-id"]) for row in read_annotations(task, paths.annotation_root, "corpus",
                                                                     columns=["corpus-id"])]
    queries = _first(queries, max_rows)
    dataset = MMEBV2Dataset(task, rel_scores=[])
    skipped = 0
    for row in queries:
        grades = qrels.get(str(row["query-id"]))
        if not grades:
            skipped += 1
            continue
        dataset.queries.append((join_instruction(VISDOC_QUERY_INSTRUCTION, row["query"]), None, None))
        dataset.labels.append(list(grades))
        dataset.rel_scores.append([float(grade) for grade in grades.values()])
        dataset.add_candidates(list(grades), [None] * len(grades))
    extra = [corpus_id for corpus_id in corpus_ids if corpus_id not in dataset.corpus]
    dataset.add_candidates(extra[:max_rows] if max_rows is not None else extra, [None] * len(extra))
    unknown = [name for name in dataset.corpus if name not in set(corpus_ids)]
    # Pages: the data root's folder (where VLM2Vec writes them), else pages_dir; missing ones are written.
    in_root = paths.root / task.pages
    folder = in_root
    if paths.pages_dir is not None and not all((in_root / page_file_name(task, name)).is_file()
                                               for name in dataset.corpus):
        folder = paths.pages_dir / Path(task.pages).name
    needed = {name for name in dataset.corpus if not (folder / page_file_name(task, name)).is_file()}
    written = _write_pages(task, paths, folder, set(needed)) if needed else 0
    missing = [name for name in dataset.corpus if not (folder / page_file_name(task, name)).is_file()]
    if missing:
        why = "; the qrels name it but the corpus does not" if missing[0] in unknown else ""
        repo_folder = hub_folder(paths.annotation_root, task.hub[0])
        raise FileNotFoundError(
            f"MMEB-V2 task {task.name!r}: {len(missing)} page(s) are neither in {folder} nor in the corpus of "
            f"{task.hub[0]} (first: {missing[0]!r}{why}). Download the repo again with "
            f"{download_hint(task.hub[0], repo_folder)}.")
    for name in dataset.corpus:
        dataset.corpus[name] = (VISDOC_TARGET_INSTRUCTION, os.fspath(folder / page_file_name(task, name)), None)
    dataset.source.update({"pages": os.fspath(folder), "pages_written": written, "queries_without_qrels": skipped,
                           "corpus": len(dataset.corpus)})
    return dataset


def load_mmeb_v2_task(task: MMEBV2Task | str, paths: MMEBV2Paths, max_rows: int | None = None) -> MMEBV2Dataset:
    """Read one task from its local copy (see the module docstring) and check that every frame and page is there.

    Raises:
        FileNotFoundError: a folder or file is missing; the message names the task, what was expected and how to get
            it.
        ValueError: an annotation file lacks a column or is a Git LFS pointer.
    """
    task = MMEB_V2_TASKS[task] if isinstance(task, str) else task
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (or None for every row), got {max_rows}.")
    if task.modality == "image":
        try:
            ((dataset, image_root),) = prepare_mmeb([task.name], paths.image_tasks_root, paths.image_root, max_rows)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"MMEB-V2 image task {task.name!r} (read as MMEB-V1 by evaluation.mmeb from {paths.image_tasks_root}"
                f", images from {paths.image_root or 'the clone'}): {error}") from error
        return MMEBV2Dataset(task, mmeb=(dataset, image_root),
                             source={"rows": os.fspath(paths.image_tasks_root), "images": image_root})
    if task.modality == "visdoc":
        dataset = _load_visdoc(task, paths, max_rows)
    else:
        reader = _FrameReader(task, paths)
        limit = _row_limit(task, max_rows)
        if task.parser == "mvbench":
            rows = []
            for subset in MVBENCH_SUBSETS:  # load_hf_dataset_multiple_subset: one config per subset, concatenated
                rows += [{**row, "subset": subset} for row in read_annotations(task, paths.annotation_root, subset)]
        else:
            rows = read_annotations(task, paths.annotation_root)
        rows = _first(rows, limit)
        loader = {"video_classification": _load_video_classification, "ssv2": _load_video_classification,
                  "moment_retrieval": _load_moment_retrieval, "momentseeker": _load_momentseeker}.get(task.parser)
        if loader is None:
            loader = _load_video_retrieval if task.category == "RET" else _load_video_qa
        dataset = loader(task, paths, rows, reader)
        reader.check()
        dataset.source.update({"frames": os.fspath(reader.base), "num_frames": paths.num_frames})
    dataset.source["annotations"] = os.fspath(hub_folder(paths.annotation_root, task.hub[0]))
    dataset.source["rows"] = len(dataset.queries)
    return dataset


def prepare_mmeb_v2(
    tasks: str | Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    annotation_root: str | os.PathLike | None = None,
    image_tasks_root: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    pages_dir: str | os.PathLike | None = None,
    num_frames: int | None = 8,
    max_rows: int | None = None,
) -> list[MMEBV2Dataset]:
    """Load and check every requested task (`select_tasks`) before anything is embedded, so that missing data fails
    in seconds; visual-document pages are written here (once). Arguments: see the module docstring and
    `MMEBV2Paths`; ``max_rows``: only the first N rows of each task (a smoke test)."""
    if root is None:
        raise ValueError(f"MMEB-V2 needs root: a clone of {MMEB_V2_HUB_ID} with its frame archives unpacked (README, "
                         "MMEB-V2).")
    paths = MMEBV2Paths.make(root, annotation_root, image_tasks_root, image_root, pages_dir, num_frames)
    return [load_mmeb_v2_task(task, paths, max_rows) for task in select_tasks(tasks)]


# ------------------------------------------------------------------------------------------------ scoring


def rank_scores(scores: np.ndarray, tie_rule: str = "numpy", relevant: np.ndarray | None = None) -> np.ndarray:
    """Candidate indices best first, per row of ``scores`` (1-D or 2-D), under a `TIE_RULES` rule. ``"numpy"`` is
    VLM2Vec's ``np.argsort(-scores)``; ``"strict"`` needs ``relevant`` (same shape, True for a label).

    >>> rank_scores(np.array([0.5, 0.9, 0.5], dtype=np.float32), "stable").tolist()
    [1, 0, 2]
    >>> rank_scores(np.array([0.5, 0.9, 0.5]), "strict", np.array([True, False, False])).tolist()
    [1, 2, 0]
    """
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule={tie_rule!r}: use one of {', '.join(TIE_RULES)}.")
    if tie_rule == "numpy":
        return np.argsort(-scores, axis=-1)
    if tie_rule == "stable":
        return np.argsort(-scores, axis=-1, kind="stable")
    if relevant is None:
        raise ValueError("tie_rule='strict' needs the relevant candidates.")
    return np.lexsort((relevant.astype(np.int8), -scores), axis=-1)


def hit_at_k(prediction: Sequence[str], labels: Iterable[str], k: int) -> float:
    """``RankingMetrics.hit_at_k``: 1.0 when any label is among the first ``k`` predictions; 0.0 without labels."""
    labels = set(labels)
    if not labels or k <= 0:
        return 0.0
    return 1.0 if labels.intersection(prediction[:k]) else 0.0


def ndcg_linear_at_k(prediction: Sequence[str], labels: Sequence[str], k: int,
                     rel_scores: Sequence[float] | None = None) -> float:
    """``RankingMetrics.ndcg_at_k(form="linear")``: DCG of the first ``k`` predictions, gain ``rel / log2(rank + 1)``
    (rank 1-based; ``rel`` the label's grade, 0 for anything else; 1 for every label when ``rel_scores`` is None),
    over the DCG of the grades sorted best first (the first ``k``); 0.0 when that is 0.

    VLM2Vec's ``evaluate`` calls ``list(set(labels))`` before pairing the labels with ``rel_scores`` (still in file
    order), so where a query's grades differ its pairing follows the set's order (for string ids, Python's hash seed);
    here each label keeps its own grade. The two agree whenever a query's grades are all equal.

    >>> round(ndcg_linear_at_k(["c", "a", "b"], ["a", "b"], 5, [2, 1]), 4)
    0.6697
    """
    if rel_scores is None:
        grades = dict.fromkeys(labels, 1.0)
        ideal = [1.0] * min(len(grades), k)
    else:
        if len(rel_scores) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(rel_scores)} rel_scores.")
        grades = dict(zip(labels, rel_scores))
        ideal = sorted(grades.values(), reverse=True)[:k]
    dcg = sum(grades.get(name, 0) / math.log2(rank + 2) for rank, name in enumerate(prediction[:k]))
    idcg = sum(grade / math.log2(rank + 2) for rank, grade in enumerate(ideal)) if ideal else 1.0
    return dcg / idcg if idcg > 0 else 0.0


def ranking_metrics(predictions: Sequence[Sequence[str]], labels: Sequence[Sequence[str]],
                    rel_scores: Sequence[Sequence[float]] | None = None, ks: Sequence[int] = METRIC_KS
                    ) -> dict[str, float]:
    """Mean hit@k and ndcg_linear@k over queries (fractions, the keys of VLM2Vec's ``<task>_score.json``)."""
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"hit@{k}"] = float(np.mean([hit_at_k(p, l, k) for p, l in zip(predictions, labels)])) \
            if predictions else 0.0
        metrics[f"ndcg_linear@{k}"] = float(np.mean([
            ndcg_linear_at_k(p, l, k, None if rel_scores is None else rel_scores[index])
            for index, (p, l) in enumerate(zip(predictions, labels))])) if predictions else 0.0
    return metrics


def _tied_at_top(row_scores: np.ndarray, relevant: np.ndarray) -> bool:
    top = row_scores == row_scores.max()
    return bool(top.sum() > 1 and (top & relevant).any() and (top & ~relevant).any())


def score_task(dataset: MMEBV2Dataset, embeddings: np.ndarray, position: dict[MediaItem, int],
               tie_rule: str = "numpy", keep: int = 10, depth: int = 10) -> dict[str, Any]:
    """Rank and score one (non-image) task from the embeddings of its items (rows of ``embeddings``, found by
    ``position``). Returns ``{"metrics", "score" (main metric, %), "ties", "predictions", "rankings"}``; a prediction
    keeps the first ``keep`` candidate names, a ranking the first ``depth`` (at least the 10 the metrics read) of a
    global task, every candidate of a local one."""
    queries = embeddings[[position[item] for item in dataset.queries]]
    predictions: list[list[str]] = []
    ties = 0
    if dataset.candidates is None:  # global: every candidate of the task
        names = list(dataset.corpus)
        matrix = embeddings[[position[dataset.corpus[name]] for name in names]]
        scores = np.dot(queries, matrix.T)
        lookup = {name: index for index, name in enumerate(names)}
        relevant = np.zeros(scores.shape, dtype=bool)
        for row, labels in enumerate(dataset.labels):
            relevant[row, [lookup[label] for label in labels if label in lookup]] = True
        ranking = rank_scores(scores, tie_rule, relevant)
        predictions = [[names[index] for index in row[:max(keep, depth, max(METRIC_KS))]] for row in ranking]
        ties = sum(_tied_at_top(scores[row], relevant[row]) for row in range(len(scores))) if names else 0
    else:
        for query, names, labels in zip(queries, dataset.candidates, dataset.labels):
            matrix = embeddings[[position[dataset.corpus[name]] for name in names]]
            row_scores = np.dot(matrix, query)
            relevant = np.array([name in set(labels) for name in names], dtype=bool)
            ranking = rank_scores(row_scores, tie_rule, relevant)
            predictions.append([names[index] for index in ranking])
            ties += _tied_at_top(row_scores, relevant) if len(names) else 0
    scored = _scored_rankings(dataset, predictions, keep)
    return {**scored, "ties": int(ties), "rankings": predictions}


def _scored_rankings(dataset: MMEBV2Dataset, rankings: Sequence[Sequence[str]], keep: int = 10) -> dict[str, Any]:
    """``{"metrics", "score" (main metric, %), "predictions"}`` of each query's ranking (candidate names, best
    first); a prediction row keeps the first ``keep`` names, its labels, hit@1 and, with grades, NDCG@5."""
    metrics = ranking_metrics(rankings, dataset.labels, dataset.rel_scores)
    rows = []
    for row, (prediction, labels) in enumerate(zip(rankings, dataset.labels)):
        rows.append({"row": row, "prediction": list(prediction[:keep]), "labels": labels,
                     "hit@1": hit_at_k(prediction, labels, 1)})
        if dataset.rel_scores is not None:
            rows[-1]["rel_scores"] = dataset.rel_scores[row]
            rows[-1]["ndcg_linear@5"] = ndcg_linear_at_k(prediction, labels, 5, dataset.rel_scores[row])
    return {"metrics": metrics, "score": 100 * metrics[dataset.task.metric], "predictions": rows}


def reranks_task(dataset: MMEBV2Dataset) -> bool:
    """Whether the rerank stage can run on a task: the reranker takes texts and images, so a task with a video on
    either side (every video task) is left out; image and visual-document tasks are reranked."""
    return dataset.mmeb is not None or not any(
        item[2] is not None for item in (*dataset.queries, *dataset.corpus.values()))


def rerank_task(dataset: MMEBV2Dataset, rankings: Sequence[Sequence[str]], reranker: Any, top_k: int = 10,
                mode: str = "listwise", image_root: Any = None) -> dict[str, Any]:
    """The rerank stage on one scored (non-image) task: each query's first ``top_k`` candidates of the embedder's
    ranking, as embedded (text and image), re-ordered by ``reranker.rerank(query, candidates, mode=mode)``
    (`evaluation.rerank.rerank_head`: positions it leaves out keep the embedder's order), the rest after them; then
    the task's metrics on the new rankings. Returns ``{"metrics", "score", "predictions"}`` as `score_task`."""
    if not reranks_task(dataset):
        raise ValueError(f"MMEB-V2 task {dataset.task.name!r} has videos, which the reranker does not take.")
    reranked = []
    for row, (query, names) in enumerate(zip(dataset.queries, rankings)):
        candidates = [dataset.corpus[name][:2] for name in names]
        order = rerank_head(list(range(len(names))), query[:2], candidates, reranker, top_k, image_root, mode,
                            query_index=row)
        reranked.append([names[index] for index in order])
    return _scored_rankings(dataset, reranked)


# ------------------------------------------------------------------------------------------------ averages


def mmeb_v2_means(scores: dict[str, float]) -> tuple[dict[str, float], dict[str, list[str]]]:
    """The means of per-task scores: per category (``"Video/CLS"``), per modality (``"Video"``: the mean of its
    TASKS, as ``experiments/report_score_v2.py`` averages them) and ``"Overall"`` (the mean of all tasks). Returns
    (means, incomplete): a mean over only some of its tasks is listed in ``incomplete`` with the tasks it lacks.

    >>> means, incomplete = mmeb_v2_means({"K700": 40.0, "MVBench": 30.0, "MSR-VTT": 20.0})
    >>> means["Video/CLS"], means["Video"], incomplete["Video/CLS"][:2]
    (40.0, 30.0, ['Breakfast', 'HMDB51'])
    """
    unknown = sorted(set(scores) - set(MMEB_V2_TASKS))
    if unknown:
        raise ValueError(f"not MMEB-V2 tasks: {unknown}.")
    groups: dict[str, list[str]] = {}
    for modality in MODALITIES:
        title = MODALITY_TITLES[modality]
        for category, names in MMEB_V2_CATEGORIES[modality].items():
            groups[f"{title}/{category}"] = names
        groups[title] = [name for names in MMEB_V2_CATEGORIES[modality].values() for name in names]
    groups["Overall"] = MMEB_V2_TASK_NAMES
    means: dict[str, float] = {}
    incomplete: dict[str, list[str]] = {}
    for group, names in groups.items():
        present = [name for name in names if name in scores]
        if not present:
            continue
        means[group] = sum(scores[name] for name in present) / len(present)
        if len(present) < len(names):
            incomplete[group] = sorted(set(names) - set(present))
    return means, incomplete


# ------------------------------------------------------------------------------------------------ embedding


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class MMEBV2Result:
    """Per-task scores (main metric, %), every metric (fractions), predictions and the data read."""

    scores: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    ties: dict[str, int] = field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    reranked: "MMEBV2Result | None" = None
    not_reranked: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """``{"tasks", "means", "incomplete", "metrics", "ties", "settings"}`` (see `mmeb_v2_means`); after the rerank
        stage also ``"not_reranked"``: the tasks whose scores are the embedder's (videos)."""
        means, incomplete = mmeb_v2_means(self.scores)
        summary = {"tasks": dict(self.scores), "means": means, "incomplete": incomplete,
                   "metrics": dict(self.metrics), "ties": dict(self.ties), "settings": dict(self.settings)}
        if self.not_reranked:
            summary["not_reranked"] = list(self.not_reranked)
        return summary

    def stages(self) -> dict[str, dict[str, Any]]:
        """``{"embedder": summary}``, and ``"embedder + rerank"`` after a rerank stage (the layout of MMEB's)."""
        stages = {"embedder": self.summary()}
        if self.reranked is not None:
            stages["embedder + rerank"] = self.reranked.summary()
        return stages


def evaluate_mmeb_v2(
    model: Any,
    root: str | os.PathLike | None = None,
    tasks: str | Sequence[str] | None = None,
    *,
    annotation_root: str | os.PathLike | None = None,
    image_tasks_root: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    pages_dir: str | os.PathLike | None = None,
    num_frames: int | None = 8,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    state: Any = None,
    tie_rule: str = "numpy",
    image_tie_rule: str = "argmax",
    max_rows: int | None = None,
    prepared: Sequence[MMEBV2Dataset] | None = None,
    predictions_dir: str | os.PathLike | None = None,
    show_progress: bool | None = None,
    video_pixels: tuple[int | None, int | None] | str | None = "vlm2vec",
    reranker: Any = None,
    rerank_top_k: int = 10,
    rerank_mode: str = "listwise",
    rerank_match: str = "content",
) -> MMEBV2Result:
    """Evaluate an embedder on MMEB-V2 tasks (all 78 by default; names, modalities or ``modality/category``).

    Args:
        model: has ``encode(texts=, images=, videos=, image_root=, batch_size=)`` returning one (L2-normalised) row
            per input; ``videos=`` is needed by the video tasks only.
        root, annotation_root, image_tasks_root, image_root, pages_dir, num_frames: where the data is (see the module
            docstring); ``prepared``: the output of `prepare_mmeb_v2` instead.
        cache_dir: the embedding cache (``<cache_dir>/mmeb_v2``, image tasks ``<cache_dir>/mmeb``): a rerun or an
            interrupted run embeds only what is missing.
        state: an ``accelerate`` state: encoding is split over its processes.
        tie_rule: video and visdoc ranking ties (`TIE_RULES`, default VLM2Vec's ``"numpy"``); image_tie_rule: the
            image tasks' (`evaluation.mmeb.TIE_RULES`, default ``"argmax"``, VLM2Vec's V1 scorer).
        max_rows: the first N rows of every task (a smoke test; the numbers are then not MMEB-V2's).
        predictions_dir: when given, one JSON-lines file of predictions per task is written there.
        video_pixels: the frame pixel budget ``(min, max)`` set on the embedder's processor for the run
            (`video_protocol`): ``"vlm2vec"`` (default) is VLM2Vec-V2's, 4*28*28 to 1280*28*28 per frame, for
            Qwen2-VL and Qwen2.5-VL embedders (a Qwen3-VL processor keeps its own: VLM2Vec has no Qwen3-VL rule);
            None leaves the processor's settings.
        reranker, rerank_top_k, rerank_mode, rerank_match: the rerank stage (``result.reranked``): each query's first
            ``rerank_top_k`` candidates re-ordered by ``reranker.rerank`` (`rerank_task`; image tasks through
            `evaluation.mmeb.evaluate_task`, whose picks are judged by ``rerank_match``). The reranker takes no
            videos: a video task keeps the embedder's ranking in that stage, listed in
            ``result.reranked.not_reranked``, so both stages average the same tasks.
    """
    from tqdm.auto import tqdm

    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule={tie_rule!r}: use one of {', '.join(TIE_RULES)} "
                         f"({'; '.join(f'{name}: {meaning}' for name, meaning in TIE_RULES.items())}).")
    if prepared is None:
        prepared = prepare_mmeb_v2(tasks, root, annotation_root, image_tasks_root, image_root, pages_dir, num_frames,
                                   max_rows)
    result = MMEBV2Result(settings={"tie_rule": tie_rule, "image_tie_rule": image_tie_rule, "num_frames": num_frames,
                                    "vlm2vec_commit": VLM2VEC_COMMIT, "max_rows": max_rows})
    main = state is None or state.is_main_process
    progress = tqdm(prepared, desc="MMEB-V2", unit="task", disable=not main if show_progress is None
                    else not show_progress)
    if reranker is not None:
        if isinstance(rerank_top_k, bool) or not isinstance(rerank_top_k, int) or rerank_top_k < 1:
            raise ValueError(f"rerank_top_k must be a positive integer, got {rerank_top_k!r}.")
        result.reranked = MMEBV2Result(settings={**result.settings, "rerank_top_k": rerank_top_k,
                                                 "rerank_mode": rerank_mode, "rerank_match": rerank_match})
    stage = dict(reranker=reranker, rerank_top_k=rerank_top_k, rerank_mode=rerank_mode, rerank_match=rerank_match)
    with video_protocol(model, video_pixels, num_frames) as applied:
        result.settings["video"] = applied
        _evaluate_tasks(model, progress, result, batch_size, cache_dir, state, tie_rule, image_tie_rule, stage)
    if predictions_dir is not None and main:
        write_mmeb_v2_predictions(result, predictions_dir)
        if result.reranked is not None:
            write_mmeb_v2_predictions(result.reranked, Path(predictions_dir).parent / "mmeb_v2_rerank")
    return result


@contextlib.contextmanager
def video_protocol(model: Any, video_pixels: tuple[int | None, int | None] | str | None, num_frames: int | None):
    """The embedder's processor set, for the run, to take the harness's frames as they are (``video_num_frames``
    None, ``video_max_frames`` at least ``num_frames``) with the frame pixel budget ``video_pixels`` (see
    `evaluate_mmeb_v2`); everything is restored afterwards, also on an error. Yields the settings used (None for an
    embedder without a UniME-V2 processor)."""
    try:
        processor = model.processor
    except (AttributeError, ValueError):
        processor = None
    if processor is None or not hasattr(processor, "video_num_frames"):
        yield None
        return
    names = ("video_num_frames", "video_max_frames", "video_min_pixels", "video_max_pixels")
    saved = {name: getattr(processor, name) for name in names}
    changes: dict[str, Any] = {"video_num_frames": None,
                               "video_max_frames": max(processor.video_max_frames, num_frames or 0)}
    if video_pixels == "vlm2vec":
        if processor.backbone_type in ("qwen2_vl", "qwen2_5_vl"):
            changes["video_min_pixels"], changes["video_max_pixels"] = VLM2VEC_FRAME_PIXELS
    elif video_pixels is not None:
        changes["video_min_pixels"], changes["video_max_pixels"] = video_pixels
    try:
        for name, value in changes.items():
            setattr(processor, name, value)
        yield {name: getattr(processor, name) for name in names}
    finally:
        for name, value in saved.items():
            setattr(processor, name, value)


def _evaluate_tasks(model: Any, progress: Any, result: MMEBV2Result, batch_size: int, cache_dir: Any, state: Any,
                    tie_rule: str, image_tie_rule: str, stage: dict[str, Any]) -> None:
    reranked, reranker = result.reranked, stage["reranker"]
    for dataset in progress:
        task = dataset.task
        progress.set_postfix_str(task.name)
        result.data[task.name] = {**dataset.source, "eval_type": task.eval_type, "metric": task.metric}
        if dataset.mmeb is not None:
            mmeb_dataset, mmeb_image_root = dataset.mmeb
            outcome = evaluate_task(model, mmeb_dataset, mmeb_image_root, MMEBOptions(
                batch_size=batch_size, cache_dir=cache_dir, state=state, tie_rule=image_tie_rule,
                reranker=reranker, rerank_top_k=stage["rerank_top_k"], rerank_mode=stage["rerank_mode"],
                rerank_match=stage["rerank_match"]))
            result.scores[task.name] = outcome.score
            result.metrics[task.name] = {"hit@1": outcome.score / 100}
            result.ties[task.name] = outcome.ties
            result.predictions[task.name] = outcome.predictions
            if reranked is not None:
                reranked.scores[task.name] = outcome.reranked_score
                reranked.metrics[task.name] = {"hit@1": outcome.reranked_score / 100}
                reranked.predictions[task.name] = outcome.reranked_predictions
            continue
        items = list(dict.fromkeys([*dataset.queries, *dataset.corpus.values()]))
        cache = None if cache_dir is None else Path(cache_dir) / "mmeb_v2"
        vectors = embed_with_cache(model, items, None, batch_size, cache, state)
        vectors = torch.nn.functional.normalize(torch.as_tensor(vectors).float(), dim=-1).numpy()
        scored = score_task(dataset, vectors, {item: index for index, item in enumerate(items)}, tie_rule,
                            depth=stage["rerank_top_k"])
        result.scores[task.name] = scored["score"]
        result.metrics[task.name] = scored["metrics"]
        result.ties[task.name] = scored["ties"]
        result.predictions[task.name] = scored["predictions"]
        if reranked is None:
            continue
        if not reranks_task(dataset):
            # The two-stage system on a video task: the reranker takes no videos, so the embedder's ranking stands.
            reranked.not_reranked.append(task.name)
            reranked.scores[task.name] = scored["score"]
            reranked.metrics[task.name] = scored["metrics"]
            reranked.predictions[task.name] = scored["predictions"]
            continue
        again = rerank_task(dataset, scored["rankings"], reranker, stage["rerank_top_k"], stage["rerank_mode"])
        reranked.scores[task.name] = again["score"]
        reranked.metrics[task.name] = again["metrics"]
        reranked.predictions[task.name] = again["predictions"]


def write_mmeb_v2_predictions(result: MMEBV2Result, folder: str | os.PathLike) -> None:
    """One JSON-lines file of predictions per task (``<task>.jsonl``) and ``scores.json`` (every metric)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in result.predictions.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "scores.json").write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ label lists

VIDEO_CLS_LABELS = {
    # The candidates of the global video-classification tasks, "|"-separated in VLM2Vec's order:
    # VIDEOCLS_LABEL_MAPPING of src/data/eval_dataset/video_classification_utils.py (SmthSmthV2 is local).
    "K700": (
        'waiting_in_line|fly_tying|breakdancing|coloring_in|counting_money|whistling|parkour|playing_keyboard|lay'
        'ing_tiles|flint_knapping|raising_eyebrows|base_jumping|playing_lute|brushing_floor|weaving_fabric|dining'
        '|dyeing_hair|archery|luge|sword_swallowing|clapping|arranging_flowers|sucking_lolly|writing|watering_pla'
        'nts|playing_piano|packing|lawn_mower_racing|yarn_spinning|carrying_baby|riding_mule|hugging_baby|tasting'
        '_food|massaging_back|cooking_scallops|planting_trees|playing_trombone|triple_jump|unloading_truck|climbi'
        'ng_a_rope|polishing_furniture|shearing_sheep|photobombing|stretching_leg|using_a_microscope|docking_boat'
        '|visiting_the_zoo|tiptoeing|headbutting|throwing_axe|needle_felting|mosh_pit_dancing|cooking_sausages_(n'
        'ot_on_barbeque)|tobogganing|making_a_sandwich|plastering|shaking_hands|playing_trumpet|assembling_bicycl'
        'e|playing_road_hockey|playing_clarinet|applauding|cumbia|playing_pan_pipes|passing_American_football_(no'
        't_in_game)|cartwheeling|ironing|massaging_legs|ironing_hair|playing_saxophone|blowing_out_candles|wrestl'
        'ing|putting_on_shoes|ripping_paper|decorating_the_christmas_tree|sipping_cup|milking_goat|playing_mahjon'
        'g|pull_ups|canoeing_or_kayaking|attending_conference|shouting|playing_marbles|playing_didgeridoo|brushin'
        'g_hair|leatherworking|walking_on_stilts|saluting|twiddling_fingers|walking_through_snow|sticking_tongue_'
        'out|tango_dancing|playing_nose_flute|welding|stomping_grapes|kicking_field_goal|playing_polo|eating_wate'
        'rmelon|folding_napkins|coughing|assembling_computer|driving_car|bulldozing|blending_fruit|applying_cream'
        '|petting_cat|riding_scooter|winking|tasting_beer|high_jump|sign_language_interpreting|hugging_(not_baby)'
        '|playing_cricket|bouncing_on_bouncy_castle|cleaning_gutters|riding_or_walking_with_horse|being_in_zero_g'
        'ravity|snowmobiling|playing_flute|gold_panning|belly_dancing|push_up|making_pizza|fixing_hair|preparing_'
        'salad|cutting_orange|pumping_fist|getting_a_tattoo|crawling_baby|dribbling_basketball|playing_american_f'
        'ootball|playing_maracas|running_on_treadmill|springboard_diving|pushing_car|building_sandcastle|pouring_'
        'milk|square_dancing|hitting_baseball|sneezing|eating_chips|tackling|bench_pressing|doing_sudoku|windsurf'
        'ing|throwing_snowballs|punching_person_(boxing)|rope_pushdown|capsizing|making_sushi|bowling|tagging_gra'
        'ffiti|folding_paper|parasailing|silent_disco|calculating|eating_spaghetti|singing|flipping_bottle|rock_s'
        'cissors_paper|faceplanting|tasting_wine|laying_bricks|poking_bellybutton|chiseling_stone|skiing_crosscou'
        'ntry|playing_ocarina|lock_picking|crocheting|waxing_chest|building_lego|tying_knot_(not_on_a_tie)|unboxi'
        'ng|entering_church|filling_eyebrows|gospel_singing_in_church|playing_cymbals|breaking_boards|pole_vault|'
        'eating_hotdog|spelunking|throwing_discus|playing_billiards|hurdling|making_balloon_shapes|answering_ques'
        'tions|eating_cake|busking|bee_keeping|watching_tv|bookbinding|moving_baby|riding_unicycle|opening_wine_b'
        'ottle|barbequing|blowing_glass|dancing_charleston|cleaning_toilet|card_throwing|opening_door|playing_ice'
        '_hockey|using_atm|filling_cake|dumpster_diving|pulling_espresso_shot|frying_vegetables|laughing|jetskiin'
        'g|krumping|brushing_teeth|playing_beer_pong|making_jewelry|jumping_jacks|squeezing_orange|playing_blackj'
        'ack|digging|playing_checkers|inflating_balloons|deadlifting|peeling_potatoes|walking_with_crutches|arm_w'
        'restling|opening_refrigerator|slicing_onion|staring|arguing|playing_field_hockey|mountain_climber_(exerc'
        'ise)|roasting_marshmallows|cheerleading|delivering_mail|throwing_water_balloon|shining_shoes|putting_on_'
        'sari|weaving_basket|rolling_pastry|threading_needle|drop_kicking|side_kick|presenting_weather_forecast|p'
        'laying_slot_machine|kissing|decoupage|shuffling_feet|making_slime|playing_darts|ice_fishing|person_colle'
        'cting_garbage|scuba_diving|making_paper_aeroplanes|celebrating|riding_snow_blower|directing_traffic|mass'
        'aging_feet|somersaulting|snowboarding|golf_chipping|cracking_knuckles|feeding_fish|dodgeball|squat|groom'
        'ing_dog|putting_in_contact_lenses|playing_paintball|skydiving|javelin_throw|treating_wood|playing_shuffl'
        'eboard|setting_table|situp|playing_recorder|cleaning_windows|vacuuming_car|playing_volleyball|hula_hoopi'
        'ng|smoking_hookah|catching_or_throwing_baseball|repairing_puncture|shot_put|dancing_macarena|holding_sna'
        'ke|throwing_knife|biking_through_snow|using_inhaler|sled_dog_racing|playing_gong|tying_necktie|making_th'
        'e_bed|pouring_wine|high_fiving|doing_nails|ice_skating|rock_climbing|snowkiting|getting_a_piercing|makin'
        'g_tea|longboarding|blasting_sand|wood_burning_(art)|massaging_neck|swimming_breast_stroke|smoking_pipe|b'
        'ending_back|eating_nachos|flying_kite|surfing_crowd|tying_bow_tie|chopping_wood|changing_gear_in_car|tie'
        '_dying|cutting_watermelon|pretending_to_be_a_statue|playing_organ|sweeping_floor|playing_netball|jugglin'
        'g_balls|washing_hands|installing_carpet|knitting|carrying_weight|waxing_armpits|breaking_glass|battle_ro'
        "pe_training|trapezing|swimming_with_sharks|massaging_person's_head|shredding_paper|cooking_on_campfire|p"
        'laying_harmonica|mowing_lawn|golf_putting|washing_feet|swimming_front_crawl|washing_hair|playing_cards|d'
        'ealing_cards|slacklining|wading_through_water|eating_carrots|lighting_fire|changing_oil|backflip_(human)'
        '|cleaning_shoes|pushing_cart|long_jump|rolling_eyes|eating_ice_cream|trimming_shrubs|pouring_beer|buildi'
        'ng_shed|texting|playing_with_trains|skipping_stone|training_dog|hurling_(sport)|braiding_hair|laying_dec'
        'king|using_remote_controller_(not_gaming)|closing_door|surveying|adjusting_glasses|headbanging|playing_b'
        'ass_guitar|swimming_butterfly_stroke|auctioning|separating_eggs|tap_dancing|geocaching|passing_American_'
        'football_(in_game)|doing_jigsaw_puzzle|playing_harp|playing_oboe|jaywalking|chiseling_wood|drawing|pushi'
        'ng_wheelchair|snatch_weight_lifting|calligraphy|extinguishing_fire|pinching|metal_detecting|lunge|shoot_'
        'dance|bobsledding|arresting|carving_pumpkin|reading_newspaper|laying_concrete|fidgeting|mushroom_foragin'
        'g|cutting_apple|yawning|crossing_river|shaving_head|stacking_dice|playing_squash_or_racquetball|blowing_'
        'leaves|folding_clothes|shooting_basketball|hoverboarding|spinning_poi|bending_metal|making_horseshoes|pl'
        'aying_bagpipes|eating_doughnuts|fixing_bicycle|punching_bag|playing_rubiks_cube|spinning_plates|playing_'
        'xylophone|waving_hand|playing_hand_clapping_games|laying_stone|putting_wallpaper_on_wall|skateboarding|s'
        'crambling_eggs|pumping_gas|hopscotch|bodysurfing|jumpstyle_dancing|paragliding|playing_kickball|sanding_'
        'wood|taking_photo|using_a_sledge_hammer|eating_burger|disc_golfing|sausage_making|playing_guitar|motorcy'
        'cling|talking_on_cell_phone|riding_elephant|country_line_dancing|making_cheese|popping_balloons|using_ci'
        'rcular_saw|shining_flashlight|grinding_meat|clean_and_jerk|playing_ping_pong|uncorking_champagne|playing'
        '_basketball|playing_piccolo|cutting_pineapple|milking_cow|shuffling_cards|hand_washing_clothes|water_sli'
        'ding|yoga|sawing_wood|exercising_with_an_exercise_ball|egg_hunting|ice_climbing|jumping_sofa|planing_woo'
        'd|bungee_jumping|building_cabinet|drumming_fingers|sleeping|curling_(sport)|baby_waking_up|chasing|conta'
        'ct_juggling|grooming_cat|doing_laundry|cosplaying|polishing_metal|lighting_candle|bottling|embroidering|'
        'feeding_goats|moving_furniture|playing_monopoly|peeling_banana|slapping|climbing_tree|golf_driving|archa'
        'eological_excavation|hammer_throw|opening_present|recording_music|steering_car|scrapbooking|sword_fighti'
        'ng|playing_ukulele|opening_bottle_(not_wine)|playing_laser_tag|playing_violin|mixing_colours|skiing_mono'
        '|clam_digging|cracking_neck|bouncing_ball_(not_juggling)|trimming_or_shaving_beard|combing_hair|trimming'
        '_trees|exercising_arm|capoeira|crying|air_drumming|playing_dominoes|reading_book|historical_reenactment|'
        'throwing_ball_(not_baseball_or_American_football)|shooting_off_fireworks|dunking_basketball|making_a_cak'
        'e|chewing_gum|front_raises|herding_cattle|grooming_horse|tickling|karaoke|stacking_cups|riding_mechanica'
        'l_bull|catching_or_throwing_softball|looking_in_mirror|cooking_chicken|licking|washing_dishes|spray_pain'
        'ting|cutting_cake|making_latte_art|sharpening_knives|dyeing_eyebrows|putting_on_mascara|stretching_arm|f'
        'lipping_pancake|using_bagging_machine|huddling|breathing_fire|dancing_ballet|gymnastics_tumbling|bartend'
        'ing|diving_cliff|land_sailing|opening_coconuts|playing_scrabble|being_excited|shaping_bread_dough|using_'
        'puppets|smelling_feet|home_roasting_coffee|drooling|tapping_pen|putting_on_foundation|picking_apples|sma'
        'shing|making_bubbles|finger_snapping|tapping_guitar|wrapping_present|spraying|playing_pinball|swing_danc'
        'ing|tying_shoe_laces|cleaning_pool|tossing_salad|head_stand|playing_accordion|vacuuming_floor|waxing_bac'
        'k|marching|roasting_pig|falling_off_bike|lifting_hat|fencing_(sport)|alligator_wrestling|juggling_fire|s'
        'urfing_water|petting_horse|jumping_bicycle|tai_chi|waxing_eyebrows|wading_through_mud|steer_roping|using'
        '_segway|throwing_tantrum|baking_cookies|high_kick|using_megaphone|water_skiing|zumba|moon_walking|sailin'
        'g|shooting_goal_(soccer)|swinging_on_something|driving_tractor|putting_on_eyeliner|shopping|mopping_floo'
        'r|waking_up|helmet_diving|making_snowman|waxing_legs|playing_badminton|jogging|swimming_backstroke|beatb'
        'oxing|cracking_back|sieving|riding_a_bike|playing_rounders|shaving_legs|pirouetting|shucking_oysters|pee'
        'ling_apples|letting_go_of_balloon|sanding_floor|playing_cello|snorkeling|cooking_egg|kitesurfing|shoveli'
        'ng_snow|tossing_coin|acting_in_play|catching_or_throwing_frisbee|using_a_power_drill|standing_on_hands|s'
        'ki_jumping|seasoning_food|carving_wood_with_a_knife|jumping_into_pool|checking_tires|getting_a_haircut|f'
        'eeding_birds|marriage_proposal|casting_fishing_line|skiing_slalom|blowdrying_hair|carving_ice|picking_bl'
        'ueberries|giving_or_receiving_award|chopping_meat|playing_controller|pushing_wheelbarrow|abseiling|ski_b'
        'allet|gargling|contorting|playing_drums|robot_dancing|listening_with_headphones|moving_child|climbing_la'
        'dder|shaking_head|smoking|burping|curling_hair|sewing|petting_animal_(not_cat)|breading_or_breadcrumbing'
        '|falling_off_chair|poaching_eggs|testifying|hockey_stop|salsa_dancing|photocopying|changing_wheel_(not_o'
        'n_bike)|doing_aerobics|passing_soccer_ball|putting_on_lipstick|riding_camel|carving_marble|drinking_shot'
        's|sharpening_pencil|checking_watch|catching_fish|looking_at_phone|skipping_rope|tightrope_walking|playin'
        'g_chess|bouncing_on_trampoline|walking_the_dog|bathing_dog|using_a_paint_roller|kicking_soccer_ball|swim'
        'ming_with_dolphins|ice_swimming|blowing_nose|dancing_gangnam_style|card_stacking|playing_tennis|blowing_'
        'bubble_gum|brush_painting|cutting_nails|pulling_rope_(game)|crossing_eyes|juggling_soccer_ball|splashing'
        '_water|news_anchoring|curling_eyelashes|roller_skating|swinging_baseball_bat|pillow_fight|bandaging|usin'
        'g_a_wrench|scrubbing_face|playing_poker|clay_pottery_making'
    ),
    "UCF101": (
        'Kayaking|PlayingDaf|BoxingSpeedBag|GolfSwing|Diving|PlayingFlute|TrampolineJumping|BabyCrawling|Drumming'
        '|RockClimbingIndoor|Biking|MoppingFloor|Haircut|SalsaSpin|PlayingPiano|HandstandWalking|Billiards|Nunchu'
        'cks|SoccerJuggling|VolleyballSpiking|Skijet|LongJump|UnevenBars|ApplyEyeMakeup|SoccerPenalty|BandMarchin'
        'g|BlowingCandles|PizzaTossing|ApplyLipstick|HandstandPushups|CricketShot|FrisbeeCatch|PushUps|FieldHocke'
        'yPenalty|ThrowDiscus|PlayingGuitar|JugglingBalls|HorseRiding|PlayingViolin|JumpingJack|PoleVault|BoxingP'
        'unchingBag|FloorGymnastics|RopeClimbing|JumpRope|ParallelBars|BodyWeightSquats|HorseRace|BasketballDunk|'
        'BlowDryHair|SkyDiving|BalanceBeam|IceDancing|SumoWrestling|Bowling|TennisSwing|MilitaryParade|Lunges|Swi'
        'ng|HighJump|StillRings|Skiing|HeadMassage|JavelinThrow|HammerThrow|Hammering|BaseballPitch|Shotput|Baske'
        'tball|PommelHorse|Punch|TableTennisShot|SkateBoarding|Typing|Rafting|WritingOnBoard|PlayingSitar|Archery'
        '|PlayingTabla|TaiChi|BreastStroke|ShavingBeard|CricketBowling|Rowing|CliffDiving|CleanAndJerk|PullUps|Pl'
        'ayingDhol|YoYo|FrontCrawl|WallPushups|WalkingWithDog|Knitting|Mixing|HulaHoop|BrushingTeeth|Surfing|Play'
        'ingCello|BenchPress|CuttingInKitchen|Fencing'
    ),
    "HMDB51": (
        'ride_bike|wave|dive|pour|smile|eat|shoot_ball|clap|chew|brush_hair|pushup|draw_sword|pullup|catch|somers'
        'ault|sit|hug|kick_ball|golf|cartwheel|turn|kick|dribble|jump|sword_exercise|drink|shoot_gun|hit|ride_hor'
        'se|smoke|fencing|climb|situp|handstand|talk|kiss|push|shake_hands|swing_baseball|stand|flic_flac|sword|r'
        'un|laugh|walk|throw|punch|climb_stairs|pick|shoot_bow|fall_floor'
    ),
    "Breakfast": (
        'pancake|cereal|sandwich|scrambledegg|friedegg|coffee|milk|tea|juice|salad'
    ),
}


__all__ = [
    "FRAME_EXTENSIONS",
    "MediaItem",
    "METRIC_KS",
    "MMEB_V2_CATEGORIES",
    "MMEB_V2_HUB_ID",
    "MMEB_V2_TASKS",
    "MMEB_V2_TASK_NAMES",
    "MODALITIES",
    "MODALITY_METRIC",
    "MODALITY_TITLES",
    "PUBLISHED_MMEB_V2",
    "TIE_RULES",
    "VIDEO_CLS_LABELS",
    "VLM2VEC_COMMIT",
    "MMEBV2Dataset",
    "MMEBV2Paths",
    "MMEBV2Result",
    "MMEBV2Task",
    "annotation_files",
    "annotation_repos",
    "evaluate_mmeb_v2",
    "hit_at_k",
    "join_instruction",
    "list_frames",
    "load_mmeb_v2_task",
    "mmeb_v2_means",
    "multiple_choice",
    "ndcg_linear_at_k",
    "option_text",
    "page_file_name",
    "prepare_mmeb_v2",
    "qrels_mapping",
    "rank_scores",
    "ranking_metrics",
    "read_annotations",
    "sample_frames",
    "score_task",
    "select_tasks",
    "visrag_page_name",
    "write_mmeb_v2_predictions",
    "rerank_task",
    "reranks_task",
]
