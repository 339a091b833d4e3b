#!/usr/bin/env bash
# The GPU matrix of bench/speed.py in one command (README "GPU"): DiT-XL/2, 50 steps, model batches
# 2, 16 and 64, executors reduce-overhead (CUDA graphs), eager, inductor and ORT (CUDA provider, when
# onnxruntime-gpu is there), whole generations interleaved. Usage: bash bench/gpu_matrix.sh [bfloat16|float16]
#
# On a machine whose Python has torch with CUDA but not diffusers, put the wheels it lacks in .whl/
# (README "GPU" gives the download command); they are installed into /tmp/site first. Rows stop
# starting after --time-budget (480 s) so the run ends inside a 10-minute limit; finished rows are in
# bench/results/speed_gpu_<dtype>.json even if it is cut short.
set -euo pipefail
cd "$(dirname "$0")/.."
dtype=${1:-bfloat16}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
python3 bench/speed.py --device cuda --dtype "$dtype" --models dit-xl --batches 2,16,64 --reps 3 \
  --executors reduce-overhead,eager,inductor,ort --time-budget 480 --out "speed_gpu_$dtype.json"
