"""MMEB-V2: the task table, the published layouts read back, the scorer against an independent computation, the
averages, the embedding cache, an end-to-end run with a tiny model and the harness.

The tiny layouts are written here as users get them (VLM2Vec at commit 6e1e1d4): a clone of TIGER-Lab/MMEB-V2 with
``video-tasks/frames/{video_cls,video_ret,video_mret,video_qa}/<Dataset>/<video>/frame_*.jpg``, and the Hub
annotation repos VLM2Vec reads at evaluation time downloaded to ``annotations/<owner>/<name>`` (parquet written by
`datasets`, a README with ``configs:``), with the column names its loaders read (``src/data/eval_dataset/*.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from conftest import REPO_ROOT, run_recipe
from evaluation import harness
from evaluation.mmeb_v2 import (
    MMEB_V2_CATEGORIES,
    MMEB_V2_TASKS,
    VIDEO_CLS_LABELS,
    MMEBV2Dataset,
    MMEBV2Paths,
    annotation_repos,
    evaluate_mmeb_v2,
    hit_at_k,
    list_frames,
    load_mmeb_v2_task,
    mmeb_v2_means,
    ndcg_linear_at_k,
    prepare_mmeb_v2,
    rank_scores,
    ranking_metrics,
    score_task,
    select_tasks,
)
from evaluation.report import mmeb_v2_table
from modeling_unime.util.embedding_cache import EmbeddingCache, embed_with_cache

SHARED = REPO_ROOT.parent / "shared" / "data"
QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. Return only "
             "the exact text of your chosen answer. Question: ")
# experiments/report_score_v2.py, modality2dataset, typed here independently of the module.
REPORT_SCORE_V2 = {
    "image": "ImageNet-1K N24News HatefulMemes VOC2007 SUN397 Place365 ImageNet-A ImageNet-R ObjectNet Country211 "
             "OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W ScienceQA VizWiz GQA TextVQA VisDial CIRR "
             "VisualNews_t2i VisualNews_i2t MSCOCO_t2i MSCOCO_i2t NIGHTS WebQA FashionIQ Wiki-SS-NQ OVEN EDIS MSCOCO "
             "RefCOCO RefCOCO-Matching Visual7W-Pointing",
    "video": "K700 SmthSmthV2 HMDB51 UCF101 Breakfast MVBench Video-MME NExTQA EgoSchema ActivityNetQA DiDeMo MSR-VTT "
             "MSVD VATEX YouCook2 QVHighlight Charades-STA MomentSeeker",
    "visdoc": "ViDoRe_arxivqa ViDoRe_docvqa ViDoRe_infovqa ViDoRe_tabfquad ViDoRe_tatdqa ViDoRe_shiftproject "
              "ViDoRe_syntheticDocQA_artificial_intelligence ViDoRe_syntheticDocQA_energy "
              "ViDoRe_syntheticDocQA_government_reports ViDoRe_syntheticDocQA_healthcare_industry "
              "ViDoRe_esg_reports_human_labeled_v2 ViDoRe_biomedical_lectures_v2_multilingual "
              "ViDoRe_economics_reports_v2_multilingual ViDoRe_esg_reports_v2_multilingual VisRAG_ArxivQA "
              "VisRAG_ChartQA VisRAG_MP-DocVQA VisRAG_SlideVQA VisRAG_InfoVQA VisRAG_PlotQA ViDoSeek-page "
              "ViDoSeek-doc MMLongBench-page MMLongBench-doc",
}


# ------------------------------------------------------------------------------------------------ the task table


def test_the_78_tasks_their_categories_metrics_and_eval_types():
    for modality, names in REPORT_SCORE_V2.items():
        listed = sorted(name for name, task in MMEB_V2_TASKS.items() if task.modality == modality)
        assert listed == sorted(names.split())
    assert len(MMEB_V2_TASKS) == 78
    sizes = {modality: [len(names) for names in categories.values()] for modality, categories in
             MMEB_V2_CATEGORIES.items()}
    assert sizes == {"image": [10, 10, 12, 4], "video": [5, 5, 5, 3], "visdoc": [10, 4, 6, 4]}
    assert {task.metric for task in MMEB_V2_TASKS.values() if task.modality != "visdoc"} == {"hit@1"}
    assert {task.metric for task in MMEB_V2_TASKS.values() if task.modality == "visdoc"} == {"ndcg_linear@5"}
    # experiments/public/eval/*.yaml: eval_type per task
    local = {name for name, task in MMEB_V2_TASKS.items() if task.eval_type == "local"}
    assert local == set(REPORT_SCORE_V2["image"].split()) | {
        "SmthSmthV2", "MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA", "QVHighlight", "Charades-STA",
        "MomentSeeker"}
    assert MMEB_V2_TASKS["SmthSmthV2"].max_rows == 1000 and MMEB_V2_TASKS["K700"].max_rows is None
    assert MMEB_V2_TASKS["K700"].hub == ("VLM2Vec/Kinetics-700", None, "test")
    assert MMEB_V2_TASKS["MSR-VTT"].hub == ("VLM2Vec/MSR-VTT", "test_1k", "test")
    assert MMEB_V2_TASKS["Charades-STA"].frames == "video-tasks/frames/video_mret/Charades_STA"
    assert MMEB_V2_TASKS["ViDoSeek-page"].hub[0] == "VLM2Vec/ViDoSeek-page-fixed"
    assert MMEB_V2_TASKS["ViDoRe_esg_reports_v2_multilingual"].pages == "visdoc-tasks/esg_reports_v2_multilingual"
    assert {name: len(labels.split("|")) for name, labels in VIDEO_CLS_LABELS.items()} == {
        "K700": 700, "UCF101": 101, "HMDB51": 51, "Breakfast": 10}
    assert all(len(set(labels.split("|"))) == len(labels.split("|")) for labels in VIDEO_CLS_LABELS.values())
    assert [task.name for task in select_tasks(["visdoc/ViDoRe-V2", "Breakfast"])] == [
        "Breakfast", "ViDoRe_esg_reports_human_labeled_v2", "ViDoRe_biomedical_lectures_v2_multilingual",
        "ViDoRe_economics_reports_v2_multilingual", "ViDoRe_esg_reports_v2_multilingual"]
    repos = annotation_repos()
    assert len(repos) == 43 and repos[0] == "TIGER-Lab/MMEB-eval" and "lmms-lab/YouCook2" in repos
    with pytest.raises(ValueError, match="'K-700' is not an MMEB-V2 task.*modalities: image, video, visdoc"):
        select_tasks(["K-700"])


# ------------------------------------------------------------------------------------------------ the scorer

def plain_hit(ranked, labels, k):
    """hit@k as VLM2Vec's RankingMetrics counts it, written out."""
    if not labels:
        return 0.0
    for name in ranked[:k]:
        if name in labels:
            return 1.0
    return 0.0


