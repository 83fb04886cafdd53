"""The main job: UniME-V2 end to end on the easy-vqa demo world (mining with a judge, soft-label training, the
reranker, MMEB-protocol evaluation), with the paper's Table 4 comparison, on a CPU.

    accelerate launch recipes/pipeline.py            # full run (about 24 minutes on 2 shared cores)
    accelerate launch recipes/pipeline.py --quick    # every stage on a sliver (under 2 minutes; CI's smoke test)
    python recipes/pipeline.py --ablation --seeds 0 1 2 --output_dir runs/ablation
                                                     # tau, k, steps, in-batch negatives, over seeds (~15 min a seed)

Outputs under --output_dir (default runs/pipeline): images/, baseline/, mllm-judge/, mined-*/ (the judge datasets),
the trained models' folders, results.json, results.md (the table) and summary.png (training curves and the table).
Every trained model is saved with the run's settings: running the same command again resumes after the last
finished stage. Models go where the other recipes put theirs (`modeling_unime.placement`): this process's device,
bf16 mixed precision and the best attention kernel on an accelerator, float32 and sdpa on CPU (``--dtype``,
``--attn_implementation``); the line ``placement: ...`` says where. The ablation writes seed-N/ablation.json as it
goes and ablation.md / ablation.json (mean, standard deviation, paired difference from the control) over every seed
folder present.
"""

import os
from dataclasses import dataclass, field
from typing import Optional

from evaluation.demo.pipeline import PipelineConfig, run_ablation, run_pipeline
from modeling_unime.placement import ATTN_IMPLEMENTATIONS, DTYPE_NAMES
from modeling_unime.util.arguments import parse_recipe_arguments


@dataclass
class PipelineScriptArguments:
    """The main job's command line; the sizes and budgets of each mode are
    `evaluation.demo.pipeline.PipelineConfig`'s."""

    quick: bool = field(default=False, metadata={"help": "every stage on a sliver of the data (CI's smoke test)"})
    ablation: bool = field(default=False,
                           metadata={"help": "the soft-label investigation (tau, k, steps, in-batch negatives) "
                                             "instead of the table"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "seeds of --ablation"})
    output_dir: Optional[str] = field(default=None,
                                      metadata={"help": "default runs/pipeline (runs/ablation with --ablation)"})
    threads: int = field(default=1, metadata={"help": "torch threads (1 is fastest on a shared 2-core CPU)"})
    seed: int = field(default=0, metadata={"help": "seed of the data sample, the models and mining"})
    dtype: str = field(default="auto", metadata={
        "choices": DTYPE_NAMES,
        "help": "compute precision; auto: bf16 mixed precision (float32 weights) on an accelerator, float32 on CPU"})
    attn_implementation: str = field(default="auto", metadata={
        "choices": ATTN_IMPLEMENTATIONS,
        "help": "attention kernel; auto: flash_attention_2 where it can run, else sdpa"})

    def config(self) -> PipelineConfig:
        output_dir = self.output_dir or ("runs/ablation" if self.ablation else "runs/pipeline")
        settings = dict(output_dir=output_dir, threads=self.threads, seed=self.seed, dtype=self.dtype,
                        attn_implementation=self.attn_implementation)
        return PipelineConfig.quick(**settings) if self.quick else PipelineConfig(**settings)


def main(argv: Optional[list[str]] = None) -> None:
    (args,) = parse_recipe_arguments([PipelineScriptArguments], argv, description=__doc__)
    if args.ablation:
        run_ablation(args.config(), args.seeds)
    else:
        run_pipeline(args.config())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
