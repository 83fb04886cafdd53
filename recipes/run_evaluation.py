"""Evaluate a UniME-V2 embedder (and optionally a reranker) on MMEB, MMEB-V2, zero-shot retrieval and SugarCrepe.

    # the released 2B checkpoint and reranker, on data laid out as the authors' data/ folder (see README, Evaluation):
    accelerate launch recipes/run_evaluation.py --config recipes/configs/eval-unime-v2-2b.yaml --data_root /path/to/data
    accelerate launch --multi_gpu --num_processes 8 recipes/run_evaluation.py \\
        --config recipes/configs/eval-unime-v2-2b.yaml --data_root /path/to/data
    # a smoke test of the whole path on tiny random models (CPU, same data):
    python recipes/run_evaluation.py --config recipes/configs/eval-unime-v2-2b.yaml --data_root /path/to/data \\
        --model tiny:qwen2_vl --reranker tiny:qwen2_5_vl --image_resize native --reranker_image_resize native
    # MMEB-V2 (78 tasks; a clone of TIGER-Lab/MMEB-V2 and the Hub annotation repos, see README, MMEB-V2):
    accelerate launch recipes/run_evaluation.py --config recipes/configs/mmeb-v2-unime-v2-2b.yaml \\
        --data_root /path/to/data

Every relative data path of the config is resolved against ``data_root`` (flag or config key); the layout of each
benchmark folder is detected (MMEB-eval clone with eval_images/, royokong/*_test parquet clones or Karpathy JSON,
ShareGPT4V JSON, Urban1k folders, the sugar-crepe clone). Models go on this process's device (bf16 on GPU, float32 on
CPU by default). Encoding is split over the processes; embeddings are cached on disk under ``output_dir/cache`` (keyed
by model, content and the dtype / attention / image-size settings), so an interrupted run resumes. Writes
``results.json`` (scores, the settings used, the layouts detected), ``results.md`` (tables in the paper's layout, with
the published numbers beside ours for the released checkpoints) and per-dataset MMEB predictions.

Arguments: `evaluation.harness.EvaluationArguments`, from ``--config`` (YAML) and flags; every field is a flag (a flag
wins over the file), the YAML sections ``mmeb:``, ``mmeb_v2:``, ``retrieval:``, ``sugarcrepe:`` set the fields with
those prefixes (``mmeb: {tie_rule: strict}`` is ``--mmeb_tie_rule strict``), and a misspelt key is an error.
``--help`` lists them.
"""

import os

from evaluation.harness import parse_evaluation_arguments, run_evaluation

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_evaluation(parse_evaluation_arguments(__doc__))
