"""The shared body of the training recipes (embedder and reranker): YAML config -> data, model, adapter, trainer,
resumable training, held-out evaluation before and after, a checkpoint with its card, an optional push."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from datasets import load_from_disk
from transformers.trainer_utils import get_last_checkpoint

from modeling_unime import UniMEV2Model, UniMEV2Processor, UniMEV2Reranker
from modeling_unime.data import image_root_of, load_official_json
from modeling_unime.testing import build_tiny_reranker, build_tiny_unime, synthetic_judge_dataset

from .adapters import RERANKER_ADAPTER, prepare_for_training, save_checkpoint
from .embedding_trainer import UniMEV2Trainer, UniMEV2TrainingArguments
from .reranker_trainer import UniMEV2RerankerTrainer, UniMEV2RerankerTrainingArguments


def load_judge_rows(spec: str, image_root: str | None, seed: int, num_negatives: int = 8):
    """A judge dataset from ``synthetic-judge:N``, a save_to_disk folder or the authors' JSON; and its image root."""
    if spec.startswith("synthetic-judge:"):
        rows = synthetic_judge_dataset(int(spec.split(":", 1)[1]), image_root, num_negatives=max(num_negatives, 1),
                                       seed=seed)
        return rows, image_root
    path = Path(spec)
    if path.is_dir():
        return load_from_disk(str(path)), image_root
    if path.suffix == ".json":
        dataset = load_official_json(path, image_root)
        return dataset, image_root or image_root_of(dataset)
    raise FileNotFoundError(f"data: {spec!r} is neither synthetic-judge:N, a save_to_disk folder nor a .json file.")


@dataclass
class RecipeKind:
    """What differs between the embedder and the reranker recipes."""

    name: str
    arguments_class: type
    trainer_class: type
    load_tiny: Callable[[str], tuple[Any, Any]]
    load_pretrained: Callable[[str, str], Any]
    default_finetuning: str
    default_adapter: dict[str, Any]
    reported_metrics: tuple[str, ...]
    describe: Callable[[Any, dict[str, Any]], str]


def _describe_embedder(args: UniMEV2TrainingArguments, settings: dict[str, Any]) -> str:
    return (f"loss `{args.loss}`, tau {args.contrastive_temperature}, {args.num_negatives} negatives "
            f"({args.negative_selection})")


def _describe_reranker(args: UniMEV2RerankerTrainingArguments, settings: dict[str, Any]) -> str:
    return (f"pairwise (weight {args.pairwise_weight}) + listwise (weight {args.listwise_weight}, lists of "
            f"{args.listwise_negatives} negatives + the positive)")


EMBEDDER = RecipeKind(
    name="embedder",
    arguments_class=UniMEV2TrainingArguments,
    trainer_class=UniMEV2Trainer,
    load_tiny=build_tiny_unime,
    load_pretrained=lambda spec, dtype: UniMEV2Model.from_pretrained(spec, dtype=dtype),
    default_finetuning="dora",
    default_adapter={},
    reported_metrics=("eval_loss", "eval_judge_agreement", "eval_p_positive"),
    describe=_describe_embedder,
)
RERANKER = RecipeKind(
    name="reranker",
    arguments_class=UniMEV2RerankerTrainingArguments,
    trainer_class=UniMEV2RerankerTrainer,
    load_tiny=build_tiny_reranker,
    load_pretrained=lambda spec, dtype: UniMEV2Reranker.from_pretrained(spec, dtype=dtype),
    default_finetuning="lora",
    default_adapter=RERANKER_ADAPTER,
    reported_metrics=("eval_loss", "eval_loss_pairwise", "eval_loss_listwise", "eval_yes_margin"),
    describe=_describe_reranker,
)


