"""The judge as mining calls it: image paths resolved against the run's image root (`RootedJudge`), and scores kept
on disk so that no (query, candidate) pair is scored twice, in one run or across runs (`CachedJudge`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..judge import Judge, judge_fingerprint, judge_settings
from ..util.embedding_cache import Item, item_key, root_key
from ..util.files import atomic_write, warn_damaged
from ..util.images import resolve_image_path

__all__ = ["CachedJudge", "RootedJudge", "judge_fingerprint", "judge_settings"]


class RootedJudge:
    """A `Judge` whose image paths are resolved under ``image_root`` (`modeling_unime.util.images.resolve_image_path`,
    made absolute) before the wrapped judge sees them: mining hands the run's image root to the judge this way, and
    never changes the judge's own ``image_root``. Without a root, paths go through as they are.

    Example:
        >>> class Echo:
        ...     def score(self, query_text, query_image, candidates):
        ...         print(query_image, [image for _, image in candidates])
        ...         return torch.zeros(len(candidates))
        >>> _ = RootedJudge(Echo(), "/data").score("q", "a.png", [("t", None), (None, "/abs/b.png")])
        /data/a.png [None, '/abs/b.png']
    """

    def __init__(self, judge: Judge, image_root: str | os.PathLike | None) -> None:
        self.judge = judge
        self.image_root = image_root

    def _resolve(self, image: str | None) -> str | None:
        if image is None or self.image_root is None:
            return image
        return os.path.abspath(resolve_image_path(image, self.image_root))

    def score(self, query_text: str | None, query_image: str | None, candidates: Sequence[Item]) -> torch.Tensor:
        return self.score_with_details(query_text, query_image, candidates)[0]

    def score_with_details(self, query_text: str | None, query_image: str | None, candidates: Sequence[Item]
                           ) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
        """The scores, and what the judge tells about each (an `EnsembleJudge`'s member scores; else None)."""
        return score_with_details(self.judge, query_text, self._resolve(query_image),
                                  [(text, self._resolve(image)) for text, image in candidates])


def score_with_details(judge: Any, query_text: str | None, query_image: Any, candidates: Sequence[Any]
                       ) -> tuple[Any, list[dict[str, Any] | None]]:
    """``judge.score_with_details`` where the judge has it (an ensemble, a cache of one), else its scores and None
    per candidate."""
    if hasattr(judge, "score_with_details"):
        return judge.score_with_details(query_text, query_image, candidates)
    return judge.score(query_text, query_image, candidates), [None] * len(candidates)


class CachedJudge:
    """Wraps a judge so that a (query, candidate) pair already scored, in this run or an earlier one, is not scored
    again. Scores are appended to ``<folder>/<fingerprint>/<writer>.jsonl`` after every query, one JSON object a
    line: ``key`` (hash of the query, the candidate and the absolute image root), ``score``, and the fields of
    `context` (the recipe records the ``shard`` being mined, so each log shows which shards its process mined).

    Image paths are relative to ``image_root``: they enter the keys as given, with the absolute root, and the judge
    receives them resolved (`RootedJudge`).

    A line that cannot be read (the last line of a log cut by a kill or a full disk) is reported with a
    `DamagedCacheWarning` naming the file and line, and its pair is scored again; the writer's own log is rewritten
    without it (atomically), so that new entries never join a cut line and the damage is reported once.

    A score computed in another batch can differ from a fresh one in the last bits (different padding), never more.
    """

    def __init__(
        self,
        judge: Judge,
        folder: str | os.PathLike,
        fingerprint: str,
        writer: str = "rank-0",
        image_root: str | os.PathLike | None = None,
    ) -> None:
        self.judge = RootedJudge(judge, image_root)
        self.folder = Path(folder) / fingerprint
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log = self.folder / f"{writer}.jsonl"
        self.scores: dict[str, float] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.pairs_scored = 0
        self.pairs_from_cache = 0
        self.context: dict[str, Any] = {}
        self._root_key = root_key(image_root)
        self.reload()
        self._repair_own_log()

    @staticmethod
    def _read_log(log: Path) -> tuple[list[tuple[str, float, str, Any]], list[tuple[int, str]]]:
        """((key, score, line, details) of every readable line, (line number, problem) of every damaged one) of a
        log."""
        entries, damaged = [], []
        text = log.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                entries.append((entry["key"], float(entry["score"]), line, entry.get("details")))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                damaged.append((number, f"{type(error).__name__}: {line[:80]!r}"))
        return entries, damaged

    def reload(self) -> None:
        """Read every log of the folder; a damaged line is reported (file and line) and its pair scored again."""
        for log in sorted(self.folder.glob("*.jsonl")):
            try:
                entries, damaged = self._read_log(log)
            except FileNotFoundError:
                continue
            for number, problem in damaged:
                warn_damaged(log, f"judge log line {number}", problem,
                              "the line is ignored and its pair is scored again.")
            self.scores.update((key, score) for key, score, _, _ in entries)
            self.details.update((key, details) for key, _, _, details in entries if details is not None)

    def _repair_own_log(self) -> None:
        """Rewrite this writer's log without its damaged lines (atomically) if it has any or its last line lacks a
        newline, so that new entries never join a cut line and the damage is reported once."""
        if not self.log.exists() or not self.log.stat().st_size:
            return
        with self.log.open("rb") as handle:
            handle.seek(-1, os.SEEK_END)
            ends_a_line = handle.read(1) == b"\n"
        entries, damaged = self._read_log(self.log)
        if damaged or not ends_a_line:
            text = "".join(line + "\n" for _, _, line, _ in entries)
            atomic_write(self.log, lambda temporary: temporary.write_text(text, encoding="utf-8"))

    def key(self, query_text: str | None, query_image: str | None, candidate: Item) -> str:
        """Cache key of one pair: the query, the candidate and the absolute image root their paths are under."""
        return item_key(query_text, query_image, candidate[0], candidate[1], self._root_key)

    def score(self, query_text: str | None, query_image: str | None, candidates: Sequence[Item]) -> torch.Tensor:
        return self.score_with_details(query_text, query_image, candidates)[0]

    def score_with_details(self, query_text: str | None, query_image: str | None, candidates: Sequence[Item]
                           ) -> tuple[torch.Tensor, list[dict[str, Any] | None]]:
        """The scores (from the logs where a pair was scored before) and each pair's details (an ensemble's member
        scores, logged with the score; None for a judge that gives none)."""
        keys = [self.key(query_text, query_image, candidate) for candidate in candidates]
        missing = [index for index, key in enumerate(keys) if key not in self.scores]
        unique_missing = list({keys[index]: index for index in reversed(missing)}.values())[::-1]
        if unique_missing:
            fresh, details = self.judge.score_with_details(query_text, query_image,
                                                           [candidates[index] for index in unique_missing])
            fresh = torch.as_tensor(fresh).reshape(-1).tolist()
            if len(fresh) != len(unique_missing):
                raise ValueError(f"the judge ({type(self.judge.judge).__name__}) answered {len(fresh)} score(s) for "
                                 f"{len(unique_missing)} candidate(s) of the query {query_text!r}, {query_image!r}.")
            with self.log.open("a", encoding="utf-8") as log:
                for index, score, detail in zip(unique_missing, fresh, details):
                    self.scores[keys[index]] = score
                    entry = {"key": keys[index], "score": score, **self.context}
                    if detail is not None:
                        self.details[keys[index]] = detail
                        entry["details"] = detail
                    log.write(json.dumps(entry) + "\n")
        self.pairs_scored += len(unique_missing)
        self.pairs_from_cache += len(candidates) - len(unique_missing)
        return (torch.tensor([self.scores[key] for key in keys], dtype=torch.float64),
                [self.details.get(key) for key in keys])
