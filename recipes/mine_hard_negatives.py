"""Mine judge-scored hard negatives (UniME-V2's MLLM-as-a-Judge pipeline) into a `datasets` dataset.

    accelerate launch recipes/mine_hard_negatives.py --config recipes/configs/mine-tiny-cpu.yaml
    accelerate launch --multi_gpu --num_processes 2 recipes/mine_hard_negatives.py --config ... \\
        [--push_to_hub ORG/NAME]

``--help`` lists every argument; what the recipe does, resumes and writes is said in `modeling_unime.mining.recipe`.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "0")

from modeling_unime.mining.recipe import main  # noqa: E402

if __name__ == "__main__":
    main()
