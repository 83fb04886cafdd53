"""evaluation.mteb_models: `mteb.evaluate` on MTEB's mock image, text and fused tasks with a tiny UniME-V2 checkpoint
(offline, no result cache), embeddings equal to `UniMEV2Model.encode` with the authors' instruction for each row, and
the instruction table checked against the authors' own data."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from typing import Any

import pytest
import torch

mteb = pytest.importorskip("mteb")

from datasets import Dataset, Features, Value  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from mteb._create_dataloaders import create_dataloader  # noqa: E402
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.mocks.mock_tasks import (  # noqa: E402
    MockAny2AnyRetrievalI2TTask,
    MockAny2AnyRetrievalT2ITask,
    MockImageClassificationTask,
    MockImageTextPairClassificationTask,
    MockRetrievalTask,
)
from mteb.models.model_meta import ModelMeta  # noqa: E402
from mteb.types import PromptType  # noqa: E402
from PIL import Image  # noqa: E402

from evaluation import mteb_models  # noqa: E402
from evaluation.mteb_models import (  # noqa: E402
    UNIME_V2_TASK_INSTRUCTIONS,
    UniMEV2MTEBEncoder,
    load_unime_v2_encoder,
    unime_v2_model_meta,
)
from modeling_unime import UniMEV2Model  # noqa: E402
from modeling_unime.tiny import build_tiny_unime  # noqa: E402

TOLERANCE = 1e-5
# The authors' strings, written out here rather than imported, so that a changed constant fails a test.
CAPTION = "Find an image caption describing the given image."
CLASSIFY = "Represent the given image for classification"
IMAGE_TARGET = "Represent the given image."
FUSED_TARGET = "Represent the given image with related text information:"
FUSED_QUERY_PROMPT = "Find the picture and the note that go with this one."


def _coloured(colour: str) -> Image.Image:
    return Image.new("RGB", (56, 56), colour)


class MockFusedRetrievalTask(AbsTaskRetrieval):
    """Image + text queries against a corpus of image + text, image-only and text-only documents (category it2it),
    with an MTEB query prompt, as MIEB's OVEN / InfoSeek tasks have."""

    metadata = TaskMetadata(
        name="MockUniMEV2FusedIT2ITRetrieval",
        description="Fused image + text retrieval with mixed documents, for UniME-V2's MTEB encoder tests.",
        reference="https://github.com/embeddings-benchmark/mteb",
        dataset={"path": "NA", "revision": "NA"},
        type="Any2AnyRetrieval",
        category="it2it",
        modalities=["image", "text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=("2025-01-01", "2025-01-01"),
        domains=[],
        task_subtypes=[],
        license="cc-by-4.0",
        annotations_creators="derived",
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
        prompt={"query": FUSED_QUERY_PROMPT},
    )

    def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
        features = Features({"id": Value("string"), "text": Value("string"), "image": ImageFeature()})
        queries = Dataset.from_dict(
            {"id": ["q0", "q1", "q2"], "text": ["a red square", "a blue note on a circle", "green"],
             "image": [_coloured("red"), _coloured("blue"), _coloured("green")]},
            features=features,
        )
        # Fused, text-only and image-only documents interleaved in one batch: each instruction group is encoded
        # on its own, and the rows must come back in their places.
        corpus = Dataset.from_dict(
            {"id": ["d0", "d1", "d2", "d3", "d4"],
             "text": ["the red one", "green text only", "", "a blue circle with a note", "a yellow star"],
             "image": [_coloured("red"), None, _coloured("blue"), _coloured("navy"), None]},
            features=features,
        )
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=queries, corpus=corpus,
            relevant_docs={"q0": {"d0": 1}, "q1": {"d3": 1}, "q2": {"d1": 1}}, top_ranked=None,
        )}}
        self.data_loaded = True


