"""Parity of `ServerJudge` on a real vLLM server with `MLLMJudge` (runs in the package's environment).

    python parity/vllm/parity_judge.py [--workdir DIR] [--atol 1e-5] [--venv_wait 0]

What it does:

1. saves a tiny Qwen2.5-VL judge (head_dim 32: vLLM's CPU attention takes 32/64/80...; its Yes row re-aimed so that
   P(Yes) spreads over (0, 1) and prompt or image mistakes move it visibly: `spread_answer_rows`) as a stock
   ``Qwen2_5_VLForConditionalGeneration`` checkpoint, with Qwen's ``repetition_penalty: 1.05`` in its
   ``generation_config.json`` as the real judge has (a judge that forgot to send the penalty would show);
2. serves it from the vLLM venv (``${UNIME_VLLM_VENV:-~/.cache/unime-v2/vllm-venv}``, built by
   ``parity/vllm/build_venv.sh``) on loopback::

       python -m vllm.entrypoints.openai.api_server --model DIR --enable-prefix-caching --dtype float32 \\
           --enforce-eager --logprobs-mode processed_logprobs ...

   (``VLLM_CPU_KVCACHE_SPACE=1``; ``processed_logprobs`` so that ``official_compat`` can be checked too);
3. scores text and image pairs with `ServerJudge` (HTTP) and with `MLLMJudge` (HF forward, this process) from the
   same folder, plain and with ``official_compat``; prints the per-query differences and, as its last line, one JSON
   object: ``max_abs_diff``, ``max_abs_diff_official_compat``, ``pairs``, ``prompts_verified``, timings. Exit status
   0 when both differences are within ``--atol``.

Some images have sides that are multiples of 28 (the Qwen resize keeps them), others (100x75, 61x47) are resized by
the processor: `ServerJudge` resizes those itself with PIL, as `MLLMJudge`'s processor does, before sending them.
``max_abs_diff_server_resize`` shows why: with ``resize_locally=False`` the server resizes with torchvision (vLLM's
transformers) and P(Yes) moves by about 1e-3.

Measured on a 2-core CPU (vllm-cpu 0.32.0, 2026-11-28): server ready in 24-60 s; 32 pairs, max |diff| 2.2e-6 plain
and 2.1e-6 with ``official_compat``; ``max_abs_diff_server_resize`` 7.6e-4. ``pytest -m vllm
tests/test_judge_server.py`` runs this script.

The helpers (`save_judge`, `vllm_server`, `wait_for_venv`) are also used by ``benchmarks/judge_throughput.py --vllm``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SERVED_NAME = "tiny-judge"


def vllm_venv() -> Path:
    return Path(os.environ.get("UNIME_VLLM_VENV", Path.home() / ".cache" / "unime-v2" / "vllm-venv"))


def wait_for_venv(seconds: float) -> Path:
    """The vLLM venv's python once ``<venv>.ready`` exists (written by build_venv.sh), waiting up to ``seconds``."""
    venv = vllm_venv()
    ready = Path(f"{venv}.ready")
    deadline = time.monotonic() + seconds
    while not ready.exists():
        if time.monotonic() >= deadline:
            raise SystemExit(f"the vLLM venv is not ready ({ready} missing): run bash parity/vllm/build_venv.sh")
        time.sleep(10)
    return venv / "bin" / "python"


def save_tiny_judge(folder: str | os.PathLike, hidden_size: int = 128, num_hidden_layers: int = 2,
                    real_vocab: bool = False, max_pixels: int = 64 * 28 * 28) -> Path:
    """A tiny Qwen2.5-VL judge saved as a stock checkpoint vLLM serves (model, processor, chat template), its answer
    rows spread (`spread_answer_rows`) and Qwen's ``repetition_penalty: 1.05`` in ``generation_config.json``."""

    from modeling_unime.tiny import build_tiny_judge

    folder = Path(folder)
    model, processor = build_tiny_judge("qwen2_5_vl", hidden_size=hidden_size, num_attention_heads=hidden_size // 32,
                                        num_hidden_layers=num_hidden_layers, real_vocab=real_vocab,
                                        max_pixels=max_pixels)
    spread_answer_rows(model, processor)
    model.generation_config.repetition_penalty = 1.05  # as Qwen2.5-VL-7B-Instruct ships: the server would apply it
    model.generation_config.do_sample = False
    return save_judge(model, processor, folder)


