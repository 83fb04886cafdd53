"""The memory plan (trainers/memory_plan.py, recipes/memory_plan.py): against measured peaks of tiny training steps on
CPU, exact parameter counts, the shipped 7B configs under each accelerate config, and bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.memory_plan import (
    GIB,
    QWEN_PIXEL_LIMITS,
    TINY_SETTINGS,
    TinySetting,
    compare_tiny_settings,
    format_comparison,
    image_geometry,
    plan_memory,
    plan_tiny_setting,
    tiny_backbone_config,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"
ACCELERATE = ROOT / "recipes" / "accelerate"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from memory_plan import main
    finally:
        sys.path.pop(0)
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def comparison():
    return compare_tiny_settings(TINY_SETTINGS)


def test_plan_is_within_20_percent_of_the_measured_peak_of_tiny_training_steps(comparison):
    print("\n" + format_comparison(comparison))
    for row in comparison:
        assert 0.8 <= row["ratio"] <= 1.2, format_comparison([row])
        # Weights and optimizer state are counted exactly, not estimated.
        assert row["planned_weights"] == row["measured_weights"], row["setting"]
        assert row["planned_optimizer"] == pytest.approx(row["measured_optimizer"], rel=1e-3), row["setting"]  # + steps
    # The activations are a real share of each measured step, so the check is not of weights alone.
    assert all(row["measured_rest"] > 0.3 * row["measured"] for row in comparison)


def test_gradcache_and_checkpointing_lower_the_measured_and_the_planned_peak_alike(comparison):
    by_name = {row["setting"]: row for row in comparison}
    plain, chunked = by_name["full, one forward"], by_name["full, GradCache chunk 2"]
    checkpointed = by_name["full, gradient checkpointing"]
    assert chunked["measured"] < plain["measured"] and chunked["planned"] < plain["planned"]
    assert checkpointed["measured"] < plain["measured"] and checkpointed["planned"] < plain["planned"]


@pytest.mark.parametrize("finetuning", ["full", "lora", "dora"])
def test_parameter_counts_equal_those_of_a_real_model(finetuning):
    from modeling_unime.configuration_unime import UniMEV2Config
    from modeling_unime.modeling_unime import UniMEV2Model
    from trainers.adapters import prepare_for_training

    setting = TinySetting("count", finetuning=finetuning)
    real = UniMEV2Model(UniMEV2Config(backbone_config=tiny_backbone_config(setting)))
    real = prepare_for_training(real, finetuning, **(setting.adapter if finetuning != "full" else {}))
    parameters = {id(p): p for p in real.parameters()}.values()
    plan = plan_tiny_setting(setting, text_tokens=16)
    assert plan.parameters == sum(p.numel() for p in parameters)
    assert plan.trainable_parameters == sum(p.numel() for p in parameters if p.requires_grad)
    if finetuning != "full":
        assert plan.trainable_parameters < plan.parameters / 10
        assert plan.optimizer_state == 8 * plan.trainable_parameters


def test_image_tokens_follow_each_processor():
    from transformers import LlavaOnevisionConfig, Qwen2VLConfig

    # Qwen2-VL: 672 / 14 = 48 patches a side, merged 2x2 into 24 x 24 tokens (the authors' training size).
    assert image_geometry(Qwen2VLConfig(), 672, 672) == (576, 2304, 1)
    assert image_geometry(Qwen2VLConfig(), 1344, 1344) == (2304, 9216, 1)
    # LLaVA-OneVision at 336: the base crop and one tile of 27 x 27, and a newline per tile row.
    assert image_geometry(LlavaOnevisionConfig(), 336, 336) == (729 + 729 + 27, 2 * 729, 2)


@pytest.mark.parametrize("width, height", [(672, 672), (1344, 1344), (500, 300)])
def test_qwen3_vl_image_tokens_are_what_its_processor_makes(width, height):
    from PIL import Image
    from transformers import Qwen3VLConfig

    from modeling_unime.tiny import build_tiny_processor

    # Patches of 16 merged 2x2: 672 -> 42 x 42 patches, 21 x 21 tokens (576 on Qwen2-VL at the same size).
    processor = build_tiny_processor("qwen3_vl", max_pixels=QWEN_PIXEL_LIMITS[1])
    batch = processor(texts=[None], images=[Image.new("RGB", (width, height))])
    grid = batch["image_grid_thw"][0]
    tokens = int((batch["mm_token_type_ids"][0] == 1).sum())
    assert image_geometry(Qwen3VLConfig(), width, height) == (tokens, int(grid.prod()), 1)
    assert (width, height) != (672, 672) or tokens == 441


def test_seven_b_configs_plan_offline_and_fsdp_shards_by_the_world_size(capsys):
    outputs = {}
    for accelerate in ("multi_gpu", "fsdp"):
        status, out, _ = run_cli(capsys, "--config", str(CONFIGS / "qwen2vl-7b.yaml"), "--accelerate_config",
                                 str(ACCELERATE / f"{accelerate}.yaml"), "--gpu-memory", "80")
        assert status == 0
        outputs[accelerate] = json.loads(out.strip().splitlines()[-1])
        assert "built-in table" in outputs[accelerate]["config_source"]
    ddp, fsdp = outputs["multi_gpu"], outputs["fsdp"]
    assert 7.7e9 < ddp["parameters"] < 7.8e9  # Qwen2-VL-7B without its LM head
    assert ddp["fits"] is True and ddp["setting"]["rows_per_forward"] == 2
    world = fsdp["setting"]["world_size"]
    assert fsdp["setting"]["gradcache"] is True and fsdp["setting"]["rows_per_forward"] == 2  # GradCache under FSDP2
    assert fsdp["weights"] == pytest.approx(ddp["weights"] / world, rel=1e-3)
    assert fsdp["optimizer_state"] == pytest.approx(ddp["optimizer_state"] / world, rel=1e-3)
    assert fsdp["trainable_weights"] == pytest.approx(4 * fsdp["trainable_parameters"] / world, rel=1e-3)  # fp32
    # Reduced once per step: the sharded float32 gradients and, until the last chunk, the unsharded ones.
    trainable = fsdp["trainable_parameters"]
    assert fsdp["gradients"] == pytest.approx(4 * trainable / world + 4 * trainable, rel=1e-3)
    assert fsdp["fits"] is True and fsdp["total"] < ddp["total"]


def test_a_7b_full_fine_tune_fits_only_sharded_and_the_advice_says_how(capsys):
    plans = {}
    for name, accelerate, extra in (("ddp", "multi_gpu", ()), ("fsdp", "fsdp", ()),
                                    ("fsdp, reduced each chunk", "fsdp", ("--gradcache_reduce_each_chunk", "true"))):
        status, out, _ = run_cli(capsys, "--config", str(CONFIGS / "qwen2vl-7b.yaml"), "--accelerate_config",
                                 str(ACCELERATE / f"{accelerate}.yaml"), "--gpu_memory", "60", "--finetuning", "full",
                                 *extra)
        assert status == 0
        plans[name] = json.loads(out.strip().splitlines()[-1])
    ddp, fsdp, each = plans["ddp"], plans["fsdp"], plans["fsdp, reduced each chunk"]
    assert ddp["fits"] is False and any("FSDP" in advice for advice in ddp["advice"])
    assert fsdp["fits"] is False and any("gradcache_reduce_each_chunk: true" in advice for advice in fsdp["advice"])
    world, trainable = each["setting"]["world_size"], each["trainable_parameters"]
    assert each["gradients"] == pytest.approx(4 * trainable / world, rel=1e-3)  # sharded from the first chunk on
    assert each["fits"] is True and each["total"] < fsdp["total"] < ddp["total"]


@pytest.mark.parametrize("config", ["llava-ov-7b", "reranker-qwen25vl-7b", "qwen2vl-2b", "qwen3vl-2b"])
def test_other_shipped_configs_plan_under_zero2(capsys, config):
    status, out, _ = run_cli(capsys, "--config", str(CONFIGS / f"{config}.yaml"), "--accelerate_config",
                             str(ACCELERATE / "zero2.yaml"), "--gpu_memory", "80")
    assert status == 0
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["total"] > plan["weights"] > 0 and plan["setting"]["strategy"] == "zero2"
    assert plan["setting"]["gradcache"] is (config != "reranker-qwen25vl-7b")  # GradCache under ZeRO-2 (embedder)


def test_reranker_plan_uses_its_lora_and_longest_list():
    plan = plan_memory(CONFIGS / "reranker-qwen25vl-7b.yaml", ACCELERATE / "multi_gpu.yaml", gpu_memory_gib=80)
    assert plan.setting["kind"] == "reranker" and plan.setting["finetuning"] == "lora"
    assert plan.setting["images_per_row"] == 6  # query + positive + 4 listwise negatives
    assert 3.0e8 < plan.trainable_parameters < 3.5e8  # r 128 on the 7 projections of 28 layers
    assert plan.fits is True and plan.total < 80 * GIB


def test_the_script_runs_as_a_command():
    result = subprocess.run(
        [sys.executable, "recipes/memory_plan.py", "--config", "recipes/configs/tiny-cpu.yaml"], cwd=ROOT,
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["fits"] is None


def test_bad_inputs_give_clear_errors(capsys, tmp_path):
    status, _, err = run_cli(capsys, "--config", str(tmp_path / "missing.yaml"))
    assert status == 2 and "does not exist" in err
    status, _, err = run_cli(capsys, "--config", str(CONFIGS / "tiny-cpu.yaml"), "--accelerate_config",
                             str(tmp_path / "nope.yaml"))
    assert status == 2 and "accelerate config" in err
    status, _, err = run_cli(capsys, "--config", str(CONFIGS / "tiny-cpu.yaml"), "--gpu_memory", "0")
    assert status == 2 and "positive" in err
    status, _, err = run_cli(capsys)
    assert status == 2 and "--config is required" in err
    # an accelerate file that is not one, and a model the offline table does not know
    not_accelerate = tmp_path / "recipe.yaml"
    not_accelerate.write_text("model: tiny:qwen2_vl\n")
    status, _, err = run_cli(capsys, "--config", str(CONFIGS / "tiny-cpu.yaml"), "--accelerate_config",
                             str(not_accelerate))
    assert status == 2 and "not an accelerate config" in err
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: someone/unknown-vl-model\ndata: {train: synthetic-judge:4}\n"
                       "training: {output_dir: " + str(tmp_path / "run") + "}\n")
    status, _, err = run_cli(capsys, "--config", str(unknown))
    assert status == 2 and "built-in table" in err
    assert not (tmp_path / "run").exists()  # a plan creates no run folder


def test_weights_dtype_follows_the_recipe_rules():
    adapter = plan_memory(CONFIGS / "qwen2vl-2b.yaml", ACCELERATE / "multi_gpu.yaml")
    full = plan_memory(CONFIGS / "qwen2vl-2b.yaml", ACCELERATE / "multi_gpu.yaml", overrides=["--finetuning", "full"])
    assert adapter.setting["weights_dtype"] == str(torch.bfloat16)  # bf16 base under DoRA
    assert full.setting["weights_dtype"] == str(torch.float32)  # float32 master weights for full fine-tuning
    assert full.trainable_weights == 4 * full.parameters and full.optimizer_state == 8 * full.parameters


def test_a_checkpoint_folder_is_planned_from_its_own_config(tmp_path):
    """A UniME-V2 checkpoint folder (not in the built-in table) is read with AutoConfig: its backbone's own sizes."""
    from modeling_unime.tiny import build_tiny_unime

    model, _ = build_tiny_unime("qwen2_vl")
    model.config.save_pretrained(tmp_path / "checkpoint")  # the config alone: a plan loads no weights
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tmp_path / 'checkpoint'}\ndata: {{train: synthetic-judge:4}}\n"
                      f"finetuning: full\ntraining: {{output_dir: {tmp_path / 'run'}}}\n")
    plan = plan_memory(recipe)
    assert plan.config_source.startswith("AutoConfig.from_pretrained")
    assert plan.parameters == sum(parameter.numel() for parameter in model.parameters())


