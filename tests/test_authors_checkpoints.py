"""The package against checkpoints and outputs written by the authors' own stack (transformers 4.49.0).

The fixtures (tests/fixtures/build_authors_checkpoints.py, see tests/fixtures/README.md) replay the authors'
merge-and-save path under transformers 4.49 and store what 4.49's own classes compute with the authors' recipe:
embeddings of text, image and image+text rows (alone and in their left-padded batches), the prompts and input ids,
image-token counts under each of their image sizes, and the reranker's pairwise and listwise scores. Nothing here is
compared against transformers 5.x's own classes.
"""

import ast
import json
import re
import textwrap
from functools import lru_cache

import pytest
import torch
from authors_fixtures import authors_fixtures, load_references
from PIL import Image
from safetensors import safe_open

from conftest import run_fresh_python
from modeling_unime import UniMEV2Model, UniMEV2Processor, UniMEV2Reranker
from modeling_unime.export.convert import convert_checkpoint, verify_checkpoint
from modeling_unime.modeling_unime import BACKBONE_KEY_MAPPINGS

EMBEDDERS = ["qwen2vl-2b", "qwen2vl-7b", "llava-ov-8b"]
RERANKER = "reranker-qwen25vl-7b"
ATOL = 1e-5
# The authors' `process_image` resolution flag -> our preset (their default flag is "high"; no flag caps at 1344).
RESOLUTION_PRESETS = {"high": "authors-eval", "mid": "authors-train-qwen2vl", "mid_336": "authors-train-llava-ov",
                      None: "authors-default"}


def _preset(resolution):
    return RESOLUTION_PRESETS[resolution] if resolution in RESOLUTION_PRESETS else "authors-default"


@lru_cache(maxsize=None)
def _embedder(name):
    return UniMEV2Model.from_pretrained(authors_fixtures() / name, dtype=torch.float32).eval()


@lru_cache(maxsize=None)
def _processor(name):
    return UniMEV2Processor.from_pretrained(authors_fixtures() / name)


def _image(file_name):
    return None if file_name is None else Image.open(authors_fixtures() / "images" / file_name)


def _embed_row(model, processor, row):
    """One reference row through our processor and model, under the image size the authors used for it."""
    batch = processor(texts=[row["source_text"]], images=[_image(row["image"])],
                      image_resize=_preset(row["resolution"]))
    with torch.no_grad():
        return batch, model(**batch).embeddings[0]


# ------------------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", [*EMBEDDERS, RERANKER])
def test_every_weight_loads_bit_equal(name):
    folder = authors_fixtures() / name
    model_class = UniMEV2Reranker if name == RERANKER else UniMEV2Model
    model, info = model_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    # The processor a plain checkpoint gets: the authors' evaluation sizes (the reranker's rerank stage for it).
    assert model.processor.image_resize == ("square:1344,max_pixels:235200" if name == RERANKER else "square:1344")
    mapping = BACKBONE_KEY_MAPPINGS[model.config.backbone_type]
    state = model.state_dict()
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == (3 if name == "qwen2vl-7b" else 1)
    compared = 0
    for file in files:
        with safe_open(file, "pt") as checkpoint:
            for key in checkpoint.keys():
                ours = key
                for pattern, replacement in mapping.items():
                    if re.search(pattern, ours):
                        ours = re.sub(pattern, replacement, ours)
                        break
                if "lm_head" in key and name != RERANKER:
                    continue  # an embedder has no LM head
                stored = checkpoint.get_tensor(key)
                assert stored.dtype == torch.bfloat16  # the authors saved bf16
                assert torch.equal(state[ours], stored.float()), key
                compared += 1
    assert compared == len([key for key in state if not (name == RERANKER and key == "lm_head.weight" and
                                                        model.config.tie_word_embeddings)])
    if name == "qwen2vl-2b":  # tied: the file has no lm_head at all
        assert not any("lm_head" in key for file in files for key in safe_open(file, "pt").keys())


