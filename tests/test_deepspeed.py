"""DeepSpeed ZeRO-2: the embedding trainer's step, with GradCache and without, gives the gradients of one process with
the whole batch, on a batch with image queries on one process and text-only queries on the other (the vision tower
has gradients on one process only: ZeRO's reduction in hook order would mismatch; `trainers.sharding`).

Two processes on CPU with gloo (tests/fsdp_worker.py, one step of plain SGD at lr 1, so the weights move by minus the
gradient). Needs ``pip install deepspeed`` (not a dependency; it compiles a communication op on first use, about a
minute): skipped without it. `.ci/run` installs it for this file after the main suite.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO_ROOT, free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")

WORKER = str(REPO_ROOT / "tests" / "fsdp_worker.py")
CASES = ("full-gradcache", "dora-gradcache", "full-plain")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    output = tmp_path_factory.mktemp("deepspeed")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for command in (
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--main_process_port", str(free_port()), WORKER, str(output), "--mode", "deepspeed", "--cases", *CASES],
        [sys.executable, WORKER, str(output), "--mode", "single", "--sgd", "--cases", *CASES],
    ):
        # The first DeepSpeed run compiles its shared-memory op (about a minute on 2 cores).
        run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
    return output


@pytest.mark.parametrize("case", CASES)
def test_two_zero2_processes_give_the_gradients_of_one_process_with_the_whole_batch(runs, case):
    sharded = load_file(runs / f"{case}-deepspeed-sgd.safetensors")
    single = load_file(runs / f"{case}-single-sgd.safetensors")
    assert sharded.keys() == single.keys() and len(single) > 10
    squared = sum(float((sharded[name] - single[name]).norm() ** 2) for name in single)
    relative = squared ** 0.5 / sum(float(single[name].norm() ** 2) for name in single) ** 0.5
    # Measured 0.7-2.4e-7; summed instead of averaged gradients are off by 1, a process's gradients missing by ~0.5.
    assert relative < 1e-5
    assert any(".visual." in name for name in single) == case.startswith("full")  # the vision tower trained


def test_the_recipe_under_the_shipped_zero2_config_trains_and_resumes_as_one_process_does(tmp_path, monkeypatch):
    """recipes/train_embedding.py launched with recipes/accelerate/zero2.yaml (2 processes): a DoRA run with GradCache
    from a saved checkpoint ends with the merged weights of one process with the whole batch, and a run stopped after
    its first step and launched again resumes from its DeepSpeed checkpoint to the same weights."""
    import torch
    from fsdp_worker import mixed_rows
    from test_fsdp import RECIPE_CONFIG

    from conftest import run_recipe
    from modeling_unime.tiny import build_tiny_unime

    model, processor = build_tiny_unime("qwen2_vl")
    model.save_pretrained(tmp_path / "tiny")
    processor.save_pretrained(tmp_path / "tiny")
    mixed_rows(tmp_path / "images").save_to_disk(str(tmp_path / "rows"))
    configs = {}
    for name, batch in (("zero2", 2), ("interrupted", 2), ("single", 4)):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(RECIPE_CONFIG.format(model=tmp_path / "tiny", rows=tmp_path / "rows",
                                                      images=tmp_path / "images", output_dir=tmp_path / name,
                                                      batch=batch))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    def launch(config, *flags):
        run = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(REPO_ROOT / "recipes" / "accelerate" / "zero2.yaml"), "--num_processes", "2", "--mixed_precision",
             "no", "--main_process_port", str(free_port()), str(REPO_ROOT / "recipes" / "train_embedding.py"),
             "--config", str(config), *flags], env=environment, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        return run.stdout

    launch(configs["zero2"])
    launch(configs["interrupted"], "--max_steps", "1")
    assert "resuming from" in launch(configs["interrupted"])
    run_recipe(monkeypatch, "train_embedding.py", "--config", str(configs["single"]))

    final = {name: load_file(tmp_path / name / "final" / "model.safetensors") for name in configs}
    initial = load_file(tmp_path / "tiny" / "model.safetensors")
    moved = max(float((final["single"][name] - initial[name]).abs().max()) for name in initial)
    assert moved > 1e-3
    for name in initial:
        torch.testing.assert_close(final["zero2"][name], final["single"][name], atol=1e-3 * moved, rtol=1e-4)
        torch.testing.assert_close(final["interrupted"][name], final["zero2"][name], atol=1e-6, rtol=1e-6)
