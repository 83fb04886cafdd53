"""Mine judge-scored hard negatives (UniME-V2's MLLM-as-a-Judge pipeline, arXiv 2510.13515 "MLLM-as-a-Judge for Hard Negatives Mining") into a
`datasets` dataset.

    accelerate launch recipes/mine_hard_negatives.py --config recipes/configs/mine-tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/mine_hard_negatives.py --config ... [--push_to_hub ORG/NAME]

Queries are split into shards over the processes; finished shards, embeddings and judge scores are kept under
``output_dir``, so re-running a killed command with the same arguments resumes and gives the same dataset.

Arguments: the fields of `MiningScriptArguments` (data, models, placement, output) and of
`modeling_unime.mining.MiningConfig` (the ``mining:`` section of the YAML file), from ``--config FILE.yaml`` and the
command line (a flag overrides the file; a key that names no field is an error); ``--help`` lists them all.

The output folder gets ``summary.txt`` (the printed report; a degenerate run ends with WARNING lines saying why and what
to do) and ``summary.json`` (the merged statistics, the degenerate-run reasons, and per shard its query count and the
process that mined it).

Both models run on the process's device (``cuda:<local rank>`` under ``accelerate launch`` on a GPU node, else
``cpu``). ``dtype: auto`` (default) is bfloat16 on a GPU and float32 on CPU; ``attn_implementation: auto``
(default) is flash_attention_2 where flash-attn is installed on a GPU (and the dtype is half precision), else sdpa.
Each process prints where its models are (``placement: ...``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "0")

import torch  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402

from modeling_unime import UniMEV2Model  # noqa: E402
from modeling_unime.card import render_dataset_card  # noqa: E402
from modeling_unime.data import load_official_json  # noqa: E402
from modeling_unime.judge import Judge, MLLMJudge  # noqa: E402
from modeling_unime.judge_server import LOGPROBS_MODES, ServerJudge  # noqa: E402
from modeling_unime.mining import MiningConfig, push_mined_dataset, run_mining  # noqa: E402
from modeling_unime.placement import (  # noqa: E402
    ATTN_IMPLEMENTATIONS,
    DTYPE_NAMES,
    Placement,
    describe,
    placement,
    process_state,
)
from modeling_unime.testing import SYNTHETIC_COLOURS, SYNTHETIC_SHAPES, synthetic_pairs  # noqa: E402
from modeling_unime.util.arguments import parse_recipe_arguments  # noqa: E402
from modeling_unime.util.models import load_model_spec  # noqa: E402

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
                "data, a stand-in for a strong judge)"})
    image_root: str | None = field(default=None, metadata={
        "help": "folder the image paths of data are relative to (synthetic:N default: output_dir/images)"})
    judge_server: str | None = field(default=None, metadata={
        "help": "score on an OpenAI-compatible server (vLLM) at this URL, serving the model named by judge (its "
                "processor is loaded from there)"})
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
        return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines() if line.strip()]), image_root
    content = json.loads(path.read_text(encoding="utf-8"))
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
        return SyntheticOracleJudge()
    return MLLMJudge(*load_model_spec(spec, "judge", where), **judge_kwargs)


class SyntheticOracleJudge:
    """The ground-truth judge of the ``synthetic:N`` data (``judge: oracle``): scores from the colour and shape each
    image path (``shapes/<colour>-<shape>.png``) and each text names, with `modeling_unime.testing.oracle_score`'s
    graded credit: 0.95 for a match, 0.5 for one attribute in common (captions), 0.05 for none. A candidate of the
    wrong kind for the query (an image offered as a colour answer, a text offered as an image) scores 0.05.

    A stand-in for a strong MLLM judge, so that the tiny demo shows what mining gives when the judge tells positives
    from negatives; it reads nothing but the paths and texts, and runs in no time.

    Example:
        >>> judge = SyntheticOracleJudge()
        >>> judge.score("<|image_1|>\\nWhat colour is the shape?", "shapes/red-circle.png",
        ...             [("red", None), ("blue", None), (None, "shapes/red-square.png")]).tolist()
        [0.95, 0.05, 0.05]
        >>> judge.score("Find an image of a red circle.", None,
        ...             [(None, "shapes/red-circle.png"), (None, "shapes/red-square.png"), ("red", None)]).tolist()
        [0.95, 0.5, 0.05]
    """

    MATCH, PARTIAL, MISS = 0.95, 0.5, 0.05

    @staticmethod
    def _from_path(path: str) -> tuple[str | None, str | None]:
        colour, _, shape = Path(path).stem.partition("-")
        return (colour or None, shape or None)

    @staticmethod
    def _from_text(text: str | None) -> tuple[str | None, str | None]:
        words = set((text or "").replace(".", " ").replace("?", " ").split())
        return (next((colour for colour in SYNTHETIC_COLOURS if colour in words), None),
                next((shape for shape in SYNTHETIC_SHAPES if shape in words), None))

    def _score(self, query_text: str | None, query_image: str | None,
               candidate: tuple[str | None, str | None]) -> float:
        text, image = candidate
        if query_image is not None:  # "What colour is the shape?": a colour word answers it
            if image is not None:
                return self.MISS
            return self.MATCH if self._from_text(text)[0] == self._from_path(query_image)[0] else self.MISS
        if image is None:  # a caption asks for an image
            return self.MISS
        wanted, offered = self._from_text(query_text), self._from_path(image)
        shared = sum(a == b and a is not None for a, b in zip(wanted, offered))
        return self.MATCH if shared == 2 else self.PARTIAL if shared == 1 else self.MISS

    def score(self, query_text: str | None, query_image: str | None,
              candidates: Sequence[tuple[str | None, str | None]]) -> torch.Tensor:
        return torch.tensor([self._score(query_text, query_image, tuple(c)) for c in candidates], dtype=torch.float64)


def main(argv: Sequence[str] | None = None) -> None:
    script, config = parse_arguments(argv)
    output_dir = Path(script.output_dir)
    torch.set_num_threads(script.threads)
    state = process_state()

    synthetic = script.data.startswith(SYNTHETIC_PREFIX)
    image_root = script.image_root or (str(output_dir / "images") if synthetic else None)
    dataset, image_root = load_pairs(script.data, image_root, state)
    where = placement(script.dtype, script.attn_implementation, state.device)
    embedder = load_embedder(script.embedder, where)
    if script.judge == "oracle" and not synthetic:
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
    else:
        judge = load_judge(script.judge, where, official_compat=script.official_compat,
                           batch_size=script.judge_batch_size)
        judge_place = describe(judge.model, "judge") if hasattr(judge, "model") else "judge: oracle (no model)"
    print(f"placement: process {state.process_index}: {describe(embedder, 'embedder')}; {judge_place}", flush=True)
    mined = run_mining(dataset, embedder, judge, output_dir, config, image_root=image_root, state=state)
    if not state.is_main_process:
        return
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
        url = push_mined_dataset(mined, card, script.push_to_hub, output_dir / "hub")
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
