#!/usr/bin/env bash
# The GPU checks of issue #3 in one short run, for the `device` tool (a bare H100 / H200 image with python3, torch,
# transformers; no network). Prepare here with `make gpu-wheels`, then run there, carrying the wheels:
#
#   device run  command: "bash bench/gpu_check.sh"   carry: [".whl"]   timeout_s: 540
#
# 1. environment (GPU, driver, torch / CUDA / transformers versions)           -> $OUT/env.txt
# 2. the CUDA kernel tests (tests/kernels/test_cuda*.py: each layer's CUDA path against its decoded weight)
#                                                                               -> $OUT/cuda-tests.txt
# 3. bench/quantize_speed_gpu.py (kernels, then llama-1b / llama-7b shapes; each part saved as it finishes)
#                                                                               -> $OUT/*quant-speed-gpu.{json,md}
# Missing pure-Python dependencies of lmshrink (pydantic & co) are installed from .whl/gpu into a private folder,
# never over the image's packages. SPEED_ARGS replaces the speed script's arguments (e.g. a CPU dry run:
# SPEED_ARGS="--device cpu --kernel-shapes tiny --models tiny" OUT=/tmp/o bash bench/gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lmshrink-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
DEPS=${DEPS:-/tmp/lmshrink-deps}
missing=()
for mod in pydantic pydantic_core annotated_types typing_inspection typing_extensions; do
  $PY -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if ((${#missing[@]})); then
  echo "installing from .whl/gpu: ${missing[*]}"
  wheels=()
  for mod in "${missing[@]}"; do
    wheels+=(.whl/gpu/"${mod}"-*.whl)
  done
  $PY -m pip install -q --no-index --no-deps --target "$DEPS" "${wheels[@]}" || echo "wheel install failed"
fi
export PYTHONPATH="$DEPS:$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  $PY -c "import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/env.txt"
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider tests/kernels/test_cuda.py \
  tests/kernels/test_cuda_layout.py 2>&1 | tee "$OUT/cuda-tests.txt"
# shellcheck disable=SC2086
timeout "${SPEED_TIMEOUT:-330}" $PY bench/quantize_speed_gpu.py --out-dir "$OUT" ${SPEED_ARGS:-} 2>&1 \
  | tee "$OUT/speed-log.txt"
echo "gpu_check done: $(ls "$OUT")"
