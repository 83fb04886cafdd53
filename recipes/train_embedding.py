"""Train a UniME-V2 embedder with soft-label distribution alignment on a judge-scored dataset.

    accelerate launch recipes/train_embedding.py --config recipes/configs/tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train_embedding.py --config recipes/configs/tiny-cpu.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train_embedding.py \\
        --config recipes/configs/qwen2vl-2b.yaml [--push_to_hub ORG/NAME]

Config (YAML): ``model`` (a UniME-V2 / backbone folder or repo id, or ``tiny:<family>``), ``data`` (``train`` and
optional ``eval``: ``synthetic-judge:N``, a ``save_to_disk`` folder from the mining recipe, or the authors' judge-scored
JSON; ``image_root``; ``image_size``), ``finetuning`` (dora | lora | full), ``adapter`` (r, alpha, dropout),
``merge`` (save merged weights, else the adapter alone), ``push_to_hub``, ``threads``, and ``training``
(fields of `UniMEV2TrainingArguments`: loss, contrastive_temperature, num_negatives, gradcache, learning_rate...).
A re-run of the same command resumes from the last checkpoint in ``training.output_dir``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch  # noqa: E402
import yaml  # noqa: E402
from datasets import load_from_disk  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from modeling_unime import UniMEV2Model, UniMEV2Processor  # noqa: E402
from modeling_unime.data import image_root_of, load_official_json  # noqa: E402
from modeling_unime.testing import build_tiny_unime, synthetic_judge_dataset  # noqa: E402
from trainers import UniMEV2Trainer, UniMEV2TrainingArguments  # noqa: E402
from trainers.adapters import prepare_for_training, save_checkpoint  # noqa: E402


def load_judge_rows(spec: str, image_root: str | None, seed: int, num_negatives: int):
    """A judge dataset from ``synthetic-judge:N``, a save_to_disk folder or the authors' JSON; and its image root."""
    if spec.startswith("synthetic-judge:"):
        return synthetic_judge_dataset(int(spec.split(":", 1)[1]), image_root, num_negatives=max(num_negatives, 1),
                                       seed=seed), image_root
    path = Path(spec)
    if path.is_dir():
        return load_from_disk(str(path)), image_root
    if path.suffix == ".json":
        dataset = load_official_json(path, image_root)
        return dataset, image_root or image_root_of(dataset)
    raise FileNotFoundError(f"data: {spec!r} is neither synthetic-judge:N, a save_to_disk folder nor a .json file.")


def load_model(spec: str, dtype: str):
    if spec.startswith("tiny:"):
        return build_tiny_unime(spec.split(":", 1)[1])
    return UniMEV2Model.from_pretrained(spec, dtype=dtype), UniMEV2Processor.from_pretrained(spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output_dir", default=None, help="overrides training.output_dir")
    parser.add_argument("--push_to_hub", default=None, help="model repo id to push the final checkpoint to")
    parser.add_argument("--max_steps", type=int, default=None, help="overrides training.max_steps")
    args = parser.parse_args()
    settings = yaml.safe_load(Path(args.config).read_text())
    training = dict(settings.get("training") or {})
    if args.output_dir:
        training["output_dir"] = args.output_dir
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    training.setdefault("report_to", [])
    if (settings.get("data") or {}).get("eval"):
        # Evaluate inside train(): a trainer.evaluate() before train() leaves DDP gradients unsynchronised
        # (measured on CPU/gloo: per-process gradients differed after it).
        training.setdefault("eval_on_start", True)
    training.setdefault("use_cpu", not torch.cuda.is_available())
    torch.set_num_threads(int(settings.get("threads", 1)))
    training_args = UniMEV2TrainingArguments(**training)
    output_dir = Path(training_args.output_dir)

    data = settings["data"]
    image_root = data.get("image_root") or str(output_dir / "images")
    with training_args.main_process_first(desc="building the datasets"):
        train_rows, image_root = load_judge_rows(data["train"], image_root, training_args.seed,
                                                 training_args.num_negatives)
        eval_rows = None
        if data.get("eval"):
            eval_rows, _ = load_judge_rows(data["eval"], image_root, training_args.seed + 1,
                                           training_args.num_negatives)

    model, processor = load_model(settings["model"], settings.get("dtype", "auto"))
    model = prepare_for_training(model, settings.get("finetuning", "dora"), **(settings.get("adapter") or {}))
    trainer = UniMEV2Trainer(
        model=model, args=training_args, train_dataset=train_rows, eval_dataset=eval_rows, processing_class=processor,
        image_root=image_root, image_size=data.get("image_size"),
    )
    last_checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last_checkpoint)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    before = evaluations[0] if evaluations else {}
    after = trainer.evaluate() if eval_rows is not None else {}
    if not trainer.is_world_process_zero():
        return
    results = {"before_training": before, "after_training": after}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    evaluation = "\n".join(
        f"- held-out {key.removeprefix('eval_')}: {before.get(key, float('nan')):.4f} -> {value:.4f}"
        for key, value in after.items() if key in ("eval_loss", "eval_judge_agreement", "eval_p_positive")
    )
    training_text = (
        f"Trained with `recipes/train_embedding.py` (unime-v2): loss `{training_args.loss}`, tau "
        f"{training_args.contrastive_temperature}, {training_args.num_negatives} negatives "
        f"({training_args.negative_selection}), finetuning `{settings.get('finetuning', 'dora')}`, "
        f"{trainer.state.global_step} steps, learning rate {training_args.learning_rate}, batch "
        f"{training_args.per_device_train_batch_size} x {training_args.world_size} processes, data `{data['train']}`."
    )
    final = save_checkpoint(
        trainer.model, processor, output_dir / "final", merge=settings.get("merge", True),
        card=dict(training=training_text, evaluation=evaluation or None, repo_id=args.push_to_hub or None,
                  base_model=None if settings["model"].startswith("tiny:") else settings["model"]),
    )
    print(f"final checkpoint: {final}")
    print(json.dumps({key: round(value, 4) for key, value in after.items() if isinstance(value, float)}))
    repo_id = args.push_to_hub or settings.get("push_to_hub")
    if repo_id:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(final), repo_id=repo_id, commit_message="UniME-V2 embedder (unime-v2)")
        print(f"pushed to {repo_id}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
