"""Embedding training: collator, GradCache gradients, learning the judge's ranking, adapters, saving, the recipe."""

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from transformers import TrainerCallback

from conftest import REPO_ROOT, free_port, run_fresh_python, run_recipe
from modeling_unime.tiny import build_tiny_processor, build_tiny_reranker, build_tiny_unime, synthetic_judge_dataset
from trainers import UniMEV2Collator, UniMEV2Trainer, UniMEV2TrainingArguments
from trainers.adapters import LANGUAGE_MODEL_TARGETS, adapter_config, prepare_for_training, save_checkpoint
from trainers.embedding_trainer import Loss, RandomState
from trainers.seeding import row_rng

ROW = dict(query_text="a red circle", query_image=None, pos_text="red", pos_image=None,
           neg_texts=["n0", "n1", "n2", "n3", "n4"], neg_images=[None] * 5, judge_scores=[0.9, 0.5, 0.4, 0.3, 0.2, 0.1])


def training_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, save_strategy="no",
                    disable_tqdm=True, per_device_train_batch_size=4, num_negatives=4, seed=0)
    return UniMEV2TrainingArguments(**{**settings, **overrides})


# -------------------------------------------------------------------------------------------------------- collator


def test_collator_first_random_and_cycling():
    processor = build_tiny_processor("qwen2_vl")
    first = UniMEV2Collator(processor, num_negatives=3)
    assert first.choose_negatives(ROW) == [0, 1, 2]
    batch = first([ROW])
    torch.testing.assert_close(batch["judge_scores"], torch.tensor([[0.9, 0.5, 0.4, 0.3]]))
    assert len(batch["chunks"]) == 1 and batch["chunks"][0]["input_ids"].shape[0] == 1 + 4 and batch["num_queries"] == 1

    drawn = UniMEV2Collator(processor, num_negatives=3, negative_selection="random", seed=5)
    epoch_zero = drawn.choose_negatives(ROW)
    assert drawn.choose_negatives(ROW) == epoch_zero and len(set(epoch_zero)) == 3
    draws = set()
    for epoch in range(12):
        drawn.set_epoch(epoch)
        draws.add(tuple(drawn.choose_negatives(ROW)))
    assert len(draws) > 3  # a new draw per epoch
    scores = drawn([ROW])["judge_scores"][0, 1:]
    torch.testing.assert_close(scores, torch.tensor([ROW["judge_scores"][1 + p] for p in drawn.choose_negatives(ROW)]))

    few = dict(ROW, neg_texts=["n0", "n1"], neg_images=[None, None], judge_scores=[0.9, 0.5, 0.4])
    assert UniMEV2Collator(processor, num_negatives=5).choose_negatives(few) == [0, 1, 0, 1, 0]
    chunked = UniMEV2Collator(processor, num_negatives=3, chunk_size=2, deduplicate=False)([ROW, ROW])
    assert [chunk["input_ids"].shape[0] for chunk in chunked["chunks"]] == [2, 2, 2, 2, 2]  # 2 queries + 8 candidates
    # the same row twice: its query and candidates are encoded once, and every row of the step points at them
    shared = UniMEV2Collator(processor, num_negatives=3, chunk_size=2)([ROW, ROW])
    assert [chunk["input_ids"].shape[0] for chunk in shared["chunks"]] == [2, 2, 1]  # 1 query + 4 candidates
    assert shared["input_index"].tolist() == [0, 0, 1, 2, 3, 4, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="judge_scores has 2 values for 1 positive \\+ 5 negatives"):
        first([dict(ROW, judge_scores=[0.9, 0.5])])
    with pytest.raises(ValueError, match="negative_selection"):
        UniMEV2Collator(processor, negative_selection="hardest")


def test_random_negatives_are_the_rows_own_draw_and_first_is_the_authors():
    """"random" draws from `row_rng` (seed, epoch, the row's query and positive): the same row in any batch, worker or
    process draws the same; "first" is the authors' first k, in order, every epoch."""
    processor = build_tiny_processor("qwen2_vl")
    drawn = UniMEV2Collator(processor, num_negatives=3, negative_selection="random", seed=5)
    for epoch in (0, 1, 7):
        drawn.set_epoch(epoch)
        assert drawn.choose_negatives(ROW) == row_rng(5, epoch, ROW, "negatives").sample(range(5), 3)
        assert drawn.choose_negatives(dict(ROW, neg_texts=list(ROW["neg_texts"]))) == drawn.choose_negatives(ROW)
    assert len({tuple(drawn.choose_negatives(dict(ROW, pos_text=f"p{i}"))) for i in range(8)}) > 1  # per row
    first = UniMEV2Collator(processor, num_negatives=4, negative_selection="first", seed=5)
    for epoch in (0, 3):
        first.set_epoch(epoch)
        assert first.choose_negatives(ROW) == [0, 1, 2, 3]


