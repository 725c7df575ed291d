#!/usr/bin/env bash
# The GPU runs docs/benchmarks.md records, by name, for a machine that has the repo and a CUDA torch.
#
#   bash benchmarks/gpu_session.sh checks   # the cuda tests of the allocator model and the state arena, and the
#                                           # resident slack of both R1-Distill models (about a minute)
#   bash benchmarks/gpu_session.sh 7b       # r1-distill-qwen-7b, seq 4096, 24 GiB, 6 steps, alone (compile 5-8 min)
#   bash benchmarks/gpu_session.sh trio     # r1-distill-qwen-1.5b, seq 2048, 200 steps: stock compile AMP, the
#                                           # product path at 7 GiB and the MLP-chunked graph, three processes with
#                                           # their timed steps serialized, plus the product path's memory snapshot
#
# Several names run in order. Results go to $OUT (default ./gpu_out): each suite's JSON, the snapshot, the logs.
# The package is installed in place without dependencies first (the machine has torch, triton, transformers).
set -u
R=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$R/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q -e "$R" --no-deps --no-build-isolation >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
cd /tmp  # not the repo root: its runtime/ and passes/ would shadow the installed package's mapping
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

for part in "$@"; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    checks)
      UNSLOTH_FX_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider -rs \
        "$R/tests/test_allocator_model.py" "$R/tests/test_optim_arena.py" -k cuda 2>&1 | tail -8
      for m in r1-distill-qwen-1.5b r1-distill-qwen-7b; do
        timeout 150 python3 "$R/benchmarks/resident_slack.py" --model $m --out "$OUT/slack_$m.json"
      done ;;
    7b)
      python3 "$R/benchmarks/suite.py" --models r1-distill-qwen-7b --seq 4096 --variants ufx-24GiB-16chunks-int4 \
        --steps 6 --variant-timeout "${T7B:-560}" --out "$OUT/suite_7b" > "$OUT/log_7b.txt" 2>&1
      tail -12 "$OUT/log_7b.txt" ;;
    trio)
      export UFX_BENCH_LOCK=/tmp/ufx_bench.lock
      for v in compile-amp ufx-7GiB ufx-7GiB-int4; do
        python3 "$R/benchmarks/suite.py" --variants $v --steps 200 --variant-timeout 520 --out "$OUT/suite_$v" \
          > "$OUT/log_$v.txt" 2>&1 &
      done
      python3 "$R/benchmarks/peak_snapshot.py" --budget 7GiB --seq 2048 --out "$OUT/snapshot_7GiB.json" \
        > "$OUT/log_snapshot.txt" 2>&1 &
      wait
      for v in compile-amp ufx-7GiB ufx-7GiB-int4; do tail -3 "$OUT/log_$v.txt"; done
      grep -A2 "predicted:" "$OUT/log_snapshot.txt" ;;
    *) echo "unknown part '$part' (checks, 7b, trio)"; exit 2 ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