def expected_instruction(task: str, side: str | None, has_image: bool, has_text: bool) -> str | None:
    """What the encoder must choose for a row of each task run here (the module's rules, restated)."""
    if task in ("MockAny2AnyRetrievalI2T", "MockAny2AnyRetrievalT2I", "MockImageTextPairClassification"):
        return CAPTION if has_image else None
    if task == "MockImageClassification":
        return CLASSIFY
    if task == "MockRetrievalTask":
        return None
    if task == MockFusedRetrievalTask.metadata.name:
        if side == "query":
            return FUSED_QUERY_PROMPT
        if not has_image:
            return None
        return FUSED_TARGET if has_text else IMAGE_TARGET
    raise AssertionError(f"no expectation for task {task!r}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = build_tiny_unime("qwen2_vl")
    folder = tmp_path_factory.mktemp("mteb") / "tiny-unime-v2"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return load_unime_v2_encoder(unime_v2_model_meta(checkpoint))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """Our model, loaded on its own from the same folder."""
    return UniMEV2Model.from_pretrained(checkpoint).eval()


def _rows(inputs) -> list[tuple[str | None, Any]]:
    rows = []
    for batch in inputs:
        count = len(batch["text"] if "text" in batch else batch["image"])
        texts = batch.get("text", [None] * count)
        images = batch.get("image", [None] * count)
        rows.extend(zip(texts, images))
    return rows


def _reference_embeddings(reference, rows, instructions) -> torch.Tensor:
    """`UniMEV2Model.encode` of each row with its instruction, one call per instruction."""
    out = torch.empty(len(rows), reference.config.hidden_size)
    for instruction in set(instructions):
        members = [index for index, chosen in enumerate(instructions) if chosen == instruction]
        texts = [rows[index][0] if rows[index][0] else None for index in members]
        images = [rows[index][1] for index in members]
        out[members] = reference.encode(texts=texts, images=images, instruction=instruction, batch_size=len(members))
    return out


def _modality(text, image) -> str:
    if image is None:
        return "text"
    return "fused" if text else "image"


@pytest.fixture(scope="module")
def evaluated(encoder):
    """One `mteb.evaluate` run over the six mock tasks; every call of the encoder's `encode` is recorded."""
    calls = []
    original = encoder.encode

    def spy(inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        output = original(inputs, task_metadata=task_metadata, hf_split=hf_split, hf_subset=hf_subset,
                          prompt_type=prompt_type, **kwargs)
        calls.append((task_metadata.name, getattr(prompt_type, "value", prompt_type), _rows(inputs), output))
        return output

    tasks = [MockAny2AnyRetrievalI2TTask(), MockAny2AnyRetrievalT2ITask(), MockImageClassificationTask(),
             MockImageTextPairClassificationTask(), MockRetrievalTask(), MockFusedRetrievalTask()]
    encoder.encode = spy
    try:
        result = mteb.evaluate(encoder, tasks, cache=None, co2_tracker=False, show_progress_bar=False,
                               encode_kwargs={"batch_size": 4, "show_progress_bar": False})
    finally:
        del encoder.encode
    return result, calls


def test_evaluate_scores_image_text_and_fused_tasks(evaluated):
    result, calls = evaluated
    assert not result.exceptions
    scores = {task.task_name: task.get_score() for task in result.task_results}
    assert set(scores) == {"MockAny2AnyRetrievalI2T", "MockAny2AnyRetrievalT2I", "MockImageClassification",
                           "MockImageTextPairClassification", "MockRetrievalTask", "MockUniMEV2FusedIT2ITRetrieval"}
    assert all(isinstance(score, float) and math.isfinite(score) for score in scores.values()), scores
    assert {(name, side) for name, side, _, _ in calls} >= {
        ("MockAny2AnyRetrievalI2T", "query"), ("MockAny2AnyRetrievalT2I", "document"),
        ("MockUniMEV2FusedIT2ITRetrieval", "query"), ("MockUniMEV2FusedIT2ITRetrieval", "document"),
        ("MockImageClassification", None), ("MockImageTextPairClassification", None),
    }


def test_embeddings_under_evaluate_equal_ours(evaluated, reference):
    """Every embedding mteb received equals `UniMEV2Model.encode` of the same row with the expected instruction."""
    _, calls = evaluated
    worst: dict[str, float] = {}
    for task, side, rows, output in calls:
        instructions = [expected_instruction(task, side, image is not None, bool(text)) for text, image in rows]
        expected = _reference_embeddings(reference, rows, instructions)
        assert output.dtype == torch.float32 and output.shape == expected.shape
        for index, (text, image) in enumerate(rows):
            diff = (output[index] - expected[index]).abs().max().item()
            modality = _modality(text, image)
            worst[modality] = max(worst.get(modality, 0.0), diff)
            assert diff <= TOLERANCE, (task, side, index, instructions[index], diff)
    assert set(worst) == {"text", "image", "fused"}, worst
    print("max abs diff per modality:", worst)


def test_wrong_instruction_or_dropped_image_gives_other_embeddings(evaluated, reference):
    """Negative controls: the parity above can fail."""
    _, calls = evaluated
    name, side, rows, output = next(
        call for call in calls if call[0] == "MockAny2AnyRetrievalI2T" and call[1] == "query"
    )
    images = [image for _, image in rows]
    wrong = reference.encode(images=images, instruction="Find an image caption describing the given everyday image.")
    none = reference.encode(images=images)
    assert (wrong - output).abs().max() > 1e-3 and (none - output).abs().max() > 1e-3
    name, side, rows, output = next(
        call for call in calls if call[0] == "MockUniMEV2FusedIT2ITRetrieval" and call[1] == "query"
    )
    text_only = reference.encode(texts=[text for text, _ in rows], instruction=FUSED_QUERY_PROMPT)
    image_only = reference.encode(images=[image for _, image in rows], instruction=FUSED_QUERY_PROMPT)
    assert (text_only - output).abs().max() > 1e-3 and (image_only - output).abs().max() > 1e-3


def test_known_tasks_get_the_authors_instructions(encoder, shared_data):
    def chosen(task, side, has_image, has_text=True):
        return encoder.instruction_for(mteb.get_task(task).metadata, side, has_image=has_image, has_text=has_text)

    assert chosen("MSCOCOT2IRetrieval", "query", False) == "Find me an everyday image that matches the given caption:"
    assert chosen("MSCOCOT2IRetrieval", "document", True, False) == IMAGE_TARGET
    assert chosen("MSCOCOI2TRetrieval", "query", True, False) == (
        "Find an image caption describing the given everyday image."
    )
    assert chosen("MSCOCOI2TRetrieval", "document", False) is None
    assert chosen("CIRRIT2IRetrieval", "query", True) == (
        "Given an image, find a similar everyday image with the described changes:"
    )
    assert chosen("WebQAT2ITRetrieval", "document", True) == (
        "Represent the given Wikipedia image with related text information:"
    )
    assert chosen("WebQAT2ITRetrieval", "document", False) is None  # a text-only document stays raw
    assert chosen("Imagenet1k", None, True, False) == CLASSIFY
    assert chosen("Imagenet1kZeroShot", None, False) is None  # the labels
    assert chosen("Flickr30kT2IRetrieval", "query", False) is None  # mteb's own prompt is not used: captions raw
    assert chosen("Flickr30kT2IRetrieval", "document", True, False) == CAPTION
    assert chosen("SugarCrepe", None, True, False) == CAPTION
    assert chosen("SugarCrepe", None, False) is None
    infoseek = mteb.get_task("InfoSeekIT2TRetrieval").metadata  # not MMEB's: its own MTEB query prompt
    assert chosen("InfoSeekIT2TRetrieval", "query", True) == infoseek.prompt["query"]

    from evaluation.retrieval import IMAGE_QUERY_INSTRUCTION

    assert IMAGE_QUERY_INSTRUCTION == CAPTION
    # Every MMEB string of the table that the authors' training sample uses appears there verbatim, where MMEB puts it.
    rows = json.loads((shared_data / "unime_v2_official_example_data.json").read_text())
    queries = {row["query_text"] for row in rows}
    targets = {row["pos_text"] for row in rows} | {text for row in rows for text, _ in row["hard_negatives"]}
    image = "<|image_1|>\n"
    in_sample = {  # task: (how its query text starts, how its target text starts), as MMEB stores them
        "MSCOCOI2TRetrieval": (image + "{}\n", None),
        "MSCOCOT2IRetrieval": ("{} ", image + "{}\n"),
        "VisualNewsI2TRetrieval": (image + "{}\n", None),
        "VisualNewsT2IRetrieval": ("{} ", image + "{}\n"),
        "CIRRIT2IRetrieval": (image + "{} ", image + "{}\n"),
        "NIGHTSI2IRetrieval": (image + "{}\n", image + "{}\n"),
        "WebQAT2ITRetrieval": (image + "{} ", image + "{} "),
        "Imagenet1k": (image + "{}\n", None),
        "SUN397": (image + "{}\n", None),
        "OKVQAIT2TRetrieval": (image + "{} ", None),
    }
    for task, (query_form, target_form) in in_sample.items():
        entry = UNIME_V2_TASK_INSTRUCTIONS[task]
        assert any(text.startswith(query_form.format(entry.query)) for text in queries), (task, entry.query)
        if target_form:
            assert any(text.startswith(target_form.format(entry.document)) for text in targets), (task, entry.document)
    for task in UNIME_V2_TASK_INSTRUCTIONS:
        mteb.get_task(task)  # every key is a task MTEB knows


def test_mapped_task_fused_and_mixed_rows_through_encode(encoder, reference):
    """A mapped task through `encode` with MTEB's dataloader: fused queries, mixed documents, order kept."""
    features = Features({"id": Value("string"), "text": Value("string"), "image": ImageFeature()})
    data = Dataset.from_dict(
        {"id": ["a", "b", "c", "d", "e"], "text": ["a longer text that is a passage", "an owl", "x", "", "a fox"],
         "image": [None, _coloured("red"), None, _coloured("blue"), _coloured("white")]},
        features=features,
    )
    task = mteb.get_task("OVENIT2ITRetrieval").metadata
    for side in (PromptType.query, PromptType.document):
        loader = create_dataloader(data, task_metadata=task, prompt_type=side, batch_size=5)
        rows = _rows(loader)
        got = encoder.encode(loader, task_metadata=task, hf_split="test", hf_subset="default", prompt_type=side,
                             show_progress_bar=False)
        entry = UNIME_V2_TASK_INSTRUCTIONS["OVENIT2ITRetrieval"]
        if side == PromptType.query:
            instructions = [entry.query] * len(rows)
        else:
            instructions = [entry.document if image is not None else None for _, image in rows]
        expected = _reference_embeddings(reference, rows, instructions)
        assert (got - expected).abs().max() <= TOLERANCE


def test_metas_and_loading(checkpoint, encoder, monkeypatch):
    meta = unime_v2_model_meta(checkpoint)
    assert meta.name == "local/tiny-unime-v2" and meta.loader is UniMEV2MTEBEncoder
    assert meta.embed_dim == encoder.model.config.hidden_size
    assert meta.n_parameters == sum(p.numel() for p in encoder.model.parameters())
    assert meta.modalities == ["image", "text"] and meta.loader_kwargs["model_path"] == str(checkpoint.resolve())
    assert encoder.mteb_model_meta.name == meta.name
    # mteb's own path; its check of the "image" extra wants torchvision, which the package does not use.
    monkeypatch.setattr(ModelMeta, "_check_requirements", lambda self: None)
    loaded = meta.load_model(device="cpu")
    assert isinstance(loaded, UniMEV2MTEBEncoder) and loaded.mteb_model_meta.name == meta.name

    released = mteb_models.UNIME_V2_MODEL_METAS
    assert {name: m.embed_dim for name, m in released.items()} == {
        "TianchengGu/UniME-V2-Qwen2VL-2B": 1536, "TianchengGu/UniME-V2-Qwen2VL-7B": 3584,
        "TianchengGu/UniME-V2-LLaVA-OneVision-8B": 3584,
    }
    assert all(m.loader is UniMEV2MTEBEncoder and m.modalities == ["image", "text"] for m in released.values())
    assert unime_v2_model_meta("TianchengGu/UniME-V2-Qwen2VL-2B") == released["TianchengGu/UniME-V2-Qwen2VL-2B"]


def test_bad_inputs_are_named(encoder):
    task = MockAny2AnyRetrievalI2TTask.metadata
    with pytest.raises(ValueError, match="texts and images only"):
        encoder._encode_batch({"video": [b""]}, task, PromptType.query)
    with pytest.raises(ValueError, match="prompt_type"):
        encoder.instruction_for(task, "passage", has_image=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        UniMEV2MTEBEncoder("local/x", model=encoder.model, trust_me=True)
    overrides = {"MockAny2AnyRetrievalI2T-query": "Q"}
    overridden = UniMEV2MTEBEncoder("local/x", model=encoder.model, instructions=overrides)
    assert overridden.instruction_for(task, "query", has_image=True) == "Q"
    assert overridden.instruction_for(task, "document", has_image=False) is None
    plain = UniMEV2MTEBEncoder("local/x", model=encoder.model, use_task_instructions=False)
    assert plain.instruction_for(mteb.get_task("CIRRIT2IRetrieval").metadata, "query", has_image=True) is None


def test_module_imports_without_mteb(monkeypatch):
    for name in [name for name in sys.modules if name == "mteb" or name.startswith("mteb.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mteb", None)
    spec = importlib.util.spec_from_file_location("mteb_models_without_mteb", mteb_models.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.MTEB_IMPORT_ERROR is not None
    assert module.UNIME_V2_TASK_INSTRUCTIONS["CIRRIT2IRetrieval"].document == IMAGE_TARGET
    with pytest.raises(ImportError, match="pip install"):
        module.UniMEV2MTEBEncoder("local/x")
    with pytest.raises(ImportError, match="pip install"):
        module.unime_v2_qwen2vl_2b