def test_negative_selection_and_loss_are_enums_that_read_as_strings(tmp_path):
    processor = build_tiny_processor("qwen2_vl")
    assert UniMEV2Collator(processor, negative_selection="random").negative_selection == "random"
    with pytest.raises(ValueError, match=r"negative_selection='hardest': use one of \['first', 'random'\]"):
        UniMEV2Collator(processor, negative_selection="hardest")
    args = training_args(tmp_path, loss="infonce", negative_selection="random")
    assert args.loss is Loss.INFONCE and args.loss == "infonce" and f"{args.loss}" == "infonce"
    assert args.to_dict()["loss"] == "infonce" and args.to_dict()["negative_selection"] == "random"
    with pytest.raises(ValueError, match=r"loss='soft-label': use one of \['soft_label', 'infonce', 'hybrid'\]"):
        training_args(tmp_path, loss="soft-label")


def test_a_missing_training_image_names_the_candidate(tmp_path):
    collate = UniMEV2Collator(build_tiny_processor("qwen2_vl"), num_negatives=2, image_root=tmp_path)
    with pytest.raises(ValueError, match=r"^query 'a red circle' positive: image file not found: .*gone\.png"):
        collate([dict(ROW, pos_image="gone.png")])
    with pytest.raises(ValueError, match=r"^query 'a red circle' negative 1: image file not found: .*n1\.png"):
        collate([dict(ROW, neg_images=[None, "n1.png", None, None, None])])


