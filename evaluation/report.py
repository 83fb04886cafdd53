"""The evaluation report: markdown tables in the layout of the paper's (MMEB, MMEB-V2, zero-shot retrieval,
SugarCrepe), with the published numbers beside ours where they are known."""

from __future__ import annotations

from typing import Any

from .mmeb import MMEB_CATEGORIES, PUBLISHED_MMEB, RERANK_MATCH_RULES, TIE_RULES
from .mmeb_v2 import (
    MMEB_V2_CATEGORIES,
    MMEB_V2_TASKS,
    MODALITIES,
    MODALITY_METRIC,
    MODALITY_TITLES,
    PUBLISHED_MMEB_V2,
)
from .mmeb_v2 import TIE_RULES as MMEB_V2_TIE_RULES

MMEB_COLUMNS = [*MMEB_CATEGORIES, "IND", "OOD", "Overall"]
RETRIEVAL_TITLES = {"flickr30k": "Flickr30K", "coco": "COCO 5K", "sharegpt4v": "ShareGPT4V", "urban1k": "Urban1K"}

# arXiv 2510.13515: UniME-V2 (Qwen2-VL-2B) zero-shot R@1 under the paper's own column labels (Table 2), and
# SugarCrepe. The paper's "qi->ct" / "qt->ci" labels are most likely swapped (see RETRIEVAL_COLUMN_NOTE).
PUBLISHED_ZERO_SHOT: dict[str, dict[str, Any]] = {
    "TianchengGu/UniME-V2-Qwen2VL-2B": {
        "flickr30k": {"qi->ct": 79.8, "qt->ci": 89.9},
        "coco": {"qi->ct": 53.7, "qt->ci": 65.1},
        "sharegpt4v": {"qi->ct": 91.6, "qt->ci": 94.2},
        "urban1k": {"qi->ct": 95.6, "qt->ci": 92.2},
        "sugarcrepe": {"Replace": 70.9, "Swap": 51.2, "Add": 70.2},
    },
}
PAPER_COLUMN_FOR = {"image_to_text": "qt->ci", "text_to_image": "qi->ct"}
"""Which of the paper's Table 2 columns is printed beside each of our directions (the labels are taken as swapped)."""
RETRIEVAL_COLUMN_NOTE = (
    "The paper's Table 2 labels its columns qi->ct and qt->ci, but the authors' script prints text->image "
    "recall under the label \"Image->Text\", and with 5 captions per image image->text R@1 is normally the higher one "
    "(their Flickr30K / COCO rows read qi->ct 79.8 / 53.7, qt->ci 89.9 / 65.1). The labels are therefore most likely "
    "swapped (inferred, not confirmed by the authors): the paper's \"qt->ci\" value is printed beside our image->text "
    "and its \"qi->ct\" value beside our text->image. Our columns are labelled by what they measure."
)

RETRIEVAL_SETS = tuple(RETRIEVAL_TITLES)