def plain_ndcg(ranked, qrels, k):
    """ndcg_linear@k with graded qrels ({name: grade}), written out: gain grade / log2(rank + 1), rank from 1."""
    dcg = 0.0
    for position in range(min(k, len(ranked))):
        rank = position + 1
        dcg += qrels.get(ranked[position], 0) / math.log2(rank + 1)
    grades = sorted(qrels.values(), reverse=True)
    idcg = 0.0
    for position in range(min(k, len(grades))):
        idcg += grades[position] / math.log2(position + 2)
    return dcg / idcg if idcg > 0 else 0.0


def test_ndcg_and_hit_against_a_plain_computation_with_grades_and_ties():
    # A hand value: ranking c, a, b with a: 2, b: 1 -> (2/log2 3 + 1/log2 4) / (2 + 1/log2 3).
    assert ndcg_linear_at_k(["c", "a", "b"], ["a", "b"], 5, [2, 1]) == pytest.approx(
        (2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3)))
    assert ndcg_linear_at_k(["a", "x"], ["a", "b"], 1, [1, 3]) == pytest.approx(1 / 3)   # IDCG from sorted grades
    assert ndcg_linear_at_k(["x", "a"], ["a"], 5) == pytest.approx(1 / math.log2(3))     # binary
    assert ndcg_linear_at_k(["x"], [], 5) == 0.0 and hit_at_k(["x"], [], 1) == 0.0
    rng = np.random.default_rng(3)
    names = [f"d{index}" for index in range(12)]
    for _ in range(300):
        scores = rng.integers(0, 4, len(names)).astype(np.float32) / 4   # many exact ties
        chosen = rng.choice(len(names), int(rng.integers(1, 5)), replace=False)
        qrels = {names[index]: int(rng.integers(1, 4)) for index in chosen}
        relevant = np.array([name in qrels for name in names])
        for rule in ("numpy", "stable", "strict"):
            order = rank_scores(scores, rule, relevant)
            ranked = [names[index] for index in order]
            assert sorted(order.tolist()) == list(range(len(names)))
            assert all(scores[a] >= scores[b] for a, b in zip(order, order[1:]))      # best first
            for k in (1, 5, 10):
                assert hit_at_k(ranked, list(qrels), k) == plain_hit(ranked, qrels, k)
                assert ndcg_linear_at_k(ranked, list(qrels), k, list(qrels.values())) == \
                    pytest.approx(plain_ndcg(ranked, qrels, k), abs=1e-12)
        # numpy is VLM2Vec's call; stable keeps candidate order among ties; strict puts labels after ties.
        assert rank_scores(scores, "numpy").tolist() == np.argsort(-scores).tolist()
        stable = rank_scores(scores, "stable").tolist()
        assert stable == sorted(range(len(names)), key=lambda index: (-scores[index], index))
        strict = rank_scores(scores, "strict", relevant).tolist()
        assert strict == sorted(range(len(names)), key=lambda index: (-scores[index], relevant[index], index))
    # The tie rules disagree exactly on a tie at the top between a label and another candidate.
    tied = np.array([0.5, 0.5, 0.1], dtype=np.float32)
    relevant = np.array([True, False, False])
    assert hit_at_k([["a", "b", "c"][i] for i in rank_scores(tied, "stable")], ["a"], 1) == 1.0
    assert hit_at_k([["a", "b", "c"][i] for i in rank_scores(tied, "strict", relevant)], ["a"], 1) == 0.0


def test_ranking_metrics_means_over_real_looking_rows():
    rows = [  # (ranked corpus ids, qrels), ViDoRe-V2-like graded qrels and a VisRAG-like single page
        (["p3", "p1", "p7", "p2", "p9", "p4"], {"p1": 2, "p2": 1}),
        (["p5", "p6", "p1"], {"p5": 1}),
        (["p8", "p2", "p3", "p4", "p5", "p6"], {"p6": 1, "p9": 2}),     # p9 never retrieved
    ]
    metrics = ranking_metrics([ranked for ranked, _ in rows], [list(qrels) for _, qrels in rows],
                              [list(qrels.values()) for _, qrels in rows])
    for k in (1, 5, 10):
        assert metrics[f"hit@{k}"] == pytest.approx(np.mean([plain_hit(r, q, k) for r, q in rows]))
        assert metrics[f"ndcg_linear@{k}"] == pytest.approx(np.mean([plain_ndcg(r, q, k) for r, q in rows]))
    assert metrics["hit@1"] == pytest.approx(1 / 3)
    assert metrics["ndcg_linear@5"] == pytest.approx(np.mean([
        (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3)), 1.0, 0.0]))


# ------------------------------------------------------------------------------------------------ the averages


def test_means_are_over_tasks_for_modalities_and_overall():
    rng = np.random.default_rng(0)
    scores = {name: float(rng.integers(0, 1000)) / 10 for name in MMEB_V2_TASKS}
    means, incomplete = mmeb_v2_means(scores)
    assert incomplete == {}
    for modality, title in (("image", "Image"), ("video", "Video"), ("visdoc", "VisDoc")):
        tasks = []
        for category, names in MMEB_V2_CATEGORIES[modality].items():
            assert means[f"{title}/{category}"] == pytest.approx(sum(scores[name] for name in names) / len(names))
            tasks += names
        category_means = [means[f"{title}/{category}"] for category in MMEB_V2_CATEGORIES[modality]]
        assert means[title] == pytest.approx(sum(scores[name] for name in tasks) / len(tasks))
        assert abs(means[title] - sum(category_means) / len(category_means)) > 0.01   # the two readings differ
    assert means["Overall"] == pytest.approx(sum(scores.values()) / 78)
    assert abs(means["Overall"] - (means["Image"] + means["Video"] + means["VisDoc"]) / 3) > 0.01
    # By hand, on three video tasks: CLS = 40, QA = 30, RET = 20; Video = (40 + 30 + 20) / 3 = 30.
    means, incomplete = mmeb_v2_means({"K700": 40.0, "HMDB51": 40.0, "MVBench": 30.0, "MSR-VTT": 20.0})
    assert means == {"Video/CLS": 40.0, "Video/QA": 30.0, "Video/RET": 20.0, "Video": 32.5, "Overall": 32.5}
    assert "Video/MRET" not in means and incomplete["Video"] == sorted(
        set(REPORT_SCORE_V2["video"].split()) - {"K700", "HMDB51", "MVBench", "MSR-VTT"})
    with pytest.raises(ValueError, match="not MMEB-V2 tasks"):
        mmeb_v2_means({"CIFAR-100": 1.0})


