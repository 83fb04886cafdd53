"""Parity of UniME-V2 checkpoints loaded by sentence-transformers, per backbone and modality.

    HF_HUB_OFFLINE=1 python parity/parity_sentence_transformers.py [--threads 1]

(1) Tiny random checkpoints of the three backbone families: ``SentenceTransformer(folder, trust_remote_code=True)``
    against ``UniMEV2Model.encode`` on text, image and image+text rows (with and without an instruction).
(2) The authors' released checkpoints as replayed by transformers 4.49 (tests/fixtures, built on first use): converted
    by ``modeling_unime.export.convert``, loaded by SentenceTransformer, against the 4.49 reference embeddings of every
    text row and every image row embedded under the evaluation rule (1344x1344).

Last line: JSON {"tiny": {backbone: {modality: max_abs_diff}}, "authors_449": {checkpoint: {modality: ...}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from modeling_unime.export.convert import convert_checkpoint  # noqa: E402
from modeling_unime.sentence_unime import IMAGE_QUERY_PROMPT, add_sentence_transformers_files  # noqa: E402
from modeling_unime.tiny import build_tiny_unime  # noqa: E402


def _image(seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (48, 64, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def tiny_parity(folder: Path) -> dict:
    results = {}
    for backbone in ("qwen2_vl", "qwen2_5_vl", "llava_onevision"):
        model, processor = build_tiny_unime(backbone)
        path = folder / backbone
        model.save_pretrained(path)
        processor.save_pretrained(path)
        add_sentence_transformers_files(path)
        st_model = SentenceTransformer(str(path), trust_remote_code=True, device="cpu")
        images = [_image(seed) for seed in range(3)]
        rows = {
            "text": (["a red car", "two dogs on a beach", "a man crossing the street"], [None] * 3),
            "image": ([None] * 3, images),
            "image+text": (["what colour?", "how many?", "where?"], images),
        }
        results[backbone] = {}
        for modality, (texts, row_images) in rows.items():
            inputs = [text if image is None else ({"image": image, "text": text} if text else image)
                      for text, image in zip(texts, row_images)]
            worst = 0.0
            for instruction in (None, IMAGE_QUERY_PROMPT):
                ours = model.encode(texts=texts, images=row_images, instruction=instruction, processor=processor)
                theirs = st_model.encode(inputs, prompt=instruction, convert_to_tensor=True).cpu()
                worst = max(worst, float((theirs - ours).abs().max()))
            results[backbone][modality] = worst
    return results


def authors_parity(folder: Path) -> dict:
    from authors_fixtures import authors_fixtures, load_references

    results = {}
    for name in ("qwen2vl-2b", "qwen2vl-7b", "llava-ov-8b"):
        references = load_references(name)
        converted = convert_checkpoint(authors_fixtures() / name, folder / name, dtype=torch.float32)
        st_model = SentenceTransformer(str(converted), trust_remote_code=True, device="cpu")
        results[name] = {}
        for row in references["rows"]:
            if row["image"] is not None and row["resolution"] != "high":
                continue  # embedded by the authors under a training size, not the checkpoint's evaluation rule
            text = row["source_text"]
            item = text if row["image"] is None else {
                "image": Image.open(authors_fixtures() / "images" / row["image"]), "text": text}
            embedding = st_model.encode([item], convert_to_tensor=True).cpu()[0]
            modality = "text" if row["image"] is None else "image(+instruction)"
            difference = float((embedding - references["tensors"][row["embedding_key"]]).abs().max())
            results[name][modality] = max(results[name].get(modality, 0.0), difference)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip_authors", "--skip-authors", action="store_true", help="only the tiny checkpoints")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        report = {"tiny": tiny_parity(Path(folder))}
        if not args.skip_authors:
            report["authors_449"] = authors_parity(Path(folder))
    for section, rows in report.items():
        for name, modalities in rows.items():
            print(f"{section:12s} {name:18s} " + "  ".join(f"{m}: {d:.1e}" for m, d in modalities.items()))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
