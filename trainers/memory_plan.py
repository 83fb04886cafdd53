"""A memory plan before launch: per-GPU peak memory of one training step of a recipe, without loading weights.

`plan_memory` reads a training recipe config (``recipes/configs/*.yaml``, parsed by the recipes' own parser) and an
``accelerate`` config (``recipes/accelerate/*.yaml``) and estimates, per GPU:

- **weights**: the model built from its config on the meta device (exact parameter counts, nothing allocated), in the
  dtype the recipe loads it in (`modeling_unime.placement.training_dtype`: bf16 base under an adapter with bf16 mixed
  precision, float32 for full fine-tuning); ``trainable weights``: the adapter (the recipe's real peft config applied
  to the meta model) or every weight;
- **gradients** of the trainable weights (plus DDP's bucket copy), **optimizer state** (AdamW: two float32 states per
  trainable weight; plus a float32 master copy where DeepSpeed trains half-precision weights);
- **inputs**: the whole per-device batch on the GPU (GradCache moves every chunk there at once: float32 pixels);
- **activations** kept for backward by one forward: one GradCache chunk (``gradcache_chunk_size`` rows), else the
  whole per-device batch. They are *measured* on the meta device: one decoder layer, one vision block and the
  edges (patch embedding, merger / projector, final norm), with the recipe's adapter, are run on meta tensors at
  the real width and token count, and every tensor autograd saves is counted (`saved_activation_bytes`). Attention
  is counted as a flash-style kernel (inputs, output, log-sum-exp; no score matrix), with a padding mask;
- **workspace**: what lives only for a moment: the gradients of one layer's activations during backward, one layer
  recomputed under gradient checkpointing, bf16 copies of float32 weights under autocast, FSDP's unsharded layers.

Sharding (``distributed_type`` of the accelerate config): MULTI_GPU replicates everything; FSDP2 (full shard, units
as `trainers.sharding` makes them: the decoder layers, the vision tower in the root) divides weights, gradients and
optimizer state by ``num_processes`` (trainable weights as accelerate keeps them, float32 masters) and adds the
unsharded root and two layers (current + prefetched) in the compute dtype; with GradCache reduced once per step
(``gradcache_reduce_each_chunk: false``) every process also holds the unsharded float32 gradients until the last
chunk. DeepSpeed ZeRO-2 divides gradients and optimizer state; the embedding trainer reduces once per step there too
(every process first holds the whole gradients); ZeRO-3 is refused by the trainers.

Checked against the peak of live tensors measured on CPU (`measure_tiny_training_peak`, `LiveTensorTracker`) for
tiny models: tests/test_memory_plan.py. Not checked here: CUDA kernels' own workspaces, allocator fragmentation
(a fixed ``cuda_overhead`` stands for them and the CUDA context), flash-attn vs sdpa differences on a GPU.

Example:
    >>> plan = plan_memory("recipes/configs/tiny-cpu.yaml", gpu_memory_gib=1)
    >>> plan.config_source, plan.fits, plan.parameters == plan.trainable_parameters
    ('tiny builder (modeling_unime.tiny)', True, True)
    >>> plan.activations > 0 and plan.total == max(plan.peak_backward, plan.peak_optimizer_step)
    True
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 1024**3
CUDA_OVERHEAD_BYTES = int(1.0 * GIB)  # CUDA context, cuBLAS / NCCL workspaces, allocator slack: not modelled
DEFAULT_TEXT_TOKENS = {"embedder": 128, "reranker": 256}
"""Text tokens per row when neither the recipe nor ``text_tokens`` says: MMEB instructions and texts with the prompt
template are mostly under 128 tokens; the reranker prompt (the judge's instruction, query and candidate texts, a list
of five for listwise rows) under 256. The collator does not truncate, so a longer dataset needs ``text_tokens``."""

QWEN_VISION_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
QWEN_PIXEL_LIMITS = (56 * 56, 28 * 28 * 1280 * 10)  # the released processors' min_pixels, max_pixels (12845056)
TINY_QWEN_MAX_PIXELS = 64 * 28 * 28  # modeling_unime.tiny.build_tiny_processor's default

# ------------------------------------------------------------------------------------------------------ configs

_QWEN2_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, max_position_embeddings=32768)
_QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                        temporal_patch_size=2)
_QWEN_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                       vision_end_token_id=151653)
_QWEN3_VL_VISION = dict(num_heads=16, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                        num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh")
_QWEN3_ROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0, mrope_section=[24, 20, 20],
                                        mrope_interleaved=True))
PUBLISHED_BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    # The config.json values of the Hub repos (transformers' default Qwen2VLConfig() is the 72B, not these).
    "Qwen/Qwen2-VL-7B-Instruct": ("qwen2_vl", dict(
        text_config=_QWEN2_7B_TEXT, vision_config={**_QWEN2_VL_VISION, "hidden_size": 3584},
        tie_word_embeddings=False, **_QWEN_TOKEN_IDS)),
    "Qwen/Qwen2-VL-2B-Instruct": ("qwen2_vl", dict(
        text_config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         tie_word_embeddings=True),
        vision_config={**_QWEN2_VL_VISION, "hidden_size": 1536}, tie_word_embeddings=True, **_QWEN_TOKEN_IDS)),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(
        text_config={**_QWEN2_7B_TEXT, "max_position_embeddings": 128000},
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
        tie_word_embeddings=False, **_QWEN_TOKEN_IDS)),
    "Qwen/Qwen3-VL-2B-Instruct": ("qwen3_vl", dict(
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                         max_position_embeddings=262144, tie_word_embeddings=True, **_QWEN3_ROPE),
        vision_config={**_QWEN3_VL_VISION, "depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                       "out_hidden_size": 2048, "deepstack_visual_indexes": [5, 11, 17]},
        tie_word_embeddings=True, **_QWEN_TOKEN_IDS)),
    "Qwen/Qwen3-VL-8B-Instruct": ("qwen3_vl", dict(
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                         max_position_embeddings=262144, tie_word_embeddings=False, **_QWEN3_ROPE),
        vision_config={**_QWEN3_VL_VISION, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                       "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]},
        tie_word_embeddings=False, **_QWEN_TOKEN_IDS)),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("llava_onevision", dict(
        text_config={**_QWEN2_7B_TEXT, "vocab_size": 152128, "model_type": "qwen2"},
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                           num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                           vision_use_head=False),
        image_token_index=151646, video_token_index=151647, vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)),
}
# The released UniME-V2 checkpoints are these backbones (their config.json is the backbone's).
PUBLISHED_BACKBONES["TianchengGu/UniME-V2-Qwen2VL-7B"] = PUBLISHED_BACKBONES["Qwen/Qwen2-VL-7B-Instruct"]
PUBLISHED_BACKBONES["TianchengGu/UniME-V2-Qwen2VL-2B"] = PUBLISHED_BACKBONES["Qwen/Qwen2-VL-2B-Instruct"]
PUBLISHED_BACKBONES["TianchengGu/UniME-V2-reranker-Qwen25VL-7B"] = PUBLISHED_BACKBONES["Qwen/Qwen2.5-VL-7B-Instruct"]
PUBLISHED_BACKBONES["TianchengGu/UniME-V2-LLaVA-OneVision-8B"] = PUBLISHED_BACKBONES[
    "llava-hf/llava-onevision-qwen2-7b-ov-hf"]


def backbone_config_for(model_spec: str) -> tuple[Any, str]:
    """The backbone config of a recipe's ``model`` and where it came from: ``tiny:<family>`` (the tiny builders),
    the built-in table of published values for the shipped configs' repo ids (`PUBLISHED_BACKBONES`: no network
    needed), else ``AutoConfig.from_pretrained`` (a folder, or any repo id on the Hub where it is reachable).

    Example:
        >>> config, source = backbone_config_for("Qwen/Qwen2-VL-2B-Instruct")
        >>> config.get_text_config().hidden_size, config.get_text_config().num_hidden_layers
        (1536, 28)
    """
    from transformers import AutoConfig

    from modeling_unime.configuration_unime import backbone_config_from
    from modeling_unime.model_specs import tiny_family

    family = tiny_family(model_spec)
    if family is not None:
        from modeling_unime.tiny import build_tiny_backbone_config

        return build_tiny_backbone_config(family), "tiny builder (modeling_unime.tiny)"
    if model_spec in PUBLISHED_BACKBONES and not Path(model_spec).is_dir():
        model_type, values = PUBLISHED_BACKBONES[model_spec]
        return (AutoConfig.for_model(model_type, **copy.deepcopy(values)),
                "built-in table of the published config (no Hub / folder config read)")
    try:  # a folder, or any other repo id on the Hub (where it is reachable)
        config = AutoConfig.from_pretrained(model_spec, trust_remote_code=False)
        if getattr(config, "backbone_config", None) is not None:  # a UniME-V2 checkpoint
            config = config.backbone_config
        return backbone_config_from(config), f"AutoConfig.from_pretrained({model_spec!r})"
    except Exception as error:  # noqa: BLE001 - offline or unknown: a clear error
        raise ValueError(
            f"model {model_spec!r}: no config could be read ({type(error).__name__}: {error}) and it is not in the "
            f"built-in table ({', '.join(sorted(PUBLISHED_BACKBONES))}). Pass a local checkpoint folder, or run "
            "where the Hub is reachable."
        ) from error


# ------------------------------------------------------------------------------------------------------ settings


@dataclass
class TrainingShape:
    """What one training step of a recipe looks like on one GPU (read from the recipe by `training_shape`)."""

    kind: str  # embedder | reranker
    finetuning: str  # dora | lora | full
    adapter: dict[str, Any]
    weights_dtype: torch.dtype
    compute_dtype: torch.dtype
    mixed_precision: str | None
    queries_per_device: int
    rows_per_query: int  # embedder: query + positive + num_negatives; reranker: 2 pairwise + 1 listwise
    gradcache: bool
    gradcache_chunk_size: int
    gradient_checkpointing: bool
    image_size: tuple[int, int]  # (width, height) of every training image after the recipe's image rule
    images_per_row: int  # the longest row's images (all rows are padded to it)
    images_per_forward_row: float  # images per row on average (the vision tower sees only real images)
    text_tokens: int
    gradcache_reduce_each_chunk: bool = False  # FSDP2: gradients reduce-scattered after each chunk (stay sharded)
    optimizer: str = "adamw_torch_fused"
    qwen_max_pixels: int = QWEN_PIXEL_LIMITS[1]
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_device(self) -> int:
        return self.queries_per_device * self.rows_per_query

    @property
    def rows_per_forward(self) -> int:
        return min(self.gradcache_chunk_size, self.rows_per_device) if self.gradcache else self.rows_per_device


@dataclass
class Sharding:
    """How the accelerate config spreads one model over ``world_size`` processes."""

    strategy: str  # single | ddp | fsdp | zero1 | zero2 | zero3
    world_size: int = 1
    mixed_precision: str | None = None
    source: str = "no accelerate config: one process"

    @property
    def shards_weights(self) -> bool:
        return self.strategy in ("fsdp", "zero3")

    @property
    def shards_gradients(self) -> bool:
        return self.strategy in ("fsdp", "zero2", "zero3")

    @property
    def shards_optimizer(self) -> bool:
        return self.strategy in ("fsdp", "zero1", "zero2", "zero3")


def _read_config(path: Path, kind: str, required_key: str, example: str) -> Mapping[str, Any]:
    """A YAML config file that must exist and hold ``required_key`` (``kind``: "an accelerate config", ...)."""
    from modeling_unime.util.arguments import load_recipe_yaml

    name = kind.split(" ", 1)[1]
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist (e.g. {example}).")
    loaded = load_recipe_yaml(path)
    if not isinstance(loaded, Mapping) or required_key not in loaded:
        raise ValueError(f"{path}: not {kind} (no {required_key} key); see {Path(example).parent}/.")
    return loaded


def sharding_from_accelerate_config(path: str | os.PathLike | None) -> Sharding:
    """The `Sharding` of an ``accelerate`` config file (None: one process).

    Example:
        >>> sharding_from_accelerate_config("recipes/accelerate/fsdp.yaml").strategy
        'fsdp'
        >>> s = sharding_from_accelerate_config("recipes/accelerate/zero2.yaml"); s.strategy, s.world_size
        ('zero2', 8)
    """
    if path is None:
        return Sharding("single")
    path = Path(path)
    config = _read_config(path, "an accelerate config", "distributed_type", "recipes/accelerate/fsdp.yaml")
    distributed = str(config["distributed_type"]).upper()
    world_size = int(config.get("num_processes", 1) or 1)
    mixed = config.get("mixed_precision") or None
    mixed = None if mixed in ("no", None) else str(mixed)
    if distributed in ("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        strategy = "ddp" if world_size > 1 else "single"
    elif distributed == "NO":
        strategy = "single"
    elif distributed == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        shard = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if fsdp.get("fsdp_reshard_after_forward") is False or shard in ("SHARD_GRAD_OP", "2"):
            strategy = "zero2"  # weights stay gathered between forward and backward: ZeRO-2-like
        elif shard in ("NO_SHARD", "3"):
            strategy = "ddp"
        else:
            strategy = "fsdp"
        if fsdp.get("fsdp_offload_params"):
            raise ValueError(f"{path}: fsdp_offload_params is not modelled by the memory plan.")
    elif distributed == "DEEPSPEED":
        deepspeed = config.get("deepspeed_config") or {}
        stage = int(deepspeed.get("zero_stage", 0) or 0)
        if str(deepspeed.get("offload_optimizer_device", "none")) != "none" or \
                str(deepspeed.get("offload_param_device", "none")) != "none":
            raise ValueError(f"{path}: DeepSpeed offloading is not modelled by the memory plan.")
        strategy = {0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[stage]
    else:
        raise ValueError(f"{path}: distributed_type {distributed!r} is not modelled (MULTI_GPU, FSDP, DEEPSPEED).")
    return Sharding(strategy, world_size, mixed, source=f"{path} ({distributed}, {world_size} processes)")


def recipe_kind_of(config: Mapping[str, Any]) -> str:
    """``"reranker"`` when the recipe's ``training:`` section has reranker-only keys, else ``"embedder"``."""
    from .reranker_trainer import UniMEV2RerankerTrainingArguments

    reranker_only = {name for name in UniMEV2RerankerTrainingArguments.__dataclass_fields__} - set(
        __import__("transformers").TrainingArguments.__dataclass_fields__)
    training = config.get("training") or {}
    return "reranker" if reranker_only & set(training) else "embedder"