# ---------------------------------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("name", EMBEDDERS)
def test_each_row_has_the_authors_prompt_ids_and_embedding(name):
    references = load_references(name)
    model, processor = _embedder(name), _processor(name)
    assert processor.image_resize == "square:1344"  # what a plain checkpoint gets: their evaluation size
    kinds = set()
    for row in references["rows"]:
        batch, embedding = _embed_row(model, processor, row)
        assert batch["input_ids"][0].tolist() == row["input_ids"], row["id"]
        image_tokens = int((batch["input_ids"] == references["image_token_id"]).sum())
        assert image_tokens == row["num_image_tokens"], row["id"]
        if "image_grid_thw" in row:
            assert batch["image_grid_thw"][0].tolist() == row["image_grid_thw"]
        torch.testing.assert_close(embedding, references["tensors"][row["embedding_key"]], atol=ATOL, rtol=0)
        kinds.add((row["image"] is not None, bool(row["source_text"].replace("<|image_1|>", "").strip())))
    assert {(False, True), (True, True)} <= kinds  # text rows and image(+instruction) rows


@pytest.mark.parametrize("name", EMBEDDERS)
def test_left_padded_mixed_batches_equal_the_authors_batches(name):
    references = load_references(name)
    model, processor = _embedder(name), _processor(name)
    rows = {row["id"]: row for row in references["rows"]}
    for batch_name, reference in references["batches"].items():
        members = [rows[row_id] for row_id in reference["row_ids"]]
        (rule,) = {_preset(row["resolution"]) for row in members if row["image"]}  # one image size per batch
        texts, images = [row["source_text"] for row in members], [_image(row["image"]) for row in members]
        batch = processor(texts=texts, images=images, image_resize=rule)
        assert batch["input_ids"].tolist() == reference["input_ids"], batch_name
        with torch.no_grad():
            embeddings = model(**batch).embeddings
        expected = references["tensors"][reference["embedding_key"]]
        torch.testing.assert_close(embeddings, expected, atol=ATOL, rtol=0)
        # encode() sorts and re-batches the rows: the same vectors, in the input order.
        processor.image_resize = rule
        try:
            encoded = model.encode(texts=texts, images=images, processor=processor, batch_size=2)
        finally:
            processor.image_resize = "authors-eval"
        torch.testing.assert_close(encoded, expected, atol=ATOL, rtol=0)


def test_transformers_5_positions_would_not_match(monkeypatch):
    """Negative control: with 3-D positions for every image token (transformers 5.x's rule) the same checkpoint no
    longer gives the authors' image embeddings, while text rows are unchanged."""
    references = load_references("qwen2vl-2b")
    model, processor = _embedder("qwen2vl-2b"), _processor("qwen2vl-2b")
    monkeypatch.setattr(model.config, "image_position_rule", "all_images")
    for row in references["rows"]:
        _, embedding = _embed_row(model, processor, row)
        difference = float((embedding - references["tensors"][row["embedding_key"]]).abs().max())
        assert (difference > 1e-3) if row["image"] else (difference <= ATOL), (row["id"], difference)


# ---------------------------------------------------------------------------------------------------- image sizes


@pytest.mark.parametrize("name", EMBEDDERS)
def test_image_token_counts_under_the_authors_sizes(name):
    processor = _processor(name)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    cases = load_references("token_counts")["image_tokens"][name]
    assert any(case["image_tokens"] == 2304 for case in cases) or name == "llava-ov-8b"
    for case in cases:
        image = Image.new("RGB", tuple(case["source_size"]), (90, 140, 200))
        batch = processor(texts=[None], images=[image], image_resize=_preset(case["resolution"]))
        assert int((batch["input_ids"] == image_token_id).sum()) == case["image_tokens"], case["case"]
        if "image_grid_thw" in case:
            assert batch["image_grid_thw"][0].tolist() == case["image_grid_thw"], case["case"]
        if "pixel_values_shape" in case:
            assert list(batch["pixel_values"].shape) == case["pixel_values_shape"], case["case"]


def test_reranker_image_cap_token_counts():
    processor = UniMEV2Processor.from_pretrained(authors_fixtures() / RERANKER)
    for case in load_references("token_counts")["image_tokens"][RERANKER]:
        rule = "authors-reranker-eval" if case["resolution"] == "high" else "authors-reranker"
        image = Image.new("RGB", tuple(case["source_size"]), (200, 60, 60))
        if "error" in case:
            with pytest.raises(ValueError, match="aspect ratio"):
                processor(texts=[None], images=[image], image_resize=rule)
            continue
        batch = processor(texts=[None], images=[image], image_resize=rule)
        grid = batch["image_grid_thw"][0].tolist()
        assert grid == case["image_grid_thw"], case["case"]
        assert [grid[2] * 14, grid[1] * 14] == case["capped_wh"], case["case"]