BAD_ROWS = {
    # Before: the soft-label loss returned NaN.
    "nan judge score": (dict(judge_scores=[0.9, 0.5, float("nan"), 0.3, 0.2, 0.1]),
                        r"judge_scores\[2\] = nan \(negative 1, 'n1'\) is not a finite number.*drop the row"),
    "infinite judge score": (dict(judge_scores=[float("inf"), 0.5, 0.4, 0.3, 0.2, 0.1]),
                             r"judge_scores\[0\] = inf \(the positive\) is not a finite number"),
    "string judge score": (dict(judge_scores=[0.9, "0.5", 0.4, 0.3, 0.2, 0.1]), r"judge_scores\[1\] = '0.5'"),
    # Before: accepted, loss about 1154.
    "0-100 scale": (dict(judge_scores=[90.0, 50.0, 40.0, 30.0, 20.0, 10.0]),
                    r"judge_scores\[0\] = 90.0 \(the positive\) is outside \[0, 1\].*divided by 100"),
    "negative judge score": (dict(judge_scores=[0.9, 0.5, 0.4, 0.3, 0.2, -0.1]),
                             r"judge_scores\[5\] = -0.1 \(negative 4, 'n4'\) is outside \[0, 1\]"),
    "too few judge scores": (dict(judge_scores=[0.9, 0.5]), r"judge_scores has 2 values for 1 positive \+ 5 negatives"),
    # Before: a bare IndexError.
    "neg_images shorter": (dict(neg_images=[None] * 3), "5 neg_texts but 3 neg_images.*one neg_images entry per"),
    "neg_images longer": (dict(neg_images=[None] * 6), "5 neg_texts but 6 neg_images"),
    "neg_images empty": (dict(neg_images=[]), "5 neg_texts but 0 neg_images"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_collator_names_the_bad_row_and_the_fix(case):
    changes, message = BAD_ROWS[case]
    collate = UniMEV2Collator(build_tiny_processor("qwen2_vl"), num_negatives=3)
    bad = dict(ROW, query_text="a blue square", **changes)
    with pytest.raises(ValueError, match=r"^Row with query 'a blue square' \(row 1 of the batch\): .*" + message):
        collate([ROW, bad])


def test_collator_accepts_bounds_missing_neg_images_and_numpy_scores():
    import numpy

    collate = UniMEV2Collator(build_tiny_processor("qwen2_vl"), num_negatives=3)
    rows = [dict(ROW, judge_scores=[1.0, 0.0, 1.0, 0.5, 0.0, 0.25]), dict(ROW, neg_images=None),
            {key: value for key, value in ROW.items() if key != "neg_images"},
            dict(ROW, judge_scores=list(numpy.asarray(ROW["judge_scores"], dtype=numpy.float32)))]
    batch = collate(rows)
    assert batch["judge_scores"].shape == (4, 4) and batch["judge_scores"][0].tolist() == [1.0, 0.0, 1.0, 0.5]


def test_training_on_a_nan_judge_score_stops_with_the_row(tmp_path):
    model, processor = build_tiny_unime("qwen2_vl")
    root = tmp_path / "images"
    rows = synthetic_judge_dataset(4, root, num_negatives=4).to_list()
    rows[2]["query_text"], rows[2]["judge_scores"][3] = "the broken row", float("nan")
    from datasets import Dataset

    with pytest.raises(ValueError, match=r"train_dataset: 1 row\(s\) with judge_scores that are not finite .*"
                                         r"row 2 \(query 'the broken row'"):
        UniMEV2Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
                       processing_class=processor, image_root=root)
    # The collator refuses it too, for batches that reach it some other way (a caller's own dataset object)...
    with pytest.raises(ValueError, match=r"Row with query 'the broken row' .*judge_scores\[3\] = nan"):
        UniMEV2Collator(processor)([rows[2]])
    # ... and so does the loss.
    with pytest.raises(ValueError, match=r"judge_scores\[0, 1\] = nan"):
        trainer = UniMEV2Trainer(model=model, args=training_args(tmp_path, max_steps=1),
                                 train_dataset=Dataset.from_list(rows[:2]), processing_class=processor, image_root=root)
        trainer.objective(torch.eye(2)[:1], torch.eye(2)[[0, 1, 1]], torch.tensor([[0.5, float("nan"), 0.1]]))


@pytest.mark.parametrize("trainer_class", ["embedder", "reranker"])
def test_bad_rows_a_short_run_never_batches_are_caught_before_training(tmp_path, trainer_class):
    from datasets import Dataset

    from trainers.reranker_trainer import UniMEV2RerankerTrainer, UniMEV2RerankerTrainingArguments

    root = tmp_path / "images"
    rows = synthetic_judge_dataset(40, root, num_negatives=4).to_list()
    rows[37]["judge_scores"][1] = float("inf")       # a 2-step run at batch 2 reads rows 0-3 only
    rows[38]["judge_scores"] = rows[38]["judge_scores"][:-1]
    rows[39]["judge_scores"][0] = 1.5
    if trainer_class == "embedder":
        model, processor = build_tiny_unime("qwen2_vl")
        build = lambda data: UniMEV2Trainer(model=model, args=training_args(tmp_path, max_steps=2),  # noqa: E731
                                            train_dataset=data, processing_class=processor, image_root=root)
    else:
        model, processor = build_tiny_reranker("qwen2_vl")
        arguments = UniMEV2RerankerTrainingArguments(str(tmp_path / "rr"), max_steps=2, per_device_train_batch_size=2,
                                                     report_to=[], use_cpu=True)
        build = lambda data: UniMEV2RerankerTrainer(model=model, args=arguments,  # noqa: E731
                                                    train_dataset=data, processing_class=processor, image_root=root)
    with pytest.raises(ValueError, match=r"1 row\(s\) with judge_scores of another length .*row 38 .*"):
        build(Dataset.from_list(rows))
    rows[38]["judge_scores"].append(0.1)
    with pytest.raises(ValueError, match=r"2 row\(s\) with judge_scores that are not finite numbers in \[0, 1\]: "
                                         r"row 37 .*inf.*row 39 .*1.5"):
        build(Dataset.from_list(rows))
    # the same rows after select: the reported index is the dataset's, not the file's
    with pytest.raises(ValueError, match=r"row 1 \(query"):
        build(Dataset.from_list(rows).select([0, 39]))
    assert build(Dataset.from_list(rows[:37])).train_dataset.num_rows == 37
    missing = Dataset.from_list(rows).remove_columns(["judge_scores", "pos_text"])
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['pos_text', 'judge_scores'\]; it has "):
        build(missing)


# ------------------------------------------------------------------------------------------------------- GradCache


def _gradients(trainer, model, inputs, gradcache):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    if gradcache:
        trainer.gradcache_step(model, inputs)
    else:
        trainer.compute_loss(model, inputs).backward()
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("loss", ["soft_label", "hybrid", "infonce"])
def test_gradcache_gives_the_plain_gradients_with_dropout_on(tmp_path, loss):
    model, processor = build_tiny_unime("qwen2_vl")
    model = prepare_for_training(model, "dora", dropout=0.3)  # dropout active: the random state must be replayed
    model.train()
    root = tmp_path / "images"
    rows = synthetic_judge_dataset(6, root, num_negatives=4)
    args = training_args(tmp_path, gradcache=True, gradcache_chunk_size=2, loss=loss, infonce_weight=0.5)
    trainer = UniMEV2Trainer(model=model, args=args, train_dataset=rows, processing_class=processor, image_root=root)
    inputs = trainer.data_collator([rows[i] for i in range(6)])
    # 6 queries + 6 x 5 candidates, the distinct ones (captions recur as negatives) in chunks of 2
    distinct = {(row["query_text"], row["query_image"]) for row in rows.select(range(6))} | {
        (text, image) for row in rows.select(range(6))
        for text, image in [(row["pos_text"], row["pos_image"]), *zip(row["neg_texts"][:4], row["neg_images"][:4])]}
    assert len(inputs["input_index"]) == 36 and len(inputs["chunks"]) == math.ceil(len(distinct) / 2) < 18
    plain = _gradients(trainer, model, inputs, gradcache=False)
    cached = _gradients(trainer, model, inputs, gradcache=True)
    assert plain.keys() == cached.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)

    # Negative control: without replaying the random state, dropout masks differ and so do the gradients.
    original = RandomState.replay
    RandomState.replay = lambda self: contextlib.nullcontext()
    try:
        unreplayed = _gradients(trainer, model, inputs, gradcache=True)
    finally:
        RandomState.replay = original
    assert max((unreplayed[name] - plain[name]).abs().max() for name in plain) > 1e-4


