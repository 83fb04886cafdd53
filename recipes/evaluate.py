"""Evaluate a UniME-V2 embedder (and optionally a reranker) on MMEB, zero-shot retrieval and SugarCrepe.

    accelerate launch recipes/evaluate.py --config recipes/configs/eval-tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 8 recipes/evaluate.py --config recipes/configs/eval-unime-v2-2b.yaml

Encoding is split over the processes; embeddings are cached on disk under ``output_dir/cache`` (keyed by model and
content), so an interrupted run resumes. Writes ``results.json``, ``results.md`` (tables in the paper's layout, with
the published number beside ours where the model is a released one) and per-dataset predictions.

Config (YAML): ``model`` (folder / repo id / ``tiny:<family>``), ``reranker`` (optional, same forms), ``output_dir``,
``batch_size``, ``threads``, and any of ``mmeb`` (``root``, ``image_root``, ``datasets``, ``rerank_top_k``),
``retrieval`` (``<set name>: {folder, image_root}`` for flickr30k, coco, sharegpt4v, urban1k) and ``sugarcrepe``
(``annotations``, ``image_root``).
"""

import os

# This script shares its name with the `evaluate` library; evaluation.metrics imports the library around it.
from evaluation.harness import parse_evaluation_arguments, run_evaluation

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_evaluation(parse_evaluation_arguments(__doc__))
