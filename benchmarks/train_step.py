"""One training step of ours against the authors' recipe replayed in the same run: same weights, same batch.

The authors' step (GaryGuTC/UniME-v2, ``Embedding/src/model.py`` ``encode_input`` and their GradCache settings): the
full causal LM with ``output_hidden_states=True`` (every layer's states kept and the 151,936-way logits computed at
every token), the last layer's last token, L2-normalised; GradCache with chunks of 2 for the queries and 2 for the
candidates; k = 8 negatives; every input encoded however often it recurs. Ours: `UniMEV2Trainer.gradcache_step` on
`UniMEV2Model` (the base model only, one row gathered per sequence), on the collator's chunks (``--chunk_size``;
the authors' 2 by default), with repeated inputs encoded once. Both use the soft-label loss (tau 0.02) and no dropout,
so the gradients must agree: the largest relative difference over the parameters is reported.

Two shapes: ``tiny`` (hidden 256, 2 layers, the real 151,936-token vocabulary, as the other benchmarks) and
``slice`` (a real-width slice of Qwen2-VL-2B: hidden 1536, intermediate 8960, 12 heads, 2 KV heads, 2 layers, tied
152K vocabulary). A 2-layer slice overstates what skipping the LM head saves at the real depth (28 layers): the
script also times one decoder layer and the LM head on the step's tokens and reports the ratio they imply at 28
layers (GradCache: two forwards and one backward, about two forwards, through the layers; the LM head, in theirs
only, forward twice and no gradient). The measured step also pays, per GradCache chunk, the accumulation of the
embedding matrix's dense gradient (152K x hidden): larger chunks (``--chunk_size``, where memory allows) save that.

    python benchmarks/train_step.py [--shapes tiny slice] [--queries 4] [--num_negatives 8] [--tokens 32]
                                    [--duplicate_share 0.25] [--chunk_size 2] [--repeats 2] [--threads 1]

Rows are random token sequences of ``--tokens`` tokens (text only: the LM head and the hidden states are what differ;
images would add the same vision-tower cost to both); ``--duplicate_share`` of the candidates repeat another
candidate of the step (a label text shared by several queries). Last line: JSON per shape with both step times, the
speedup, rows and tokens encoded per pass, and the largest relative gradient difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration  # noqa: E402

from modeling_unime import UniMEV2Config, UniMEV2Model  # noqa: E402
from modeling_unime.tiny import REAL_QWEN2_VOCAB_SIZE  # noqa: E402
from trainers import UniMEV2Trainer, UniMEV2TrainingArguments  # noqa: E402
from trainers.adapters import prepare_for_training  # noqa: E402
from trainers.collator import distinct_inputs  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False),
    "slice": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                  tie_word_embeddings=True),
}
REAL_DEPTH = 28  # Qwen2-VL-2B and -7B decoder layers
FIRST_ORDINARY_TOKEN, LAST_ORDINARY_TOKEN = 1000, 150_000  # clear of the special and image tokens


def backbone_config(shape: str, layers: int) -> Qwen2VLConfig:
    text = dict(vocab_size=REAL_QWEN2_VOCAB_SIZE, num_hidden_layers=layers, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": [16, 8, 8] if shape == "tiny" else [16, 24, 24]},
                **SHAPES[shape])
    vision = dict(depth=1, embed_dim=32, hidden_size=text["hidden_size"], num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_chans=3, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653,
                         tie_word_embeddings=text["tie_word_embeddings"])


def make_batch(queries: int, negatives: int, tokens: int, duplicate_share: float, seed: int):
    """Rows [queries, then each query's positive and negatives] as token tensors; some candidates repeat others."""
    rng = random.Random(seed)

    def sequence() -> list[int]:
        return [rng.randrange(FIRST_ORDINARY_TOKEN, LAST_ORDINARY_TOKEN) for _ in range(tokens)]

    rows = [sequence() for _ in range(queries)]
    candidates: list[list[int]] = []
    for _ in range(queries * (1 + negatives)):
        repeat = candidates and rng.random() < duplicate_share
        candidates.append(list(rng.choice(candidates)) if repeat else sequence())
    rows += candidates
    scores = torch.tensor([[0.9] + [rng.uniform(0.0, 0.6) for _ in range(negatives)] for _ in range(queries)])
    return rows, scores


def chunks_of(rows: list[list[int]], size: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": torch.tensor(rows[start:start + size]),
             "attention_mask": torch.ones(len(rows[start:start + size]), len(rows[0]), dtype=torch.long)}
            for start in range(0, len(rows), size)]


