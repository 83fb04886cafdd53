"""The documented defaults of embedding training, pinned to the paper's and the authors' code's values.

References (each assertion names its own):
- [paper] Gu et al., "UniME-V2: MLLM-as-a-Judge for Universal Multimodal Embedding Learning" (arXiv 2510.13515),
  "MLLM Judgment Based Training Framework" (the soft-label alignment, the same tau on both distributions) and
  implementation details (tau = 0.02, k = 8 negatives, 2,000 steps, lr 1e-4 for Qwen2-VL and 2e-5 for LLaVA-OV, warmup
  200, bf16, GradCache chunk 2, 672x672 / 336x336 training images, global batch 1024; the reranker's LoRA r 128, alpha
  256, dropout 0.05) and its ablations (k = 4/6/8/10, tau = 0.01/0.02/0.03).
- [code] github.com/GaryGuTC/UniME-v2 at e3deb7343984f15df45469ae201f4f53dea121a2:
  Embedding/src/arguments.py (temperature 0.02, lora_r 16, lora_alpha 64, lora_dropout 0.1,
  select_hard_negative_num 8), Embedding/src/model.py (LoraConfig(..., init_lora_weights="gaussian", use_dora=True)),
  Embedding/shells/training/train_qwen2vl.sh (--temperature 0.02, --gc_q_chunk_size 2 --gc_p_chunk_size 2,
  --select_hard_negative_num_4_training 8, lr 1e-4, max_steps 2000, warmup_steps 200, --bf16, linear schedule),
  Embedding/src/collator.py (the first 8 of the 10 mined negatives, fixed across epochs).
The hard-negative mining defaults (top-50, beta 0.01, 10 negatives, interval 5) are pinned in the mining tests.
"""

import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from modeling_unime.processing_unime import canonical_image_resize
from modeling_unime.tiny import build_tiny_processor, build_tiny_unime, synthetic_judge_dataset
from trainers import InfoNCELoss, SoftLabelAlignmentLoss, UniMEV2Collator, UniMEV2Trainer, UniMEV2TrainingArguments
from trainers.adapters import LANGUAGE_MODEL_TARGETS, RERANKER_ADAPTER, adapter_config
from trainers.recipe_runner import EMBEDDER, RERANKER, parse_training_recipe

# [paper] implementation details tau = 0.02 on both P and Q; [code] arguments.py temperature=0.02
PAPER_TEMPERATURE = 0.02
# [paper] implementation details k = 8 of the 10 mined; [code] select_hard_negative_num(_4_training)=8
PAPER_NUM_NEGATIVES = 8
PAPER_CHUNK = 2  # [code] train_qwen2vl.sh --gc_q_chunk_size 2 --gc_p_chunk_size 2


def test_training_arguments_defaults_are_the_papers(tmp_path):
    args = UniMEV2TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    # [paper] "MLLM Judgment Based Training Framework": the judgment-based soft-label alignment is the method's loss
    assert args.loss == "soft_label"
    assert args.contrastive_temperature == PAPER_TEMPERATURE
    assert args.num_negatives == PAPER_NUM_NEGATIVES
    assert args.negative_selection == "first"  # [code] collator.py: the first k negatives, the same every epoch
    assert args.gradcache_chunk_size == PAPER_CHUNK
    # The soft-label loss alone: no InfoNCE term mixed in, and the InfoNCE baseline uses in-batch negatives
    # (README "Training an embedder"; the "hard negatives only" ablation is infonce_in_batch=False).
    assert args.infonce_weight == 0.0 and args.infonce_in_batch is True and args.infonce_hard_negatives is True


def test_loss_and_collator_defaults_are_the_papers():
    assert SoftLabelAlignmentLoss().temperature == PAPER_TEMPERATURE
    assert InfoNCELoss().temperature == PAPER_TEMPERATURE
    collator = UniMEV2Collator(build_tiny_processor("qwen2_vl"))
    assert (collator.num_negatives, collator.negative_selection) == (PAPER_NUM_NEGATIVES, "first")