def classification_rows(count, labels=("red", "green", "blue")):
    """Rows shaped like an MMEB classification task: the candidates are label texts, shared by many queries."""
    rows = []
    for index in range(count):
        answer = labels[index % len(labels)]
        others = [label for label in labels if label != answer]
        rows.append(dict(query_text=f"what colour is shape {index}?", query_image=None, pos_text=answer,
                         pos_image=None, neg_texts=others, neg_images=[None] * len(others),
                         judge_scores=[0.9, *[0.1] * len(others)]))
    return rows


def test_a_placeholder_without_an_image_is_dropped_where_released_data_is_read(tmp_path):
    # The authors' training file has WebQA queries whose text names an image they do not have (row 23 of their
    # 50-row sample); encode() refuses such a row, the training collator and mining drop the placeholder.
    from datasets import Dataset

    from modeling_unime.mining.inputs import read_pairs

    row = dict(query_text="<|image_1|>\nFind a Wikipedia image that answers this question: why?\n", query_image=None,
               pos_text="a caption", pos_image=None, neg_texts=["another caption"], neg_images=[None],
               judge_scores=[0.9, 0.1])
    processor = build_tiny_processor("qwen2_vl")
    with pytest.warns(UserWarning, match="1 input\\(s\\) of a batch have an image placeholder but no image"):
        batch = UniMEV2Collator(processor, num_negatives=1)([row])
    expected = processor(texts=["Find a Wikipedia image that answers this question: why?\n"])
    assert batch["chunks"][0]["input_ids"][0].tolist()[-expected["input_ids"].shape[1]:] == \
        expected["input_ids"][0].tolist()
    with pytest.warns(UserWarning, match="1 row\\(s\\) have a text with an image placeholder but no image"):
        _, queries, _ = read_pairs(Dataset.from_list([row]))
    assert queries == [("Find a Wikipedia image that answers this question: why?\n", None)]
    with pytest.raises(ValueError, match="image placeholder"):
        build_tiny_unime("qwen2_vl")[0].encode(texts=[row["query_text"]], processor=processor)
    sample = REPO_ROOT.parent / "shared" / "data" / "unime_v2_official_example_data.json"
    if sample.is_file():  # the real file: its WebQA query is read without the placeholder, its other texts as they are
        from modeling_unime.data import load_official_json

        real = load_official_json(sample).select([23])
        with pytest.warns(UserWarning, match="first: row 0"):
            _, queries, positives = read_pairs(real)
        assert queries[0] == (real[0]["query_text"].replace("<|image_1|>\n", ""), None)
        assert positives[0] == (real[0]["pos_text"], real[0]["pos_image"])  # it has its image: untouched


@pytest.mark.parametrize("gradcache", [False, True])
def test_deduplicated_inputs_give_the_plain_gradients_and_loss(tmp_path, gradcache):
    from datasets import Dataset

    model, processor = build_tiny_unime("qwen2_vl")
    model.train()  # no dropout in the tiny backbone: sharing an input changes nothing but the work
    rows = classification_rows(6)
    results = {}
    for deduplicate in (False, True):
        args = training_args(tmp_path, gradcache=gradcache, gradcache_chunk_size=3, num_negatives=2,
                             deduplicate_inputs=deduplicate)
        trainer = UniMEV2Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=processor)
        inputs = trainer.data_collator(rows)
        encoded = sum(chunk["input_ids"].shape[0] for chunk in inputs["chunks"])
        model.zero_grad(set_to_none=True)
        if gradcache:
            loss = trainer.gradcache_step(model, inputs)
        else:
            loss = trainer.compute_loss(model, inputs)
            loss.backward()
        gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                     if parameter.grad is not None}
        results[deduplicate] = (encoded, float(loss), gradients)
    (plain_rows, plain_loss, plain), (shared_rows, shared_loss, shared) = results[False], results[True]
    assert (plain_rows, shared_rows) == (6 + 6 * 3, 6 + 3)  # 6 queries + 18 candidate rows over 3 label texts
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain.keys() == shared.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], atol=1e-6, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------ gradient accumulation


