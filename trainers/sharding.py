"""FSDP2 and DeepSpeed for the trainers: which layers become sharded units, and what GradCache needs there.

Under FSDP2 every forward of a sharded unit all-gathers its weights and every synchronised backward reduce-scatters
its gradients: collectives that every process must call in the same order. Two things in a multimodal step break
that order unless they are dealt with:

- The vision tower runs only on rows with images. If its blocks were units of their own, a process whose chunk has
  images would all-gather them while another, on a text-only chunk, would not: the processes would wait on different
  collectives. So only the language model's decoder layers become units (`language_layer_classes`, set as the
  plugin's ``transformer_cls_names_to_wrap`` when the accelerate config names none); the vision tower stays in the
  root unit, which every forward gathers, and whose unused parameters reduce-scatter zeros
  (``set_reduce_scatter_unused_params``) so that every process reduces the same tensors.
- De-duplication makes the number of GradCache chunks differ between processes: the trainer pads every process to
  the largest count with a replayed chunk whose cached gradient is zero (`UniMEV2Trainer.gradcache_step`).

DeepSpeed ZeRO-1/2 reduces gradients in hooks, bucket by bucket, in the order they are computed: a process that ran
the vision tower and one that did not would reduce different buckets (a collective mismatch, seen here with gloo). The
embedding trainer therefore runs each step inside DeepSpeed's ``coalesce_grad_reduction`` (every backward accumulates
locally), gives every trainable parameter a gradient (`fill_missing_gradients`) and lets the one flush reduce all of
them in parameter order; the reranker trainer refuses a trained vision tower under DeepSpeed.

Tested on CPU with gloo (tests/test_fsdp.py, tests/test_deepspeed.py). accelerate selects FSDP only on accelerator
devices, so the FSDP test forces it with a Trainer subclass of its own; nothing here changes what accelerate selects.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

VISION_MODULE_NAMES = frozenset({"visual", "vision_tower", "vision_model", "multi_modal_projector"})
"""Submodule names under which a backbone keeps its vision encoder and projector (Qwen2-VL / Qwen2.5-VL: ``visual``;
LLaVA-OneVision: ``vision_tower``, ``multi_modal_projector``)."""


def is_vision_module(name: str) -> bool:
    """Whether the module at dotted path ``name`` belongs to the vision encoder or its projector.

    Example:
        >>> is_vision_module("model.visual.blocks.0"), is_vision_module("model.language_model.layers.0")
        (True, False)
    """
    return any(part in VISION_MODULE_NAMES for part in name.split("."))


def language_layer_classes(model: torch.nn.Module) -> list[str]:
    """The class names of the language model's decoder layers (the elements of every ``layers`` list outside the
    vision tower): the units FSDP2 should shard.

    Example:
        >>> from modeling_unime.tiny import build_tiny_unime
        >>> language_layer_classes(build_tiny_unime("qwen2_vl")[0])
        ['Qwen2VLDecoderLayer']
    """
    names = {
        unsharded_class_name(layers[0])
        for name, layers in model.named_modules()
        if isinstance(layers, torch.nn.ModuleList) and name.split(".")[-1] == "layers" and len(layers)
        and not is_vision_module(name)
    }
    if not names:
        raise ValueError(f"{type(model).__name__} has no decoder `layers` list outside its vision tower to shard.")
    return sorted(names)


def unsharded_class_name(module: torch.nn.Module) -> str:
    """The class name of ``module`` as the model defines it (FSDP2 swaps a sharded module's class for a subclass
    named ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule)).__name__


def sharded_units(model: torch.nn.Module) -> list[str]:
    """The dotted paths of the FSDP2 units inside ``model`` (the root is ``""``)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def check_units_run_on_every_forward(model: torch.nn.Module) -> None:
    """Refuse an FSDP2 model with a unit inside the vision tower: processes would call different collectives as soon
    as one has an image in a forward and another has none (see the module docstring)."""
    vision_units = [name for name in sharded_units(model) if is_vision_module(name)]
    if vision_units:
        raise ValueError(
            f"FSDP shards {len(vision_units)} module(s) of the vision tower on their own (e.g. {vision_units[0]!r}): "
            "they run only on rows with images, so processes would wait on different collectives. Shard the "
            f"language model's decoder layers only: fsdp_transformer_layer_cls_to_wrap: "
            f"{','.join(language_layer_classes(model))} in the accelerate config, or leave it out and the trainer "
            "sets it (recipes/accelerate/fsdp.yaml)."
        )


def gather_trained_model(trainer: Any, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """The trained model, whole, on the main process; None on the others. Every process must call it: under FSDP the
    shards are gathered (a collective) into ``rebuild()``, a fresh copy built the way the trained one was (same
    class, same adapter), on the CPU of the main process; without FSDP the trainer's model is returned as it is."""
    if not trainer.is_fsdp_enabled:
        return trainer.model if trainer.is_world_process_zero() else None
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if not trainer.is_world_process_zero():
        return None
    model = rebuild()
    model.load_state_dict(state_dict, strict=True)
    return model


