"""vLLM embedding parity check, one command (run in the package's environment, not the vLLM one):

    python parity/vllm/check_embed.py [--workdir DIR] [--backbones qwen2_vl,llava_onevision,qwen3_vl] [--no_alarm]

1. builds tiny checkpoints with head_dim 32 (vLLM's CPU attention refuses 16): a Qwen2-VL written in the authors'
   plain layout (so its processor gets their evaluation rule, 1344x1344 images, and its image tokens the
   "vision_start_only" position rule), a LLaVA-OneVision and a Qwen3-VL saved as UniME-V2 checkpoints (Qwen3-VL:
   mrope_section [4, 6, 6], deepstack from both vision blocks, image tokens with its own 3-D M-RoPE positions);
2. exports each with ``modeling_unime.export.vllm.export_for_vllm``;
3. embeds text, image and image+text rows (with and without an instruction) with ``UniMEV2Model.encode`` and
   writes them, with each row's prompt, to a reference JSON (images saved already resized, as a client must send
   them);
4. runs ``parity_embed.py`` with the vLLM venv's python (``$UNIME_VLLM_VENV``, default
   ``~/.cache/unime-v2/vllm-venv``; build it with ``parity/vllm/build_venv.sh``): parity for every backbone, and
   for Qwen2-VL the alarm run without the position override, which must still differ (see parity_embed.py).
   Qwen3-VL and LLaVA-OneVision exports carry no override, so they get no alarm run.

Exits 0 when every check passes; prints the per-modality max |diff| and, last, one JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_VENV = Path.home() / ".cache" / "unime-v2" / "vllm-venv"
BACKBONES = ("qwen2_vl", "llava_onevision", "qwen3_vl")
ATOL = 1e-4          # float32 parity, vLLM against UniMEV2Model
ALARM_MIN = 1e-3     # image rows without the position override must differ by more than this
SHARPEN = 4.0        # q/k scaled as in testing.build_tiny_judge: random attention is nearly uniform, hiding positions


def vllm_python() -> Path:
    return Path(os.environ.get("UNIME_VLLM_VENV", DEFAULT_VENV)) / "bin" / "python"


def _sharpen(model) -> None:
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(SHARPEN)


def build_checkpoint(backbone_type: str, directory: Path) -> Path:
    """A tiny head_dim-32 checkpoint: Qwen2-VL in the authors' layout, LLaVA-OneVision and Qwen3-VL as UniME-V2
    checkpoints."""
    from modeling_unime.tiny import (
        build_tiny_causal_lm,
        build_tiny_processor,
        build_tiny_tokenizer,
        build_tiny_unime,
        save_in_authors_layout,
    )

    if backbone_type in ("llava_onevision", "qwen3_vl"):
        # Qwen3-VL: head_dim 32 gives mrope_section [4, 6, 6] (sums to head_dim / 2, see tiny._mrope_section).
        model, processor = build_tiny_unime(backbone_type, hidden_size=64, num_attention_heads=2)
        _sharpen(model)
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return directory
    tokenizer = build_tiny_tokenizer(backbone_type)
    model = build_tiny_causal_lm(backbone_type, tokenizer=tokenizer, hidden_size=64, num_attention_heads=2)
    _sharpen(model)
    # max_pixels admits the authors' 1344x1344 evaluation size, so the image processors do not resize again (PIL in
    # the package, torchvision in vLLM's transformers would resample differently).
    processor = build_tiny_processor(backbone_type, tokenizer, max_pixels=1344 * 1344)
    return save_in_authors_layout(model, processor, directory)


def _images():
    from PIL import Image, ImageDraw

    from modeling_unime.export.convert import probe_image

    square = Image.new("RGB", (56, 56), (240, 240, 230))
    draw = ImageDraw.Draw(square)
    draw.rectangle((6, 6, 26, 48), fill=(200, 30, 30))
    draw.ellipse((30, 10, 52, 40), fill=(30, 60, 200))
    return {"probe": probe_image(), "square": square}


def reference_rows(source: Path, workdir: Path, backbone_type: str) -> dict:
    """Rows embedded by ``UniMEV2Model.encode`` one at a time, with their prompts and (resized) image files."""
    from modeling_unime import UniMEV2Model, UniMEV2Processor
    from modeling_unime.export.convert import PROBE_INSTRUCTION, PROBE_QUESTION
    from modeling_unime.processing_unime import resize_image

    model = UniMEV2Model.from_pretrained(source).eval()
    processor = UniMEV2Processor.from_pretrained(source)
    # LLaVA-OneVision: a 56x56 image is one anyres tile plus the base image with no resampling anywhere. Qwen3-VL:
    # the 96x64 probe already has sides that are multiples of 32 (16-pixel patches merged 2x2), so no resampling.
    image_name = "square" if backbone_type == "llava_onevision" else "probe"
    image = _images()[image_name]
    resized = resize_image(image, processor.image_resize)
    image_path = workdir / f"{backbone_type}-{image_name}-{resized.width}x{resized.height}.png"
    resized.save(image_path)
    specs = [
        ("text", "text", "A man is crossing the street with a red car parked nearby.", None, False),
        ("text+instruction", "text", "a photo of a dog", "Represent the given text for retrieval.", False),
        ("image", "image", None, None, True),
        ("image+instruction", "image", None, PROBE_INSTRUCTION, True),
        ("mmeb-question", "image+text", PROBE_QUESTION, None, True),
        ("question+instruction", "image+text", "What colour is the shape?",
         "Represent the given image with the following question:", True),
    ]
    rows = []
    for name, modality, text, instruction, has_image in specs:
        embedding = model.encode(texts=[text], images=[image if has_image else None], instruction=instruction,
                                 processor=processor)[0]
        rows.append({
            "name": name,
            "modality": modality,
            "text": text,
            "instruction": instruction,
            "image": str(image_path) if has_image else None,
            "prompt": processor.format_prompt(text, has_image, instruction),
            "embedding": embedding.tolist(),
        })
    return {"backbone": backbone_type, "image_resize": processor.image_resize,
            # The rule applies to Qwen2-VL / Qwen2.5-VL only (Qwen3-VL always gives image tokens 3-D positions).
            "image_position_rule": getattr(model.config, "image_position_rule", None)
            if backbone_type in ("qwen2_vl", "qwen2_5_vl") else None, "rows": rows,
            "sensitivity": sensitivity(model, processor, image, rows) if backbone_type == "qwen3_vl" else None}


def sensitivity(model, processor, image, rows: list[dict]) -> dict:
    """Qwen3-VL (no alarm run: its export has no override to leave out): how far the image+instruction row moves
    when its image tokens get text positions instead of 3-D M-RoPE ones, and when the deepstack features are
    dropped. Both must exceed ALARM_MIN, or the tiny checkpoint could not tell a vLLM that gets them wrong."""
    import torch

    row = next(row for row in rows if row["name"] == "image+instruction")
    expected = torch.tensor(row["embedding"])
    batch = processor(texts=[row["text"]], images=[image], instruction=row["instruction"])
    length = batch["input_ids"].shape[1]
    text_positions = torch.arange(length).view(1, 1, length).expand(3, 1, length)
    mergers = model.model.visual.deepstack_merger_list
    saved = [(merger.linear_fc2.weight.clone(), merger.linear_fc2.bias.clone()) for merger in mergers]
    with torch.inference_mode():
        positions = model(**batch, position_ids=text_positions).embeddings[0]
        for merger in mergers:
            merger.linear_fc2.weight.zero_()
            merger.linear_fc2.bias.zero_()
        no_deepstack = model(**batch).embeddings[0]
        for merger, (weight, bias) in zip(mergers, saved):
            merger.linear_fc2.weight.copy_(weight)
            merger.linear_fc2.bias.copy_(bias)
    return {"text_positions": float((positions - expected).abs().max()),
            "no_deepstack": float((no_deepstack - expected).abs().max())}


def run_parity(python: Path, export: Path, reference: Path, mode: str, timeout: int = 900) -> dict:
    command = [str(python), str(HERE / "parity_embed.py"), "--model", str(export), "--reference", str(reference),
               "--mode", mode, "--atol", str(ATOL), "--alarm_min", str(ALARM_MIN)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    env.pop("PYTHONPATH", None)  # the vLLM venv must not see this environment's packages
    started = time.time()
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(HERE))
    lines = process.stdout.strip().splitlines()
    # The result is parity_embed.py's last JSON line (vLLM may log after it while shutting down).
    last = next((line for line in reversed(lines) if line.startswith('{"backbone"')), "")
    # parity_embed.py's report: from its "[backbone] ..." header to the JSON line (vLLM's own logs left out).
    header = next((index for index, line in enumerate(lines) if line.startswith("[") and "vLLM vs" in line), None)
    if header is not None:
        end = lines.index(last) if last in lines else len(lines)
        print("\n".join(line for line in lines[header:end] if line.startswith(("[", "  ", "FAIL"))))
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        print(process.stdout[-4000:])
        print(process.stderr[-6000:], file=sys.stderr)
        result = {"ok": False, "failures": [f"parity_embed.py ({mode}) exited {process.returncode} without a result"]}
    result["seconds"] = round(time.time() - started, 1)
    result["returncode"] = process.returncode
    if process.returncode != 0 and result.get("ok"):
        result["ok"] = False
        result.setdefault("failures", []).append(f"parity_embed.py exited {process.returncode}")
        print(process.stderr[-2000:], file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where checkpoints and exports go (default: a temp dir)")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--no_alarm", "--no-alarm", action="store_true",
                        help="skip the run without the position override")
    args = parser.parse_args(argv)

    python = vllm_python()
    if not python.exists():
        print(f"No vLLM venv at {python.parent.parent}: run `bash parity/vllm/build_venv.sh` (or set UNIME_VLLM_VENV).")
        return 2
    import torch

    torch.set_num_threads(1)
    from modeling_unime.export.vllm import export_for_vllm

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="unime-vllm-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"ok": True, "atol": ATOL, "alarm_min": ALARM_MIN, "results": []}
    for backbone_type in args.backbones.split(","):
        source = build_checkpoint(backbone_type, workdir / f"{backbone_type}-source")
        export = export_for_vllm(source, workdir / f"{backbone_type}-vllm")
        reference = workdir / f"{backbone_type}-reference.json"
        rows = reference_rows(source, workdir, backbone_type)
        reference.write_text(json.dumps(rows))
        if rows["sensitivity"] is not None:
            weak = {key: value for key, value in rows["sensitivity"].items() if not value > ALARM_MIN}
            summary["results"].append({"backbone": backbone_type, "mode": "sensitivity",
                                       "by_modality": rows["sensitivity"], "alarm_image_diff": None,
                                       "ok": not weak, "seconds": 0.0,
                                       "failures": [f"the tiny checkpoint barely moves without {key} ({value:.3g} <= "
                                                    f"{ALARM_MIN:g}): parity would not show a vLLM that gets it wrong"
                                                    for key, value in weak.items()]})
            summary["ok"] = summary["ok"] and not weak
        metadata = json.loads((export / "unime_vllm.json").read_text())
        modes = ["parity"] + (["alarm"] if metadata["hf_overrides"] and not args.no_alarm else [])
        for mode in modes:
            result = run_parity(python, export, reference, mode)
            summary["results"].append({key: result.get(key) for key in
                                       ("backbone", "mode", "by_modality", "alarm_image_diff", "ok", "failures",
                                        "seconds")} | {"backbone": backbone_type, "mode": mode})
            summary["ok"] = summary["ok"] and bool(result.get("ok"))
    print("\nSummary (max |diff| per modality; parity tolerance %g, alarm and sensitivity need > %g):"
          % (ATOL, ALARM_MIN))
    for result in summary["results"]:
        modalities = ", ".join(f"{key} {value:.2e}" for key, value in (result["by_modality"] or {}).items())
        print(f"  {result['backbone']:<16} {result['mode']:<11} {'ok ' if result['ok'] else 'FAIL'} {modalities} "
              f"({result['seconds']} s)")
        for failure in result["failures"] or []:
            print(f"    {failure}")
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
