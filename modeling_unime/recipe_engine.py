"""The engine the recipes run on: training (`trainers.recipe_runner`), mining (`modeling_unime.mining.recipe`),
evaluation (`evaluation.harness`) and the main job (`evaluation.demo.pipeline`).

Every recipe goes through the same four steps, in this one place:

1. arguments: dataclasses from a ``--config`` YAML file and flags (`modeling_unime.util.arguments`);
2. `start_recipe`: torch threads, this process's `accelerate.PartialState`, and the placement (device, dtype,
   attention kernel) its models are loaded with (`modeling_unime.placement`);
3. `RecipeRun.load`: models from a folder, a Hub repo id or ``tiny:<family>`` (`modeling_unime.model_specs`);
4. `finish_distributed`: every process reaches the end before the process group closes.

Example:
    >>> run = start_recipe(threads=1)
    >>> embedder, processor = run.load("embedder", "tiny:qwen2_vl")
    >>> run.where["device"].type, embedder.dtype
    ('cpu', torch.float32)
    >>> finish_distributed()  # nothing to do in a single process
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .model_specs import load_model_spec
from .placement import Placement, placement, process_state


@dataclass
class RecipeRun:
    """This process's part of a recipe run: its `accelerate.PartialState` (``state.is_main_process``,
    ``state.process_index``, ``state.num_processes``) and where its models go (`Placement`)."""

    state: Any
    where: Placement

    def load(self, kind: str, spec: str, **kwargs: Any) -> tuple[Any, Any]:
        """A model of ``kind`` (``embedder``, ``reranker`` or ``judge``) and its processor from ``spec``, read
        straight onto this process's device in its dtype, with its attention kernel (see `load_model_spec`)."""
        return load_model_spec(spec, kind, self.where, **kwargs)


def start_recipe(
    threads: int = 1,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = "auto",
    compute_dtype: torch.dtype | None = None,
) -> RecipeRun:
    """Set the torch CPU threads of this process and resolve its process state and placement (``auto``: bf16 and
    flash-attention / sdpa on a GPU, float32 and sdpa on CPU)."""
    torch.set_num_threads(int(threads))
    state = process_state()
    return RecipeRun(state=state, where=placement(dtype, attn_implementation, state.device, compute_dtype))


def finish_distributed() -> None:
    """Let every process of a multi-process launch reach the end, then close the process group. A process that exits
    while the group's threads still run can abort ("terminate called without an active exception", exit -6), which
    fails the whole launch after the work is done."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


__all__ = ["RecipeRun", "finish_distributed", "start_recipe"]