class GradientsBeforeTheOptimizerStep(TrainerCallback):
    """Records every trainable parameter's accumulated gradient just before each optimizer step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
                           if parameter.grad is not None})


def _one_optimizer_step(tmp_path, rows, root, batch, accumulation, gradcache):
    model, processor = build_tiny_unime("qwen2_vl")
    recorder = GradientsBeforeTheOptimizerStep()
    # max_grad_norm=0: no clipping, which would rescale a wrongly scaled gradient back to the same norm.
    args = training_args(tmp_path, output_dir=str(tmp_path / f"batch{batch}-accumulation{accumulation}"),
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1,
                         max_grad_norm=0.0, logging_steps=1, learning_rate=1e-3, gradcache=gradcache,
                         gradcache_chunk_size=3)
    trainer = UniMEV2Trainer(model=model, args=args, train_dataset=rows, processing_class=processor, image_root=root,
                             callbacks=[recorder])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(recorder.steps) == 1 and len(logged) == 1
    return recorder.steps[0], logged[0]


@pytest.mark.parametrize("gradcache", [False, True])
def test_gradient_accumulation_gives_the_full_batch_gradients_and_loss(tmp_path, gradcache):
    """Batch 4 x accumulation 1 and batch 2 x accumulation 2 over the same 4 rows: one optimizer step each, with the
    same accumulated gradients and the same logged loss (the soft-label loss is a mean over queries, so each
    micro-batch's loss must be divided by the accumulation steps)."""
    root = tmp_path / "images"
    rows = synthetic_judge_dataset(4, root, num_negatives=4)
    full, full_log = _one_optimizer_step(tmp_path, rows, root, batch=4, accumulation=1, gradcache=gradcache)
    accumulated, accumulated_log = _one_optimizer_step(tmp_path, rows, root, batch=2, accumulation=2,
                                                       gradcache=gradcache)
    assert full.keys() == accumulated.keys() and len(full) > 10
    largest = max(float(gradient.abs().max()) for gradient in full.values())
    assert largest > 1e-2
    # Float noise (other padding and chunking) measured at 1e-7 x the largest gradient; a gradient twice too large
    # (the loss not divided by the accumulation steps) is off by the gradient itself.
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], atol=1e-6 * largest, rtol=1e-4, msg=name)
    assert accumulated_log["loss"] == pytest.approx(full_log["loss"], rel=1e-5, abs=1e-6)
    assert accumulated_log["grad_norm"] == pytest.approx(full_log["grad_norm"], rel=1e-5)


# -------------------------------------------------------------------------------------------------------- learning


def test_soft_labels_teach_the_judges_ranking_on_held_out_rows(tmp_path):
    model, processor = build_tiny_unime("qwen2_vl")
    root = tmp_path / "images"
    train = synthetic_judge_dataset(256, root, num_negatives=8, seed=0)
    held_out = synthetic_judge_dataset(48, root, num_negatives=8, seed=99)
    args = training_args(tmp_path, num_negatives=8, per_device_train_batch_size=16, learning_rate=1e-3,
                         warmup_steps=5, max_steps=60, logging_steps=10)
    trainer = UniMEV2Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             processing_class=processor, image_root=root)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_judge_agreement"] >= before["eval_judge_agreement"] + 0.3
    assert after["eval_p_positive"] > before["eval_p_positive"]
    logged = [entry for entry in trainer.state.log_history if "loss_soft_label" in entry and "eval_loss" not in entry]
    assert logged and {"p_positive", "judge_agreement", "kl_pq", "kl_qp"} <= logged[0].keys()


# --------------------------------------------------------------------------------------------- adapters and saving


def test_adapter_defaults_are_the_authors():
    config = adapter_config()
    assert (config.use_dora, config.r, config.lora_alpha, config.lora_dropout, config.init_lora_weights) == (
        True, 16, 64, 0.1, "gaussian")
    model = prepare_for_training(build_tiny_unime("qwen2_vl")[0])
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".language_model." in name for name in trainable)
    targets = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trainable if ".lora_A." in name}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    assert LANGUAGE_MODEL_TARGETS.endswith("down_proj)")


FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    for name in ("modeling_unime", "trainers", "evaluation"):
        sys.modules[name] = None
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    embeddings = model.encode(texts=["a red circle", "a blue square"], images=[sys.argv[2], None])
    print(torch.equal(embeddings, torch.load(sys.argv[3])))
    """
)


def test_trained_checkpoint_reloads_in_a_fresh_process_and_embeds_identically(tmp_path):
    model, processor = build_tiny_unime("qwen2_vl")
    root = tmp_path / "images"
    rows = synthetic_judge_dataset(8, root, num_negatives=4)
    model = prepare_for_training(model, "dora")
    trainer = UniMEV2Trainer(model=model, args=training_args(tmp_path, max_steps=3, learning_rate=1e-2),
                             train_dataset=rows, processing_class=processor, image_root=root)
    trainer.train()
    image = str(root / rows[0]["query_image"])

    adapter_folder = save_checkpoint(trainer.model, processor, tmp_path / "adapter", merge=False)
    assert (adapter_folder / "adapter_config.json").is_file() and (adapter_folder / "README.md").is_file()
    base = build_tiny_unime("qwen2_vl")[0]
    with_adapter = PeftModel.from_pretrained(base, str(adapter_folder)).eval()
    trained = trainer.model.eval()
    expected = trained.get_base_model().encode(texts=["a red circle", "a blue square"], images=[image, None],
                                               processor=processor)
    from_adapter = with_adapter.get_base_model().encode(texts=["a red circle", "a blue square"], images=[image, None],
                                                        processor=processor)
    torch.testing.assert_close(from_adapter, expected, atol=0, rtol=0)

    merged_folder = save_checkpoint(trainer.model, processor, tmp_path / "merged", merge=True,
                                  card=dict(training="3 steps on synthetic shapes"))
    assert "3 steps on synthetic shapes" in (merged_folder / "README.md").read_text()
    from modeling_unime import UniMEV2Model

    merged = UniMEV2Model.from_pretrained(merged_folder)
    reference = merged.encode(texts=["a red circle", "a blue square"], images=[image, None])
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)  # merging only rounds
    torch.save(reference, tmp_path / "reference.pt")
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    result = run_fresh_python([str(script), str(merged_folder), image, str(tmp_path / "reference.pt")], tmp_path,
                              HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("True")


# ---------------------------------------------------------------------------------------------------------- recipe


RECIPE_CONFIG = """
model: tiny:qwen2_vl
data:
  train: synthetic-judge:48
  eval: synthetic-judge:8
