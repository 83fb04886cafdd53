import doctest
import math
import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import trainers.losses
from trainers.losses import InfoNCELoss, SoftLabelAlignmentLoss

# ---------------------------------------------------------------------------------------------------------
# Independent references, written out with exp / sum / log in float64.


def _reference_log_softmax(scores: torch.Tensor, tau: float) -> torch.Tensor:
    logits = scores.double() / tau
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))


def _reference_soft_label(similarities, judge_scores, tau):
    log_p = _reference_log_softmax(similarities, tau)
    log_q = _reference_log_softmax(judge_scores, tau)
    p, q = torch.exp(log_p), torch.exp(log_q)
    kl_pq = (p * (log_p - log_q)).sum(dim=-1)
    kl_qp = (q * (log_q - log_p)).sum(dim=-1)
    return {
        "loss": (0.5 * (kl_pq + kl_qp)).mean(),
        "kl_pq": kl_pq.mean(),
        "kl_qp": kl_qp.mean(),
        "p_positive_mean": p[:, 0].mean(),
        "judge_agreement": (p.argmax(-1) == q.argmax(-1)).double().mean(),
    }


def _reference_info_nce_per_query(queries, positives, hard_negatives, tau, in_batch):
    """-log(exp(l_target) / sum_c exp(l_c)) for each query, candidate by candidate."""
    losses = []
    for i in range(queries.shape[0]):
        candidates = list(positives) if in_batch else [positives[i]]
        target = i if in_batch else 0
        if hard_negatives is not None:
            candidates += list(hard_negatives[i])
        logits = [float(queries[i].double() @ candidate.double()) / tau for candidate in candidates]
        log_normaliser = math.log(sum(math.exp(logit) for logit in logits))
        losses.append(log_normaliser - logits[target])
    return torch.tensor(losses, dtype=torch.float64)