def our_inputs(rows, scores, queries: int, chunk_size: int) -> dict:
    """What the de-duplicating collator gives the trainer: the distinct rows in chunks and the index of every row."""
    unique, index = distinct_inputs([tuple(row) for row in rows], rows)
    return {"chunks": chunks_of(unique, chunk_size), "input_index": torch.tensor(index), "num_queries": queries,
            "judge_scores": scores}


def authors_step(causal_lm, rows, scores, queries: int, objective) -> torch.Tensor:
    """Their GradCache step: chunks of 2 over the queries and over the candidates, every row encoded, the full
    causal-LM forward with every hidden state; the loss on the cached representations, then each chunk again with
    its cached gradient."""

    def encode(chunk):
        hidden = causal_lm(**chunk, output_hidden_states=True, return_dict=True).hidden_states[-1]
        return F.normalize(hidden[:, -1, :].float(), dim=-1)

    chunks = chunks_of(rows[:queries], 2) + chunks_of(rows[queries:], 2)
    with torch.no_grad():
        cached = [encode(chunk).requires_grad_() for chunk in chunks]
    representations = torch.cat(cached)
    loss, _ = objective(representations[:queries], representations[queries:], scores)
    loss.backward()
    for chunk, representation in zip(chunks, cached):
        torch.autograd.backward(encode(chunk), grad_tensors=representation.grad)
    return loss.detach()


def timed(step, model, repeats: int) -> tuple[float, torch.Tensor, dict[str, torch.Tensor]]:
    """Best time of ``repeats`` steps; the loss and the gradients of the last."""
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    gradients = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    return min(times), loss, gradients


@torch.no_grad()
def layer_and_head_seconds(causal_lm, rows, repeats: int) -> tuple[float, float]:
    """Forward seconds of one decoder layer and of the LM head on the step's tokens (one pass)."""
    hidden = causal_lm.model.get_input_embeddings()(torch.tensor(rows))
    language_model = causal_lm.model.language_model
    positions = torch.arange(hidden.shape[1]).expand(3, hidden.shape[0], -1)
    rotary = language_model.rotary_emb(hidden, positions)
    layer = language_model.layers[0]

    def best(function):
        return min(_seconds(function) for _ in range(repeats))

    layer_seconds = best(lambda: layer(hidden, position_embeddings=rotary, attention_mask=None))
    head_seconds = best(lambda: causal_lm.lm_head(hidden))
    return layer_seconds, head_seconds