finetuning: full
training:
  output_dir: {output_dir}
  num_negatives: 4
  per_device_train_batch_size: {batch}
  learning_rate: 0.001
  max_steps: {steps}
  logging_steps: 1
  save_steps: 2
  seed: 3
  disable_tqdm: true
  gradcache: {gradcache}
  gradcache_chunk_size: 3
"""


ONE_STEP_CONFIG = """
model: tiny:qwen2_vl
data:
  train: synthetic-judge:48
finetuning: full
training:
  output_dir: {output_dir}
  loss: hybrid  # the soft-label loss plus in-batch InfoNCE, whose positives are gathered across processes
  infonce_weight: 1.0
  num_negatives: 4
  per_device_train_batch_size: {batch}
  optim: sgd  # plain SGD, lr 1, no clipping: weights after one step = initial weights - the gradient
  learning_rate: 1.0
  lr_scheduler_type: constant
  max_grad_norm: 0.0
  weight_decay: 0.0
  max_steps: 1
  logging_steps: 1
  save_steps: 1
  seed: 3
  disable_tqdm: true
  gradcache: {gradcache}
  gradcache_chunk_size: 3
"""


@pytest.mark.parametrize("gradcache", [False, True])
def test_one_and_two_processes_give_the_same_first_step(tmp_path, gradcache):
    """The global batch of 4 queries on 1 process (batch 4) and on 2 processes (batch 2 each): after one step of plain
    SGD (lr 1) the weights, hence the gradients, are the same, and so are the logged loss and gradient norm. Summed
    instead of averaged gradients across processes (or a wrong factor in the gathered InfoNCE positives) change
    every weight by about the gradient itself."""
    from safetensors.torch import load_file

    script = str(REPO_ROOT / "recipes" / "train_embedding.py")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    one_config, two_config = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one_config.write_text(ONE_STEP_CONFIG.format(output_dir=tmp_path / "one", batch=4, gradcache=gradcache))
    two_config.write_text(ONE_STEP_CONFIG.format(output_dir=tmp_path / "two", batch=2, gradcache=gradcache))
    one = subprocess.run([sys.executable, script, "--config", str(one_config)], env=environment,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(free_port()), script, "--config", str(two_config)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 2 x 2 processes" in (tmp_path / "two" / "final" / "README.md").read_text()

    initial = build_tiny_unime("qwen2_vl")[0].state_dict()  # the recipe's "tiny:qwen2_vl" (seed 0)
    single = load_file(tmp_path / "one" / "checkpoint-1" / "model.safetensors")
    double = load_file(tmp_path / "two" / "checkpoint-1" / "model.safetensors")
    assert single.keys() == double.keys() and set(single) <= set(initial)
    steps = {name: initial[name] - single[name] for name in single}  # = lr x gradient
    largest = max(float(step.abs().max()) for step in steps.values())
    assert largest > 1e-2 and sum(int(step.ne(0).any()) for step in steps.values()) > 10
    # Float noise (other padding and chunking) measured at 2e-7 x the largest step; a gradient off by a factor of the
    # world size is off by about the step itself.
    for name in single:
        torch.testing.assert_close(initial[name] - double[name], steps[name], atol=1e-5 * largest, rtol=1e-4,
                                   msg=name)

    def first_step(folder):
        history = json.loads((folder / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
        return next(entry for entry in history if "loss" in entry)

    single_log, double_log = first_step(tmp_path / "one"), first_step(tmp_path / "two")
    assert double_log["grad_norm"] == pytest.approx(single_log["grad_norm"], rel=1e-5)
    assert double_log["loss"] == pytest.approx(single_log["loss"], rel=1e-5)
    assert double_log["loss_infonce"] == pytest.approx(single_log["loss_infonce"], rel=1e-5)


RESUME_CONFIG = """
model: tiny:qwen2_vl
data:
  train: synthetic-judge:48
  eval: synthetic-judge:8
finetuning: full
training:
  output_dir: {output_dir}
  num_negatives: 4
  per_device_train_batch_size: 4
  learning_rate: 0.001
  lr_scheduler_type: constant  # the schedule must not depend on max_steps, which the interrupted run changes
  max_steps: {steps}
  logging_steps: 1
  save_steps: 2
  seed: 3
  disable_tqdm: true
