"""Judge throughput: naive per-pair generate vs batched single forward vs prefix-shared scoring, in one run.

A tiny Qwen2.5-VL judge with the real 151,936-token vocabulary (hidden 256, 4 layers); query images of 448x448
(256 merged visual tokens); 50 candidates per query: text candidates of 5-20 tokens, then a second case with image
candidates (112x112 + a few words).

(a) naive: one ``generate(max_new_tokens=1, output_scores=True)`` per pair, as the released scores were made;
(b) batched: whole prompts, left-padded, one forward per batch, logits at the last position only;
(c) shared: the query prefix encoded once, its key/value cache reused for all candidates.

    python benchmarks/judge_throughput.py [--threads 1] [--queries 1] [--candidates 50]

Last line: JSON with naive_pairs_per_s, batched_pairs_per_s, shared_pairs_per_s, speedup_vs_naive (text
candidates), speedup_vs_naive_image_candidates, max_abs_diff (largest |P(Yes) difference| of (b) or (c) vs (a)).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_unime.judge import MLLMJudge  # noqa: E402
from modeling_unime.testing import build_tiny_judge  # noqa: E402

WORDS = "red green blue yellow circle square triangle car dog cat street photo of a the with next to".split()


def noise_image(side: int, seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (side, side, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_case(queries: int, candidates: int, image_candidates: bool, tokenizer, seed: int = 0):
    rng = random.Random(seed)
    cases = []
    for query in range(queries):
        query_item = ("What is shown in the image? Describe the main object.", noise_image(448, 1000 + query))
        items = []
        for index in range(candidates):
            if image_candidates:
                items.append((" ".join(rng.choices(WORDS, k=rng.randint(1, 3))), noise_image(112, 10 * query + index)))
                continue
            target = rng.randint(5, 20)
            words = []
            while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < target:
                words.append(rng.choice(WORDS))
            items.append((" ".join(words), None))
        cases.append((query_item, items))
    return cases


def naive_scores(judge: MLLMJudge, cases) -> torch.Tensor:
    """One generate call per pair with output_scores, P(Yes) over [Yes, No] from the first step's scores."""
    scores = []
    for query, items in cases:
        for candidate in items:
            images = [image for image in (query[1], candidate[1]) if image is not None]
            batch = judge.processor(text=[judge.render(query, candidate)], images=images, return_tensors="pt")
            with torch.inference_mode():
                out = judge.model.generate(
                    **batch, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
                )
            scores.append(torch.softmax(out.scores[0][0, judge.answer_token_ids].float(), dim=0)[0])
    return torch.stack(scores)


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps ratios stable on shared CPUs)")
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_tiny_judge(
        "qwen2_5_vl", real_vocab=True, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
        max_pixels=1024 * 28 * 28,
    )
    model.generation_config.repetition_penalty = 1.0  # raw logits in (a), as in (b) and (c)
    judge = MLLMJudge(model, processor, batch_size=args.batch_size)
    text_cases = make_case(args.queries, args.candidates, False, processor.tokenizer)
    image_cases = make_case(args.queries, args.candidates, True, processor.tokenizer, seed=1)
    pairs = args.queries * args.candidates

    warm_up = [(text_cases[0][0], text_cases[0][1][:2])]
    naive_scores(judge, warm_up)
    judge.score(*warm_up[0][0], warm_up[0][1])

    results, differences = {}, []
    for name, cases in (("text", text_cases), ("image", image_cases)):
        naive_s, naive = timed(lambda: naive_scores(judge, cases))
        batched_s, batched = timed(
            lambda: judge.score_pairs([(query, candidate) for query, items in cases for candidate in items])
        )
        shared_s, shared = timed(lambda: torch.cat([judge.score(*query, items) for query, items in cases]))
        differences += [float((batched - naive).abs().max()), float((shared - naive).abs().max())]
        results[name] = {"naive": pairs / naive_s, "batched": pairs / batched_s, "shared": pairs / shared_s}
    visual_tokens = int(processor.image_processor(images=[text_cases[0][0][1]])["image_grid_thw"].prod()) // 4
    print(json.dumps(results))
    print(
        json.dumps(
            {
                "threads": args.threads,
                "pairs_per_case": pairs,
                "query_visual_tokens": visual_tokens,
                "vocab_size": model.config.text_config.vocab_size,
                "naive_pairs_per_s": round(results["text"]["naive"], 2),
                "batched_pairs_per_s": round(results["text"]["batched"], 2),
                "shared_pairs_per_s": round(results["text"]["shared"], 2),
                "speedup_vs_naive": round(results["text"]["shared"] / results["text"]["naive"], 2),
                "naive_pairs_per_s_image_candidates": round(results["image"]["naive"], 2),
                "shared_pairs_per_s_image_candidates": round(results["image"]["shared"], 2),
                "speedup_vs_naive_image_candidates": round(results["image"]["shared"] / results["image"]["naive"], 2),
                "max_abs_diff": max(differences),
            }
        )
    )


if __name__ == "__main__":
    main()
