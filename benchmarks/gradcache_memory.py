"""GradCache memory and speed: one soft-label training step at batch 8, 32 and 128, with and without GradCache.

On CPU, ``peak_mb`` is the peak of activation memory: the bytes of tensors autograd saves for the backward pass,
alive at the same time (parameters excluded), tracked with ``torch.autograd.graph.saved_tensors_hooks``. That is the
memory GradCache bounds; the process RSS also holds the model and the interpreter. On CUDA (``--device cuda``) it is
``torch.cuda.max_memory_allocated`` during the step. ``grad_max_abs_diff`` compares the parameter gradients of the two
modes on the same batch (batch 8, same random state).

    python benchmarks/gradcache_memory.py [--threads 1] [--batches 8 32 128] [--chunk_size 4]

Last line: JSON with peak_mb and step_s (each {"plain": {batch: value}, "gradcache": {...}}) and grad_max_abs_diff.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from modeling_unime.tiny import build_tiny_unime, synthetic_judge_dataset  # noqa: E402
from trainers import UniMEV2Trainer, UniMEV2TrainingArguments  # noqa: E402
from trainers.common import inputs_on_device  # noqa: E402


class ActivationMemory:
    """Peak bytes of tensors saved for backward and alive together (each storage counted once)."""

    def __init__(self, parameters) -> None:
        self.parameter_storages = {parameter.untyped_storage().data_ptr() for parameter in parameters}
        self.live: dict[int, int] = {}
        self.references: dict[int, int] = {}
        self.peak = 0

    def _current(self) -> int:
        return sum(self.live.values())

    @contextlib.contextmanager
    def track(self):
        memory = self

        class Saved:
            def __init__(self, tensor):
                self.tensor = tensor
                storage = tensor.untyped_storage()
                self.key = storage.data_ptr()
                if self.key in memory.parameter_storages:
                    self.key = None
                    return
                memory.references[self.key] = memory.references.get(self.key, 0) + 1
                memory.live[self.key] = storage.nbytes()
                memory.peak = max(memory.peak, memory._current())

            def __del__(self):
                if self.key is None:
                    return
                memory.references[self.key] -= 1
                if memory.references[self.key] == 0:
                    del memory.references[self.key], memory.live[self.key]

        with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
            yield self


def one_step(trainer, model, inputs, gradcache: bool, device: str) -> tuple[float, float, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    memory = ActivationMemory(model.parameters())
    start = time.perf_counter()
    with memory.track():
        if gradcache:
            trainer.gradcache_step(model, inputs)
        else:
            trainer.compute_loss(model, inputs).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else memory.peak
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return peak / 2**20, seconds, gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps ratios stable on shared CPUs)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--chunk_size", "--chunk-size", type=int, default=4, help="GradCache chunk (rows per forward)")
    parser.add_argument("--num_negatives", "--num-negatives", type=int, default=8)
    parser.add_argument("--hidden_size", "--hidden-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_tiny_unime("qwen2_vl", hidden_size=args.hidden_size)
    model.to(args.device).train()
    image_root = tempfile.mkdtemp()
    rows = synthetic_judge_dataset(max(args.batches), image_root, num_negatives=args.num_negatives)
    peak_mb: dict[str, dict[int, float]] = {"plain": {}, "gradcache": {}}
    step_s: dict[str, dict[int, float]] = {"plain": {}, "gradcache": {}}
    grad_max_abs_diff = None
    for batch in args.batches:
        trainers = {}
        for mode in ("plain", "gradcache"):
            training_args = UniMEV2TrainingArguments(
                tempfile.mkdtemp(), report_to=[], use_cpu=args.device == "cpu", num_negatives=args.num_negatives,
                gradcache=mode == "gradcache", gradcache_chunk_size=args.chunk_size, disable_tqdm=True,
            )
            trainers[mode] = UniMEV2Trainer(model=model, args=training_args, train_dataset=rows,
                                            processing_class=processor, image_root=image_root)
        gradients = {}
        for mode, trainer in trainers.items():
            inputs = inputs_on_device(trainer.data_collator([rows[i] for i in range(batch)]), args.device)
            one_step(trainer, model, inputs, mode == "gradcache", args.device)  # warm-up
            peak, seconds, gradients[mode] = one_step(trainer, model, inputs, mode == "gradcache", args.device)
            peak_mb[mode][batch] = round(peak, 2)
            step_s[mode][batch] = round(seconds, 4)
        if grad_max_abs_diff is None:
            grad_max_abs_diff = max(
                float((gradients["plain"][name] - gradients["gradcache"][name]).abs().max())
                for name in gradients["plain"]
            )
        print(f"batch {batch}: plain {peak_mb['plain'][batch]} MB {step_s['plain'][batch]} s | gradcache "
              f"{peak_mb['gradcache'][batch]} MB {step_s['gradcache'][batch]} s", flush=True)
    print(json.dumps({"device": args.device, "chunk_size": args.chunk_size, "num_negatives": args.num_negatives,
                      "peak_mb": peak_mb, "step_s": step_s, "grad_max_abs_diff": grad_max_abs_diff}))


if __name__ == "__main__":
    main()
