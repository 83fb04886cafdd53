"""Zero-shot image-text retrieval: loaders on tiny fixtures in the public formats, end-to-end recalls
with a hand-designed embedder (known values in both directions) and the rerank stage."""

import io
import json
import math

import datasets
import pytest
import torch
from PIL import Image

from evaluation.retrieval import IMAGE_QUERY_INSTRUCTION, evaluate_retrieval, recall_at_k, rerank_rankings
from evaluation.retrieval_data import (
    ImageTextRetrievalSet,
    load_coco5k,
    load_flickr30k,
    load_retrieval_set,
    load_retrieval_set_from_hub,
    load_sharegpt4v,
    load_urban1k,
)


def test_recall_at_k_by_hand():
    images = torch.eye(2)
    captions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    # image->text: image 0 owns captions 0,1 (caption 0 first: hit@1); image 1 owns 2,3 (caption 1 first, 3 second).
    assert recall_at_k(images, captions, [[0, 1], [2, 3]], ks=(1, 2, 10), chunk_size=1) == {
        "recall@1": 0.5, "recall@2": 1.0, "recall@10": 1.0,
    }
    with pytest.raises(ValueError, match="outside the 4 candidates"):
        recall_at_k(images, captions, [[0], [4]])


# --------------------------------------------------------------------------------------------------- loaders


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def karpathy_entry(filename, split, captions, filepath=None):
    entry = {"filename": filename, "imgid": 0, "split": split, "sentids": list(range(len(captions))),
             "sentences": [{"tokens": caption.lower().split(), "raw": caption, "imgid": 0, "sentid": index}
                           for index, caption in enumerate(captions)]}
    if filepath:
        entry["filepath"] = filepath
    return entry


def write_flickr(root):
    entries = [
        karpathy_entry("1000092795.jpg", "test", [f"flickr a {i}" for i in range(5)]),
        karpathy_entry("10002456.jpg", "train", [f"train {i}" for i in range(5)]),
        karpathy_entry("1007129816.jpg", "test", [f"flickr b {i} " for i in range(5)]),
        karpathy_entry("1009434119.jpg", "val", [f"val {i}" for i in range(5)]),
    ]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    for entry in entries:
        touch(root / "flickr30k-images" / entry["filename"])


def test_load_flickr30k_keeps_the_test_split(tmp_path):
    write_flickr(tmp_path)
    data = load_flickr30k(tmp_path)
    assert data.name == "flickr30k"
    assert data.images == ["1000092795.jpg", "1007129816.jpg"]
    assert data.captions == [f"flickr a {i}" for i in range(5)] + [f"flickr b {i}" for i in range(5)]
    assert data.caption_to_image == [0] * 5 + [1] * 5
    assert data.image_to_captions == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert data.image_root == str(tmp_path / "flickr30k-images")


