import os

# Read by huggingface_hub at import time: set before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


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
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present in this checkout")
    return SHARED_DATA
