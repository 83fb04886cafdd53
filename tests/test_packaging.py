"""The package as a user installs it (`pip install .`, not editable): the wheel holds every file the package reads at
run time (the metric scripts, the model card template), and an installed copy embeds, computes metrics, converts an
authors'-layout checkpoint and writes a model card from outside the checkout.

Two ways to run it:
- ``pytest tests/test_packaging.py``: builds the wheel (offline, with the environment's setuptools), checks its file
  list against the checkout, installs it with ``pip install --no-deps --target`` into a temporary folder and runs the
  smoke test in a subprocess from a temporary working directory, with only that folder on PYTHONPATH for the package.
- ``.ci/run`` (a clean virtual environment with the wheel and its dependencies installed, nothing else)::

      python tests/test_packaging.py --build_wheel DIR         # in the checkout's environment
      cd "$(mktemp -d)" && python copy/of/test_packaging.py --smoke WORKDIR --installed_outside CHECKOUT

  This file imports neither pytest nor the package at module level, so that it runs in that environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("modeling_unime", "trainers", "evaluation")
# Files other than Python modules that the package reads at run time, as they must appear in the wheel.
RUNTIME_DATA = ("modeling_unime/model_card.md",)
# What a wheel build needs from the checkout (setup.py reads README.md; MANIFEST.in lists the rest for an sdist).
BUILD_INPUTS = ("setup.py", "MANIFEST.in", "README.md", "model_card.md", *PACKAGES)


# ------------------------------------------------------------------------------------------------------ building


def checkout_package_files(root: Path = REPO_ROOT) -> set[str]:
    """Every file of the three packages in the checkout that the wheel must carry: the Python modules (the metric
    scripts included) and the run-time data."""
    files = {str(path.relative_to(root)) for package in PACKAGES for path in (root / package).rglob("*.py")
             if "__pycache__" not in path.parts}
    return files | set(RUNTIME_DATA)


def build_wheel(destination: Path, isolation: bool = True) -> Path:
    """Build the wheel from a clean copy of the checkout's build inputs (no stale build/ folder can leak in)."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="unime-wheel-src-") as source:
        for name in BUILD_INPUTS:
            origin = REPO_ROOT / name
            if origin.is_dir():
                shutil.copytree(origin, Path(source) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(origin, Path(source) / name)
        command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(destination),
                   source]
        if not isolation:
            command.insert(4, "--no-build-isolation")
        subprocess.run(command, check=True)
    wheels = sorted(destination.glob("unime_v2-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one unime_v2 wheel in {destination}, found {wheels}")
    return wheels[0]


def missing_from_wheel(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())
    return sorted(checkout_package_files() - shipped)


# ---------------------------------------------------------------------------------------------------- smoke test


def smoke(workdir: Path, checkout: Path | None = None) -> list[str]:
    """Use the importable unime-v2 the way a user would; returns what it did, one line per check. With ``checkout``
    (the source tree), the package must be an installed copy from outside it."""
    import torch
    from transformers import AutoModel

    import evaluation
    import modeling_unime
    import trainers
    from evaluation.metrics import METRICS_DIR, available_metrics, load_metric
    from modeling_unime.export.card import find_card_template, render_model_card
    from modeling_unime.tiny import (
        build_tiny_causal_lm,
        build_tiny_processor,
        build_tiny_tokenizer,
        build_tiny_unime,
        draw_shape,
        save_in_authors_layout,
    )

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = []
    locations = {module.__name__: Path(module.__file__).resolve().parent
                 for module in (modeling_unime, trainers, evaluation)}
    if checkout is not None:
        checkout = Path(checkout).resolve()
        inside = [name for name, folder in locations.items() if checkout in folder.parents]
        assert not inside, f"{inside} imported from the checkout {checkout}, not from the installed package"
    report.append("imported from " + ", ".join(f"{name}: {folder}" for name, folder in locations.items()))

    # 1. Embed with a tiny model: a text row, an image row, an image+text row.
    model, processor = build_tiny_unime("qwen2_vl")
    image = draw_shape("red", "circle")
    embeddings = model.encode(texts=["a red circle", None, "What colour is it?"], images=[None, image, image],
                              processor=processor)
    assert embeddings.shape[0] == 3 and torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    report.append(f"embedded 3 rows with a tiny Qwen2-VL: shape {tuple(embeddings.shape)}, unit norms")

    # 2. Every metric script loads and computes.
    names = available_metrics()
    assert names == ["pairwise_accuracy", "precision_at_1", "retrieval_recall"], (names, METRICS_DIR)
    precision = load_metric("precision_at_1").compute(predictions=[0, 1, 0], references=[0, 0, 0])
    recall = load_metric("retrieval_recall").compute(predictions=[[2, 0, 1]], references=[[0]], k=[1, 2])
    pairwise = load_metric("pairwise_accuracy").compute(positive_scores=[0.9, 0.1], negative_scores=[0.2, 0.1])
    assert precision == {"precision_at_1": 2 / 3}, precision
    assert recall["recall@1"] == 0.0 and recall["recall@2"] == 1.0, recall
    assert pairwise == {"accuracy": 0.5}, pairwise
    report.append(f"metrics from {METRICS_DIR}: precision_at_1 {precision['precision_at_1']:.4f}, "
                  f"retrieval_recall {recall}, pairwise_accuracy {pairwise['accuracy']}")

    # 3. The converter, as a module, on a tiny checkpoint in the authors' layout; the result loads with AutoModel.
    tokenizer = build_tiny_tokenizer("qwen2_vl")
    source = save_in_authors_layout(build_tiny_causal_lm("qwen2_vl", tokenizer=tokenizer),
                                    build_tiny_processor("qwen2_vl", tokenizer), workdir / "authors-layout")
    destination = workdir / "converted"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(workdir / "modules")}
    converted = subprocess.run(
        [sys.executable, "-m", "modeling_unime.convert", str(source), str(destination), "--verify"],
        cwd=workdir, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert converted.returncode == 0, converted.stdout[-2000:] + converted.stderr[-3000:]
    files = sorted(path.name for path in destination.iterdir())
    for expected in ("README.md", "config.json", "configuration_unime.py", "model.safetensors", "modeling_unime.py",
                     "processing_unime.py", "processor_config.json"):
        assert expected in files, (expected, files)
    os.environ.setdefault("HF_MODULES_CACHE", str(workdir / "modules"))
    reloaded = AutoModel.from_pretrained(destination, trust_remote_code=True)
    reloaded.processor.image_resize = "native"
    probe = reloaded.encode(texts=["a red circle"])
    assert probe.shape[0] == 1 and abs(float(probe.norm()) - 1) < 1e-5
    verified = [line for line in converted.stdout.splitlines() if line.startswith("verify:")]
    assert verified and "max |diff|" in verified[0], converted.stdout
    report.append(f"python -m modeling_unime.convert --verify: {verified[0]!r}; AutoModel reloads it "
                  f"({type(reloaded).__name__})")

    # 4. Model cards: rendered from the shipped template, and written with a converted checkpoint.
    template = find_card_template()
    if checkout is not None:
        assert template.parent == locations["modeling_unime"], template  # shipped inside the package
    card = render_model_card(model_name="smoke", base_model="Qwen/Qwen2-VL-2B-Instruct", embedding_dim=64)
    assert card.startswith("---\nlibrary_name: transformers\n") and "$" not in card.split("```bibtex")[0]
    written = (destination / "README.md").read_text(encoding="utf-8")
    assert written.startswith("---\nlibrary_name: transformers\npipeline_tag: feature-extraction\n")
    report.append(f"model card rendered from {template} ({len(card)} characters); the converter wrote README.md")
    return report


# --------------------------------------------------------------------------------------------------------- tests


def test_wheel_ships_every_file_the_package_reads_and_works_installed(tmp_path):
    import pytest

    pytest.importorskip("setuptools", minversion="70.1",
                        reason="building the wheel offline needs setuptools>=70.1 (the dev extra) in this environment")
    wheel = build_wheel(tmp_path / "wheel", isolation=False)
    assert missing_from_wheel(wheel) == []
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"evaluation/metrics/precision_at_1/precision_at_1.py", "evaluation/metrics/retrieval_recall/"
            "retrieval_recall.py", "evaluation/metrics/pairwise_accuracy/pairwise_accuracy.py",
            "modeling_unime/model_card.md"} <= names
    assert not any(name.startswith(("tests/", "recipes/")) or "__pycache__" in name for name in names)

    # Installed (files only: the dependencies are this environment's) and used from a folder outside the checkout.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True)
    script = tmp_path / "smoke.py"
    shutil.copy2(__file__, script)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(script), "--smoke", str(tmp_path / "work"), "--installed_outside",
                             str(REPO_ROOT)],
                            cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"modeling_unime: {site / 'modeling_unime'}" in result.stdout
    assert "smoke test passed" in result.stdout


