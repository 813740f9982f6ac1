#!/usr/bin/env bash
# The training-speed issue's GPU measurements, in one call of the device tool (a lent
# NVIDIA H200; its image has jax 0.11 with CUDA, flax, optax, orbax and torch, but not
# ml_collections, grain or what grain needs, which travel as wheels):
#
#   here, once (PyPI reachable):  bash benchmarks/h200.sh --download    # → .whl/, git-ignored
#   then:  device run  command="bash benchmarks/h200.sh"  carry=[".whl"]  timeout_s=540
#
# On the GPU: benchmarks/train_step.py (ours alone, random weights, bfloat16) on the
# openflamingo_3b- and flamingo_3b-shaped models at growing batches until one does not
# fit (or the budget, BENCH_BUDGET_S, 480 s, runs out); each run's JSON line goes to
# $OUT/train_step_gpu.jsonl, the GPU's name to $OUT/nvidia-smi.txt. BENCH_DRY=1 runs the
# same loop on this CPU at the tiny shape.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0)

if [ "${1:-}" = --download ]; then
  mkdir -p .git/info && grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  exit
fi

OUT=${OUT:-/tmp/h200_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -z "${BENCH_DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  runs=("openflamingo_3b 16 32 64" "flamingo_3b 8 16 32")
  common=(--dtype bfloat16 --steps 5 --seq-len 256 --images 5)
else
  runs=("tiny 2 4")
  common=(--steps 1 --seq-len 32 --images 1)
fi

deadline=$((SECONDS + ${BENCH_BUDGET_S:-480}))  # inside the call's timeout_s
for run in "${runs[@]}"; do
  read -r shape batches <<< "$run"
  for batch in $batches; do
    left=$((deadline - SECONDS))
    if [ "$left" -lt 60 ]; then echo "== $shape batch $batch: skipped, ${left} s left"; break; fi
    echo "== $shape batch $batch $(date +%T)"
    if ! timeout "$((left < 240 ? left : 240))" python3 benchmarks/train_step.py \
        --shape "$shape" --batch "$batch" "${common[@]}" > "$OUT/last.txt" 2> "$OUT/last.err"; then
      tail -5 "$OUT/last.err"
      echo "   $shape batch $batch did not run: the largest that fits is the one before"
      break
    fi
    tail -1 "$OUT/last.txt" | tee -a "$OUT/train_step_gpu.jsonl" | python3 -c \
      "import json,sys; r=json.loads(sys.stdin.read()); o=r['flamingo_jax']; print('  ', o['step_s'], 's/step, MFU', o['mfu'], ', XLA/analytic FLOPs', o['xla_over_analytic'], ', temporaries', o['memory_gib']['temporaries'], 'GiB')"
  done
done
rm -f "$OUT/last.txt" "$OUT/last.err"