def mmeb_table(results: dict[str, dict[str, Any]], model_name: str) -> str:
    """Markdown in the layout of the paper's MMEB table: categories, IND, OOD, overall; a published row when known;
    then the tie rule and one row per dataset."""
    lines = ["| model | " + " | ".join(MMEB_COLUMNS) + " |", "|---" * (len(MMEB_COLUMNS) + 1) + "|"]
    for label, summary in results.items():
        means = summary["means"]
        cells = [f"{means[column]:.1f}" + ("*" if column in summary["incomplete"] else "") if column in means else "-"
                 for column in MMEB_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    published = PUBLISHED_MMEB.get(model_name)
    if published:
        for label, value in published.items():
            cells = [f"{value:.1f}" if column == "Overall" else "" for column in MMEB_COLUMNS]
            lines.append(f"| paper: {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("\\* mean over the datasets that ran (incomplete: see results.json).")
    first = next(iter(results.values()))
    tie_rule = first.get("tie_rule", "argmax")
    ties = sum(first.get("ties", {}).values())
    lines.append(f"Ties: `{tie_rule}`, {TIE_RULES.get(tie_rule, tie_rule)}. {ties} quer{'y' if ties == 1 else 'ies'} "
                 "had another candidate tied with the positive for the top score.")
    rerank_match = next((summary["rerank_match"] for summary in results.values() if "rerank_match" in summary), None)
    if rerank_match is not None:
        lines.append(f"Rerank stage: `{rerank_match}`, {RERANK_MATCH_RULES.get(rerank_match, rerank_match)}.")
    per_dataset = ["", "| dataset | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    names = list(first["datasets"])
    per_dataset += [
        f"| {name} | " + " | ".join(f"{summary['datasets'][name]:.1f}" for summary in results.values()) + " |"
        for name in names
    ]
    return "\n".join(lines + per_dataset)


MMEB_V2_SHORT = {"Image/Classification": "I-CLS", "Image/VQA": "I-QA", "Image/Retrieval": "I-RET",
                 "Image/Visual Grounding": "I-VG", "Video/CLS": "V-CLS", "Video/QA": "V-QA", "Video/RET": "V-RET",
                 "Video/MRET": "V-MRET", "VisDoc/ViDoRe-V1": "VDRv1", "VisDoc/ViDoRe-V2": "VDRv2",
                 "VisDoc/VisRAG": "VR", "VisDoc/OOD": "OOD"}
"""The column titles of `mmeb_v2_table` (VLM2Vec-V2's table: I- image, V- video, VDR ViDoRe, VR VisRAG)."""
MMEB_V2_COLUMNS = [column for modality in MODALITIES for column in
                   [f"{MODALITY_TITLES[modality]}/{category}" for category in MMEB_V2_CATEGORIES[modality]]
                   + [MODALITY_TITLES[modality]]] + ["Overall"]


def mmeb_v2_table(stages: dict[str, dict[str, Any]], model_name: str) -> str:
    """Markdown in the layout of VLM2Vec-V2's table: per modality its categories and its overall score, then the
    overall score over all tasks, one row per stage (``embedder``, ``embedder + rerank``); the published row when
    known; then one row per task with each stage's score."""
    titles = [MMEB_V2_SHORT.get(column, column) for column in MMEB_V2_COLUMNS]
    lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for stage, summary in stages.items():
        means, incomplete = summary["means"], summary["incomplete"]
        lines.append(f"| {stage} | " + " | ".join(f"{means[column]:.1f}" + ("*" if column in incomplete else "")
                                                 if column in means else "-" for column in MMEB_V2_COLUMNS) + " |")
    for label, values in PUBLISHED_MMEB_V2.items():
        if label == model_name:
            lines.append(f"| paper: {label} | " + " | ".join(f"{values[column]:.1f}" if column in values else ""
                                                            for column in MMEB_V2_COLUMNS) + " |")
    embedder = stages["embedder"]
    settings = embedder.get("settings", {})
    tie_rule = settings.get("tie_rule", "numpy")
    ties = sum(embedder.get("ties", {}).values())
    lines += ["", "\\* mean over the tasks that ran (incomplete: see results.json). A modality's score is the mean of "
              "its tasks, Overall the mean of all tasks (VLM2Vec's experiments/report_score_v2.py).",
              f"Ties (video, visual documents): `{tie_rule}`, {MMEB_V2_TIE_RULES.get(tie_rule, tie_rule)}; image "
              f"tasks: `{settings.get('image_tie_rule', 'argmax')}`. {ties} quer{'y' if ties == 1 else 'ies'} had a "
              "relevant and an irrelevant candidate tied for the top score."]
    reranked = stages.get("embedder + rerank")
    if reranked is not None:
        rerank = reranked.get("settings", {})
        left_out = reranked.get("not_reranked", [])
        lines.append(f"Rerank stage: the first {rerank.get('rerank_top_k')} candidates re-ordered "
                     f"({rerank.get('rerank_mode')}; image-task picks judged by `{rerank.get('rerank_match')}`)"
                     + (f"; {len(left_out)} video task(s) keep the embedder's ranking (the reranker takes no "
                        "videos)." if left_out else "."))
    names = list(stages)
    lines += ["", "| task | modality | category | metric | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for name in embedder["tasks"]:
        task = MMEB_V2_TASKS[name]
        cells = [f"{stages[stage]['tasks'][name]:.1f}" if name in stages[stage]["tasks"] else "-" for stage in names]
        lines.append(f"| {name} | {MODALITY_TITLES[task.modality]} | {task.category} | "
                     f"{MODALITY_METRIC[task.modality]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def retrieval_table(results: dict[str, dict[str, Any]], model_name: str) -> str:
    """Markdown: R@1 image->text and text->image per set (labelled by what they measure), then R@5 / R@10; the
    paper's numbers beside ours with its columns taken as swapped (`RETRIEVAL_COLUMN_NOTE`, printed under the table)."""
    published = PUBLISHED_ZERO_SHOT.get(model_name, {})
    lines = ["| set | stage | image->text R@1 | text->image R@1 | R@5 (i->t / t->i) | R@10 (i->t / t->i) |",
             "|---|---|---|---|---|---|"]
    for name, stages in results.items():
        title = RETRIEVAL_TITLES.get(name, name)
        for stage, result in stages.items():
            i2t, t2i = result["image_to_text"], result["text_to_image"]
            lines.append(f"| {title} | {stage} | {100 * i2t['recall@1']:.1f} | {100 * t2i['recall@1']:.1f} | "
                         f"{100 * i2t['recall@5']:.1f} / {100 * t2i['recall@5']:.1f} | "
                         f"{100 * i2t['recall@10']:.1f} / {100 * t2i['recall@10']:.1f} |")
        if name in published:
            paper = published[name]
            lines.append(f"| {title} | paper [1]: qt->ci, qi->ct | "
                         f"{paper[PAPER_COLUMN_FOR['image_to_text']]:.1f} | "
                         f"{paper[PAPER_COLUMN_FOR['text_to_image']]:.1f} | | |")
    if any(name in published for name in results):
        lines += ["", f"[1] {RETRIEVAL_COLUMN_NOTE}"]
    return "\n".join(lines)


def sugarcrepe_table(result: dict[str, Any], model_name: str) -> str:
    """Markdown in the paper's layout: Replace / Swap / Add (accuracy %), then every subset."""
    groups = ["Replace", "Swap", "Add"]
    rows = [("embedder", result)] + ([("embedder + rerank", result["rerank"])] if result.get("rerank") else [])
    lines = ["| stage | " + " | ".join(groups) + " | " + " | ".join(result["subsets"]) + " |",
             "|---" * (1 + len(groups) + len(result["subsets"])) + "|"]
    for label, values in rows:
        group_cells = [f"{100 * values['groups'][group]:.1f}" if group in values["groups"] else "-" for group in groups]
        subset_cells = [f"{100 * values['subsets'][name]:.1f}" for name in result["subsets"]]
        lines.append(f"| {label} | " + " | ".join(group_cells + subset_cells) + " |")
    published = PUBLISHED_ZERO_SHOT.get(model_name, {}).get("sugarcrepe")
    if published:
        lines.append("| paper | " + " | ".join(f"{published[group]:.1f}" for group in groups)
                     + " |" * (len(result["subsets"]) + 1))
    return "\n".join(lines)


__all__ = [
    "MMEB_COLUMNS",
    "MMEB_V2_COLUMNS",
    "PAPER_COLUMN_FOR",
    "PUBLISHED_ZERO_SHOT",
    "RETRIEVAL_COLUMN_NOTE",
    "RETRIEVAL_SETS",
    "RETRIEVAL_TITLES",
    "mmeb_table",
    "mmeb_v2_table",
    "retrieval_table",
    "sugarcrepe_table",
]
