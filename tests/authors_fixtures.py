"""Fixtures written by the UniME-V2 authors' own stack (transformers 4.49.0), for tests of the package (5.x).

`authors_fixtures()` returns the folder built by ``tests/fixtures/build_authors_checkpoints.py`` (see
tests/fixtures/README.md), building it first when it is missing or stale. Building needs pip access once (the
pinned transformers 4.49.0 goes into a side folder, never into the test environment); when it is impossible the
calling test is skipped with the command to run by hand.

    from tests.authors_fixtures import authors_fixtures, load_references

    root = authors_fixtures()                      # Path: root / "qwen2vl-2b", root / "references", ...
    refs = load_references("qwen2vl-2b")           # the JSON, plus refs["tensors"] from the .safetensors
    refs["tensors"]["single.caption"]              # float32 embedding of one row, embedded alone
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
BUILDER = FIXTURES_DIR / "build_authors_checkpoints.py"
OUTPUT = FIXTURES_DIR / "authors"
BUILD_COMMAND = "python tests/fixtures/build_authors_checkpoints.py --install"
NO_BUILD_ENV = "UNIME_AUTHORS_FIXTURES_NO_BUILD"  # set to 1: skip instead of building
REQUIRED_ENV = "UNIME_AUTHORS_FIXTURES_REQUIRED"  # set to 1 (CI): fail instead of skipping
BUILD_TIMEOUT_S = 1800


@lru_cache(maxsize=None)
def _builder():
    """The builder module (its top level imports only the standard library: no transformers 4.49 here)."""
    spec = importlib.util.spec_from_file_location("_build_authors_checkpoints", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _skip(reason: str) -> None:
    message = f"authors' fixtures unavailable: {reason}. Build them with: {BUILD_COMMAND}"
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(message)
    pytest.skip(message)


@lru_cache(maxsize=None)
def authors_fixtures() -> Path:
    """The built fixture folder; builds it (``--install``, in a subprocess) when missing or out of date."""
    builder = _builder()
    if builder.manifest_is_current(OUTPUT):
        return OUTPUT
    if os.environ.get(NO_BUILD_ENV) == "1":
        _skip(f"{OUTPUT} is missing or stale and {NO_BUILD_ENV}=1")
    FIXTURES_DIR.mkdir(parents=True, exist_ok=True)
    with open(FIXTURES_DIR / ".authors.lock", "w") as lock:  # one build at a time (e.g. pytest-xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not builder.manifest_is_current(OUTPUT):
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
                try:
                    result = subprocess.run(
                        [sys.executable, str(BUILDER), "--install", "--output", str(OUTPUT)],
                        env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
                    )
                except subprocess.TimeoutExpired:
                    _skip(f"the build took more than {BUILD_TIMEOUT_S} s")
                if result.returncode != 0 or not builder.manifest_is_current(OUTPUT):
                    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                    _skip(f"the build failed (exit {result.returncode}: {' | '.join(tail)})")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return OUTPUT


def load_references(name: str) -> dict[str, Any]:
    """references/<name>.json (``qwen2vl-2b``, ``qwen2vl-7b``, ``llava-ov-8b``, ``reranker-qwen25vl-7b``,
    ``token_counts``), with ``["tensors"]`` holding references/<name>.safetensors when there is one."""
    folder = authors_fixtures() / "references"
    path = folder / f"{name}.json"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.json"))
        raise FileNotFoundError(f"no reference {name!r}; available: {available}")
    data = json.loads(path.read_text())
    tensors_path = folder / f"{name}.safetensors"
    if tensors_path.is_file():
        from safetensors.torch import load_file

        data["tensors"] = load_file(tensors_path)
    return data


def authors_get_pred(qry_t, tgt_t, normalization=False, topk=10):
    """The body of ``get_pred`` in the authors' ``Embedding/evaluation/utils/utils.py`` (GaryGuTC/UniME-v2), replayed
    as written (numpy imported here); their eval.py counts a row right when ``pred[0] == 0``."""
    import numpy as np

    if normalization:
        qry_t_norm = np.linalg.norm(qry_t)
        tgt_t_norms = np.linalg.norm(tgt_t, axis=1)
        scores = np.dot(tgt_t, qry_t) / (tgt_t_norms * qry_t_norm)
    else:
        scores = np.dot(tgt_t, qry_t)
    topk = min(topk, len(scores))
    preds = np.argpartition(scores, -topk)[-topk:]
    preds = preds[np.argsort(-scores[preds])]
    return scores, preds
