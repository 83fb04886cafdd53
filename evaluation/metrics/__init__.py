"""The package's metrics as local `evaluate` modules, loadable offline.

Each metric lives in ``evaluation/metrics/<name>/<name>.py`` (`evaluate.load` on a folder imports the script named
like the folder):

- ``precision_at_1``: MMEB; ``compute(predictions=[top index], references=[positive index])``.
- ``retrieval_recall``: image-text retrieval; ``compute(predictions=[[ranked indices]], references=[[relevant]],
  k=[1, 5, 10])`` -> ``{"recall@1": ..., ...}``, a hit when any relevant item is in the top k.
- ``pairwise_accuracy``: SugarCrepe; ``compute(positive_scores=[...], negative_scores=[...])`` -> ``{"accuracy"}``,
  strict ``>`` (ties are wrong).

>>> from evaluation.metrics import load_metric
>>> load_metric("precision_at_1").compute(predictions=[0, 1], references=[0, 0])
{'precision_at_1': 0.5}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import evaluate

METRICS_DIR = Path(__file__).resolve().parent


def available_metrics() -> list[str]:
    """Names of the metric modules beside this file (folders holding a script of the same name)."""
    return sorted(folder.name for folder in METRICS_DIR.iterdir() if (folder / f"{folder.name}.py").is_file())


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of this package's metrics with `evaluate.load` from its absolute folder (no Hub access).

    Args:
        name: a metric name, e.g. ``"retrieval_recall"`` (see `available_metrics`).
        **load_kwargs: passed to `evaluate.load`. ``keep_in_memory`` defaults to True: the callers here compute in
            one process, and an on-disk cache leaves a file lock behind when a compute raises, which stalls the next
            load of the same metric for a second. Pass ``keep_in_memory=False`` (with ``num_process``/``process_id``)
            for evaluate's multi-process gathering.

    Raises:
        ValueError: unknown name; the message lists the available ones and the folder searched.
    """
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise ValueError(
            f"Unknown metric {name!r}: no {folder / (name + '.py')}. Available metrics in {METRICS_DIR}: "
            f"{', '.join(available_metrics())}."
        )
    load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(folder), **load_kwargs)


__all__ = ["METRICS_DIR", "available_metrics", "load_metric"]