"""

RUN_DEPENDENT = ("_runtime", "_per_second")  # wall-clock entries of the log, which no two runs share


def _run_recipe(monkeypatch, config, *extra):
    run_recipe(monkeypatch, "train_embedding.py", "--config", str(config), *extra)


def _trainer_state(checkpoint):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["log_history"] = [{key: value for key, value in entry.items() if not key.endswith(RUN_DEPENDENT)}
                            for entry in state["log_history"]]
    return state


def test_recipe_resume_continues_from_the_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                       capsys):
    from safetensors.torch import load_file

    straight_config, resumed_config = tmp_path / "straight.yaml", tmp_path / "resumed.yaml"
    straight_config.write_text(RESUME_CONFIG.format(output_dir=tmp_path / "straight", steps=4))
    resumed_config.write_text(RESUME_CONFIG.format(output_dir=tmp_path / "resumed", steps=2))
    _run_recipe(monkeypatch, straight_config)
    _run_recipe(monkeypatch, resumed_config)  # "interrupted" after step 2, its last checkpoint
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir() and not (tmp_path / "resumed" / "checkpoint-4").exists()

    logged = []  # (global step, log keys) of every log call of the resumed run
    original_log = UniMEV2Trainer.log

    def recording_log(self, logs, start_time=None):
        logged.append((self.state.global_step, set(logs)))
        return original_log(self, logs, start_time)

    monkeypatch.setattr(UniMEV2Trainer, "log", recording_log)
    capsys.readouterr()
    _run_recipe(monkeypatch, resumed_config, "--max_steps", "4")
    assert "resuming from" in capsys.readouterr().out
    training_steps = [step for step, keys in logged if "loss" in keys]
    assert training_steps == [3, 4], f"the resumed run logged training steps {training_steps}, not 3 and 4"
    assert all(step > 2 for step, _ in logged), logged  # nothing before the checkpoint, no second "before" eval

    straight, resumed = tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4"
    # Weights (the checkpoint's and the final merged save), optimizer, scheduler and trainer state all equal.
    for folder in ("checkpoint-4", "final"):
        expected = load_file(tmp_path / "straight" / folder / "model.safetensors")
        actual = load_file(tmp_path / "resumed" / folder / "model.safetensors")
        assert expected.keys() == actual.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0, msg=f"{folder}: {name}")
    expected_optimizer, actual_optimizer = (torch.load(folder / "optimizer.pt") for folder in (straight, resumed))
    assert expected_optimizer["state"].keys() == actual_optimizer["state"].keys()
    for index, expected_state in expected_optimizer["state"].items():
        assert float(expected_state["step"]) == float(actual_optimizer["state"][index]["step"]) == 4.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(actual_optimizer["state"][index][key], expected_state[key], atol=1e-9, rtol=0)
    assert torch.load(resumed / "scheduler.pt") == torch.load(straight / "scheduler.pt")
    expected_state, actual_state = _trainer_state(straight), _trainer_state(resumed)
    assert actual_state["global_step"] == expected_state["global_step"] == 4
    assert actual_state == expected_state

    results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "resumed")}
    assert results["resumed"]["before_training"]["step"] == 0  # the evaluation before training, from the checkpoint
    for moment in ("before_training", "after_training"):
        for key, value in results["straight"][moment].items():
            if not key.endswith(RUN_DEPENDENT):
                assert results["resumed"][moment][key] == pytest.approx(value, rel=1e-6), (moment, key)


def test_recipe_pushes_the_final_checkpoint_with_its_card(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                        lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    config = tmp_path / "tiny.yaml"
    config.write_text(RECIPE_CONFIG.format(output_dir=tmp_path / "run", batch=4, steps=2, gradcache=False))
    _run_recipe(monkeypatch, config, "--push_to_hub", "org/tiny-unime")
    assert calls[0] == ("create", "org/tiny-unime") and calls[1][1]["repo_id"] == "org/tiny-unime"
    folder = calls[1][1]["folder_path"]
    card = open(os.path.join(folder, "README.md")).read()
    assert 'AutoModel.from_pretrained("org/tiny-unime"' in card and "loss `soft_label`" in card
    assert "held-out judge_agreement" in card and "2 steps" in card
    assert os.path.isfile(os.path.join(folder, "modeling_unime.py"))
    assert "pushed to org/tiny-unime" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ recipe arguments


def _recipe_fields():
    import dataclasses

    from trainers.recipe_runner import AdapterArguments, DataArguments, ScriptArguments

    return [field for kind in (ScriptArguments, DataArguments, AdapterArguments, UniMEV2TrainingArguments)
            for field in dataclasses.fields(kind) if field.init]


def test_recipe_help_lists_every_field_with_its_help():
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    shown = subprocess.run([sys.executable, str(REPO_ROOT / "recipes" / "train_embedding.py"), "--help"],
                           env=environment, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-3000:]
    missing = [field.name for field in _recipe_fields()
               if field.name != "push_to_hub" and f"--{field.name} " not in shown.stdout
               and f"--{field.name}\n" not in shown.stdout and f"--{field.name}," not in shown.stdout]
    assert missing == []
    assert "--config FILE.yaml" in shown.stdout and "model repo id to push the final checkpoint to" in shown.stdout
    assert ("--loss {soft_label,infonce,hybrid}" in shown.stdout
            and "--negative_selection {first,random}" in shown.stdout)
    # Every field of ours carries its help (TrainingArguments' own fields have theirs).
    from trainers.recipe_runner import AdapterArguments, DataArguments, ScriptArguments

    ours = {name for kind in (ScriptArguments, DataArguments, AdapterArguments, UniMEV2TrainingArguments)
            for name in kind.__annotations__}
    assert [field.name for field in _recipe_fields() if field.name in ours and not field.metadata.get("help")] == []


def test_recipe_arguments_come_from_the_yaml_sections_and_the_flags(tmp_path):
    from trainers.recipe_runner import EMBEDDER, parse_training_recipe

    config = tmp_path / "recipe.yaml"
    config.write_text(RECIPE_CONFIG.format(output_dir=tmp_path / "run", batch=4, steps=2, gradcache=True)
                      + "adapter: {r: 8}\nimage_resize: authors-eval\n")
    parsed = parse_training_recipe(EMBEDDER, ["--config", str(config), "--max_steps", "5", "--push_to_hub", "org/m",
                                              "--negative_selection", "random", "--data_eval", "synthetic-judge:4"])
    script, data, training = parsed.script, parsed.data, parsed.training
    assert (script.model, script.finetuning, script.image_resize, script.push_to_hub) == (
        "tiny:qwen2_vl", "full", "authors-eval", "org/m")
    assert (data.data_train, data.data_eval) == ("synthetic-judge:48", "synthetic-judge:4")
    assert parsed.adapter.settings({}) == {"r": 8}
    assert training.max_steps == 5 and training.gradcache is True and training.gradcache_chunk_size == 3
    assert training.negative_selection == "random" and training.output_dir == str(tmp_path / "run")
    assert training.push_to_hub is False  # the Trainer never pushes: the script does, once, with the card
    # The recipe's own defaults apply where the config and the flags are silent: held-out data -> eval_on_start, a
    # run without an accelerator -> use_cpu, no reporting.
    assert training.eval_on_start is True and parsed.evaluate_on_start is True and training.report_to == []
    kept = parse_training_recipe(EMBEDDER, ["--config", str(config), "--eval_on_start", "false"])
    assert kept.training.eval_on_start is False and kept.evaluate_on_start is False


@pytest.mark.parametrize("text, message", [
    ("training: {num_negative: 4}", r"unknown key 'num_negative' \(did you mean 'num_negatives'"),
    ("data: {train: synthetic-judge:4, evl: x}", r"unknown key 'data.evl' \(did you mean 'data_eval'"),
    ("adaptr: {r: 4}", r"unknown section 'adaptr' \(did you mean the section 'adapter'"),
    ("trainig: {max_steps: 4}", r"unknown section 'trainig' \(did you mean the section 'training'\?\)"),
    ("training: {loss: soft-label}", r"loss='soft-label': use one of"),
])
def test_a_misspelt_recipe_key_is_an_error(tmp_path, text, message):
    from trainers.recipe_runner import EMBEDDER, parse_training_recipe

    config = tmp_path / "recipe.yaml"
    base = {"model": "tiny:qwen2_vl", "data": {"train": "synthetic-judge:4"}, "training": {"output_dir": "out"}}
    import yaml

    extra = yaml.safe_load(text)
    for key, value in extra.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(base.get(key), dict) else value
    config.write_text(yaml.safe_dump(base))
    with pytest.raises(ValueError, match=message):
        parse_training_recipe(EMBEDDER, ["--config", str(config)])


def test_a_malformed_recipe_file_and_an_unknown_flag_get_a_message_not_a_traceback(tmp_path, capsys):
    from trainers.recipe_runner import EMBEDDER, parse_training_recipe

    config = tmp_path / "recipe.yaml"
    config.write_text("model: tiny:qwen2_vl\ntraining:\n  max_steps: 4\n   seed: 3\n")
    with pytest.raises(ValueError, match=rf"{config}: not valid YAML at line 4, column 8: .*indentation"):
        parse_training_recipe(EMBEDDER, ["--config", str(config)])
    config.write_text("model: tiny:qwen2_vl\ndata: {train: synthetic-judge:4}\ntraining: {output_dir: out}\n")
    with pytest.raises(SystemExit) as stopped:
        parse_training_recipe(EMBEDDER, ["--config", str(config), "--max_stpes", "3"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: ") and "unrecognized arguments: --max_stpes 3 (did you mean --max_steps" in error
    assert "Traceback" not in error
