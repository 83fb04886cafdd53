"""UniMEV2Reranker: prompts without the authors' bugs, one-forward listwise scores, training, checkpoints."""

import os
import random
import re
import subprocess
import sys
import textwrap
from functools import lru_cache

import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from conftest import run_fresh_python
from modeling_unime import UniMEV2Reranker
from modeling_unime.scoring_unime import JUDGE_INSTRUCTION, LISTWISE_INSTRUCTION
from modeling_unime.tiny import (
    build_tiny_causal_lm,
    build_tiny_processor,
    build_tiny_reranker,
    build_tiny_tokenizer,
    save_in_authors_layout,
    synthetic_judge_dataset,
)
from trainers.adapters import RERANKER_ADAPTER, prepare_for_training, save_checkpoint
from trainers.collator import negative_positions
from trainers.reranker_trainer import (
    LISTWISE,
    PAIRWISE,
    RerankerCollator,
    UniMEV2RerankerTrainer,
    UniMEV2RerankerTrainingArguments,
)
from trainers.seeding import row_rng

RED = Image.new("RGB", (56, 84), (220, 20, 20))
ROW = dict(query_text="<|image_1|>\nWhat colour is the shape?", query_image=None, pos_text="deep red",
           pos_image=None, neg_texts=["light blue", "dark green", "pale teal", "warm orange", "cold grey"],
           neg_images=[None] * 5, judge_scores=[0.9, 0.2, 0.7, 0.7, 0.1, 0.4])


@lru_cache(maxsize=None)
def tiny():
    reranker, processor = build_tiny_reranker()
    with torch.no_grad():  # larger answer rows: scores then differ well above float noise
        reranker.lm_head.weight.mul_(8)
    return reranker, processor


def last_logits(reranker, processor, text, images):
    """Independent reference: a full forward with logits over the whole vocabulary at the last position."""
    batch = processor._backbone_processor(text=[text], images=images or None, return_tensors="pt")
    with torch.no_grad():
        return reranker(**batch).logits[0, -1].float()


# -------------------------------------------------------------------------------------------------------- prompts


def listwise_prompt_slots(prompt: str) -> dict[int, str]:
    """Independent parse of a rendered listwise prompt: slot number -> the candidate text that follows its "(k) "
    marker (up to the next marker or the end of the user turn)."""
    user_turn = prompt.split("Candidates:", 1)[1].split("<|im_end|>", 1)[0]
    pieces = re.split(r"\((\d+)\) ", user_turn)
    assert pieces[0] == "", pieces
    return {int(number): text for number, text in zip(pieces[1::2], pieces[2::2])}


def labelled_text(tokenizer, input_ids, labels) -> str:
    return tokenizer.decode(input_ids[labels != -100])


def test_listwise_label_is_the_positive_slot_in_the_rendered_prompt():
    """Over 600 draws (120 rows x 5 epochs): the rendered list holds the top-4 negatives and the positive once; the
    labelled tokens are the index alone and name the slot whose "(k) " marker precedes the positive's text; the slot
    is uniform over all 5 slots, the last included."""
    processor = build_tiny_processor("qwen2_5_vl")
    collator = RerankerCollator(processor, listwise_negatives=4, seed=0, pairwise=False)
    tokenizer = processor.tokenizer
    top4 = {"dark green", "pale teal", "cold grey", "light blue"}  # ROW's negatives by judge score; not "warm orange"
    counts = [0] * 5
    for epoch in range(5):
        collator.set_epoch(epoch)
        rows = [dict(ROW, query_text=f"What colour is shape {index}?") for index in range(120)]
        batch = collator(rows)
        assert batch["example_kind"].tolist() == [LISTWISE] * 120
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            slots = listwise_prompt_slots(tokenizer.decode(ids))
            assert sorted(slots) == [1, 2, 3, 4, 5]
            assert {text for text in slots.values()} == top4 | {"deep red"}
            positive_slot = next(slot for slot, text in slots.items() if text == "deep red")
            assert labelled_text(tokenizer, ids, labels) == str(positive_slot)
            counts[positive_slot - 1] += 1
    expected = 600 / 5
    chi_square = sum((count - expected) ** 2 / expected for count in counts)
    assert chi_square < 18.47, counts  # the 0.999 quantile of chi-square with 4 degrees of freedom
    assert min(counts) > 60, counts  # the last slot too (the authors' code never put the positive last)


