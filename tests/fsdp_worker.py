"""One optimizer step of UniMEV2Trainer on a tiny Qwen2-VL, under FSDP2, DDP or in one process; run by
tests/test_fsdp.py (``accelerate launch --multi_gpu --num_processes 2 tests/fsdp_worker.py --mode fsdp OUT``, or
in-process through `run_case`).

Each case writes, on the main process, the gradients just before the optimizer step (whole tensors, gathered from the
shards under FSDP2) and the logged loss and gradient norm; GradCache cases also the largest difference between a
chunk's replayed embeddings and those of its first pass (dropout on: the random state must be replayed).

accelerate selects FSDP only on accelerator devices (``accelerate/state.py``); on CPU this script forces it with
`CPUFSDPTrainer`, a test-only Trainer subclass: the user path never does this.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from modeling_unime.tiny import build_tiny_reranker, build_tiny_unime, synthetic_judge_dataset  # noqa: E402
from trainers import UniMEV2Trainer, UniMEV2TrainingArguments  # noqa: E402
from trainers.adapters import prepare_for_training  # noqa: E402
from trainers.reranker_trainer import UniMEV2RerankerTrainer, UniMEV2RerankerTrainingArguments  # noqa: E402

# name: (finetuning, gradcache, loss, dropout); "reranker": the reranker's pairwise + listwise step
CASES = {
    "full-gradcache": ("full", True, "hybrid", 0.0),
    "full-gradcache-dropout": ("full", True, "soft_label", 0.2),
    "dora-gradcache": ("dora", True, "soft_label", 0.0),
    "full-gradcache-reduce-each-chunk": ("full", True, "hybrid", 0.0),
    "full-plain": ("full", False, "hybrid", 0.0),
    "reranker": ("lora", False, None, 0.0),
}
GLOBAL_BATCH = 4


def mixed_rows(root: Path):
    """Taken in order, process 0 gets rows 0-1 and process 1 rows 2-3: image queries on one, text-only queries on the
    other (the vision tower runs on one process only), and on process 1 two rows with the same candidates, which
    de-duplication encodes once (so the processes have different numbers of chunks)."""
    from datasets import Dataset

    from modeling_unime.data import UNIME_FEATURES

    rows = synthetic_judge_dataset(GLOBAL_BATCH, root, num_negatives=3, seed=1).to_list()
    for index in (2, 3):
        rows[index]["query_text"] = f"which caption names shape {index}?"
        rows[index]["query_image"] = None
    rows[3].update({key: rows[2][key] for key in ("pos_text", "pos_image", "neg_texts", "neg_images")})
    return Dataset.from_list(rows, features=UNIME_FEATURES)


class GradientRecorder(TrainerCallback):
    """The gradients just before the optimizer step, whole (DTensor shards gathered: a collective on every process)."""

    def __init__(self) -> None:
        self.gradients: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                gradient = parameter.grad
                gradient = gradient.full_tensor() if hasattr(gradient, "full_tensor") else gradient
                self.gradients[name.replace("_fsdp_wrapped_module.", "")] = gradient.detach().clone()


class ReplayCheckingTrainer(UniMEV2Trainer):
    """Records how far a replayed chunk's embeddings are from its first pass, and each process's chunks (how many,
    which carry images, how many forwards were added to match the other processes)."""

    largest_replay_difference = 0.0

    def gradcache_step(self, model, inputs, scale=1.0):
        self.chunk_images = [bool("pixel_values" in chunk) for chunk in inputs["chunks"]]
        reduce_scatter = getattr(torch.distributed, "reduce_scatter_single", None)
        self.reduce_scatters = 0

        def counted(*args, **kwargs):
            self.reduce_scatters += 1
            return reduce_scatter(*args, **kwargs)

        torch.distributed.reduce_scatter_single = counted
        try:
            return super().gradcache_step(model, inputs, scale)
        finally:
            torch.distributed.reduce_scatter_single = reduce_scatter

    def missing_forwards(self, count):
        self.added_forwards = super().missing_forwards(count)
        return self.added_forwards

    def replay_chunk(self, model, chunk, state, cached):
        with state.replay(), self.compute_loss_context_manager(), torch.no_grad():
            replayed = model(**chunk).embeddings
        self.largest_replay_difference = max(self.largest_replay_difference,
                                             float((replayed - cached.detach()).abs().max()))
        super().replay_chunk(model, chunk, state, cached)


def force_fsdp_on_cpu(trainer, plugin) -> None:
    """Test hook: FSDP2 on CPU, which accelerate never selects there (see the module docstring)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    state.fsdp_plugin = plugin
    # Both: every AcceleratorState() built later (saving does) copies the distributed type of PartialState.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    trainer.configure_sharding()


