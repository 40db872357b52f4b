#!/usr/bin/env bash
# CUDA check for training, prepared for a GPU machine (nothing here needs the network):
#   bash benchmarks/gpu_check.sh            # from the repo root, ~3-4 minutes
# 1. the CUDA AMP paths train without non-finite losses (pytest, fp16+GradScaler and bf16);
# 2. the training-throughput benchmark on CUDA: seed way vs cached embeddings, fp32 / fp16+GradScaler /
#    bf16, 4/8/25 objects, peak torch.cuda.max_memory_allocated, one table (exit 1 on a non-finite loss).
# Results JSON goes to $OUT (or /tmp) as gpu_train_throughput.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${OUT:-/tmp}
mkdir -p "$OUT_DIR"

"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
PYEOF

echo "== AMP paths (pytest) =="
timeout 120 "$PY" -m pytest tests/test_finetune.py -q -p no:cacheprovider -k "cuda_amp_paths" -rs

echo "== training throughput (CUDA) =="
timeout 240 "$PY" -m benchmarks.train_throughput --device cuda --dtypes fp32 fp16 bf16 --objects 4 8 25 \
    --iters 10 --repeats 1 --images 3 --embed-images 20 --threads 8 --json "$OUT_DIR/gpu_train_throughput.json"