def test_listwise_label_follows_an_image_positive():
    """Image candidates: the positive is the image behind the k-th marker, counted in the rendered prompt."""
    processor = build_tiny_processor("qwen2_5_vl")
    collator = RerankerCollator(processor, listwise_negatives=3, seed=3, pairwise=False)
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    images = [Image.new("RGB", (56, 56), colour) for colour in colours]
    row = dict(query_text="Which image is red?", query_image=None, pos_text="", pos_image=images[0],
               neg_texts=[""] * 4, neg_images=images[1:], judge_scores=[0.9, 0.5, 0.6, 0.1, 0.7])
    seen = set()
    for epoch in range(40):
        collator.set_epoch(epoch)
        (prompt, segments, row_images), = collator.examples(row)["listwise"]
        slots = listwise_prompt_slots(prompt)
        image_slots = [slot for slot, text in sorted(slots.items()) if "<|vision_start|>" in text]
        assert image_slots == [1, 2, 3, 4]
        red = [index for index, image in enumerate(row_images) if image.getpixel((0, 0)) == (200, 0, 0)]
        assert len(red) == 1 and len(row_images) == 4
        assert "".join(text for text, labelled in segments if labelled) == str(image_slots[red[0]])
        assert (200, 200, 0) not in {image.getpixel((0, 0)) for image in row_images}  # score 0.1: not in the top 3
        seen.add(image_slots[red[0]])
    assert seen == {1, 2, 3, 4}


def test_draws_do_not_depend_on_where_the_images_lie(tmp_path):
    # Two runs that write the same images into their own output folders (absolute paths in the rows) must train on
    # the same lists; with an image root, an absolute path under it draws as its relative path does.
    processor = build_tiny_processor("qwen2_5_vl")
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    for run in ("run-a", "run-b/nested"):
        (tmp_path / run / "shapes").mkdir(parents=True)
        for index, colour in enumerate(colours):
            Image.new("RGB", (56, 56), colour).save(tmp_path / run / "shapes" / f"{index}.png")

    def rows(root):
        return [dict(query_text=f"Which image is colour {query}?", query_image=None, pos_text="",
                     pos_image=f"{root}shapes/{query}.png", neg_texts=[""] * 4,
                     neg_images=[f"{root}shapes/{index}.png" for index in range(5) if index != query],
                     judge_scores=[0.9, 0.5, 0.5, 0.5, 0.5]) for query in range(5)]

    def draws(rows, image_root=None):
        collator = RerankerCollator(processor, listwise_negatives=3, seed=0, image_root=image_root)
        found = []
        for epoch in range(6):
            collator.set_epoch(epoch)
            found += [(collator.listwise_candidates(row), collator.hardest_negative(row)) for row in rows]
        return found

    first, second = draws(rows(f"{tmp_path}/run-a/")), draws(rows(f"{tmp_path}/run-b/nested/"))
    assert first == second and len({str(draw) for draw in first}) > 5  # equal, and not all one draw
    relative = draws(rows(""), tmp_path / "run-a")
    assert draws(rows(f"{tmp_path}/run-a/"), tmp_path / "run-a") == relative
    assert relative != first  # keyed by the relative path there, by the content here: both stable, not the same
    assert negative_positions(rows(f"{tmp_path}/run-a/")[0], 2, "random", seed=1) == \
        negative_positions(rows(f"{tmp_path}/run-b/nested/")[0], 2, "random", seed=1)


