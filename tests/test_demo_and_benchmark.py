"""The README's main job (the embedding demo) and the embedding benchmark run and write what they promise."""

import json
import runpy
import sys

from conftest import REPO_ROOT


def _run_script(path, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")


def test_embed_demo_writes_a_loadable_checkpoint_and_embeddings(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    _run_script(REPO_ROOT / "recipes" / "embed_demo.py", ["--output_dir", str(tmp_path)], monkeypatch)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == {"captions": 4, "images": 4, "image_and_text": 4}
    assert summary["max_norm_error"] < 1e-5
    embeddings = load_file(str(tmp_path / "embeddings.safetensors"))
    assert embeddings["images"].shape == (4, summary["embedding_dim"])
    assert (tmp_path / "unime-v2-tiny" / "modeling_unime.py").is_file()
    assert "[4/4]" in capsys.readouterr().out


def test_embed_throughput_prints_its_json_line(monkeypatch, capsys):
    _run_script(
        REPO_ROOT / "benchmarks" / "embed_throughput.py",
        ["--rows", "6", "--batch_size", "4", "--hidden_size", "64", "--repeats", "1"],
        monkeypatch,
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ours_items_per_s", "reference_items_per_s", "speedup", "max_abs_diff"} <= result.keys()
    assert result["vocab_size"] == 151_936
    assert result["max_abs_diff"] < 1e-5


def test_judge_throughput_prints_its_json_line(monkeypatch, capsys):
    _run_script(
        REPO_ROOT / "benchmarks" / "judge_throughput.py",
        ["--candidates", "3", "--hidden_size", "64", "--layers", "2", "--batch_size", "2"],
        monkeypatch,
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"naive_pairs_per_s", "batched_pairs_per_s", "shared_pairs_per_s", "speedup_vs_naive",
            "speedup_vs_naive_image_candidates", "max_abs_diff"}
    assert keys <= result.keys()
    assert result["query_visual_tokens"] == 256 and result["vocab_size"] == 151_936
    assert result["max_abs_diff"] < 1e-4


def test_gradcache_memory_prints_its_json_line(monkeypatch, capsys):
    _run_script(REPO_ROOT / "benchmarks" / "gradcache_memory.py",
                ["--batches", "4", "8", "--chunk_size", "2", "--num_negatives", "2"], monkeypatch)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["peak_mb"]) == set(result["step_s"]) == {"plain", "gradcache"}
    plain, cached = result["peak_mb"]["plain"], result["peak_mb"]["gradcache"]
    assert plain["8"] > 1.5 * plain["4"]  # activations grow with the batch without GradCache
    assert cached["8"] < 0.6 * plain["8"] and abs(cached["8"] - cached["4"]) < 0.1 * cached["4"]  # flat with it
    assert result["grad_max_abs_diff"] < 1e-4


def test_embed_demo_help_lists_every_field(capsys):
    import dataclasses

    import pytest

    namespace = runpy.run_path(str(REPO_ROOT / "recipes" / "embed_demo.py"))
    with pytest.raises(SystemExit):
        namespace["main"](["--help"])
    out = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(namespace["EmbedDemoArguments"]):
        assert f"--{field.name}" in out and field.metadata["help"] in out
