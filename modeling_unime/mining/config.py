"""`MiningConfig`: every knob of the mining, its defaults the paper's (arXiv 2510.13515, "MLLM-as-a-Judge for Hard
Negatives Mining")."""

from __future__ import annotations

from dataclasses import dataclass, field

from .cascade import JUDGE_MODES
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
    judge_mode: str = field(default="full", metadata={
        "choices": JUDGE_MODES,
        "help": "full (the large judge scores every pair, the paper), cascade (only the pairs whose score could "
                "change the selection; the rest keep a calibrated estimate: modeling_unime.mining.cascade) or top_m "
                "(the positive and the cascade_top_m most similar candidates: the naive baseline)"})
    judge_budget: float | None = field(default=None, metadata={
        "help": "cascade: at most this share of each query's 1 + top_k pairs goes to the large judge (e.g. 0.25); "
                "unset: as many as the cascade's rules ask for"})
    cascade_margin: float = field(default=2.0, metadata={
        "help": "cascade: judge a candidate whose estimate +- margin * sigma contains the false-negative threshold"})
    cascade_tail: float = field(default=0.01, metadata={
        "help": "cascade: the residual quantiles (tail and 1 - tail, per similarity bin) that widen an estimate's "
                "interval where the judge was seen to stray further than margin * sigma"})
    cascade_sigma_floor: float = field(default=0.05, metadata={
        "help": "cascade: the smallest uncertainty an estimate is given (a calibration bin that happened to agree "
                "must not look certain)"})
    cascade_calibration_share: float = field(default=0.05, metadata={
        "help": "cascade: share of the queries judged in full to calibrate the estimates"})
    cascade_calibration_min_rows: int = field(default=20, metadata={
        "help": "cascade: at least this many calibration queries (all of them in a smaller dataset)"})
    cascade_exact_labels: bool = field(default=True, metadata={
        "help": "cascade: judge every selected negative, so that every soft label is a judge score"})
    cascade_label_weight: float = field(default=1e-3, metadata={
        "help": "cascade: a picked negative keeps its estimate when its soft-label weight against the positive, "
                "exp((s - s_pos) / cascade_label_temperature), stays below this even at the top of its interval (its "
                "label then changes nothing the training sees); 0: judge every picked negative"})
    cascade_label_temperature: float = field(default=0.02, metadata={
        "help": "cascade: the soft labels' temperature tau the label weight is measured at (the training's, the "
                "paper's 0.02)"})
    cascade_top_m: int = field(default=10, metadata={"help": "top_m: how many of the most similar candidates to judge"})
    cascade_audit: bool = field(default=False, metadata={
        "help": "cascade: also judge every pair and report how far the cascade's selection is from the full judge's "
                "(identical sets, overlap, fallback agreement, soft-label KL, estimate error)"})

    def __post_init__(self) -> None:
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval={self.retrieval!r}: use 'exact' or 'faiss'.")
        if self.judge_mode not in JUDGE_MODES:
            raise ValueError(f"judge_mode={self.judge_mode!r}: use one of {list(JUDGE_MODES)}.")
        if self.judge_budget is not None and not 0 < self.judge_budget <= 1:
            raise ValueError(f"judge_budget={self.judge_budget}: a share of each query's pairs, in (0, 1].")
        if not 0 < self.cascade_calibration_share <= 1:
            raise ValueError(f"cascade_calibration_share={self.cascade_calibration_share}: a share in (0, 1].")
        if not 0 <= self.cascade_tail < 0.5:
            raise ValueError(f"cascade_tail={self.cascade_tail}: a quantile level in [0, 0.5).")
        if not 0 <= self.cascade_label_weight < 1 or self.cascade_label_temperature <= 0:
            raise ValueError(f"cascade_label_weight={self.cascade_label_weight} must be in [0, 1) and "
                             f"cascade_label_temperature={self.cascade_label_temperature} positive.")
        if self.cascade_sigma_floor <= 0 or self.cascade_margin < 0:
            raise ValueError("cascade_sigma_floor must be positive and cascade_margin not negative, got "
                             f"{self.cascade_sigma_floor} and {self.cascade_margin}.")