def test_listed_negatives_are_the_top_x_by_judge_score_ties_at_random():
    processor = build_tiny_processor("qwen2_5_vl")
    texts = [f"negative {index}" for index in range(7)]
    #                          n0   n1   n2   n3   n4   n5   n6
    row = dict(ROW, neg_texts=texts, neg_images=[None] * 7, judge_scores=[0.95, 0.3, 0.8, 0.1, 0.8, 0.6, 0.8, 0.2])
    tied = {1, 3, 5}
    for x, must, among in ((2, set(), tied), (4, {1, 3, 5, 4}, set()), (6, {1, 3, 5, 4, 0, 6}, set())):
        collator = RerankerCollator(processor, listwise_negatives=x, seed=0)
        picked_sets, orders, hardest, first_listed = set(), set(), set(), set()
        for epoch in range(60):
            collator.set_epoch(epoch)
            negatives, _ = collator.listwise_candidates(row)
            assert len(negatives) == len(set(negatives)) == x
            assert must <= set(negatives) and set(negatives) - must <= among, (x, negatives)
            picked_sets.add(frozenset(negatives))
            orders.add(tuple(position for position in negatives if position in tied))
            hardest.add(collator.hardest_negative(row))
            first_listed.add(negatives[0])
        assert hardest == tied  # each of the tied hardest negatives is picked in some epoch
        if x == 2:
            assert picked_sets == {frozenset(pair) for pair in ((1, 3), (1, 5), (3, 5))}  # ties broken at random
        else:
            assert len(orders) == 6  # every order of the three tied negatives occurs in the list
        assert first_listed == set().union(*picked_sets)  # the list is shuffled: the hardest is not always first
    # distinct scores: exactly the top x, whatever the mined order
    row = dict(row, judge_scores=[0.95, 0.3, 0.8, 0.1, 0.5, 0.6, 0.9, 0.2])
    collator = RerankerCollator(processor, listwise_negatives=3, seed=0)
    assert sorted(collator.listwise_candidates(row)[0]) == [1, 4, 5]
    assert collator.hardest_negative(row) == 5


def test_reranker_draws_come_from_the_rows_own_generator():
    """Tie-breaks, the list order and the positive's slot are `row_rng(seed, epoch, row, purpose)` draws, in that
    order: the same row draws the same in any batch, worker or process."""
    collator = RerankerCollator(build_tiny_processor("qwen2_5_vl"), listwise_negatives=3, seed=4)
    collator.set_epoch(2)
    scores = ROW["judge_scores"][1:]
    rng = row_rng(4, 2, ROW, "listwise")
    ties = {position: rng.random() for position in range(5)}
    negatives = sorted(range(5), key=lambda position: (-scores[position], ties[position]))[:3]
    rng.shuffle(negatives)
    assert collator.listwise_candidates(dict(ROW)) == (negatives, rng.randrange(4))
    rng = row_rng(4, 2, ROW, "pairwise")
    ties = {position: rng.random() for position in range(5)}
    assert collator.hardest_negative(ROW) == min(range(5), key=lambda position: (-scores[position], ties[position]))


def test_listed_negatives_prefer_the_positive_kind():
    processor = build_tiny_processor("qwen2_5_vl")
    red = Image.new("RGB", (28, 28), (200, 0, 0))
    #                 n0 text  n1 image  n2 image  n3 text  n4 text  n5 image+text
    neg_texts = ["blue", "", "", "green", "teal", "a shape"]
    neg_images = [None, red, red, None, None, red]
    scores = [1.0, 0.5, 0.99, 0.95, 0.4, 0.3, 0.9]
    text_row = dict(ROW, neg_texts=neg_texts, neg_images=neg_images, judge_scores=scores)
    image_row = dict(text_row, pos_text="", pos_image=red)
    expected = ((2, {0, 3}, {1, 2}), (3, {0, 3, 4}, {1, 2, 5}), (4, {0, 3, 4, 1}, {1, 2, 5, 0}))
    for x, text_expected, image_expected in expected:
        collator = RerankerCollator(processor, listwise_negatives=x, seed=0)
        assert set(collator.listwise_candidates(text_row)[0]) == text_expected  # text answers first, then images
        assert set(collator.listwise_candidates(image_row)[0]) == image_expected
    assert RerankerCollator(processor).hardest_negative(text_row) == 1  # pairwise: the highest score, any kind