def test_load_coco5k_truncates_to_five_captions(tmp_path):
    entries = [
        karpathy_entry("COCO_val2014_000000391895.jpg", "test", [f"seven {i}" for i in range(7)], "val2014"),
        karpathy_entry("COCO_val2014_000000522418.jpg", "restval", [f"restval {i}" for i in range(5)], "val2014"),
        karpathy_entry("COCO_val2014_000000184613.jpg", "test", [f"five {i}" for i in range(5)], "val2014"),
        karpathy_entry("COCO_val2014_000000318219.jpg", "val", [f"val {i}" for i in range(5)], "val2014"),
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    for entry in entries:
        touch(tmp_path / "val2014" / entry["filename"])
    data = load_coco5k(tmp_path)
    assert data.images == ["val2014/COCO_val2014_000000391895.jpg", "val2014/COCO_val2014_000000184613.jpg"]
    assert data.captions == [f"seven {i}" for i in range(5)] + [f"five {i}" for i in range(5)]
    assert data.caption_to_image == [0] * 5 + [1] * 5
    assert data.image_root == str(tmp_path)


def test_load_sharegpt4v_keeps_the_first_1000(tmp_path):
    entries = [
        {"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg",
         "conversations": [{"from": "human", "value": "What do you see happening in this image?\n<image>"},
                           {"from": "gpt", "value": f"A long caption {i}.\nIt goes on."}]}
        for i in range(1003)
    ]
    (tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json").write_text(json.dumps(entries))
    for entry in entries[:1000]:   # the last 3 images are absent: they must not be needed
        touch(tmp_path / entry["image"])
    data = load_sharegpt4v(tmp_path)
    assert len(data.images) == len(data.captions) == 1000
    assert data.images[999] == "coco/train2017/000000000999.jpg"
    assert data.captions[0] == "A long caption 0. It goes on."
    assert data.caption_to_image == list(range(1000))


def test_load_urban1k_pairs_by_id(tmp_path):
    root = tmp_path / "Urban1k"
    for index in (1, 2, 10):
        touch(root / "image" / f"{index}.jpg")
        touch(root / "caption" / f"{index}.txt")
        (root / "caption" / f"{index}.txt").write_text(f"Long caption of image {index}.\n")
    data = load_urban1k(root)
    assert data.images == ["1.jpg", "2.jpg", "10.jpg"]
    # The first line as readlines()[0] returns it (the authors' loader): the newline stays, it is the pooled token.
    assert data.captions == ["Long caption of image 1.\n", "Long caption of image 2.\n", "Long caption of image 10.\n"]
    assert data.caption_to_image == [0, 1, 2]
    assert data.image_root == str(root / "image")


def test_missing_files_name_the_path_and_the_download(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_flickr30k(tmp_path)
    message = str(error.value)
    assert str((tmp_path / "dataset_flickr30k.json").resolve()) in message and "caption_datasets.zip" in message

    write_flickr(tmp_path)
    (tmp_path / "flickr30k-images" / "1007129816.jpg").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_flickr30k(tmp_path)
    assert str((tmp_path / "flickr30k-images" / "1007129816.jpg").resolve()) in str(error.value)

    with pytest.raises(FileNotFoundError, match="val2014"):
        load_coco5k(tmp_path / "coco")
    with pytest.raises(FileNotFoundError) as error:
        load_sharegpt4v(tmp_path)
    message = str(error.value)
    assert "share-captioner_coco_lcs_sam_1246k_1107.json" in message and "Lin-Chen/ShareGPT4V" in message
    with pytest.raises(FileNotFoundError) as error:
        load_urban1k(tmp_path / "Urban1k")
    assert str((tmp_path / "Urban1k" / "caption").resolve()) in str(error.value)
    assert "BeichenZhang/Urban1k" in str(error.value)


def test_hub_loader_writes_the_image_bytes(tmp_path, monkeypatch):
    buffers = []
    for color in ("red", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), color).save(buffer, format="PNG")
        buffers.append(buffer.getvalue())
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": f"{i}.png"} for i, data in enumerate(buffers)],
         "text": [[f"red {i}" for i in range(6)], [f"blue {i}" for i in range(5)]]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Sequence(datasets.Value("string"))}),
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split: calls.append((repo, split)) or rows)
    data = load_retrieval_set_from_hub("coco", tmp_path)
    assert calls == [("royokong/coco_test", "test")]
    assert data.images == ["00000.png", "00001.png"] and len(data.captions) == 10
    assert data.caption_to_image == [0] * 5 + [1] * 5
    assert [(tmp_path / "images" / name).read_bytes() for name in data.images] == buffers


def test_hub_loader_extracts_urban1k(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    with zipfile.ZipFile(snapshot / "Urban1k.zip", "w") as archive:
        archive.writestr("Urban1k/image/1.jpg", b"jpeg")
        archive.writestr("Urban1k/caption/1.txt", "A street at night.")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, repo_type: str(snapshot))
    data = load_retrieval_set_from_hub("urban1k", tmp_path / "out")
    assert data.images == ["1.jpg"] and data.captions == ["A street at night."]
    assert data.image_root == str(tmp_path / "out" / "Urban1k" / "image")


def test_load_retrieval_set_dispatches_with_image_root(tmp_path):
    root = tmp_path / "Urban1k"
    touch(root / "image" / "7.jpg")
    touch(root / "elsewhere" / "7.jpg")
    touch(root / "caption" / "7.txt")
    (root / "caption" / "7.txt").write_text("Seven.")
    assert load_retrieval_set("urban1k", root).image_root == str(root / "image")
    assert load_retrieval_set("urban1k", root, image_root=root / "elsewhere").image_root == str(root / "elsewhere")
    with pytest.raises(ValueError, match="choose one of"):
        load_retrieval_set("flickr8k", root)


def test_dataset_validation():
    with pytest.raises(ValueError, match="no caption"):
        ImageTextRetrievalSet("toy", ["a.jpg", "b.jpg"], ["a"], [0], ".")
    with pytest.raises(ValueError, match="outside"):
        ImageTextRetrievalSet("toy", ["a.jpg"], ["a"], [1], ".")


# ---------------------------------------------------------------------------------------- evaluate_retrieval

# Similarity of caption j (row) to image i (column); captions 0,1 -> image 0, 2,3 -> image 1, 4 -> 2, 5 -> 3.
SIMILARITY = [
    [0.9, 0.1, 0.0, 0.0],
    [0.5, 0.6, 0.0, 0.0],
    [0.0, 0.2, 0.3, 0.1],
    [0.1, 0.0, 0.2, 0.3],
    [0.0, 0.0, 0.8, 0.0],
    [0.0, 0.0, 0.0, 0.7],
]
CAPTION_TO_IMAGE = [0, 0, 1, 1, 2, 3]


def toy_set():
    return ImageTextRetrievalSet("toy", [f"img{i}.jpg" for i in range(4)], [f"caption {j}" for j in range(6)],
                                 CAPTION_TO_IMAGE, "/images")