def test_published_per_task_scores_give_the_published_means():
    """Outside artefact: VLM2Vec's own per-task results (tests/data/mmeb_v2_published_scores.json, extracted from
    experiments/public/all_scores/v2.0.0/ at the commit it names). Each task's main metric, read by this registry's
    metric names, averaged as mmeb_v2_means averages, gives the VLM2Vec-V2 paper's row (Image 64.9, Video 34.6,
    VisDoc 65.4, Overall 58.0); the mean of category means would give Image 66.5 and VisDoc 59.8."""
    published = json.loads((REPO_ROOT / "tests" / "data" / "mmeb_v2_published_scores.json").read_text())
    for model, by_modality in published["models"].items():
        assert {modality: set(tasks) for modality, tasks in by_modality.items()} == {
            modality: {name for name, task in MMEB_V2_TASKS.items() if task.modality == modality}
            for modality in ("image", "video", "visdoc")}, model
    tasks = {name: metrics for modality in published["models"]["VLM2Vec-V2.0-Qwen2VL-2B"].values()
             for name, metrics in modality.items()}
    scores = {name: 100 * metrics[MMEB_V2_TASKS[name].metric] for name, metrics in tasks.items()}
    means, incomplete = mmeb_v2_means(scores)
    assert incomplete == {}
    assert {key: round(means[key], 1) for key in ("Image", "Video", "VisDoc", "Overall")} == {
        "Image": 64.9, "Video": 34.6, "VisDoc": 65.4, "Overall": 58.0}
    # The visual-document metric really is NDCG@5: hit@1 there gives other numbers.
    assert round(sum(100 * tasks[name]["hit@1"] for name in MMEB_V2_CATEGORIES["visdoc"]["ViDoRe-V1"]) / 10, 1) != \
        round(means["VisDoc/ViDoRe-V1"], 1)


# ------------------------------------------------------------------------------------------------ the layouts

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20),
           "grey": (128, 128, 128)}


