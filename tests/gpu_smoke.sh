#!/usr/bin/env bash
# GPU smoke test of the recipes' placement (every model on the process's accelerator, bf16 there). Run from anywhere on a GPU machine:
#
#   bash tests/gpu_smoke.sh            # every visible GPU (1 process per GPU)
#   NUM_PROCESSES=1 bash tests/gpu_smoke.sh
#
# Runs, offline (tiny random models, synthetic data: no Hub), each under a timeout:
#   1. the tiny mining recipe with dtype/attention on auto (bf16, flash-attn if installed, else sdpa);
#   2. the same with float32 + sdpa, and compares the two datasets (informative: tiny random models in bf16 differ);
#   3. the tiny embedding-training recipe for a few steps (bf16 by default on GPU: the model's device and precision);
#   4. the evaluation recipe with the shipped config and tiny models on a miniature of the authors' data folder.
# Every recipe prints "placement: ..." lines (device, dtype, attention of each model); this script prints them and
# fails if a model stayed on the CPU. Logs and outputs stay in $SMOKE_DIR (default: a fresh temporary folder).
set -euo pipefail

cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE_DIR="${SMOKE_DIR:-$(mktemp -d -t unime-gpu-smoke-XXXXXX)}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"   # seconds per step
mkdir -p "$SMOKE_DIR"
echo "== outputs and logs: $SMOKE_DIR"

python - <<'EOF'
import importlib.util, torch
from modeling_unime.placement import bf16_supported, flash_attention_available, placement
assert torch.cuda.is_available(), "no CUDA device visible: this smoke test is for a GPU machine"
names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}")
print(f"== bf16: {bf16_supported('cuda')}, flash-attn installed: {importlib.util.find_spec('flash_attn') is not None}, "
      f"usable: {flash_attention_available('cuda')}; auto placement here: {placement(device='cuda:0')}")
EOF

NUM_PROCESSES="${NUM_PROCESSES:-$(python -c 'import torch; print(torch.cuda.device_count())')}"
LAUNCH=(accelerate launch --num_machines 1 --num_processes "$NUM_PROCESSES" --mixed_precision no --dynamo_backend no)
if [ "$NUM_PROCESSES" -gt 1 ]; then
  LAUNCH+=(--multi_gpu --main_process_port "${MAIN_PROCESS_PORT:-29517}")
fi
EXPECTED_DTYPE="$(python -c 'from modeling_unime.placement import resolve_dtype as r; print(r("auto", "cuda:0"))')"

run_step() {  # run_step NAME COMMAND...: run under the timeout, log to $SMOKE_DIR/NAME.log, show the placement lines
  local name="$1"; shift
  echo "== $name: $*"
  local start=$SECONDS status=0
  timeout --signal=TERM --kill-after=30 "$STEP_TIMEOUT" "$@" >"$SMOKE_DIR/$name.log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    echo "!! $name failed (exit $status; 124 = timed out after ${STEP_TIMEOUT}s); last lines of $SMOKE_DIR/$name.log:"
    tail -n 40 "$SMOKE_DIR/$name.log"
    exit "$status"
  fi
  echo "   done in $((SECONDS - start))s"
  grep -hE "^placement:|Settings: " "$SMOKE_DIR/$name.log" | sed 's/^/   /' || echo "   (no placement line printed)"
}

expect_on_gpu() {  # expect_on_gpu NAME MODEL_LABEL DTYPE: every placement line of the log has the model on cuda:*
  local name="$1" label="$2" dtype="$3"
  local lines
  lines="$(grep -h "^placement:" "$SMOKE_DIR/$name.log" || true)"
  if [ -z "$lines" ] || echo "$lines" | grep -v -q "$label: cuda:[0-9]* $dtype"; then
    echo "!! $name: expected '$label: cuda:<n> $dtype' on every placement line"
    exit 1
  fi
}

# 1-2. Mining: auto (bf16, flash-attn or sdpa), then float32 + sdpa.
run_step mine-auto "${LAUNCH[@]}" recipes/mine_hard_negatives.py --config recipes/configs/mine-tiny-cpu.yaml \
  --output_dir "$SMOKE_DIR/mine-auto"
expect_on_gpu mine-auto embedder "$EXPECTED_DTYPE"
expect_on_gpu mine-auto judge "$EXPECTED_DTYPE"
run_step mine-fp32 "${LAUNCH[@]}" recipes/mine_hard_negatives.py --config recipes/configs/mine-tiny-cpu.yaml \
  --output_dir "$SMOKE_DIR/mine-fp32" --dtype float32 --attn_implementation sdpa
expect_on_gpu mine-fp32 embedder torch.float32
expect_on_gpu mine-fp32 judge torch.float32
python - "$SMOKE_DIR" <<'EOF'
import sys
from datasets import load_from_disk
auto, fp32 = (load_from_disk(f"{sys.argv[1]}/{name}/dataset").to_list() for name in ("mine-auto", "mine-fp32"))
assert len(auto) == len(fp32) > 0, (len(auto), len(fp32))
same_negatives = sum((a["neg_texts"], a["neg_images"]) == (b["neg_texts"], b["neg_images"]) for a, b in zip(auto, fp32))
positive_gap = max(abs(a["judge_scores"][0] - b["judge_scores"][0]) for a, b in zip(auto, fp32))
print(f"   {len(auto)} rows each; same negatives in {same_negatives}/{len(auto)} rows; "
      f"max |positive judge score (auto) - (float32)| = {positive_gap:.2e}")
EOF

# 3. Training: a few steps of the tiny embedder recipe (full fine-tuning: float32 master weights, bf16 autocast).
run_step train-tiny "${LAUNCH[@]}" recipes/train_embedding.py --config recipes/configs/tiny-cpu.yaml \
  --output_dir "$SMOKE_DIR/train-tiny" --max_steps 3
expect_on_gpu train-tiny model torch.float32
grep -h "^placement:" "$SMOKE_DIR/train-tiny.log" | grep -q "mixed precision: bf16" \
  || { [ "$EXPECTED_DTYPE" != "torch.bfloat16" ] || { echo "!! train-tiny: expected bf16 mixed precision"; exit 1; }; }

# 4. Evaluation: the shipped 2B config with tiny models, on a miniature of the authors' data/ folder (every real
# layout: MMEB parquet + eval_images, royokong parquet, ShareGPT4V JSON, Urban1k, SugarCrepe), built by the test suite.
python - "$SMOKE_DIR/eval-data" <<'EOF'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from test_eval_layouts import build_authors_data
build_authors_data(Path(sys.argv[1]))
EOF
run_step eval-tiny "${LAUNCH[@]}" recipes/run_evaluation.py --config recipes/configs/eval-unime-v2-2b.yaml \
  --data_root "$SMOKE_DIR/eval-data" --model tiny:qwen2_vl --reranker tiny:qwen2_5_vl --output_dir "$SMOKE_DIR/eval-tiny"
if grep -q "^placement:" "$SMOKE_DIR/eval-tiny.log"; then
  expect_on_gpu eval-tiny embedder "$EXPECTED_DTYPE"
elif ! grep -q "Settings: cuda" "$SMOKE_DIR/eval-tiny.log"; then
  echo "!! eval-tiny: the evaluation's settings line does not name a cuda device"; exit 1
fi
echo "== GPU smoke test passed ($SMOKE_DIR)"
