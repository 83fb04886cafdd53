"""The shared utility layer (modeling_unime.util): image checks, the rerank head, per-row generators, model specs and
recipe arguments. (The chunked top-k is tested in tests/test_mining_rules.py, the caches in
tests/test_mining_caches.py.)"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

from evaluation.rerank import rerank_head
from modeling_unime.model_specs import load_model_spec, tiny_family
from modeling_unime.placement import placement
from modeling_unime.util.arguments import parse_recipe_arguments
from modeling_unime.util.images import MissingImagesError, missing_image_files, require_image_files
from trainers.seeding import row_rng, stable_key


def test_image_checks_name_the_missing_files_with_their_labels(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert missing_image_files(["a.png", "b.png", "b.png", str(tmp_path / "a.png")], tmp_path) == ["b.png"]
    require_image_files(["a.png", None, ""], tmp_path, "test", "-")
    with pytest.raises(MissingImagesError,
                       match=r"2 of 3 MMEB image file\(s\) not found under image_root='.*' "
                             r"\(first: row 1 pos_image 'b.png', row 2 query_image 'c.png'\)\. Fix"):
        require_image_files(["a.png", "b.png", "c.png"], tmp_path, "MMEB", "Fix it.",
                            labels=["row 0 query_image", "row 1 pos_image", "row 2 query_image"])
    with pytest.raises(ValueError):  # also a ValueError: bad input
        require_image_files(["z.png"], tmp_path, "x", "y")


class _ScriptedReranker:
    def __init__(self, order):
        self.order, self.calls = order, []

    def rerank(self, query, candidates, mode, image_root):
        self.calls.append((query, list(candidates), mode, image_root))
        return self.order, None


def test_rerank_head_reorders_only_the_head_and_keeps_left_out_positions():
    reranker = _ScriptedReranker(torch.tensor([2, 0]))
    items = [(f"c{i}", None) for i in range(6)]
    assert rerank_head([5, 4, 3, 2, 1, 0], ("q", None), items, reranker, top_k=4, mode="pairwise") == [3, 5, 4, 2, 1, 0]
    assert reranker.calls == [(("q", None), [items[5], items[4], items[3], items[2]], "pairwise", None)]
    with pytest.raises(ValueError, match="Query 7: the reranker returned order \\[0, 0\\]"):
        rerank_head([1, 0], ("q", None), items, _ScriptedReranker([0, 0]), top_k=2, query_index=7)


def test_row_generators_depend_on_content_seed_epoch_and_purpose_only():
    image = Image.new("RGB", (4, 4), "red")
    row = {"query_text": "q", "query_image": image, "pos_text": "p", "pos_image": None, "other": 1}
    same_content = {**row, "query_image": Image.new("RGB", (4, 4), "red"), "other": 2}
    assert row_rng(0, 0, row, "list").random() == row_rng(0, 0, same_content, "list").random()
    draws = {row_rng(*args).random() for args in
             [(0, 0, row, "list"), (1, 0, row, "list"), (0, 1, row, "list"), (0, 0, row, "negatives"),
              (0, 0, {**row, "pos_text": "p2"}, "list")]}
    assert len(draws) == 5
    assert stable_key(image) != stable_key(Image.new("RGB", (4, 4), "blue"))


def test_model_specs():
    assert tiny_family("tiny:llava_onevision") == "llava_onevision" and tiny_family("org/name") is None
    with pytest.raises(ValueError, match="family of a tiny: spec"):
        tiny_family("tiny:bert")
    where = placement("float32", "eager", "cpu")
    for kind, class_name in (("embedder", "UniMEV2Model"), ("reranker", "UniMEV2Reranker"),
                             ("judge", "Qwen2_5_VLForConditionalGeneration")):
        family = "qwen2_5_vl"
        model, processor = load_model_spec(f"tiny:{family}", kind, where)
        assert type(model).__name__ == class_name and model.dtype == torch.float32
        assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="kind="):
        load_model_spec("tiny:qwen2_vl", "scorer", where)


@dataclass
class _Script:
    model: str = field(metadata={"help": "required: the model"})
    threads: int = field(default=1, metadata={"help": "torch threads"})
    data_train: str = field(default="synthetic:8", metadata={"help": "training data"})
    data_image_root: str | None = field(default=None, metadata={"help": "image folder"})


@dataclass
class _Training:
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    gradcache: bool = field(default=False, metadata={"help": "GradCache"})


SECTIONS = {"data": "data_", "training": ""}


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_sections_flags_and_precedence(tmp_path):
    config = _write(tmp_path, "model: m\nthreads: 4\ndata:\n  train: pairs.json\n  image_root: imgs\n"
                              "training:\n  learning_rate: 1.0e-4\n  gradcache: true\n")
    script, training = parse_recipe_arguments([_Script, _Training], ["--config", config], sections=SECTIONS)
    assert (script.model, script.threads, script.data_train, script.data_image_root) == ("m", 4, "pairs.json", "imgs")
    assert training.learning_rate == 1e-4 and training.gradcache is True
    script, training = parse_recipe_arguments(
        [_Script, _Training], ["--config", config, "--threads", "2", "--learning_rate", "0.5", "--gradcache", "false"],
        sections=SECTIONS)
    assert script.threads == 2 and training.learning_rate == 0.5 and training.gradcache is False
    # Without a file: flags and defaults; a required field must then be given.
    script, _ = parse_recipe_arguments([_Script, _Training], ["--model", "x"], sections=SECTIONS)
    assert script.data_train == "synthetic:8"
    with pytest.raises(SystemExit):
        parse_recipe_arguments([_Script, _Training], [], sections=SECTIONS)


@pytest.mark.parametrize("text, message", [
    ("model: m\ntreads: 2\n", "unknown key 'treads' (did you mean 'threads'?)"),
    ("model: m\ndata:\n  trian: x\n", "unknown key 'data.trian' (did you mean 'data_train'?)"),
    ("model: m\ntraining:\n  learning_rte: 1\n", "unknown key 'learning_rte' (did you mean 'learning_rate'?)"),
    ("model: m\ndata: pairs.json\n", "section 'data' must be a mapping"),
    ("model: m\ndata_train: a\ndata:\n  train: b\n", "the key 'data_train' is given twice"),
])
def test_config_mistakes_are_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(ValueError) as error:
        parse_recipe_arguments([_Script, _Training], ["--config", _write(tmp_path, text)], sections=SECTIONS)
    assert message in str(error.value) and "recipe.yaml" in str(error.value)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_recipe_arguments([_Script, _Training], ["--help"], sections=SECTIONS)
    out = capsys.readouterr().out
    for kind in (_Script, _Training):
        for item in dataclasses.fields(kind):
            assert f"--{item.name}" in out and item.metadata["help"] in out
    assert "--config" in out