def test_trainer_built_with_default_arguments_trains_with_the_papers_objective(tmp_path):
    """The defaults reach the loss and the collator the trainer builds, not only the arguments object."""
    model, processor = build_tiny_unime("qwen2_vl")
    rows = synthetic_judge_dataset(2, tmp_path, num_negatives=10)  # 10 mined negatives, as released
    trainer = UniMEV2Trainer(model=model, args=UniMEV2TrainingArguments(str(tmp_path / "out"), report_to=[],
                                                                         use_cpu=True),
                             train_dataset=rows, processing_class=processor, image_root=tmp_path)
    assert trainer.soft_label_loss.temperature == PAPER_TEMPERATURE
    assert trainer.infonce_loss.temperature == PAPER_TEMPERATURE
    assert trainer.data_collator.num_negatives == PAPER_NUM_NEGATIVES
    assert trainer.data_collator.negative_selection == "first"
    assert trainer.data_collator.chunk_size is None  # GradCache is opt-in (the paper's configs turn it on)
    batch = trainer.data_collator([rows[0], rows[1]])
    assert batch["judge_scores"].shape == (2, 1 + PAPER_NUM_NEGATIVES)
    torch.testing.assert_close(batch["judge_scores"][0], torch.tensor(rows[0]["judge_scores"][:9]))  # the first 8


def test_adapter_defaults_are_the_authors_dora():
    config = adapter_config()
    # [code] model.py: LoraConfig(r=16, lora_alpha=64, lora_dropout=0.1, init_lora_weights="gaussian", use_dora=True)
    assert config.use_dora is True
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 64, 0.1)
    assert config.init_lora_weights == "gaussian"
    assert config.bias == "none"
    # [code] model.py: q/k/v/o/down_proj of the language model only; the vision tower stays frozen.
    assert config.target_modules == LANGUAGE_MODEL_TARGETS
    targeted = {
        "model.language_model.layers.0.self_attn.q_proj": True,
        "model.language_model.layers.3.self_attn.k_proj": True,
        "model.language_model.layers.3.self_attn.v_proj": True,
        "model.language_model.layers.3.self_attn.o_proj": True,
        "model.language_model.layers.3.mlp.down_proj": True,
        "model.language_model.layers.3.mlp.gate_proj": False,
        "model.language_model.layers.3.mlp.up_proj": False,
        "model.visual.blocks.0.attn.qkv": False,
        "model.visual.blocks.0.attn.proj": False,
        "model.vision_tower.encoder.layers.0.self_attn.q_proj": False,  # LLaVA-OneVision's SigLIP
        "model.language_model.embed_tokens": False,
    }
    assert {name: re.fullmatch(LANGUAGE_MODEL_TARGETS, name) is not None for name in targeted} == targeted
    # The recipes: an embedder is trained with that DoRA unless the config says otherwise.
    assert (EMBEDDER.default_finetuning, EMBEDDER.default_adapter) == ("dora", {})


def test_reranker_adapter_defaults_are_the_papers():
    # [paper] implementation details: LoRA r=128, alpha 256, dropout 0.05, language model only, vision tower frozen.
    assert RERANKER.default_finetuning == "lora"
    assert (RERANKER_ADAPTER["r"], RERANKER_ADAPTER["alpha"], RERANKER_ADAPTER["dropout"]) == (128, 256, 0.05)
    assert re.fullmatch(RERANKER_ADAPTER["target_modules"], "model.visual.blocks.0.attn.qkv") is None


