"""Models for evaluation: an embedder and an optional reranker from a folder, a Hub repo id or ``tiny:<family>``,
read straight onto this process's device (`modeling_unime.recipe_engine`), with the image rule of the published
numbers set on their processors."""

from __future__ import annotations

from typing import Any

import torch

from modeling_unime.placement import placement, process_state
from modeling_unime.processing_unime import canonical_image_resize
from modeling_unime.recipe_engine import RecipeRun


def check_image_resize(policy: str) -> str:
    """``policy`` unchanged when it is a valid resize policy (`modeling_unime.processing_unime.canonical_image_resize`
    decides), else its ValueError listing the valid ones.

    >>> check_image_resize("authors-eval"), check_image_resize("max_pixels:235200")
    ('authors-eval', 'max_pixels:235200')
    """
    canonical_image_resize(policy)
    return policy


def apply_image_resize(model: Any, policy: str | None, key: str = "image_resize") -> None:
    """Set ``model.processor.image_resize = policy`` (the processor then resizes every image it loads).

    ``None`` leaves the processor as it is. A processor without an ``image_resize`` attribute (the package before the
    resize policy existed) accepts only ``"native"``, which changes nothing; anything else is an error, because the
    published numbers were measured on resized images and a silent native-size run would not be comparable.
    """
    if policy is None:
        return
    check_image_resize(policy)
    processor = model.processor
    if not hasattr(processor, "image_resize"):
        if policy == "native":
            return
        raise ValueError(
            f"{key}: {policy!r} was asked for, but the processor ({type(processor).__name__}) has no 'image_resize' "
            "attribute: this version of UniMEV2Processor cannot resize images. Update the package, or set "
            f"`{key}: native` (flag --{key} native) to evaluate at native image sizes, knowing that the released "
            "checkpoints' numbers were measured with every image resized (authors-eval: 1344x1344)."
        )
    processor.image_resize = policy


def _load(kind: str, spec: str, dtype: str | torch.dtype | None, attn_implementation: str | None,
          device: torch.device | str | None) -> Any:
    # Read straight onto the process's device: 8 processes do not each hold a 7B model in host memory first.
    run = RecipeRun(process_state(), placement(dtype, attn_implementation, device=device))
    model, _ = run.load(kind, spec)
    return model.eval()


def load_embedder(
    spec: str,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = "auto",
    device: torch.device | str | None = None,
    image_resize: str | None = None,
) -> Any:
    """A UniME-V2 embedder from a folder / repo id, or a tiny random one (``tiny:<family>``), ready to ``encode``.

    It is loaded with ``dtype`` and ``attn_implementation`` resolved by `modeling_unime.placement.placement`
    (``auto``: bf16 and flash-attention / sdpa on a GPU, float32 and sdpa on CPU) and moved to ``device`` (default:
    this process's device under ``accelerate launch``). ``image_resize`` is set on its processor
    (`apply_image_resize`).

    >>> model = load_embedder("tiny:qwen2_vl")
    >>> model.device.type, model.dtype
    ('cpu', torch.float32)
    """
    model = _load("embedder", spec, dtype, attn_implementation, device)
    apply_image_resize(model, image_resize, "image_resize")
    return model


def load_reranker(
    spec: str | None,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = "auto",
    device: torch.device | str | None = None,
    image_resize: str | None = None,
) -> Any:
    """A UniME-V2 reranker as `load_embedder` loads an embedder (``tiny:<family>`` builds a tiny Qwen2.5-VL-style
    one); None when ``spec`` is None. ``image_resize`` is set on its processor (``reranker_image_resize``)."""
    if spec is None:
        return None
    model = _load("reranker", spec, dtype, attn_implementation, device)
    apply_image_resize(model, image_resize, "reranker_image_resize")
    return model


__all__ = ["apply_image_resize", "check_image_resize", "load_embedder", "load_reranker"]