def _seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure(shape: str, args: argparse.Namespace) -> dict:
    config = backbone_config(shape, args.layers)
    torch.manual_seed(args.seed)
    causal_lm = Qwen2VLForConditionalGeneration(config).train()
    ours = UniMEV2Model(UniMEV2Config(backbone_config=config)).train()
    ours.model.load_state_dict(causal_lm.model.state_dict())
    base_lm = causal_lm
    if args.finetuning != "full":
        # The same adapter on both, drawn from the same random state (the modules are created in the same order).
        torch.manual_seed(args.seed + 1)
        causal_lm = prepare_for_training(causal_lm, args.finetuning, dropout=0.0).train()
        torch.manual_seed(args.seed + 1)
        ours = prepare_for_training(ours, args.finetuning, dropout=0.0).train()
    trainer = UniMEV2Trainer(model=ours, args=UniMEV2TrainingArguments(
        tempfile.mkdtemp(prefix="train-step-"), gradcache=True, gradcache_chunk_size=args.chunk_size,
        num_negatives=args.num_negatives, use_cpu=True, report_to=[]))
    rows, scores = make_batch(args.queries, args.num_negatives, args.tokens, args.duplicate_share, args.seed)
    inputs = our_inputs(rows, scores, args.queries, args.chunk_size)
    our_seconds, our_loss, our_gradients = timed(lambda: trainer.gradcache_step(ours, inputs), ours, args.repeats)
    their_seconds, their_loss, their_gradients = timed(
        lambda: authors_step(causal_lm, rows, scores, args.queries, trainer.objective), causal_lm, args.repeats)
    differences = {
        name: float((gradient - their_gradients[name]).norm() / their_gradients[name].norm().clamp_min(1e-30))
        for name, gradient in our_gradients.items() if name in their_gradients}
    layer_seconds, head_seconds = layer_and_head_seconds(base_lm, rows, args.repeats)
    # At the real depth, per step: GradCache runs the layers forward twice and backward once (about two forwards),
    # on the distinct rows for us and on every row for them; theirs adds the LM head to both forwards (it gets no
    # gradient). Left out: what grows with the chunk count (the embedding gradient is accumulated once per chunk).
    distinct_rows = int(inputs["input_index"].max()) + 1
    per_row_layers = REAL_DEPTH * layer_seconds / len(rows)
    passes_ours = 4 * per_row_layers * distinct_rows
    passes_theirs = (4 * per_row_layers + 2 * head_seconds / len(rows)) * len(rows)
    return {
        "shape": shape, "finetuning": args.finetuning, "layers": args.layers,
        "hidden_size": config.text_config.hidden_size,
        "rows_per_pass": {"ours": distinct_rows, "authors": len(rows)},
        "tokens_per_pass": {"ours": distinct_rows * args.tokens, "authors": len(rows) * args.tokens},
        "step_seconds": {"ours": round(our_seconds, 4), "authors": round(their_seconds, 4)},
        "speedup": round(their_seconds / our_seconds, 2),
        "loss": {"ours": float(our_loss), "authors": float(their_loss)},
        "max_relative_gradient_difference": max(differences.values()),
        "parameters_compared": len(differences),
        "one_layer_seconds": round(layer_seconds, 5), "lm_head_seconds": round(head_seconds, 5),
        "implied_speedup_at_28_layers": round(passes_theirs / passes_ours, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["tiny", "slice"], choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--num_negatives", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per row")
    parser.add_argument("--duplicate_share", type=float, default=0.25,
                        help="share of the candidates that repeat another candidate of the step")
    parser.add_argument("--chunk_size", type=int, default=2, help="our GradCache chunk (the authors': 2)")
    parser.add_argument("--finetuning", default="full", choices=["full", "dora", "lora"],
                        help="full: every weight (the embedding's dense gradient per chunk); dora: the paper's adapter "
                             "(r 16, language-model projections), the embedding frozen")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps ratios stable on shared CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes:
        result = measure(shape, args)
        results.append(result)
        print(f"{shape}: ours {result['step_seconds']['ours']:.3f} s, authors {result['step_seconds']['authors']:.3f} "
              f"s per step ({result['speedup']}x; implied at 28 layers {result['implied_speedup_at_28_layers']}x), "
              f"max relative gradient difference {result['max_relative_gradient_difference']:.2e}", flush=True)
    print(json.dumps({"threads": args.threads, "finetuning": args.finetuning, "queries": args.queries,
                      "num_negatives": args.num_negatives,
                      "tokens": args.tokens, "duplicate_share": args.duplicate_share, "chunk_size": args.chunk_size,
                      "median_speedup": statistics.median(result["speedup"] for result in results),
                      "shapes": results}))


if __name__ == "__main__":
    main()
