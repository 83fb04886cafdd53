"""The judge cascade's budget curve: how close mining gets to the full judge's selection for a share of its calls,
against the naive baseline that judges the positive and the top-m most similar candidates (the same calibrated
estimates for the rest), in the same run.

The world: coloured shapes (10 colours x 5 shapes, 4 images of each: the other images of a caption are false negatives
the embedder cannot tell apart), three tasks (caption -> image, image -> caption, "what colour" -> colour word), 600
queries, a pool of 260 items, top-50 retrieval. The embedder is an attribute embedding with seeded noise per item
(``--noise``: how much of the judge the similarity can predict); the judge is the oracle over the ground truth
(`modeling_unime.tiny.OracleJudge`). Both are stand-ins: what a real MLLM judge gives is measured by the main job
(``recipes/pipeline.py``, its ``judge_budget`` table).

    python benchmarks/judge_cascade.py [--threads 1] [--queries 600] [--top_k 50] [--noise 0.35]

Each setting runs with the cascade's audit (the full judge on every pair, then a comparison): judge share (pairs the
large judge scored / all pairs, positives and calibration included), identical negative sets, mean overlap, mean
soft-label KL (tau 0.02), fallback agreement, mean |estimate - judge|. The cascade runs twice more: with exact labels
(``cascade_label_weight: 0``, every picked negative judged) and with a smaller judge as the cheap stage
(``cheap_judge``: the oracle's score plus seeded uniform noise of ``--cheap_noise`` per pair, a stand-in for a 2B
judge that agrees with the 7B one up to noise). Last line: JSON with every row, whether the cascade beats top-m at
every budget, and the smallest measured share that reaches 0.95 mean overlap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from modeling_unime.mining.selection import mine_with_pairs  # noqa: E402
from modeling_unime.tiny import OracleJudge, draw_shape  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "black", "orange", "purple", "brown", "gray", "pink")
SHAPES = ("circle", "square", "triangle", "pentagon", "star")
COPIES = 4
IMAGE_INSTRUCTION = "<|image_1|> Find an image caption describing the given image."
COLOUR_QUESTION = "<|image_1|> what color is the shape?"


def build_world(root: Path, queries: int, seed: int) -> tuple[Dataset, dict[str, dict[str, str]]]:
    """The rows (query, positive, task) and every image's attributes; images are drawn under ``root``."""
    rng = random.Random(seed)
    attributes = {}
    for colour in COLOURS:
        for shape in SHAPES:
            for copy in range(COPIES):
                relative = f"shapes/{colour}-{shape}-{copy}.png"
                path = root / relative
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    # the drawn shape is only for the image checks: the attribute embedder reads the attributes
                    draw_shape(colour, "square" if shape not in ("circle", "triangle") else shape, 28).save(path)
                attributes[relative] = {"colour": colour, "shape": shape}
    images = sorted(attributes)
    rows = []
    for index in range(queries):
        image = rng.choice(images)
        colour, shape = attributes[image]["colour"], attributes[image]["shape"]
        task = ("caption_to_image", "image_to_caption", "vqa_colour")[index % 3]
        if task == "caption_to_image":
            rows.append(dict(query_text=f"a {colour} {shape}", query_image=None, pos_text="", pos_image=image,
                             task=task))
        elif task == "image_to_caption":
            rows.append(dict(query_text=IMAGE_INSTRUCTION, query_image=image, pos_text=f"a {colour} {shape}",
                             pos_image=None, task=task))
        else:
            rows.append(dict(query_text=COLOUR_QUESTION, query_image=image, pos_text=colour, pos_image=None,
                             task=task))
    return Dataset.from_list(rows), attributes


class AttributeEmbedder:
    """An embedder that sees attributes through noise: one axis per colour and per shape, plus seeded Gaussian noise
    per item (the same item always gets the same vector), L2-normalised."""

    def __init__(self, judge: OracleJudge, noise: float, dimensions: int = 32) -> None:
        self.judge, self.noise, self.dimensions = judge, noise, dimensions

    def encode(self, texts, images, image_root=None, batch_size=16, **_):
        rows = []
        for text, image in zip(texts, images):
            found = self.judge.image_attributes(image) if image else self.judge.text_attributes(text)
            vector = torch.zeros(len(COLOURS) + len(SHAPES) + self.dimensions)
            if "colour" in found:
                vector[COLOURS.index(found["colour"])] = 1.0
            if "shape" in found:
                vector[len(COLOURS) + SHAPES.index(found["shape"])] = 1.0
            key = int.from_bytes(hashlib.sha256(repr((text, image)).encode()).digest()[:8], "big")
            vector[len(COLOURS) + len(SHAPES):] = self.noise * torch.randn(
                self.dimensions, generator=torch.Generator().manual_seed(key))
            rows.append(torch.nn.functional.normalize(vector, dim=0))
        return torch.stack(rows)


