#!/usr/bin/env bash
# The GPU benchmark: kernels (causal, noncausal), decoding and training throughput in bf16 and fp32
# against SDPA and FlashAttention at L = 1K ... 64K, in under ~10 minutes on an H100/H200-class GPU.
# Runs from the repository root (a relative --out is relative to it); needs only `pip install -e .`.
#   tools/gpu_bench.sh                                  # writes results/benchmarks/gpu_<gpu name>/
#   tools/gpu_bench.sh --quick --device cpu --out /tmp/x   # dry run on CPU
#   tools/gpu_bench.sh --help                           # every option (efficient_attn_tasks/commands/gpu_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, in the workers too
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
exec "$PYTHON" -m efficient_attn_tasks.commands.gpu_bench "$@"
