"""Train a UniME-V2 embedder with soft-label distribution alignment on a judge-scored dataset.

    accelerate launch recipes/train_embedding.py --config recipes/configs/tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train_embedding.py --config recipes/configs/tiny-cpu.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train_embedding.py \\
        --config recipes/configs/qwen2vl-2b.yaml [--push_to_hub ORG/NAME]

Config (YAML) and flags, as in TRL's scripts: every field below is a key of the file and a flag (the flag wins);
``python recipes/train_embedding.py --help`` lists them. Top-level keys: ``model`` (a UniME-V2 / backbone folder or
repo id, or ``tiny:<family>``), ``dtype``, ``attn_implementation``, ``finetuning`` (dora | lora | full), ``merge``,
``image_resize``, ``push_to_hub``, ``threads``. Sections: ``data:`` (flags ``--data_<key>``: ``train`` and optional
``eval``, each ``synthetic-judge:N``, a ``save_to_disk`` folder from the mining recipe, or the authors' judge-scored
JSON; ``image_root``; ``image_resize``), ``adapter:`` (flags ``--adapter_<key>``: r, alpha, dropout...) and
``training:`` (the fields of `UniMEV2TrainingArguments` and `transformers.TrainingArguments`, flags without prefix:
loss, contrastive_temperature, num_negatives, gradcache, learning_rate, output_dir, max_steps...). A key that names no
field is an error. A re-run of the same command resumes from the last checkpoint in ``output_dir``.
"""

import os

from modeling_unime.recipe_engine import finish_distributed
from trainers.recipe_runner import EMBEDDER, parse_training_recipe, run_training_recipe

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_training_recipe(EMBEDDER, parse_training_recipe(EMBEDDER, description=__doc__))
    finish_distributed()