class ImageRootedOracle(OracleJudge):
    """The oracle, reading the attributes of the absolute image paths mining hands it."""

    def __init__(self, attributes: dict[str, dict[str, str]], root: Path) -> None:
        super().__init__(COLOURS, SHAPES, {str(root / path): value for path, value in attributes.items()})


class NoisyOracle:
    """The cheap stage's stand-in: the oracle's score plus seeded uniform noise in [-noise, noise] per pair."""

    def __init__(self, oracle: OracleJudge, noise: float) -> None:
        self.oracle, self.noise = oracle, noise

    def score(self, query_text, query_image, candidates):
        exact = self.oracle.score(query_text, query_image, candidates)
        return [float(value) + random.Random(repr((query_text, query_image, candidate))).uniform(-self.noise,
                                                                                                 self.noise)
                for value, candidate in zip(exact, candidates)]


def run(rows, embedder, judge, root, top_k, cheap_judge=None, **settings):
    started = time.perf_counter()
    result = mine_with_pairs(rows, embedder, judge, image_root=root, top_k=top_k, verbose=False, progress=False,
                             cheap_judge=cheap_judge, **settings)
    budget = result.stats.judge_budget()
    if result.stats.estimated_pairs == 0 and "audit_rows" not in budget:
        budget.update(identical_sets=1.0, mean_overlap=1.0, mean_soft_label_kl=0.0, fallback_agreement=1.0,
                      mean_estimate_error=0.0)
    keep = ("judge_share", "identical_sets", "mean_overlap", "mean_soft_label_kl", "fallback_agreement",
            "mean_estimate_error")
    return {key: round(float(budget[key]), 4) for key in keep if key in budget} | {
        "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--queries", type=int, default=600)
    parser.add_argument("--top_k", "--top-k", type=int, default=50)
    parser.add_argument("--noise", type=float, default=0.35)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.33, 0.5, 0.75])
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--tails", type=float, nargs="+", default=[0.01, 0.0],
                        help="cascade_tail of the adaptive runs (0: the largest residual seen in the bin)")
    parser.add_argument("--cheap_noise", "--cheap-noise", type=float, default=0.05,
                        help="noise of the smaller judge's stand-in (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="judge-cascade-"))
    rows, attributes = build_world(root, args.queries, args.seed)
    judge = ImageRootedOracle(attributes, root)
    embedder = AttributeEmbedder(judge, args.noise)
    common = dict(num_negatives=10, interval=5, beta=0.01, seed=args.seed, cascade_audit=True)
    results = {"full": run(rows, embedder, judge, root, args.top_k, **common), "cascade": [], "top_m": [],
               "cascade_adaptive": []}
    for budget in args.budgets:
        for mode in ("cascade", "top_m"):
            row = run(rows, embedder, judge, root, args.top_k, judge_mode=mode, judge_budget=budget, **common)
            results[mode].append({"budget": budget, **row})
            print(f"{mode:>8} budget {budget:.2f}: {row}", flush=True)
    for tail in args.tails:
        for margin in args.margins:
            row = run(rows, embedder, judge, root, args.top_k, judge_mode="cascade", cascade_margin=margin,
                      cascade_tail=tail, **common)
            results["cascade_adaptive"].append({"margin": margin, "tail": tail, **row})
            print(f"cascade margin {margin} tail {tail}: {row}", flush=True)
    results["cascade_exact_labels"] = run(rows, embedder, judge, root, args.top_k, judge_mode="cascade",
                                          cascade_label_weight=0.0, **common)
    print(f"cascade, exact labels: {results['cascade_exact_labels']}", flush=True)
    results["cascade_cheap_judge"] = run(rows, embedder, judge, root, args.top_k, judge_mode="cascade",
                                         cheap_judge=NoisyOracle(judge, args.cheap_noise), **common)
    print(f"cascade, cheap judge (noise {args.cheap_noise}): {results['cascade_cheap_judge']}", flush=True)
    # The cascade beats top-m at a budget when some cascade run spent no more and came closer to the full judge.
    cascade_points = results["cascade"] + results["cascade_adaptive"]
    beats = all(any(point["judge_share"] <= top_m["judge_share"] and point["mean_overlap"] > top_m["mean_overlap"]
                    and point["identical_sets"] >= top_m["identical_sets"] for point in cascade_points)
                for top_m in results["top_m"])
    reaching = [row["judge_share"] for row in cascade_points if row["mean_overlap"] >= 0.95]
    summary = {
        "queries": args.queries, "top_k": args.top_k, "noise": args.noise, "cheap_noise": args.cheap_noise,
        "threads": args.threads, "judge": "oracle",
        **results, "cascade_beats_top_m_at_every_budget": beats,
        "smallest_share_with_overlap_095": min(reaching) if reaching else None,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
