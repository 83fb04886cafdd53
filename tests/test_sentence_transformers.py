"""UniME-V2 checkpoints in sentence-transformers: loading, embeddings equal to `UniMEV2Model.encode`, the authors'
4.49 reference embeddings through ``SentenceTransformer``, and the soft-label loss with GradCache against our
trainer's gradients."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache

import pytest
import torch
from PIL import Image

sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

from modeling_unime import UniMEV2Model, UniMEV2Processor  # noqa: E402
from modeling_unime.sentence_unime import (  # noqa: E402
    IMAGE_QUERY_PROMPT,
    UniMEV2SentenceEmbedder,
    add_sentence_transformers_files,
    parse_row,
)
from modeling_unime.tiny import build_tiny_unime, synthetic_judge_dataset  # noqa: E402
from trainers.sentence_losses import CachedSoftLabelAlignmentLoss, judge_rows_for_sentence_transformers  # noqa: E402

BACKBONES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen3_vl"]
ATOL = 1e-5


def _image(colour: str, size=(64, 48)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 8):  # some structure, so that image rows differ by more than their colour
        image.putpixel((x, x % size[1]), (x * 3 % 256, 40, 200))
    return image


@lru_cache(maxsize=None)
def _checkpoint(backbone: str, root: str) -> str:
    model, processor = build_tiny_unime(backbone)
    folder = os.path.join(root, backbone)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    add_sentence_transformers_files(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("st-checkpoints"))
    return lambda backbone: _checkpoint(backbone, root)


def _inputs(tmp_path):
    red, blue = _image("red"), _image("blue", (40, 72))
    blue_path = tmp_path / "blue.png"
    blue.save(blue_path)
    st_inputs = [
        "a red square on a white wall",
        red,
        {"image": red, "text": "What colour is the square?"},
        str(blue_path),  # a path to an existing image file is an image, as sentence-transformers decides
        "short",
        {"image": str(blue_path), "text": "Represent the given image."},
        {"text": "a caption given as a dict"},
    ]
    texts = ["a red square on a white wall", None, "What colour is the square?", None, "short",
             "Represent the given image.", "a caption given as a dict"]
    images = [None, red, red, str(blue_path), None, str(blue_path), None]
    return st_inputs, texts, images


@pytest.mark.parametrize("backbone", BACKBONES)
def test_sentence_transformer_embeddings_equal_encode(backbone, checkpoints, tmp_path):
    folder = checkpoints(backbone)
    st_model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    model = UniMEV2Model.from_pretrained(folder)
    processor = UniMEV2Processor.from_pretrained(folder)
    st_inputs, texts, images = _inputs(tmp_path)

    for batch_size in (1, 3, 16):  # ST batches rows by length, mixing texts and images: the result must not move
        embeddings = st_model.encode(st_inputs, batch_size=batch_size, convert_to_tensor=True)
        expected = model.encode(texts=texts, images=images, processor=processor)
        assert embeddings.shape == expected.shape == (len(st_inputs), model.config.hidden_size)
        torch.testing.assert_close(embeddings.cpu(), expected, atol=ATOL, rtol=0)

    prompted = st_model.encode(st_inputs, prompt=IMAGE_QUERY_PROMPT, convert_to_tensor=True)
    torch.testing.assert_close(
        prompted.cpu(), model.encode(texts=texts, images=images, processor=processor, instruction=IMAGE_QUERY_PROMPT),
        atol=ATOL, rtol=0,
    )
    named = st_model.encode(st_inputs, prompt_name="image", convert_to_tensor=True)
    torch.testing.assert_close(named, prompted, atol=ATOL, rtol=0)
    # Negative control: the instruction is part of what is embedded.
    assert (prompted.cpu() - embeddings.cpu()).abs().max() > 1e-3

    truncated = st_model.encode(st_inputs, truncate_dim=16, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(
        truncated.cpu(), model.encode(texts=texts, images=images, processor=processor, truncate_dim=16),
        atol=ATOL, rtol=0,
    )
    assert st_model.get_embedding_dimension() == model.config.hidden_size
    single = st_model.encode(st_inputs[2])  # one input, not a list: one vector
    assert single.shape == (model.config.hidden_size,)


def test_query_and_document_prompts_and_chats(checkpoints, tmp_path):
    folder = checkpoints("qwen2_vl")
    add_sentence_transformers_files(folder, prompts={"query": "Find the answer.", "document": "Represent it."})
    st_model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    model = UniMEV2Model.from_pretrained(folder)
    red = _image("red")
    queries = st_model.encode_query(["what colour?", {"image": red, "text": "which shape?"}], convert_to_tensor=True)
    expected = model.encode(texts=["what colour?", "which shape?"], images=[None, red], instruction="Find the answer.")
    torch.testing.assert_close(queries.cpu(), expected, atol=ATOL, rtol=0)
    documents = st_model.encode_document(["a red square"], convert_to_tensor=True)
    torch.testing.assert_close(
        documents.cpu(), model.encode(texts=["a red square"], instruction="Represent it."), atol=ATOL, rtol=0
    )
    chat = [{"role": "system", "content": "Find the answer."},
            {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "which shape?"}]}]
    torch.testing.assert_close(
        st_model.encode([chat], convert_to_tensor=True).cpu()[0], expected[1], atol=ATOL, rtol=0
    )


def test_chat_text_parts_are_joined_with_a_space_as_encode_sees_them(checkpoints):
    """A chat whose system turn and user turn each hold two text parts embeds as `UniMEV2Model.encode` of the parts
    joined with one space, the system parts as the instruction."""
    folder = checkpoints("qwen2_vl")
    st_model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    model = UniMEV2Model.from_pretrained(folder)
    red = _image("red")
    chats = [
        [{"role": "system", "content": [{"type": "text", "text": "Find the answer."},
                                        {"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "which"},
                                      {"type": "text", "text": "shape?"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "Find the answer."},
                                        {"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "a red"}, {"type": "text", "text": "square"}]}],
    ]
    embedded = st_model.encode(chats, convert_to_tensor=True).cpu()
    expected = model.encode(texts=["which shape?", "a red square"], images=[red, None],
                            instruction="Find the answer. Be brief.")
    torch.testing.assert_close(embedded, expected, atol=ATOL, rtol=0)
    # Negative control: the parts run together are other inputs, so the comparison above can fail.
    unspaced = model.encode(texts=["whichshape?", "a redsquare"], images=[red, None],
                            instruction="Find the answer.Be brief.")
    assert float((unspaced - expected).abs().max(dim=1).values.min()) > 1e-3


def test_bad_inputs_get_clear_errors(checkpoints):
    st_model = SentenceTransformer(checkpoints("qwen2_vl"), trust_remote_code=True, device="cpu")
    with pytest.raises(ValueError, match="Row 0: a dict input has the keys"):
        st_model.encode([{"picture": _image("red")}])
    with pytest.raises(ValueError, match="one input per row, got a pair"):
        parse_row(("a", "b"))
    with pytest.raises(ValueError, match="neither text nor image"):
        st_model.encode([{"image": None, "text": None}])
    with pytest.raises(ValueError, match="one image per row"):
        parse_row([{"role": "user", "content": [{"type": "image", "image": 1}, {"type": "image", "image": 2}]}])


def test_truncate_dim_must_be_a_positive_int_up_to_the_embedding_size(checkpoints, tmp_path):
    """sentence-transformers slices ``[..., :truncate_dim]`` after our module and checks nothing (-1 gave 63
    dimensions, 0 none, True one); our module checks the model's truncate_dim when it is built and at each forward.
    A value given to a single ``encode`` call never reaches a module (see the module docstring)."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoints("qwen2_vl"), folder)
    model = UniMEV2Model.from_pretrained(folder)
    size = model.config.hidden_size
    for bad in (-1, 0, True, size + 1, 8.0):
        message = re.escape(f"truncate_dim={bad!r}: give a positive int up to the embedding size {size}")
        with pytest.raises(ValueError, match=message):
            SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", truncate_dim=bad)
    whole = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", truncate_dim=size)
    assert whole.encode(["a red square"]).shape == (1, size)

    st_model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", truncate_dim=16)
    torch.testing.assert_close(
        st_model.encode(["a red square"], normalize_embeddings=True, convert_to_tensor=True).cpu(),
        model.encode(texts=["a red square"], truncate_dim=16), atol=ATOL, rtol=0,
    )
    with pytest.raises(ValueError, match="truncate_dim=0: "):  # set after loading: checked at the next forward
        with st_model.truncate_embeddings(0):
            st_model.encode(["a red square"])
    st_model.truncate_dim = -1
    with pytest.raises(ValueError, match="truncate_dim=-1: "):
        st_model.encode(["a red square"])

    settings_file = folder / "config_sentence_transformers.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), "truncate_dim": 0}))
    with pytest.raises(ValueError, match="truncate_dim=0: "):  # a saved truncate_dim is checked at loading
        SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")


