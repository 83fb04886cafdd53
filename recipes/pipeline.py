"""The main job: UniME-V2 end to end on the easy-vqa demo world (mining with a judge, soft-label training, the
reranker, MMEB-protocol evaluation), with the paper's Table 4 comparison, on a CPU.

    accelerate launch recipes/pipeline.py            # full run (about 15-20 minutes on 2 cores)
    accelerate launch recipes/pipeline.py --quick    # every stage on a sliver (under 2 minutes; CI's smoke test)

Outputs under --output_dir (default runs/pipeline): images/, baseline/, mllm-judge/, mined-*/ (the judge datasets),
the trained models' folders, results.json, results.md (the table) and summary.png (training curves and the table).
"""

import argparse
import os

from evaluation.pipeline import PipelineConfig, run_pipeline

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every stage on a sliver of the data")
    parser.add_argument("--output_dir", default="runs/pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = dict(output_dir=args.output_dir, threads=args.threads, seed=args.seed)
    run_pipeline(PipelineConfig.quick(**settings) if args.quick else PipelineConfig(**settings))
