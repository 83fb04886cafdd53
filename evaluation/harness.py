"""The evaluation recipe's engine: config -> models -> MMEB / retrieval / SugarCrepe -> JSON, markdown, predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from modeling_unime import UniMEV2Model, UniMEV2Reranker
from modeling_unime.mining import distributed_state
from modeling_unime.testing import build_tiny_reranker, build_tiny_unime

from .mmeb import MMEB_CATEGORIES, PUBLISHED_MMEB, evaluate_mmeb, write_predictions

MMEB_COLUMNS = [*MMEB_CATEGORIES, "IND", "OOD", "Overall"]
RETRIEVAL_TITLES = {"flickr30k": "Flickr30K", "coco": "COCO 5K", "sharegpt4v": "ShareGPT4V", "urban1k": "Urban1K"}
# method.md section 3: UniME-V2 (Qwen2-VL-2B) zero-shot R@1 (image->text / text->image) and SugarCrepe.
PUBLISHED_ZERO_SHOT = {
    "TianchengGu/UniME-V2-Qwen2VL-2B": {
        "flickr30k": (79.8, 89.9), "coco": (53.7, 65.1), "sharegpt4v": (91.6, 94.2), "urban1k": (95.6, 92.2),
        "sugarcrepe": {"Replace": 70.9, "Swap": 51.2, "Add": 70.2},
    },
}


def load_embedder(spec: str, dtype: str = "auto") -> Any:
    """A UniME-V2 embedder from a folder / repo id, or a tiny random one (``tiny:<family>``), ready to ``encode``."""
    if spec.startswith("tiny:"):
        model, processor = build_tiny_unime(spec.split(":", 1)[1])
        model.processor = processor
        return model
    return UniMEV2Model.from_pretrained(spec, dtype=dtype).eval()


def load_reranker(spec: str | None, dtype: str = "auto") -> Any:
    if spec is None:
        return None
    if spec.startswith("tiny:"):
        model, processor = build_tiny_reranker(spec.split(":", 1)[1])
        model.processor = processor
        return model
    return UniMEV2Reranker.from_pretrained(spec, dtype=dtype).eval()


def mmeb_table(results: dict[str, dict[str, Any]], model_name: str) -> str:
    """Markdown in the layout of the paper's MMEB table: categories, IND, OOD, overall; a published row when known."""
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
    per_dataset = ["", "| dataset | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    names = list(next(iter(results.values()))["datasets"])
    per_dataset += [f"| {name} | " + " | ".join(f"{summary['datasets'][name]:.1f}" for summary in results.values()) + " |"
                    for name in names]
    return "\n".join(lines + per_dataset)


def retrieval_table(results: dict[str, dict[str, Any]], model_name: str) -> str:
    """Markdown: R@1 image->text and text->image per set (the directions labelled as they are), paper beside ours."""
    published = PUBLISHED_ZERO_SHOT.get(model_name, {})
    lines = ["| set | stage | image->text R@1 | text->image R@1 | R@5 (i->t / t->i) | R@10 (i->t / t->i) |",
             "|---|---|---|---|---|---|"]
    for name, stages in results.items():
        for stage, result in stages.items():
            i2t, t2i = result["image_to_text"], result["text_to_image"]
            lines.append(f"| {RETRIEVAL_TITLES.get(name, name)} | {stage} | {100 * i2t['recall@1']:.1f} | "
                         f"{100 * t2i['recall@1']:.1f} | {100 * i2t['recall@5']:.1f} / {100 * t2i['recall@5']:.1f} | "
                         f"{100 * i2t['recall@10']:.1f} / {100 * t2i['recall@10']:.1f} |")
        if name in published:
            lines.append(f"| {RETRIEVAL_TITLES.get(name, name)} | paper | {published[name][0]:.1f} | "
                         f"{published[name][1]:.1f} | | |")
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


def parse_evaluation_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see recipes/configs/eval-*.yaml)")
    parser.add_argument("--output_dir", default=None, help="overrides output_dir")
    return parser.parse_args()


def run_evaluation(cli: argparse.Namespace) -> dict[str, Any] | None:
    """Run every benchmark named in the config; returns the results on the main process."""
    settings = yaml.safe_load(Path(cli.config).read_text())
    output_dir = Path(cli.output_dir or settings.get("output_dir", "runs/eval"))
    torch.set_num_threads(int(settings.get("threads", 1)))
    state = distributed_state()
    dtype = settings.get("dtype", "auto")
    embedder = load_embedder(settings["model"], dtype)
    reranker = load_reranker(settings.get("reranker"), dtype)
    batch_size = int(settings.get("batch_size", 32))
    cache_dir = output_dir / "cache"
    results: dict[str, Any] = {"model": settings["model"], "reranker": settings.get("reranker")}
    markdown = [f"# Evaluation of `{settings['model']}`", ""]

    if settings.get("mmeb"):
        options = settings["mmeb"]
        plain, reranked = evaluate_mmeb(
            embedder, datasets=options.get("datasets"), root=options.get("root"), image_root=options.get("image_root"),
            cache_dir=cache_dir, batch_size=batch_size, reranker=reranker,
            rerank_top_k=int(options.get("rerank_top_k", 10)), state=state,
        )
        summaries = {"embedder": plain.summary()}
        if reranked is not None:
            summaries["embedder + rerank"] = reranked.summary()
        results["mmeb"] = summaries
        if state.is_main_process:
            write_predictions(plain, output_dir / "predictions" / "mmeb")
            if reranked is not None:
                write_predictions(reranked, output_dir / "predictions" / "mmeb_rerank")
        markdown += ["## MMEB (precision@1, %)", "", mmeb_table(summaries, settings["model"]), ""]

    if settings.get("retrieval"):
        from .retrieval import evaluate_retrieval, load_retrieval_set

        retrieval_results: dict[str, dict[str, Any]] = {}
        for name, options in settings["retrieval"].items():
            dataset = load_retrieval_set(name, options["folder"], image_root=options.get("image_root"))
            stages = {"embedder": evaluate_retrieval(embedder, dataset, batch_size=batch_size,
                                                     cache_dir=cache_dir / "retrieval")}
            if reranker is not None:
                stages["embedder + rerank"] = evaluate_retrieval(
                    embedder, dataset, reranker=reranker, rerank_top_k=int(options.get("rerank_top_k", 10)),
                    batch_size=batch_size, cache_dir=cache_dir / "retrieval",
                )
            retrieval_results[name] = stages
        results["retrieval"] = retrieval_results
        markdown += ["## Zero-shot image-text retrieval (%)", "", retrieval_table(retrieval_results, settings["model"]),
                     ""]

    if settings.get("sugarcrepe"):
        from .sugarcrepe import evaluate_sugarcrepe

        options = settings["sugarcrepe"]
        sugarcrepe = evaluate_sugarcrepe(
            embedder, options["annotations"], options["image_root"], subsets=options.get("subsets"),
            batch_size=batch_size, cache_dir=cache_dir / "sugarcrepe", reranker=reranker,
        )
        results["sugarcrepe"] = sugarcrepe
        markdown += ["## SugarCrepe (accuracy, %)", "", sugarcrepe_table(sugarcrepe, settings["model"]), ""]

    if not state.is_main_process:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    return results


__all__ = ["run_evaluation", "parse_evaluation_arguments", "load_embedder", "load_reranker", "mmeb_table"]