def test_every_loader_gives_the_authors_reranker_folder_the_reranker_rule():
    # The folder holds no UniME-V2 processor settings: the rule comes from what it is (the authors' reranker is their
    # Qwen2.5-VL release), and the reranker's own lazy processor, a bare processor load and a reload all agree.
    image = Image.new("RGB", (640, 480), (200, 60, 60))
    direct = UniMEV2Processor.from_pretrained(authors_fixtures() / RERANKER)
    lazy = UniMEV2Reranker.from_pretrained(authors_fixtures() / RERANKER, dtype=torch.float32).processor
    assert direct.image_resize == lazy.image_resize == "square:1344,max_pixels:235200"
    grids = [processor(texts=[None], images=[image])["image_grid_thw"][0].tolist() for processor in (direct, lazy)]
    assert grids[0] == grids[1] == [1, 34, 34]  # 1344x1344 capped to 476x476: 17 x 17 = 289 merged tokens, not 2304
    embedder = UniMEV2Processor.from_pretrained(authors_fixtures() / "qwen2vl-2b")
    assert embedder.image_resize == "square:1344"
    assert embedder(texts=[None], images=[image])["image_grid_thw"][0].tolist() == [1, 96, 96]  # 2304 tokens
    assert UniMEV2Processor.from_pretrained(authors_fixtures() / RERANKER,
                                            plain_checkpoint_image_resize="authors-eval").image_resize == "square:1344"


# ------------------------------------------------------------------------------------------------------ reranker


def _parse_items(content):
    """(query, candidates) as (text, image) items from the message content the authors' code builds: a header
    ("Query:", "Candidate:", "Candidates:") or a list marker ("(k) ") starts an item; an image and a text that follow
    belong to it."""
    groups, header = {}, None
    items = ast.literal_eval(content) if isinstance(content, str) else content
    for item in items[1:]:  # [0] is the instruction
        if item["type"] == "text" and item["text"] in ("Query:", "Candidate:", "Candidates:"):
            header = item["text"]
            groups[header] = [] if header == "Candidates:" else [[None, None]]
        elif item["type"] == "text" and re.fullmatch(r"\(\d+\) ", item["text"]):
            groups[header].append([None, None])
        elif item["type"] == "image":
            groups[header][-1][1] = str(authors_fixtures() / "images" / item["image"])
        else:
            groups[header][-1][0] = item["text"] or None
    candidates = groups.get("Candidate:") or groups["Candidates:"]
    return tuple(groups["Query:"][0]), [tuple(candidate) for candidate in candidates]


@lru_cache(maxsize=None)
def _reranker():
    return UniMEV2Reranker.from_pretrained(authors_fixtures() / RERANKER, dtype=torch.float32).eval()


def test_reranker_pairwise_scores_and_prompts():
    references = load_references(RERANKER)
    reranker = _reranker()
    assert reranker.processor.image_resize == "square:1344,max_pixels:235200"  # the authors' rerank stage
    scorer = reranker.scorer()
    for case in references["pairwise"]:
        query, (candidate,) = _parse_items(case["content"])
        assert scorer.render(query, candidate) == case["prompt"], case["id"]
        score = reranker.score(query, [candidate])
        torch.testing.assert_close(score, torch.tensor([case["p_yes_single"]]), atol=ATOL, rtol=0)
        # The released labels' scores: generate()'s repetition penalty (1.05) on the two logits.
        official = reranker.scorer(official_compat=True).score(query[0], query[1], [candidate])
        torch.testing.assert_close(official, torch.tensor([case["p_yes_authors_generate_scores0"]]), atol=ATOL, rtol=0)