def test_only_the_index_tokens_are_labelled():
    processor = build_tiny_processor("qwen2_5_vl")
    tokenizer = processor.tokenizer
    row = dict(ROW, neg_texts=[f"shade {index}" for index in range(11)], neg_images=[None] * 11,
               judge_scores=[0.9] + [0.5] * 11)
    collator = RerankerCollator(processor, listwise_negatives=11, seed=0)
    seen = {}
    for epoch in range(80):
        collator.set_epoch(epoch)
        batch = collator([row])
        kinds = batch["example_kind"].tolist()
        assert kinds == [PAIRWISE, PAIRWISE, LISTWISE] and batch["list_length"].tolist() == [0, 0, 12]
        labelled = [labelled_text(tokenizer, ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"])]
        assert labelled[:2] == ["Yes", "No"]
        slot = collator.examples(row)["listwise_position"]
        # lists of 12: after "1" the ")" decides between 1 and 10-12; after any other first digit it is certain
        seen[slot] = labelled[2]
        assert labelled[2] == (f"{slot})" if slot == 1 else str(slot)), (slot, labelled[2])
        assert tokenizer.decode(batch["input_ids"][2]).endswith(f"Ans: ({slot})")
    assert {1, 5, 10, 12} <= set(seen), sorted(seen)
    # short lists: the digit alone
    batch = RerankerCollator(processor, listwise_negatives=4, seed=0)([ROW])
    assert labelled_text(tokenizer, batch["input_ids"][2], batch["labels"][2]) in {"1", "2", "3", "4", "5"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(judge_scores=[0.9, 0.2, float("nan"), 0.7, 0.1, 0.4]),
         r"judge_scores\[2\] \(negative 1 \('dark green'\)\) is nan"),
        (dict(judge_scores=[0.9, 0.2, 0.7, 0.7, 0.1]), "judge_scores has 5 values for 1 positive \\+ 5 negatives"),
        (dict(judge_scores=[0.9, 0.2, 0.7, 0.7, 0.1, 0.4, 0.3]), "judge_scores has 7 values"),
        (dict(judge_scores=[1.2, 0.2, 0.7, 0.7, 0.1, 0.4]),
         r"judge_scores\[0\] \(the positive\) = 1.2 is outside \[0, 1\]"),
        (dict(judge_scores=[0.9, -0.1, 0.7, 0.7, 0.1, 0.4]), "is outside"),
        (dict(judge_scores=[0.9, None, 0.7, 0.7, 0.1, 0.4]), "is None, not a number"),
        (dict(neg_images=[None] * 4), "neg_images has 4 entries for 5 neg_texts"),
        (dict(neg_texts=[], neg_images=[], judge_scores=[0.9]), "has no negatives"),
    ],
)
def test_bad_rows_raise_and_name_the_query(change, message):
    collator = RerankerCollator(build_tiny_processor("qwen2_5_vl"), listwise_negatives=4)
    row = dict(ROW, **change)
    for call in (collator, collator.hardest_negative, collator.listwise_candidates):
        with pytest.raises(ValueError, match=message) as error:
            call([row] if call is collator else row)
        assert "What colour is the shape?" in str(error.value)


def test_texts_reach_the_prompts_and_training_uses_the_inference_prompts():
    reranker, processor = tiny()
    collator = RerankerCollator(processor, listwise_negatives=3, seed=1)
    batch = collator([ROW])
    assert batch["example_kind"].tolist() == [PAIRWISE, PAIRWISE, LISTWISE]
    decoded = [processor.tokenizer.decode(ids, skip_special_tokens=False) for ids in batch["input_ids"]]
    for text in decoded:
        assert "What colour is the shape?" in text and "<|image_1|>" not in text
    assert "deep red" in decoded[0] and decoded[0].endswith("assistant\nYes")
    hardest = ROW["neg_texts"][collator.hardest_negative(ROW)]
    assert hardest in ("dark green", "pale teal")  # the two hardest negatives (0.7) tie
    assert hardest in decoded[1] and decoded[1].endswith("assistant\nNo")
    negatives, slot = collator.listwise_candidates(ROW)
    assert all(ROW["neg_texts"][p] in decoded[2] for p in negatives) and "deep red" in decoded[2]
    assert decoded[2].endswith(f"Ans: ({slot + 1})")
    assert JUDGE_INSTRUCTION in decoded[0] and LISTWISE_INSTRUCTION in decoded[2]
    # Labels cover the answer tokens that decide only: Yes / No, the index digit.
    answer = [labelled_text(processor.tokenizer, *row) for row in zip(batch["input_ids"], batch["labels"])]
    assert answer == ["Yes", "No", str(slot + 1)]
    # The training prompt is, token for token, the prompt inference scores.
    scorer = reranker.scorer(processor)
    query, positive = ("What colour is the shape?", None), ("deep red", None)
    assert decoded[0].endswith(scorer.render(query, positive).split("<|im_start|>user\n")[1] + "Yes")


