"""FSDP2: GradCache and the plain step give the gradients of one process with the whole batch (and, with dropout on,
those of DDP), sharded checkpoints resume exactly, and the gathered model saves as a merged UniME-V2 checkpoint.

Two processes on CPU with gloo (tests/fsdp_worker.py). accelerate selects FSDP on accelerator devices only, so the
worker forces it through a test-only Trainer subclass; everything else is the trainers' own path. The batch puts
image queries on process 0 and text-only queries on process 1 (the vision tower runs on one process only), and gives
process 1 fewer distinct inputs (so fewer GradCache chunks) than process 0.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, free_port
from modeling_unime.tiny import build_tiny_unime, synthetic_judge_dataset
from trainers import UniMEV2Trainer, UniMEV2TrainingArguments
from trainers.sharding import ShardingMixin, is_vision_module, language_layer_classes

WORKER = str(REPO_ROOT / "tests" / "fsdp_worker.py")
EXACT_CASES = ("full-gradcache", "full-gradcache-reduce-each-chunk", "dora-gradcache", "full-plain", "reranker")
DROPOUT_CASE = "full-gradcache-dropout"


def _launch(output, mode, *extra, processes=2):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, WORKER, str(output), "--mode", mode, *extra]
    if processes > 1:
        command[1:1] = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                        "--main_process_port", str(free_port())]
    # A collective that one process never calls hangs: the timeout turns that into a failure.
    run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"{mode}: {run.stderr[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    output = tmp_path_factory.mktemp("fsdp")
    _launch(output, "fsdp", "--resume", "--memory")
    _launch(output, "ddp", "--cases", DROPOUT_CASE)
    _launch(output, "single", processes=1)
    return output


def _relative_difference(got, expected):
    assert got.keys() == expected.keys() and len(expected) > 10
    squared = sum(float((got[name] - expected[name]).norm() ** 2) for name in expected)
    return squared ** 0.5 / sum(float(expected[name].norm() ** 2) for name in expected) ** 0.5


def _result(runs, case, mode, rank=0):
    return json.loads((runs / f"{case}-{mode}-rank{rank}.json").read_text())


@pytest.mark.parametrize("case", EXACT_CASES)
def test_two_fsdp2_processes_give_the_gradients_of_one_process_with_the_whole_batch(runs, case):
    sharded = load_file(runs / f"{case}-fsdp.safetensors")
    single = load_file(runs / f"{case}-single.safetensors")
    # Measured 0.7-2.3e-7 (float sums in another order); averaged where summed would be off by 1, a process's
    # gradients missing by about 0.5.
    assert _relative_difference(sharded, single) < 1e-5
    for rank in (0, 1):
        result, reference = _result(runs, case, "fsdp", rank), _result(runs, case, "single")
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        # FSDP2 was on: the decoder layers are units of their own, the vision tower is not
        layers = [unit for unit in result["units"] if ".layers." in unit]
        assert len(layers) == 2 and not any(is_vision_module(unit) for unit in result["units"])


def test_the_batch_makes_the_processes_differ_as_a_real_multimodal_step_does(runs):
    for case in ("full-gradcache", "dora-gradcache", DROPOUT_CASE):
        first, second = _result(runs, case, "fsdp", 0), _result(runs, case, "fsdp", 1)
        assert any(first["chunk_images"]) and not any(second["chunk_images"])
        assert len(first["chunk_images"]) > len(second["chunk_images"])
        assert (first["added_forwards"], second["added_forwards"]) == (
            0, len(first["chunk_images"]) - len(second["chunk_images"]))


def test_gradients_are_reduced_once_per_step_or_after_each_chunk_as_asked(runs):
    for rank in (0, 1):
        once = _result(runs, "full-gradcache", "fsdp", rank)
        each = _result(runs, "full-gradcache-reduce-each-chunk", "fsdp", rank)
        forwards = len(_result(runs, "full-gradcache", "fsdp", 0)["chunk_images"])  # process 1 pads to this
        assert once["reduce_scatters"] == len(once["units"])  # one reduce-scatter per unit
        assert each["reduce_scatters"] == len(each["units"]) * forwards


def test_with_dropout_fsdp2_equals_ddp_and_replays_every_chunk_exactly(runs):
    sharded = load_file(runs / f"{DROPOUT_CASE}-fsdp.safetensors")
    assert _relative_difference(sharded, load_file(runs / f"{DROPOUT_CASE}-ddp.safetensors")) < 1e-5
    # dropout was on: one process draws other masks than two
    assert _relative_difference(sharded, load_file(runs / f"{DROPOUT_CASE}-single.safetensors")) > 1e-2
    for rank in (0, 1):
        assert _result(runs, DROPOUT_CASE, "fsdp", rank)["replay_difference"] < 1e-6


def test_a_sharded_checkpoint_resumes_exactly_and_the_final_model_saves_merged(runs):
    result = json.loads((runs / "resume.json").read_text())
    assert "pytorch_model_fsdp_0" in result["checkpoint_files"]  # sharded (torch.distributed.checkpoint)
    assert {"optimizer_0", "rng_state_0.pth", "rng_state_1.pth"} <= set(result["checkpoint_files"])
    assert result["steps_changed_weights"] > 1e-3
    assert result["resume_difference"] < 1e-6
    assert result["training_moved_embeddings"] > 1e-2
    assert result["merged_embedding_difference"] < 1e-5


RECIPE_CONFIG = """
model: {model}
data:
  train: {rows}
  image_root: {images}