def parse_recipe_arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see recipes/configs/)")
    parser.add_argument("--output_dir", default=None, help="overrides training.output_dir")
    parser.add_argument("--push_to_hub", default=None, help="model repo id to push the final checkpoint to")
    parser.add_argument("--max_steps", type=int, default=None, help="overrides training.max_steps")
    return parser.parse_args()


def run_training_recipe(kind: RecipeKind, cli: argparse.Namespace) -> dict[str, Any] | None:
    """Run one training recipe; returns the held-out results on the main process."""
    settings = yaml.safe_load(Path(cli.config).read_text())
    training = dict(settings.get("training") or {})
    if cli.output_dir:
        training["output_dir"] = cli.output_dir
    if cli.max_steps is not None:
        training["max_steps"] = cli.max_steps
    training.setdefault("report_to", [])
    if (settings.get("data") or {}).get("eval"):
        # Evaluate inside train(): a trainer.evaluate() before train() leaves DDP gradients unsynchronised
        # (measured on CPU/gloo: per-process gradients differed after it).
        training.setdefault("eval_on_start", True)
    training.setdefault("use_cpu", not torch.cuda.is_available())
    torch.set_num_threads(int(settings.get("threads", 1)))
    args = kind.arguments_class(**training)
    output_dir = Path(args.output_dir)

    data = settings["data"]
    image_root = data.get("image_root") or str(output_dir / "images")
    negatives = getattr(args, "num_negatives", 8)
    with args.main_process_first(desc="building the datasets"):
        train_rows, image_root = load_judge_rows(data["train"], image_root, args.seed, negatives)
        eval_rows = load_judge_rows(data["eval"], image_root, args.seed + 1, negatives)[0] if data.get("eval") else None

    model_spec = settings["model"]
    if model_spec.startswith("tiny:"):
        model, processor = kind.load_tiny(model_spec.split(":", 1)[1])
    else:
        model = kind.load_pretrained(model_spec, settings.get("dtype", "auto"))
        processor = UniMEV2Processor.from_pretrained(model_spec)
    finetuning = settings.get("finetuning", kind.default_finetuning)
    adapter = {**kind.default_adapter, **(settings.get("adapter") or {})}
    model = prepare_for_training(model, finetuning, **(adapter if finetuning != "full" else {}))
    trainer = kind.trainer_class(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=processor,
        image_root=image_root, image_size=data.get("image_size"),
    )
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last_checkpoint)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    before = evaluations[0] if evaluations else {}
    after = trainer.evaluate() if eval_rows is not None else {}
    if not trainer.is_world_process_zero():
        return None

    results = {"before_training": before, "after_training": after}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    evaluation = "\n".join(
        f"- held-out {key.removeprefix('eval_')}: {before.get(key, float('nan')):.4f} -> {after[key]:.4f}"
        for key in kind.reported_metrics if key in after
    )
    training_text = (
        f"Trained with `recipes/train_{kind.name}.py` (unime-v2): {kind.describe(args, settings)}, finetuning "
        f"`{finetuning}`, {trainer.state.global_step} steps, learning rate {args.learning_rate}, batch "
        f"{args.per_device_train_batch_size} x {args.world_size} processes, data `{data['train']}`."
    )
    repo_id = cli.push_to_hub or settings.get("push_to_hub")
    final = save_checkpoint(
        trainer.model, processor, output_dir / "final", merge=settings.get("merge", True),
        card=dict(training=training_text, evaluation=evaluation or None, repo_id=repo_id,
                  base_model=None if model_spec.startswith("tiny:") else model_spec),
    )
    print(f"final checkpoint: {final}")
    print(json.dumps({key: round(value, 4) for key, value in after.items() if isinstance(value, float)}))
    if repo_id:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(final), repo_id=repo_id, commit_message=f"UniME-V2 {kind.name} (unime-v2)")
        print(f"pushed to {repo_id}")
    return results


__all__ = ["EMBEDDER", "RERANKER", "RecipeKind", "load_judge_rows", "parse_recipe_arguments", "run_training_recipe"]