PAPER_CONFIGS = {
    # config: (learning rate, training image rule). [paper] implementation details: lr 1e-4 for Qwen2-VL (= [code]
    # train_qwen2vl.sh), 2e-5 for LLaVA-OV (the paper's value; the authors' train_llavaOV.sh uses 1e-4); images
    # 672x672 / 336x336.
    "qwen2vl-2b.yaml": (1e-4, "authors-train-qwen2vl"),
    "qwen2vl-7b.yaml": (1e-4, "authors-train-qwen2vl"),
    "llava-ov-7b.yaml": (2e-5, "authors-train-llava-ov"),
    # The paper's Qwen2-VL-2B settings carried over to Qwen3-VL-2B (no run of the authors' to match).
    "qwen3vl-2b.yaml": (1e-4, "square:672"),
}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_paper_recipe_configs_carry_the_papers_settings(name):
    settings = yaml.safe_load((REPO_ROOT / "recipes" / "configs" / name).read_text())
    learning_rate, training_images = PAPER_CONFIGS[name]
    training = settings["training"]
    assert training["loss"] == "soft_label"
    assert training["contrastive_temperature"] == PAPER_TEMPERATURE
    assert training["num_negatives"] == PAPER_NUM_NEGATIVES and training["negative_selection"] == "first"
    assert training["gradcache"] is True and training["gradcache_chunk_size"] == PAPER_CHUNK
    assert training["max_steps"] == 2000 and training["warmup_steps"] == 200  # [paper]/[code]
    assert training["lr_scheduler_type"] == "linear" and training["bf16"] is True  # [code] --bf16, linear
    assert float(training["learning_rate"]) == learning_rate
    assert settings["finetuning"] == "dora" and settings["adapter"] == {"r": 16, "alpha": 64, "dropout": 0.1}
    assert settings["data"]["image_resize"] == training_images
    assert settings["image_resize"] == "authors-eval"  # the authors evaluate at 1344x1344
    # Every field is a real UniMEV2TrainingArguments field (a typo would be a crash at launch, not a silent default).
    fields = set(UniMEV2TrainingArguments.__dataclass_fields__)
    assert set(training) <= fields, set(training) - fields


def test_training_image_presets_are_the_authors_sizes():
    # [paper] implementation details: 672x672 (Qwen2-VL) and 336x336 (LLaVA-OV) in training, 1344x1344 at evaluation.
    assert canonical_image_resize("authors-train-qwen2vl") == "square:672"
    assert canonical_image_resize("authors-train-llava-ov") == "square:336"
    assert canonical_image_resize("authors-eval") == "square:1344"


def test_the_readme_states_the_same_defaults():
    readme = Path(REPO_ROOT / "README.md").read_text()
    assert "DoRA r16/a64, tau 0.02, k=8, 2,000 steps, GradCache chunk 2" in readme
    assert "tau 0.02" in readme and "`negative_selection` (`first` as the authors" in readme


SHIPPED_TRAINING_CONFIGS = {
    "tiny-cpu.yaml": EMBEDDER, "qwen2vl-2b.yaml": EMBEDDER, "qwen2vl-7b.yaml": EMBEDDER, "llava-ov-7b.yaml": EMBEDDER,
    "qwen3vl-2b.yaml": EMBEDDER,
    "reranker-tiny-cpu.yaml": RERANKER, "reranker-qwen25vl-7b.yaml": RERANKER,
}


@pytest.mark.parametrize("name", list(SHIPPED_TRAINING_CONFIGS))
def test_every_shipped_training_config_parses_into_the_recipe_arguments(name):
    """The recipe reads each shipped YAML unchanged: every key names a field and every value reaches it."""
    path = REPO_ROOT / "recipes" / "configs" / name
    settings = yaml.safe_load(path.read_text())
    parsed = parse_training_recipe(SHIPPED_TRAINING_CONFIGS[name], ["--config", str(path)])
    assert parsed.script.model == settings["model"] and parsed.data.data_train == settings["data"]["train"]
    for key, value in settings["training"].items():
        assert getattr(parsed.training, key) == value, key
    for key, value in (settings.get("adapter") or {}).items():
        assert getattr(parsed.adapter, f"adapter_{key}") == value, key
    if name in PAPER_CONFIGS:
        assert parsed.adapter.settings(EMBEDDER.default_adapter) == {"r": 16, "alpha": 64, "dropout": 0.1}