def write_frames(folder: Path, count: int, colour: str = "red", stem: str = "frame_{}.jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(1, count + 1):
        PILImage.new("RGB", (8, 8), COLOURS[colour]).save(folder / stem.format(index))


def write_hub_repo(folder: Path, configs: dict[str | None, dict[str, list[dict]]], features=None) -> None:
    """A Hub dataset repo as `huggingface-cli download` writes it: ``<config>/<split>-00000-of-00001.parquet`` per
    config (``data/`` for the default one) and a README whose ``configs:`` name the files."""
    readme = ["---", "configs:"]
    for config, splits in configs.items():
        directory = config or "data"
        readme += [f"- config_name: {config or 'default'}", "  data_files:"]
        for split, rows in splits.items():
            path = folder / directory / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            Dataset.from_list(rows, features=(features or {}).get(config)).to_parquet(str(path))
            readme += [f"  - split: {split}", f"    path: {directory}/{split}-*"]
    (folder / "README.md").write_text("\n".join(readme + ["---", "", "# test copy"]) + "\n")


def png_bytes(colour: str) -> bytes:
    import io

    buffer = io.BytesIO()
    PILImage.new("RGB", (16, 20), COLOURS[colour]).save(buffer, format="PNG")
    return buffer.getvalue()


LONG_PAGE = "arxiv_" + "x" * 60 + "_figure.png"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """The tiny MMEB-V2 copy: one or more tasks of every loader family."""
    root = tmp_path_factory.mktemp("mmeb-v2") / "MMEB-V2"
    frames = root / "video-tasks" / "frames"
    annotations = root / "annotations"
    # video_cls.tar.gz unpacked with -C video_cls: video_cls/<Dataset>/<video_id>/frame_*.jpg
    write_frames(frames / "video_cls" / "HMDB51" / "v1", 20, "red")      # 20 frames: 8 are sampled
    write_frames(frames / "video_cls" / "HMDB51" / "v2", 3, "blue")      # 3 frames: all of them
    write_hub_repo(annotations / "VLM2Vec" / "HMDB51", {None: {"test": [
        {"video_id": "v1", "pos_text": "ride_bike"}, {"video_id": "v2", "pos_text": "wave"}]}})
    write_frames(frames / "video_cls" / "SSv2" / "101", 9, "green")
    write_hub_repo(annotations / "VLM2Vec" / "SmthSmthV2", {None: {"test": [
        {"video_id": 101, "pos_text": "Holding something",
         "neg_text": ["Opening something", "Holding something", "Folding something"]}]}})
    # video_qa.tar.gz: video_qa/<Dataset>/...
    write_frames(frames / "video_qa" / "Video-MME" / "abc", 10, "yellow")
    write_hub_repo(annotations / "VLM2Vec" / "Video-MME", {None: {"test": [
        {"question": "What colour is the wall?", "videoID": "abc", "options": ["A. Red.", "B. Yellow.", "C. Blue.",
                                                                              "D. Green."],
         "answer": "B", "question_id": "001-1", "domain": "Knowledge", "sub_category": "Art"}]}})
    write_frames(frames / "video_qa" / "NExTQA" / "4010", 4, "grey")
    write_hub_repo(annotations / "VLM2Vec" / "NExTQA", {"MC": {"test": [
        {"video": 4010, "question": "why did the boy run", "answer": 2, "qid": 7, "type": "CW",
         "a0": "to eat", "a1": "to sleep", "a2": "to catch the ball", "a3": "to swim", "a4": "to sing"}]}})
    write_frames(frames / "video_qa" / "EgoSchema" / "ego1", 4, "grey")
    write_hub_repo(annotations / "VLM2Vec" / "EgoSchema", {"Subset": {"test": [
        {"video_idx": "ego1", "question": "What did C do?", "answer": "1", "question_idx": "q0",
         "option": ["A. C cooked.", "B. C cleaned.", "C. C read.", "D. C ran.", "E. C slept."]}]}})
    write_frames(frames / "video_qa" / "ActivityNetQA" / "v_xyz", 4, "grey")
    write_hub_repo(annotations / "VLM2Vec" / "ActivityNetQA", {None: {"test": [
        {"video_name": "xyz", "question": "is it daytime", "answer": "yes", "question_id": "v_xyz_1"}]}})
    from evaluation.mmeb_v2 import MVBENCH_SUBSETS

    mvbench = {}
    for index, subset in enumerate(MVBENCH_SUBSETS):
        write_frames(frames / "video_qa" / "MVBench" / subset / f"clip{index}.mp4", 2, "grey")
        mvbench[subset] = {"train": [{"video": f"clip{index}.mp4", "question": f"question {index}?",
                                      "candidates": ["left", "right", "up"], "answer": "right"}]}
    write_hub_repo(annotations / "VLM2Vec" / "MVBench", mvbench)
    # video_ret.tar.gz unpacked with -C video_ret
    for name in ("video7", "video8"):
        write_frames(frames / "video_ret" / "MSR-VTT" / name, 12, "red" if name == "video7" else "blue")
    write_hub_repo(annotations / "VLM2Vec" / "MSR-VTT", {"test_1k": {"test": [
        {"video_id": "video7", "video": "video7.mp4", "caption": "a red car drives"},
        {"video_id": "video8", "video": "video8.mp4", "caption": "a blue sea"},
        {"video_id": "video7", "video": "video7.mp4", "caption": "a car on a red road"}]}})
    write_frames(frames / "video_ret" / "DiDeMo" / "1234_abcd", 5, "green")
    write_hub_repo(annotations / "VLM2Vec" / "DiDeMo", {None: {"test": [
        {"video": "videos/1234_abcd.mp4", "caption": "the dog jumps"}]}})
    write_frames(frames / "video_ret" / "MSVD" / "m1", 5, "green")
    write_hub_repo(annotations / "VLM2Vec" / "MSVD", {None: {"test": [
        {"video_id": "m1", "video": "m1.avi", "caption": ["first caption", "second caption"]}]}})
    write_frames(frames / "video_ret" / "VATEX" / "vx1", 5, "green")
    write_hub_repo(annotations / "VLM2Vec" / "VATEX", {None: {"test": [
        {"videoID": "vx1", "enCap": ["a person dances", "someone dancing"]}]}})
    write_frames(frames / "video_ret" / "YouCook2" / "yc1", 5, "green")
    write_hub_repo(annotations / "lmms-lab" / "YouCook2", {None: {"val": [
        {"id": "yc1", "video_path": "val/201/yc.mp4", "sentence": "slice the onion"}]}})
    # video_mret.tar.gz: video_mret/<Dataset>/<video>/{query, positive, negative_*}/
    for clip, colour in (("query", "red"), ("positive", "red"), ("negative_1", "blue"), ("negative_2", "green")):
        write_frames(frames / "video_mret" / "QVHighlight" / "vidA" / clip, 12 if clip == "query" else 8, colour)
    write_hub_repo(annotations / "VLM2Vec" / "QVHighlight", {None: {"test": [
        {"query": "a man talks about a red car", "video_path": "videos/vidA.mp4"}]}})
    seeker = frames / "video_mret" / "MomentSeeker"
    for clip, colour in (("movie_c1", "red"), ("movie_c2", "blue"), ("movie_c3", "green"), ("clip_q1", "red")):
        write_frames(seeker / "video_frames" / clip, 8, colour, "frame_{:04d}.jpg")
    PILImage.new("RGB", (8, 8), COLOURS["blue"]).save(seeker / "query_img1.jpg")
    clips = {"positive_frames": [{"output_path": "movie/c1.mp4"}],
             "negative_frames": [{"output_path": "movie/c2.mp4"}, {"output_path": "movie/c3.mp4"}]}
    write_hub_repo(annotations / "VLM2Vec" / "MomentSeeker", {None: {"test": [
        {"query": "the red moment", "input_frames": "", **clips},
        {"query": "this blue thing", "input_frames": "img1.jpg", **clips},
        {"query": "what follows", "input_frames": "clip/q1.mp4", **clips}]}})
    # Visual documents: BEIR configs; ids as ViDoRe stores them (ints); graded, repeated and zero qrels.
    corpus_features = Features({"corpus-id": Value("int64"), "image": Image()})
    write_hub_repo(annotations / "vidore" / "arxivqa_test_subsampled_beir", {
        "queries": {"test": [{"query-id": 1, "query": "red figure"}, {"query-id": 2, "query": "blue table"},
                             {"query-id": 3, "query": "no judged page"}]},
        "qrels": {"test": [{"query-id": 1, "corpus-id": 10, "score": 2}, {"query-id": 1, "corpus-id": 11, "score": 1},
                           {"query-id": 1, "corpus-id": 10, "score": 1}, {"query-id": 2, "corpus-id": 12, "score": 1},
                           {"query-id": 2, "corpus-id": 13, "score": 0}]},
        "corpus": {"test": [{"corpus-id": index, "image": {"bytes": png_bytes(colour), "path": None}}
                            for index, colour in zip(range(10, 15), ["red", "yellow", "blue", "green", "grey"])]},
    }, features={"corpus": corpus_features})
    write_hub_repo(annotations / "openbmb" / "VisRAG-Ret-Test-ArxivQA", {
        "queries": {"train": [{"query-id": "q-a", "query": "which plot is red"}]},
        "qrels": {"train": [{"query-id": "q-a", "corpus-id": LONG_PAGE, "score": 1}]},
        "corpus": {"train": [{"corpus-id": LONG_PAGE, "image": {"bytes": png_bytes("red"), "path": None}},
                             {"corpus-id": "other.png", "image": {"bytes": png_bytes("blue"), "path": None}}]},
    }, features={"corpus": Features({"corpus-id": Value("string"), "image": Image()})})
    # Image tasks: a TIGER-Lab/MMEB-eval clone (evaluation.mmeb's layout) and mmeb_v1.tar.gz's images in image-tasks/
    mmeb = annotations / "TIGER-Lab" / "MMEB-eval" / "ImageNet-1K"
    mmeb.mkdir(parents=True)
    Dataset.from_list([
        {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-1K/a.jpg",
         "tgt_text": ["goldfish", "tench", "shark"], "tgt_img_path": ["", "", ""]},
        {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": "ImageNet-1K/b.jpg",
         "tgt_text": ["tench", "goldfish", "shark"], "tgt_img_path": ["", "", ""]},
    ]).to_parquet(str(mmeb / "test-00000-of-00001.parquet"))
    (root / "image-tasks" / "ImageNet-1K").mkdir(parents=True)
    for stem, colour in (("a", "yellow"), ("b", "green")):
        PILImage.new("RGB", (28, 28), COLOURS[colour]).save(root / "image-tasks" / "ImageNet-1K" / f"{stem}.jpg")
    return root


VIDEO_LAYOUT_TASKS = ["HMDB51", "SmthSmthV2", "MVBench", "Video-MME", "NExTQA", "EgoSchema", "ActivityNetQA",
                      "DiDeMo", "MSR-VTT", "MSVD", "VATEX", "YouCook2", "QVHighlight", "MomentSeeker"]
VISDOC_LAYOUT_TASKS = ["ViDoRe_arxivqa", "VisRAG_ArxivQA"]


def names_of(paths):
    return [Path(path).name for path in paths]


def test_video_layouts_read_back_as_vlm2vec_reads_them(layouts):
    paths = MMEBV2Paths.make(layouts)
    base = layouts / "video-tasks" / "frames"

    hmdb = load_mmeb_v2_task("HMDB51", paths)
    instruction = "What actions or objects interactions are the person in the video doing?"
    assert [query[:2] for query in hmdb.queries] == [(instruction, None)] * 2
    # 20 frames -> np.linspace(0, 19, 8, dtype=int) = 0 2 5 8 10 13 16 19, in natural order (frame_2 < frame_10)
    assert names_of(hmdb.queries[0][2]) == [f"frame_{i}.jpg" for i in (1, 3, 6, 9, 11, 14, 17, 20)]
    assert names_of(hmdb.queries[1][2]) == ["frame_1.jpg", "frame_2.jpg", "frame_3.jpg"]
    assert Path(hmdb.queries[0][2][0]).parent == base / "video_cls" / "HMDB51" / "v1"
    assert hmdb.labels == [["ride_bike"], ["wave"]] and hmdb.candidates is None
    corpus = list(hmdb.corpus)   # the rows' labels first, then VLM2Vec's label list
    assert corpus[:3] == ["ride_bike", "wave", "dive"] and len(corpus) == 51
    assert hmdb.corpus["dive"] == ("dive", None, None)

    ssv2 = load_mmeb_v2_task("SmthSmthV2", paths)
    assert ssv2.candidates == [["Opening something", "Holding something", "Folding something"]]
    assert ssv2.labels == [["Holding something"]] and len(ssv2.queries[0][2]) == 8

    videomme = load_mmeb_v2_task("Video-MME", paths)
    assert videomme.queries[0][0] == (QA_PROMPT + " What colour is the wall?\nA. Red.\nB. Yellow.\nC. Blue.\n"
                                      "D. Green.")
    assert videomme.candidates == [["A. Red.", "B. Yellow.", "C. Blue.", "D. Green."]]
    assert videomme.labels == [["B. Yellow."]] and videomme.corpus["B. Yellow."] == ("Yellow", None, None)

    nextqa = load_mmeb_v2_task("NExTQA", paths)
    assert nextqa.queries[0][0] == (QA_PROMPT + " why did the boy run\nOptions:\n(A) to eat\n(B) to sleep\n"
                                    "(C) to catch the ball\n(D) to swim\n(E) to sing")
    assert nextqa.labels == [["to catch the ball"]] and nextqa.corpus["to eat"] == ("to eat", None, None)
    assert Path(nextqa.queries[0][2][0]).parent.name == "4010"

    ego = load_mmeb_v2_task("EgoSchema", paths)
    assert ego.queries[0][0] == QA_PROMPT + " What did C do?A. C cooked. B. C cleaned. C. C read. D. C ran. E. C slept."
    assert ego.labels == [["B. C cleaned."]] and ego.corpus["B. C cleaned."][0] == "C cleaned"

    anet = load_mmeb_v2_task("ActivityNetQA", paths)
    assert anet.queries[0][0] == QA_PROMPT + " is it daytime? (A) yes; (B) no."
    assert anet.candidates == [["yes", "no"]] and Path(anet.queries[0][2][0]).parent.name == "v_xyz"

    mvbench = load_mmeb_v2_task("MVBench", paths)
    assert len(mvbench.queries) == 20
    assert mvbench.queries[0][0] == QA_PROMPT + " question 0?\nOptions:\n(A) left\n(B) right\n(C) up"
    assert mvbench.labels[0] == ["(B) right"] and mvbench.candidates[0] == ["(A) left", "(B) right", "(C) up"]
    assert Path(mvbench.queries[1][2][0]).parent == base / "video_qa" / "MVBench" / "action_sequence" / "clip1.mp4"

    msrvtt = load_mmeb_v2_task("MSR-VTT", paths)
    assert [query[0] for query in msrvtt.queries] == [
        "Find a video that contains the following visual content: a red car drives",
        "Find a video that contains the following visual content: a blue sea",
        "Find a video that contains the following visual content: a car on a red road"]
    assert msrvtt.labels == [["video7"], ["video8"], ["video7"]] and list(msrvtt.corpus) == ["video7", "video8"]
    assert msrvtt.corpus["video7"][0] == "Understand the content of the provided video."
    assert names_of(msrvtt.corpus["video7"][2]) == [f"frame_{i}.jpg" for i in (1, 2, 4, 5, 7, 8, 10, 12)]
    assert load_mmeb_v2_task("DiDeMo", paths).labels == [["1234_abcd"]]
    assert load_mmeb_v2_task("MSVD", paths).queries[0][0] == (
        "Find the video snippet that corresponds to the given summary: first caption")
    assert load_mmeb_v2_task("VATEX", paths).queries[0][0] == (
        "Select a video that fits the description provided: a person dances")
    youcook = load_mmeb_v2_task("YouCook2", paths)
    assert youcook.labels == [["yc1"]] and youcook.queries[0][0].endswith("recipe: slice the onion")

    qv = load_mmeb_v2_task("QVHighlight", paths)
    folder = base / "video_mret" / "QVHighlight" / "vidA"
    assert qv.queries[0][0] == ("Find the clip that corresponds to the described scene in the given video: a man talks "
                                "about a red car")
    assert Path(qv.queries[0][2][0]).parent == folder / "query" and len(qv.queries[0][2]) == 8
    assert qv.candidates == [[str(folder / name) for name in ("negative_1", "negative_2", "positive")]]
    assert qv.labels == [[str(folder / "positive")]]

    seeker = load_mmeb_v2_task("MomentSeeker", paths)
    clips = base / "video_mret" / "MomentSeeker" / "video_frames"
    assert [query[0] for query in seeker.queries] == [
        "Find the clip that corresponds to the given text: the red moment",
        "Select the video clip that aligns with the given text and image: this blue thing",
        "Find the clip that corresponds to the given sentence and video segment: what follows"]
    assert seeker.queries[0][1:] == (None, None)
    assert seeker.queries[1][1] == str(base / "video_mret" / "MomentSeeker" / "query_img1.jpg")
    assert Path(seeker.queries[2][2][0]).parent == clips / "clip_q1"
    assert seeker.candidates[0] == [str(clips / name) for name in ("movie_c1", "movie_c2", "movie_c3")]
    assert seeker.labels[0] == [str(clips / "movie_c1")]
    assert seeker.corpus[str(clips / "movie_c2")][0] == "Understand the content of the provided video clip."
    # --max_rows: the first rows only; SmthSmthV2 keeps its own 1000-row limit.
    assert len(load_mmeb_v2_task("MSR-VTT", paths, max_rows=1).queries) == 1
    assert len(load_mmeb_v2_task("MSR-VTT", MMEBV2Paths.make(layouts, num_frames=3)).corpus["video7"][2]) == 3


def test_visdoc_layouts_graded_qrels_and_pages(layouts, tmp_path):
    paths = MMEBV2Paths.make(layouts, pages_dir=tmp_path / "pages")
    vidore = load_mmeb_v2_task("ViDoRe_arxivqa", paths)
    assert [query[0] for query in vidore.queries] == [
        "Find a document image that matches the given query: red figure",
        "Find a document image that matches the given query: blue table"]   # query 3 has no positive qrel
    assert vidore.labels == [["10", "11"], ["12"]] and vidore.rel_scores == [[2.0, 1.0], [1.0]]
    assert vidore.candidates is None and list(vidore.corpus) == ["10", "11", "12", "13", "14"]
    assert vidore.source["queries_without_qrels"] == 1
    page = Path(vidore.corpus["10"][1])
    assert vidore.corpus["10"][0] == "Understand the content of the provided document image."
    assert page == tmp_path / "pages" / "ViDoRe_arxivqa" / "10.png"   # pages_dir given: the data root is untouched
    red = PILImage.new("RGB", (16, 20), COLOURS["red"])
    assert np.asarray(PILImage.open(page)).tolist() == np.asarray(red).tolist()
    assert not (layouts / "visdoc-tasks").exists()

    visrag = load_mmeb_v2_task("VisRAG_ArxivQA", MMEBV2Paths.make(layouts, pages_dir=tmp_path / "pages"))
    expected = LONG_PAGE[:-4][:50] + "_" + hashlib.md5(LONG_PAGE.encode()).hexdigest()[:8] + ".png"
    assert Path(visrag.corpus[LONG_PAGE][1]).name == expected and list(visrag.corpus) == [LONG_PAGE, "other.png"]
    assert visrag.labels == [[LONG_PAGE]] and visrag.rel_scores == [[1.0]]
    # Without pages_dir the pages go where VLM2Vec writes them, once.
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(layouts / "annotations" / "vidore", copy / "annotations" / "vidore")
    first = load_mmeb_v2_task("ViDoRe_arxivqa", MMEBV2Paths.make(copy))
    assert first.source["pages_written"] == 5 and (copy / "visdoc-tasks" / "ViDoRe_arxivqa" / "14.png").is_file()
    assert load_mmeb_v2_task("ViDoRe_arxivqa", MMEBV2Paths.make(copy)).source["pages_written"] == 0


def test_missing_data_errors_name_the_task_the_path_and_the_fix(layouts, tmp_path):
    empty = tmp_path / "MMEB-V2"
    (empty / "annotations").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"'HMDB51'.*video_cls/HMDB51.*git clone https://huggingface.co/"
                                                r"datasets/TIGER-Lab/MMEB-V2.*tar -xzf video_cls.tar.gz -C video_cls"):
        load_mmeb_v2_task("HMDB51", MMEBV2Paths.make(empty))
    (empty / "video-tasks" / "frames" / "video_qa" / "NExTQA").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"'NExTQA': no annotation folder .*VLM2Vec/NExTQA.*config 'MC', split "
                                                r"'test'.*huggingface-cli download VLM2Vec/NExTQA --repo-type dataset"):
        load_mmeb_v2_task("NExTQA", MMEBV2Paths.make(empty))
    # A frame folder missing for one video: named, with the archive to unpack.
    import shutil

    shutil.copytree(layouts / "annotations" / "VLM2Vec" / "NExTQA", empty / "annotations" / "VLM2Vec" / "NExTQA")
    with pytest.raises(FileNotFoundError, match=r"'NExTQA': 1 of 1 frame folders .*NExTQA/4010.*video_qa.tar.gz"):
        load_mmeb_v2_task("NExTQA", MMEBV2Paths.make(empty))
    with pytest.raises(FileNotFoundError, match=r"'ImageNet-1K'.*TIGER-Lab/MMEB-eval"):
        load_mmeb_v2_task("ImageNet-1K", MMEBV2Paths.make(empty))
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        MMEBV2Paths.make(layouts, num_frames=0)