def test_under_fsdp_the_vision_tower_is_gathered_with_the_root_unit():
    """trainers.sharding makes the decoder layers FSDP units and keeps the vision tower in the root unit, which is
    gathered for the whole step: the plan's root holds every parameter outside the decoder layers."""
    from trainers.memory_plan import (
        _model_facts,
        backbone_config_for,
        build_meta_model,
        decoder_layers,
        sharding_from_accelerate_config,
        training_shape,
        vision_blocks,
    )

    sharding = sharding_from_accelerate_config(ACCELERATE / "fsdp.yaml")
    shape, kind, spec = training_shape(CONFIGS / "qwen2vl-7b.yaml", sharding)
    model = build_meta_model(kind, backbone_config_for(spec)[0], shape)
    facts = _model_facts(model)
    in_layers = sum(parameter.numel() for layer in decoder_layers(model) for parameter in layer.parameters())
    vision = sum(parameter.numel() for block in vision_blocks(model) for parameter in block.parameters())
    assert facts.root_count == facts.parameter_count - in_layers
    assert facts.root_count > vision > 6e8  # Qwen2-VL's 675M-parameter vision tower
    layer_sizes = [sum(parameter.numel() for parameter in layer.parameters()) for layer in decoder_layers(model)]
    assert facts.largest_unit_count == max(layer_sizes)


