"""Fingerprints: short hashes of everything that changes a model's outputs, the keys of every cache."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

__all__ = ["FINGERPRINT_CHUNK_BYTES", "model_fingerprint", "processor_settings"]


def processor_settings(processor: Any, tokenizer: Any = None) -> dict[str, Any]:
    """What a processor contributes to a model's outputs: its saved settings (``to_dict``: image processor, image
    rule...), its chat template and a hash of its tokenizer (vocabulary, merges, special tokens)."""
    settings: dict[str, Any] = {}
    if processor is None:
        return settings
    tokenizer = tokenizer or getattr(processor, "tokenizer", None)
    try:
        settings["processor"] = processor.to_dict()
    except Exception:  # noqa: BLE001 - a processor that cannot describe itself: fall back to its parts
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None and hasattr(image_processor, "to_dict"):
            settings["image_processor"] = image_processor.to_dict()
    settings["chat_template"] = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # set by each call (padding=True...), not by the tokenizer
            state.pop(transient, None)
        settings["tokenizer"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    elif tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        settings["tokenizer"] = hashlib.sha256(vocabulary.encode()).hexdigest()
    return settings


FINGERPRINT_CHUNK_BYTES = 64 * 2**20
"""Bytes hashed per step by `model_fingerprint`: the most it copies at once (from a GPU, or of a non-contiguous
tensor)."""


def _hash_tensor(tensor: torch.Tensor, chunk_bytes: int | None = None) -> str:
    """SHA-256 of every byte of ``tensor`` in row-major order (the same for any memory layout and chunk size), read
    ``chunk_bytes`` (default `FINGERPRINT_CHUNK_BYTES`) at a time: a contiguous tensor is hashed in place on the CPU,
    a GPU tensor is copied to the CPU one chunk at a time, a non-contiguous one made contiguous one block of rows at
    a time."""
    chunk_bytes = chunk_bytes or FINGERPRINT_CHUNK_BYTES
    if tensor.device.type == "meta":
        raise ValueError("a weight is on the meta device (offloaded or not loaded): its values cannot be "
                         "fingerprinted; load the model fully onto a device before mining.")
    digest = hashlib.sha256()
    tensor = tensor.detach()
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    if tensor.numel() == 0:
        return digest.hexdigest()
    if tensor.is_contiguous():
        blocks = tensor.reshape(-1)
        step = max(1, chunk_bytes // tensor.element_size())
    else:
        blocks = tensor
        step = max(1, chunk_bytes // max(1, tensor[0].numel() * tensor.element_size()))
    for start in range(0, blocks.shape[0], step):
        chunk = blocks[start : start + step].contiguous().to("cpu").reshape(-1)
        digest.update(chunk.view(torch.uint8).numpy())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, *extra: Any, workers: int | None = None) -> str:
    """A short hash of a model's config, attention kernel, every byte of every weight and buffer (with its name,
    dtype and shape), plus any extra settings that change its outputs.

    Two checkpoints of one architecture that differ in a single value get different fingerprints. Tensors are hashed
    in chunks of `FINGERPRINT_CHUNK_BYTES` (no second copy of the model in memory; GPU tensors are copied to the CPU
    chunk by chunk), on ``workers`` threads (hashlib releases the GIL; default: up to 8, one per CPU core); a tied
    weight is hashed once. Cost: one pass over the weights at SHA-256 speed, measured at 2.3 GB/s per thread on an
    AMD EPYC core with SHA extensions (1.96 GB of Qwen2-VL-2B-shaped bf16 tensors in 0.86 s, no extra memory): about
    2 s for a 2B bf16 model and 7 s for a 7B one on one thread, once per run and process.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update((config.to_json_string() if config is not None else type(model).__name__).encode())
    digest.update(str(getattr(config, "_attn_implementation", None)).encode())
    state = sorted(model.state_dict().items())
    first_name: dict[tuple, str] = {}
    to_hash: list[tuple[str, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    for name, tensor in state:
        if tensor.device.type != "meta":
            identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                        tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if identity in first_name:
                aliases[name] = first_name[identity]
                continue
            first_name[identity] = name
        to_hash.append((name, tensor))
    workers = workers or min(8, os.cpu_count() or 1)
    if workers > 1 and len(to_hash) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            hashes = dict(zip((name for name, _ in to_hash), pool.map(lambda item: _hash_tensor(item[1]), to_hash)))
    else:
        hashes = {name: _hash_tensor(tensor) for name, tensor in to_hash}
    for name, tensor in state:
        value = f"same as {aliases[name]}" if name in aliases else hashes[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{value}\n".encode())
    digest.update(json.dumps(extra, default=str, sort_keys=True).encode())
    return digest.hexdigest()[:16]
