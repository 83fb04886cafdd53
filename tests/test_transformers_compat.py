"""What the package needs from the transformers (and accelerate) a user installs, checked by behaviour.

The package uses public API everywhere but for the few hooks listed here, which transformers offers no public
way to reach. Each test names the installed transformers version when a hook disappears or changes, so that a new
release that breaks us says so in one line instead of in fifty unrelated failures (transformers 5.25 removed the
private ``ProcessorMixin._get_arguments_from_pretrained`` that the processor loader used to call).
"""

from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch
import transformers
from PIL import Image

from conftest import FAMILIES
from modeling_unime import UniMEV2Model
from modeling_unime.processing_unime import (
    LlavaOnevisionImageProcessorFloorPadding,
    UniMEV2Processor,
    canonical_image_resize,
)
from modeling_unime.tiny import build_tiny_processor, build_tiny_unime

VERSION = f"transformers {transformers.__version__}"


class TransformersLogRecords(logging.Handler):
    """Every record the ``transformers`` loggers emit while installed (warning_once included)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> TransformersLogRecords:
        self.logger = logging.getLogger("transformers")
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc_info) -> None:
        self.logger.removeHandler(self)

    def warnings(self) -> list[str]:
        return [record.getMessage() for record in self.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("backbone_type", FAMILIES)
def test_a_saved_processor_loads_back_equal_and_without_warnings(backbone_type, tmp_path):
    processor = build_tiny_processor(backbone_type)
    processor.image_resize = "authors-train-qwen2vl"
    processor.save_pretrained(tmp_path)
    with TransformersLogRecords() as log:
        loaded = UniMEV2Processor.from_pretrained(tmp_path)
    assert not log.warnings(), f"{VERSION}: loading a saved processor logged {log.warnings()}"
    assert type(loaded.image_processor) is type(processor.image_processor), VERSION
    assert type(loaded.backbone_processor) is type(processor.backbone_processor), VERSION
    assert loaded.to_dict() == {key: value for key, value in processor.to_dict().items() if key != "auto_map"}
    assert loaded.chat_template == processor.chat_template
    texts, images = ["a red car", None, "<|image_1|> what colour?"], [None, Image.new("RGB", (70, 45), "red"),
                                                                       Image.new("RGB", (33, 90), "blue")]
    expected, got = processor(texts=texts, images=images), loaded(texts=texts, images=images)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{VERSION}: {key} differs after a save/load round trip"


def test_settings_given_to_from_pretrained_override_the_saved_ones_and_stay_out_of_the_tokenizer(tmp_path):
    build_tiny_processor("qwen2_vl").save_pretrained(tmp_path)
    loaded = UniMEV2Processor.from_pretrained(tmp_path, image_resize="authors-eval", anyres_padding="centered")
    assert loaded.image_resize == canonical_image_resize("authors-eval") and loaded.anyres_padding == "centered"
    settings = [name for name in inspect.signature(UniMEV2Processor.__init__).parameters
                if name not in ("self", "image_processor", "tokenizer", "chat_template", "kwargs")]
    assert "anyres_padding" in settings and "backbone_type" in settings
    leaked = [name for name in settings if name in loaded.tokenizer.init_kwargs]
    assert not leaked, f"UniME-V2 settings reached the tokenizer loader: {leaked}"
    loaded.save_pretrained(tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert not [name for name in settings if name in saved]


def test_a_processor_that_fails_to_load_is_named_never_turned_into_a_missing_attribute(tmp_path, monkeypatch):
    model, processor = build_tiny_unime("qwen2_vl")
    model.save_pretrained(tmp_path)  # no processor saved beside the weights
    loaded = UniMEV2Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Could not load the processor saved with") as raised:
        loaded.encode(texts=["a red car"])
    assert str(tmp_path) in str(raised.value)

    def broken_loader(*args, **kwargs):
        raise AttributeError("type object 'UniMEV2Processor' has no attribute '_get_arguments_from_pretrained'")

    processor.save_pretrained(tmp_path)
    loaded = UniMEV2Model.from_pretrained(tmp_path)
    monkeypatch.setattr(UniMEV2Processor, "from_pretrained", broken_loader)
    with pytest.raises(ValueError) as raised:
        loaded.processor
    message = str(raised.value)
    assert str(tmp_path) in message and "AttributeError" in message and "_get_arguments_from_pretrained" in message
    assert "has no attribute 'processor'" not in message


# ------------------------------------------------------------------------------------------- private hooks we use


def test_hook_llava_onevision_padding_size_is_still_called_with_the_same_signature(tmp_path):
    """`LlavaOnevisionImageProcessorFloorPadding` overrides the private ``_get_padding_size`` of transformers'
    LLaVA-OneVision image processor to pad anyres tiles as transformers 4.49 did (the authors' stack)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    hook = getattr(LlavaOnevisionImageProcessorPil, "_get_padding_size", None)
    assert hook is not None, (
        f"{VERSION} removed LlavaOnevisionImageProcessorPil._get_padding_size: "
        "LlavaOnevisionImageProcessorFloorPadding (4.49 anyres padding) must move to the new hook"
    )
    parameters = list(inspect.signature(hook).parameters)
    assert parameters == ["self", "original_resolution", "target_resolution"], (
        f"{VERSION} changed LlavaOnevisionImageProcessorPil._get_padding_size to {parameters}"
    )
    processor = build_tiny_processor("llava_onevision")
    assert processor.anyres_padding == "transformers-4.49"
    assert isinstance(processor.image_processor, LlavaOnevisionImageProcessorFloorPadding)
    processor.save_pretrained(tmp_path)
    centered = UniMEV2Processor.from_pretrained(tmp_path, anyres_padding="centered")
    assert not isinstance(centered.image_processor, LlavaOnevisionImageProcessorFloorPadding)
    image = Image.effect_noise((57, 30), 64).convert("RGB")  # an odd gap to the tile grid
    floor = processor(texts=["x"], images=[image])["pixel_values"]
    stock = centered(texts=["x"], images=[image])["pixel_values"]
    assert floor.shape == stock.shape
    assert not torch.equal(floor, stock), (
        f"{VERSION} no longer calls _get_padding_size when padding anyres tiles: the 4.49 padding is not applied"
    )


def test_hook_config_attn_implementation_reports_the_kernel():
    """`placement.attention_kernels` and the embedding-cache fingerprint read ``config._attn_implementation``
    (transformers has no public getter; ``set_attn_implementation`` is the public setter)."""
    model, _ = build_tiny_unime("qwen2_vl")
    for kernel in ("eager", "sdpa"):
        model.set_attn_implementation(kernel)
        seen = {getattr(module.config, "_attn_implementation", "<missing>")
                for name, module in model.named_modules() if name.endswith("self_attn")}
        assert seen == {kernel}, f"{VERSION}: config._attn_implementation gives {seen} after set_attn_implementation"


def test_public_trainer_api_the_trainers_override():
    """The reranker trainer overrides `Trainer.get_batch_samples` (public) and sets ``loss_is_scaled_for_ga``."""
    from transformers import Trainer

    parameters = list(inspect.signature(Trainer.get_batch_samples).parameters)
    assert parameters == ["self", "epoch_iterator", "num_batches", "device"], (
        f"{VERSION} changed Trainer.get_batch_samples to {parameters}: trainers/reranker_trainer.py overrides it"
    )
    assert hasattr(Trainer, "loss_is_scaled_for_ga"), f"{VERSION} has no Trainer.loss_is_scaled_for_ga"
    assert "num_items_in_batch" in inspect.signature(Trainer.compute_loss).parameters, VERSION


def test_public_processor_api_the_loader_uses():
    parameters = inspect.signature(UniMEV2Processor.get_processor_dict).parameters
    assert "pretrained_model_name_or_path" in parameters, f"{VERSION} changed ProcessorMixin.get_processor_dict"


def test_no_module_of_the_package_calls_a_private_transformers_or_trainer_method():
    """A source scan: the names transformers made private and that broke us, or that the audit replaced."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    replaced = ("_get_arguments_from_pretrained", "from_args_and_dict", "_get_num_items_in_batch", "_prepare_inputs",
                "_prepare_input(", "_flatten_dense_tensors", "config._name_or_path")
    offenders = []
    for folder in ("modeling_unime", "trainers", "evaluation", "recipes", "benchmarks", "parity"):
        for path in sorted((root / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            offenders += [f"{path.relative_to(root)}: {name}" for name in replaced if name in text]
    assert not offenders, offenders


# ------------------------------------------------------------------------------------------- torch hooks


def test_torch_hooks_of_the_memory_plan_and_fsdp_work():
    """The memory plan (trainers/memory_plan.py) counts tensors with a ``TorchDispatchMode`` (importable only from
    ``torch.utils._python_dispatch``), keys storages by their preserved Python object, and measures flash-style
    attention on meta tensors with ``aten._scaled_dot_product_flash_attention_for_cpu``; FSDP2 training
    (trainers/sharding.py) needs ``FSDPModule.set_reduce_scatter_unused_params``. Each named with the torch version."""
    from torch.distributed.fsdp import FSDPModule

    from trainers.memory_plan import LiveTensorTracker, saved_activation_bytes

    version = f"torch {torch.__version__}"
    assert hasattr(FSDPModule, "set_reduce_scatter_unused_params"), (
        f"{version} has no FSDPModule.set_reduce_scatter_unused_params: FSDP2 training refuses to start")
    assert hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"), (
        f"{version} removed aten._scaled_dot_product_flash_attention_for_cpu: the memory plan's attention probe")
    tensor = torch.empty(4, device="meta")
    assert tensor.untyped_storage() is tensor.untyped_storage(), (
        f"{version} no longer preserves a storage's Python object: the memory plan's storage keys are wrong")
    with LiveTensorTracker() as tracker:
        kept = torch.ones(256)
        del kept
    assert tracker.peak == 1024 and tracker.current == 0, f"{version}: TorchDispatchMode no longer sees allocations"
    query = torch.empty(1, 2, 8, 16, device="meta", requires_grad=True)
    kept_bytes = saved_activation_bytes(
        lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query), exclude=[query])
    assert kept_bytes > 0, f"{version}: the attention probe keeps nothing for backward"