def _random_scores(batch=6, candidates=9, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    similarities = torch.rand(batch, candidates, generator=generator, dtype=dtype) * 2 - 1
    judge_scores = torch.rand(batch, candidates, generator=generator, dtype=dtype)
    return similarities, judge_scores


def _random_embeddings(batch=6, negatives=3, dim=16, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    queries = F.normalize(torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    positives = F.normalize(queries + 0.7 * torch.randn(batch, dim, generator=generator, dtype=dtype), dim=-1)
    noise = torch.randn(batch, negatives, dim, generator=generator, dtype=dtype)
    hard_negatives = F.normalize(queries.unsqueeze(1) + 0.9 * noise, dim=-1)
    return queries, positives, hard_negatives


# ---------------------------------------------------------------------------------------------------------
# SoftLabelAlignmentLoss


@pytest.mark.parametrize("tau", [0.01, 0.02, 0.03, 0.1, 1.0])
def test_soft_label_matches_formula(tau):
    similarities, judge_scores = _random_scores(seed=int(tau * 1000))
    loss_fn = SoftLabelAlignmentLoss(temperature=tau)
    expected = _reference_soft_label(similarities, judge_scores, tau)

    torch.testing.assert_close(loss_fn(similarities, judge_scores), expected["loss"], rtol=1e-10, atol=1e-12)
    parts = loss_fn.parts(similarities, judge_scores)
    for name, value in expected.items():
        torch.testing.assert_close(parts[name], value, rtol=1e-10, atol=1e-12, msg=name)

    loss32 = loss_fn(similarities.float(), judge_scores.float())
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), expected["loss"], rtol=1e-4, atol=1e-5)


def test_cached_sentence_transformers_loss_defaults_to_the_paper_tau():
    """`CachedSoftLabelAlignmentLoss` built without a temperature gives the soft-label formula at tau 0.02 (the
    paper's), from the query-candidate dot products of the embeddings it is handed, mini-batch by mini-batch."""
    pytest.importorskip("sentence_transformers")
    from trainers.sentence_losses import CachedSoftLabelAlignmentLoss

    queries, positives, hard_negatives = _random_embeddings(batch=5, negatives=3, seed=11)
    columns = [queries, positives, *hard_negatives.unbind(dim=1)]
    per_mini_batch = [[column[:2], column[2:]] for column in columns]  # as GradCache hands them: 2 + 3 rows
    _, judge_scores = _random_scores(batch=5, candidates=4, seed=11)
    similarities = torch.tensor([[sum(float(a) * float(b) for a, b in zip(queries[row], candidate[row]))
                                  for candidate in columns[1:]] for row in range(5)], dtype=torch.float64)

    loss = CachedSoftLabelAlignmentLoss(model=None).calculate_loss(per_mini_batch, judge_scores)
    expected = _reference_soft_label(similarities, judge_scores, 0.02)["loss"]
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for other_tau in (0.01, 0.025, 0.05):  # a changed default would move the value far past the tolerance
        assert abs(float(_reference_soft_label(similarities, judge_scores, other_tau)["loss"] - expected)) > 1e-3


def test_soft_label_extreme_inputs_are_finite():
    # Judge scores exactly 0 and 1, similarities at +-1, tau 0.01: logits of +-100 and gaps of 100.
    similarities = torch.tensor(
        [[-1.0, 1.0, 1.0, -1.0], [1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]], requires_grad=True
    )
    judge_scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss_fn = SoftLabelAlignmentLoss(temperature=0.01)
    loss = loss_fn(similarities, judge_scores)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(similarities.grad).all()
    assert all(torch.isfinite(value) for value in loss_fn.parts(similarities, judge_scores).values())
    expected = _reference_soft_label(similarities.detach(), judge_scores, 0.01)["loss"]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)

    bf16 = similarities.detach().bfloat16().requires_grad_()
    bf16_loss = loss_fn(bf16, judge_scores.bfloat16())
    bf16_loss.backward()
    assert bf16_loss.dtype == torch.float32 and torch.isfinite(bf16_loss)
    assert torch.isfinite(bf16.grad.float()).all()


def test_soft_label_is_zero_when_distributions_match():
    _, judge_scores = _random_scores()
    loss_fn = SoftLabelAlignmentLoss(temperature=0.02)
    assert loss_fn(judge_scores.clone(), judge_scores).item() == 0.0
    # softmax is shift-invariant: a per-row offset of the similarities leaves P == Q.
    shifted = judge_scores + torch.linspace(-0.5, 0.5, judge_scores.shape[0], dtype=torch.float64)[:, None]
    assert abs(loss_fn(shifted, judge_scores).item()) < 1e-9
    assert loss_fn.parts(shifted, judge_scores)["judge_agreement"].item() == 1.0


def test_soft_label_is_symmetric():
    similarities, judge_scores = _random_scores(seed=3)
    similarities = (similarities + 1) / 2  # in [0, 1], so that it is a valid judge score when the roles swap
    loss_fn = SoftLabelAlignmentLoss(temperature=0.02)
    forward, backward = loss_fn.parts(similarities, judge_scores), loss_fn.parts(judge_scores, similarities)
    torch.testing.assert_close(forward["loss"], backward["loss"])
    torch.testing.assert_close(forward["kl_pq"], backward["kl_qp"])
    torch.testing.assert_close(forward["kl_qp"], backward["kl_pq"])
    torch.testing.assert_close(forward["loss"], 0.5 * (forward["kl_pq"] + forward["kl_qp"]))
    assert not torch.allclose(forward["kl_pq"], forward["kl_qp"])  # the two directions differ on their own


def test_soft_label_judge_scores_receive_no_gradient():
    similarities, judge_scores = _random_scores(seed=4)
    similarities.requires_grad_()
    judge_scores.requires_grad_()
    loss_fn = SoftLabelAlignmentLoss(temperature=0.02)
    (loss_fn(similarities, judge_scores) + loss_fn.parts(similarities, judge_scores)["loss"]).backward()
    assert judge_scores.grad is None
    assert similarities.grad is not None and similarities.grad.abs().sum() > 0


