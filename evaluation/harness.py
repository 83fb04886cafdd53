"""The evaluation recipe's engine: arguments -> models (on this process's device) -> MMEB / retrieval / SugarCrepe ->
``results.json``, ``results.md``, predictions.

The recipe's arguments are the fields of `EvaluationArguments`, set by a YAML ``--config`` file and / or flags (a flag
wins; `modeling_unime.util.arguments.parse_recipe_arguments`). The YAML sections ``mmeb:``, ``retrieval:`` and
``sugarcrepe:`` set the fields with those prefixes (``mmeb: {root: x}`` is ``--mmeb_root x``); a benchmark runs when
any of its fields is set.

- ``model``, ``reranker`` (optional): a folder, a Hub repo id or ``tiny:<family>`` (random weights).
- ``data_root``: every relative data path below is resolved against it (default: the working directory). The
  shipped configs name the folders as the authors' ``data/`` folder holds them, so pointing ``--data_root`` at such a
  folder is the only change a user makes.
- ``output_dir``, ``batch_size``, ``threads``.
- ``dtype`` (``auto`` = bf16 on a GPU, float32 on CPU), ``attn_implementation`` (``auto`` = ``flash_attention_2``
  when installed and on a GPU, else ``sdpa``): see `modeling_unime.placement`.
- ``image_resize`` / ``reranker_image_resize``: the resize policy set on the embedder's / reranker's processor
  (``native``, ``square:1344``, ``max_side:1344``, ``max_pixels:235200`` or a preset: ``authors-eval``,
  ``authors-train-qwen2vl``, ``authors-train-llava-ov``, ``authors-default``, ``authors-reranker``,
  ``authors-reranker-eval``; see `modeling_unime.processing_unime.canonical_image_resize`). The released checkpoints
  were evaluated with ``authors-eval`` (every image 1344x1344) and the reranker with ``authors-reranker-eval`` (that
  1344x1344 image capped at 300*28*28 pixels: 476x476).
- ``max_rows``: only the first N rows of every benchmark (each MMEB dataset's first N rows, each retrieval set's
  first N images with their captions, each SugarCrepe subset's first N examples): a smoke test of the whole path in
  a minute, whose numbers are not the benchmarks'. Each section's own ``max_rows`` wins over it.
- ``mmeb``: ``root`` (a clone of TIGER-Lab/MMEB-eval; the Hub when absent), ``image_root`` (default: found under
  ``root``, e.g. ``root/eval_images``), ``datasets`` (default: all 36), ``tie_rule`` (``argmax``, VLM2Vec's scorer,
  default; ``authors``, the UniME-V2 authors' scorer; or ``strict``: `evaluation.mmeb.TIE_RULES`), ``rerank_top_k``,
  ``rerank_match`` (``content``, the authors' rule, default; or ``index``: `evaluation.mmeb.RERANK_MATCH_RULES`),
  ``max_rows``.
- ``retrieval``: ``{flickr30k|coco|sharegpt4v|urban1k: {folder, image_root?, rerank_top_k?, max_rows?, limit?}}``
  (``limit``: ShareGPT4V's entry count, 1,000); each folder's layout is detected (`evaluation.retrieval`).
- ``sugarcrepe``: ``annotations`` (the repo's ``data/`` folder, or the clone above it), ``image_root`` (COCO
  val2017), ``subsets``, ``max_rows``.
- ``mmeb_v2``: ``root`` (a clone of TIGER-Lab/MMEB-V2 with its frame archives unpacked), ``annotations`` (the Hub
  annotation repos as ``<owner>/<name>`` folders; default ``root/annotations``), ``image_tasks`` (a clone of
  TIGER-Lab/MMEB-eval for the 36 image tasks; default ``annotations/TIGER-Lab/MMEB-eval``), ``image_root`` (default
  ``root/image-tasks``), ``pages_dir`` (where visual-document pages are written; default in ``root/visdoc-tasks``, as
  VLM2Vec), ``tasks`` (names, ``image`` / ``video`` / ``visdoc`` or ``video/MRET``; default all 78),
  ``num_frames`` (8), ``tie_rule`` (``numpy``, VLM2Vec's, default; ``stable``; ``strict``), ``image_tie_rule``
  (the image tasks', as ``mmeb.tie_rule``; default ``argmax``), ``video_pixels`` (``vlm2vec``, default;
  ``processor``; ``MIN,MAX``: `video_pixels_setting`), ``rerank_top_k`` and ``rerank_match`` (the rerank stage, as
  ``mmeb``'s; video tasks are not reranked), ``max_rows``: `evaluation.mmeb_v2`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from modeling_unime.recipe_engine import start_recipe
from modeling_unime.util.arguments import parse_recipe_arguments

from .loading import load_embedder, load_reranker
from .mmeb import evaluate_mmeb, write_predictions
from .report import RETRIEVAL_SETS, mmeb_table, mmeb_v2_table, retrieval_table, sugarcrepe_table

# ------------------------------------------------------------------------------------------------ config


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class EvaluationArguments:
    """The evaluation recipe's arguments (``recipes/run_evaluation.py --help`` lists them); the YAML sections
    ``mmeb:``, ``mmeb_v2:``, ``retrieval:`` and ``sugarcrepe:`` set the fields with those prefixes.

    A ``retrieval_*`` field is a mapping in the YAML file and JSON (or a bare folder) on the command line; either way
    it holds a dict once parsed.
    """

    model: Optional[str] = field(default=None, metadata=_help("embedder: a folder, a Hub repo id or tiny:<family>"))
    reranker: Optional[str] = field(
        default=None, metadata=_help("reranker: a folder, a Hub repo id or tiny:<family>; 'none' for no rerank stage"))
    data_root: Optional[str] = field(
        default=None, metadata=_help("folder every relative data path is resolved against (e.g. the authors' data/ "
                                     "folder holding MMEB-eval/, flickr30k_test/, coco_test/, ...)"))
    output_dir: str = field(default="runs/eval", metadata=_help("results, predictions and the embedding cache"))
    batch_size: int = field(default=32, metadata=_help("rows per embedding batch"))
    threads: int = field(default=1, metadata=_help("torch threads"))
    dtype: str = field(default="auto",
                       metadata=_help("auto (bf16 on GPU, float32 on CPU), float32, bfloat16 or float16"))
    attn_implementation: str = field(default="auto", metadata=_help("auto, sdpa, eager or flash_attention_2"))
    max_rows: Optional[int] = field(
        default=None, metadata=_help("only the first N rows of every benchmark (a smoke test; the numbers are then not "
                                     "the benchmarks'); a section's own max_rows wins"))
    image_resize: Optional[str] = field(
        default=None, metadata=_help("embedder images: native, authors-eval (the published numbers), square:N, ..."))
    reranker_image_resize: Optional[str] = field(
        default=None, metadata=_help("reranker images: native, authors-reranker-eval, ..."))
    mmeb_root: Optional[str] = field(
        default=None, metadata=_help("MMEB: a clone of TIGER-Lab/MMEB-eval (the Hub when unset)"))
    mmeb_image_root: Optional[str] = field(
        default=None, metadata=_help("MMEB: the image folder (default: found under mmeb_root, e.g. eval_images/)"))
    mmeb_datasets: Optional[list[str]] = field(default=None, metadata=_help("MMEB: dataset names (default: all 36)"))
    mmeb_tie_rule: Optional[str] = field(
        default=None, metadata=_help("MMEB: argmax (VLM2Vec's scorer, the default), authors (the UniME-V2 authors' "
                                     "scorer) or strict"))
    mmeb_rerank_top_k: Optional[int] = field(
        default=None, metadata=_help("MMEB: candidates the reranker sees per query (default 10)"))
    mmeb_rerank_match: Optional[str] = field(
        default=None, metadata=_help("MMEB: a reranker's pick is right when its content equals the positive's "
                                     "(content, the authors' rule, default) or only when it is candidate 0 (index)"))
    mmeb_max_rows: Optional[int] = field(
        default=None, metadata=_help("MMEB: only the first N rows of each dataset (default: max_rows)"))
    mmeb_v2_root: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: a clone of TIGER-Lab/MMEB-V2 with its frame archives unpacked"))
    mmeb_v2_annotations: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: the Hub annotation repos as <owner>/<name> folders (default: "
                                     "mmeb_v2_root/annotations)"))
    mmeb_v2_image_tasks: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: a clone of TIGER-Lab/MMEB-eval for the 36 image tasks (default: "
                                     "<annotations>/TIGER-Lab/MMEB-eval)"))
    mmeb_v2_image_root: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: the image-task images (default: mmeb_v2_root/image-tasks)"))
    mmeb_v2_pages_dir: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: where visual-document pages are written (default: "
                                     "mmeb_v2_root/visdoc-tasks, as VLM2Vec)"))
    mmeb_v2_tasks: Optional[list[str]] = field(
        default=None, metadata=_help("MMEB-V2: task names, modalities (image, video, visdoc) or modality/category "
                                     "(default: all 78)"))
    mmeb_v2_num_frames: Optional[int] = field(
        default=None, metadata=_help("MMEB-V2: frames per video (default 8, VLM2Vec's)"))
    mmeb_v2_tie_rule: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: ties of video and visdoc rankings: numpy (VLM2Vec's np.argsort, the "
                                     "default), stable or strict"))
    mmeb_v2_image_tie_rule: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: ties of the image tasks, as mmeb_tie_rule (default argmax)"))
    mmeb_v2_video_pixels: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2: the frame pixel budget during the run: vlm2vec (default: VLM2Vec-V2's "
                                     "4*28*28 to 1280*28*28 per frame, Qwen2-VL/Qwen2.5-VL), processor (the "
                                     "processor's own video_min_pixels / video_max_pixels) or MIN,MAX"))
    mmeb_v2_rerank_top_k: Optional[int] = field(
        default=None, metadata=_help("MMEB-V2: how many of the embedder's candidates the reranker re-orders (default "
                                     "10; with a reranker; video tasks are not reranked)"))
    mmeb_v2_rerank_match: Optional[str] = field(
        default=None, metadata=_help("MMEB-V2 image tasks: how a reranked pick is judged, as mmeb_rerank_match "
                                     "(default content)"))
    mmeb_v2_max_rows: Optional[int] = field(
        default=None, metadata=_help("MMEB-V2: only the first N rows of each task (default: max_rows)"))
    retrieval_flickr30k: Optional[str] = field(
        default=None, metadata=_help("Flickr30K: {folder, image_root?, rerank_top_k?, max_rows?} (JSON on the "
                                     "command line)"))
    retrieval_coco: Optional[str] = field(
        default=None, metadata=_help("COCO 5K: {folder, image_root?, rerank_top_k?, max_rows?}"))
    retrieval_sharegpt4v: Optional[str] = field(
        default=None, metadata=_help("ShareGPT4V: {folder, image_root?, rerank_top_k?, max_rows?, limit?}"))
    retrieval_urban1k: Optional[str] = field(
        default=None, metadata=_help("Urban1K: {folder, image_root?, rerank_top_k?, max_rows?}"))
    sugarcrepe_annotations: Optional[str] = field(
        default=None, metadata=_help("SugarCrepe: the sugar-crepe clone or its data/ folder"))
    sugarcrepe_image_root: Optional[str] = field(default=None, metadata=_help("SugarCrepe: COCO val2017 images"))
    sugarcrepe_subsets: Optional[list[str]] = field(
        default=None, metadata=_help("SugarCrepe: subsets (default: all seven)"))
    sugarcrepe_max_rows: Optional[int] = field(
        default=None, metadata=_help("SugarCrepe: only the first N examples of each subset (default: max_rows)"))

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("No 'model' (a folder, a Hub repo id or tiny:<family>): set it in the config or pass "
                             "--model.")
        if self.reranker is not None and self.reranker.lower() == "none":
            self.reranker = None
        for name in ("max_rows", "mmeb_max_rows", "mmeb_v2_max_rows", "sugarcrepe_max_rows"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1 (or unset for every row), got {value}.")
        for name in RETRIEVAL_SETS:
            value = getattr(self, f"retrieval_{name}")
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    value = {"folder": value}   # a bare folder
                setattr(self, f"retrieval_{name}", value)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"retrieval.{name}: a mapping such as {{folder: ...}}, got {value!r}.")

    def section(self, prefix: str) -> dict[str, Any]:
        """The fields of one YAML section that are set (not None), without the prefix: ``section("mmeb")`` ->
        ``{"root": ...}``."""
        # A longer prefix is another section's (mmeb_v2_ is not part of mmeb_).
        others = tuple(other for other in EVALUATION_SECTIONS.values()
                       if other != prefix + "_" and other.startswith(prefix + "_"))
        return {item.name[len(prefix) + 1:]: getattr(self, item.name) for item in fields(self)
                if item.name.startswith(prefix + "_") and not item.name.startswith(others)
                and getattr(self, item.name) is not None}


# mmeb_v2 first: argument errors name the section of the longest matching prefix.
EVALUATION_SECTIONS = {"mmeb_v2": "mmeb_v2_", "mmeb": "mmeb_", "retrieval": "retrieval_", "sugarcrepe": "sugarcrepe_"}


def video_pixels_setting(value: str | Sequence[int] | None) -> tuple[int, int] | str | None:
    """``mmeb_v2.video_pixels`` as `evaluation.mmeb_v2.evaluate_mmeb_v2` takes it: ``"vlm2vec"`` (also when unset),
    None for ``"processor"``, or ``(min, max)`` from ``"MIN,MAX"`` (or a YAML list of two).

    Example:
        >>> video_pixels_setting(None), video_pixels_setting("processor"), video_pixels_setting("3136, 200704")
        ('vlm2vec', None, (3136, 200704))
    """
    if isinstance(value, (list, tuple)):
        value = ",".join(str(part) for part in value)
    if value is None or str(value).strip() == "vlm2vec":
        return "vlm2vec"
    if str(value).strip() == "processor":
        return None
    parts = [part.strip() for part in str(value).split(",")]
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts) or int(parts[0]) > int(parts[1]):
        raise ValueError(f"mmeb_v2 video_pixels={value!r}: use vlm2vec, processor, or MIN,MAX (two positive integers, "
                         "MIN <= MAX).")
    return int(parts[0]), int(parts[1])


def parse_evaluation_arguments(description: str | None = None,
                               argv: Sequence[str] | None = None) -> EvaluationArguments:
    """`EvaluationArguments` from ``--config`` (YAML, sections as `EVALUATION_SECTIONS`) and the flags in ``argv``; a
    flag wins, a key of the file that names no field is an error."""
    (arguments,) = parse_recipe_arguments([EvaluationArguments], argv, EVALUATION_SECTIONS, description)
    return arguments


def load_settings(arguments: EvaluationArguments) -> dict[str, Any]:
    """The arguments in the shape of the YAML config (``{"model": ..., "mmeb": {...}, "retrieval": {name: {...}},
    "sugarcrepe": {...}}``); a benchmark section is there only when one of its fields is set."""
    settings: dict[str, Any] = {item.name: getattr(arguments, item.name) for item in fields(arguments)
                                if not item.name.startswith(tuple(EVALUATION_SECTIONS.values()))}
    for section in EVALUATION_SECTIONS:
        values = arguments.section(section)
        if values:
            settings[section] = values
    return settings


def resolve_data_path(value: str | os.PathLike | None, data_root: str | os.PathLike | None) -> str | None:
    """``value`` against ``data_root`` when it is relative (``~`` expanded); None stays None.

    >>> resolve_data_path("MMEB-eval", "/data"), resolve_data_path("/abs/coco", "/data"), resolve_data_path("x", None)
    ('/data/MMEB-eval', '/abs/coco', 'x')
    """
    if value is None:
        return None
    path = Path(os.path.expanduser(os.fspath(value)))
    if data_root is not None and not path.is_absolute():
        path = Path(os.path.expanduser(os.fspath(data_root))) / path
    return os.fspath(path)


def _settings_tag(*parts: Any) -> str:
    """A folder name for the settings that change embeddings but not the model fingerprint (dtype, kernel, image
    size), so that runs with other settings never reuse each other's cached vectors."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(part) for part in parts))


