"""Embed reference rows with vLLM and compare with the UniME-V2 package's embeddings (runs in the vLLM venv).

    $VLLM_VENV/bin/python parity/vllm/parity_embed.py --model EXPORTED --reference REF.json [--mode parity|alarm]

EXPORTED is a folder written by ``modeling_unime.export.vllm`` (its ``unime_vllm.json`` gives the hf_overrides and
the pooler); REF.json is written by ``parity/vllm/check_embed.py`` in the package's environment: one entry per row
with the prompt `UniMEV2Processor.format_prompt` builds (ONE image token: vLLM expands it), the chat messages of the
same row, the image file (already resized under the checkpoint's image_resize) and the package's embedding.

``--mode parity``: vLLM as the export says (``runner="pooling", convert="embed"``, the recorded ``hf_overrides``).
Every row is embedded twice: from the prompt string, and from the chat messages rendered by vLLM's own chat path
(the folder's chat template, content format "auto", as ``/v1/embeddings`` does); the rendered prompt must equal the
reference prompt and both embeddings must equal the package's to ``--atol``.

``--mode alarm``: the same rows WITHOUT the recorded position override. Stock vLLM gives image tokens 3-D M-RoPE
positions, the package (image_position_rule "vision_start_only") text positions, so image rows must differ by more
than ``--alarm_min`` while text rows stay equal. If image rows come out equal, vLLM's behaviour changed (the override
may have become unnecessary or harmful): the check fails and says so.

Prints max |diff| per modality and, as its last line, one JSON object with the results. Exit status 0 = pass.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _image_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _messages(row: dict) -> list[dict]:
    """The row as one user turn: the image, then the instruction, then the text (as a client would send them)."""
    content: list[dict] = []
    if row["image"]:
        content.append({"type": "image_url", "image_url": {"url": _image_url(row["image"])}})
    for text in (row["instruction"], row["text"]):
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _max_diff(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by modeling_unime.export.vllm")
    parser.add_argument("--reference", required=True, help="reference JSON written by check_embed.py")
    parser.add_argument("--mode", choices=("parity", "alarm"), default="parity")
    parser.add_argument("--atol", type=float, default=1e-4, help="parity tolerance (float32)")
    parser.add_argument("--alarm_min", "--alarm-min", type=float, default=1e-3,
                        help="alarm mode: image rows must differ by more than this without the override")
    parser.add_argument("--max_model_len", "--max-model-len", type=int, default=4096)
    args = parser.parse_args()

    from PIL import Image
    from vllm import LLM
    from vllm.config.pooler import PoolerConfig
    from vllm.renderers.params import ChatParams

    model_dir = Path(args.model)
    metadata = json.loads((model_dir / "unime_vllm.json").read_text())
    reference = json.loads(Path(args.reference).read_text())
    rows = reference["rows"]
    overrides = metadata["hf_overrides"] or None
    if args.mode == "alarm":
        if not overrides:
            print("alarm mode needs an export with a position override (a Qwen2-VL vision_start_only embedder)")
            return 2
        overrides = None

    llm = LLM(
        model=str(model_dir),
        runner=metadata["runner"],
        convert=metadata["convert"],
        hf_overrides=overrides,
        pooler_config=PoolerConfig(**metadata["pooler_config"]),
        dtype="float32",
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_model_len,
        limit_mm_per_prompt={"image": 1},
        seed=0,
    )

    images = {row["image"]: Image.open(row["image"]).convert("RGB") for row in rows if row["image"]}
    prompts = []
    for row in rows:
        prompt = {"prompt": row["prompt"]}
        if row["image"]:
            prompt["multi_modal_data"] = {"image": images[row["image"]]}
        prompts.append(prompt)
    from_prompts = [output.outputs.embedding for output in llm.embed(prompts, use_tqdm=False)]

    # The chat path of /v1/embeddings: the folder's chat template, content format detected by vLLM.
    # The server passes tokenize=False (as here) and the request's add_generation_prompt (default False).
    chat_params = ChatParams(chat_template=None, chat_template_content_format="auto",
                             chat_template_kwargs={"add_generation_prompt": False, "tokenize": False})
    rendered, chat_prompts = [], []
    for row in rows:
        _, prompt = llm.renderer.render_messages(_messages(row), chat_params)
        text = prompt.get("prompt")
        if text is None and "prompt_token_ids" in prompt:
            text = llm.get_tokenizer().decode(prompt["prompt_token_ids"])
        rendered.append(text)
        chat_prompts.append(prompt)
    from_chat = [output.outputs.embedding for output in llm.embed(chat_prompts, use_tqdm=False)]

    results: dict = {"backbone": reference["backbone"], "mode": args.mode, "overrides": overrides,
                     "rows": [], "by_modality": {}, "failures": []}
    for row, prompt_embedding, chat_embedding, chat_prompt in zip(rows, from_prompts, from_chat, rendered):
        entry = {
            "name": row["name"],
            "modality": row["modality"],
            "diff_prompt": _max_diff(prompt_embedding, row["embedding"]),
            "diff_chat": _max_diff(chat_embedding, row["embedding"]),
            "chat_prompt_equal": chat_prompt == row["prompt"],
        }
        results["rows"].append(entry)
        if not entry["chat_prompt_equal"]:
            results["failures"].append(
                f"{row['name']}: vLLM rendered the chat messages as {chat_prompt!r}, the package's prompt is "
                f"{row['prompt']!r}"
            )
    for modality in ("text", "image", "image+text"):
        entries = [entry for entry in results["rows"] if entry["modality"] == modality]
        if entries:
            results["by_modality"][modality] = max(max(e["diff_prompt"], e["diff_chat"]) for e in entries)

    label = "vLLM vs UniMEV2Model" + (" WITHOUT the position override" if args.mode == "alarm" else "")
    print(f"\n[{reference['backbone']}] {label} (max |diff|, prompt string / chat messages):")
    for entry in results["rows"]:
        print(f"  {entry['modality']:<11} {entry['name']:<22} {entry['diff_prompt']:.2e} / {entry['diff_chat']:.2e}"
              f"{'' if entry['chat_prompt_equal'] else '  CHAT PROMPT DIFFERS'}")
    for modality, value in results["by_modality"].items():
        print(f"  max {modality:<11} {value:.2e}")

    by = results["by_modality"]
    if args.mode == "parity":
        for modality, value in by.items():
            if not value <= args.atol:
                results["failures"].append(f"{modality} rows differ from the package by {value:.3g} > {args.atol:g}")
    else:
        if by.get("text", 0.0) > args.atol:
            results["failures"].append(f"text rows differ by {by['text']:.3g} without the override: text positions "
                                       "should not depend on it")
        image_diff = min(by.get("image", 0.0), by.get("image+text", 0.0))
        results["alarm_image_diff"] = image_diff
        if not image_diff > args.alarm_min:
            results["failures"].append(
                f"ALARM: vLLM's behaviour changed. Without the position override, image rows now equal the package's "
                f"embeddings (max |diff| {image_diff:.3g} <= {args.alarm_min:g}), whereas stock vLLM gave image "
                "tokens 3-D M-RoPE positions (the released Qwen2-VL 2B was off by 0.244). Check how this vLLM "
                "positions <|image_pad|> tokens without <|vision_start|> before keeping or dropping the "
                "hf_overrides that modeling_unime.export.vllm writes."
            )
    results["ok"] = not results["failures"]
    for failure in results["failures"]:
        print("FAIL:", failure)
    print(json.dumps(results), flush=True)
    _shutdown(llm)
    return 0 if results["ok"] else 1


def _shutdown(llm) -> None:
    """Stop the engine core and its worker now, with time to exit cleanly. Left to interpreter exit, vLLM 0.32 (CPU)
    gives the engine core 5 s, force-kills it on a busy machine, and the main process then sometimes aborts
    ("terminate called without an active exception", exit -6) after the results were printed."""
    try:
        llm.llm_engine.engine_core.shutdown(timeout=60)
    except Exception as error:  # a vLLM without this API: fall back to its own teardown
        print(f"engine shutdown: {error!r}", file=sys.stderr)


if __name__ == "__main__":  # vLLM spawns worker processes: everything above runs only in the main one
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The engine is already shut down; skip the interpreter teardown whose C++ threads can abort (see _shutdown).
    os._exit(code)