def test_zero3_is_refused_as_the_trainers_refuse_it(tmp_path, capsys):
    zero3 = tmp_path / "zero3.yaml"
    zero3.write_text((ACCELERATE / "zero2.yaml").read_text().replace("zero_stage: 2", "zero_stage: 3"))
    status, _, err = run_cli(capsys, "--config", str(CONFIGS / "qwen2vl-7b.yaml"), "--accelerate_config", str(zero3))
    assert status == 2 and "ZeRO-3 is refused by the trainers" in err


def test_qwen3_vl_deepstack_mergers_count_in_the_vision_activations():
    """Each deepstack merger of Qwen3-VL projects one vision block's output: its saved activations are planned."""
    from trainers.memory_plan import TrainingShape, activation_profile, build_meta_model

    config = tiny_backbone_config(TinySetting("deepstack", family="qwen3_vl"))
    shape = TrainingShape(
        kind="embedder", finetuning="full", adapter={}, weights_dtype=torch.float32, compute_dtype=torch.float32,
        mixed_precision=None, queries_per_device=1, rows_per_query=3, gradcache=False, gradcache_chunk_size=2,
        gradient_checkpointing=False, image_size=(224, 224), images_per_row=1, images_per_forward_row=1.0,
        text_tokens=16, qwen_max_pixels=224 * 224)
    model = build_meta_model("embedder", config, shape)
    with_mergers = activation_profile(model, config, shape).vision_edges_per_image
    model.model.visual.deepstack_merger_list = torch.nn.ModuleList()
    without = activation_profile(model, config, shape).vision_edges_per_image
    assert with_mergers > without > 0