class ForcedFSDPOnCPU:
    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        force_fsdp_on_cpu(self, FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
        ))


class CPUFSDPTrainer(ForcedFSDPOnCPU, ReplayCheckingTrainer):
    pass


class CPUFSDPRerankerTrainer(ForcedFSDPOnCPU, UniMEV2RerankerTrainer):
    pass


def run_case(case: str, mode: str, output: Path) -> dict:
    finetuning, gradcache, loss, dropout = CASES[case]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    reranker = case == "reranker"
    model, processor = build_tiny_reranker("qwen2_vl") if reranker else build_tiny_unime("qwen2_vl")
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = dropout
    model = prepare_for_training(model, finetuning, dropout=0.0) if finetuning != "full" else model
    root = output / "images"
    rows = mixed_rows(root)
    settings = dict(
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=5, max_steps=1, logging_steps=1,
        per_device_train_batch_size=GLOBAL_BATCH // world_size, learning_rate=1e-3, max_grad_norm=0.0,
        lr_scheduler_type="constant", train_sampling_strategy="sequential",
    )
    if reranker:
        args = UniMEV2RerankerTrainingArguments(str(output / f"{case}-{mode}"), listwise_negatives=3, **settings)
    else:
        args = UniMEV2TrainingArguments(str(output / f"{case}-{mode}"), num_negatives=3, loss=loss, infonce_weight=0.5,
                                        gradcache=gradcache, gradcache_chunk_size=2,
                                        gradcache_reduce_each_chunk=case.endswith("reduce-each-chunk"), **settings)
    trainer_class = (CPUFSDPRerankerTrainer if mode == "fsdp" else UniMEV2RerankerTrainer) if reranker else (
        CPUFSDPTrainer if mode == "fsdp" else ReplayCheckingTrainer)
    recorder = GradientRecorder()
    trainer = trainer_class(model=model, args=args, train_dataset=rows, processing_class=processor, image_root=root,
                            callbacks=[recorder])
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    result = dict(loss=logged["loss"], grad_norm=logged["grad_norm"],
                  replay_difference=getattr(trainer, "largest_replay_difference", 0.0), units=[],
                  chunk_images=getattr(trainer, "chunk_images", None),
                  added_forwards=getattr(trainer, "added_forwards", 0),
                  reduce_scatters=getattr(trainer, "reduce_scatters", None))
    if mode == "fsdp":
        from trainers.sharding import sharded_units

        result["units"] = sharded_units(trainer.model_wrapped)
    rank = trainer.args.process_index
    (output / f"{case}-{mode}-rank{rank}.json").write_text(json.dumps(result))
    if trainer.is_world_process_zero():
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in recorder.gradients.items()},
                  str(output / f"{case}-{mode}.safetensors"))
    return result