finetuning: dora
adapter: {{dropout: 0.0}}
merge: true
training:
  output_dir: {output_dir}
  num_negatives: 3
  gradcache: true
  gradcache_chunk_size: 2
  per_device_train_batch_size: {batch}
  learning_rate: 0.001
  lr_scheduler_type: constant
  max_steps: 2
  logging_steps: 1
  save_steps: 1
  seed: 5
  train_sampling_strategy: sequential
  disable_tqdm: true
"""


def test_the_recipe_under_the_shipped_fsdp_config_trains_as_one_process_does(tmp_path, monkeypatch):
    """recipes/train_embedding.py launched with recipes/accelerate/fsdp.yaml (2 processes; its FSDP plugin, with
    loading on the main process only and sharded checkpoints): a DoRA run from a saved checkpoint with GradCache
    ends with the merged weights of the same run on one process with the whole batch."""
    from fsdp_worker import mixed_rows

    from conftest import run_recipe

    model, processor = build_tiny_unime("qwen2_vl")
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    mixed_rows(tmp_path / "images").save_to_disk(str(tmp_path / "rows"))
    configs = {}
    for name, batch in (("fsdp", 2), ("single", 4)):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(RECIPE_CONFIG.format(model=tmp_path / "tiny", rows=tmp_path / "rows",
                                                      images=tmp_path / "images", output_dir=tmp_path / name,
                                                      batch=batch))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(REPO_ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
         "--main_process_port", str(free_port()), WORKER, str(tmp_path), "--mode", "fsdp", "--recipe",
         str(configs["fsdp"])], env=environment, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-4000:]
    run_recipe(monkeypatch, "train_embedding.py", "--config", str(configs["single"]))

    assert "pytorch_model_fsdp_0" in os.listdir(tmp_path / "fsdp" / "checkpoint-1")
    assert "batch 2 x 2 processes" in (tmp_path / "fsdp" / "final" / "README.md").read_text()
    sharded = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    single = load_file(tmp_path / "single" / "final" / "model.safetensors")
    initial = load_file(tmp_path / "tiny" / "model.safetensors")
    assert sharded.keys() == single.keys() == initial.keys()
    moved = max(float((single[name] - initial[name]).abs().max()) for name in single)
    assert moved > 1e-3  # two steps, merged: the adapter changed the weights
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], atol=1e-3 * moved, rtol=1e-4, msg=name)


def test_the_memory_plan_of_an_fsdp2_process_is_within_20_percent_of_its_measured_peak(runs):
    """trainers.memory_plan's tiny GradCache settings, trained under FSDP2 on 2 processes: each process's peak of
    live tensors (FSDP2's in-place storage resizes followed) against the plan for one process of that run."""
    for rank in (0, 1):
        rows = json.loads((runs / f"memory-rank{rank}.json").read_text())
        assert {row["setting"] for row in rows} == {"full, GradCache chunk 2", "lora, GradCache chunk 2"}
        for row in rows:
            assert row["planned_weights"] == row["measured_weights"], row  # this process's shards, exactly
            # measured 0.98 (full) and 0.83-0.84 (LoRA: the plan leaves out FSDP2's all-gather buffers)
            assert 0.8 <= row["planned"] / row["measured"] <= 1.2, row


# ------------------------------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("family, layer", [("qwen2_vl", "Qwen2VLDecoderLayer"),
                                           ("qwen2_5_vl", "Qwen2_5_VLDecoderLayer"),
                                           ("llava_onevision", "Qwen2DecoderLayer"),
                                           ("qwen3_vl", "Qwen3VLTextDecoderLayer"),
                                           ("qwen3_vl_moe", "Qwen3VLMoeTextDecoderLayer")])
