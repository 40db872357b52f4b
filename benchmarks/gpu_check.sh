#!/usr/bin/env bash
# Training on a GPU, prepared for a lent machine (nothing here needs the network). Two device calls:
#   bash benchmarks/gpu_check.sh            # core table, one call: about 4-5 minutes expected on an H100, its
#                                           # steps' time limits sum to 7 minutes (timeout_s=480 leaves a rerun)
#   bash benchmarks/gpu_check.sh whole      # second call: the whole run at the seed's defaults, ours vs micro-sam,
#                                           # and the fp32/fp16/bf16 training-throughput table (about 6 minutes)
#   DEVICE=cpu ITERS=2 IMAGES=2 EMBED_IMAGES=2 THREADS=2 bash benchmarks/gpu_check.sh [whole]   # CPU dry run
#
# Setup from carried wheels. The GPU image has python3 3.12 with torch, timm, numpy, pillow, pytest, scipy,
# scikit-image, scikit-learn, h5py, imageio, xarray, tensorboard, matplotlib, xxhash, tqdm and pyyaml; the rest
# travels as cp312 wheels in .whl/ (ignored by git; name it in the run's `carry`), installed into /tmp/site.
# benchmarks/gpu_wheels.txt pins them (about 18 MB together, far under the 64 MiB a call carries); make the
# folder here once (pip reaches PyPI):
#   echo /.whl/ >> "$(git rev-parse --git-common-dir)/info/exclude"
#   grep -v '^#' benchmarks/gpu_wheels.txt | xargs python3 -m pip download --no-deps --only-binary=:all: \
#       --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl
# and run it with carry [".whl"]. The micro-sam peer is installed into the same /tmp/site and run by the same
# interpreter (--peer-python), so no venv is made there. Without .whl the peer rows are skipped.
#
# Core (the default mode), each step under its own timeout, everything written to $OUT (or /tmp):
#   1. the CUDA AMP paths train without non-finite losses (fp16+GradScaler and bf16), and the decoder with fused
#      attention gives the official decoder's numbers on CUDA (pytest);
#   2. ours against micro-sam's SamTrainer on identical work, $ITERS iterations (issue 10's settings);
#   3. embedding throughput: $EMBED_IMAGES Penn-Fudan-like images, the product's pass and larger batches;
#   4. the share of a training step the GPU is busy, and the warm time per iteration (benchmarks/gpu_busy.py).
# The closing table is $OUT/gpu_table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-core}
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT_DIR=${OUT:-/tmp}
DEVICE=${DEVICE:-cuda}
ITERS=${ITERS:-200}
IMAGES=${IMAGES:-24}
EMBED_IMAGES=${EMBED_IMAGES:-170}
THREADS=${THREADS:-8}  # torch CPU threads (the lent machines have 16 cores)
# Ours in the peer's own mixed precision, so both do the same arithmetic: fp16 (+GradScaler) on CUDA, bf16 on a CPU.
if [ "$DEVICE" = cuda ]; then AMP_DTYPE=${AMP_DTYPE:-fp16}; else AMP_DTYPE=${AMP_DTYPE:-bf16}; fi
# The whole-run comparison takes all of a Penn-Fudan-sized set on the GPU; a CPU dry run keeps IMAGES.
if [ "$DEVICE" = cuda ]; then SEED_IMAGES=${SEED_IMAGES:-170}; else SEED_IMAGES=${SEED_IMAGES:-$IMAGES}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
# Each step's time limit is sized for the GPU; a CPU dry run (slow, often on a shared machine) gets 10x.
SCALE=1
[ "$DEVICE" = cuda ] || SCALE=10
t() { echo $(( $1 * SCALE )); }
TABLE="$OUT_DIR/gpu_table.md"
[ "$MODE" = whole ] && TABLE="$OUT_DIR/gpu_whole_table.md"
: > "$TABLE"

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    echo "== setup: $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site =="
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PEER=()
if "$PY" -c "import micro_sam.training" 2> /dev/null; then
    PEER=(--peer-python "$PY")
