"""The vLLM export (modeling_unime.export.vllm) and, opt-in, its parity with vLLM itself.

Default run (no vLLM needed): the exported folder names the stock architecture and backbone model_type, holds the
stock class's key names (transformers' stock class loads it with no missing or unexpected weight and embeds text
rows like UniMEV2Model), and its chat template renders exactly `UniMEV2Processor.format_prompt`.

Opt-in (``-m vllm``, or ``UNIME_VLLM_CHECK=1``; needs the venv of ``parity/vllm/build_venv.sh``): runs
``parity/vllm/check_embed.py``, which embeds text, image and image+text rows with vLLM and with the package and
compares them, plus the alarm that fails if stock vLLM stops giving image tokens 3-D positions.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open

from modeling_unime import UniMEV2Model, UniMEV2Processor
from modeling_unime.export.convert import PROBE_INSTRUCTION, PROBE_QUESTION
from modeling_unime.export.vllm import CHAT_TEMPLATE_FILE, METADATA_FILE, STOCK_ARCHITECTURES, export_for_vllm
from modeling_unime.export.vllm import main as export_main
from modeling_unime.tiny import (
    authors_state_dict,
    build_tiny_causal_lm,
    build_tiny_processor,
    build_tiny_tokenizer,
    build_tiny_unime,
    save_in_authors_layout,
)

REPO = Path(__file__).resolve().parent.parent
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl")
TEXTS = ["A man is crossing the street with a red car parked nearby.", "a photo of a dog"]
# (text, has_image, instruction): text, image and image+text rows, with and without an instruction.
PROMPT_ROWS = [
    (TEXTS[0], False, None),
    (TEXTS[1], False, "Represent the given text for retrieval."),
    (None, True, None),
    (None, True, PROBE_INSTRUCTION),
    (PROBE_QUESTION, True, None),
    ("What colour is the shape?", True, "Represent the given image with the following question:"),
    ("<|image_1|> a caption after the image", True, None),
]


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory):
    """(backbone_type, UniME-V2 source folder, exported folder)."""
    backbone_type = request.param
    model, processor = build_tiny_unime(backbone_type)
    source = tmp_path_factory.mktemp(f"{backbone_type}-unime")
    model.save_pretrained(source)
    processor.save_pretrained(source)
    destination = export_for_vllm(source, tmp_path_factory.mktemp(f"{backbone_type}-vllm") / "export")
    return backbone_type, source, destination


def _stock_class(backbone_type):
    return getattr(transformers, STOCK_ARCHITECTURES[backbone_type])


def _keys(folder: Path) -> set[str]:
    keys = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys.update(handle.keys())
    return keys


def test_config_names_the_stock_architecture_and_backbone(exported):
    backbone_type, _, destination = exported
    config = json.loads((destination / "config.json").read_text())
    assert config["architectures"] == [STOCK_ARCHITECTURES[backbone_type]]
    assert config["model_type"] == backbone_type
    assert "auto_map" not in config and "backbone_config" not in config
    assert "auto_map" not in (destination / "processor_config.json").read_text()
    metadata = json.loads((destination / METADATA_FILE).read_text())
    assert (metadata["runner"], metadata["convert"]) == ("pooling", "embed")
    assert metadata["pooler_config"] == {"pooling_type": "LAST", "use_activation": True}
    assert metadata["architecture"] == STOCK_ARCHITECTURES[backbone_type]
    if backbone_type in ("llava_onevision", "qwen3_vl"):
        assert metadata["hf_overrides"] == {}
    else:  # the released Qwen embedders' rule: plain RoPE = text positions for image tokens (see position_overrides)
        assert metadata["image_position_rule"] == "vision_start_only"
        assert metadata["hf_overrides"] == {
            "text_config": {
                "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "rope_scaling": None
            }
        }
        assert "--hf-overrides" in metadata["server_command"]


def server_flags(command: str) -> dict[str, str]:
    """``--flag value`` pairs of the server command, as a shell would split it."""
    parts = shlex.split(command)
    return {part: parts[index + 1] for index, part in enumerate(parts) if part.startswith("--")}


def offline_from_server(command: str) -> dict:
    """What ``LLM(...)`` must be given to run as the server command runs: the same runner, converter, pooler and
    hf_overrides (None when the command has none)."""
    flags = server_flags(command)
    overrides = flags.get("--hf-overrides")
    return {"runner": flags["--runner"], "convert": flags["--convert"],
            "hf_overrides": json.loads(overrides) if overrides else None,
            "pooler_config": json.loads(flags["--pooler-config"])}


def test_offline_invocation_runs_as_the_server_command(exported):
    """The offline invocation (``unime_vllm.json`` "offline": the LLM(...) keyword arguments) carries the same
    hf_overrides and pooler as the server command; for Qwen embedders under vision_start_only that is plain RoPE with
    the backbone's own theta."""
    backbone_type, source, destination = exported
    metadata = json.loads((destination / METADATA_FILE).read_text())
    assert metadata["offline"] == offline_from_server(metadata["server_command"])
    if backbone_type in ("llava_onevision", "qwen3_vl"):
        assert metadata["offline"]["hf_overrides"] is None
        return
    text_config = json.loads((source / "config.json").read_text())["backbone_config"]["text_config"]
    theta = (text_config.get("rope_parameters") or {}).get("rope_theta", text_config.get("rope_theta"))
    assert metadata["offline"]["hf_overrides"] == {
        "text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}, "rope_scaling": None}}


@pytest.mark.parametrize("settings", [{"image_position_rule": "all_images"}, {"normalize": False}])
def test_metadata_follows_the_checkpoints_position_rule_and_normalisation(tmp_path, settings):
    """An all_images checkpoint (image tokens already get 3-D positions, as stock vLLM gives them) needs no override
    and says so; a checkpoint that does not normalise must not get a normalising pooler, offline or served."""
    model, processor = build_tiny_unime("qwen2_vl")
    for key, value in settings.items():
        setattr(model.config, key, value)
    model.save_pretrained(tmp_path / "unime")
    processor.save_pretrained(tmp_path / "unime")
    metadata = json.loads((export_for_vllm(tmp_path / "unime", tmp_path / "vllm") / METADATA_FILE).read_text())
    rule = settings.get("image_position_rule", "vision_start_only")
    normalize = settings.get("normalize", True)
    assert metadata["image_position_rule"] == rule
    assert metadata["pooler_config"] == {"pooling_type": "LAST", "use_activation": normalize}
    assert metadata["offline"] == offline_from_server(metadata["server_command"])
    assert metadata["offline"]["pooler_config"]["use_activation"] is normalize
    if rule == "all_images":
        assert metadata["hf_overrides"] == {} and metadata["offline"]["hf_overrides"] is None
        assert "--hf-overrides" not in metadata["server_command"]
        assert not any("vision_start_only" in note for note in metadata["notes"])
    else:
        assert metadata["hf_overrides"] == metadata["offline"]["hf_overrides"] != {}


def test_key_names_are_the_stock_checkpoints(exported):
    """The names of the stock releases (Qwen2-VL, llava-hf LLaVA-OneVision, the authors' checkpoints), LM head left
    out (tied). For Qwen2-VL, transformers' own save_pretrained writes the same names; for LLaVA-OneVision it writes
    `vision_tower.embeddings.*`, which vLLM refuses, so the release names are checked here."""
    backbone_type, source, destination = exported
    stock = _stock_class(backbone_type)(UniMEV2Model.from_pretrained(source).config.backbone_config)
    release_names = {key for key in authors_state_dict(stock) if "lm_head" not in key}
    assert _keys(destination) == release_names
    if backbone_type == "llava_onevision":
        assert any(key.startswith("vision_tower.vision_model.") for key in release_names)
    else:
        stock.save_pretrained(destination.parent / "stock-save")
        assert _keys(destination) == _keys(destination.parent / "stock-save") - {"lm_head.weight"}


@torch.inference_mode()
def test_stock_class_loads_every_weight_and_embeds_text_like_unime(exported):
    backbone_type, source, destination = exported
    stock, info = _stock_class(backbone_type).from_pretrained(destination, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    stock.eval()
    unime = UniMEV2Model.from_pretrained(source).eval()
    processor = UniMEV2Processor.from_pretrained(source)
    expected = unime.encode(texts=TEXTS, processor=processor, batch_size=1)
    for row, text in enumerate(TEXTS):
        batch = processor(texts=[text])
        hidden = stock(**batch, output_hidden_states=True).hidden_states[-1][:, -1]
        actual = F.normalize(hidden.float(), dim=-1)[0]
        assert torch.allclose(actual, expected[row], atol=1e-5), float((actual - expected[row]).abs().max())


def _messages(text, has_image, instruction, image_part="image_url"):
    content = []
    if has_image:
        content.append({"type": "image"} if image_part == "image" else
                       {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
    content += [{"type": "text", "text": part} for part in (instruction, text) if part]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("image_part", ["image", "image_url"])
def test_chat_template_renders_the_embedding_prompt(exported, image_part):
    backbone_type, source, destination = exported
    processor = UniMEV2Processor.from_pretrained(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(destination)
    template = (destination / CHAT_TEMPLATE_FILE).read_text()
    assert tokenizer.chat_template == template
    # Also a text that carries the backbone's own image token where the image goes.
    for text, has_image, instruction in [*PROMPT_ROWS, (f"{processor.image_token}\nWhat is it?", True, None)]:
        expected = processor.format_prompt(text, has_image, instruction)
        # /v1/embeddings defaults to False; the prompt must not depend on it
        for add_generation_prompt in (False, True):
            rendered = tokenizer.apply_chat_template(
                _messages(text, has_image, instruction, image_part), tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            assert rendered == expected, (text, has_image, instruction)


def test_chat_template_string_content_and_errors(exported):
    backbone_type, source, destination = exported
    processor = UniMEV2Processor.from_pretrained(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(destination)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=False)
    assert rendered == processor.format_prompt(TEXTS[0], False)
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(Exception, match="one image"):
        tokenizer.apply_chat_template(two_images, tokenize=False)


def test_export_from_the_authors_layout_and_cli(tmp_path, capsys):
    """A plain Qwen2-VL checkpoint (the authors' release layout) exports too; the CLI prints the serve command."""
    tokenizer = build_tiny_tokenizer("qwen2_vl")
    model = build_tiny_causal_lm("qwen2_vl", tokenizer=tokenizer)
    processor = build_tiny_processor("qwen2_vl", tokenizer)
    source = save_in_authors_layout(model, processor, tmp_path / "authors")
    export_main([str(source), str(tmp_path / "vllm")])
    assert "--runner pooling --convert embed" in capsys.readouterr().out
    destination = tmp_path / "vllm"
    metadata = json.loads((destination / METADATA_FILE).read_text())
    assert metadata["image_resize"] == "square:1344"  # the client must resize as the authors' evaluation did
    stock = transformers.Qwen2VLForConditionalGeneration.from_pretrained(destination).eval()
    unime = UniMEV2Model.from_pretrained(source).eval()
    batch = UniMEV2Processor.from_pretrained(source)(texts=[TEXTS[0]])
    with torch.inference_mode():
        expected = unime(**batch).embeddings[0]
        actual = F.normalize(stock(**batch, output_hidden_states=True).hidden_states[-1][:, -1], dim=-1)[0]
    assert torch.allclose(actual, expected, atol=1e-5)


def test_converter_writes_the_vllm_folder_beside_the_checkpoint(tmp_path, capsys):
    """`python -m modeling_unime.convert SRC DST --vllm DIR`: the vLLM folder is exported from the converted checkpoint,
    so it records the checkpoint's image rule, and DST also loads in sentence-transformers' layout (modules.json)."""
    from modeling_unime.export.convert import main as convert_main

    tokenizer = build_tiny_tokenizer("qwen2_vl")
    model = build_tiny_causal_lm("qwen2_vl", tokenizer=tokenizer)
    source = save_in_authors_layout(model, build_tiny_processor("qwen2_vl", tokenizer), tmp_path / "authors")
    convert_main([str(source), str(tmp_path / "unime"), "--vllm", str(tmp_path / "vllm")])
    assert f"vLLM embedder folder written to {tmp_path / 'vllm'}" in capsys.readouterr().out
    assert (tmp_path / "unime" / "modules.json").is_file()
    metadata = json.loads((tmp_path / "vllm" / METADATA_FILE).read_text())
    assert metadata["image_resize"] == "square:1344"
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["architectures"] == [
        STOCK_ARCHITECTURES["qwen2_vl"]
    ]


def _vllm_python() -> Path:
    venv = Path(os.environ.get("UNIME_VLLM_VENV", Path.home() / ".cache" / "unime-v2" / "vllm-venv"))
    return venv / "bin" / "python"


@pytest.mark.vllm
def test_vllm_embeddings_equal_the_package(request):
    """Opt-in: ``python -m pytest tests/test_vllm.py -m vllm`` (or UNIME_VLLM_CHECK=1). Several minutes: four vLLM
    engine starts (Qwen2-VL parity, its alarm run, LLaVA-OneVision parity, Qwen3-VL parity)."""
    markexpr = request.config.getoption("markexpr") or ""
    selected = ("vllm" in markexpr and "not vllm" not in markexpr) or os.environ.get("UNIME_VLLM_CHECK") == "1"
    if not selected:
        pytest.skip("opt-in: run with -m vllm or UNIME_VLLM_CHECK=1")
    if not _vllm_python().exists():
        pytest.skip(f"no vLLM venv at {_vllm_python().parent.parent}: run bash parity/vllm/build_venv.sh")
    process = subprocess.run(
        [sys.executable, str(REPO / "parity" / "vllm" / "check_embed.py")],
        capture_output=True, text=True, timeout=2400, cwd=str(REPO),
    )
    summary = json.loads(process.stdout.strip().splitlines()[-1])
    assert process.returncode == 0 and summary["ok"], process.stdout[-6000:] + process.stderr[-3000:]
