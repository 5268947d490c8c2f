#!/usr/bin/env bash
# The family U-Net steps on one CUDA GPU (prepared for a lent H100/H200), opensd against
# diffusers on the same weights, fp16 then bf16:
#   sdxl_unet  SDXL base, guided step at 1024² (latents (2, 4, 128, 128), context (2, 77, 2048), y (2, 2816))
#   sd21_unet  SD 2.1 768-v, guided step at 768² (latents (2, 4, 96, 96), context (2, 77, 1024))
# 20 timed calls per side after 3 warm-ups (bench.py's CUDA defaults); about a minute of
# work per dtype on an H100 after start-up (import, random init on the GPU).
#
# One command, from anywhere in the repository:
#   bash benchmarks/gpu_families.sh                  # both dtypes
#   DTYPES=fp16 bash benchmarks/gpu_families.sh --compile --budget 300   # extra args go to bench.py
# Needs a Python with CUDA torch and diffusers ($PYTHON, else .venv/bin/python, else python3).
# JSON goes to $OUT (the device runner's output folder) or out/: gpu-families-<dtype>.json;
# the tables and the log to stdout. Exit 1 when any run failed (the others still ran).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
fi
if [ -z "$PY" ]; then echo "gpu_families.sh: no python found; set PYTHON=/path/to/python" >&2; exit 2; fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch, diffusers; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "gpu_families.sh: $PY needs torch with a visible CUDA device and diffusers" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

dest=${OUT:-out}
mkdir -p "$dest"
status=0
for dtype in ${DTYPES:-fp16 bf16}; do
    echo "=== $dtype ==="
    "$PY" benchmarks/bench.py --device cuda --dtype "$dtype" --cases sdxl_unet,sd21_unet \
        --json "$dest/gpu-families-$dtype.json" "$@" || status=1
done
exit $status
