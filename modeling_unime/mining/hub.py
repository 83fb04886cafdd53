"""The mined dataset on the Hugging Face Hub: the folder a dataset repo receives, and the upload."""

from __future__ import annotations

import os
from pathlib import Path

from datasets import Dataset

__all__ = ["push_mined_dataset", "write_hub_folder"]


def write_hub_folder(dataset: Dataset, card: str, folder: str | os.PathLike, pairs: Dataset | None = None) -> Path:
    """The folder a Hub dataset repo receives: ``README.md`` (the card), ``data/train-00000-of-00001.parquet`` and,
    when given, the judged-pairs side table as ``judged_pairs/train-00000-of-00001.parquet`` (its own
    configuration)."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    if pairs is not None:
        (folder / "judged_pairs").mkdir(exist_ok=True)
        pairs.to_parquet(str(folder / "judged_pairs" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def push_mined_dataset(
    dataset: Dataset, card: str, repo_id: str, folder: str | os.PathLike, *, token: str | None = None,
    private: bool = False, pairs: Dataset | None = None,
) -> str:
    """Write the Hub folder, create the dataset repo if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    folder = write_hub_folder(dataset, card, folder, pairs)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="dataset",
        commit_message=f"Hard negatives mined with unime-v2 ({len(dataset)} rows)",
    )
    return str(getattr(commit, "commit_url", commit))
