"""Mine judge-scored hard negatives (UniME-V2's MLLM-as-a-Judge pipeline) into a `datasets` dataset.

    accelerate launch recipes/mine_hard_negatives.py --config recipes/configs/mine-tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/mine_hard_negatives.py --config ... [--push_to_hub ORG/NAME]

Queries are split into shards over the processes; finished shards, embeddings and judge scores are kept under
``output_dir``, so re-running a killed command with the same arguments resumes and gives the same dataset.

Config (YAML): ``data`` (``synthetic:N``, the authors' judge-scored JSON, a JSON/JSONL list of rows with
query_text/query_image/pos_text/pos_image, or a folder written by ``save_to_disk``), ``image_root``, ``embedder``
(a UniME-V2 / backbone folder or repo id, or ``tiny:<family>``), ``judge`` (an image-text-to-text folder or repo id,
``tiny:<family>``, or ``oracle``: the ground truth of ``synthetic:N`` data, a stand-in for a strong judge; ``--judge``
overrides it), ``official_compat``, ``judge_batch_size``, ``dtype``, ``attn_implementation``, ``output_dir``,
``push_to_hub``, ``threads``, and ``mining`` (the fields of `MiningConfig`).

The output folder gets ``summary.txt`` (the printed report; a degenerate run ends with WARNING lines saying why and what
to do) and ``summary.json`` (the merged statistics, the degenerate-run reasons, and per shard its query count and the
process that mined it).

Both models run on the process's device (``cuda:<local rank>`` under ``accelerate launch`` on a GPU node, else
``cpu``). ``dtype: auto`` (default) is bfloat16 on a GPU and float32 on CPU; ``attn_implementation: auto``
(default) is flash_attention_2 where flash-attn is installed on a GPU (and the dtype is half precision), else sdpa.
Each process prints where its models are (``placement: ...``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "0")

import torch  # noqa: E402
import yaml  # noqa: E402
from datasets import Dataset, load_from_disk  # noqa: E402

from modeling_unime import UniMEV2Model  # noqa: E402
from modeling_unime.card import render_dataset_card  # noqa: E402
from modeling_unime.data import load_official_json  # noqa: E402
from modeling_unime.judge import MLLMJudge  # noqa: E402
from modeling_unime.judge_server import ServerJudge  # noqa: E402
from modeling_unime.mining import MiningConfig, distributed_state, push_mined_dataset, run_mining  # noqa: E402
from modeling_unime.placement import (  # noqa: E402
    ATTN_IMPLEMENTATIONS,
    DTYPE_NAMES,
    Placement,
    describe,
    place,
    placement,
    pretrained_kwargs,
)
from modeling_unime.testing import (  # noqa: E402
    SYNTHETIC_COLOURS,
    SYNTHETIC_SHAPES,
    build_tiny_judge,
    build_tiny_unime,
    synthetic_pairs,
)


def load_pairs(spec: str, image_root: str | None, state) -> tuple[Dataset, str | None]:
    """The (query, positive) rows to mine, and the image root their paths are relative to."""
    if spec.startswith("synthetic:"):
        with state.main_process_first():  # the main process draws the images, the others only read them
            return synthetic_pairs(int(spec.split(":", 1)[1]), image_root, write_images=state.is_main_process), image_root
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
    if spec.startswith("tiny:"):
        model, processor = build_tiny_unime(spec.split(":", 1)[1])
        model.processor = processor
        return place(model, where["device"], where["dtype"], where["attn_implementation"]).eval()
    return UniMEV2Model.from_pretrained(spec, **pretrained_kwargs(where)).eval()


def load_judge(spec: str, where: Placement, **judge_kwargs: Any) -> MLLMJudge | SyntheticOracleJudge:
    """The judge (an image-text-to-text folder / repo id, ``tiny:<family>``, or ``oracle``: the ground truth of the
    ``synthetic:N`` data, no model) on ``where``'s device and dtype."""
    if spec == "oracle":
        return SyntheticOracleJudge()
    if spec.startswith("tiny:"):
        model, processor = build_tiny_judge(spec.split(":", 1)[1])
        model = place(model, where["device"], where["dtype"], where["attn_implementation"])
        return MLLMJudge(model, processor, **judge_kwargs)
    return MLLMJudge.from_pretrained(
        spec, dtype=where["dtype"], device=where["device"], attn_implementation=where["attn_implementation"],
        **judge_kwargs,
    )


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

    def __init__(self) -> None:
        self.image_root = None

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

    def score(self, query_text: str | None, query_image: str | None, candidates) -> torch.Tensor:
        return torch.tensor([self._score(query_text, query_image, tuple(c)) for c in candidates], dtype=torch.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file (see recipes/configs/mine-*.yaml)")
    parser.add_argument("--output_dir", default=None, help="overrides output_dir of the config")
    parser.add_argument("--push_to_hub", default=None, help="dataset repo id to push to (overrides the config)")
    parser.add_argument("--seed", type=int, default=None, help="overrides mining.seed")
    parser.add_argument("--judge", default=None,
                        help="overrides judge: a folder / repo id, tiny:<family>, or oracle (synthetic data only)")
    parser.add_argument("--judge_server", default=None,
                        help="score on an OpenAI-compatible server (vLLM) at this URL, serving the model named by "
                             "judge (its processor is loaded from there); overrides judge_server")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="overrides dtype (default auto)")
    parser.add_argument("--attn_implementation", default=None, choices=ATTN_IMPLEMENTATIONS,
                        help="overrides attn_implementation (default auto)")
    args = parser.parse_args()
    settings = yaml.safe_load(Path(args.config).read_text())
    output_dir = Path(args.output_dir or settings.get("output_dir", "runs/mine"))
    mining_settings = dict(settings.get("mining") or {})
    if args.seed is not None:
        mining_settings["seed"] = args.seed
    config = MiningConfig(**mining_settings)
    torch.set_num_threads(int(settings.get("threads", 1)))
    state = distributed_state()

    image_root = settings.get("image_root") or (str(output_dir / "images") if settings["data"].startswith("synthetic:") else None)
    dataset, image_root = load_pairs(settings["data"], image_root, state)
    where = placement(args.dtype or settings.get("dtype", "auto"),
                      args.attn_implementation or settings.get("attn_implementation", "auto"), state.device)
    embedder = load_embedder(settings["embedder"], where)
    judge_spec = args.judge or settings["judge"]
    if judge_spec == "oracle" and not settings["data"].startswith("synthetic:"):
        raise ValueError(f"judge: oracle knows only the synthetic:N data, not data: {settings['data']!r}; name a "
                         "judge model (a folder or repo id) instead.")
    judge_server = args.judge_server or settings.get("judge_server")
    if judge_server:
        if judge_spec == "oracle" or judge_spec.startswith("tiny:"):
            raise ValueError(f"judge_server needs judge to name the served model's folder or repo id, not {judge_spec!r}.")
        judge = ServerJudge.from_pretrained(
            judge_server, judge_spec, official_compat=bool(settings.get("official_compat", False)),
            max_concurrency=int(settings.get("judge_concurrency", 16)),
            logprobs_mode=settings.get("judge_logprobs_mode", "raw_logprobs"),
            server_tag=settings.get("judge_server_tag"),
        )
        judge_place = f"judge: {judge!r}"
    else:
        judge = load_judge(judge_spec, where, official_compat=bool(settings.get("official_compat", False)),
                           batch_size=int(settings.get("judge_batch_size", 16)))
        judge_place = describe(judge.model, "judge") if hasattr(judge, "model") else "judge: oracle (no model)"
    print(f"placement: process {state.process_index}: {describe(embedder, 'embedder')}; {judge_place}", flush=True)
    mined = run_mining(dataset, embedder, judge, output_dir, config, image_root=image_root, state=state)
    if not state.is_main_process:
        return
    card = render_dataset_card(
        name=args.push_to_hub or settings.get("push_to_hub") or output_dir.name, rows=len(mined),
        embedder=settings["embedder"], judge=judge_spec, official_compat=getattr(judge, "official_compat", False),
        config=vars(config),
        instruction=getattr(judge, "instruction", "(none: the synthetic oracle reads the ground truth)"),
        report=(output_dir / "summary.txt").read_text(encoding="utf-8").strip(),
    )
    (output_dir / "dataset" / "README.md").write_text(card, encoding="utf-8")
    print(f"dataset saved to {output_dir / 'dataset'} ({len(mined)} rows)")
    repo_id = args.push_to_hub or settings.get("push_to_hub")
    if repo_id:
        url = push_mined_dataset(mined, card, repo_id, output_dir / "hub")
        print(f"pushed to {url}")


if __name__ == "__main__":
    main()