def test_reranker_listwise_scores_and_prompts():
    references = load_references(RERANKER)
    reranker = _reranker()
    scorer = reranker.scorer()
    for case in references["listwise"]:
        query, candidates = _parse_items(case["content"])
        assert scorer.render_listwise(query, candidates) == case["prompt"], case["id"]
        _, scores = reranker.rerank(query, candidates, mode="listwise")
        if len(candidates) < 10:
            torch.testing.assert_close(scores, torch.tensor(case["softmax_single"]), atol=ATOL, rtol=0)
            continue
        # Ten candidates: "10" is two tokens. Independently of our code: P(k) = P(first digit k | valid first digits)
        # times, for the first digit 1, P(")" or "0" | after "1").
        first = case["answer_token_logits_after_prefix"]
        first_digits = torch.tensor([first[str(digit)] for digit in range(1, 10)]).softmax(0)
        after_one = case["answer_token_logits_after_first_digit_1"]
        second = torch.tensor([after_one[")"], after_one["0"]]).softmax(0)
        expected = torch.cat([first_digits[:1] * second[0], first_digits[1:], first_digits[:1] * second[1]])
        torch.testing.assert_close(scores, expected, atol=ATOL, rtol=0)
        assert abs(float(scores.sum()) - 1) < 1e-5


# ---------------------------------------------------------------------------------- converter and fresh AutoModel


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_unime", "trainers", "evaluation"):
        sys.modules[name] = None  # a user's process without the package: the code travels with the checkpoint
    import torch
    from PIL import Image
    from transformers import AutoModel
    jobs = json.loads(sys.argv[1])
    results = {}
    for job in jobs:
        model = AutoModel.from_pretrained(job["path"], trust_remote_code=True, dtype=torch.float32)
        assert type(model).__name__ == "UniMEV2Model", type(model)
        for row in job["rows"]:
            image = Image.open(row["image"]) if row["image"] else None
            model.processor.image_resize = row["image_resize"]
            results[job["name"] + "/" + row["id"]] = model.encode(texts=[row["text"]], images=[image])[0].tolist()
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def test_converter_and_fresh_process_automodel_give_the_references(tmp_path):
    jobs, expected = [], {}
    for name in EMBEDDERS:
        references = load_references(name)
        source = authors_fixtures() / name
        converted = convert_checkpoint(source, tmp_path / name, verify=True, dtype=torch.float32)
        model = UniMEV2Model.from_pretrained(converted, dtype=torch.float32)
        assert model.processor.image_resize == "square:1344"
        card = (converted / "README.md").read_text()
        assert "1344x1344" in card
        if name.startswith("qwen"):
            assert model.config.image_position_rule == "vision_start_only" and "vision_start_only" in card
        rows = []
        for row in references["rows"]:
            batch = model.processor(texts=[row["source_text"]], images=[_image(row["image"])],
                                    image_resize=_preset(row["resolution"]))
            with torch.no_grad():
                embedding = model(**batch).embeddings[0]
            torch.testing.assert_close(embedding, references["tensors"][row["embedding_key"]], atol=ATOL, rtol=0)
            rows.append(dict(id=row["id"], text=row["source_text"], image_resize=_preset(row["resolution"]),
                             image=str(authors_fixtures() / "images" / row["image"]) if row["image"] else None))
            expected[f"{name}/{row['id']}"] = references["tensors"][row["embedding_key"]]
        jobs.append(dict(name=name, path=str(converted), rows=rows))
    script, output = tmp_path / "load.py", tmp_path / "embeddings.json"
    script.write_text(FRESH_PROCESS_SCRIPT)
    result = run_fresh_python([str(script), json.dumps(jobs), str(output)], tmp_path, timeout=900,
                              HF_MODULES_CACHE=str(tmp_path / "modules"))
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(output.read_text())
    assert fresh.keys() == expected.keys()
    for key, reference in expected.items():
        torch.testing.assert_close(torch.tensor(fresh[key]), reference, atol=ATOL, rtol=0, msg=key)


def test_verify_refuses_a_conversion_with_the_wrong_position_rule(tmp_path):
    source = authors_fixtures() / "qwen2vl-2b"
    converted = convert_checkpoint(source, tmp_path / "converted", dtype=torch.float32)
    config_path = converted / "config.json"
    config = json.loads(config_path.read_text())
    config["image_position_rule"] = "all_images"
    config_path.write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="differently from the authors' recipe"):
        verify_checkpoint(source, converted, dtype=torch.float32)
