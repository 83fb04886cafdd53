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

import os

from trainers.recipe_runner import EMBEDDER, parse_recipe_arguments, run_training_recipe

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_training_recipe(EMBEDDER, parse_recipe_arguments(__doc__))
