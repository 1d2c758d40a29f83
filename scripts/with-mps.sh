#!/usr/bin/env bash
# Run one command with NVIDIA's Multi-Process Service (MPS) on this machine's GPUs, then stop it.
#
#   scripts/with-mps.sh python3 benchmarks/gpu_check.py --out gpu-results --only pool
#
# Why: without MPS, processes share a GPU by time-slicing between their CUDA contexts, so the kernels of
# two candidates never run at once; under MPS they share one context and small students' kernels overlap
# (README, "On a GPU"). The control daemon and its files live under $MPS_DIR (default: a fresh folder in
# /tmp); a daemon already running is left alone and used. The GPU's settings (compute mode, clocks) are
# not touched. Exit status: the command's.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
command -v nvidia-cuda-mps-control >/dev/null || { echo "with-mps: nvidia-cuda-mps-control not found" >&2; exit 2; }
export MPS_DIR="${MPS_DIR:-$(mktemp -d /tmp/mps.XXXXXX)}"
export CUDA_MPS_PIPE_DIRECTORY="$MPS_DIR/pipe" CUDA_MPS_LOG_DIRECTORY="$MPS_DIR/log"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
started=0
if ! echo get_server_list | nvidia-cuda-mps-control >/dev/null 2>&1; then
  nvidia-cuda-mps-control -d
  started=1
fi
stop() { [ "$started" = 1 ] && echo quit | nvidia-cuda-mps-control || true; }
trap stop EXIT
"$@"
