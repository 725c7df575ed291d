#!/usr/bin/env bash
# The GPU runs docs/benchmarks.md records, by name, for a machine that has the repo and a CUDA torch.
#
#   bash benchmarks/gpu_session.sh checks   # the cuda tests of the allocator model and the state arena, and the
#                                           # resident slack of both R1-Distill models (about a minute;
#                                           # SLACK_MODELS="r1-distill-qwen-1.5b" measures one)
#   bash benchmarks/gpu_session.sh 7b       # r1-distill-qwen-7b, seq 4096, 24 GiB, 6 steps, alone (compile 5-8 min)
#   bash benchmarks/gpu_session.sh trio     # r1-distill-qwen-1.5b, seq 2048, 200 steps: stock compile AMP, the
#                                           # product path at 7 GiB and the MLP-chunked graph, three processes with
#                                           # their timed steps serialized, plus the product path's memory snapshot
#                                           # (TRIO="compile-amp ufx-7GiB" picks the variants, SNAPSHOT=0 drops it)
#   bash benchmarks/gpu_session.sh prof     # profile_step.py: the product path at 7 GiB and stock compile AMP, seq 2048,
#                                           # kernel time by category (PROF_AMP_DELAY=s starts AMP's that much later)
#   bash benchmarks/gpu_session.sh chunk    # bench_chunk.py: 1.5B, seq 2048 and 8192, unchunked / LM head only
#                                           # (torch and Triton row kernels) / chunked / Liger (wheels in .whl/, if
#                                           # carried), then the largest seq in 16 GiB of FIT_VARIANTS (default
#                                           # unchunked,chunked); CHUNK_JOBS cells compile at once (default 2);
#                                           # CHUNK_ARGS: more bench_chunk.py arguments (--variants, --seqs)
#   bash benchmarks/gpu_session.sh moe      # bench_chunk.py: deepseek-v3-mini, seq 2048, unchunked / chunked (MoE
#                                           # blocks chunked), beside a profile of the chunked step (up to 9 min)
#
# Several names run in order. Results go to $OUT (default ./gpu_out): each suite's JSON, the snapshot, the logs.
# The package is installed in place without dependencies first (the machine has torch, triton, transformers);
# UFX_NO_INSTALL=1 skips that (a second instance started beside a first). Timed steps of every part take the
# lock $UFX_BENCH_LOCK, so parts run at once (`gpu_session.sh 7b & UFX_NO_INSTALL=1 gpu_session.sh chunk`) time alone.
set -u
R=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$R/gpu_out}
mkdir -p "$OUT"
export UFX_BENCH_LOCK=${UFX_BENCH_LOCK:-/tmp/ufx_bench.lock}
if [ "${UFX_NO_INSTALL:-0}" != 1 ]; then
  python3 -m pip install -q -e "$R" --no-deps --no-build-isolation >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
fi
cd /tmp  # not the repo root: its runtime/ and passes/ would shadow the installed package's mapping
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

for part in "$@"; do
  echo "== $part $(date -u +%H:%M:%S)"
  case $part in
    checks)
      UNSLOTH_FX_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider -rs \
        "$R/tests/test_allocator_model.py" "$R/tests/test_optim_arena.py" -k cuda 2>&1 | tail -8
      for m in ${SLACK_MODELS:-r1-distill-qwen-1.5b r1-distill-qwen-7b}; do
        timeout 150 python3 "$R/benchmarks/resident_slack.py" --model $m --out "$OUT/slack_$m.json"
      done ;;
    7b)
      python3 "$R/benchmarks/suite.py" --models r1-distill-qwen-7b --seq 4096 --variants ufx-24GiB-16chunks-int4 \
        --steps 6 --variant-timeout "${T7B:-560}" --out "$OUT/suite_7b" > "$OUT/log_7b.txt" 2>&1
      tail -12 "$OUT/log_7b.txt" ;;
    trio)
      trio=${TRIO:-compile-amp ufx-7GiB ufx-7GiB-int4}
      for v in $trio; do
        python3 "$R/benchmarks/suite.py" --variants $v --steps 200 --variant-timeout 520 --out "$OUT/suite_$v" \
          > "$OUT/log_$v.txt" 2>&1 &
      done
      if [ "${SNAPSHOT:-1}" = 1 ]; then
        python3 "$R/benchmarks/peak_snapshot.py" --budget 7GiB --seq 2048 --out "$OUT/snapshot_7GiB.json" \
          > "$OUT/log_snapshot.txt" 2>&1 &
      fi
      wait
      for v in $trio; do tail -3 "$OUT/log_$v.txt"; done
      [ "${SNAPSHOT:-1}" = 1 ] && grep -A2 "predicted:" "$OUT/log_snapshot.txt" ;;
    prof)
      timeout 560 python3 "$R/benchmarks/profile_step.py" --variant ufx --budget 7GiB --seq 2048 --steps 3 \
        --out "$OUT/prof_ufx7.txt" > "$OUT/log_prof_ufx7.txt" 2>&1 &
      (sleep "${PROF_AMP_DELAY:-0}"; timeout 400 python3 "$R/benchmarks/profile_step.py" --variant compile-amp \
        --seq 2048 --steps 3 --out "$OUT/prof_amp.txt" > "$OUT/log_prof_amp.txt" 2>&1) &
      wait
      for f in prof_ufx7 prof_amp; do head -3 "$OUT/$f.txt" 2>/dev/null || tail -3 "$OUT/log_$f.txt"; done ;;
    chunk)
      (if ls "$R"/.whl/*.whl >/dev/null 2>&1; then
         python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
           "$R"/.whl/*.whl && export PYTHONPATH=/tmp/site
       fi
       python3 "$R/benchmarks/bench_chunk.py" --jobs "${CHUNK_JOBS:-2}" --timeout 300 --out "$OUT/bench_chunk.json" \
         --fit-variants "${FIT_VARIANTS:-unchunked,chunked}" ${CHUNK_ARGS:-} > "$OUT/log_chunk.txt" 2>&1)
      tail -16 "$OUT/log_chunk.txt" ;;
    moe)
      timeout 560 python3 "$R/benchmarks/profile_step.py" --model deepseek-v3-mini --variant chunked --optimizer none \
        --seq 2048 --warmup 2 --steps 2 --out "$OUT/prof_moe.txt" > "$OUT/log_prof_moe.txt" 2>&1 &
      python3 "$R/benchmarks/bench_chunk.py" --model deepseek-v3-mini --variants unchunked,chunked --seqs 2048 \
        --fit-limit 0 --jobs 2 --timeout 540 --out "$OUT/bench_chunk_moe.json" > "$OUT/log_moe.txt" 2>&1
      tail -8 "$OUT/log_moe.txt"
      wait
      head -3 "$OUT/prof_moe.txt" 2>/dev/null || tail -3 "$OUT/log_prof_moe.txt" ;;
    *) echo "unknown part '$part' (checks, 7b, trio, prof, chunk, moe)"; exit 2 ;;
  esac
done
echo "== done $(date -u +%H:%M:%S)"