def training_shape(
    recipe_config_path: str | os.PathLike,
    sharding: Sharding,
    text_tokens: int | None = None,
    overrides: Sequence[str] = (),
) -> tuple[TrainingShape, str, str]:
    """The `TrainingShape` of a recipe as it would run on a GPU under ``sharding``; and its kind and model spec.

    The recipe is parsed by `trainers.recipe_runner.parse_training_recipe` (``overrides``: more recipe flags, e.g.
    ``["--gradcache_chunk_size", "1"]``)."""
    from modeling_unime.placement import training_dtype

    from .recipe_runner import EMBEDDER, RERANKER, mixed_precision_of, parse_training_recipe

    path = Path(recipe_config_path)
    loaded = _read_config(path, "a training recipe config", "model", "recipes/configs/qwen2vl-7b.yaml")
    kind = recipe_kind_of(loaded)
    recipe = RERANKER if kind == "reranker" else EMBEDDER
    # The output folder must not be created by a plan: a scratch one is named instead.
    with contextlib.redirect_stdout(None):
        arguments = parse_training_recipe(recipe, ["--config", str(path), *overrides])
    script, data, adapter, args = arguments.script, arguments.data, arguments.adapter, arguments.training
    notes: list[str] = []
    finetuning = script.finetuning or recipe.default_finetuning
    # On a GPU: the recipe's bf16 / fp16, else the launcher's, else the Trainer's default on Ampere+ (bf16).
    mixed = mixed_precision_of(args) if (args.bf16 or args.fp16) else (sharding.mixed_precision or "bf16")
    weights = training_dtype(script.dtype, "cuda", mixed, finetuning)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed, weights)
    adapter_settings = adapter.settings(recipe.default_adapter) if finetuning != "full" else {}

    gradcache = bool(getattr(args, "gradcache", False))
    if sharding.strategy == "zero3":
        raise ValueError(f"{sharding.source}: ZeRO-3 is refused by the trainers (trainers/sharding.py: it gathers "
                         "weights module by module and only processes with images run the vision tower); plan "
                         "recipes/accelerate/fsdp.yaml to shard the weights.")
    image_rule = data.data_image_resize or (f"square:{data.data_image_size}" if data.data_image_size else None)
    if image_rule is None or image_rule == "native":
        image_rule = "square:672"
        notes.append("data.image_resize is native: planned with 672x672 images (set data.image_resize to plan "
                     "another size).")
    from modeling_unime.processing_unime import resized_size

    # The largest image the rule lets through: the rule applied to a large square photo.
    image_size = resized_size(2048, 2048, image_rule)
    if kind == "reranker":
        pairwise, listwise = args.pairwise_weight > 0, args.listwise_weight > 0
        rows_per_query = 2 * pairwise + listwise
        list_images = 2 + args.listwise_negatives
        images_per_row = list_images if listwise else 2
        images_per_forward_row = (4 * pairwise + list_images * listwise) / rows_per_query
    else:
        rows_per_query = 2 + args.num_negatives  # the query, its positive, its negatives
        images_per_row, images_per_forward_row = 1, 1.0
    tokens = text_tokens if text_tokens is not None else DEFAULT_TEXT_TOKENS[kind]
    shape = TrainingShape(
        kind=kind, finetuning=finetuning, adapter=adapter_settings, weights_dtype=weights, compute_dtype=compute,
        mixed_precision=mixed, queries_per_device=args.per_device_train_batch_size, rows_per_query=rows_per_query,
        gradcache=gradcache, gradcache_chunk_size=getattr(args, "gradcache_chunk_size", 2),
        gradcache_reduce_each_chunk=bool(getattr(args, "gradcache_reduce_each_chunk", False)),
        gradient_checkpointing=bool(args.gradient_checkpointing), image_size=image_size,
        images_per_row=images_per_row, images_per_forward_row=images_per_forward_row, text_tokens=tokens,
        optimizer=str(getattr(args.optim, "value", args.optim)), notes=notes,
    )
    if script.model.startswith("tiny:"):
        shape.qwen_max_pixels = TINY_QWEN_MAX_PIXELS
    return shape, kind, script.model


