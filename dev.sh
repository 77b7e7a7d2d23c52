#!/usr/bin/env bash
# One-command set-up and run. Creates .venv on first use, then:
#   ./dev.sh demo [demo options]   offline oracle demo (CPU, no model weights)
#   ./dev.sh test [pytest options] the test suite
#   ./dev.sh bench                 the CPU benchmarks
#   ./dev.sh shell                 a shell inside the environment
# TORCH_SPEC picks the torch build (default torch==2.13.0; on a GPU machine use the CUDA build
# you want, e.g. TORCH_SPEC="torch==2.13.0" from the PyTorch index).
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DISTILL3D_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PY=${PYTHON:-python3}

# Set-up prints one progress line per phase; pip's and setuptools' own output (build notices,
# index warnings) goes to $VENV/install.log and is shown only when a phase fails.
LOG="$VENV/install.log"
quietly() {
  local what=$1
  shift
  echo "[dev.sh] $what" >&2
  if ! "$@" >>"$LOG" 2>&1; then
    echo "[dev.sh] failed: $what; the last lines of $LOG:" >&2
    tail -n 30 "$LOG" >&2
    exit 1
  fi
}

setup() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[dev.sh] creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed" want
  want="$(cat pyproject.toml setup.py dev.sh | sha1sum | cut -c1-16) $TORCH_SPEC"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    : >"$LOG"
    local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    echo "[dev.sh] installing into $VENV (first run takes a few minutes; details in $LOG)" >&2
    quietly "1/5 pip, setuptools, wheel" "${pip[@]}" --upgrade pip setuptools wheel
    # torch first and pinned: anything that pulls torch in later must not replace it.
    quietly "2/5 $TORCH_SPEC" "${pip[@]}" "$TORCH_SPEC"
    local constraints="$VENV/torch-constraint.txt"
    "$VENV/bin/python" -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > "$constraints"
    quietly "3/5 distill3d (editable) and its dependencies" "${pip[@]}" -c "$constraints" -e ".[dev]"
    install_gltf_validator
    install_chromium
    echo "$want" > "$stamp"
    echo "[dev.sh] ready: $VENV/bin/distill3d" >&2
  fi
}

# The Khronos glTF validator (npm; pure JavaScript) lets the tests check exported GLBs. Optional:
# without node/npm the set-up goes on and that one test says it was skipped and why.
GLTF_VALIDATOR_DIR="$VENV/gltf-validator"
install_gltf_validator() {
  if command -v npm >/dev/null && command -v node >/dev/null; then
    echo "[dev.sh] 4/5 glTF validator (npm)" >&2
    npm install --prefix "$GLTF_VALIDATOR_DIR" --no-audit --no-fund --loglevel=error \
      gltf-validator@2.0.0-dev.3.10 >>"$LOG" 2>&1 \
      || echo "[dev.sh] note: npm could not install gltf-validator (see $LOG); its test will be skipped" >&2
  else
    echo "[dev.sh] 4/5 glTF validator skipped (no node/npm; its test will be skipped)" >&2
  fi
}

# Optional: Debian's Chromium, so the gallery test (tests/test_report_browser.py) opens the report
# pages in a real headless browser. Only as root with apt-get; elsewhere that test is skipped and
# says why. DISTILL3D_NO_CHROMIUM=1 skips this step.
install_chromium() {
  if command -v chromium >/dev/null; then
    echo "[dev.sh] 5/5 chromium already installed" >&2
  elif [[ -z "${DISTILL3D_NO_CHROMIUM:-}" ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    echo "[dev.sh] 5/5 chromium (apt-get, for the gallery browser test)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >>"$LOG" 2>&1 \
      || echo "[dev.sh] note: apt-get could not install chromium (see $LOG); the gallery browser test will be skipped" >&2
  else
    echo "[dev.sh] 5/5 chromium skipped (not root or no apt-get; the gallery browser test will be skipped)" >&2
  fi
}

cmd=${1:-demo}
shift || true
setup
case "$cmd" in
  demo) exec "$VENV/bin/distill3d" demo "$@" ;;
  test)
    if [[ -d "$GLTF_VALIDATOR_DIR/node_modules/gltf-validator" ]]; then
      export DISTILL3D_GLTF_VALIDATOR="${DISTILL3D_GLTF_VALIDATOR:-$GLTF_VALIDATOR_DIR}"
    fi
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  bench) exec "$VENV/bin/python" benchmarks/run_all.py "$@" ;;
  shell) exec bash --rcfile <(echo "source $VENV/bin/activate") ;;
  *) echo "usage: ./dev.sh demo|test|bench|shell [args]" >&2; exit 2 ;;
esac