# ------------------------------------------------------------------------------------------------ scoring a task


def plain_task_scores(dataset: MMEBV2Dataset, vectors: dict) -> tuple[float, float]:
    """hit@1 and ndcg_linear@5 of one task written out: VLM2Vec's candidate list (global: the whole corpus; local:
    the query's names), cosine scores, np.argsort(-scores), then the plain metrics."""
    hits, ndcgs = [], []
    names_all = list(dataset.corpus)
    for row, query in enumerate(dataset.queries):
        names = names_all if dataset.candidates is None else dataset.candidates[row]
        q = vectors[query]
        scores = np.array([float(np.dot(vectors[dataset.corpus[name]], q)) for name in names], dtype=np.float32)
        ranked = [names[index] for index in np.argsort(-scores)]
        grades = dict(zip(dataset.labels[row], dataset.rel_scores[row] if dataset.rel_scores else
                          [1] * len(dataset.labels[row])))
        hits.append(plain_hit(ranked, grades, 1))
        ndcgs.append(plain_ndcg(ranked, grades, 5))
    return 100 * float(np.mean(hits)), 100 * float(np.mean(ndcgs))


def test_task_scores_equal_a_plain_computation_on_every_layout(layouts, tmp_path):
    paths = MMEBV2Paths.make(layouts, pages_dir=tmp_path / "pages")
    rng = np.random.default_rng(11)
    for name in VIDEO_LAYOUT_TASKS + VISDOC_LAYOUT_TASKS:
        dataset = load_mmeb_v2_task(name, paths)
        items = list(dict.fromkeys([*dataset.queries, *dataset.corpus.values()]))
        embeddings = rng.normal(size=(len(items), 6)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        scored = score_task(dataset, embeddings, {item: index for index, item in enumerate(items)})
        hit, ndcg = plain_task_scores(dataset, dict(zip(items, embeddings)))
        main = ndcg if dataset.task.modality == "visdoc" else hit
        assert scored["score"] == pytest.approx(main), name
        assert scored["metrics"]["hit@1"] == pytest.approx(hit / 100), name
        assert len(scored["predictions"]) == len(dataset.queries)


# ------------------------------------------------------------------------------------------------ embedding


class ContentEmbedder:
    """A vector per content: the colour of an image or of a video's first frame, or of the first colour word of a
    text, plus a small hashed part; takes videos=. Counts what it embeds."""

    def __init__(self):
        self.rows = 0
        self.calls = []

    def encode(self, texts, images, image_root=None, batch_size=32, **kwargs):
        videos = kwargs.get("videos") or [None] * len(texts)
        self.calls.append(len(texts))
        self.rows += len(texts)
        out = []
        for text, image, video in zip(texts, images, videos):
            vector = np.zeros(len(COLOURS) + 4)
            source = image or (video[0] if video else None)
            if image and image_root is not None and not Path(image).is_absolute():
                source = Path(image_root) / image
            if source:
                pixel = np.asarray(PILImage.open(source).convert("RGB"))[0, 0]
                colour = min(COLOURS, key=lambda name: float(((np.array(COLOURS[name]) - pixel) ** 2).sum()))
                vector[list(COLOURS).index(colour)] = 1.0
            else:
                word = next((word for word in (text or "").lower().split() if word in COLOURS), None)
                if word:
                    vector[list(COLOURS).index(word)] = 1.0
            names = [Path(path).name for path in [image, *(video or [])] if path]   # not the tmp folder: stable
            digest = hashlib.sha256(json.dumps([text, names]).encode()).digest()
            vector[len(COLOURS):] = (np.frombuffer(digest[:4], dtype=np.uint8) / 255.0) * 0.3
            out.append(vector / np.linalg.norm(vector))
        return torch.tensor(np.array(out), dtype=torch.float32)


def test_media_cache_keys_resume_and_the_videos_contract(tmp_path):
    cache = EmbeddingCache(tmp_path / "c", "fp", None)
    assert cache.key(("a text", "x.png", None)) == cache.key(("a text", "x.png"))
    assert cache.key(("t", None, ("f1.jpg", "f2.jpg"))) != cache.key(("t", None, ("f2.jpg", "f1.jpg")))
    assert cache.key(("t", None, ("f1.jpg",))) != cache.key(("t", None, None))

    frames = tmp_path / "frames"
    write_frames(frames, 2, "blue")
    items = [("a red thing", None, None), ("video", None, tuple(list_frames(frames))), ("a red thing", None, None)]
    embedder = ContentEmbedder()
    first = embed_with_cache(embedder, items, None, 4, tmp_path / "cache")
    assert embedder.rows == 2                     # the repeated item is embedded once
    again = embed_with_cache(embedder, items, None, 4, tmp_path / "cache")
    assert embedder.rows == 2 and torch.equal(first, again)   # resumed from the cache: nothing embedded

    class ImageOnly:
        def encode(self, texts, images, image_root=None, batch_size=32):
            return torch.ones(len(texts), 3)

    assert embed_with_cache(ImageOnly(), items[:1], None, 4).shape == (1, 3)   # no video: no videos= passed
    with pytest.raises(TypeError, match="ImageOnly.encode\\(\\) takes no videos= argument"):
        embed_with_cache(ImageOnly(), items, None, 4)


def test_evaluate_on_every_layout_with_a_controlled_embedder(layouts, tmp_path):
    embedder = ContentEmbedder()
    tasks = ["ImageNet-1K"] + VIDEO_LAYOUT_TASKS + VISDOC_LAYOUT_TASKS
    result = evaluate_mmeb_v2(embedder, layouts, tasks, pages_dir=tmp_path / "pages", cache_dir=tmp_path / "cache",
                              predictions_dir=tmp_path / "predictions")
    summary = result.summary()
    assert list(summary["tasks"]) == [task.name for task in select_tasks(tasks)]   # in the table's order
    # Colours decide: MSR-VTT captions name the video's colour; the red QVHighlight clip is the positive; the red
    # page answers "red figure" (graded 2) and the blue one "blue table"; the yellow page (graded 1 for "red
    # figure") comes at some rank r in 2..5 of the five pages.
    assert summary["tasks"]["MSR-VTT"] == 100.0 and summary["tasks"]["QVHighlight"] == 100.0
    assert summary["tasks"]["ImageNet-1K"] in (0.0, 50.0, 100.0)
    assert result.metrics["ViDoRe_arxivqa"]["hit@1"] == 1.0
    possible = [100 * ((2 + 1 / math.log2(r + 1)) / (2 + 1 / math.log2(3)) + 1) / 2 for r in range(2, 6)]
    assert min(abs(summary["tasks"]["ViDoRe_arxivqa"] - value) for value in possible) < 1e-9
    assert summary["means"]["Video"] == pytest.approx(np.mean([summary["tasks"][name] for name in
                                                               VIDEO_LAYOUT_TASKS]))
    assert summary["incomplete"]["Overall"] and summary["settings"]["tie_rule"] == "numpy"
    lines = (tmp_path / "predictions" / "MSR-VTT.jsonl").read_text().splitlines()
    assert json.loads(lines[1])["prediction"][0] == "video8" and json.loads(lines[1])["labels"] == ["video8"]
    assert set(json.loads((tmp_path / "predictions" / "scores.json").read_text())) == set(tasks)
    rows = embedder.rows
    evaluate_mmeb_v2(embedder, layouts, tasks, pages_dir=tmp_path / "pages", cache_dir=tmp_path / "cache")
    assert embedder.rows == rows                  # a rerun embeds nothing: every vector comes from the cache


# ------------------------------------------------------------------------------------------------ a tiny model


@pytest.fixture(scope="module")
def tiny_model():
    from modeling_unime.tiny import build_tiny_unime

    model, processor = build_tiny_unime("qwen2_vl")
    model.processor = processor
    return model


def test_tiny_model_runs_the_image_and_visdoc_tasks(layouts, tiny_model, tmp_path):
    result = evaluate_mmeb_v2(tiny_model, layouts, ["ImageNet-1K", *VISDOC_LAYOUT_TASKS], pages_dir=tmp_path / "p",
                              batch_size=4)
    summary = result.summary()
    assert set(summary["tasks"]) == {"ImageNet-1K", *VISDOC_LAYOUT_TASKS}
    assert all(0.0 <= score <= 100.0 for score in summary["tasks"].values())
    assert set(summary["means"]) == {"Image/Classification", "Image", "VisDoc/ViDoRe-V1", "VisDoc/VisRAG", "VisDoc",
                                     "Overall"}


def test_tiny_model_runs_the_video_tasks(layouts, tiny_model):
    """Needs ``UniMEV2Model.encode(videos=...)`` (a list of frame paths per row)."""
    result = evaluate_mmeb_v2(tiny_model, layouts, VIDEO_LAYOUT_TASKS, batch_size=4)
    assert set(result.scores) == set(VIDEO_LAYOUT_TASKS)
    assert all(0.0 <= score <= 100.0 for score in result.scores.values())


def test_video_tasks_run_under_vlm2vecs_frame_budget_and_the_processor_is_restored(layouts, tiny_model,
                                                                                   monkeypatch):
    """VLM2Vec-V2 bounds every frame by its processor's 4*28*28 to 1280*28*28 pixels and takes the 8 sampled frames as
    they are: the run sets that on the processor (a video_num_frames of 3 would subsample again) and restores it."""
    processor = tiny_model.processor
    seen = []
    encode = type(tiny_model).encode

    def recording(self, *args, **kwargs):
        if kwargs.get("videos"):
            seen.append((processor.video_min_pixels, processor.video_max_pixels, processor.video_num_frames))
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "encode", recording)
    processor.video_num_frames = 3
    try:
        result = evaluate_mmeb_v2(tiny_model, layouts, VIDEO_LAYOUT_TASKS, batch_size=4)
        assert seen and set(seen) == {(28 * 28 * 4, 28 * 28 * 1280, None)}
        assert result.settings["video"] == {"video_num_frames": None, "video_max_frames": 64,
                                            "video_min_pixels": 3136, "video_max_pixels": 1003520}
        assert (processor.video_num_frames, processor.video_min_pixels, processor.video_max_pixels) == (3, None, None)
        seen.clear()
        evaluate_mmeb_v2(tiny_model, layouts, ["MSR-VTT"], batch_size=4, video_pixels=None)
        assert seen and set(seen) == {(None, None, None)}
    finally:
        processor.video_num_frames = None
    with pytest.raises(ValueError, match="video_pixels='1,x'"):
        harness.video_pixels_setting("1,x")


