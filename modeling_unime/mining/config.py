"""`MiningConfig`: every knob of the mining, its defaults the paper's (arXiv 2510.13515, "MLLM-as-a-Judge for Hard
Negatives Mining")."""

from __future__ import annotations

from dataclasses import dataclass, field

from .rules import EMPTY_FALLBACKS

RETRIEVALS = ("exact", "faiss")


@dataclass
class MiningConfig:
    """Every knob of the mining; the defaults are the paper's (top-50 global retrieval, beta 0.01, 10 negatives,
    cyclical interval 5, the empty-set fallback scored 1.0).

    It is the ``mining:`` section of ``recipes/configs/mine-*.yaml`` (each field is also a flag of the recipe), and
    is stored in every finished shard: a run resumed with other settings is refused.
    """

    top_k: int = field(default=50, metadata={"help": "candidates retrieved per query (the paper: 50)"})
    similarity_threshold: float | None = field(default=None, metadata={
        "help": "delta: drop candidates whose cosine similarity with the query is >= delta (off by default: the "
                "paper does not publish its value)"})
    beta: float = field(default=0.01, metadata={
        "help": "false-negative margin: a candidate the judge scores above s_pos - beta is dropped (0.01, the "
                "paper's supplement)"})
    num_negatives: int = field(default=10, metadata={"help": "negatives kept per query (the paper: 10)"})
    interval: int = field(default=5, metadata={
        "help": "step of the cyclical walk over the ranked candidates (the paper: 5)"})
    empty_fallback: str = field(default="paper", metadata={
        "choices": EMPTY_FALLBACKS,
        "help": "when the filter leaves no candidate: paper (random retrieved candidates, each scored 1.0) or drop "
                "(skip the query)"})
    seed: int = field(default=0, metadata={
        "help": "seeds the fallback's random choice, per row, so that every run and every process count agree"})
    batch_size: int = field(default=16, metadata={"help": "rows per embedding batch"})
    chunk_size: int = field(default=1024, metadata={"help": "pool rows per similarity block of the top-k search"})
    shard_size: int = field(default=256, metadata={
        "help": "queries per shard: the unit of work, of resumption and of the output files"})
    retrieval: str = field(default="exact", metadata={
        "choices": RETRIEVALS,
        "help": "exact (chunked top-k in torch) or faiss (exact inner-product index; pip install unime-v2[faiss])"})

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval={self.retrieval!r}: use 'exact' or 'faiss'.")