def test_soft_label_gradcheck():
    similarities, judge_scores = _random_scores(batch=3, candidates=5, seed=5)
    similarities.requires_grad_()
    for tau in (0.02, 0.1):
        loss_fn = SoftLabelAlignmentLoss(temperature=tau)
        assert torch.autograd.gradcheck(lambda s: loss_fn(s, judge_scores), (similarities,))


def test_soft_label_validates_inputs():
    loss_fn = SoftLabelAlignmentLoss()
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="shape of similarities"):
        loss_fn(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        loss_fn(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="temperature"):
        SoftLabelAlignmentLoss(temperature=0.0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (float("nan"), r"judge_scores\[1, 2\] = nan \(batch row 1, candidate 2\) is not a finite number"),
        (float("inf"), r"judge_scores\[1, 2\] = inf .* is not a finite number"),
        (-0.25, r"judge_scores\[1, 2\] = -0.25 .* is outside \[0, 1\]"),
        (87.5, r"judge_scores\[1, 2\] = 87.5 .* is outside \[0, 1\].*divided by 100"),
    ],
)
def test_soft_label_refuses_judge_scores_that_are_not_probabilities(bad, message):
    # Before: a NaN judge score gave a NaN loss, and a 0-100 scale a loss of about 1154 -- both silently.
    similarities, judge_scores = _random_scores(batch=3, candidates=4, seed=8)
    judge_scores[1, 2] = bad
    loss_fn = SoftLabelAlignmentLoss(temperature=0.02)
    with pytest.raises(ValueError, match=message):
        loss_fn(similarities, judge_scores)
    with pytest.raises(ValueError, match=message):
        loss_fn.parts(similarities, judge_scores)
    judge_scores[1, 2] = 1.0  # the bounds themselves are fine
    judge_scores[0, 0], judge_scores[2, 3] = 1.0, 0.0
    assert torch.isfinite(loss_fn(similarities, judge_scores))
    with pytest.raises(ValueError, match=r"judge_scores\[0, 0\] = 100.0 \(batch row 0, candidate 0 = the positive\)"):
        loss_fn(similarities, judge_scores * 100)


# ---------------------------------------------------------------------------------------------------------
# InfoNCELoss


@pytest.mark.parametrize("with_hard_negatives", [False, True])
def test_info_nce_in_batch_matches_formula(with_hard_negatives):
    queries, positives, hard_negatives = _random_embeddings()
    hard_negatives = hard_negatives if with_hard_negatives else None
    loss_fn = InfoNCELoss(temperature=0.05)
    expected = _reference_info_nce_per_query(queries, positives, hard_negatives, 0.05, in_batch=True).mean()
    torch.testing.assert_close(loss_fn(queries, positives, hard_negatives), expected)

    parts = loss_fn.parts(queries, positives, hard_negatives)
    torch.testing.assert_close(parts["loss"], expected)
    torch.testing.assert_close(parts["positive_similarity_mean"], (queries * positives).sum(-1).mean())
    assert 0.0 <= parts["accuracy"].item() <= 1.0


def test_info_nce_hard_negatives_only_matches_formula():
    queries, positives, hard_negatives = _random_embeddings(seed=1)
    loss_fn = InfoNCELoss(temperature=0.05, hard_negatives_only=True)
    expected = _reference_info_nce_per_query(queries, positives, hard_negatives, 0.05, in_batch=False).mean()
    torch.testing.assert_close(loss_fn(queries, positives, hard_negatives), expected)
    # The other queries' positives are not candidates: the in-batch loss is strictly larger.
    assert InfoNCELoss(temperature=0.05)(queries, positives, hard_negatives) > expected