# ------------------------------------------------------------------------------------------------------ images


def image_geometry(backbone_config: Any, width: int, height: int, qwen_max_pixels: int = QWEN_PIXEL_LIMITS[1]
                   ) -> tuple[int, int, int]:
    """(language-model tokens, vision-tower patches, vision crops) of one image of ``width`` x ``height``.

    Qwen2-VL / Qwen2.5-VL: the processor's ``smart_resize`` to multiples of patch x merge (28), patches of 14, and 2x2
    patches merged into one token; Qwen3-VL the same with patches of 16 (multiples of 32; its published processor
    allows 256x256 to 4096x4096 pixels, which changes nothing for the 336 to 1344 pixel images of the recipes);
    LLaVA-OneVision: anyres crops of the SigLIP size (the base image and the tiles of the best grid pinpoint), tokens
    as its processor counts them (unpadded tiles, a newline per row, the base).

    Example:
        >>> from transformers import Qwen2VLConfig
        >>> image_geometry(Qwen2VLConfig(), 672, 672)   # 48x48 patches, merged 2x2: 24x24 tokens
        (576, 2304, 1)
    """
    model_type = backbone_config.model_type
    vision = backbone_config.vision_config
    if model_type in QWEN_VISION_FAMILIES:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        merge, patch = vision.spatial_merge_size, vision.patch_size
        resized_height, resized_width = smart_resize(height, width, factor=patch * merge,
                                                     min_pixels=QWEN_PIXEL_LIMITS[0], max_pixels=qwen_max_pixels)
        patches = (resized_height // patch) * (resized_width // patch)
        return patches // (merge * merge), patches, 1
    if model_type == "llava_onevision":
        return _llava_onevision_geometry(backbone_config, width, height)
    raise ValueError(f"backbone {model_type!r}: no image geometry ({', '.join(QWEN_VISION_FAMILIES)}, "
                     "llava_onevision).")


@functools.lru_cache(maxsize=64)
def _llava_onevision_counts(pinpoints: tuple, crop: int, patch: int, strategy: str, aspect_ratio: str, width: int,
                            height: int) -> tuple[int, int, int]:
    from PIL import Image
    from transformers import LlavaOnevisionImageProcessorPil

    from modeling_unime.processing_unime import UniMEV2Processor
    from modeling_unime.tiny import build_tiny_tokenizer

    side = crop // patch
    processor = UniMEV2Processor(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": crop, "width": crop},
                                                        image_grid_pinpoints=[list(pair) for pair in pinpoints]),
        tokenizer=build_tiny_tokenizer("llava_onevision"), backbone_type="llava_onevision",
        num_image_tokens=side * side, vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect_ratio,
    )
    batch = processor(texts=[None], images=[Image.new("RGB", (width, height))], image_resize="native")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tokens = int((batch["input_ids"] == image_token_id).sum())
    crops = int(batch["pixel_values"].shape[1])
    return tokens, crops * side * side, crops


def _llava_onevision_geometry(backbone_config: Any, width: int, height: int) -> tuple[int, int, int]:
    """LLaVA-OneVision's counts as the training processor makes them (run on a blank image of that size, with a tiny
    tokenizer: the counts do not depend on the vocabulary)."""
    vision = backbone_config.vision_config
    pinpoints = tuple(tuple(pair) for pair in backbone_config.image_grid_pinpoints)
    return _llava_onevision_counts(pinpoints, vision.image_size, vision.patch_size,
                                   backbone_config.vision_feature_select_strategy,
                                   backbone_config.vision_aspect_ratio, width, height)


# ------------------------------------------------------------------------------------------------------ meta model


def build_meta_model(kind: str, backbone_config: Any, shape: TrainingShape) -> torch.nn.Module:
    """The model the recipe trains, on the meta device (no memory): its class, the weights' dtype, the adapter."""
    from modeling_unime.configuration_unime import UniMEV2Config, UniMEV2RerankerConfig
    from modeling_unime.modeling_unime import UniMEV2Model, UniMEV2Reranker

    from .adapters import prepare_for_training

    backbone_config = copy.deepcopy(backbone_config)
    with torch.device("meta"):
        if kind == "reranker":
            model = UniMEV2Reranker(UniMEV2RerankerConfig(backbone_config=backbone_config))
        else:
            model = UniMEV2Model(UniMEV2Config(backbone_config=backbone_config))
    model.set_attn_implementation("sdpa")  # the kernel the probes replace by a flash-style one
    model = model.to(shape.weights_dtype)
    return prepare_for_training(model, shape.finetuning, **shape.adapter)


def unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter once (tied weights share one)."""
    return list({id(parameter): parameter for parameter in model.parameters()}.values())


def _modules_named(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[torch.nn.Module]:
    return [module for module in model.modules() if type(module).__name__.endswith(suffixes)]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language model's decoder layers."""
    return _modules_named(model, ("DecoderLayer",))


