"""LoRA / DoRA setup with the authors' defaults, and saving trained embedders in the AutoModel format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from modeling_unime.export.card import write_model_card
from modeling_unime.sentence_unime import add_sentence_transformers_files

# The authors' Embedding/src/model.py: DoRA on q/k/v/o/down_proj of the language model only; the vision tower stays
# frozen (arXiv 2510.13515, implementation details: LoRA rank 16).
LANGUAGE_MODEL_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|down_proj)"
FINETUNING_METHODS = ("dora", "lora", "full")
# The reranker's LoRA (arXiv 2510.13515, implementation details: r 128, alpha 256, dropout 0.05) on the language model;
# the vision tower stays frozen.
RERANKER_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RERANKER_ADAPTER = dict(r=128, alpha=256, dropout=0.05, target_modules=RERANKER_TARGETS, init_lora_weights=True)


def adapter_config(
    method: str = "dora",
    r: int = 16,
    alpha: int = 64,
    dropout: float = 0.1,
    target_modules: str | list[str] = LANGUAGE_MODEL_TARGETS,
    init_lora_weights: str | bool = "gaussian",
) -> LoraConfig:
    """The authors' adapter (``Embedding/src/model.py``, ``Embedding/src/arguments.py``): DoRA, rank 16, alpha 64,
    dropout 0.1, gaussian init, language-model projections only.

    Example:
        >>> config = adapter_config()
        >>> config.use_dora, config.r, config.lora_alpha, config.lora_dropout
        (True, 16, 64, 0.1)
    """
    if method not in ("dora", "lora"):
        raise ValueError(f"method={method!r}: use 'dora' or 'lora' (or finetuning='full' without an adapter).")
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        use_dora=method == "dora",
        init_lora_weights=init_lora_weights,
        bias="none",
    )


def prepare_for_training(model: torch.nn.Module, finetuning: str = "dora", **adapter_kwargs: Any) -> torch.nn.Module:
    """Wrap ``model`` with a DoRA/LoRA adapter (``finetuning="dora"|"lora"``) or train every weight (``"full"``)."""
    if finetuning not in FINETUNING_METHODS:
        raise ValueError(f"finetuning={finetuning!r}: use one of {FINETUNING_METHODS}.")
    if finetuning == "full":
        model.requires_grad_(True)
        return model
    return get_peft_model(model, adapter_config(finetuning, **adapter_kwargs))


def save_checkpoint(
    model: torch.nn.Module,
    processor: Any,
    output_dir: str | os.PathLike,
    merge: bool = True,
    card: dict[str, Any] | None = None,
) -> Path:
    """Save a trained embedder or reranker: merged into a UniME-V2 checkpoint that carries its code (``merge=True``), or
    the adapter alone (``merge=False``, load it with ``peft.PeftModel.from_pretrained``); with the processor and a model
    card (`modeling_unime.export.card.write_model_card`). A merged embedder also gets the sentence-transformers files
    (`modeling_unime.sentence_unime.add_sentence_transformers_files`)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        if merge:
            model = model.merge_and_unload()
        else:
            model.save_pretrained(output_dir)
    if not isinstance(model, PeftModel):
        model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if base.config.model_type == "unime_v2" and not isinstance(model, PeftModel):
        add_sentence_transformers_files(output_dir)
    fields = dict(
        kind="reranker" if base.config.model_type == "unime_v2_reranker" else "embedder",
        model_name=output_dir.name,
        backbone_type=base.config.backbone_type,
        embedding_dim=base.config.hidden_size,
        base_model=base.config.name_or_path or None,
        image_resize=getattr(processor, "image_resize", "native"),
        image_position_rule=getattr(base.config, "image_position_rule", None),
    )
    write_model_card(output_dir, **{**fields, **(card or {})})
    return output_dir


__all__ = [
    "adapter_config",
    "prepare_for_training",
    "save_checkpoint",
    "LANGUAGE_MODEL_TARGETS",
    "RERANKER_ADAPTER",
    "FINETUNING_METHODS",
]
