"""The R1 benchmark suite (same as ``unsloth-fx bench``): every variant in its own process, side by side.

GPU (the lead runs it):
    python benchmarks/suite.py --out bench_out                              # 1.5B, default variants, 20 steps
    python benchmarks/suite.py --variants compile-amp,ufx-7GiB --steps 200  # the 200-step loss target
    python benchmarks/suite.py --models r1-distill-qwen-7b --seq 4096 --variants eager-amp,ufx-24GiB
CPU smoke (< 2 minutes):
    python benchmarks/suite.py --smoke --out /tmp/bench

See unsloth_fx/bench.py for what is measured and how.
"""

import sys

from unsloth_fx.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