def test_info_nce_float32_and_gradients():
    queries, positives, hard_negatives = (t.float().requires_grad_() for t in _random_embeddings(seed=2))
    loss = InfoNCELoss(temperature=0.02)(queries, positives, hard_negatives)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for tensor in (queries, positives, hard_negatives):
        assert torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


def test_info_nce_validates_inputs():
    queries, positives, hard_negatives = _random_embeddings()
    with pytest.raises(ValueError, match="hard_negatives_only"):
        InfoNCELoss(hard_negatives_only=True)(queries, positives)
    with pytest.raises(ValueError, match="positive_embeddings"):
        InfoNCELoss()(queries, positives[:-1])
    with pytest.raises(ValueError, match="hard_negative_embeddings"):
        InfoNCELoss()(queries, positives, hard_negatives[:-1])
    with pytest.raises(ValueError, match="query_embeddings"):
        InfoNCELoss()(queries[0], positives[0])


def _distributed_worker(rank, world_size, init_file, out_dir, queries, positives, hard_negatives, tau):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = slice(rank * queries.shape[0] // world_size, (rank + 1) * queries.shape[0] // world_size)
        tensors = [t[local].clone().requires_grad_() for t in (queries, positives, hard_negatives)]
        loss = InfoNCELoss(temperature=tau)(*tensors)
        loss.backward()

        hard_only = InfoNCELoss(temperature=tau, hard_negatives_only=True)(*(t.detach() for t in tensors))

        uneven_error = None
        try:
            InfoNCELoss(temperature=tau)(*(t.detach()[: 1 + rank] for t in tensors))
        except ValueError as error:
            uneven_error = str(error)

        torch.save(
            {
                "loss": loss.detach(),
                "grads": [t.grad for t in tensors],
                "hard_only": hard_only,
                "uneven_error": uneven_error,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_info_nce_gathers_across_two_processes(tmp_path):
    world_size, per_process, tau = 2, 3, 0.05
    queries, positives, hard_negatives = _random_embeddings(batch=world_size * per_process, seed=7)
    # fork, not spawn: spawned children each re-import torch, which takes ~15 s on a 2-core machine; the
    # workers' tensors are far below torch's parallel grain size, so no OpenMP pool is touched after fork.
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        _distributed_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path), queries, positives, hard_negatives, tau),
        nprocs=world_size,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # a stuck collective must fail the test, not hang the suite
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process InfoNCE workers did not finish within 120 s")
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]

    # Single process on the concatenated batch.
    reference = [t.clone().requires_grad_() for t in (queries, positives, hard_negatives)]
    reference_loss = InfoNCELoss(temperature=tau, gather_across_processes=False)(*reference)
    reference_loss.backward()
    per_query = _reference_info_nce_per_query(queries, positives, hard_negatives, tau, in_batch=True)
    torch.testing.assert_close(reference_loss.detach(), per_query.mean())

    # Each process returns the mean over its own queries; the mean over processes is the global loss.
    torch.testing.assert_close(torch.stack([r["loss"] for r in results]).mean(), reference_loss.detach())
    for rank, result in enumerate(results):
        local = slice(rank * per_process, (rank + 1) * per_process)
        torch.testing.assert_close(result["loss"], per_query[local].mean())
        # Gradients are world_size x the global gradient; DDP's 1/world_size averaging cancels the factor.
        for grad, full in zip(result["grads"], reference):
            torch.testing.assert_close(grad, world_size * full.grad[local])
        hard_only = InfoNCELoss(temperature=tau, hard_negatives_only=True)(
            queries[local], positives[local], hard_negatives[local]
        )
        torch.testing.assert_close(result["hard_only"], hard_only)
        assert result["uneven_error"] is not None and "same batch size" in result["uneven_error"]


# ---------------------------------------------------------------------------------------------------------


def test_docstring_examples_run():
    results = doctest.testmod(trainers.losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0
    assert results.failed == 0
