#!/usr/bin/env bash
# The one GPU check of a session, in priority order, each step time-boxed so that a slow step cannot eat the
# next ones; every log lands in $OUT. Fails fast: a CUDA smoke run of the whole pipeline goes first.
#
#   OUT=/tmp/gpu bash bench/gpu_session.sh [CIFAR10_TARBALL]
#
# Steps: smoke (digits distill on CUDA), `cvdd bench --preset cifar10-gpu --budget small` (the GPU preset),
# the speed suite on CUDA (paper architectures), recover with ten IPC indices fused into one batch against one
# index per batch (bn_groups=ipc), the 224 px memory benchmark, and the GPU-marked tests.
set -u
OUT=${OUT:-/tmp/cvdd-gpu}
DATA=${1:-${CVDD_CIFAR10_TAR:-.gpu/cifar10-jpeg.tar.gz}}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export CVDD_CACHE=${CVDD_CACHE:-/tmp/cvdd-cache}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
step() { echo "=== $(date +%T) $*"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
torch.cuda.get_device_name(0), 'cpus', __import__('os').cpu_count())"

step smoke: digits distill on CUDA
if ! timeout 150 $PY -m cvdd distill --device cuda --ipc 1 --seeds 0 --set epochs=2 --out "$WORK/smoke" \
    >"$OUT/smoke.log" 2>&1; then
  tail -40 "$OUT/smoke.log"
  exit 1
fi
grep -E "^\| (random-real|sre2l|cvdd)" "$OUT/smoke.log"

step pipeline: cvdd bench --preset cifar10-gpu --budget small
timeout 330 $PY -m cvdd bench --preset cifar10-gpu --budget small --data "$DATA" --out "$WORK/pipe" --device cuda \
  >"$OUT/pipeline.log" 2>&1
echo "exit $?"
cp "$WORK/pipe/bench.md" "$OUT/" 2>/dev/null && cat "$OUT/bench.md" || tail -30 "$OUT/pipeline.log"

step speed suite on CUDA
EXPERTS=auto
[ -d "$WORK/pipe/experts" ] && EXPERTS="$WORK/pipe/experts"  # the GPU preset's pool, trained in the step above
timeout 170 $PY -m cvdd bench --suite speed --preset cifar10-gpu --device cuda --data "$DATA" --experts "$EXPERTS" \
  --out "$OUT/speed-gpu.md" >"$OUT/speed.log" 2>&1
echo "exit $?"
cat "$OUT/speed-gpu.md" 2>/dev/null || tail -30 "$OUT/speed.log"

step recover: ten IPC indices in one batch vs one per batch
[ -d "$WORK/pipe/experts" ] && timeout 120 $PY bench/bench_fused.py --experts "$WORK/pipe/experts" --data "$DATA" \
  --device cuda --short 20 --long 120 2>&1 | grep -v "prior not measured" | tee "$OUT/fused.md"

step memory: 224 px recover, ResNet-18 + ResNet-50, 100 images
timeout 90 $PY bench/bench_memory224.py --device cuda --iterations 2 2>&1 | tee "$OUT/memory224.log" | tail -12

step GPU tests
timeout 90 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15
step done
