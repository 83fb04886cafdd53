"""Plan the per-GPU memory of a training recipe before launching it (no weights loaded, no GPU needed).

    python recipes/memory_plan.py --config recipes/configs/qwen2vl-7b.yaml \\
        --accelerate_config recipes/accelerate/multi_gpu.yaml --gpu_memory 80
    python recipes/memory_plan.py --check_tiny      # the plan against measured peaks of tiny models on CPU

Prints a table (weights, adapter, gradients, optimizer state, batch inputs, activations of one GradCache chunk or
of the whole per-device batch, workspace), the total, "fits" or "does not fit (by X GiB)" with what to change, and
a JSON line last. How each item is estimated: `trainers.memory_plan`. Flags are snake_case; the kebab spellings
(``--gpu-memory``) work too. Any other ``--flag value`` pair is a recipe flag applied over the config file (e.g.
``--gradcache_chunk_size 1``, ``--gradient_checkpointing true``).
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The command line of the memory plan."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="training recipe config (recipes/configs/*.yaml)")
    parser.add_argument("--accelerate_config", "--accelerate-config", default=None,
                        help="accelerate config (recipes/accelerate/*.yaml); default: one process")
    parser.add_argument("--gpu_memory", "--gpu-memory", type=float, default=None,
                        help="memory of one GPU in GiB (e.g. 80): say whether the step fits")
    parser.add_argument("--text_tokens", "--text-tokens", type=int, default=None,
                        help="text tokens per row (default: 128 for the embedder, 256 for the reranker)")
    parser.add_argument("--check_tiny", "--check-tiny", action="store_true",
                        help="measure tiny training steps on CPU and print them against their plans")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0: planned (fits or not), 2: bad input)."""
    args, recipe_flags = build_parser().parse_known_args(argv)
    from trainers.memory_plan import compare_tiny_settings, format_comparison, plan_memory

    if args.check_tiny:
        print(format_comparison(compare_tiny_settings()))
        return 0
    if not args.config:
        print("error: --config is required (a training recipe, e.g. recipes/configs/qwen2vl-7b.yaml)", file=sys.stderr)
        return 2
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        print(f"error: --gpu_memory must be a positive number of GiB, got {args.gpu_memory}", file=sys.stderr)
        return 2
    try:
        plan = plan_memory(args.config, args.accelerate_config, args.gpu_memory, args.text_tokens, recipe_flags)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(plan.describe())
    print(plan.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