def vision_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The vision tower's blocks (Qwen vision blocks, SigLIP encoder layers)."""
    return _modules_named(model, ("VisionBlock", "SiglipEncoderLayer"))


def _first(model: torch.nn.Module, suffixes: tuple[str, ...]) -> torch.nn.Module | None:
    found = _modules_named(model, suffixes)
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------------ probes


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (a sharded DTensor's local shard; any other tensor as it is)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _storage_key(tensor: torch.Tensor) -> int:
    # The storage's Python object lives as long as the storage (torch preserves it), so its id is the storage's.
    return id(_local(tensor).untyped_storage())


def saved_activation_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward after ``run()`` (meta tensors work: their storages
    have sizes), leaving out ``exclude`` (parameters, inputs shared with other layers). A tensor saved by a piece
    of graph that is dropped before the end (e.g. peft DoRA's identity matrix, whose product is detached) is not
    kept, so it is not counted. See `probe_forward` for the transient peak too.

    Example:
        >>> layer = torch.nn.Linear(8, 16, device="meta")
        >>> x = torch.empty(4, 8, device="meta", requires_grad=True)
        >>> saved_activation_bytes(lambda: torch.relu(layer(x)), exclude=[*layer.parameters()])   # x, relu's output
        384
    """
    return probe_forward(run, exclude)[0]


def probe_forward(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """(bytes kept for backward, peak bytes of everything ``run()`` allocated) of one forward (see
    `saved_activation_bytes`); the difference is the forward's transient workspace."""
    excluded = {_storage_key(tensor) for tensor in exclude}
    saved: dict[int, int] = {}
    alive: set[int] = set()

    def forget(key: int) -> None:
        # A freed storage's address is reused by later ones: a key stands for a storage only while it lives.
        alive.discard(key)
        saved.pop(key, None)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in excluded and key not in saved:
            saved[key] = storage.nbytes()
            alive.add(key)
            weakref.finalize(storage, forget, key)
        return tensor

    tracker = LiveTensorTracker(include_meta=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), tracker:
        result = run()
    kept = sum(saved[key] for key in alive)  # `result` holds the graph: what it still needs is alive
    del result
    return kept, tracker.peak


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    """``scaled_dot_product_attention`` on meta tensors as a flash-style kernel saves for backward (query, key,
    value, output, log-sum-exp; a boolean padding mask converted to an additive one of the query's dtype), not as
    the math kernel meta would otherwise pick (a score matrix per head)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attn_mask, float("-inf"))
    output, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return output


@contextlib.contextmanager
def _flash_like_attention():
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _flash_like_sdpa):
        yield


@dataclass
class ActivationProfile:
    """Activation bytes of one forward, per piece, measured on the meta model (`activation_profile`)."""

    decoder_layer_per_row: int  # one decoder layer, one row of `tokens` tokens (padding mask included)
    decoder_layer_input_per_row: int  # what gradient checkpointing keeps per layer and row
    decoder_edges_per_row: int  # final norm, rotary tables
    vision_block_per_image: int
    vision_block_input_per_image: int
    vision_edges_per_image: int  # patch embedding, merger / projector, rotary tables
    forward_transient: int  # what one layer's forward allocates and drops (peft DoRA's weight norms, MLP parts)
    mask_per_row: int  # the shared boolean padding mask
    pixel_values_per_image: int  # float32 values the processor gives one image
    tokens: int
    image_tokens: int
    patches: int
    crops: int

    def forward_bytes(self, layers: int, blocks: int, rows: int, images: float,
                      checkpointing: bool) -> tuple[int, int]:
        """(activations kept for backward, backward workspace) of one forward of ``rows`` rows and ``images``
        images. Under gradient checkpointing every layer keeps its input and one layer is recomputed at a time
        (that layer's activations are workspace); backward also holds the gradients of the layer it is in."""
        if checkpointing:
            kept = (rows * (layers * self.decoder_layer_input_per_row + self.decoder_edges_per_row)
                    + images * (blocks * self.vision_block_input_per_image + self.vision_edges_per_image))
            recompute = max(rows * self.decoder_layer_per_row, images * self.vision_block_per_image)
        else:
            kept = (rows * (layers * self.decoder_layer_per_row + self.decoder_edges_per_row)
                    + images * (blocks * self.vision_block_per_image + self.vision_edges_per_image))
            recompute = 0
        kept += rows * self.mask_per_row
        # Backward of one layer holds a few gradients the size of its input (residual, norm, attention, MLP).
        layer_gradients = 4 * max(rows * self.decoder_layer_input_per_row, images * self.vision_block_input_per_image)
        return int(kept), int(max(recompute + layer_gradients, self.forward_transient))


def activation_profile(model: torch.nn.Module, backbone_config: Any, shape: TrainingShape) -> ActivationProfile:
    """Measure what one decoder layer, one vision block and the edges save for backward, on meta tensors at the
    real width, for one row of ``shape``'s tokens and one image of its size (`saved_activation_bytes`)."""
    width, height = shape.image_size
    image_tokens, patches, crops = image_geometry(backbone_config, width, height, shape.qwen_max_pixels)
    tokens = shape.text_tokens + shape.images_per_row * image_tokens
    compute = shape.compute_dtype
    parameters = [*model.parameters(), *model.buffers()]
    text_config = backbone_config.get_text_config()
    hidden_size = text_config.hidden_size
    meta = torch.device("meta")

    def probe_copy(module: torch.nn.Module) -> torch.nn.Module:
        # Under autocast every matmul runs in the compute dtype, so its saved inputs are in it: probe a copy there.
        return copy.deepcopy(module).to(compute).train()

    layer = probe_copy(decoder_layers(model)[0])
    text_model = _first(model, ("TextModel", "Qwen2Model"))
    rotary = text_model.rotary_emb
    hidden = torch.empty(1, tokens, hidden_size, device=meta, dtype=compute, requires_grad=True)
    if backbone_config.model_type in QWEN_VISION_FAMILIES:
        position_ids = torch.arange(tokens, device=meta).view(1, 1, -1).expand(3, 1, -1)
    else:
        position_ids = torch.arange(tokens, device=meta).view(1, -1)
    cos, sin = rotary(hidden, position_ids)
    cos, sin = cos.to(compute), sin.to(compute)
    mask = torch.ones(1, 1, tokens, tokens, dtype=torch.bool, device=meta)
    shared = [*parameters, *layer.parameters(), cos, sin, mask]
    with _flash_like_attention():
        decoder, decoder_peak = probe_forward(
            lambda: layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin)),
            exclude=shared)
    norm = probe_copy(text_model.norm)
    edges = saved_activation_bytes(lambda: norm(hidden * 1), exclude=[*norm.parameters()])
    edges += (cos.numel() + sin.numel()) * cos.element_size()
    layer_input = tokens * hidden_size * torch.finfo(compute).bits // 8

    vision_block = probe_copy(vision_blocks(model)[0])
    vision_config = backbone_config.vision_config
    # Under an adapter on the language model the vision tower is frozen and its input needs no gradient: autograd
    # then keeps nothing of it. Its blocks' inputs need one when any of its weights train.
    vision_trains = any(parameter.requires_grad for block in vision_blocks(model) for parameter in block.parameters())
    if backbone_config.model_type in QWEN_VISION_FAMILIES:
        vision_width = getattr(vision_config, "embed_dim", None) or vision_config.hidden_size
        head_dim = vision_width // vision_config.num_heads
        vision_hidden = torch.empty(patches, vision_width, device=meta, dtype=compute, requires_grad=vision_trains)
        vision_cos = torch.empty(patches, head_dim, device=meta, dtype=torch.float32)
        vision_sin = torch.empty_like(vision_cos)
        cu_seqlens = torch.tensor([0, patches], dtype=torch.int32)
        with _flash_like_attention():
            block, block_peak = probe_forward(
                lambda: vision_block(vision_hidden, cu_seqlens=cu_seqlens,
                                     position_embeddings=(vision_cos, vision_sin)),
                exclude=[*vision_block.parameters(), vision_cos, vision_sin])
        visual = _first(model, ("VisionTransformerPretrainedModel", "VisionTransformer", "VLVisionModel",
                                "VLMoeVisionModel"))
        patch_embed, merger = probe_copy(visual.patch_embed), probe_copy(visual.merger)
        # Qwen3-VL: each deepstack merger projects the output of one vision block to the language width.
        deepstack_mergers = [probe_copy(extra) for extra in getattr(visual, "deepstack_merger_list", ())]
        channels = vision_config.in_channels if hasattr(vision_config, "in_channels") else 3
        pixels = torch.empty(patches, channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2,
                             device=meta, dtype=compute)
        vision_edges = saved_activation_bytes(lambda: patch_embed(pixels), exclude=[*patch_embed.parameters(), pixels])
        vision_edges += saved_activation_bytes(lambda: merger(vision_hidden * 1), exclude=[*merger.parameters()])
        for extra in deepstack_mergers:
            vision_edges += saved_activation_bytes(lambda: extra(vision_hidden * 1), exclude=[*extra.parameters()])
        vision_edges += 2 * vision_cos.numel() * vision_cos.element_size()
    else:
        vision_width = vision_config.hidden_size
        side = vision_config.image_size // vision_config.patch_size
        vision_hidden = torch.empty(crops, side * side, vision_width, device=meta, dtype=compute,
                                    requires_grad=vision_trains)
        with _flash_like_attention():
            block, block_peak = probe_forward(lambda: vision_block(vision_hidden, attention_mask=None),
                                           exclude=[*vision_block.parameters()])
        embeddings = probe_copy(_first(model, ("SiglipVisionEmbeddings",)))
        projector = probe_copy(_first(model, ("MultiModalProjector",)))
        pixels = torch.empty(crops, 3, vision_config.image_size, vision_config.image_size, device=meta, dtype=compute)
        vision_edges = saved_activation_bytes(lambda: embeddings(pixels), exclude=[*embeddings.parameters(),
                                                                                    *embeddings.buffers(), pixels])
        flat = torch.empty(crops * side * side, vision_width, device=meta, dtype=compute, requires_grad=vision_trains)
        vision_edges += saved_activation_bytes(lambda: projector(flat), exclude=[*projector.parameters()])
    vision_input = patches * vision_width * torch.finfo(compute).bits // 8 if vision_trains else 0
    return ActivationProfile(
        decoder_layer_per_row=decoder, decoder_layer_input_per_row=layer_input, decoder_edges_per_row=edges,
        vision_block_per_image=block, vision_block_input_per_image=vision_input, vision_edges_per_image=vision_edges,
        forward_transient=max(decoder_peak - decoder, block_peak - block),
        mask_per_row=tokens * tokens, pixel_values_per_image=pixels.numel(), tokens=tokens,
        image_tokens=image_tokens, patches=patches, crops=crops,
    )


# ------------------------------------------------------------------------------------------------------ the plan


@dataclass
class MemoryPlan:
    """Per-GPU bytes of one training step (see the module docstring for each item) and whether it fits."""

    weights: int
    trainable_weights: int
    gradients: int
    optimizer_state: int
    inputs: int
    activations: int
    workspace: int
    optimizer_workspace: int
    cuda_overhead: int
    peak_backward: int
    peak_optimizer_step: int
    total: int
    gpu_memory: int | None
    fits: bool | None
    parameters: int
    trainable_parameters: int
    config_source: str
    sharding: str
    setting: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    ITEMS = ("weights", "trainable_weights", "gradients", "optimizer_state", "inputs", "activations", "workspace",
             "optimizer_workspace", "cuda_overhead")

    def describe(self) -> str:
        """A text table of the items in GiB, the total, and the verdict."""
        explanations = {
            "weights": "frozen weights (the base under an adapter)",
            "trainable_weights": "adapter weights, or every weight for full fine-tuning",
            "gradients": "gradients of the trainable weights",
            "optimizer_state": "AdamW: 2 float32 states per trainable weight (+ master copy)",
            "inputs": "the per-device batch on the GPU (pixels, ids)",
            "activations": "kept for backward by one forward (chunk or batch)",
            "workspace": "backward / recompute / autocast copies / unsharded layers",
            "optimizer_workspace": "temporaries of the optimizer step",
            "cuda_overhead": "CUDA context, library workspaces, allocator slack (fixed)",
        }
        lines = [f"memory plan: {self.setting.get('recipe', '')}  [{self.sharding}]",
                 f"model config: {self.config_source}; {self.parameters / 1e9:.3f}B parameters, "
                 f"{self.trainable_parameters / 1e6:.2f}M trainable",
                 f"{'item':<20}{'GiB':>10}  what"]
        lines += [f"{name:<20}{getattr(self, name) / GIB:>10.2f}  {explanations[name]}" for name in self.ITEMS]
        lines.append(f"{'peak in backward':<20}{self.peak_backward / GIB:>10.2f}")
        lines.append(f"{'peak in opt. step':<20}{self.peak_optimizer_step / GIB:>10.2f}")
        lines.append(f"{'total (per GPU)':<20}{self.total / GIB:>10.2f}")
        lines += [f"note: {note}" for note in self.notes]
        if self.fits is not None:
            if self.fits:
                lines.append(f"fits in {self.gpu_memory / GIB:.0f} GiB ({(self.gpu_memory - self.total) / GIB:.1f} GiB "
                             "to spare)")
            else:
                lines.append(f"does not fit in {self.gpu_memory / GIB:.0f} GiB (by "
                             f"{(self.total - self.gpu_memory) / GIB:.1f} GiB): what to change:")
                lines += [f"  - {advice}" for advice in self.advice]
        return "\n".join(lines)

    def to_json(self) -> str:
        """One JSON line: every item in bytes, the verdict and the setting."""
        values = {key: value for key, value in asdict(self).items() if key != "ITEMS"}
        return json.dumps(values, default=str)


def _bytes(parameters: Iterable[torch.Tensor]) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in parameters)


