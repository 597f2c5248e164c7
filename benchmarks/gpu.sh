#!/usr/bin/env bash
# The performance issue's GPU measurements as one prepared command, sized for a short loan of a
# GPU machine (about 9 minutes after start-up). It installs nothing: it uses that machine's own
# CUDA builds of jax and torch (PYTHON picks the interpreter). Results go to ${OUT:-runs/gpu}:
# env.txt, then NAME.log (progress and the table) and NAME.json for each run below, in order of
# importance, each under its own time limit so that a slow compile cannot starve the rest.
#   bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c 'import jax, torch; print("jax", jax.__version__, jax.devices());
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
if [[ "$("$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != "gpu" ]]; then
  echo "gpu.sh: JAX does not see a GPU here (see $out/env.txt); nothing measured" >&2
  exit 2
fi

run() {  # NAME SECONDS ARGS...: one benchmarks.compare run under a time limit
  local name=$1 limit=$2
  shift 2
  # --malloc system: the host-heap settings are for XLA's CPU temporaries, not needed here
  timeout "$limit" "$py" -m benchmarks.compare "$@" --malloc system --json "$out/$name.json" \
    >"$out/$name.log" 2>&1
  echo "$name: exit $? after at most ${limit} s; $(tail -n 1 "$out/$name.log")"
}

# The paper's model first: the issue's GPU target is its training speed (words/s and ratio).
run paper_train 210 --config paper --tasks train --steps 10
run paper_decode 180 --config paper --tasks decode --decode-reps 3
run medium 100 --config medium --steps 10 --decode-reps 3
