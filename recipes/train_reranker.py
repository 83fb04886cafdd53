"""Train a UniME-V2 reranker (pairwise Yes/No + listwise index) on a judge-scored dataset.

    accelerate launch recipes/train_reranker.py --config recipes/configs/reranker-tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/train_reranker.py \\
        --config recipes/configs/reranker-tiny-cpu.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train_reranker.py \\
        --config recipes/configs/reranker-qwen25vl-7b.yaml [--push_to_hub ORG/NAME]

Config (YAML) and flags, as in TRL's scripts: every field below is a key of the file and a flag (the flag wins);
``python recipes/train_reranker.py --help`` lists them. Top-level keys: ``model`` (a Qwen2.5-VL / Qwen2-VL folder or
repo id, or ``tiny:<family>``), ``dtype``, ``attn_implementation``, ``finetuning`` (lora | dora | full; by default
the paper's LoRA r 128, alpha 256, dropout 0.05 on the language model, vision tower frozen), ``merge``,
``image_resize``, ``push_to_hub``, ``threads``. Sections: ``data:`` (flags ``--data_<key>``: ``train``, optional
``eval``: ``synthetic-judge:N``, the mining recipe's ``save_to_disk`` folder, or the authors' JSON; ``image_root``;
``image_resize``), ``adapter:`` (flags ``--adapter_<key>``) and ``training:`` (the fields of
`UniMEV2RerankerTrainingArguments` and `transformers.TrainingArguments`, flags without prefix: pairwise_weight,
listwise_weight, listwise_negatives, learning_rate, output_dir...). A key that names no field is an error. A re-run of
the same command resumes from the last checkpoint in ``output_dir``.
"""

import os

from modeling_unime.recipe_engine import finish_distributed
from trainers.recipe_runner import RERANKER, parse_training_recipe, run_training_recipe

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_training_recipe(RERANKER, parse_training_recipe(RERANKER, description=__doc__))
    finish_distributed()
