"""unime-v2: UniME-V2 universal multimodal embeddings, the MLLM-as-a-Judge miner, trainers and evaluation."""

import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


class BuildPyWithModelCard(build_py):
    """Ship the top-level model_card.md template inside the modeling_unime package of a wheel (MANIFEST.in puts it in
    the sdist, so a wheel built from the sdist has it too)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "modeling_unime" / "model_card.md"
        if target.parent.is_dir():
            shutil.copyfile(HERE / "model_card.md", target)


# Every file the package reads at run time must be in the wheel (.ci/run installs the wheel into a clean environment
# and runs tests/test_packaging.py's smoke test from outside the checkout):
# - the metric scripts evaluation/metrics/<name>/<name>.py, which `evaluation.metrics.load_metric` hands to
#   `evaluate.load` by folder. Their folders have no __init__.py (evaluate imports each script on its own), so
#   find_packages misses them: they are listed here as (namespace) packages, whose modules build_py copies;
# - model_card.md, the template of `modeling_unime.export.card` (BuildPyWithModelCard above).
METRIC_PACKAGES = sorted(
    f"evaluation.metrics.{folder.name}"
    for folder in (HERE / "evaluation" / "metrics").iterdir()
    if (folder / f"{folder.name}.py").is_file()
)


setup(
    name="unime-v2",
    version="0.1.0",
    description="UniME-V2 (MLLM-as-a-Judge universal multimodal embeddings) for Hugging Face transformers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_unime", "modeling_unime.*", "trainers", "trainers.*",
                                    "evaluation", "evaluation.*"]) + METRIC_PACKAGES,
    cmdclass={"build_py": BuildPyWithModelCard},
    # torch: install the build you need first (CPU: pip install torch==2.13.0); a bare "torch" may pull CUDA.
    # Lower bounds are the lowest versions that resolve together and pass CI's compatibility run (.ci/run installs
    # exactly these, from .ci/lowest_pins.py); the newest versions are tested by the full suite.
    install_requires=[
        "torch>=2.4",
        "transformers>=5.24,<6",
        "tokenizers>=0.23.1",  # transformers 5.24 needs it
        "datasets>=4.7",  # trl 1.0, evaluate and mteb need it
        "peft>=0.18",  # 0.17 imports HybridCache, which transformers 5 removed
        "trl>=1.0",
        "accelerate>=1.13",  # 1.10-1.12 do not restore the optimizer state of an FSDP2 checkpoint (tests/test_fsdp.py)
        "huggingface_hub>=1.31",  # transformers 5.24 needs it
        "evaluate>=0.4",
        "safetensors>=0.8",  # transformers 5.24 needs it
        "pillow>=10",
        "pyyaml>=6",
        "tqdm>=4.66.3",  # datasets 4.7 needs it
        "jinja2>=3.1.6",  # huggingface_hub.ModelCard.from_template; transformers' apply_chat_template needs 3.1.6
    ],
    extras_require={
        # setuptools: tests/test_packaging.py builds the wheel offline (no build isolation; 70.1+ has bdist_wheel).
        # ruff: `ruff check` in .ci/run (lines within 120, imports ordered, no unused names; ruff.toml).
        "dev": ["pytest>=8", "faiss-cpu>=1.8", "setuptools>=70.1", "sentence-transformers>=6.2,<7", "mteb>=2.26,<3",
                "ruff>=0.6", "av>=12.0.0"],
        # encode(videos=[...]) of a video FILE (frame folders and frame lists need nothing more): PyAV decodes it.
        # 12.0.0 is PyAV's oldest wheel for Python 3.11; tests/test_video.py passes on 12.0.0, 14.0.0 and 18.1.0.
        "video": ["av>=12.0.0"],
        "faiss": ["faiss-cpu>=1.8"],
        # The main job (recipes/pipeline.py): the easy-vqa demo world (3 MB of 64x64 images) and its summary.png.
        "demo": ["easy-vqa>=1.0", "matplotlib>=3.8"],
        # SentenceTransformer(checkpoint, trust_remote_code=True) and trainers.sentence_losses
        "sentence-transformers": ["sentence-transformers>=6.2,<7"],
        # evaluation.mteb_models: mteb.evaluate on UniME-V2 checkpoints
        "mteb": ["mteb>=2.26,<3"],
    },
    classifiers=[  # the licence is the SPDX expression above (setuptools deprecates licence classifiers)
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
