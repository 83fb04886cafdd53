"""Model cards made from the ``model_card.md`` template (Hub metadata, usage, training, evaluation, citation)."""

from __future__ import annotations

import os
from pathlib import Path
from string import Template
from typing import Any

TEMPLATE_NAME = "model_card.md"
DEFAULT_TAGS = ("unime-v2", "multimodal-embedding", "sentence-similarity", "image-text-retrieval")


def find_card_template() -> Path:
    """The template shipped inside the package (wheel install) or at the repository root (source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / TEMPLATE_NAME, here.parent / TEMPLATE_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{TEMPLATE_NAME} was found neither in {here} nor in {here.parent}; reinstall unime-v2 or run from a checkout."
    )


def render_model_card(
    *,
    model_name: str,
    repo_id: str | None = None,
    base_model: str | None = None,
    backbone_type: str = "qwen2_vl",
    embedding_dim: int | str = "?",
    license: str = "mit",
    training: str | None = None,
    evaluation: str | None = None,
    extra_tags: list[str] | None = None,
) -> str:
    """Fill the model card template.

    Example:
        >>> card = render_model_card(model_name="my-unime", base_model="Qwen/Qwen2-VL-2B-Instruct", embedding_dim=1536)
        >>> card.splitlines()[1]
        'library_name: transformers'
    """
    fields: dict[str, Any] = {
        "model_name": model_name,
        "repo_id": repo_id or model_name,
        "base_model": base_model or "unknown",
        "backbone_type": backbone_type,
        "embedding_dim": embedding_dim,
        "license": license,
        "training": training or "Not recorded for this checkpoint.",
        "evaluation": evaluation or "Not recorded for this checkpoint.",
        "tags": "\n".join(f"- {tag}" for tag in [*DEFAULT_TAGS, backbone_type, *(extra_tags or [])]),
    }
    return Template(find_card_template().read_text(encoding="utf-8")).substitute(fields)


def write_model_card(directory: str | os.PathLike, **fields: Any) -> Path:
    """Write ``README.md`` (the Hub model card) into ``directory``."""
    path = Path(directory) / "README.md"
    path.write_text(render_model_card(**fields), encoding="utf-8")
    return path
