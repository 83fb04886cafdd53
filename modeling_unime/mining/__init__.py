"""MLLM-as-a-Judge hard-negative mining (arXiv 2510.13515, "MLLM-as-a-Judge for Hard Negatives Mining").

global retrieval with an embedder -> judge scores of (query, positive) and every (query, candidate) -> false-negative
filter -> cyclical sampling -> a ``datasets.Dataset`` of `modeling_unime.data.JudgeRow` rows with ``judge_scores``
(index 0 = positive).

Two entry points share the same stages:

- `mine_hard_negatives`: in memory, one process, returns the dataset;
- `run_mining`: the recipe's engine. Queries are cut into shards spread over the processes of an ``accelerate``
  launch; each finished shard is written atomically; embeddings and judge scores are cached on disk by content, so a
  killed run restarted with the same command skips finished work and gives the same dataset.

One module per concern:

- `config`: `MiningConfig`, every knob (the paper's defaults);
- `inputs`: reading and checking the (query, positive) rows, the candidate pool, exclusions, their embeddings;
- `judging`: the judge as mining calls it (`RootedJudge`: image paths under the run's root; `CachedJudge`: scores
  on disk); the judge interface and its cache key live in `modeling_unime.judge`;
- `rules`: the selection rules around the judge (`false_negative_filter`, `cyclical_sample`, the empty-set fallback);
- `stats`: `SelectionStats`, what each rule did, and the report with its degenerate-run warnings;
- `selection`: retrieval, judging and selection of rows, `mine_hard_negatives`, the report;
- `sharded`: `run_mining` and its shard files;
- `hub`: the Hub folder and the upload;
- `recipe`: the mining recipe (``recipes/mine_hard_negatives.py``) on the recipe engine.

Cache keys: an embedding is keyed by the embedder's fingerprint (every byte of its weights, its config, its processor
and image rule: `modeling_unime.util.fingerprint`) and the item (text, image path, absolute image root); a judge score
by the judge's fingerprint (weights and every scoring setting: `modeling_unime.judge.judge_fingerprint`) and the pair
(query, candidate, absolute image root). A changed setting never reuses a stale entry. Caches are disposable: a
damaged embedding part, judge-log line or finished shard is reported (``DamagedCacheWarning``, naming the file) and
recomputed.

The summary (printed, ``summary.txt``, ``summary.json``) ends with WARNING lines when the run is degenerate
(`SelectionStats.degenerate_warnings`: most queries on the empty-set fallback, the filter removing nearly everything,
or a judge at chance); runs that print nothing raise a `DegenerateMiningWarning` instead.
"""

from __future__ import annotations

from .config import MiningConfig
from .hub import push_mined_dataset, write_hub_folder
from .inputs import (
    MiningEmbeddings,
    MiningInputs,
    build_pool,
    check_images,
    count_duplicate_rows,
    embed_inputs,
    exclusions,
    read_pairs,
    retrieval_device,
)
from .judging import CachedJudge, RootedJudge, judge_fingerprint, judge_settings
from .selection import (
    DegenerateMiningWarning,
    mine_hard_negatives,
    mine_rows,
    mining_report,
    select_negatives,
    to_dataset,
)
from .sharded import read_shard, run_mining, shard_path, shard_rows, shards_of_process

__all__ = [
    "CachedJudge",
    "DegenerateMiningWarning",
    "MiningConfig",
    "MiningEmbeddings",
    "MiningInputs",
    "RootedJudge",
    "build_pool",
    "check_images",
    "count_duplicate_rows",
    "embed_inputs",
    "exclusions",
    "judge_fingerprint",
    "judge_settings",
    "mine_hard_negatives",
    "mine_rows",
    "mining_report",
    "push_mined_dataset",
    "read_pairs",
    "read_shard",
    "retrieval_device",
    "run_mining",
    "select_negatives",
    "shard_path",
    "shard_rows",
    "shards_of_process",
    "to_dataset",
    "write_hub_folder",
]
