"""The shared body of the training recipes (embedder and reranker): arguments -> data, model, adapter, trainer,
resumable training, held-out evaluation before and after, a checkpoint with its card, an optional push.

Arguments are dataclasses, as in TRL's scripts (`modeling_unime.util.arguments.parse_recipe_arguments`): a
``--config`` YAML file and any field as a flag (the flag wins), ``--help`` listing every field. The YAML sections map
to field prefixes: ``training:`` to the fields of the trainer's arguments class (no prefix), ``data:`` to
`DataArguments` (``data_``), ``adapter:`` to `AdapterArguments` (``adapter_``); the top-level keys are
`ScriptArguments`. A key that names no field is an error.

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

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from datasets import load_from_disk
from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from modeling_unime.data import image_root_of, load_official_json
from modeling_unime.placement import (
    accelerator_available,
    default_mixed_precision,
    describe,
    training_dtype,
)
from modeling_unime.recipe_engine import RecipeRun, start_recipe
from modeling_unime.util.arguments import flatten_config, load_recipe_yaml, parse_recipe_arguments

from .adapters import FINETUNING_METHODS, RERANKER_ADAPTER, prepare_for_training, save_checkpoint
from .embedding_trainer import UniMEV2Trainer, UniMEV2TrainingArguments
from .reranker_trainer import UniMEV2RerankerTrainer, UniMEV2RerankerTrainingArguments
from .sharding import gather_trained_model

SYNTHETIC_JUDGE_PREFIX = "synthetic-judge:"
SECTIONS = {"training": "", "data": "data_", "adapter": "adapter_"}


def load_judge_rows(spec: str, image_root: str | None, seed: int, num_negatives: int = 8):
    """A judge dataset from ``synthetic-judge:N``, a save_to_disk folder or the authors' JSON; and its image root."""
    if spec.startswith(SYNTHETIC_JUDGE_PREFIX):
        # The synthetic world lives with the test helpers; only a synthetic-judge: spec ever reaches it.
        from modeling_unime.tiny import synthetic_judge_dataset

        rows = synthetic_judge_dataset(int(spec[len(SYNTHETIC_JUDGE_PREFIX):]), image_root,
                                       num_negatives=max(num_negatives, 1), seed=seed)
        return rows, image_root
    path = Path(spec)
    if path.is_dir():
        return load_from_disk(str(path)), image_root
    if path.suffix == ".json":
        dataset = load_official_json(path, image_root)
        return dataset, image_root or image_root_of(dataset)
    raise FileNotFoundError(f"data: {spec!r} is neither synthetic-judge:N, a save_to_disk folder nor a .json file.")


# ------------------------------------------------------------------------------------------------------ arguments


