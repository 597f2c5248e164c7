#!/usr/bin/env bash
# The GPU measurements as one prepared command, sized for a short loan of one GPU (about 7
# minutes after start-up), on that machine's own CUDA build of jax, as it is: no PyTorch,
# sacremoses, tensorflow-datasets or tensorboardX needed (PYTHON picks the interpreter).
#   bash benchmarks/gpu.sh               # on the GPU machine
#   bash benchmarks/gpu.sh --rehearse    # anywhere: the same steps on the CPU, tiny sizes
# Results go to ${OUT:-runs/gpu} (7 small files): env.txt, then for each step NAME.log and
# NAME.json; the corpus, its data store and the training runs (with their logs) to
# ${WORK:-/tmp/s2s_jax_gpu_bench}:
#   train_float32, train_bfloat16  the paper preset's training words/s through its real
#                                  command (python -m experiments.wmt14, as users run it:
#                                  benchmarks/gpu.py says how), in each compute dtype
#   lstm                           our scan LSTM stack against cuDNN's, forward and backward
# each under its own time limit, so that a slow compile cannot starve the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
work=${WORK:-/tmp/s2s_jax_gpu_bench}  # the corpus, its data store and the runs (GBs)
py=${PYTHON:-python3}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
extra=()
if [[ "${1:-}" == "--rehearse" ]]; then
  extra=(--tiny --allow-cpu)
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$py" -c 'import sys, jax; print(sys.version.split()[0], "jax", jax.__version__, jax.devices())'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
if [[ ${#extra[@]} -eq 0 && "$("$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != "gpu" ]]; then
  echo "gpu.sh: JAX does not see a GPU here (see $out/env.txt); nothing measured" >&2
  exit 2
fi

step() {  # NAME SECONDS ARGS...: one benchmarks.gpu task under a time limit
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$py" -m benchmarks.gpu "$@" --out "$out" --work "$work" "${extra[@]}" \
    >"$out/$name.log" 2>&1
  echo "$name: exit $? after at most ${limit} s"
  tail -n 12 "$out/$name.log"
}

step train_float32 200 train --dtype float32 --limit 185
step train_bfloat16 170 train --dtype bfloat16 --limit 155
step lstm 90 lstm
