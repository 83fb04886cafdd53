"""Convert a checkpoint in the authors' layout into a self-contained UniME-V2 checkpoint.

    python -m modeling_unime.convert SRC DST [--base-model ID] [--repo-id ORG/NAME] [--verify]

SRC is a folder or Hub repo id of a plain Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision checkpoint (e.g. the authors'
TianchengGu/UniME-V2-Qwen2VL-2B). DST receives the config with ``auto_map``, the model code, the weights, the
processor files and a model card, so that ``AutoModel.from_pretrained(DST, trust_remote_code=True)`` works without
this package.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from . import UniMEV2Model, UniMEV2Processor
from .card import write_model_card

PROBE_TEXTS = ["A man is crossing the street with a red car parked nearby.", "a photo of a dog"]


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    base_model: str | None = None,
    repo_id: str | None = None,
    verify: bool = False,
    **load_kwargs,
) -> Path:
    """Load ``source`` (every backbone weight must load), save it to ``destination`` as a UniME-V2 checkpoint.

    With ``verify=True`` the written checkpoint is loaded back and must embed probe texts identically.
    """
    model, loading_info = UniMEV2Model.from_pretrained(source, output_loading_info=True, **load_kwargs)
    if loading_info["missing_keys"]:
        missing = sorted(loading_info["missing_keys"])
        raise ValueError(
            f"{len(missing)} backbone weights of {os.fspath(source)!r} were not found under any known key layout "
            f"(first: {missing[:5]}); the checkpoint is not a supported Qwen2-VL/Qwen2.5-VL/LLaVA-OneVision layout."
        )
    processor = UniMEV2Processor.from_pretrained(source)
    destination = Path(destination)
    model.save_pretrained(destination)
    processor.save_pretrained(destination)
    name = os.fspath(source).rstrip("/")
    write_model_card(
        destination,
        model_name=repo_id.split("/")[-1] if repo_id else destination.name,
        repo_id=repo_id or destination.name,
        base_model=base_model or name,
        backbone_type=model.config.backbone_type,
        embedding_dim=model.config.hidden_size,
        training=f"Converted from `{name}` (the authors' release) by `python -m modeling_unime.convert`; "
        "no further training.",
    )
    if verify:
        reloaded = UniMEV2Model.from_pretrained(destination, **load_kwargs)
        before = model.encode(texts=PROBE_TEXTS, processor=processor)
        after = reloaded.encode(texts=PROBE_TEXTS, processor=UniMEV2Processor.from_pretrained(destination))
        if not torch.equal(before, after):
            raise RuntimeError(f"The converted checkpoint embeds differently (max |diff| {(before - after).abs().max()}).")
    return destination


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="folder or Hub repo id in the authors' layout")
    parser.add_argument("destination", help="output folder")
    parser.add_argument("--base-model", default=None, help="base_model recorded in the card (default: SOURCE)")
    parser.add_argument("--repo-id", default=None, help="the Hub repo id the card's usage snippet should name")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--verify", action="store_true", help="reload the output and compare probe embeddings")
    args = parser.parse_args(argv)
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    path = convert_checkpoint(
        args.source, args.destination, base_model=args.base_model, repo_id=args.repo_id, verify=args.verify, dtype=dtype
    )
    print(f"UniME-V2 checkpoint written to {path}")


if __name__ == "__main__":
    main()