def test_the_decoder_layers_are_sharded_and_the_vision_tower_is_not(family, layer):
    model = build_tiny_unime(family)[0]
    assert language_layer_classes(model) == [layer]
    vision_layers = {type(module).__name__ for name, module in model.named_modules() if is_vision_module(name)}
    assert vision_layers and layer not in vision_layers


def test_a_vision_block_sharded_on_its_own_is_refused(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from torch.distributed.fsdp import fully_shard
        from modeling_unime.tiny import build_tiny_unime
        from trainers.sharding import check_units_run_on_every_forward
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        for shard_a_vision_block in (False, True):
            model = build_tiny_unime("qwen2_vl")[0]
            for layer in model.model.language_model.layers:
                fully_shard(layer)
            if shard_a_vision_block:
                fully_shard(model.model.visual.blocks[0])
            fully_shard(model)
            try:
                check_units_run_on_every_forward(model)
                print("accepted: vision block sharded", shard_a_vision_block)
            except ValueError as error:
                print("refused:", error)
        dist.destroy_process_group()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "accepted: vision block sharded False" in run.stdout
    assert "accepted: vision block sharded True" not in run.stdout
    assert "refused: FSDP shards 1 module(s) of the vision tower" in run.stdout
    assert "fsdp_transformer_layer_cls_to_wrap: Qwen2VLDecoderLayer" in run.stdout


class _State:
    def __init__(self, plugin):
        self.fsdp_plugin = plugin


class _Accelerator:
    def __init__(self, plugin):
        self.state = _State(plugin)


class _Trainer(ShardingMixin):
    def __init__(self, plugin, gradcache=True):
        self.model = build_tiny_unime("qwen2_vl")[0]
        self.args = UniMEV2TrainingArguments("unused", gradcache=gradcache, use_cpu=True, report_to=[])
        self.accelerator = _Accelerator(plugin)
        self.is_fsdp_enabled = True


def test_the_plugin_gets_the_decoder_layers_unless_the_config_names_its_own(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    _Trainer(plugin).configure_sharding()
    assert plugin.transformer_cls_names_to_wrap == ["Qwen2VLDecoderLayer"]
    chosen = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["Qwen2VLVisionBlock"])
    _Trainer(chosen).configure_sharding()
    assert chosen.transformer_cls_names_to_wrap == ["Qwen2VLVisionBlock"]  # refused later, by the unit check
    version_one = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="transformer_based_wrap")
    with pytest.raises(ValueError, match="gradcache=True needs FSDP2"):
        _Trainer(version_one).configure_sharding()
    _Trainer(version_one, gradcache=False).configure_sharding()


class _DeepSpeedTrainer(ShardingMixin):
    def __init__(self, stage, accumulation=1, finetuning="full"):
        from trainers.adapters import prepare_for_training

        self.model = prepare_for_training(build_tiny_unime("qwen2_vl")[0], finetuning)
        self.args = UniMEV2TrainingArguments("unused", use_cpu=True, report_to=[],
                                             gradient_accumulation_steps=accumulation)
        self.accelerator = _Accelerator(None)
        self.accelerator.state.deepspeed_plugin = type("Plugin", (), {"zero_stage": stage})()
        self.is_deepspeed_enabled = True


def test_deepspeed_settings_that_cannot_work_are_refused_with_the_alternative():
    with pytest.raises(ValueError, match="ZeRO-3 gathers weights module by module"):
        _DeepSpeedTrainer(3).check_deepspeed(coalesced=True)
    with pytest.raises(ValueError, match="ZeRO-3 gathers weights"):
        _DeepSpeedTrainer(3, finetuning="lora").check_deepspeed(coalesced=False)  # the reranker's path too
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2 under DeepSpeed"):
        _DeepSpeedTrainer(2, accumulation=2).check_deepspeed(coalesced=True)
    # the reranker's path (one reduction per backward, in hook order): a trained vision tower is refused...
    with pytest.raises(ValueError, match="DeepSpeed with a trained vision tower"):
        _DeepSpeedTrainer(2).check_deepspeed(coalesced=False)
    _DeepSpeedTrainer(2, finetuning="lora").check_deepspeed(coalesced=False)  # ...a frozen one is not


def test_an_fsdp_config_that_accelerate_drops_on_cpu_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    model, processor = build_tiny_unime("qwen2_vl")
    rows = synthetic_judge_dataset(4, tmp_path, num_negatives=4)
    args = UniMEV2TrainingArguments(str(tmp_path / "out"), use_cpu=True, report_to=[], num_negatives=4)
    with pytest.warns(UserWarning, match="asks for FSDP, but accelerate runs"):
        trainer = UniMEV2Trainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                                 image_root=tmp_path)
    assert not trainer.is_fsdp_enabled and torch.distributed.is_available()