def save_judge(model, processor, folder: str | os.PathLike) -> Path:
    """Save a Qwen2-VL/Qwen2.5-VL ``*ForConditionalGeneration`` judge and its processor as a folder vLLM serves."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    # transformers < 5.20 (vLLM's) builds the stock Qwen2_5_VLProcessor with a video processor: give it its config,
    # from the image processor's settings (this package's processors have none: they never read videos).
    saved = json.loads((folder / "processor_config.json").read_text())
    image = saved["image_processor"]
    video = {key: image[key] for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                         "size") if key in image}
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": saved["processor_class"], **video},
        indent=1))
    return folder


def spread_answer_rows(model, processor, target_std: float = 2.0) -> None:
    """Re-aim the Yes row of the LM head so that the Yes-No logit gap of the `cases` pairs has mean 0 and standard
    deviation ``target_std``: random weights give every pair nearly the same P(Yes), far from 0.5, where a wrong
    prompt or image would hardly move it (the derivative of the sigmoid vanishes)."""
    import torch

    from modeling_unime.judge import MLLMJudge

    judge = MLLMJudge(model, processor)
    hidden = []
    with torch.no_grad():
        for _, query, candidates in cases():
            for candidate in candidates:
                images = [image for image in (query[1], candidate[1]) if image is not None]
                batch = processor(text=[judge.render(query, candidate)], images=images or None, return_tensors="pt")
                hidden.append(model.base_model(**batch).last_hidden_state[0, -1])
        hidden = torch.stack(hidden)
        head = model.get_output_embeddings().weight
        yes, no = judge.answer_token_ids
        mean = hidden.mean(0)
        gap = head[yes] - head[no]
        gap = gap - (gap @ mean) / (mean @ mean) * mean  # no offset: the mean pair sits at P(Yes) = 0.5
        gap = gap * target_std / (hidden @ gap).std()
        head[yes] = head[no] + gap


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model_dir: str | os.PathLike, python: str | os.PathLike, log_path: str | os.PathLike,
                logprobs_mode: str = "processed_logprobs", ready_timeout: float = 600,
                extra_args: tuple[str, ...] = ()) -> Iterator[tuple[str, float]]:
    """(base URL, seconds to ready) of a vLLM OpenAI server on loopback serving ``model_dir``; stopped on exit."""
    port = free_port()
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--enable-prefix-caching", "--max-model-len", "4096",
        "--logprobs-mode", logprobs_mode, "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
        "--seed", "0", *extra_args,
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("PYTHONPATH", None)
    log = open(log_path, "w")
    start = time.monotonic()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                              cwd=tempfile.gettempdir())
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if server.poll() is not None:
                log.flush()
                tail = Path(log_path).read_text(errors="replace")[-4000:]
                raise SystemExit(f"the vLLM server exited ({server.returncode}) before it was ready:\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - start > ready_timeout:
                raise SystemExit(f"the vLLM server was not ready after {ready_timeout:.0f} s (log: {log_path})")
            time.sleep(1)
        yield url, time.monotonic() - start
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own session: its engine workers too
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def cases():
    """(name, query, candidates): image+text, text and image queries; text and image candidates."""
    import numpy as np
    from PIL import Image

    def noise(width: int, height: int, seed: int) -> Image.Image:
        return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))

    candidates = [
        ("red", None),
        ("a blue square next to a circle", None),
        ("green", Image.new("RGB", (56, 56), (0, 200, 0))),
        (None, Image.new("RGB", (84, 56), (0, 0, 200))),
        ("What colour is it? red", None),
        ("Yes", None),
        ("a photo", Image.new("RGB", (112, 56), (250, 250, 0))),
        ("noise", noise(61, 47, 1)),  # resized by the processor
    ]
    red = Image.new("RGB", (112, 84), (200, 30, 30))
    return [
        ("image+text query", ("What colour is the shape?", red), candidates),
        ("text query", ("a red circle", None), candidates),
        ("image query", (None, noise(112, 84, 2)), candidates),
        ("resized image query", ("What is shown?", noise(100, 75, 3)), candidates),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="folder for the checkpoint and the server log (default: a "
                        "temporary folder)")
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--venv_wait", "--venv-wait", type=float, default=0,
                        help="seconds to wait for the vLLM venv's .ready")
    parser.add_argument("--ready_timeout", "--ready-timeout", type=float, default=600)
    args = parser.parse_args()

    import torch

    from modeling_unime.judge import MLLMJudge
    from modeling_unime.judge.server import ServerJudge

    torch.set_num_threads(1)
    python = wait_for_venv(args.venv_wait)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="parity-judge-"))
    model_dir = save_tiny_judge(workdir / "tiny-judge")
    version = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True).stdout.strip()
    reference = MLLMJudge.from_pretrained(model_dir, dtype="float32", device="cpu")
    official_reference = MLLMJudge.from_pretrained(model_dir, dtype="float32", device="cpu", official_compat=True)
    results: dict = {"vllm": version, "model": "tiny Qwen2.5-VL (head_dim 32)", "per_query": {}}
    with vllm_server(model_dir, python, workdir / "server.log") as (url, ready_s):
        results["server_ready_s"] = round(ready_s, 1)
        judge = ServerJudge.from_pretrained(url, model_dir, logprobs_mode="processed_logprobs")
        official = ServerJudge.from_pretrained(url, model_dir, logprobs_mode="processed_logprobs",
                                               official_compat=True)
        plain_diffs, official_diffs, pairs, start = [], [], 0, time.perf_counter()
        print(f"vllm-cpu {version} at {url} (ready in {ready_s:.0f} s)")
        for name, query, candidates in cases():
            got = judge.score(query[0], query[1], candidates)
            expected = reference.score(query[0], query[1], candidates)
            got_official = official.score(query[0], query[1], candidates)
            expected_official = official_reference.score(query[0], query[1], candidates)
            plain_diffs.append(float((got - expected).abs().max()))
            official_diffs.append(float((got_official - expected_official).abs().max()))
            pairs += len(candidates)
            results["per_query"][name] = {"max_abs_diff": plain_diffs[-1], "official": official_diffs[-1],
                                          "server": [round(v, 6) for v in got.tolist()],
                                          "mllm_judge": [round(v, 6) for v in expected.tolist()]}
            print(f"  {name:<17} max |diff| plain {plain_diffs[-1]:.2e}, official_compat {official_diffs[-1]:.2e}; "
                  f"P(Yes) server {[round(v, 4) for v in got.tolist()]}")
        results["seconds_scoring"] = round(time.perf_counter() - start, 2)
        # Why ServerJudge resizes Qwen images itself (resize_locally): left to the server, a 100x75 image is resized
        # by torchvision there and by PIL in MLLMJudge's processor.
        _, odd, candidates = cases()[-1]
        server_resize = ServerJudge.from_pretrained(url, model_dir, logprobs_mode="processed_logprobs",
                                                    resize_locally=False)
        results["max_abs_diff_server_resize"] = float(
            (server_resize.score(*odd, candidates) - reference.score(*odd, candidates)).abs().max())
        server_resize.close()
        print(f"  (resize_locally=False, resized image query: max |diff| {results['max_abs_diff_server_resize']:.2e}: "
              "the server's torchvision resize)")
        scores = torch.tensor([v for entry in results["per_query"].values() for v in entry["mllm_judge"]])
        results.update(
            pairs=pairs,
            max_abs_diff=max(plain_diffs),
            max_abs_diff_official_compat=max(official_diffs),
            score_range=[round(float(scores.min()), 4), round(float(scores.max()), 4)],
            prompts_verified=judge.stats.prompts_verified + official.stats.prompts_verified,
            requests=judge.stats.requests + official.stats.requests,
            retries=judge.stats.retries + official.stats.retries,
        )
        judge.close()
        official.close()
    results["ok"] = results["max_abs_diff"] <= args.atol and results["max_abs_diff_official_compat"] <= args.atol
    print(f"ServerJudge (vLLM) vs MLLMJudge over {pairs} pairs: max |diff| {results['max_abs_diff']:.2e} plain, "
          f"{results['max_abs_diff_official_compat']:.2e} official_compat (atol {args.atol:g})")
    (workdir / "parity_judge.json").write_text(json.dumps(results, indent=1) + "\n")
    results.pop("per_query")
    print(json.dumps(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
