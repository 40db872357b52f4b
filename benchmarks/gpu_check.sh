#!/usr/bin/env bash
# Training on a GPU, prepared for a lent machine (nothing here needs the network):
#   bash benchmarks/gpu_check.sh                      # from the repo root, ~8-10 minutes on an H100/H200
#   DEVICE=cpu ITERS=2 IMAGES=2 THREADS=2 bash benchmarks/gpu_check.sh   # dry run of the Python side on a CPU
# Needs torch, timm, numpy, pillow and pytest, plus the project's own wheels; the micro-sam peer gets its
# own venv (benchmarks/.peer-venv, seeing this interpreter's torch): carry one along, or set PEER_WHEELS to
# a folder of the peer's wheels (made online with `pip download -d DIR micro-sam torch-em python-elf
# bioimage-cpp --no-deps` plus the list in benchmarks/peer_microsam.py). Without either, the peer is skipped.
# 1. the CUDA AMP paths train without non-finite losses (pytest, fp16+GradScaler and bf16), and the decoder
#    with fused attention gives the official decoder's numbers on CUDA (tests/test_decoder.py);
# 2. the training-throughput benchmark: seed way vs cached embeddings, fp32 / fp16+GradScaler / bf16;
# 3. ours against micro-sam's SamTrainer on identical work (issue 10's settings, 200 iterations);
# 4. the whole run of each at the seed's defaults (170 images split as ingest splits, validation every 10,
#    checkpoints; about 2 more minutes; SEED_DEFAULTS=0 skips it).
# Everything goes to $OUT (or /tmp); the closing tables are $OUT/gpu_table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${OUT:-/tmp}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-200}
IMAGES=${IMAGES:-24}
THREADS=${THREADS:-8}  # torch CPU threads (the lent machines have 16 cores)
SEED_DEFAULTS=${SEED_DEFAULTS:-1}
# The whole-run comparison takes all of a Penn-Fudan-sized set on the GPU; a CPU dry run keeps IMAGES.
if [ "$DEVICE" = cuda ]; then SEED_IMAGES=${SEED_IMAGES:-170}; else SEED_IMAGES=${SEED_IMAGES:-$IMAGES}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"

"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch
if sys.argv[1] == "cpu":
    print(f"torch {torch.__version__}, CPU dry run")
    raise SystemExit(0)
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
PYEOF

if [ "$DEVICE" = cuda ]; then
    echo "== AMP paths and the decoder on CUDA (pytest) =="
    timeout 120 "$PY" -m pytest tests/test_finetune.py tests/test_decoder.py -q -p no:cacheprovider \
        -k "cuda_amp_paths or on_cuda" -rs

    echo "== training throughput (CUDA) =="
    timeout 240 "$PY" -m benchmarks.train_throughput --device cuda --dtypes fp32 fp16 bf16 --objects 4 8 25 \
        --iters 10 --repeats 1 --images 3 --embed-images 20 --threads 8 --json "$OUT_DIR/gpu_train_throughput.json"
fi

echo "== against the peer (micro-sam SamTrainer), $DEVICE, $ITERS iterations =="
if [ -x benchmarks/.peer-venv/bin/python ] || [ -n "${PEER_WHEELS:-}" ]; then
    timeout 400 "$PY" -m benchmarks.peer_microsam --device "$DEVICE" --iters "$ITERS" --images "$IMAGES" \
        --threads "$THREADS" --json "$OUT_DIR/gpu_peer.json" --markdown "$OUT_DIR/gpu_table.md"
    if [ "$SEED_DEFAULTS" = 1 ]; then
        echo "== whole run at the seed's defaults against the peer, $DEVICE, $SEED_IMAGES images, $ITERS iterations =="
        timeout 300 "$PY" -m benchmarks.peer_microsam --seed-defaults --device "$DEVICE" --iters "$ITERS" \
            --images "$SEED_IMAGES" --threads "$THREADS" --json "$OUT_DIR/gpu_peer_seed_defaults.json" \
            --markdown "$OUT_DIR/gpu_seed_defaults.md"
        { echo; echo "Whole run at the seed's defaults ($SEED_IMAGES images, $ITERS iterations, validation every 10):"
          echo; cat "$OUT_DIR/gpu_seed_defaults.md"; } >> "$OUT_DIR/gpu_table.md"
    fi
    echo "table: $OUT_DIR/gpu_table.md"
else
    echo "skipped: no benchmarks/.peer-venv and no PEER_WHEELS (the machine is offline)" | tee "$OUT_DIR/gpu_table.md"
fi
