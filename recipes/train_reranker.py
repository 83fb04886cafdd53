"""Train a UniME-V2 reranker (pairwise Yes/No + listwise index) on a judge-scored dataset.

    accelerate launch recipes/train_reranker.py --config recipes/configs/reranker-tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train_reranker.py --config recipes/configs/reranker-tiny-cpu.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train_reranker.py \\
        --config recipes/configs/reranker-qwen25vl-7b.yaml [--push_to_hub ORG/NAME]

Config (YAML): ``model`` (a Qwen2.5-VL / Qwen2-VL folder or repo id, or ``tiny:<family>``), ``data`` (``train``,
optional ``eval``: ``synthetic-judge:N``, the mining recipe's ``save_to_disk`` folder, or the authors' JSON;
``image_root``; ``image_size``), ``finetuning`` (lora | dora | full; LoRA r 128, alpha 256, dropout 0.05 on the
language model by default, vision tower frozen), ``adapter``, ``merge``, ``push_to_hub``, ``threads`` and
``training`` (fields of `UniMEV2RerankerTrainingArguments`: pairwise_weight, listwise_weight, listwise_negatives,
learning_rate...). A re-run of the same command resumes from the last checkpoint in ``training.output_dir``.
"""

import os

from trainers.recipe_runner import RERANKER, parse_recipe_arguments, run_training_recipe

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_training_recipe(RERANKER, parse_recipe_arguments(__doc__))
