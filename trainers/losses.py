"""Losses for UniME-V2 embedding training.

Each loss is a small ``nn.Module``: ``forward`` returns the scalar loss, ``parts`` returns the same loss
(still attached to the graph, under ``"loss"``) together with detached statistics for logging, so a
trainer calls ``parts`` once per step and needs no second forward.

Both losses take scores and embeddings as they come (any float dtype) and compute the softmax and the
divergences in at least float32, because bf16 logits divided by a temperature of 0.02 lose most of their
precision.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

__all__ = ["SoftLabelAlignmentLoss", "InfoNCELoss", "check_judge_scores"]


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def check_judge_scores(judge_scores: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first bad entry (batch row, candidate column) unless every judge score is a
    finite probability in [0, 1] (``judge_scores``: (batch, 1 + k), the positive first). A NaN target makes the
    soft-label loss NaN, and scores on another scale (0-100) give a softmax(score / 0.02) that is one-hot and a loss
    in the thousands, silently: both stop here.

    One host-device synchronisation per call (negligible next to a forward pass of the embedder).

    Example:
        >>> check_judge_scores(torch.tensor([[0.9, 0.1], [1.0, 0.0]]))
        >>> check_judge_scores(torch.tensor([[0.9, 0.1], [87.5, 12.0]]))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: judge_scores[1, 0] = 87.5 (batch row 1, candidate 0 = the positive) is outside [0, 1]: ...
    """
    scores = judge_scores.detach().reshape(-1, judge_scores.shape[-1]) if judge_scores.dim() else judge_scores
    bad = ~(torch.isfinite(scores) & (scores >= 0) & (scores <= 1))
    if not bool(bad.any()):
        return
    row, column = (int(index) for index in bad.nonzero()[0])
    value = float(scores[row, column])
    where = (f"judge_scores[{row}, {column}] = {value!r} (batch row {row}, candidate {column}"
             f"{' = the positive' if column == 0 else ''})")
    problem = "is not a finite number" if not math.isfinite(value) else "is outside [0, 1]"
    raise ValueError(
        f"{where} {problem}: judge scores are the judge's P(Yes) / (P(Yes) + P(No)), probabilities in [0, 1]. "
        "Re-score or drop the row; scores on a 0-100 scale must be divided by 100. (UniMEV2Collator names the "
        "dataset row by its query text.)"
    )


