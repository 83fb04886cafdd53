import os

# Read by huggingface_hub at import time: set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import runpy  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from functools import lru_cache  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Real data vendored with the tests (tests/data/README.md: sources, commits, licences): the authors' 50-row
# judge-scored sample and the SugarCrepe annotation files. Tests read them here, so they run in a fresh clone.
SHARED_DATA = REPO_ROOT / "tests" / "data"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl")


def pytest_collection_modifyitems(config, items):
    """Examples that need an optional package are skipped, with the reason, where it is not installed."""
    import importlib.util

    if importlib.util.find_spec("faiss") is None:
        for item in items:
            if item.name.endswith("faiss_top_k"):
                item.add_marker(pytest.mark.skip(reason="needs faiss-cpu (pip install 'unime-v2[faiss]')"))


@pytest.fixture(autouse=True)
def one_torch_thread_after_each_test():
    """A test that raises torch's thread count (a recipe run in-process with its config's ``threads``) must not leave
    it raised: more threads are slower on these shared 2-core machines, and forked workers of a later test can
    deadlock on an OpenMP pool started in the parent."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """tests/data: the vendored real files. Missing files are a broken checkout, not a reason to skip."""
    expected = ["unime_v2_official_example_data.json", "unime_v2_official_LICENSE", "sugar-crepe/LICENSE",
                *(f"sugar-crepe/{name}.json" for name in ("add_att", "add_obj", "replace_att", "replace_obj",
                                                          "replace_rel", "swap_att", "swap_obj"))]
    missing = [name for name in expected if not (SHARED_DATA / name).is_file()]
    if missing:
        pytest.fail(f"{SHARED_DATA} lacks {missing}: the vendored test data (see tests/data/README.md) is missing")
    return SHARED_DATA


# ------------------------------------------------------------------------------------- helpers shared by the tests


@lru_cache(maxsize=None)
def tiny_backbone_and_embedder(family: str):
    """(the stock ``*ForConditionalGeneration`` backbone, a UniMEV2Model with its weights, the processor) of one
    family, built once. Query/key projections are sharpened x4 so that a position or padding slip moves the outputs
    well above float noise. Shared: do not modify them."""
    from modeling_unime import UniMEV2Config, UniMEV2Model
    from modeling_unime.tiny import build_tiny_causal_lm, build_tiny_processor, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(family)
    processor = build_tiny_processor(family, tokenizer)
    causal_lm = build_tiny_causal_lm(family, tokenizer=tokenizer)
    with torch.no_grad():
        for name, parameter in causal_lm.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(4)
    model = UniMEV2Model(UniMEV2Config(backbone_config=causal_lm.config.to_dict())).eval()
    model.model.load_state_dict(causal_lm.model.state_dict(), strict=True)
    return causal_lm, model, processor


@lru_cache(maxsize=None)
def tiny_judge(family: str = "qwen2_5_vl"):
    """A tiny judge (model, processor), built once per family, whose Yes/No rows of the LM head are scaled by 30: a
    wrong prompt, image or answer id then moves P(Yes) well above float noise. Shared: do not modify it."""
    from modeling_unime.tiny import build_tiny_judge

    model, processor = build_tiny_judge(family)
    with torch.no_grad():
        yes_no = [processor.tokenizer.convert_tokens_to_ids(word) for word in ("Yes", "No")]
        model.get_output_embeddings().weight[yes_no] *= 30
    return model, processor


def run_recipe(monkeypatch, script: str, *arguments: str) -> None:
    """``recipes/<script>`` run as from the command line (``python recipes/<script> ARGUMENTS``), in this process."""
    monkeypatch.setattr(sys, "argv", [script, *arguments])
    runpy.run_path(str(REPO_ROOT / "recipes" / script), run_name="__main__")


def run_fresh_python(arguments: list[str], cwd: Path, timeout: float = 300, **environment: str):
    """``python ARGUMENTS`` in a new interpreter started in ``cwd``, offline, without this checkout on its path (so
    a checkpoint's own code is what runs, as in a user's process); ``environment`` adds variables."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", **environment)
    return subprocess.run([sys.executable, *arguments], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a torch.distributed launch or a stub server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