class ReverseHeadReranker:
    """Reverses the candidates it is given (the embedder's head), with every call recorded: an adversary whose
    effect on each list is known exactly."""

    def __init__(self):
        self.calls = []

    def rerank(self, query, candidates, mode="listwise", image_root=None):
        self.calls.append((query, list(candidates), mode))
        return list(range(len(candidates)))[::-1], None


def test_rerank_stage_reorders_the_head_and_rescores_against_a_plain_computation(layouts, tmp_path):
    """The rerank stage on visual documents: the reranker sees each query's first k pages as embedded (instruction
    and page), its order replaces theirs, the rest stays; NDCG@5 and hit@1 recomputed by hand on the new lists. Video
    tasks are left out and said so."""
    embedder = ContentEmbedder()
    plain = evaluate_mmeb_v2(embedder, layouts, VISDOC_LAYOUT_TASKS, pages_dir=tmp_path / "p", batch_size=4)
    pages = prepare_mmeb_v2(VISDOC_LAYOUT_TASKS, layouts, pages_dir=tmp_path / "p")
    oracle = ReverseHeadReranker()
    result = evaluate_mmeb_v2(embedder, layouts, [*VISDOC_LAYOUT_TASKS, "MSR-VTT"], pages_dir=tmp_path / "p",
                              batch_size=4, reranker=oracle, rerank_top_k=3, rerank_mode="pairwise")
    # The reranker takes no videos: MSR-VTT keeps the embedder's ranking in the two-stage result, and says so.
    assert result.reranked.not_reranked == ["MSR-VTT"]
    assert result.reranked.scores["MSR-VTT"] == result.scores["MSR-VTT"]
    assert result.reranked.predictions["MSR-VTT"] == result.predictions["MSR-VTT"]
    assert len(oracle.calls) == sum(len(dataset.queries) for dataset in pages)   # no call for a video query
    assert {mode for *_, mode in oracle.calls} == {"pairwise"}
    for dataset in pages:
        name = dataset.task.name
        assert result.scores[name] == plain.scores[name]   # the embedder's own scores are unchanged
        calls = [call for call in oracle.calls if call[0] in {query[:2] for query in dataset.queries}]
        assert len(calls) == len(dataset.queries)
        assert all(len(candidates) == min(3, len(dataset.corpus)) for _, candidates, _ in calls)
        assert all(text == "Understand the content of the provided document image." for _, candidates, _ in calls
                   for text, _ in candidates)
        ndcg, hits = [], []
        for row, labels in enumerate(dataset.labels):
            before = plain.predictions[name][row]["prediction"]
            after = before[:3][::-1] + before[3:]
            assert result.reranked.predictions[name][row]["prediction"][:5] == after[:5]
            grades = dict(zip(labels, dataset.rel_scores[row]))
            dcg = sum(grades.get(page, 0) / math.log2(rank + 1) for rank, page in enumerate(after[:5], start=1))
            ideal = sorted(grades.values(), reverse=True)[:5]
            ndcg.append(dcg / sum(grade / math.log2(rank + 1) for rank, grade in enumerate(ideal, start=1)))
            hits.append(float(after[0] in labels))
        assert result.reranked.scores[name] == pytest.approx(100 * sum(ndcg) / len(ndcg))
        assert result.reranked.metrics[name]["hit@1"] == pytest.approx(sum(hits) / len(hits))
    assert any(result.reranked.scores[name] < plain.scores[name] for name in VISDOC_LAYOUT_TASKS)