class SoftLabelAlignmentLoss(nn.Module):
    r"""Judgment-based distribution alignment (arXiv 2510.13515, "MLLM Judgment Based Training Framework"): the
    symmetric KL divergence between the embedder's and the judge's distributions over each query's own candidates.

    Inputs:
        similarities: (batch, 1 + k) cosine similarities between each query and its candidates
            ``[positive, negative_1, ..., negative_k]``; the positive is column 0.
        judge_scores: (batch, 1 + k) MLLM-judge scores of the same pairs, in the same order, probabilities in
            [0, 1] (anything else, NaN included, raises ``ValueError`` naming the entry: `check_judge_scores`).
            They are the target: detached, so no gradient reaches them.

    Labels:
        Soft labels only: ``judge_scores`` define the target distribution. Column 0 being the positive
        matters only for the logged ``p_positive_mean``. There are no in-batch negatives: each query sees
        only its own 1 + k candidates.

    Formula (tau = ``temperature``, the same on both sides):

    .. math::

        P = \mathrm{softmax}(s / \tau), \quad Q = \mathrm{softmax}(j / \tau)

        L = \frac{1}{B} \sum_b \tfrac{1}{2}\left(\mathrm{KL}(P_b \| Q_b) + \mathrm{KL}(Q_b \| P_b)\right),
        \quad \mathrm{KL}(P \| Q) = \sum_c P_c (\log P_c - \log Q_c)

    The paper calls this the "JS divergence"; it is the symmetric KL (there is no mixture distribution).
    Both log-distributions come from ``log_softmax``, so judge scores of exactly 0 and 1, or similarities
    of +-1 with tau = 0.01, give a finite loss and finite gradients.

    Args:
        temperature: tau of both softmaxes (paper: 0.02; ablation 0.01 / 0.03).

    Example:
        >>> import torch
        >>> loss_fn = SoftLabelAlignmentLoss(temperature=0.02)
        >>> similarities = torch.tensor([[0.80, 0.30, 0.10], [0.20, 0.25, 0.10]], requires_grad=True)
        >>> judge_scores = torch.tensor([[0.90, 0.20, 0.05], [0.70, 0.60, 0.10]])
        >>> loss = loss_fn(similarities, judge_scores)
        >>> round(loss.item(), 4)
        1.7225
        >>> loss.backward()
        >>> similarities.grad.shape
        torch.Size([2, 3])
        >>> parts = loss_fn.parts(similarities, judge_scores)
        >>> sorted(parts)
        ['judge_agreement', 'kl_pq', 'kl_qp', 'loss', 'p_positive_mean']
        >>> parts["judge_agreement"].item()  # row 2: P peaks on a negative, Q on the positive
        0.5
        >>> loss_fn(judge_scores, judge_scores).item()
        0.0
    """

    def __init__(self, temperature: float = 0.02) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    @staticmethod
    def _validate(similarities: torch.Tensor, judge_scores: torch.Tensor) -> None:
        if similarities.dim() != 2:
            raise ValueError(
                "similarities must be 2-D (batch, 1 + num_negatives) with the positive in column 0, "
                f"got shape {tuple(similarities.shape)}"
            )
        if judge_scores.shape != similarities.shape:
            raise ValueError(
                f"judge_scores must have the shape of similarities {tuple(similarities.shape)}, "
                f"got {tuple(judge_scores.shape)}"
            )
        if similarities.shape[1] < 2:
            raise ValueError(
                "need at least 2 candidates per query (the positive and one negative), "
                f"got shape {tuple(similarities.shape)}"
            )
        check_judge_scores(judge_scores)

    def _log_distributions(self, similarities: torch.Tensor, judge_scores: torch.Tensor):
        self._validate(similarities, judge_scores)
        dtype = _compute_dtype(similarities.dtype)
        log_p = torch.log_softmax(similarities.to(dtype) / self.temperature, dim=-1)
        target = judge_scores.detach().to(device=similarities.device, dtype=dtype)
        log_q = torch.log_softmax(target / self.temperature, dim=-1)
        return log_p, log_q

    @staticmethod
    def _kl_per_row(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
        return (log_a.exp() * (log_a - log_b)).sum(dim=-1)

    def forward(self, similarities: torch.Tensor, judge_scores: torch.Tensor) -> torch.Tensor:
        log_p, log_q = self._log_distributions(similarities, judge_scores)
        kl_pq = self._kl_per_row(log_p, log_q)
        kl_qp = self._kl_per_row(log_q, log_p)
        return 0.5 * (kl_pq + kl_qp).mean()

    def parts(self, similarities: torch.Tensor, judge_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The loss (attached to the graph) and detached 0-d statistics for logging:
        ``kl_pq`` and ``kl_qp`` (batch means, ``loss = 0.5 * (kl_pq + kl_qp)``), ``p_positive_mean``
        (mean probability the embedder puts on the positive) and ``judge_agreement`` (fraction of rows
        where the embedder's and the judge's top candidate coincide)."""
        log_p, log_q = self._log_distributions(similarities, judge_scores)
        kl_pq = self._kl_per_row(log_p, log_q).mean()
        kl_qp = self._kl_per_row(log_q, log_p).mean()
        log_p_detached = log_p.detach()
        return {
            "loss": 0.5 * (kl_pq + kl_qp),
            "kl_pq": kl_pq.detach(),
            "kl_qp": kl_qp.detach(),
            "p_positive_mean": log_p_detached[:, 0].exp().mean(),
            "judge_agreement": (log_p_detached.argmax(dim=-1) == log_q.argmax(dim=-1)).to(log_p.dtype).mean(),
        }


class InfoNCELoss(nn.Module):
    r"""Contrastive InfoNCE loss with hard labels: the baseline and the "hard negatives only" ablation of
    UniME-V2 (the method's own loss is `SoftLabelAlignmentLoss`).

    Inputs:
        query_embeddings: (B, D), L2-normalised (similarity = dot product = cosine).
        positive_embeddings: (B, D), L2-normalised; row i is the positive of query i.
        hard_negative_embeddings: (B, n, D), L2-normalised, query i's own hard negatives, or ``None``.

    Labels:
        Hard labels built internally: the target of query i is its own positive.

    Candidates of query i:
        - default: every positive in the (global) batch -- the others act as in-batch negatives -- followed
          by query i's own n hard negatives. Hard negatives are NOT shared with the other queries: the
          method mines them per query, and sharing would gather (B, n, D) tensors across processes.
        - ``hard_negatives_only=True``: only ``[positive_i, hard_negative_i1, ..., hard_negative_in]``
          (the paper's "hard negatives only" ablation); nothing is gathered.

    Formula (tau = ``temperature``, C_i the candidates of query i, p_i its positive):

    .. math::

        L = -\frac{1}{B} \sum_i
            \log \frac{\exp(q_i \cdot p_i / \tau)}{\sum_{c \in C_i} \exp(q_i \cdot c / \tau)}

    Multiple processes: when ``torch.distributed`` is initialised with world size W > 1 and
    ``gather_across_processes`` is set, the positives of all processes are gathered WITH gradients
    (``torch.distributed.nn.functional.all_gather``) in rank order, so C_i holds W * B positives and the
    target of local query i is ``rank * B + i``. Queries are not gathered: each process returns the mean
    over its OWN B queries. The mean of the W returned losses equals the loss of one process on the
    concatenated batch; the gradient on each process's embeddings is W times that single-process gradient
    (the all-gather's backward sums the other processes' contributions to the local positives), which
    DDP's 1/W gradient averaging cancels exactly. All processes must pass the same B (accelerate's default
    ``even_batches=True`` ensures it); a mismatch raises ``ValueError`` on every process.

    Args:
        temperature: tau (logits are similarities / tau).
        gather_across_processes: gather positives from all processes (ignored when not distributed).
        hard_negatives_only: drop the in-batch negatives; requires ``hard_negative_embeddings``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> generator = torch.Generator().manual_seed(0)
        >>> queries = F.normalize(torch.randn(4, 8, generator=generator), dim=-1)
        >>> positives = F.normalize(queries + 0.1 * torch.randn(4, 8, generator=generator), dim=-1)
        >>> hard_negatives = F.normalize(torch.randn(4, 3, 8, generator=generator), dim=-1)
        >>> loss = InfoNCELoss(temperature=0.05)(queries, positives, hard_negatives)
        >>> bool(loss < 0.1)
        True
        >>> InfoNCELoss(temperature=0.05, hard_negatives_only=True)(queries, positives, hard_negatives).shape
        torch.Size([])
        >>> InfoNCELoss(temperature=0.05).parts(queries, positives)["accuracy"].item()
        1.0
    """

    def __init__(
        self,
        temperature: float = 0.02,
        gather_across_processes: bool = True,
        hard_negatives_only: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        self.gather_across_processes = gather_across_processes
        self.hard_negatives_only = hard_negatives_only

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, gather_across_processes={self.gather_across_processes}, "
            f"hard_negatives_only={self.hard_negatives_only}"
        )

    def _validate(
        self,
        query_embeddings: torch.Tensor,
        positive_embeddings: torch.Tensor,
        hard_negative_embeddings: Optional[torch.Tensor],
    ) -> None:
        if query_embeddings.dim() != 2:
            raise ValueError(
                f"query_embeddings must be (batch, dim), got shape {tuple(query_embeddings.shape)}"
            )
        if positive_embeddings.shape != query_embeddings.shape:
            raise ValueError(
                "positive_embeddings must have the shape of query_embeddings "
                f"{tuple(query_embeddings.shape)}, "
                f"got {tuple(positive_embeddings.shape)}"
            )
        if hard_negative_embeddings is None:
            if self.hard_negatives_only:
                raise ValueError(
                    "hard_negatives_only=True needs hard_negative_embeddings of shape (batch, n, dim)"
                )
            return
        batch, dim = query_embeddings.shape
        if (
            hard_negative_embeddings.dim() != 3
            or hard_negative_embeddings.shape[0] != batch
            or hard_negative_embeddings.shape[2] != dim
        ):
            raise ValueError(
                f"hard_negative_embeddings must be (batch={batch}, num_negatives, dim={dim}), "
                f"got shape {tuple(hard_negative_embeddings.shape)}"
            )

    def _distributed(self) -> bool:
        return (
            self.gather_across_processes
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    @staticmethod
    def _gather_positives(positive_embeddings: torch.Tensor) -> tuple[torch.Tensor, int]:
        # all_gather needs equal shapes; without this check unequal batches hang or fail obscurely.
        batch, device = positive_embeddings.shape[0], positive_embeddings.device
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([batch], dtype=torch.long, device=device))
        sizes = [int(size.item()) for size in sizes]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"InfoNCELoss gathers positives across processes and needs the same batch size on every "
                f"process, got {sizes} (use even batches, or gather_across_processes=False)"
            )
        gathered = torch.cat(dist_fn.all_gather(positive_embeddings), dim=0)
        return gathered, dist.get_rank() * batch

    def _logits_and_targets(
        self,
        query_embeddings: torch.Tensor,
        positive_embeddings: torch.Tensor,
        hard_negative_embeddings: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._validate(query_embeddings, positive_embeddings, hard_negative_embeddings)
        batch = query_embeddings.shape[0]
        dtype = _compute_dtype(query_embeddings.dtype)
        queries = query_embeddings.to(dtype)
        positives = positive_embeddings.to(dtype)

        if self.hard_negatives_only:
            candidates = torch.cat([positives.unsqueeze(1), hard_negative_embeddings.to(dtype)], dim=1)
            logits = torch.einsum("bd,bcd->bc", queries, candidates)
            targets = torch.zeros(batch, dtype=torch.long, device=query_embeddings.device)
        else:
            offset = 0
            if self._distributed():
                positives, offset = self._gather_positives(positives)
            logits = queries @ positives.T
            if hard_negative_embeddings is not None:
                own_negatives = torch.einsum("bd,bnd->bn", queries, hard_negative_embeddings.to(dtype))
                logits = torch.cat([logits, own_negatives], dim=1)
            targets = torch.arange(offset, offset + batch, device=query_embeddings.device)
        return logits / self.temperature, targets

    def forward(
        self,
        query_embeddings: torch.Tensor,
        positive_embeddings: torch.Tensor,
        hard_negative_embeddings: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        logits, targets = self._logits_and_targets(
            query_embeddings, positive_embeddings, hard_negative_embeddings
        )
        return nn.functional.cross_entropy(logits, targets)

    def parts(
        self,
        query_embeddings: torch.Tensor,
        positive_embeddings: torch.Tensor,
        hard_negative_embeddings: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """The loss (attached to the graph) and detached 0-d statistics for logging: ``accuracy``
        (fraction of local queries whose top candidate is their positive) and ``positive_similarity_mean``
        (mean cosine between a query and its positive)."""
        logits, targets = self._logits_and_targets(
            query_embeddings, positive_embeddings, hard_negative_embeddings
        )
        detached = logits.detach()
        rows = torch.arange(len(targets), device=targets.device)
        return {
            "loss": nn.functional.cross_entropy(logits, targets),
            "accuracy": (detached.argmax(dim=-1) == targets).to(detached.dtype).mean(),
            "positive_similarity_mean": (detached[rows, targets] * self.temperature).mean(),
        }
