"""The mining recipe (``recipes/mine_hard_negatives.py``): judge-scored hard negatives (arXiv 2510.13515,
"MLLM-as-a-Judge for Hard Negatives Mining") mined into a `datasets` dataset, on the recipe engine
(`modeling_unime.recipe_engine`).

Queries are split into shards over the processes; finished shards, embeddings and judge scores are kept under
``output_dir``, so re-running a killed command with the same arguments resumes and gives the same dataset.

Arguments: the fields of `MiningScriptArguments` (data, models, placement, output) and of
`modeling_unime.mining.config.MiningConfig` (the ``mining:`` section of the YAML file), from ``--config FILE.yaml``
and the command line (a flag overrides the file; a key that names no field is an error); ``--help`` lists them all.

The output folder gets ``summary.txt`` (the printed report; a degenerate run ends with WARNING lines saying why and what
to do) and ``summary.json`` (the merged statistics, the degenerate-run reasons, and per shard its query count and the
process that mined it).

Both models run on the process's device (``cuda:<local rank>`` under ``accelerate launch`` on a GPU node, else
``cpu``). ``dtype: auto`` (default) is bfloat16 on a GPU and float32 on CPU; ``attn_implementation: auto``
(default) is flash_attention_2 where flash-attn is installed on a GPU (and the dtype is half precision), else sdpa.
Each process prints where its models are (``placement: ...``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from ..data import load_official_json
from ..export.card import render_dataset_card
from ..judge import Judge, MLLMJudge
from ..judge.calibration import ContextualCalibration
from ..judge.ensemble import EnsembleJudge
from ..judge.server import LOGPROBS_MODES, ServerJudge
from ..model_specs import load_model_spec
from ..modeling_unime import UniMEV2Model
from ..placement import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, Placement, describe
from ..recipe_engine import finish_distributed, start_recipe
from ..tiny import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, OracleJudge, synthetic_pairs
from ..util.arguments import parse_recipe_arguments
from ..util.files import read_json, read_json_lines
from .config import MiningConfig
from .hub import push_mined_dataset
from .sharded import run_mining

SYNTHETIC_PREFIX = "synthetic:"


@dataclass
class MiningScriptArguments:
    """What to mine, with which models, where the output goes (the mining knobs are `MiningConfig`'s)."""

    data: str = field(metadata={
        "help": "synthetic:N (coloured shapes drawn under image_root), the authors' judge-scored JSON (its pairs are "
                "re-mined), a JSON/JSONL list of rows with query_text/query_image/pos_text/pos_image, or a "
                "save_to_disk folder"})
    embedder: str = field(metadata={
        "help": "the retrieval embedder: a UniME-V2 / backbone folder or repo id, or tiny:<family>"})
    judge: str = field(metadata={
        "help": "an image-text-to-text folder or repo id, tiny:<family>, or oracle (the ground truth of synthetic:N "
                "data, a stand-in for a strong judge); several, comma-separated: an ensemble (their mean score, each "
                "pair's disagreement in the judged-pairs table, their agreement in the summary)"})
    image_root: str | None = field(default=None, metadata={
        "help": "folder the image paths of data are relative to (synthetic:N default: output_dir/images)"})
    cheap_judge: str | None = field(default=None, metadata={
        "help": "judge_mode cascade: a smaller judge (folder, repo id or tiny:<family>) whose score of every pair, "
                "calibrated against judge, decides which pairs the large judge scores (default: the embedder's "
                "similarity)"})
    judge_server: str | None = field(default=None, metadata={
        "help": "score on an OpenAI-compatible server (vLLM) at this URL, serving the model named by judge (its "
                "processor is loaded from there); several URLs, comma-separated: the requests are spread over them "
                "and moved to another when one fails"})
    judge_concurrency: int = field(default=16, metadata={"help": "judge_server: requests in flight at once"})
    judge_logprobs_mode: str = field(default="raw_logprobs", metadata={
        "choices": LOGPROBS_MODES, "help": "judge_server: what the server's --logprobs-mode makes it return"})
    judge_server_tag: str | None = field(default=None, metadata={
        "help": "judge_server: anything else that changes the server's numbers (dtype, quantisation, revision); "
                "enters the judge cache key"})
    official_compat: bool = field(default=False, metadata={
        "help": "reproduce the released labels: the repetition penalty (1.05) on the Yes/No logits, as the "
                "authors' scoring code"})
    judge_batch_size: int = field(default=16, metadata={"help": "pairs (or candidates) per judge forward pass"})
    judge_calibration: str = field(default="none", metadata={
        "choices": ("none", "contextual"),
        "help": "contextual: divide the judge's Yes prior, measured per query on content-free candidates ('N/A', a "
                "blank image), out of its scores (modeling_unime.judge.calibration)"})
    dtype: str = field(default="auto", metadata={
        "choices": DTYPE_NAMES, "help": "model dtype; auto: bfloat16 on a GPU, float32 on CPU"})
    attn_implementation: str = field(default="auto", metadata={
        "choices": ATTN_IMPLEMENTATIONS,
        "help": "attention kernel; auto: flash_attention_2 where installed on a GPU in half precision, else sdpa"})
    output_dir: str = field(default="runs/mine", metadata={
        "help": "shards, caches, the dataset, summary.txt and summary.json go here"})
    push_to_hub: str | None = field(default=None, metadata={"help": "dataset repo id to push the mined dataset to"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads per process"})


def parse_arguments(argv: Sequence[str] | None = None) -> tuple[MiningScriptArguments, MiningConfig]:
    """The script arguments and the mining settings, from ``--config`` and the flags of ``argv``."""
    return parse_recipe_arguments([MiningScriptArguments, MiningConfig], argv, sections={"mining": ""},
                                  description=__doc__)


def load_pairs(spec: str, image_root: str | None, state) -> tuple[Dataset, str | None]:
    """The (query, positive) rows to mine, and the image root their paths are relative to."""
    if spec.startswith(SYNTHETIC_PREFIX):
        with state.main_process_first():  # the main process draws the images, the others only read them
            count = int(spec[len(SYNTHETIC_PREFIX):])
            return synthetic_pairs(count, image_root, write_images=state.is_main_process), image_root
    path = Path(spec)
    if path.is_dir():
        return load_from_disk(str(path)), image_root
    if not path.is_file():
        raise FileNotFoundError(f"data: {spec!r} is neither synthetic:N, a file nor a save_to_disk folder.")
    if path.suffix == ".jsonl":
        return Dataset.from_list(read_json_lines(path, "the mining recipe's data")), image_root
    content = read_json(path, "the mining recipe's data")
    if content and "hard_negatives" in content[0]:  # the authors' released file: re-mine its (query, positive) pairs
        return load_official_json(path, image_root).select_columns(["query_text", "query_image", "pos_text",
                                                                    "pos_image", "task", "source"]), image_root
    return Dataset.from_list(content), image_root


def load_embedder(spec: str, where: Placement) -> UniMEV2Model:
    """The embedder (a folder / repo id, or ``tiny:<family>``) on ``where``'s device, dtype and attention."""
    model, _ = load_model_spec(spec, "embedder", where)
    return model.eval()


def load_judge(spec: str, where: Placement, **judge_kwargs: Any) -> Judge:
    """The judge (an image-text-to-text folder / repo id, ``tiny:<family>``, or ``oracle``: the ground truth of the
    ``synthetic:N`` data, no model) on ``where``'s device and dtype."""
    if spec == "oracle":
        return OracleJudge(SYNTHETIC_COLOURS, SYNTHETIC_SHAPES)
    return MLLMJudge(*load_model_spec(spec, "judge", where), **judge_kwargs)


def run_mining_recipe(script: MiningScriptArguments, config: MiningConfig) -> Dataset | None:
    """Mine as the arguments say; returns the mined dataset on the main process (None on the others)."""
    output_dir = Path(script.output_dir)
    run = start_recipe(script.threads, script.dtype, script.attn_implementation)
    state, where = run.state, run.where

    synthetic = script.data.startswith(SYNTHETIC_PREFIX)
    image_root = script.image_root or (str(output_dir / "images") if synthetic else None)
    dataset, image_root = load_pairs(script.data, image_root, state)
    embedder = load_embedder(script.embedder, where)
    if "oracle" in [spec.strip() for spec in script.judge.split(",")] and not synthetic:
        raise ValueError(f"judge: oracle knows only the synthetic:N data, not data: {script.data!r}; name a "
                         "judge model (a folder or repo id) instead.")
    if script.judge_server:
        if script.judge == "oracle" or script.judge.startswith("tiny:"):
            raise ValueError(f"judge_server needs judge to name the served model's folder or repo id, not "
                             f"{script.judge!r}.")
        judge = ServerJudge.from_pretrained(
            script.judge_server, script.judge, official_compat=script.official_compat,
            max_concurrency=script.judge_concurrency, logprobs_mode=script.judge_logprobs_mode,
            server_tag=script.judge_server_tag,
        )
        judge_place = f"judge: {judge!r}"
    elif "," in script.judge:
        specs = [spec.strip() for spec in script.judge.split(",") if spec.strip()]
        members = [load_judge(spec, where, official_compat=script.official_compat, batch_size=script.judge_batch_size)
                   for spec in specs]
        judge = EnsembleJudge(members, names=specs)
        judge_place = "judge: ensemble of " + ", ".join(
            describe(member.model, spec) if hasattr(member, "model") else f"{spec} (no model)"
            for spec, member in zip(specs, members))
    else:
        judge = load_judge(script.judge, where, official_compat=script.official_compat,
                           batch_size=script.judge_batch_size)
        judge_place = describe(judge.model, "judge") if hasattr(judge, "model") else "judge: oracle (no model)"
    if script.judge_calibration == "contextual":
        judge = ContextualCalibration(judge)
        judge_place += " (contextual calibration of its Yes prior)"
    cheap_judge = None
    if script.cheap_judge:
        cheap_judge = load_judge(script.cheap_judge, where, official_compat=script.official_compat,
                                 batch_size=script.judge_batch_size)
        judge_place += "; cheap " + (describe(cheap_judge.model, "judge") if hasattr(cheap_judge, "model")
                                     else f"judge: {script.cheap_judge} (no model)")
    print(f"placement: process {state.process_index}: {describe(embedder, 'embedder')}; {judge_place}", flush=True)
    mined = run_mining(dataset, embedder, judge, output_dir, config, image_root=image_root, state=state,
                       cheap_judge=cheap_judge)
    if not state.is_main_process:
        return None
    card = render_dataset_card(
        name=script.push_to_hub or output_dir.name, rows=len(mined),
        embedder=script.embedder, judge=script.judge, official_compat=getattr(judge, "official_compat", False),
        config=vars(config),
        instruction=getattr(judge, "instruction", "(none: the synthetic oracle reads the ground truth)"),
        report=(output_dir / "summary.txt").read_text(encoding="utf-8").strip(),
    )
    (output_dir / "dataset" / "README.md").write_text(card, encoding="utf-8")
    print(f"dataset saved to {output_dir / 'dataset'} ({len(mined)} rows)")
    if script.push_to_hub:
        url = push_mined_dataset(mined, card, script.push_to_hub, output_dir / "hub",
                                 pairs=load_from_disk(str(output_dir / "judged_pairs")))
        print(f"pushed to {url}")
    return mined


def main(argv: Sequence[str] | None = None) -> Dataset | None:
    """The mining recipe: arguments from ``--config`` and the flags of ``argv``, then `run_mining_recipe`."""
    script, config = parse_arguments(argv)
    try:
        return run_mining_recipe(script, config)
    finally:
        finish_distributed()


__all__ = [
    "MiningScriptArguments",
    "SYNTHETIC_PREFIX",
    "load_embedder",
    "load_judge",
    "load_pairs",
    "main",
    "parse_arguments",
    "run_mining_recipe",
]
