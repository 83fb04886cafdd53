"""The argparse command lines of the evaluation, export and benchmark scripts: snake_case flags like the recipes'
(``--batch_size``), the old kebab spellings still accepted, and what the flags reach."""

from __future__ import annotations

import json
import re
import runpy
import sys
import warnings

import pytest
from PIL import Image

from conftest import REPO_ROOT, SHARED_DATA

SCRIPTS = sorted((REPO_ROOT / "benchmarks").glob("*.py"))
MODULES = ["evaluation.sugarcrepe", "modeling_unime.export.convert", "modeling_unime.export.vllm"]


def usage_of(run, capsys) -> str:
    """The usage line of a command line's --help (argparse lists each option there by its first spelling)."""
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    return out.split("\n\n")[0]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_benchmark_flags_are_snake_case(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    usage = usage_of(lambda: runpy.run_path(str(script), run_name="__main__"), capsys)
    assert "--threads" in usage
    assert re.findall(r"--[a-z0-9]+-[a-z0-9-]+", usage) == [], usage


@pytest.mark.parametrize("module", MODULES)
def test_module_flags_are_snake_case(module, capsys):
    import importlib

    main = importlib.import_module(module).main
    usage = usage_of(lambda: main(["--help"]), capsys)
    assert re.findall(r"--[a-z0-9]+-[a-z0-9-]+", usage) == [], usage
    assert "--dtype" in usage


def sugarcrepe_data(tmp_path):
    """The vendored real annotation files, and a picture for every image their first two rows name."""
    images = tmp_path / "val2017"
    images.mkdir()
    for path in SHARED_DATA.joinpath("sugar-crepe").glob("*.json"):
        for entry in list(json.loads(path.read_text()).values())[:2]:
            Image.new("RGB", (32, 24), "red").save(images / entry["filename"])
    return SHARED_DATA / "sugar-crepe", images


def test_sugarcrepe_cli_snake_and_kebab_flags_reach_the_evaluation(tmp_path, capsys):
    """--max_rows keeps the first rows of each subset (the real files have 245 to 2,062), --batch_size and the kebab
    spellings give the same result."""
    from evaluation.sugarcrepe import SUGARCREPE_SUBSETS, main

    annotations, images = sugarcrepe_data(tmp_path)
    common = ["--annotations", str(annotations), "--images", str(images), "--model", "tiny:qwen2_vl",
              "--subsets", "swap_obj", "add_att"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a cut file is not "a row count unlike the release"
        snake = main([*common, "--max_rows", "2", "--batch_size", "3", "--image_resize", "native",
                      "--output", str(tmp_path / "snake.json")])
    kebab = main([*common, "--max-rows", "2", "--batch-size", "3", "--image-resize", "native"])
    assert snake["counts"] == {"swap_obj": 2, "add_att": 2} and set(SUGARCREPE_SUBSETS) >= set(snake["subsets"])
    assert kebab == snake == json.loads((tmp_path / "snake.json").read_text())
    assert "swap_obj" in capsys.readouterr().out


def test_convert_cli_base_model_and_repo_id_reach_the_card(tmp_path):
    from modeling_unime.export.convert import main
    from modeling_unime.tiny import (
        build_tiny_causal_lm,
        build_tiny_processor,
        build_tiny_tokenizer,
        save_in_authors_layout,
    )

    tokenizer = build_tiny_tokenizer("qwen2_vl")
    source = save_in_authors_layout(build_tiny_causal_lm("qwen2_vl", tokenizer=tokenizer),
                                    build_tiny_processor("qwen2_vl", tokenizer), tmp_path / "authors")
    main([str(source), str(tmp_path / "snake"), "--base_model", "Org/Base-2B", "--repo_id", "org/unime-snake"])
    main([str(source), str(tmp_path / "kebab"), "--base-model", "Org/Base-2B", "--repo-id", "org/unime-snake"])
    snake_card = (tmp_path / "snake" / "README.md").read_text()
    assert "base_model: Org/Base-2B" in snake_card and "org/unime-snake" in snake_card
    assert (tmp_path / "kebab" / "README.md").read_text() == snake_card
