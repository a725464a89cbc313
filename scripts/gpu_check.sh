#!/usr/bin/env bash
# The GPU check, prepared to run in one go (< 5 minutes on one H100/H200-class GPU):
#   1. nvidia-smi
#   2. the tests marked gpu: the capture on CUDA against eager float64 attention (tiny_llama, SmolLM2-135M)
#   3. scripts/bench.py 512 2048 8192 --json model=llama3_8b_random hardware=h100, JSON into the output folder
# Without a GPU it says so plainly and runs what needs none (the gpu tests then skip, and the bench is skipped).
#   bash scripts/gpu_check.sh <output folder>            # PYTHON=... to pick the interpreter
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh <output folder>}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0

echo "== gpu_check: $(date -u +%FT%TZ)  python: $PYTHON  commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
else
    echo "== gpu_check: no nvidia-smi on this machine"
fi
has_gpu=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
"$PYTHON" -c "import torch, transformers, numba; print('== torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'numba', numba.__version__)"
if [ "$has_gpu" != 1 ]; then
    echo "== gpu_check: NO CUDA GPU here: torch.cuda.is_available() is False. Running the CPU-safe parts only;"
    echo "   the gpu tests will skip and the Llama-3-8B-shape bench is not run."
fi

echo "== gpu tests"
"$PYTHON" -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ "$has_gpu" = 1 ]; then
    echo "== bench: Llama-3-8B shape, random bf16 weights, capture / decoder forward"
    timeout 240 "$PYTHON" scripts/bench.py 512 2048 8192 --json --warmup 1 --repeats 3 \
        model=llama3_8b_random hardware=h100 hardware.batch_size=1 logger=none 2>&1 | tee "$OUT/bench_raw.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    grep '^{' "$OUT/bench_raw.txt" > "$OUT/bench.json"
else
    echo "== bench: skipped (no GPU)"
fi
echo "== gpu_check: done, exit $status; files in $OUT"
exit $status