def test_save_round_trip_and_automodel_in_the_same_folder(checkpoints, tmp_path):
    st_model = SentenceTransformer(checkpoints("llava_onevision"), trust_remote_code=True, device="cpu")
    inputs = ["a blue circle", _image("blue"), {"image": _image("red"), "text": "a shape"}]
    before = st_model.encode(inputs, convert_to_tensor=True)
    saved = tmp_path / "saved"
    st_model.save(str(saved))
    again = SentenceTransformer(str(saved), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(again.encode(inputs, convert_to_tensor=True), before, atol=ATOL, rtol=0)
    assert json.loads((saved / "modules.json").read_text())[0]["type"] == "sentence_unime.UniMEV2SentenceEmbedder"
    from transformers import AutoModel

    automodel = AutoModel.from_pretrained(str(saved), trust_remote_code=True)
    torch.testing.assert_close(
        automodel.encode(texts=["a blue circle", None, "a shape"], images=[None, inputs[1], inputs[2]["image"]]),
        before, atol=ATOL, rtol=0,
    )


FRESH_PROCESS = """
import json, sys
from sentence_transformers import SentenceTransformer
from PIL import Image
model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
assert "modeling_unime" not in sys.modules, "the package was imported: the checkpoint is not self-contained"
rows = json.loads(sys.argv[2])
inputs = [row["text"] if row["image"] is None else {"image": Image.open(row["image"]), "text": row["text"]}
          for row in rows]
print(json.dumps(model.encode(inputs).tolist()))
"""


def test_authors_checkpoints_through_sentence_transformers_give_the_449_references(tmp_path):
    """The converted released checkpoints (fixtures written by transformers 4.49, the authors' stack), loaded by
    SentenceTransformer in a process without this package: image rows of the Qwen2-VL checkpoints included (their
    1-D image positions)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from authors_fixtures import authors_fixtures, load_references

    from modeling_unime.export.convert import convert_checkpoint

    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    for name in ("qwen2vl-2b", "llava-ov-8b"):
        references = load_references(name)
        converted = convert_checkpoint(authors_fixtures() / name, tmp_path / name, dtype=torch.float32)
        # The converter's size rule (1344x1344) is the authors' "high" evaluation rule; text rows need none.
        rows = [row for row in references["rows"] if row["image"] is None or row["resolution"] == "high"]
        assert any(row["image"] for row in rows) and any(row["image"] is None for row in rows)
        payload = [dict(text=row["source_text"], image=str(authors_fixtures() / "images" / row["image"])
                        if row["image"] else None) for row in rows]
        script = tmp_path / "st_fresh.py"
        script.write_text(FRESH_PROCESS)
        result = subprocess.run([sys.executable, str(script), str(converted), json.dumps(payload)], cwd=tmp_path,
                                env=environment, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        embeddings = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
        expected = torch.stack([references["tensors"][row["embedding_key"]] for row in rows])
        torch.testing.assert_close(embeddings, expected, atol=ATOL, rtol=0, msg=name)


# ------------------------------------------------------------------------------------------------------ training


def _gradients(model):
    return {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
            if parameter.grad is not None}


def _mixed_judge_rows(image_root):
    """Six judge rows whose columns mix text-only and image rows (so image tensors must be cut per row), one of
    which has fewer negatives than k (repeated in order)."""
    from datasets import Dataset

    from modeling_unime.data import UNIME_FEATURES

    rows = synthetic_judge_dataset(6, image_root, num_negatives=3).to_list()
    rows[1]["query_image"], rows[1]["query_text"] = None, "a text-only query about a red circle"
    rows[2]["pos_image"] = rows[0]["query_image"]
    rows[3]["neg_images"] = [None, rows[2]["query_image"], None]
    rows[4]["neg_texts"], rows[4]["neg_images"] = rows[4]["neg_texts"][:2], [None, None]
    rows[4]["judge_scores"] = [0.9, 0.3, 0.1]
    return Dataset.from_list(rows, features=UNIME_FEATURES)


@pytest.mark.parametrize("mini_batch_size", [1, 3, 8])
def test_cached_soft_label_loss_gives_our_trainers_loss_and_gradients(tmp_path, mini_batch_size):
    from trainers import UniMEV2Trainer, UniMEV2TrainingArguments

    model, processor = build_tiny_unime("qwen2_vl")
    model.train()
    image_root = tmp_path / "images"
    judge_rows = _mixed_judge_rows(image_root)
    args = UniMEV2TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=6, num_negatives=3,
                                    report_to=[], use_cpu=True, save_strategy="no")
    trainer = UniMEV2Trainer(model=model, args=args, train_dataset=judge_rows, processing_class=processor,
                             image_root=image_root)
    batch = trainer._prepare_inputs(trainer.data_collator(list(judge_rows)))
    ours = trainer.compute_loss(model, batch)
    ours.backward()
    expected = _gradients(model)
    model.zero_grad(set_to_none=True)

    rows = judge_rows_for_sentence_transformers(judge_rows, num_negatives=3, image_root=image_root)
    st_model = SentenceTransformer(modules=[UniMEV2SentenceEmbedder(model, processor)], device="cpu")
    st_model.train()
    features = [st_model.preprocess(rows[column]) for column in rows.column_names if column != "label"]
    labels = torch.tensor(rows["label"])
    torch.testing.assert_close(labels, batch["judge_scores"])
    loss = CachedSoftLabelAlignmentLoss(st_model, temperature=0.02, mini_batch_size=mini_batch_size)(features, labels)
    loss.backward()
    actual = _gradients(model)
    torch.testing.assert_close(loss.detach(), ours.detach(), atol=1e-6, rtol=1e-5)
    assert actual.keys() == expected.keys() and expected
    for name in expected:  # float32 noise of other batch shapes: 1e-5 of each tensor's largest entry
        scale = float(expected[name].abs().max())
        assert float((actual[name] - expected[name]).abs().max()) <= 1e-5 * scale + 1e-8, name
    # Negative control: another temperature gives other gradients.
    model.zero_grad(set_to_none=True)
    CachedSoftLabelAlignmentLoss(
        st_model, temperature=0.05, mini_batch_size=mini_batch_size
    )(features, labels).backward()
    assert any(float((parameter.grad - expected[name]).abs().max()) > 1e-3 * float(expected[name].abs().max())
               for name, parameter in model.named_parameters() if parameter.grad is not None)


def test_loss_refuses_mismatched_labels(tmp_path):
    model, processor = build_tiny_unime("qwen2_vl")
    st_model = SentenceTransformer(modules=[UniMEV2SentenceEmbedder(model, processor)], device="cpu")
    assert CachedSoftLabelAlignmentLoss(st_model).temperature == 0.02  # the paper's tau (implementation details)
    features = [st_model.preprocess(["q1", "q2"]), st_model.preprocess(["p1", "p2"]), st_model.preprocess(["n1", "n2"])]
    loss = CachedSoftLabelAlignmentLoss(st_model)
    with pytest.raises(ValueError, match="one judge score per candidate column"):
        loss(features, torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]]))
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        loss(features, torch.tensor([[90.0, 10.0], [0.8, 0.2]]))


def test_recipe_and_converter_checkpoints_carry_the_sentence_transformers_files(tmp_path):
    from trainers.adapters import save_checkpoint

    model, processor = build_tiny_unime("qwen2_5_vl")
    folder = save_checkpoint(model, processor, tmp_path / "trained")
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_unime.py", "config.json"):
        assert (folder / name).is_file(), name
    st_model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    torch.testing.assert_close(
        st_model.encode(["a text"], convert_to_tensor=True).cpu(), model.encode(texts=["a text"], processor=processor),
        atol=ATOL, rtol=0,
    )
    assert "SentenceTransformer(" in (folder / "README.md").read_text()


def test_llamaindex_multimodal_retrieval_through_sentence_transformers(checkpoints, tmp_path):
    """LlamaIndex's HuggingFaceEmbedding sits on SentenceTransformer: texts, image paths and image bytes embed as
    UniMEV2Model.encode does, and an image query retrieves over captions."""
    pytest.importorskip("llama_index.embeddings.huggingface")
    from io import BytesIO

    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    folder = checkpoints("qwen2_5_vl")
    embedder = HuggingFaceEmbedding(model_name=folder, trust_remote_code=True, device="cpu")
    model = UniMEV2Model.from_pretrained(folder)
    red_path = tmp_path / "red.png"
    _image("red").save(red_path)
    captions = ["a red square", "a blue circle", "a green triangle"]
    text_vectors = torch.tensor(embedder.get_text_embedding_batch(captions))
    torch.testing.assert_close(text_vectors, model.encode(texts=captions), atol=ATOL, rtol=0)
    image_vector = torch.tensor(embedder.get_image_embedding(str(red_path)))
    expected_image = model.encode(images=[str(red_path)])[0]
    torch.testing.assert_close(image_vector, expected_image, atol=ATOL, rtol=0)
    buffer = BytesIO(red_path.read_bytes())
    torch.testing.assert_close(torch.tensor(embedder.get_image_embedding(buffer)), expected_image, atol=ATOL, rtol=0)
    query = torch.tensor(embedder.get_query_embedding("a red square"))
    torch.testing.assert_close(query, text_vectors[0], atol=ATOL, rtol=0)  # no query instruction given: none used