def fill_missing_gradients(module: torch.nn.Module) -> None:
    """Give every trainable parameter without a gradient a zero one, so that a ZeRO reduction over all parameters
    reduces the same tensors in the same order on every process (the vision tower has no gradient on a process whose
    step held no image)."""
    for parameter in module.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def vision_parameters_train(model: torch.nn.Module) -> bool:
    """Whether any parameter of the vision tower (or its projector) is trained."""
    return any(parameter.requires_grad for name, parameter in model.named_parameters() if is_vision_module(name))


class ShardingMixin:
    """For the trainers: under FSDP, shard the language model's decoder layers unless the accelerate config names
    the layers itself, and refuse FSDP1 with GradCache (the trainer drives FSDP2's gradient synchronisation); under
    DeepSpeed, refuse the settings whose processes would reduce different tensors (`check_deepspeed`)."""

    model: Any
    args: Any
    accelerator: Any
    is_fsdp_enabled: bool

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.warn_if_fsdp_was_dropped()
        self.configure_sharding()

    def configure_sharding(self) -> None:
        if not self.is_fsdp_enabled:
            return
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        plugin = self.accelerator.state.fsdp_plugin
        if getattr(self.args, "gradcache", False) and plugin.fsdp_version != 2:
            raise ValueError(
                f"gradcache=True needs FSDP2 (fsdp_version: 2 in the accelerate config), got fsdp_version "
                f"{plugin.fsdp_version}; see recipes/accelerate/fsdp.yaml."
            )
        if plugin.auto_wrap_policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = language_layer_classes(self.model)

    def prepare_sharded_model(self, model: torch.nn.Module) -> None:
        """Once, on the FSDP2-wrapped model: check that every unit runs in every forward, and have the root unit
        reduce-scatter zeros for the parameters this process left without a gradient (the vision tower after a
        text-only step), so that every process reduces the same tensors."""
        if getattr(self, "_sharded_model_prepared", None) is model:
            return
        check_units_run_on_every_forward(model)
        if not hasattr(model, "set_reduce_scatter_unused_params"):
            raise ValueError(
                f"Training under FSDP2 needs FSDPModule.set_reduce_scatter_unused_params (torch {torch.__version__} "
                "lacks it): install torch==2.13.0 or newer, or use DDP (recipes/accelerate/multi_gpu.yaml)."
            )
        model.set_reduce_scatter_unused_params(True)
        self._sharded_model_prepared = model

    def check_deepspeed(self, coalesced: bool) -> None:
        """DeepSpeed ZeRO reduces the gradients of the parameters each process computed, in the order they were
        computed: processes that ran the vision tower and processes that did not would reduce different tensors.
        ``coalesced``: the trainer reduces once per step, over every parameter in a fixed order (ZeRO-1/2, DeepSpeed's
        ``coalesce_grad_reduction``, one micro-batch per step); else a trained vision tower is refused."""
        if not self.is_deepspeed_enabled:
            return
        stage = self.accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise ValueError(
                "DeepSpeed ZeRO-3 gathers weights module by module in the forward, and only processes with images "
                "run the vision tower: they would wait on different collectives. Use ZeRO-2, or FSDP2 "
                "(recipes/accelerate/fsdp.yaml) to shard the weights."
            )
        if not coalesced:
            if vision_parameters_train(self.model):
                raise ValueError(
                    "DeepSpeed with a trained vision tower: processes whose batch has no image would reduce other "
                    "gradients than those whose batch has one. Freeze the vision tower (the default LoRA / DoRA "
                    "targets the language model only) or use FSDP2 (recipes/accelerate/fsdp.yaml)."
                )
            return
        if stage not in (1, 2):
            raise ValueError(
                f"DeepSpeed ZeRO-{stage}: the embedding trainer reduces with DeepSpeed's coalesce_grad_reduction, "
                "which needs ZeRO-1 or ZeRO-2."
            )
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps} under DeepSpeed: the embedding "
                "trainer reduces once per step (DeepSpeed's coalesce_grad_reduction spans one micro-batch). Raise "
                "per_device_train_batch_size instead: GradCache keeps its memory flat."
            )
        from deepspeed import DeepSpeedEngine, __version__

        if not hasattr(DeepSpeedEngine, "coalesce_grad_reduction"):
            raise ValueError(
                f"deepspeed {__version__} has no DeepSpeedEngine.coalesce_grad_reduction, which the embedding trainer "
                "reduces gradients with: install deepspeed>=0.19.8 (tested), or use FSDP2 "
                "(recipes/accelerate/fsdp.yaml)."
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.is_fsdp_enabled:
            self.prepare_sharded_model(model)
        return super().training_step(model, inputs, num_items_in_batch)

    def warn_if_fsdp_was_dropped(self) -> None:
        """accelerate turns an FSDP launch config into plain data parallelism on CPU (it selects FSDP on accelerator
        devices only): say so rather than let a user believe the model is sharded."""
        if not self.is_fsdp_enabled and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            warnings.warn(
                f"The accelerate config asks for FSDP, but accelerate runs {self.accelerator.distributed_type} on "
                f"{self.accelerator.device.type}: FSDP is selected on GPUs (and other accelerators) only, so every "
                "process holds the whole model here.", stacklevel=2,
            )


__all__ = [
    "ShardingMixin",
    "VISION_MODULE_NAMES",
    "check_units_run_on_every_forward",
    "fill_missing_gradients",
    "gather_trained_model",
    "is_vision_module",
    "language_layer_classes",
    "sharded_units",
    "vision_parameters_train",
]