def run_resume(output: Path) -> dict:
    """DoRA under FSDP2 with GradCache: 2 steps uninterrupted, and 1 step saved as a sharded checkpoint then resumed
    by a new trainer to step 2; then the final model gathered from the shards, merged and saved as a UniME-V2
    checkpoint. Written on the main process: the largest weight difference between the two runs, and between the
    embeddings of the reloaded merged checkpoint and of the trained (unmerged) model."""
    from trainers.adapters import save_checkpoint
    from trainers.sharding import gather_trained_model

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    root = output / "images"
    rows = mixed_rows(root)

    def build():
        model, processor = build_tiny_unime("qwen2_vl")
        return prepare_for_training(model, "dora", dropout=0.0), processor

    def train(folder: str, steps: int, save: bool, resume: str | None = None):
        model, processor = build()
        args = UniMEV2TrainingArguments(
            str(output / folder), report_to=[], use_cpu=True, disable_tqdm=True, seed=5, max_steps=steps,
            logging_steps=1, per_device_train_batch_size=GLOBAL_BATCH // world_size, learning_rate=1e-2,
            lr_scheduler_type="constant", train_sampling_strategy="sequential", num_negatives=3, gradcache=True,
            gradcache_chunk_size=2, save_strategy="steps" if save else "no", save_steps=1,
        )
        trainer = CPUFSDPTrainer(model=model, args=args, train_dataset=rows, processing_class=processor,
                                 image_root=root)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, processor

    uninterrupted, processor = train("uninterrupted", 2, save=False)
    expected = uninterrupted.accelerator.get_state_dict(uninterrupted.model)
    train("interrupted", 1, save=True)
    checkpoint = output / "interrupted" / "checkpoint-1"
    resumed, _ = train("interrupted", 2, save=False, resume=str(checkpoint))
    trained = gather_trained_model(resumed, lambda: build()[0])
    result = {}
    if resumed.is_world_process_zero():
        got = trained.state_dict()
        result["checkpoint_files"] = sorted(path.name for path in checkpoint.iterdir())
        result["resume_difference"] = max(float((got[name] - expected[name]).abs().max()) for name in expected)
        result["steps_changed_weights"] = max(
            float((got[name] - value).abs().max()) for name, value in build()[0].state_dict().items())
        texts, images = ["a red circle", None], [None, root / rows[0]["query_image"]]
        trained.eval()
        # before saving: merging folds the adapter into this very model
        reference = trained.get_base_model().encode(texts=texts, images=images, processor=processor)
        final = save_checkpoint(trained, processor, output / "final", merge=True)
        from modeling_unime import UniMEV2Model

        reloaded = UniMEV2Model.from_pretrained(final)
        merged = reloaded.encode(texts=texts, images=images, processor=processor)
        result["merged_embedding_difference"] = float((merged - reference).abs().max())
        untrained = build_tiny_unime("qwen2_vl")[0].encode(texts=texts, images=images, processor=processor)
        result["training_moved_embeddings"] = float((merged - untrained).abs().max())
        (output / "resume.json").write_text(json.dumps(result))
    return result


def run_recipe(config: Path) -> None:
    """recipes/train_embedding.py as launched with ``--config_file recipes/accelerate/fsdp.yaml``: the FSDP plugin
    is the one accelerate builds from that file's settings (its environment variables); only its selection on CPU
    is forced."""
    import runpy

    from accelerate.utils import FullyShardedDataParallelPlugin

    original = UniMEV2Trainer.create_accelerator_and_postprocess

    def forced(trainer) -> None:
        original(trainer)
        force_fsdp_on_cpu(trainer, FullyShardedDataParallelPlugin())

    UniMEV2Trainer.create_accelerator_and_postprocess = forced
    sys.argv = ["train_embedding.py", "--config", str(config)]
    runpy.run_path(str(REPO_ROOT / "recipes" / "train_embedding.py"), run_name="__main__")