@dataclass
class ScriptArguments:
    """The top-level keys of a training config: the model, how it is loaded and trained, what is saved and pushed."""

    model: str = field(metadata={"help": "a UniME-V2 or backbone folder or Hub repo id, or tiny:<family> (a tiny "
                                         "random model, for smoke runs)"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto (bf16 under an adapter on a GPU, "
                                                         "float32 for full fine-tuning and on CPU) | float32 | "
                                                         "bfloat16 | float16"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto (flash_attention_2 where installed on "
                                                                       "a GPU, else sdpa) | sdpa | eager | "
                                                                       "flash_attention_2"})
    finetuning: str | None = field(default=None, metadata={"help": f"{' | '.join(FINETUNING_METHODS)} (default: "
                                                                   "dora for the embedder, lora for the reranker)"})
    merge: bool = field(default=True, metadata={"help": "save the adapter merged into the weights (else the adapter "
                                                        "alone)"})
    image_resize: str | None = field(default=None, metadata={"help": "the image rule saved with the checkpoint's "
                                                                     "processor, for inference (e.g. authors-eval)"})
    push_to_hub: str | None = field(default=None, metadata={"help": "model repo id to push the final checkpoint to"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process"})


@dataclass
class DataArguments:
    """The ``data:`` section: the judge datasets and their images."""

    data_train: str = field(metadata={"help": "training rows: synthetic-judge:N, the mining recipe's save_to_disk "
                                              "folder, or the authors' judge-scored JSON"})
    data_eval: str | None = field(default=None, metadata={"help": "held-out rows (same forms), evaluated before and "
                                                                  "after training"})
    data_image_root: str | None = field(default=None, metadata={"help": "folder the rows' image paths are relative "
                                                                        "to (default: <output_dir>/images)"})
    data_image_resize: str | None = field(default=None, metadata={"help": "training image rule, e.g. "
                                                                          "authors-train-qwen2vl (672x672)"})
    data_image_size: int | None = field(default=None, metadata={"help": "older spelling of data_image_resize "
                                                                        "square:N"})


@dataclass
class AdapterArguments:
    """The ``adapter:`` section (lora / dora only). Unset fields take the recipe's defaults: the authors' DoRA for the
    embedder (r 16, alpha 64, dropout 0.1, gaussian init; `trainers.adapters.adapter_config`), their LoRA for the
    reranker (r 128, alpha 256, dropout 0.05; `trainers.adapters.RERANKER_ADAPTER`)."""

    adapter_r: int | None = field(default=None, metadata={"help": "rank (embedder 16, reranker 128)"})
    adapter_alpha: int | None = field(default=None, metadata={"help": "alpha (embedder 64, reranker 256)"})
    adapter_dropout: float | None = field(default=None, metadata={"help": "dropout (embedder 0.1, reranker 0.05)"})
    adapter_target_modules: str | None = field(default=None, metadata={"help": "regex of the adapted modules "
                                                                               "(default: the language model's "
                                                                               "projections)"})
    adapter_init_lora_weights: str | None = field(default=None, metadata={"help": "gaussian (embedder) | true "
                                                                                  "(reranker: peft's default)"})

    def settings(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """Keyword arguments of `trainers.adapters.adapter_config`: ``defaults`` overridden by the fields set."""
        given = {name: getattr(self, f"adapter_{name}")
                 for name in ("r", "alpha", "dropout", "target_modules", "init_lora_weights")}
        init = given["init_lora_weights"]
        if isinstance(init, str) and init.lower() in ("true", "false"):
            given["init_lora_weights"] = init.lower() == "true"
        return {**defaults, **{name: value for name, value in given.items() if value is not None}}


@dataclass
class _PushedByTheScript:
    """The script owns ``push_to_hub`` (a repo id, pushed once with the final checkpoint and its card): the recipes'
    arguments classes take the Trainer's boolean out of the parser (init=False), so the Trainer never pushes."""

    push_to_hub: bool = field(default=False, init=False, metadata={"help": "set by the script: see --push_to_hub"})


@dataclass
class EmbeddingRecipeArguments(_PushedByTheScript, UniMEV2TrainingArguments):
    """`UniMEV2TrainingArguments` as the embedding recipe parses them."""


@dataclass
class RerankerRecipeArguments(_PushedByTheScript, UniMEV2RerankerTrainingArguments):
    """`UniMEV2RerankerTrainingArguments` as the reranker recipe parses them."""


@dataclass
class RecipeKind:
    """What differs between the embedder and the reranker recipes."""

    name: str  # a `modeling_unime.model_specs.MODEL_KINDS` entry
    script: str
    arguments_class: type
    trainer_class: type
    default_finetuning: str
    default_adapter: dict[str, Any]
    reported_metrics: tuple[str, ...]
    describe: Callable[[Any], str]


def _describe_embedder(args: UniMEV2TrainingArguments) -> str:
    return (f"loss `{args.loss}`, tau {args.contrastive_temperature}, {args.num_negatives} negatives "
            f"({args.negative_selection})")


def _describe_reranker(args: UniMEV2RerankerTrainingArguments) -> str:
    return (f"pairwise (weight {args.pairwise_weight}) + listwise (weight {args.listwise_weight}, lists of "
            f"{args.listwise_negatives} negatives + the positive)")


EMBEDDER = RecipeKind(
    name="embedder",
    script="recipes/train_embedding.py",
    arguments_class=EmbeddingRecipeArguments,
    trainer_class=UniMEV2Trainer,
    default_finetuning="dora",
    default_adapter={},
    reported_metrics=("eval_loss", "eval_judge_agreement", "eval_p_positive"),
    describe=_describe_embedder,
)
RERANKER = RecipeKind(
    name="reranker",
    script="recipes/train_reranker.py",
    arguments_class=RerankerRecipeArguments,
    trainer_class=UniMEV2RerankerTrainer,
    default_finetuning="lora",
    default_adapter=RERANKER_ADAPTER,
    reported_metrics=(
        "eval_loss", "eval_loss_pairwise", "eval_loss_listwise", "eval_loss_listwise_index", "eval_yes_margin"
    ),
    describe=_describe_reranker,
)


@dataclass
class TrainingRecipeArguments:
    """One run's parsed arguments. ``evaluate_on_start`` is true when the recipe (not the config) turned
    ``eval_on_start`` on, which a resumed run turns off again."""

    script: ScriptArguments
    data: DataArguments
    adapter: AdapterArguments
    training: Any
    evaluate_on_start: bool = False


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


def start_training_run(settings: Mapping[str, Any], args: Any, finetuning: str) -> RecipeRun:
    """This process's run of a training recipe (`modeling_unime.recipe_engine.start_recipe`): ``threads`` torch
    threads, and the weights' dtype and attention kernel of the rules above, from the ``dtype`` and
    ``attn_implementation`` of ``settings``."""
    mixed_precision = mixed_precision_of(args)
    weights = training_dtype(settings.get("dtype", "auto"), args.device, mixed_precision, finetuning)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, weights)
    return start_recipe(settings.get("threads", torch.get_num_threads()), weights,
                        settings.get("attn_implementation", "auto"), compute_dtype=compute)


def load_training_model(
    kind: RecipeKind, model_spec: str, settings: Mapping[str, Any], args: Any, finetuning: str,
    run: RecipeRun | None = None,
) -> tuple[torch.nn.Module, Any]:
    """The model to train (`start_training_run` decides its dtype and attention kernel; ``run`` when the recipe
    started it already) and its processor.

    The model stays where it was loaded (CPU): the Trainer moves it to ``args.device``.
    """
    run = run or start_training_run(settings, args, finetuning)
    return run.load(kind.name, model_spec, device_map=False, tiny_device="cpu")


def _command_line_values(argv: Sequence[str]) -> dict[str, Any]:
    """The fields the command line names, with their values as written (``--no_x`` is x = False)."""
    values: dict[str, Any] = {}
    for position, token in enumerate(argv):
        if not token.startswith("--"):
            continue
        name, has_value, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if has_value:
            values[name] = value
        elif name.startswith("no_"):
            values[name[3:]] = False
        else:
            following = argv[position + 1] if position + 1 < len(argv) else None
            values[name] = following if following is not None and not following.startswith("--") else True
    words = {"true": True, "yes": True, "false": False, "no": False}
    return {name: words.get(value.lower(), value) if isinstance(value, str) else value
            for name, value in values.items()}


def _recipe_defaults(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Flags for the recipe's own defaults, which apply only where neither the config file nor the command line
    chose: the device defaults (`apply_device_defaults`), ``report_to: none``, and ``eval_on_start`` when there is
    held-out data. Returns (the flags, whether eval_on_start is among them)."""
    explicit: dict[str, Any] = {}
    config = _command_line_values(argv).get("config")
    if isinstance(config, str) and Path(config).is_file():
        loaded = load_recipe_yaml(config)
        if isinstance(loaded, Mapping):  # anything else: parse_recipe_arguments reports it
            explicit.update(flatten_config(loaded, SECTIONS, where=config))
    explicit.update(_command_line_values(argv))
    chosen = dict(explicit)
    apply_device_defaults(chosen)
    flags = [item for name in ("use_cpu", "bf16") if name in chosen and name not in explicit
             for item in (f"--{name}", str(chosen[name]).lower())]
    if "report_to" not in explicit:
        flags += ["--report_to", "none"]
    # Evaluate inside train(): a trainer.evaluate() before train() leaves DDP gradients unsynchronised
    # (measured on CPU/gloo: per-process gradients differed after it).
    evaluate_on_start = "eval_on_start" not in explicit and bool(explicit.get("data_eval"))
    if evaluate_on_start:
        flags += ["--eval_on_start", "true"]
    return flags, evaluate_on_start


def parse_training_recipe(
    kind: RecipeKind, argv: Sequence[str] | None = None, description: str | None = None
) -> TrainingRecipeArguments:
    """The arguments of one run of ``kind``'s recipe, from ``--config`` and the flags of ``argv`` (default
    ``sys.argv[1:]``), with the recipe's defaults where neither chose (see `_recipe_defaults`)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults, evaluate_on_start = _recipe_defaults(argv)
    script, data, adapter, training = parse_recipe_arguments(
        [ScriptArguments, DataArguments, AdapterArguments, kind.arguments_class], [*defaults, *argv],
        sections=SECTIONS, description=description,
    )
    return TrainingRecipeArguments(script, data, adapter, training, evaluate_on_start)


def run_training_recipe(kind: RecipeKind, arguments: TrainingRecipeArguments) -> dict[str, Any] | None:
    """Run one training recipe; returns the held-out results on the main process."""
    script, data, args = arguments.script, arguments.data, arguments.training
    finetuning = script.finetuning or kind.default_finetuning
    settings = {"dtype": script.dtype, "attn_implementation": script.attn_implementation, "threads": script.threads}
    run = start_training_run(settings, args, finetuning)  # threads before anything runs
    output_dir = Path(args.output_dir)
    # A re-run of the same command resumes from the last checkpoint: weights, optimizer, scheduler, random states,
    # the data position and the log history (tests/test_embedding_trainer.py checks the result equals an
    # uninterrupted run). The evaluation before training is in that history already: not repeated mid-run.
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last_checkpoint is not None:
        if args.process_index == 0:
            print(f"resuming from {last_checkpoint}", flush=True)
        if arguments.evaluate_on_start:
            args.eval_on_start = False

    image_root = data.data_image_root or str(output_dir / "images")
    negatives = getattr(args, "num_negatives", 8)
    with args.main_process_first(desc="building the datasets"):
        train_rows, image_root = load_judge_rows(data.data_train, image_root, args.seed, negatives)
        eval_rows = load_judge_rows(data.data_eval, image_root, args.seed + 1, negatives)[0] if data.data_eval else None

    model, processor = load_training_model(kind, script.model, settings, args, finetuning, run)
    if script.image_resize:  # the rule saved with the checkpoint, for inference (data_image_resize: training)
        processor.image_resize = script.image_resize
    adapter = arguments.adapter.settings(kind.default_adapter) if finetuning != "full" else {}
    # The adapter's random initialisation follows the seed alone, not what loading drew before it (which differs
    # between 1 and N processes, and under FSDP's loading on the main process only).
    set_seed(args.seed)
    model = prepare_for_training(model, finetuning, **adapter)
    trainer = kind.trainer_class(
        model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=processor,
        image_root=image_root, image_size=data.data_image_size, image_resize=data.data_image_resize,
    )
    precision = mixed_precision_of(args) or "no"
    print(f"placement: process {args.process_index}: {describe(trainer.model, 'model')} (mixed precision: {precision})",
          flush=True)
    trainer.train(resume_from_checkpoint=last_checkpoint)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    before = evaluations[0] if evaluations else {}
    after = trainer.evaluate() if eval_rows is not None else {}
    trained = gather_trained_model(  # under FSDP, gathered from the shards into a fresh copy on the main process
        trainer, lambda: prepare_for_training(load_training_model(kind, script.model, settings, args, finetuning,
                                                                  run)[0], finetuning, **adapter))
    if not trainer.is_world_process_zero():
        return None

    results = {"before_training": before, "after_training": after}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    evaluation = "\n".join(
        f"- held-out {key.removeprefix('eval_')}: {before.get(key, float('nan')):.4f} -> {after[key]:.4f}"
        for key in kind.reported_metrics if key in after
    )
    training_text = (
        f"Trained with `{kind.script}` (unime-v2): {kind.describe(args)}, finetuning `{finetuning}`, "
        f"{trainer.state.global_step} steps, learning rate {args.learning_rate}, batch "
        f"{args.per_device_train_batch_size} x {args.world_size} processes, data `{data.data_train}`."
    )
    repo_id = script.push_to_hub
    final = save_checkpoint(
        trained, processor, output_dir / "final", merge=script.merge,
        card=dict(training=training_text, evaluation=evaluation or None, repo_id=repo_id,
                  base_model=None if script.model.startswith("tiny:") else script.model),
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
    "SECTIONS",
    "AdapterArguments",
    "DataArguments",
    "EmbeddingRecipeArguments",
    "RecipeKind",
    "RerankerRecipeArguments",
    "ScriptArguments",
    "TrainingRecipeArguments",
    "apply_device_defaults",
    "load_judge_rows",
    "load_training_model",
    "mixed_precision_of",
    "parse_training_recipe",
    "run_training_recipe",
]