def test_checkout_file_list_covers_the_metric_scripts_and_the_card_template():
    files = checkout_package_files()
    assert "evaluation/metrics/precision_at_1/precision_at_1.py" in files
    assert "modeling_unime/model_card.md" in files and "trainers/losses.py" in files
    assert (REPO_ROOT / "model_card.md").is_file()  # the template BuildPyWithModelCard copies into the wheel


# ----------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build_wheel", "--build-wheel", metavar="DIR",
                        help="build the wheel into DIR and check its file list")
    parser.add_argument("--no_build_isolation", "--no-build-isolation", action="store_true",
                        help="build with this environment's setuptools")
    parser.add_argument("--smoke", metavar="WORKDIR", help="run the smoke test, writing into WORKDIR")
    parser.add_argument("--installed_outside", "--installed-outside", metavar="CHECKOUT",
                        help="the package must be an installed copy, not the modules of this source tree")
    args = parser.parse_args(argv)
    if args.build_wheel:
        wheel = build_wheel(Path(args.build_wheel), isolation=not args.no_build_isolation)
        missing = missing_from_wheel(wheel)
        if missing:
            sys.exit(f"{wheel.name} lacks files the package needs at run time: {missing}")
        print(f"built {wheel} ({len(checkout_package_files())} package files, all present)")
    if args.smoke:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        for line in smoke(Path(args.smoke), checkout=args.installed_outside):
            print(f"ok: {line}")
        print("smoke test passed")


if __name__ == "__main__":
    main()
