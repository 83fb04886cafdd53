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
import sys

# This script shares its name with the `evaluate` library, which the metrics import: keep the script's folder off
# the import path so that `import evaluate` finds the library, not this file.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _here]

from evaluation.harness import parse_evaluation_arguments, run_evaluation  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_evaluation(parse_evaluation_arguments(__doc__))
