"""Embedding training: collator, GradCache gradients, learning the judge's ranking, adapters, saving, the recipe."""

import contextlib
import json
import os
import runpy
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel

from conftest import REPO_ROOT
from modeling_unime.testing import build_tiny_processor, build_tiny_unime, synthetic_judge_dataset
from trainers import UniMEV2Collator, UniMEV2Trainer, UniMEV2TrainingArguments
from trainers.adapters import LANGUAGE_MODEL_TARGETS, adapter_config, prepare_for_training, save_checkpoint
from trainers.embedding_trainer import RandomState

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
    chunked = UniMEV2Collator(processor, num_negatives=3, chunk_size=2)([ROW, ROW])
    assert [chunk["input_ids"].shape[0] for chunk in chunked["chunks"]] == [2, 2, 2, 2, 2]  # 2 queries + 8 candidates
    with pytest.raises(ValueError, match="judge_scores has 2 values for 1 positive \\+ 5 negatives"):
        first([dict(ROW, judge_scores=[0.9, 0.5])])
    with pytest.raises(ValueError, match="negative_selection"):
        UniMEV2Collator(processor, negative_selection="hardest")


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
    assert len(inputs["chunks"]) == 18  # (6 queries + 6 x 5 candidates) in chunks of 2
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


def test_gradcache_refuses_deepspeed_and_fsdp(tmp_path):
    model, processor = build_tiny_unime("qwen2_vl")
    rows = synthetic_judge_dataset(4, tmp_path, num_negatives=4)
    trainer = UniMEV2Trainer(model=model, args=training_args(tmp_path, gradcache=True), train_dataset=rows,
                             processing_class=processor, image_root=tmp_path)
    trainer.is_fsdp_enabled = True
    with pytest.raises(ValueError, match="gradcache=True does not work with DeepSpeed or FSDP"):
        trainer.check_gradcache_support()


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
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, str(script), str(merged_folder), image, str(tmp_path / "reference.pt")],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
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


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _losses(output_dir):
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    history = json.loads((checkpoints[-1] / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


@pytest.mark.parametrize("gradcache", [False, True])
def test_one_and_two_processes_give_the_same_losses(tmp_path, gradcache):
    script = str(REPO_ROOT / "recipes" / "train_embedding.py")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    one_config, two_config = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one_config.write_text(RECIPE_CONFIG.format(output_dir=tmp_path / "one", batch=4, steps=4, gradcache=gradcache))
    two_config.write_text(RECIPE_CONFIG.format(output_dir=tmp_path / "two", batch=2, steps=4, gradcache=gradcache))
    one = subprocess.run([sys.executable, script, "--config", str(one_config)], env=environment,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--main_process_port", str(_free_port()), script, "--config", str(two_config)],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(single) == len(double) == 4
    # Chunking and padding differ between the runs, so float noise grows over the steps; a desynchronised DDP
    # (the bug this guards against) differs by whole units.
    torch.testing.assert_close(torch.tensor(double), torch.tensor(single), atol=1e-2, rtol=1e-2)
    assert (tmp_path / "two" / "final" / "modeling_unime.py").is_file()


def test_recipe_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(RECIPE_CONFIG.format(output_dir=tmp_path / "run", batch=4, steps=2, gradcache=False))
    script = str(REPO_ROOT / "recipes" / "train_embedding.py")
    monkeypatch.setattr(sys, "argv", ["train", "--config", str(config)])
    runpy.run_path(script, run_name="__main__")
    assert (tmp_path / "run" / "checkpoint-2").is_dir()
    monkeypatch.setattr(sys, "argv", ["train", "--config", str(config), "--max_steps", "4"])
    runpy.run_path(script, run_name="__main__")
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The resumed run logged steps 3 and 4 only: steps 1-2 came from checkpoint-2.
    resumed_steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert resumed_steps == [1, 2, 3, 4]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["after_training"]["eval_loss"] > 0
    assert "final checkpoint" in capsys.readouterr().out


def test_recipe_pushes_the_final_checkpoint_with_its_card(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
    config = tmp_path / "tiny.yaml"
    config.write_text(RECIPE_CONFIG.format(output_dir=tmp_path / "run", batch=4, steps=2, gradcache=False))
    monkeypatch.setattr(sys, "argv", ["train", "--config", str(config), "--push_to_hub", "org/tiny-unime"])
    runpy.run_path(str(REPO_ROOT / "recipes" / "train_embedding.py"), run_name="__main__")
    assert calls[0] == ("create", "org/tiny-unime") and calls[1][1]["repo_id"] == "org/tiny-unime"
    folder = calls[1][1]["folder_path"]
    card = open(os.path.join(folder, "README.md")).read()
    assert 'AutoModel.from_pretrained("org/tiny-unime"' in card and "loss `soft_label`" in card
    assert "held-out judge_agreement" in card and "2 steps" in card
    assert os.path.isfile(os.path.join(folder, "modeling_unime.py"))
    assert "pushed to org/tiny-unime" in capsys.readouterr().out
