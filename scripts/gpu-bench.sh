#!/usr/bin/env bash
# One command, one GPU, under 5 minutes: dense vs pruned seconds per slide for a ViT-L/16 (UNI
# shape) and a ViT-H/14 (UNI2-h shape) with random weights, and a CLAM-style dense loop, on a
# synthetic 0.25 µm/px slide of about 20 000 tissue tiles (benchmarks/bench_gpu.py).
#
#   scripts/gpu-bench.sh                      # cuda, bf16, 1 slide, 20 000 tiles
#   scripts/gpu-bench.sh --slides 2           # more slides if the time allows
#   GPU_BENCH_OUT=/scratch/b scripts/gpu-bench.sh
#
# Needs the package's environment (make install, or the lead's venv): PYTHON picks the
# interpreter (default .venv/bin/python when present, else python3). Writes the rows to
# $GPU_BENCH_OUT/bench_gpu.json and the log to $GPU_BENCH_OUT/bench_gpu.log; the rendered
# tiles are cached in $GPU_BENCH_OUT/tiles (about 3.3 GB per slide) so a rerun skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${GPU_BENCH_OUT:-/tmp/wsi-prune-gpu-bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu-bench: no CUDA device visible to torch {torch.__version__} "
             f"(built for CUDA {torch.version.cuda}); run benchmarks/bench_gpu.py --tiny on CPU")
print("gpu-bench:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
  --format=csv,noheader || true
# 290 s hard stop; the benchmark itself starts no new row after 270 s and prints what it has
timeout --signal=INT 290 "$PYTHON" benchmarks/bench_gpu.py --device cuda --precision bf16 \
  --slides 1 --tiles 20000 --work "$OUT/tiles" --json "$OUT/bench_gpu.json" "$@" \
  2>&1 | tee "$OUT/bench_gpu.log"