def _count(parameters: Iterable[torch.Tensor]) -> int:
    return sum(parameter.numel() for parameter in parameters)


@dataclass
class _ModelFacts:
    frozen_bytes: int
    trainable_bytes: int
    trainable_count: int
    parameter_count: int
    largest_unit_count: int
    largest_unit_trainable_count: int
    root_count: int
    layers: int
    blocks: int
    hidden_size: int


def _model_facts(model: torch.nn.Module) -> _ModelFacts:
    parameters = unique_parameters(model)
    trainable = [parameter for parameter in parameters if parameter.requires_grad]
    frozen = [parameter for parameter in parameters if not parameter.requires_grad]
    # FSDP units as trainers.sharding makes them: the decoder layers; the vision tower stays in the root unit.
    units = decoder_layers(model)
    in_units = {id(parameter) for unit in units for parameter in unit.parameters()}
    return _ModelFacts(
        frozen_bytes=_bytes(frozen), trainable_bytes=_bytes(trainable),
        trainable_count=sum(parameter.numel() for parameter in trainable),
        parameter_count=sum(parameter.numel() for parameter in parameters),
        largest_unit_count=max(_count(unit.parameters()) for unit in units),
        largest_unit_trainable_count=max(_count(p for p in unit.parameters() if p.requires_grad) for unit in units),
        root_count=_count(parameter for parameter in parameters if id(parameter) not in in_units),
        layers=len(decoder_layers(model)), blocks=len(vision_blocks(model)),
        hidden_size=model.config.hidden_size,
    )


