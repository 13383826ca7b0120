#!/usr/bin/env bash
# The NVAE/flow speed suite for one accelerator: JSON lines on stdout, one per measurement.
#
#   bash benchmarks/gpu_suite.sh            # on a GPU: about 5-8 minutes (most of it compiles)
#   bash benchmarks/gpu_suite.sh --tiny     # any machine (CPU): tiny configs, tests the script
#
# 1. configs/nvae_cifar10.py (the published model) at batch 32 per device in bfloat16, remat
#    none and dots_saveable: compile s, step ms, images/s, peak memory (benchmarks/nvae_step.py);
# 2. 256x256 sampling (configs/nvae_celebahq256.py) at batch 36: ms/image (the paper: 56 ms on a
#    Titan V) (benchmarks/nvae_sample.py);
# 3. the flows' mixing layers forward/inverse (benchmarks/flow_permutations.py).
# The persistent compilation cache is off in every measurement (compile times are reported).
# Set PYTHON to choose the interpreter (default: python3); extra arguments are rejected.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
if [[ $# -gt 0 ]]; then echo "gpu_suite.sh: unknown arguments: $*" >&2; exit 2; fi

if [[ $TINY == 1 ]]; then
  STEP_CONFIG=configs/nvae_mnist.py:small; STEP_BATCH=4; STEP_STEPS=2
  SAMPLE=(--config=configs/nvae_mnist.py:small --batch=4 --runs=2)
  FLOWS=(--batch 2 --size 8 --channels 12 --width 16 --runs 2 --permutations reverse,conv1x1,emerging)
else
  STEP_CONFIG=configs/nvae_cifar10.py; STEP_BATCH=32; STEP_STEPS=10
  SAMPLE=(--config=configs/nvae_celebahq256.py --batch=36 --runs=5)
  FLOWS=(--batch 16 --size 32 --channels 12 --runs 20)
fi

for policy in none dots_saveable; do
  "$PY" benchmarks/nvae_step.py --config="$STEP_CONFIG" --batch_per_device=$STEP_BATCH \
    --steps=$STEP_STEPS --set precision.compute_dtype=bfloat16 --set remat.policy=$policy
done
"$PY" benchmarks/nvae_sample.py "${SAMPLE[@]}"
"$PY" benchmarks/flow_permutations.py "${FLOWS[@]}"