# ------------------------------------------------------------------------------------------------ the run


def row_limit(settings: dict[str, Any], options: dict[str, Any] | None) -> int | None:
    """The row limit of one benchmark: its section's ``max_rows``, else the top-level one, else None (every row).

    >>> row_limit({"max_rows": 8}, {}), row_limit({"max_rows": 8}, {"max_rows": 2}), row_limit({}, None)
    (8, 2, None)
    """
    value = (options or {}).get("max_rows", settings.get("max_rows"))
    return None if value is None else int(value)


def prepare_data(settings: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """Load and check the data of every benchmark in ``settings`` before any model is loaded, so that a missing
    folder, an unknown layout, a Git LFS pointer or a missing image fails in seconds rather than after hours of MMEB.

    Returns ``{"mmeb": [(dataset, image_root)], "mmeb_v2": [MMEBV2Dataset], "retrieval": {name:
    ImageTextRetrievalSet}, "sugarcrepe": {"annotations": folder, "image_root": folder}}`` for the benchmarks the
    config names.
    """
    from .mmeb import prepare_mmeb

    data_root = settings.get("data_root")
    if data_root is not None and not Path(os.path.expanduser(os.fspath(data_root))).is_dir():
        raise FileNotFoundError(
            f"data_root {os.fspath(data_root)!r} is not a folder: pass --data_root with the folder that holds "
            "MMEB-eval/, flickr30k_test/, coco_test/, shareGPT4v/, Urban1k/, sugar-crepe/ and coco2017/ (README, "
            "Evaluation)."
        )
    prepared: dict[str, Any] = {}
    if settings.get("mmeb"):
        options = settings["mmeb"]
        prepared["mmeb"] = prepare_mmeb(options.get("datasets"), resolve_data_path(options.get("root"), data_root),
                                        resolve_data_path(options.get("image_root"), data_root),
                                        row_limit(settings, options))
    if settings.get("mmeb_v2"):
        from .mmeb_v2 import prepare_mmeb_v2

        options = settings["mmeb_v2"]
        video_pixels_setting(options.get("video_pixels"))  # a bad value fails before any data or model is read
        if "root" not in options:
            raise ValueError("mmeb_v2: give 'root' (a clone of TIGER-Lab/MMEB-V2 with its frame archives unpacked).")
        prepared["mmeb_v2"] = prepare_mmeb_v2(
            options.get("tasks"), resolve_data_path(options["root"], data_root),
            resolve_data_path(options.get("annotations"), data_root),
            resolve_data_path(options.get("image_tasks"), data_root),
            resolve_data_path(options.get("image_root"), data_root),
            resolve_data_path(options.get("pages_dir"), data_root), int(options.get("num_frames") or 8),
            row_limit(settings, options),
        )
    if settings.get("retrieval"):
        from .retrieval_data import load_retrieval_set

        prepared["retrieval"] = {}
        for name, options in settings["retrieval"].items():
            options = dict(options or {})
            if "folder" not in options:
                raise ValueError(f"retrieval.{name}: no 'folder' (the folder holding the {name} data).")
            extra = {key: options[key] for key in ("limit", "captions_per_image") if key in options}
            if row_limit(settings, options) is not None:
                extra["max_rows"] = row_limit(settings, options)
            if name in ("flickr30k", "coco"):
                extra["extract_dir"] = output_dir / "cache" / "images" / name
            prepared["retrieval"][name] = load_retrieval_set(
                name, resolve_data_path(options["folder"], data_root),
                image_root=resolve_data_path(options.get("image_root"), data_root), **extra,
            )
    if settings.get("sugarcrepe"):
        from .sugarcrepe import check_sugarcrepe_data

        options = settings["sugarcrepe"]
        if "annotations" not in options or "image_root" not in options:
            raise ValueError("sugarcrepe: give 'annotations' (the sugar-crepe clone or its data/) and 'image_root' "
                             "(COCO val2017).")
        image_root = resolve_data_path(options["image_root"], data_root)
        annotations = check_sugarcrepe_data(resolve_data_path(options["annotations"], data_root), image_root,
                                            options.get("subsets"), row_limit(settings, options))
        prepared["sugarcrepe"] = {"annotations": os.fspath(annotations), "image_root": image_root}
    return prepared


def run_evaluation(arguments: EvaluationArguments) -> dict[str, Any] | None:
    """Run every benchmark named in the config; returns the results on the main process (None on the others).

    The data of every benchmark is loaded and checked first (`prepare_data`), then the models are loaded, then the
    benchmarks run in the order MMEB, MMEB-V2, retrieval, SugarCrepe.
    """
    settings = load_settings(arguments)
    output_dir = Path(settings["output_dir"])
    dtype, attn = settings["dtype"], settings["attn_implementation"]
    run = start_recipe(int(settings["threads"]), dtype, attn)
    state, where = run.state, run.where
    data = prepare_data(settings, output_dir)
    embedder = load_embedder(settings["model"], dtype, attn, state.device, settings.get("image_resize"))
    reranker = load_reranker(settings.get("reranker"), dtype, attn, state.device,
                             settings.get("reranker_image_resize"))
    batch_size = int(settings["batch_size"])
    # What the processors will really do (their canonical form, e.g. square:1344 for authors-eval); a processor
    # without resize policies works at native size.
    image_resize = getattr(embedder.processor, "image_resize", "native")
    cache_dir = output_dir / "cache" / _settings_tag(str(where["dtype"]).replace("torch.", ""),
                                                     where["attn_implementation"], image_resize)
    mmeb_options = settings.get("mmeb") or {}
    tie_rule = mmeb_options.get("tie_rule") or "argmax"
    rerank_match = mmeb_options.get("rerank_match") or "content"
    mmeb_v2_options = settings.get("mmeb_v2") or {}
    run_settings = {
        "device": str(where["device"]), "dtype": str(where["dtype"]).replace("torch.", ""),
        "attn_implementation": where["attn_implementation"], "image_resize": image_resize,
        "reranker_image_resize": getattr(reranker.processor, "image_resize", "native") if reranker else None,
        "image_resize_requested": settings.get("image_resize"),
        "reranker_image_resize_requested": settings.get("reranker_image_resize") if reranker else None,
        "mmeb_tie_rule": tie_rule, "mmeb_rerank_match": rerank_match if reranker else None,
        "data_root": settings.get("data_root"), "processes": state.num_processes, "max_rows": settings.get("max_rows"),
    }
    if mmeb_v2_options:  # only a run with MMEB-V2 names its tie rule
        run_settings["mmeb_v2_tie_rule"] = mmeb_v2_options.get("tie_rule") or "numpy"
    results: dict[str, Any] = {"model": settings["model"], "reranker": settings.get("reranker"),
                               "settings": run_settings, "data": {}, "seconds": {}}
    markdown = [f"# Evaluation of `{settings['model']}`", "",
                f"Settings: {run_settings['device']}, {run_settings['dtype']}, {run_settings['attn_implementation']}; "
                f"images: {image_resize} (embedder)"
                + (f", {run_settings['reranker_image_resize']} (reranker)" if reranker else "")
                + f"; MMEB ties: {tie_rule}.", ""]
    # Which benchmarks ran on their first rows only, said at the top so that no one quotes those numbers.
    sections = {name: settings.get(name) for name in ("mmeb", "mmeb_v2", "sugarcrepe") if settings.get(name)}
    sections.update({f"retrieval.{name}": options or {} for name, options in (settings.get("retrieval") or {}).items()})
    limited = {name: row_limit(settings, options) for name, options in sections.items()
               if row_limit(settings, options) is not None}
    if limited:
        markdown += ["**Row limit (a smoke test, not the benchmarks' numbers):** "
                     + ", ".join(f"{section} first {rows}" for section, rows in limited.items()) + ".", ""]

    if "mmeb" in data:
        started = time.perf_counter()
        plain, reranked = evaluate_mmeb(
            embedder, prepared=data["mmeb"], cache_dir=cache_dir, batch_size=batch_size, reranker=reranker,
            rerank_top_k=int(mmeb_options.get("rerank_top_k", 10)), state=state, tie_rule=tie_rule,
            rerank_match=rerank_match,
        )
        summaries = {"embedder": plain.summary()}
        if reranked is not None:
            summaries["embedder + rerank"] = reranked.summary()
        results["mmeb"] = summaries
        results["data"]["mmeb"] = plain.data
        results["seconds"]["mmeb"] = round(time.perf_counter() - started, 1)
        if state.is_main_process:
            write_predictions(plain, output_dir / "predictions" / "mmeb")
            if reranked is not None:
                write_predictions(reranked, output_dir / "predictions" / "mmeb_rerank")
        markdown += ["## MMEB (precision@1, %)", "", mmeb_table(summaries, settings["model"]), ""]

    if "mmeb_v2" in data:
        from .mmeb_v2 import evaluate_mmeb_v2

        started = time.perf_counter()
        mmeb_v2 = evaluate_mmeb_v2(
            embedder, prepared=data["mmeb_v2"], cache_dir=cache_dir, batch_size=batch_size, state=state,
            tie_rule=mmeb_v2_options.get("tie_rule") or "numpy",
            image_tie_rule=mmeb_v2_options.get("image_tie_rule") or "argmax",
            num_frames=int(mmeb_v2_options.get("num_frames") or 8), max_rows=row_limit(settings, mmeb_v2_options),
            video_pixels=video_pixels_setting(mmeb_v2_options.get("video_pixels")),
            predictions_dir=output_dir / "predictions" / "mmeb_v2",
            reranker=reranker, rerank_top_k=int(mmeb_v2_options.get("rerank_top_k", 10)),
            rerank_match=mmeb_v2_options.get("rerank_match") or "content",
        )
        results["mmeb_v2"] = mmeb_v2.stages()
        results["data"]["mmeb_v2"] = mmeb_v2.data
        results["seconds"]["mmeb_v2"] = round(time.perf_counter() - started, 1)
        markdown += ["## MMEB-V2 (hit@1 for image and video tasks, NDCG@5 for visual documents, %)", "",
                     mmeb_v2_table(results["mmeb_v2"], settings["model"]), ""]

    if "retrieval" in data:
        from .retrieval import evaluate_retrieval

        started = time.perf_counter()
        retrieval_results: dict[str, dict[str, Any]] = {}
        results["data"]["retrieval"] = {}
        for name, dataset in data["retrieval"].items():
            options = settings["retrieval"][name] or {}
            results["data"]["retrieval"][name] = dataset.describe()
            stages = {"embedder": evaluate_retrieval(embedder, dataset, batch_size=batch_size,
                                                     cache_dir=cache_dir / "retrieval")}
            if reranker is not None:
                stages["embedder + rerank"] = evaluate_retrieval(
                    embedder, dataset, reranker=reranker, rerank_top_k=int(options.get("rerank_top_k", 10)),
                    batch_size=batch_size, cache_dir=cache_dir / "retrieval",
                )
            retrieval_results[name] = stages
        results["retrieval"] = retrieval_results
        results["seconds"]["retrieval"] = round(time.perf_counter() - started, 1)
        markdown += ["## Zero-shot image-text retrieval (%)", "", retrieval_table(retrieval_results, settings["model"]),
                     ""]

    if "sugarcrepe" in data:
        from .sugarcrepe import evaluate_sugarcrepe

        started = time.perf_counter()
        where_data = data["sugarcrepe"]
        sugarcrepe = evaluate_sugarcrepe(
            embedder, where_data["annotations"], where_data["image_root"],
            subsets=settings["sugarcrepe"].get("subsets"), batch_size=batch_size, cache_dir=cache_dir / "sugarcrepe",
            reranker=reranker, max_rows=row_limit(settings, settings["sugarcrepe"]),
        )
        results["sugarcrepe"] = sugarcrepe
        results["data"]["sugarcrepe"] = where_data
        results["seconds"]["sugarcrepe"] = round(time.perf_counter() - started, 1)
        markdown += ["## SugarCrepe (accuracy, %)", "", sugarcrepe_table(sugarcrepe, settings["model"]), ""]

    if not state.is_main_process:
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (output_dir / "results.md").write_text("\n".join(markdown) + "\n")
    print("\n".join(markdown))
    return results


__all__ = [
    "EVALUATION_SECTIONS",
    "EvaluationArguments",
    "load_settings",
    "parse_evaluation_arguments",
    "prepare_data",
    "resolve_data_path",
    "row_limit",
    "run_evaluation",
]