def _assemble(facts: _ModelFacts, profile: ActivationProfile, shape: TrainingShape, sharding: Sharding,
              gpu: bool) -> dict[str, int]:
    """Every item of the plan, in bytes per process, from the model's facts and the measured activations."""
    world = sharding.world_size
    deepspeed = sharding.strategy.startswith("zero")
    half = torch.finfo(shape.compute_dtype).bits == 16
    weights, trainable = facts.frozen_bytes, facts.trainable_bytes
    if deepspeed and half:  # DeepSpeed bf16 / fp16 casts the whole module to half precision, keeps fp32 masters
        weights, trainable = (facts.parameter_count - facts.trainable_count) * 2, facts.trainable_count * 2
    fsdp = sharding.strategy == "fsdp"
    if fsdp and half:  # accelerate's FSDP2 keeps float32 masters of the trainable weights; gathers in half precision
        trainable = facts.trainable_count * 4
    gradients = facts.trainable_count * 4 if deepspeed else trainable  # DeepSpeed: fp32 gradient partitions
    optimizer = facts.trainable_count * 8 + (facts.trainable_count * 4 if deepspeed and half else 0)
    if sharding.shards_weights:
        weights, trainable = weights // world, trainable // world
    if sharding.shards_gradients:
        gradients //= world
    if fsdp and shape.gradcache and not shape.gradcache_reduce_each_chunk:
        # Reduced once per step: until the last chunk every process accumulates the unsharded gradients (float32).
        gradients += facts.trainable_count * 4
    if deepspeed and shape.kind == "embedder":
        # The embedding trainer reduces once per step (coalesce_grad_reduction): every process first accumulates the
        # whole gradients in the weights' dtype.
        gradients += facts.trainable_count * (2 if half else 4)
    if sharding.shards_optimizer:
        optimizer //= world
    if sharding.strategy == "ddp":
        gradients *= 2  # DDP's reducer buckets hold a second copy of every gradient (gradient_as_bucket_view off)
    workspace = 0
    if sharding.shards_weights:
        # The root unit (vision tower, embeddings, norms) gathered for the whole step, two layers gathered at a time
        # (the current one and the prefetched next), one layer's full gradients before their reduce-scatter.
        gathered = shape.compute_dtype.itemsize if half else shape.weights_dtype.itemsize
        workspace += ((facts.root_count + 2 * facts.largest_unit_count) * gathered
                      + facts.largest_unit_trainable_count * 4)
    if sharding.strategy == "zero2":
        workspace += 2 * 2 * 500_000_000  # DeepSpeed's default reduce and all-gather buckets (bf16)
    rows, images = shape.rows_per_forward, shape.rows_per_forward * shape.images_per_forward_row
    activations, backward_workspace = profile.forward_bytes(
        facts.layers, facts.blocks, rows, images, shape.gradient_checkpointing)
    workspace += backward_workspace
    if half and shape.weights_dtype == torch.float32 and not sharding.shards_weights:
        # Autocast keeps a half-precision copy of every float32 weight it used until backward.
        workspace += (facts.frozen_bytes + facts.trainable_bytes) // 2
    # The whole per-device batch is on the device during the step (GradCache moves every chunk at once): float32
    # pixels of every image, ids and mask of every row; the embedder's cached embeddings and their gradients.
    all_rows = shape.rows_per_device
    inputs = int(all_rows * shape.images_per_forward_row * profile.pixel_values_per_image * 4
                 + all_rows * profile.tokens * 8 * 2)
    if shape.kind == "embedder":
        inputs += all_rows * facts.hidden_size * 4 * 2
    fused = "fused" in shape.optimizer
    optimizer_workspace = 0 if fused else facts.trainable_count * 4 // (world if sharding.shards_optimizer else 1)
    overhead = CUDA_OVERHEAD_BYTES if gpu else 0
    resident = weights + trainable + optimizer + overhead
    peak_backward = resident + gradients + inputs + activations + workspace
    peak_optimizer = resident + gradients + inputs + optimizer_workspace
    return dict(weights=weights, trainable_weights=trainable, gradients=gradients, optimizer_state=optimizer,
                inputs=inputs, activations=activations, workspace=workspace, optimizer_workspace=optimizer_workspace,
                cuda_overhead=overhead, peak_backward=peak_backward, peak_optimizer_step=peak_optimizer,
                total=max(peak_backward, peak_optimizer))


def plan_for_shape(
    backbone_config: Any, kind: str, shape: TrainingShape, sharding: Sharding, gpu_memory_gib: float | None = None,
    config_source: str = "given", gpu: bool = True, recipe: str = "",
) -> MemoryPlan:
    """The `MemoryPlan` of ``shape`` for a backbone config (the engine of `plan_memory`; the tiny checks call it
    with ``gpu=False``: no CUDA overhead)."""
    model = build_meta_model(kind, backbone_config, shape)
    facts = _model_facts(model)
    profile = activation_profile(model, backbone_config, shape)
    items = _assemble(facts, profile, shape, sharding, gpu)
    gpu_memory = int(gpu_memory_gib * GIB) if gpu_memory_gib is not None else None
    fits = None if gpu_memory is None else items["total"] <= gpu_memory
    setting = dict(
        recipe=recipe, kind=kind, finetuning=shape.finetuning, weights_dtype=str(shape.weights_dtype),
        mixed_precision=shape.mixed_precision, gradcache=shape.gradcache,
        gradcache_chunk_size=shape.gradcache_chunk_size, gradient_checkpointing=shape.gradient_checkpointing,
        queries_per_device=shape.queries_per_device, rows_per_device=shape.rows_per_device,
        rows_per_forward=shape.rows_per_forward, tokens_per_row=profile.tokens, image_tokens=profile.image_tokens,
        vision_patches_per_image=profile.patches, image_size=list(shape.image_size), text_tokens=shape.text_tokens,
        images_per_row=shape.images_per_row, world_size=sharding.world_size, strategy=sharding.strategy,
    )
    notes = list(shape.notes) + [
        f"tokens per row: {shape.text_tokens} text (assumed; --text_tokens) + {shape.images_per_row} x "
        f"{profile.image_tokens} image tokens at {shape.image_size[0]}x{shape.image_size[1]} = {profile.tokens}, "
        "every row padded to that, every row with its images",
        "attention counted as a flash-style kernel with a padding mask (sdpa); flash_attention_2 keeps a little less",
    ]
    plan = MemoryPlan(**items, gpu_memory=gpu_memory, fits=fits, parameters=facts.parameter_count,
                      trainable_parameters=facts.trainable_count, config_source=config_source,
                      sharding=sharding.source, setting=setting, notes=notes)
    if fits is False:
        plan.advice = _advice(facts, profile, shape, sharding, gpu, items, gpu_memory)
    return plan