class TableEmbedder:
    """Image i -> basis vector e_i; caption j -> (SIMILARITY[j], slack) of unit norm, so <caption j, image i> is
    exactly SIMILARITY[j][i]."""

    def __init__(self):
        self.calls = []

    def encode(self, texts, images, image_root=None, batch_size=16):
        self.calls.append(len(texts))
        rows = []
        for text, image in zip(texts, images):
            if image is not None:
                assert text == IMAGE_QUERY_INSTRUCTION and image_root == "/images"
                vector = [0.0] * 5
                vector[int(image[3])] = 1.0
            else:
                similarities = SIMILARITY[int(text.split()[1])]
                vector = similarities + [math.sqrt(1 - sum(value * value for value in similarities))]
            rows.append(vector)
        return torch.tensor(rows)


class ReverseReranker:
    def __init__(self):
        self.calls = []

    def rerank(self, query, candidates, mode, image_root):
        self.calls.append((query, list(candidates), mode, image_root))
        return list(range(len(candidates)))[::-1], torch.zeros(len(candidates))


def test_evaluate_retrieval_known_recalls_with_correct_direction_labels():
    results = evaluate_retrieval(TableEmbedder(), toy_set(), ks=(1, 2, 4), chunk_size=2)
    # Images: 0 -> caption 0 (own); 1 -> caption 1 (image 0's), then 2 (own); 2 -> 4 (own); 3 -> 5 (own).
    assert results["image_to_text"] == {"recall@1": 0.75, "recall@2": 1.0, "recall@4": 1.0}
    # Captions: own image first for 0, 4, 5; second for 1, 2; fourth for 3.
    assert results["text_to_image"] == pytest.approx({"recall@1": 3 / 6, "recall@2": 5 / 6, "recall@4": 1.0})


def test_evaluate_retrieval_default_ks_and_cache(tmp_path):
    embedder = TableEmbedder()
    first = evaluate_retrieval(embedder, toy_set(), cache_dir=tmp_path)
    assert set(first) == {"image_to_text", "text_to_image"} and set(first["image_to_text"]) == {
        "recall@1", "recall@5", "recall@10"}
    assert first["image_to_text"]["recall@1"] == 0.75 and first["text_to_image"]["recall@10"] == 1.0
    embedded = sum(embedder.calls)
    assert evaluate_retrieval(embedder, toy_set(), cache_dir=tmp_path) == first
    assert sum(embedder.calls) == embedded   # everything came from the cache


def test_evaluate_retrieval_with_embed_fn():
    table = TableEmbedder()

    def embed_fn(items):
        return table.encode([text for text, _ in items], [image for _, image in items], image_root="/images")

    results = evaluate_retrieval(None, toy_set(), embed_fn=embed_fn, ks=(1,))
    assert results == {"image_to_text": {"recall@1": 0.75}, "text_to_image": {"recall@1": 0.5}}


def test_rerank_stage_reorders_only_the_top_k():
    reranker = ReverseReranker()
    results = evaluate_retrieval(TableEmbedder(), toy_set(), reranker=reranker, rerank_top_k=2, ks=(1, 2, 4))
    # image->text top-2 reversed: image 0 [1, 0] (caption 1 is its own), 1 [2, 1], 2 [2, 4], 3 [3, 5].
    assert results["image_to_text"] == {"recall@1": 0.5, "recall@2": 1.0, "recall@4": 1.0}
    # text->image: own image now first for captions 1, 2; caption 3's own image stays fourth.
    assert results["text_to_image"] == pytest.approx({"recall@1": 2 / 6, "recall@2": 5 / 6, "recall@4": 1.0})
    query, candidates, mode, image_root = reranker.calls[0]
    assert query == (IMAGE_QUERY_INSTRUCTION, "img0.jpg") and candidates == [("caption 0", None), ("caption 1", None)]
    assert mode == "listwise" and image_root == "/images"
    assert len(reranker.calls) == 4 + 6
    assert reranker.calls[4][0] == ("caption 0", None)
    assert reranker.calls[4][1] == [(IMAGE_QUERY_INSTRUCTION, "img0.jpg"), (IMAGE_QUERY_INSTRUCTION, "img1.jpg")]


def test_rerank_rankings_keeps_the_tail_and_checks_the_order():
    rankings = [[3, 1, 4, 0, 2], [0, 1, 2, 3, 4]]
    items = [(str(index), None) for index in range(5)]
    reranked = rerank_rankings(rankings, items[:2], items, ReverseReranker(), top_k=3)
    assert reranked == [[4, 1, 3, 0, 2], [2, 1, 0, 3, 4]]

    class PartialReranker:
        def rerank(self, query, candidates, mode, image_root):
            return [2], None

    assert rerank_rankings(rankings[:1], items[:1], items, PartialReranker(), top_k=3) == [[4, 3, 1, 0, 2]]

    class BrokenReranker:
        def rerank(self, query, candidates, mode, image_root):
            return [0, 0, 7], None

    with pytest.raises(ValueError, match="not a list of distinct positions"):
        rerank_rankings(rankings[:1], items[:1], items, BrokenReranker(), top_k=3)
