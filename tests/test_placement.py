"""Placement: the process's device, the dtype rules (inference and training), the attention kernel and its way into
the wrapped backbone, the training recipe's loader. CPU only; the GPU rules are checked with a CUDA device that is
only named (nothing runs on it) or with the availability checks patched."""

import doctest
from types import SimpleNamespace

import pytest
import torch
from accelerate import PartialState

import modeling_unime.placement as placement_module
from modeling_unime import UniMEV2Model, UniMEV2Reranker
from modeling_unime.placement import (
    attention_kernels,
    describe,
    place,
    placement,
    pretrained_kwargs,
    resolve_attn_implementation,
    resolve_dtype,
    training_dtype,
)
from modeling_unime.tiny import build_tiny_causal_lm, build_tiny_reranker, build_tiny_unime
from trainers import recipe_runner
from trainers.recipe_runner import (
    EMBEDDER,
    RERANKER,
    apply_device_defaults,
    load_training_model,
    mixed_precision_of,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_doctests():
    assert doctest.testmod(placement_module).failed == 0


@pytest.mark.parametrize(
    "dtype, device, expected",
    [
        ("auto", CPU, torch.float32),
        (None, CPU, torch.float32),
        ("auto", CUDA, torch.bfloat16),
        ("bfloat16", CPU, torch.bfloat16),  # explicit: honoured, even where slow
        ("float16", CPU, torch.float16),
        ("float32", CUDA, torch.float32),
        (torch.bfloat16, CPU, torch.bfloat16),
    ],
)
def test_dtype_rule(dtype, device, expected):
    assert resolve_dtype(dtype, device) == expected


def test_gpu_without_bf16_gets_float16(monkeypatch):
    monkeypatch.setattr(placement_module, "bf16_supported", lambda device: False)
    assert resolve_dtype("auto", CUDA) == torch.float16


def test_unknown_dtype_and_attention_are_clear_errors():
    with pytest.raises(ValueError, match="dtype='fp32': use one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp32", CPU)
    with pytest.raises(ValueError, match="attn_implementation='flash': use one of auto, sdpa, eager"):
        resolve_attn_implementation("flash")


def test_attention_defaults_to_sdpa_and_keeps_an_explicit_choice():
    assert resolve_attn_implementation() == "sdpa"
    assert resolve_attn_implementation(None, torch.bfloat16, CPU) == "sdpa"
    assert resolve_attn_implementation("eager", torch.float32, CPU) == "eager"
    assert resolve_attn_implementation("sdpa", torch.bfloat16, CUDA) == "sdpa"


def test_flash_attention_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(placement_module, "flash_attention_installed", lambda: False)
    with pytest.raises(ValueError, match=r"needs the flash-attn package.*pip install flash-attn"):
        resolve_attn_implementation("flash_attention_2", torch.bfloat16, CUDA)
    with pytest.raises(ValueError, match="flash-attn package"):
        placement("auto", "flash_attention_2", device=CPU)


def test_flash_attention_needs_a_gpu_and_half_precision(monkeypatch):
    monkeypatch.setattr(placement_module, "flash_attention_installed", lambda: True)
    with pytest.raises(ValueError, match="needs a CUDA GPU, and this process has device cpu"):
        resolve_attn_implementation("flash_attention_2", torch.bfloat16, CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_attn_implementation("flash_attention_2", torch.bfloat16, CUDA) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.bfloat16, CUDA) == "flash_attention_2"
    # float32 weights: auto stays on sdpa; asking for flash-attn explicitly says why it cannot run.
    assert resolve_attn_implementation("auto", torch.float32, CUDA) == "sdpa"
    with pytest.raises(ValueError, match="float16 / bfloat16 only.*float32"):
        resolve_attn_implementation("flash_attention_2", torch.float32, CUDA)
    # Training under bf16 autocast: float32 weights, bf16 compute -> flash-attn allowed.
    where = placement("float32", "auto", CUDA, compute_dtype=torch.bfloat16)
    assert where == {"device": CUDA, "dtype": torch.float32, "attn_implementation": "flash_attention_2"}


def test_placement_defaults_to_the_process_device():
    where = placement()
    assert where["device"] == PartialState().device
    assert where["dtype"] == (torch.float32 if where["device"].type == "cpu" else torch.bfloat16)
    assert where["attn_implementation"] in ("sdpa", "flash_attention_2")
    kwargs = pretrained_kwargs(where)
    assert kwargs["device_map"] == {"": where["device"]}
    assert "device_map" not in pretrained_kwargs(where, device_map=False)


@pytest.mark.parametrize(
    "dtype, mixed_precision, finetuning, device, expected",
    [
        ("auto", None, "dora", CPU, torch.float32),
        ("auto", "bf16", "dora", CPU, torch.float32),        # CPU: always float32 unless asked
        ("auto", "bf16", "dora", CUDA, torch.bfloat16),      # the authors' setting: bf16 base under the adapter
        ("auto", "bf16", "lora", CUDA, torch.bfloat16),
        ("auto", "bf16", "full", CUDA, torch.float32),       # full fine-tuning: float32 master weights + autocast
        ("auto", "fp16", "dora", CUDA, torch.float32),       # fp16 AMP needs float32 weights
        ("auto", None, "dora", CUDA, torch.float32),         # no mixed precision: float32
        ("bfloat16", None, "dora", CPU, torch.bfloat16),     # explicit: honoured
        ("float32", "bf16", "dora", CUDA, torch.float32),
    ],
)
def test_training_dtype_rule(dtype, mixed_precision, finetuning, device, expected):
    assert training_dtype(dtype, device, mixed_precision, finetuning) == expected


def test_bf16_weights_for_full_finetuning_warn(caplog):
    with caplog.at_level("WARNING", logger="modeling_unime.placement"):
        assert training_dtype("bfloat16", CUDA, "bf16", "full") == torch.bfloat16
    assert "rounded away" in caplog.text


def _module_kernels(model):
    """(sub-model, kernel) of every attention module: language model and vision tower."""
    return {(name.split(".")[1], module.config._attn_implementation)
            for name, module in model.named_modules() if name.endswith(("self_attn", ".attn"))}


@pytest.mark.parametrize("model_class, build, family, vision", [
    (UniMEV2Model, build_tiny_unime, "qwen2_vl", "visual"),
    (UniMEV2Reranker, build_tiny_reranker, "qwen2_5_vl", "visual"),
    (UniMEV2Model, build_tiny_unime, "llava_onevision", "vision_tower"),
    (UniMEV2Reranker, build_tiny_reranker, "qwen3_vl", "visual"),
])
def test_attn_implementation_reaches_the_wrapped_backbone(tmp_path, model_class, build, family, vision):
    model, _ = build(family)
    model.save_pretrained(tmp_path)
    where = placement("bfloat16", "eager", device=CPU)
    loaded = model_class.from_pretrained(tmp_path, **pretrained_kwargs(where))
    assert loaded.config._attn_implementation == "eager"
    assert loaded.model.config._attn_implementation == "eager"
    assert getattr(loaded.model, vision).config._attn_implementation == "eager"
    assert _module_kernels(loaded) == {("language_model", "eager"), (vision, "eager")}
    assert loaded.device == CPU and loaded.dtype == torch.bfloat16
    # The default (sdpa) reaches the same places.
    default = model_class.from_pretrained(tmp_path, **pretrained_kwargs(placement(device=CPU)))
    assert _module_kernels(default) == {("language_model", "sdpa"), (vision, "sdpa")} and default.dtype == torch.float32


def test_authors_layout_checkpoint_gets_the_attention_too(tmp_path):
    build_tiny_causal_lm("qwen2_vl").save_pretrained(tmp_path)
    loaded = UniMEV2Model.from_pretrained(tmp_path, **pretrained_kwargs(placement("auto", "eager", device=CPU)))
    assert _module_kernels(loaded) == {("language_model", "eager"), ("visual", "eager")}


def test_place_moves_casts_and_switches_attention():
    model, _ = build_tiny_unime("qwen2_vl")
    placed = place(model, CPU, torch.bfloat16, "eager")
    assert placed.dtype == torch.bfloat16 and attention_kernels(placed) == {"eager"}
    assert describe(placed, "embedder") == "embedder: cpu torch.bfloat16 attention=eager"


# ------------------------------------------------------------------------------------------------ training recipe


def test_device_defaults_force_cpu_only_without_an_accelerator(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(recipe_runner, "accelerator_available", lambda: False)
    assert apply_device_defaults({}) == {"use_cpu": True}
    monkeypatch.setattr(recipe_runner, "accelerator_available", lambda: True)
    monkeypatch.setattr(recipe_runner, "default_mixed_precision", lambda: "bf16")
    assert apply_device_defaults({}) == {"bf16": True}                     # GPU: bf16 by default, use_cpu untouched
    assert apply_device_defaults({"bf16": False}) == {"bf16": False}       # an explicit choice is kept
    assert apply_device_defaults({"fp16": True}) == {"fp16": True}
    assert apply_device_defaults({"use_cpu": True}) == {"use_cpu": True}   # asked for CPU: no bf16 forced on it
    monkeypatch.setattr(recipe_runner, "default_mixed_precision", lambda: None)  # a GPU without bf16
    assert apply_device_defaults({}) == {}
    monkeypatch.setattr(recipe_runner, "default_mixed_precision", lambda: "bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")               # accelerate launch --mixed_precision fp16
    assert apply_device_defaults({}) == {}
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")                 # accelerate launch's own default
    assert apply_device_defaults({}) == {"bf16": True}


def test_mixed_precision_comes_from_the_flags_or_the_launcher():
    assert mixed_precision_of(SimpleNamespace(bf16=True, fp16=False, mixed_precision="bf16")) == "bf16"
    assert mixed_precision_of(SimpleNamespace(bf16=False, fp16=False, mixed_precision="fp16")) == "fp16"
    assert mixed_precision_of(SimpleNamespace(bf16=False, fp16=False, mixed_precision="no")) is None
    assert mixed_precision_of(_args(fp16=True)) == "fp16"


def _args(device=CPU, bf16=False, fp16=False):
    return SimpleNamespace(device=device, bf16=bf16, fp16=fp16)


@pytest.mark.parametrize("settings, args, finetuning, dtype, kernel", [
    ({}, _args(), "full", torch.float32, "sdpa"),                                       # CPU default
    ({"dtype": "bfloat16", "attn_implementation": "eager"}, _args(), "full", torch.bfloat16, "eager"),
    ({}, _args(CUDA, bf16=True), "dora", torch.bfloat16, "sdpa"),                        # a GPU run, as loaded
    ({}, _args(CUDA, bf16=True), "full", torch.float32, "sdpa"),
])
def test_training_loader_dtype_and_attention(settings, args, finetuning, dtype, kernel):
    model, processor = load_training_model(RERANKER, "tiny:qwen2_5_vl", settings, args, finetuning)
    assert model.dtype == dtype and attention_kernels(model) == {kernel}
    assert model.device == CPU  # the Trainer moves it


def test_training_loader_passes_dtype_and_attention_to_from_pretrained(tmp_path):
    model, processor = build_tiny_unime("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, _ = load_training_model(EMBEDDER, str(tmp_path), {"attn_implementation": "eager"}, _args(), "dora")
    assert isinstance(loaded, UniMEV2Model) and loaded.dtype == torch.float32
    assert _module_kernels(loaded) == {("language_model", "eager"), ("visual", "eager")}
    with pytest.raises(ValueError, match="flash-attn"):
        load_training_model(EMBEDDER, str(tmp_path), {"attn_implementation": "flash_attention_2"}, _args(), "dora")
