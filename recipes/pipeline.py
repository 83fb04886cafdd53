"""The main job: UniME-V2 end to end on the easy-vqa demo world (mining with a judge, soft-label training, the
reranker, MMEB-protocol evaluation), with the paper's Table 4 comparison, on a CPU.

    accelerate launch recipes/pipeline.py            # full run (about 14 minutes on 2 cores)
    accelerate launch recipes/pipeline.py --quick    # every stage on a sliver (under 2 minutes; CI's smoke test)
    python recipes/pipeline.py --ablation --seeds 0 1 2 --output_dir runs/ablation
                                                     # tau, k, steps, in-batch negatives, over seeds (~15 min a seed)

Outputs under --output_dir (default runs/pipeline): images/, baseline/, mllm-judge/, mined-*/ (the judge datasets),
the trained models' folders, results.json, results.md (the table) and summary.png (training curves and the table).
Every trained model is saved with the run's settings: running the same command again resumes after the last
finished stage. The ablation writes seed-N/ablation.json as it goes and ablation.md / ablation.json (mean, standard
deviation, paired difference from the control) over every seed folder present.
"""

import argparse
import os

from evaluation.pipeline import PipelineConfig, run_ablation, run_pipeline

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every stage on a sliver of the data")
    parser.add_argument("--ablation", action="store_true", help="the soft-label investigation instead of the table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of --ablation")
    parser.add_argument("--output_dir", default=None, help="default runs/pipeline (runs/ablation with --ablation)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    output_dir = args.output_dir or ("runs/ablation" if args.ablation else "runs/pipeline")
    settings = dict(output_dir=output_dir, threads=args.threads, seed=args.seed)
    config = PipelineConfig.quick(**settings) if args.quick else PipelineConfig(**settings)
    if args.ablation:
        run_ablation(config, args.seeds)
    else:
        run_pipeline(config)