def _advice(facts: _ModelFacts, profile: ActivationProfile, shape: TrainingShape, sharding: Sharding, gpu: bool,
            items: dict[str, int], gpu_memory: int) -> list[str]:
    """Changes that lower the peak, each with the total it would give (activations re-measured where needed)."""
    def total_with(**changes: Any) -> float:
        changed = replace(shape, **changes)
        return _assemble(facts, profile, changed, sharding, gpu)["total"] / GIB

    advice = []
    ddp_like = sharding.strategy in ("single", "ddp")
    if not shape.gradcache and shape.kind == "embedder":
        advice.append(f"turn on GradCache (training.gradcache: true, gradcache_chunk_size: 2): "
                      f"{total_with(gradcache=True, gradcache_chunk_size=2):.1f} GiB")
    if sharding.strategy == "fsdp" and shape.gradcache and not shape.gradcache_reduce_each_chunk:
        advice.append(f"keep the gradients sharded (training.gradcache_reduce_each_chunk: true): "
                      f"{total_with(gradcache_reduce_each_chunk=True):.1f} GiB")
    if shape.gradcache and shape.gradcache_chunk_size > 1:
        advice.append(f"lower gradcache_chunk_size to 1: {total_with(gradcache_chunk_size=1):.1f} GiB")
    if not shape.gradient_checkpointing:
        advice.append(f"turn on training.gradient_checkpointing: {total_with(gradient_checkpointing=True):.1f} GiB")
    if not shape.gradcache and shape.queries_per_device > 1:
        smaller = max(1, shape.queries_per_device // 4)
        advice.append(f"lower per_device_train_batch_size to {smaller} and raise gradient_accumulation_steps x"
                      f"{shape.queries_per_device // smaller} (same global batch; in-batch negatives shrink): "
                      f"{total_with(queries_per_device=smaller):.1f} GiB")
    if ddp_like and sharding.world_size > 1 and (items["weights"] + items["trainable_weights"]
                                                 + items["optimizer_state"]) > 0.25 * gpu_memory:
        advice.append(f"shard weights, gradients and optimizer state with FSDP (recipes/accelerate/fsdp.yaml) over "
                      f"{sharding.world_size} GPUs (GradCache works there too)")
    if not advice:
        advice.append("use GPUs with more memory, or more of them with FSDP")
    return advice


def plan_memory(
    recipe_config_path: str | os.PathLike,
    accelerate_config_path: str | os.PathLike | None = None,
    gpu_memory_gib: float | None = None,
    text_tokens: int | None = None,
    overrides: Sequence[str] = (),
) -> MemoryPlan:
    """Per-GPU peak memory of one training step of a recipe under an accelerate config (see the module docstring).

    Args:
        recipe_config_path: a training recipe (``recipes/configs/*.yaml``: embedder or reranker).
        accelerate_config_path: ``recipes/accelerate/*.yaml`` (None: one process).
        gpu_memory_gib: the GPU's memory; the plan then says whether the step fits (``fits``) and what to change.
        text_tokens: text tokens per row (default `DEFAULT_TEXT_TOKENS`).
        overrides: recipe flags applied over the file (``["--gradcache_chunk_size", "1"]``).
    """
    sharding = sharding_from_accelerate_config(accelerate_config_path)
    shape, kind, model_spec = training_shape(recipe_config_path, sharding, text_tokens, overrides)
    backbone_config, source = backbone_config_for(model_spec)
    gpu = not model_spec.startswith("tiny:") or accelerate_config_path is not None
    return plan_for_shape(backbone_config, kind, shape, sharding, gpu_memory_gib, source, gpu=gpu,
                          recipe=f"{recipe_config_path} ({model_spec})")


# ------------------------------------------------------------------------------------------------------ measuring


def _tensors_in(output: Any) -> Iterable[torch.Tensor]:
    """The tensors of an operator's output (a tensor, or tuples / lists of them)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors_in(item)


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of live tensor storages on CPU (where there is no ``torch.cuda.max_memory_allocated``): every
    storage an operator returns is counted once until it is freed (a weakref finalizer on its storage), on top of
    the ``track``-ed storages that existed before (parameters, inputs), with the storages resized in place (FSDP2's
    unsharded parameters) at their current size. ``phase`` names the part of the step the peak happened in.

    Example:
        >>> with LiveTensorTracker() as tracker:
        ...     a = torch.ones(256); b = a * 2; del a, b; c = torch.ones(128)
        >>> tracker.peak, tracker.current
        (2048, 512)
    """

    def __init__(self, include_meta: bool = False) -> None:
        super().__init__()
        self.include_meta = include_meta
        self.live: dict[int, int] = {}
        self.current = self.peak = 0
        self.phase = ""
        self.peak_phase = ""
        self.peak_keys: frozenset[int] = frozenset()

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count storages that exist already."""
        for tensor in tensors:
            self._add(tensor)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _add(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or (tensor.device.type == "meta" and not self.include_meta):
            return
        self._add_storage(_local(tensor).untyped_storage())

    def _add_storage(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += self.live[key]
        weakref.finalize(storage, self._free, key)
        self._update_peak()

    def _update_peak(self) -> None:
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
            self.peak_keys = frozenset(self.live)

    def __enter__(self):
        # FSDP2 frees and re-allocates its unsharded parameters by resizing their storages in place, which no
        # operator reports: follow the resizes too.
        original = torch.UntypedStorage.resize_
        tracker = self

        def resize_(storage: torch.UntypedStorage, size: int):
            result = original(storage, size)
            key = id(storage)
            if key in tracker.live:
                tracker.current += storage.nbytes() - tracker.live[key]
                tracker.live[key] = storage.nbytes()
                tracker._update_peak()
            elif storage.nbytes():
                tracker._add_storage(storage)
            return result

        self._original_resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc_info):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for tensor in _tensors_in(output):
            self._add(tensor)
        return output


@dataclass
class TinySetting:
    """One tiny training step to measure and plan (`measure_tiny_training_peak`, `plan_tiny_setting`)."""

    name: str
    family: str = "qwen2_vl"
    finetuning: str = "full"
    gradcache: bool = False
    gradcache_chunk_size: int = 2
    gradient_checkpointing: bool = False
    queries: int = 2
    num_negatives: int = 3
    hidden_size: int = 256
    layers: int = 4
    vision_width: int = 128
    image_size: int = 224
    text_words: int = 24
    adapter: dict[str, Any] = field(default_factory=lambda: dict(r=8, alpha=16, dropout=0.1))


TINY_SETTINGS = (
    TinySetting("full, one forward"),
    TinySetting("full, GradCache chunk 2", gradcache=True),
    TinySetting("dora, one forward", finetuning="dora"),
    TinySetting("lora, GradCache chunk 2", finetuning="lora", gradcache=True),
    TinySetting("full, gradient checkpointing", gradient_checkpointing=True),
    TinySetting("qwen3_vl full, one forward", family="qwen3_vl"),  # 16-pixel patches, deepstack mergers
)


def tiny_backbone_config(setting: TinySetting) -> Any:
    """The backbone config of a tiny setting: `modeling_unime.tiny`'s, widened so that activations are a real share
    of the step (the stock tiny model is 64 wide with a 32-wide vision tower)."""
    from modeling_unime.tiny import build_tiny_backbone_config

    config = build_tiny_backbone_config(setting.family, hidden_size=setting.hidden_size,
                                        num_hidden_layers=setting.layers)
    vision = config.vision_config
    if setting.family == "qwen2_vl":
        vision.embed_dim, vision.num_heads = setting.vision_width, 4
    elif setting.family in ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        vision.hidden_size, vision.num_heads = setting.vision_width, 4
        vision.intermediate_size = 2 * setting.vision_width
    return config


def _tiny_batch(setting: TinySetting, processor: Any) -> dict[str, Any]:
    from PIL import Image

    rows = setting.queries * (2 + setting.num_negatives)  # queries, then each query's positive and negatives
    words = ["red", "green", "blue", "circle", "square", "a", "the", "shape", "of", "colour"]
    # Every other row a little shorter, so each forward has padding (and an attention mask) as real batches do.
    texts = [" ".join(words[(row + i) % len(words)] for i in range(setting.text_words - 3 * (row % 2)))
             for row in range(rows)]
    images = [Image.new("RGB", (setting.image_size, setting.image_size), (40 * row % 255, 90, 160))
              for row in range(rows)]
    order = list(range(rows))
    size = setting.gradcache_chunk_size if setting.gradcache else rows
    chunks = [processor(texts=[texts[i] for i in order[start:start + size]],
                        images=[images[i] for i in order[start:start + size]]) for start in range(0, rows, size)]
    chunks = [dict(chunk) for chunk in chunks]
    torch.manual_seed(0)
    return {"chunks": chunks, "num_queries": setting.queries,
            "judge_scores": torch.rand(setting.queries, 1 + setting.num_negatives)}


def measure_tiny_training_peak(setting: TinySetting, steps: int = 2, trainer_class: type | None = None
                               ) -> dict[str, Any]:
    """Build the tiny model of ``setting`` on CPU, run ``steps`` real training steps of `UniMEV2Trainer` (forward,
    backward, AdamW step, gradients set to None) and return the peak of live tensor bytes with its parts: weights,
    optimizer state and the rest (gradients, inputs, activations, temporaries) at that moment; and the batch's
    padded tokens per row. ``trainer_class``: another `UniMEV2Trainer` (tests/fsdp_worker.py passes one that runs
    under FSDP2 on CPU: the model is then sharded first, and the bytes are this process's)."""
    import tempfile

    from modeling_unime.configuration_unime import UniMEV2Config
    from modeling_unime.modeling_unime import UniMEV2Model
    from modeling_unime.tiny import build_tiny_processor, build_tiny_tokenizer, synthetic_judge_dataset

    from .adapters import prepare_for_training
    from .embedding_trainer import UniMEV2Trainer, UniMEV2TrainingArguments

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer(setting.family)
    config = tiny_backbone_config(setting)
    model = UniMEV2Model(UniMEV2Config(backbone_config=config))
    model.set_attn_implementation("sdpa")
    processor = build_tiny_processor(setting.family, tokenizer)
    model = prepare_for_training(model, setting.finetuning, **(setting.adapter if setting.finetuning != "full" else {}))
    folder = tempfile.mkdtemp(prefix="memory-plan-")
    args = UniMEV2TrainingArguments(
        folder, per_device_train_batch_size=setting.queries, num_negatives=setting.num_negatives,
        gradcache=setting.gradcache, gradcache_chunk_size=setting.gradcache_chunk_size, deduplicate_inputs=False,
        gradient_checkpointing=setting.gradient_checkpointing, use_cpu=True, report_to=[], save_strategy="no",
        disable_tqdm=True, max_steps=steps,
    )
    rows = synthetic_judge_dataset(2, folder, num_negatives=setting.num_negatives)
    trainer = (trainer_class or UniMEV2Trainer)(model=model, args=args, train_dataset=rows,
                                                processing_class=processor, image_root=folder)
    trainer.create_optimizer()
    if trainer.is_fsdp_enabled:  # what Trainer.train() does first under FSDP2: shard the model with its optimizer
        model, trainer.optimizer = trainer.accelerator.prepare(model, trainer.optimizer)
        trainer.model = trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which this loop stands in for
    if setting.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setting.finetuning != "full":
            model.enable_input_require_grads()
    model.train()
    batch = _tiny_batch(setting, processor)
    tokens = max(chunk["input_ids"].shape[1] for chunk in batch["chunks"])
    parameters = unique_parameters(model)
    tracker = LiveTensorTracker()
    tracker.track([*parameters, *model.buffers()])
    tracker.track(value for chunk in batch["chunks"] for value in chunk.values() if isinstance(value, torch.Tensor))
    with tracker:
        for _ in range(steps):
            tracker.phase = "forward/backward"
            trainer.training_step(model, batch)
            tracker.phase = "optimizer step"
            trainer.optimizer.step()
            model.zero_grad(set_to_none=True)
    state_keys = {_storage_key(value) for state in trainer.optimizer.state.values() for value in state.values()
                  if isinstance(value, torch.Tensor)}
    parameter_keys = {_storage_key(parameter) for parameter in parameters}
    at_peak = tracker.peak_keys
    weights = _bytes(_local(parameter) for parameter in parameters)
    optimizer = sum(tracker.live.get(key, 0) for key in state_keys & at_peak)
    return dict(peak=tracker.peak, phase=tracker.peak_phase, weights=weights, optimizer_state=optimizer,
                rest=tracker.peak - weights - optimizer, tokens_per_row=tokens,
                parameters=sum(p.numel() for p in parameters), parameter_storages=len(parameter_keys & at_peak))


def plan_tiny_setting(setting: TinySetting, text_tokens: int, sharding: Sharding | None = None) -> MemoryPlan:
    """The plan of a tiny setting on one CPU process (float32, no mixed precision; ``sharding``: one process of an
    FSDP2 run): what `measure_tiny_training_peak` measures."""
    shape = TrainingShape(
        kind="embedder", finetuning=setting.finetuning,
        adapter=setting.adapter if setting.finetuning != "full" else {}, weights_dtype=torch.float32,
        compute_dtype=torch.float32, mixed_precision=None, queries_per_device=setting.queries,
        rows_per_query=2 + setting.num_negatives, gradcache=setting.gradcache,
        gradcache_chunk_size=setting.gradcache_chunk_size, gradient_checkpointing=setting.gradient_checkpointing,
        image_size=(setting.image_size, setting.image_size), images_per_row=1, images_per_forward_row=1.0,
        text_tokens=text_tokens, qwen_max_pixels=TINY_QWEN_MAX_PIXELS,
    )
    return plan_for_shape(tiny_backbone_config(setting), "embedder", shape, sharding or Sharding("single"), gpu=False,
                          config_source="tiny", recipe=setting.name)


def compare_tiny_settings(settings: Sequence[TinySetting] = TINY_SETTINGS) -> list[dict[str, Any]]:
    """Measured peak against the plan for each tiny setting: one row each (bytes and the ratio plan / measured)."""
    rows = []
    for setting in settings:
        measured = measure_tiny_training_peak(setting)
        probe_shape_tokens = _text_tokens_of(setting, measured["tokens_per_row"])
        plan = plan_tiny_setting(setting, probe_shape_tokens)
        rows.append(dict(setting=setting.name, measured=measured["peak"], planned=plan.total,
                         ratio=plan.total / measured["peak"], phase=measured["phase"],
                         measured_weights=measured["weights"], planned_weights=plan.weights + plan.trainable_weights,
                         measured_optimizer=measured["optimizer_state"], planned_optimizer=plan.optimizer_state,
                         measured_rest=measured["rest"],
                         planned_rest=plan.total - plan.weights - plan.trainable_weights - plan.optimizer_state))
    return rows


def _text_tokens_of(setting: TinySetting, padded_tokens: int) -> int:
    config = tiny_backbone_config(setting)
    image_tokens = image_geometry(config, setting.image_size, setting.image_size, TINY_QWEN_MAX_PIXELS)[0]
    return padded_tokens - image_tokens


def format_comparison(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison of `compare_tiny_settings` as a text table (KiB)."""
    header = (f"{'setting':<32}{'measured':>11}{'planned':>11}{'ratio':>7}  {'peak in':<17}"
              f"{'weights m/p':>19}{'optimizer m/p':>19}{'rest m/p':>21}")
    lines = [header]
    for row in rows:
        lines.append(
            f"{row['setting']:<32}{row['measured'] / 1024:>11.0f}{row['planned'] / 1024:>11.0f}{row['ratio']:>7.3f}  "
            f"{row['phase']:<17}{row['measured_weights'] / 1024:>9.0f}/{row['planned_weights'] / 1024:<9.0f}"
            f"{row['measured_optimizer'] / 1024:>9.0f}/{row['planned_optimizer'] / 1024:<9.0f}"
            f"{row['measured_rest'] / 1024:>10.0f}/{row['planned_rest'] / 1024:<10.0f}")
    return "\n".join(lines)


__all__ = [
    "CUDA_OVERHEAD_BYTES", "DEFAULT_TEXT_TOKENS", "GIB", "PUBLISHED_BACKBONES", "TINY_SETTINGS", "ActivationProfile",
    "LiveTensorTracker", "MemoryPlan", "Sharding", "TinySetting", "TrainingShape", "activation_profile",
    "backbone_config_for", "build_meta_model", "compare_tiny_settings", "decoder_layers", "format_comparison",
    "image_geometry", "measure_tiny_training_peak", "plan_for_shape", "plan_memory", "plan_tiny_setting",
    "recipe_kind_of", "saved_activation_bytes", "sharding_from_accelerate_config", "training_shape",
    "unique_parameters", "vision_blocks",
]
