"""The shared body of the training recipes (embedder and reranker): YAML config -> data, model, adapter, trainer,
resumable training, held-out evaluation before and after, a checkpoint with its card, an optional push.

Precision and placement (`modeling_unime.placement`): the Trainer puts the model on the process's device (or
DeepSpeed / FSDP shard it), so the model is loaded without a device map. ``use_cpu`` is set only where there is no
accelerator. On a CUDA GPU with bf16, ``training.bf16`` defaults to true. The config's ``dtype`` (default ``auto``)
is the dtype the weights are loaded in (`training_dtype`): ``auto`` loads **bf16 weights under an adapter**
(lora / dora, the default finetuning: the authors' setting, the frozen base never changes and takes half the memory;
peft keeps the adapter in float32 and the Trainer computes under bf16 autocast) and **float32 master weights for
full fine-tuning** (bf16 weights would round most AdamW updates away), float32 on CPU. ``attn_implementation``
(default ``auto``: flash_attention_2 where installed on a GPU with half-precision compute, else sdpa) goes to
``from_pretrained`` and reaches the wrapped backbone's language model and vision tower.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from datasets import load_from_disk
from transformers.trainer_utils import get_last_checkpoint

from modeling_unime import UniMEV2Model, UniMEV2Processor, UniMEV2Reranker
from modeling_unime.data import image_root_of, load_official_json
from modeling_unime.placement import (
    accelerator_available,
    default_mixed_precision,
    describe,
    place,
    placement,
    pretrained_kwargs,
    training_dtype,
)
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
    load_pretrained: Callable[..., Any]  # (spec, **from_pretrained keyword arguments) -> model
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
    load_pretrained=UniMEV2Model.from_pretrained,
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
    load_pretrained=UniMEV2Reranker.from_pretrained,
    default_finetuning="lora",
    default_adapter=RERANKER_ADAPTER,
    reported_metrics=("eval_loss", "eval_loss_pairwise", "eval_loss_listwise", "eval_loss_listwise_index", "eval_yes_margin"),
    describe=_describe_reranker,
)


def apply_device_defaults(training: dict[str, Any]) -> dict[str, Any]:
    """Fill the device-dependent defaults of the ``training`` section in place: ``use_cpu: true`` only where there is
    no accelerator, ``bf16: true`` on a CUDA GPU with bf16 when the config names no mixed precision.

    Example:
        >>> training = apply_device_defaults({"bf16": False})   # an explicit choice is kept
        >>> training["bf16"], training.get("use_cpu", False) == (not accelerator_available())
        (False, True)
    """
    if not accelerator_available():
        training.setdefault("use_cpu", True)
    # `accelerate launch --mixed_precision fp16|bf16` (ACCELERATE_MIXED_PRECISION) is a choice too: kept.
    launcher_choice = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") not in ("", "no")
    if not training.get("use_cpu") and "bf16" not in training and "fp16" not in training and not launcher_choice:
        if default_mixed_precision() == "bf16":
            training["bf16"] = True
    return training


def mixed_precision_of(args: Any) -> str | None:
    """``"bf16"``, ``"fp16"`` or None: what the Trainer will autocast to (the config's bf16 / fp16 flags, else the
    launcher's ``--mixed_precision``, which `TrainingArguments` reads into ``mixed_precision``)."""
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    chosen = getattr(args, "mixed_precision", None)
    return chosen if chosen in ("bf16", "fp16") else None


def load_training_model(
    kind: RecipeKind, model_spec: str, settings: dict[str, Any], args: Any, finetuning: str
) -> tuple[torch.nn.Module, Any]:
    """The model to train (in the dtype and with the attention kernel of the rules above) and its processor.

    The model stays where it was loaded (CPU): the Trainer moves it to ``args.device``.
    """
    mixed_precision = mixed_precision_of(args)
    device = args.device
    weights = training_dtype(settings.get("dtype", "auto"), device, mixed_precision, finetuning)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, weights)
    where = placement(weights, settings.get("attn_implementation", "auto"), device, compute_dtype=compute)
    if model_spec.startswith("tiny:"):
        model, processor = kind.load_tiny(model_spec.split(":", 1)[1])
        return place(model, "cpu", where["dtype"], where["attn_implementation"]), processor
    model = kind.load_pretrained(model_spec, **pretrained_kwargs(where, device_map=False))
    return model, UniMEV2Processor.from_pretrained(model_spec)


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
    evaluate_on_start = "eval_on_start" not in training and bool((settings.get("data") or {}).get("eval"))
    if evaluate_on_start:
        # Evaluate inside train(): a trainer.evaluate() before train() leaves DDP gradients unsynchronised
        # (measured on CPU/gloo: per-process gradients differed after it).
        training["eval_on_start"] = True
    apply_device_defaults(training)
    torch.set_num_threads(int(settings.get("threads", 1)))
    args = kind.arguments_class(**training)
    output_dir = Path(args.output_dir)
    # A re-run of the same command resumes from the last checkpoint: weights, optimizer, scheduler, random states,
    # the data position and the log history (tests/test_embedding_trainer.py checks the result equals an
    # uninterrupted run). The evaluation before training is in that history already: not repeated mid-run.
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last_checkpoint is not None:
        if args.process_index == 0:
            print(f"resuming from {last_checkpoint}", flush=True)
        if evaluate_on_start:
            args.eval_on_start = False

    data = settings["data"]
    image_root = data.get("image_root") or str(output_dir / "images")
    negatives = getattr(args, "num_negatives", 8)
    with args.main_process_first(desc="building the datasets"):
        train_rows, image_root = load_judge_rows(data["train"], image_root, args.seed, negatives)
        eval_rows = load_judge_rows(data["eval"], image_root, args.seed + 1, negatives)[0] if data.get("eval") else None

    model_spec = settings["model"]
    finetuning = settings.get("finetuning", kind.default_finetuning)
    model, processor = load_training_model(kind, model_spec, settings, args, finetuning)
    if settings.get("image_resize"):  # the rule saved with the checkpoint, for inference (data.image_resize: training)
        processor.image_resize = settings["image_resize"]
    adapter = {**kind.default_adapter, **(settings.get("adapter") or {})}
    model = prepare_for_training(model, finetuning, **(adapter if finetuning != "full" else {}))
    trainer = kind.trainer_class(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=processor,
        image_root=image_root, image_size=data.get("image_size"), image_resize=data.get("image_resize"),
    )
    precision = mixed_precision_of(args) or "no"
    print(f"placement: process {args.process_index}: {describe(trainer.model, 'model')} (mixed precision: {precision})",
          flush=True)
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


__all__ = [
    "EMBEDDER",
    "RERANKER",
    "RecipeKind",
    "apply_device_defaults",
    "load_judge_rows",
    "load_training_model",
    "mixed_precision_of",
    "parse_recipe_arguments",
    "run_training_recipe",
]
