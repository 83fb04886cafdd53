"""The slot-bias report (evaluation.slot_bias): content-blind models come out at exactly 1/K with their slot named; a
model that reads content and also prefers a slot is measured as an independent brute force computes it; and the
real tiny reranker runs through it."""

from __future__ import annotations

import random

import pytest
import torch

from evaluation.slot_bias import rotations, slot_bias


class SlotPreferring:
    """Content-blind: the same probabilities for every list, highest at ``slot``."""

    def __init__(self, slot: int, length: int):
        self.probabilities = torch.full((length,), 0.5 / (length - 1))
        self.probabilities[slot] = 0.5

    def rerank(self, query, candidates, mode="listwise"):
        order = torch.argsort(self.probabilities, descending=True, stable=True)
        return order.tolist(), self.probabilities.clone()


class Reading:
    """Reads content: the positive ("pos...") gets ``strength``, plus a bias towards ``slot``; seeded noise."""

    def __init__(self, slot: int, strength: float, bias: float, seed: int = 0):
        self.slot, self.strength, self.bias = slot, strength, bias
        self.rng = random.Random(seed)
        self.calls = []

    def logits(self, candidates):
        return torch.tensor([self.strength * str(item).startswith("pos") + self.bias * (index == self.slot)
                             + self.rng.random() * 0.5 for index, item in enumerate(candidates)])

    def rerank(self, query, candidates, mode="listwise"):
        probabilities = torch.softmax(self.logits(candidates), dim=0)
        self.calls.append((list(candidates), probabilities))
        return torch.argsort(probabilities, descending=True).tolist(), probabilities


ROWS = [(f"q{row}", [f"pos{row}", *(f"neg{row}-{index}" for index in range(4))]) for row in range(12)]


@pytest.mark.parametrize("slot", range(5))
def test_a_content_blind_model_scores_exactly_chance_and_its_slot_is_named(slot):
    report = slot_bias(SlotPreferring(slot, 5), ROWS)
    assert report["rotation_mean_accuracy"] == pytest.approx(20.0) and report["chance"] == pytest.approx(20.0)
    assert report["preferred_slot"] == slot and report["preferred_share"] == 100.0
    assert report["content_free_histogram"] == [12 if index == slot else 0 for index in range(5)]
    assert report["accuracy_by_slot"] == [100.0 if index == slot else 0.0 for index in range(5)]
    # rotation-averaging leaves every candidate with the same score: the positive shares the choice with all
    assert report["rotation_averaged_accuracy"] == pytest.approx(20.0)
    assert report["plain_accuracy"] == (100.0 if slot == 0 else 0.0)
    # its log loss on the positive is no better than chance (ln 5) on average over the slots
    assert report["positive_log_loss"] >= report["chance_log_loss"] - 1e-9


def test_uniform_scores_choose_no_slot():
    class Uniform:
        def rerank(self, query, candidates, mode="listwise"):
            return list(range(len(candidates))), torch.full((len(candidates),), 1 / len(candidates))

    report = slot_bias(Uniform(), ROWS)
    assert report["content_free_histogram"] == [pytest.approx(12 / 5)] * 5
    assert report["accuracy_by_slot"] == [pytest.approx(20.0)] * 5 and report["plain_accuracy"] == pytest.approx(20.0)


def test_a_reading_model_is_measured_as_brute_force_computes_it():
    model = Reading(slot=3, strength=1.0, bias=1.2, seed=4)
    report = slot_bias(model, ROWS, content_free="N/A")
    free_calls, list_calls = model.calls[:len(ROWS)], model.calls[len(ROWS):]
    # independent recomputation from the recorded calls
    histogram = [0] * 5
    for candidates, probabilities in free_calls:
        assert candidates == ["N/A"] * 5
        histogram[int(torch.argmax(probabilities))] += 1
    correct, plain, averaged_correct = [0] * 5, 0, 0
    for row in range(len(ROWS)):
        averaged = {}
        for shift in range(5):
            candidates, probabilities = list_calls[row * 5 + shift]
            position = candidates.index(f"pos{row}")
            assert position == shift  # rotation `shift` puts the positive at slot `shift`
            won = int(torch.argmax(probabilities)) == position
            correct[shift] += won
            plain += won and shift == 0
            for item, probability in zip(candidates, probabilities.tolist()):
                averaged[item] = averaged.get(item, 0.0) + probability
        averaged_correct += max(averaged, key=averaged.get) == f"pos{row}"
    assert report["content_free_histogram"] == histogram
    assert report["accuracy_by_slot"] == pytest.approx([100 * count / 12 for count in correct])
    assert report["plain_accuracy"] == pytest.approx(100 * plain / 12)
    assert report["rotation_averaged_accuracy"] == pytest.approx(100 * averaged_correct / 12)
    assert report["preferred_slot"] == 3  # the bias shows on content-free lists
    losses = [-torch.log(probabilities[candidates.index(f"pos{index // 5}")]).item()
              for index, (candidates, probabilities) in enumerate(list_calls)]
    assert report["positive_log_loss"] == pytest.approx(sum(losses) / len(losses))
    assert report["accuracy_by_slot"][3] > report["accuracy_by_slot"][0]


def test_rotations_visit_every_slot_once():
    for length in (2, 3, 7):
        items = list(range(length))
        rotated = rotations(items)
        assert sorted(tuple(r) for r in rotated) == sorted(set(tuple(r) for r in rotated))
        assert [r.index(0) for r in rotated] == list(range(length))
        assert all(sorted(r) == items for r in rotated)


def test_bad_lists_are_refused():
    with pytest.raises(ValueError, match="same list length"):
        slot_bias(SlotPreferring(0, 3), [("q", ["a", "b", "c"]), ("q", ["a", "b"])])
    with pytest.raises(ValueError, match="at least one row"):
        slot_bias(SlotPreferring(0, 3), [])


def test_the_tiny_reranker_through_the_report():
    from modeling_unime.tiny import build_tiny_reranker

    reranker, processor = build_tiny_reranker()
    reranker.processor = processor
    rows = [("What colour is the car?", ["red", "blue", "green"]), ("a dog", ["a dog", "a cat", "a car"])]
    report = slot_bias(reranker, rows)
    assert report["list_length"] == 3 and sum(report["content_free_histogram"]) == pytest.approx(2)
    assert 0 <= report["rotation_mean_accuracy"] <= 100
    assert report["rotation_mean_accuracy"] == pytest.approx(sum(report["accuracy_by_slot"]) / 3)