# -------------------------------------------------------------------------------------------------------- inference


def test_pairwise_score_is_the_yes_no_softmax_of_a_full_forward():
    reranker, processor = tiny()
    candidates = ["deep red", ("a shape", RED), "light blue"]
    scores = reranker.score(("What colour is the shape?", RED), candidates, processor=processor)
    scorer = reranker.scorer(processor)
    yes, no = (processor.tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No"))
    for candidate, score in zip(candidates, scores):
        item = (candidate, None) if isinstance(candidate, str) else candidate
        images = [RED] + ([item[1]] if item[1] is not None else [])
        logits = last_logits(reranker, processor, scorer.render(("What colour is the shape?", RED), item), images)
        expected = torch.softmax(logits[[yes, no]], dim=0)[0]
        assert abs(float(score) - float(expected)) < 1e-5
    assert scores.max() - scores.min() > 1e-3


@pytest.mark.parametrize("count", [3, 12])
def test_listwise_scores_come_from_one_forward_and_match_a_full_forward(count):
    reranker, processor = tiny()
    candidates = [f"candidate number {index}" for index in range(count)]
    calls = []
    hook = reranker.model.register_forward_hook(lambda module, args, kwargs_or_output: calls.append(1))
    try:
        order, scores = reranker.rerank(("What colour?", RED), candidates, processor=processor)
    finally:
        hook.remove()
    # One forward over the list; lists of 10+ add one small batch for the second digit.
    assert len(calls) == (1 if count <= 9 else 2)
    assert abs(float(scores.sum()) - 1) < 1e-5
    assert order == sorted(range(count), key=lambda index: -float(scores[index]))

    scorer = reranker.scorer(processor)
    prompt = scorer.render_listwise(("What colour?", RED), [(text, None) for text in candidates])
    digits = [processor.tokenizer.convert_tokens_to_ids(str(digit)) for digit in range(10)]
    close = processor.tokenizer.convert_tokens_to_ids(")")
    first = torch.softmax(last_logits(reranker, processor, prompt, [RED])[digits[1 : min(count, 9) + 1]], dim=0)
    expected = torch.zeros(count)
    for index in range(1, count + 1):
        if count <= 9:
            expected[index - 1] = first[index - 1]
            continue
        lead = int(str(index)[0])
        valid = [close] + [digits[e] for e in range(10) if 10 * lead + e <= count]
        second = torch.softmax(last_logits(reranker, processor, prompt + str(lead), [RED])[valid], dim=0)
        expected[index - 1] = first[lead - 1] * (second[0] if index < 10 else second[1 + index % 10])
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_rerank_top_k_modes_and_limits():
    reranker, processor = tiny()
    candidates = ["deep red", "light blue", "dark green", "pale teal"]
    order, scores = reranker.rerank("What colour?", candidates, top_k=2, mode="pairwise", processor=processor)
    assert len(order) == 2 and scores.shape == (4,)
    assert float(scores[order[0]]) == float(scores.max())
    with pytest.raises(ValueError, match="mode="):
        reranker.rerank("q", candidates, mode="pointwise", processor=processor)
    with pytest.raises(ValueError, match="at most 99"):
        reranker.rerank("q", [f"c{index}" for index in range(100)], processor=processor)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_authors_reranker_layout_loads_every_weight(tmp_path):
    tokenizer = build_tiny_tokenizer("qwen2_5_vl")
    causal_lm = build_tiny_causal_lm("qwen2_5_vl", tokenizer=tokenizer)
    folder = save_in_authors_layout(causal_lm, build_tiny_processor("qwen2_5_vl", tokenizer), tmp_path / "authors")
    reranker = UniMEV2Reranker.from_pretrained(folder)
    expected = causal_lm.state_dict()
    loaded = reranker.state_dict()
    assert expected.keys() == loaded.keys()  # lm_head included
    assert [key for key in expected if not torch.equal(expected[key], loaded[key])] == []
    unmapped = UniMEV2Reranker.from_pretrained(folder, key_mapping={}).state_dict()
    assert any(not torch.equal(expected[key], unmapped[key]) for key in expected)


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    for name in ("modeling_unime", "trainers", "evaluation"):
        sys.modules[name] = None
    import torch
    from PIL import Image
    from transformers import AutoModel
    reranker = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    query = ("What colour is the shape?", sys.argv[2])
    candidates = ["a red circle", "a blue square", ("a shape", sys.argv[2])]
    scores = reranker.score(query, candidates)
    order, listwise = reranker.rerank(query, candidates)
    expected = torch.load(sys.argv[3])
    print(type(reranker).__name__, torch.equal(scores, expected["score"]), torch.equal(listwise, expected["listwise"]))
    """
)


def test_training_raises_the_yes_margin_and_the_checkpoint_reloads_in_a_fresh_process(tmp_path):
    reranker, processor = build_tiny_reranker()
    root = tmp_path / "images"
    train = synthetic_judge_dataset(512, root, num_negatives=8, seed=0)
    held_out = synthetic_judge_dataset(48, root, num_negatives=8, seed=99)
    args = UniMEV2RerankerTrainingArguments(
        str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        # The listwise weight now falls on the index alone (it was spread over the six tokens of "Ans: (k)"): from
        # 0.05 up, this random tiny model's pairwise head stays on its 50/50 plateau for the 180 steps.
        per_device_train_batch_size=16, learning_rate=5e-3, warmup_steps=10, max_steps=180, listwise_weight=0.02,
        listwise_negatives=4, seed=0, eval_on_start=True, eval_strategy="no", logging_steps=30,
    )
    trainer = UniMEV2RerankerTrainer(model=reranker, args=args, train_dataset=train, eval_dataset=held_out,
                                     processing_class=processor, image_root=root)
    trainer.train()
    before = next(entry for entry in trainer.state.log_history if "eval_yes_margin" in entry)
    after = trainer.evaluate()
    assert abs(before["eval_yes_margin"]) < 0.01
    assert after["eval_yes_margin"] > 0.04  # P(Yes | positive) - P(Yes | hardest negative) on held-out rows
    assert after["eval_loss_pairwise"] < before["eval_loss_pairwise"]
    assert after["eval_loss_listwise"] < before["eval_loss_listwise"]
    assert 0 < after["eval_loss_listwise_index"] <= after["eval_loss_listwise"]  # restricted to the 5 valid indices

    folder = save_checkpoint(trainer.model, processor, tmp_path / "final", card=dict(training="180 tiny steps"))
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-ranking" in card and "reranker.rerank(" in card and "180 tiny steps" in card
    image = str(root / held_out[0]["query_image"])
    loaded = UniMEV2Reranker.from_pretrained(folder)
    query = ("What colour is the shape?", image)
    candidates = ["a red circle", "a blue square", ("a shape", image)]
    expected = {"score": loaded.score(query, candidates), "listwise": loaded.rerank(query, candidates)[1]}
    torch.save(expected, tmp_path / "expected.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    result = run_fresh_python([str(script), str(folder), image, str(tmp_path / "expected.pt")], tmp_path,
                              HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("UniMEV2Reranker True True")


class GradientsBeforeTheStep(TrainerCallback):
    """Copies the accumulated gradients right before the optimizer step."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def one_optimizer_step(rows, image_root, tmp_path, batch_size, accumulation, **arguments):
    """One optimizer step of a fresh tiny reranker over ``rows``: (its log entry, the gradients it stepped with)."""
    reranker, processor = build_tiny_reranker()
    args = UniMEV2RerankerTrainingArguments(
        str(tmp_path / f"run-{batch_size}x{accumulation}"), report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=1e-3, max_steps=1, logging_steps=1, seed=0, max_grad_norm=0.0, **arguments,
    )
    grads = GradientsBeforeTheStep()
    trainer = UniMEV2RerankerTrainer(model=reranker, args=args, train_dataset=rows, processing_class=processor,
                                     image_root=image_root, callbacks=[grads])
    trainer.train()
    return next(entry for entry in trainer.state.log_history if "loss" in entry), grads.grads


@pytest.mark.parametrize("rows", [4, 3])  # 3 rows: micro-batches of 2 and 1
def test_gradient_accumulation_gives_the_loss_and_gradients_of_one_batch(tmp_path, rows):
    root = tmp_path / "images"
    data = synthetic_judge_dataset(rows, root, num_negatives=6, seed=0)
    whole, whole_grads = one_optimizer_step(data, root, tmp_path, rows, 1, listwise_negatives=4)
    split, split_grads = one_optimizer_step(data, root, tmp_path, 2, 2, listwise_negatives=4)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert whole_grads.keys() == split_grads.keys() and whole_grads
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # the logged loss is the weighted sum of the two parts, and the index cross-entropy is logged on its own
    if rows == 4:
        assert whole["loss"] == pytest.approx(whole["loss_pairwise"] + whole["loss_listwise"], rel=1e-5)
        assert 0 < whole["loss_listwise_index"] < whole["loss_listwise"]


@pytest.mark.parametrize("off", ["listwise", "pairwise"])
def test_a_zero_weight_kind_is_neither_built_nor_forwarded(tmp_path, off):
    reranker, processor = build_tiny_reranker()
    root = tmp_path / "images"
    data = synthetic_judge_dataset(4, root, num_negatives=4, seed=0)
    args = UniMEV2RerankerTrainingArguments(
        str(tmp_path / "run"), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
        per_device_train_batch_size=4, max_steps=1, logging_steps=1, seed=0, **{f"{off}_weight": 0.0},
    )
    trainer = UniMEV2RerankerTrainer(model=reranker, args=args, train_dataset=data, processing_class=processor,
                                     image_root=root)
    collator = trainer.data_collator

    def must_not_run(*args, **kwargs):
        raise AssertionError(f"the {off} examples were built")

    setattr(collator, "listwise_candidates" if off == "listwise" else "hardest_negative", must_not_run)
    kept = PAIRWISE if off == "listwise" else LISTWISE
    assert set(collator([data[0], data[1]])["example_kind"].tolist()) == {kept}
    forwarded = []
    hook = reranker.register_forward_pre_hook(
        lambda module, args, kwargs: forwarded.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    assert forwarded == [8 if off == "listwise" else 4]  # 2 pairwise rows per query, or 1 list per query
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert f"loss_{off}" not in logged and f"loss_{'pairwise' if off == 'listwise' else 'listwise'}" in logged
    with pytest.raises(ValueError, match="both 0"):
        UniMEV2RerankerTrainingArguments(str(tmp_path / "none"), pairwise_weight=0.0, listwise_weight=0.0)


def test_reranker_adapter_defaults():
    assert RERANKER_ADAPTER["r"] == 128 and RERANKER_ADAPTER["alpha"] == 256 and RERANKER_ADAPTER["dropout"] == 0.05
    model = prepare_for_training(build_tiny_reranker()[0], "lora", **RERANKER_ADAPTER)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".language_model." in name for name in trainable)  # vision tower frozen
    assert not any("visual" in name for name in trainable)


def test_recipe_runs_on_two_processes(tmp_path):
    from conftest import REPO_ROOT

    config = tmp_path / "reranker.yaml"
    config.write_text(textwrap.dedent(f"""
        model: tiny:qwen2_5_vl
        data: {{train: "synthetic-judge:16"}}
        finetuning: lora
        adapter: {{r: 8, alpha: 16}}
        training: {{output_dir: {tmp_path / "run"}, per_device_train_batch_size: 2, max_steps: 2, seed: 0,
                   disable_tqdm: true, save_steps: 2}}
    """))
    port = random.Random(os.getpid()).randint(20000, 40000)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(port), str(REPO_ROOT / "recipes" / "train_reranker.py"), "--config", str(config)],
        env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "modeling_unime.py").is_file()
    assert (tmp_path / "run" / "final" / "scoring_unime.py").is_file()
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