def test_rerank_stage_with_tiny_models_covers_the_image_and_visdoc_tasks(layouts, tiny_model, tmp_path):
    from modeling_unime.tiny import build_tiny_reranker

    reranker, processor = build_tiny_reranker("qwen2_5_vl")
    reranker.processor = processor
    result = evaluate_mmeb_v2(tiny_model, layouts, ["ImageNet-1K", *VISDOC_LAYOUT_TASKS, "MSR-VTT"],
                              pages_dir=tmp_path / "p", batch_size=4, reranker=reranker, rerank_top_k=2,
                              predictions_dir=tmp_path / "out" / "mmeb_v2")
    stages = result.stages()
    assert set(stages) == {"embedder", "embedder + rerank"}
    assert set(stages["embedder + rerank"]["tasks"]) == {"ImageNet-1K", *VISDOC_LAYOUT_TASKS, "MSR-VTT"}
    assert stages["embedder + rerank"]["not_reranked"] == ["MSR-VTT"]
    assert (tmp_path / "out" / "mmeb_v2_rerank" / "VisRAG_ArxivQA.jsonl").is_file()
    table = mmeb_v2_table(stages, "tiny")
    assert "| embedder + rerank |" in table and "1 video task(s) keep the embedder's ranking" in table
    assert "| MSR-VTT | Video | RET | hit@1 |" in table