elif [ ! -x benchmarks/.peer-venv/bin/python ]; then
    echo "no micro-sam (neither carried wheels nor benchmarks/.peer-venv): the peer rows are skipped"
fi

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

have_peer() { [ ${#PEER[@]} -gt 0 ] || [ -x benchmarks/.peer-venv/bin/python ]; }

if [ "$MODE" = core ]; then
    if [ "$DEVICE" = cuda ]; then
        echo "== AMP paths and the decoder on CUDA (pytest) =="
        timeout "$(t 90)" "$PY" -m pytest tests/test_finetune.py tests/test_decoder.py -q -p no:cacheprovider \
            -k "cuda_amp_paths or on_cuda" -rs
    fi
    if have_peer; then
        echo "== ours against the peer (micro-sam SamTrainer), $DEVICE, $ITERS iterations, $IMAGES images =="
        timeout "$(t 150)" "$PY" -m benchmarks.peer_microsam --device "$DEVICE" --iters "$ITERS" --images "$IMAGES" \
            --threads "$THREADS" --amp-dtype "$AMP_DTYPE" "${PEER[@]}" --json "$OUT_DIR/gpu_peer.json" --markdown "$OUT_DIR/gpu_peer.md"
        { echo "Per iteration, ours against micro-sam ($ITERS iterations, $IMAGES images):"; echo
          cat "$OUT_DIR/gpu_peer.md"; echo; } >> "$TABLE"
    fi
    echo "== embedding throughput, $EMBED_IMAGES images =="
    timeout "$(t 90)" "$PY" -m benchmarks.embed_speed --device "$DEVICE" --images "$EMBED_IMAGES" --repeats 2 \
        --threads "$THREADS" --markdown "$OUT_DIR/gpu_embed.md"
    { echo "Embedding pass:"; echo; cat "$OUT_DIR/gpu_embed.md"; echo; } >> "$TABLE"
    echo "== the share of a step the GPU is busy =="
    timeout "$(t 90)" "$PY" -m benchmarks.gpu_busy --device "$DEVICE" --images "$IMAGES" --threads "$THREADS" \
        --warmup "$(( ITERS < 20 ? 1 : 20 ))" --iters "$(( ITERS < 50 ? ITERS : 50 ))" \
        --json "$OUT_DIR/gpu_busy.json" | tee -a "$TABLE"
elif [ "$MODE" = whole ]; then
    if have_peer; then
        echo "== whole run at the seed's defaults against the peer, $DEVICE, $SEED_IMAGES images, $ITERS iterations =="
        timeout "$(t 330)" "$PY" -m benchmarks.peer_microsam --seed-defaults --device "$DEVICE" --iters "$ITERS" \
            --images "$SEED_IMAGES" --threads "$THREADS" --amp-dtype "$AMP_DTYPE" "${PEER[@]}" --json "$OUT_DIR/gpu_peer_seed_defaults.json" \
            --markdown "$OUT_DIR/gpu_seed_defaults.md"
        { echo "Whole run at the seed's defaults ($SEED_IMAGES images, $ITERS iterations, validation every 10):"
          echo; cat "$OUT_DIR/gpu_seed_defaults.md"; echo; } >> "$TABLE"
    fi
    if [ "$DEVICE" = cuda ]; then
        echo "== training throughput (CUDA): seed way vs cached embeddings, fp32 / fp16 / bf16 =="
        timeout "$(t 200)" "$PY" -m benchmarks.train_throughput --device cuda --dtypes fp32 fp16 bf16 --objects 4 8 25 \
            --iters 10 --repeats 1 --images 3 --embed-images 20 --threads "$THREADS" \
            --json "$OUT_DIR/gpu_train_throughput.json"
    fi
else
    echo "usage: $0 [core|whole]" >&2
    exit 2
fi
echo "table: $TABLE"