class WeightChange(TrainerCallback):
    """Each weight's change over the first step, whole (with plain SGD at lr 1: minus its gradient)."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.change: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.change:
            self.change = {name: self.before[name] - parameter.detach()
                           for name, parameter in model.named_parameters()}


DEEPSPEED_ZERO2 = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                   "gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": "auto",
                   "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}


def run_sgd_case(case: str, mode: str, output: Path) -> None:
    """One step of plain SGD at lr 1 (weights change by minus the gradient), under DeepSpeed ZeRO-2 (``mode``
    "deepspeed") or in one process ("single"): written as ``{case}-{mode}-sgd.safetensors`` on the main process."""
    finetuning, gradcache, loss, dropout = CASES[case]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model, processor = build_tiny_unime("qwen2_vl")
    model = prepare_for_training(model, finetuning, dropout=0.0) if finetuning != "full" else model
    root = output / "images"
    args = UniMEV2TrainingArguments(
        str(output / f"{case}-{mode}-sgd"), report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=5,
        max_steps=1, logging_steps=1, per_device_train_batch_size=GLOBAL_BATCH // world_size, optim="sgd",
        learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0, lr_scheduler_type="constant",
        train_sampling_strategy="sequential", num_negatives=3, loss=loss, infonce_weight=0.5, gradcache=gradcache,
        gradcache_chunk_size=2, deepspeed=DEEPSPEED_ZERO2 if mode == "deepspeed" else None,
    )
    recorder = WeightChange()
    trainer = UniMEV2Trainer(model=model, args=args, train_dataset=mixed_rows(root), processing_class=processor,
                             image_root=root, callbacks=[recorder])
    assert trainer.is_deepspeed_enabled == (mode == "deepspeed")
    trainer.train()
    if trainer.is_world_process_zero():
        from safetensors.torch import save_file

        trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
        save_file({name: change.contiguous() for name, change in recorder.change.items() if name in trainable},
                  str(output / f"{case}-{mode}-sgd.safetensors"))


class FSDPOnCPUTrainer(ForcedFSDPOnCPU, UniMEV2Trainer):
    pass


def run_memory(output: Path) -> None:
    """The memory plan's tiny GradCache settings under FSDP2 on 2 processes: each process's measured peak of live
    tensors against the plan for one process of that run (`trainers.memory_plan`)."""
    from trainers.memory_plan import (
        TINY_SETTINGS,
        Sharding,
        _text_tokens_of,
        measure_tiny_training_peak,
        plan_tiny_setting,
    )

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rows = []
    for setting in (setting for setting in TINY_SETTINGS if setting.gradcache):
        measured = measure_tiny_training_peak(setting, trainer_class=FSDPOnCPUTrainer)
        plan = plan_tiny_setting(setting, _text_tokens_of(setting, measured["tokens_per_row"]),
                                 Sharding("fsdp", world_size=world_size))
        rows.append(dict(setting=setting.name, measured=measured["peak"], planned=plan.total,
                         measured_weights=measured["weights"], planned_weights=plan.weights + plan.trainable_weights,
                         measured_optimizer=measured["optimizer_state"], planned_optimizer=plan.optimizer_state))
    rank = int(os.environ.get("RANK", "0"))
    (output / f"memory-rank{rank}.json").write_text(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--mode", choices=["fsdp", "ddp", "single", "deepspeed"], required=True)
    parser.add_argument("--sgd", action="store_true", help="one step of SGD at lr 1 (deepspeed and its reference)")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--resume", action="store_true", help="also the resume and final-save check (fsdp only)")
    parser.add_argument("--memory", action="store_true", help="also the memory plan against measured peaks (fsdp)")
    parser.add_argument("--recipe", type=Path, help="run recipes/train_embedding.py with this config (fsdp only)")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    if arguments.recipe:
        return run_recipe(arguments.recipe)
    if arguments.sgd or arguments.mode == "deepspeed":
        for case in arguments.cases:
            run_sgd_case(case, arguments.mode, arguments.output)
        return None
    for case in arguments.cases:
        run_case(case, arguments.mode, arguments.output)
    if arguments.resume:
        run_resume(arguments.output)
    if arguments.memory:
        run_memory(arguments.output)


if __name__ == "__main__":
    main()