# ------------------------------------------------------------------------------------------------ the harness


def test_the_harness_runs_mmeb_v2_from_a_config(layouts, tmp_path, monkeypatch):
    config = tmp_path / "eval.yaml"
    config.write_text(
        "model: tiny:qwen2_vl\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "batch_size: 4\n"
        "mmeb_v2:\n"
        f"  root: {layouts}\n"
        f"  pages_dir: {tmp_path / 'pages'}\n"
        "  tasks: [ImageNet-1K, ViDoRe_arxivqa, VisRAG_ArxivQA]\n"
        "  tie_rule: strict\n")
    arguments = harness.parse_evaluation_arguments("", ["--config", str(config)])
    settings = harness.load_settings(arguments)
    assert "mmeb" not in settings and settings["mmeb_v2"]["tie_rule"] == "strict"
    run_recipe(monkeypatch, "run_evaluation.py", "--config", str(config))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["mmeb_v2"]) == {"embedder"}   # no reranker configured: no rerank stage
    assert set(results["mmeb_v2"]["embedder"]["tasks"]) == {"ImageNet-1K", "ViDoRe_arxivqa", "VisRAG_ArxivQA"}
    assert results["mmeb_v2"]["embedder"]["settings"]["tie_rule"] == "strict" and "mmeb" not in results
    markdown = (tmp_path / "run" / "results.md").read_text()
    assert "## MMEB-V2" in markdown and "| ViDoRe_arxivqa | VisDoc | ViDoRe-V1 | ndcg_linear@5 |" in markdown
    assert (tmp_path / "run" / "predictions" / "mmeb_v2" / "VisRAG_ArxivQA.jsonl").is_file()
    # The shipped MMEB-V2 config parses, and an mmeb_v2 flag does not switch MMEB-V1 on.
    shipped = harness.parse_evaluation_arguments("", ["--config", str(REPO_ROOT / "recipes" / "configs" /
                                                                      "mmeb-v2-unime-v2-2b.yaml")])
    assert shipped.mmeb_v2_root == "MMEB-V2" and shipped.mmeb_root is None
    only = harness.load_settings(harness.parse_evaluation_arguments("", ["--model", "m", "--mmeb_v2_root", "x"]))
    assert only["mmeb_v2"] == {"root": "x"} and "mmeb" not in only


def test_the_harness_runs_the_mmeb_v2_rerank_stage_from_a_config(layouts, tmp_path, monkeypatch):
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: tiny:qwen2_vl\nreranker: tiny:qwen2_5_vl\noutput_dir: {tmp_path / 'run'}\nbatch_size: 4\n"
        f"mmeb_v2: {{root: {layouts}, pages_dir: {tmp_path / 'pages'}, tasks: [ImageNet-1K, VisRAG_ArxivQA, MSR-VTT],"
        " rerank_top_k: 2}\n")
    run_recipe(monkeypatch, "run_evaluation.py", "--config", str(config))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    stages = results["mmeb_v2"]
    assert set(stages) == {"embedder", "embedder + rerank"}
    assert stages["embedder + rerank"]["settings"]["rerank_top_k"] == 2
    assert stages["embedder + rerank"]["not_reranked"] == ["MSR-VTT"]
    assert set(stages["embedder + rerank"]["tasks"]) == {"ImageNet-1K", "VisRAG_ArxivQA", "MSR-VTT"}
    assert "| embedder + rerank |" in (tmp_path / "run" / "results.md").read_text()
    assert (tmp_path / "run" / "predictions" / "mmeb_v2_rerank" / "ImageNet-1K.jsonl").is_file()


@pytest.mark.skipif(not (SHARED / "MMEB-V2").is_dir(), reason=f"no MMEB-V2 copy under {SHARED}")
def test_a_real_copy_reads_when_present():
    root = SHARED / "MMEB-V2"
    present = [task.name for task in MMEB_V2_TASKS.values()
               if (task.frames and (root / task.frames).is_dir()) or (task.pages and (root / task.pages).is_dir())]
    for dataset in prepare_mmeb_v2(present or None, root, max_rows=3):
        assert len(dataset) >= 1 and all(labels for labels in dataset.labels)
