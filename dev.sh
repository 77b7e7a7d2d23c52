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

setup() {
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[dev.sh] creating $VENV" >&2
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed" want
  want="$(cat pyproject.toml dev.sh | sha1sum | cut -c1-16) $TORCH_SPEC"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "[dev.sh] installing dependencies into $VENV (first run takes a couple of minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
    # torch first and pinned: anything that pulls torch in later must not replace it.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
    local constraints="$VENV/torch-constraint.txt"
    "$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" -e ".[dev]"
    install_gltf_validator
    echo "$want" > "$stamp"
  fi
}

# The Khronos glTF validator (npm; pure JavaScript) lets the tests check exported GLBs. Optional:
# without node/npm the set-up goes on and that one test says it was skipped and why.
GLTF_VALIDATOR_DIR="$VENV/gltf-validator"
install_gltf_validator() {
  if command -v npm >/dev/null && command -v node >/dev/null; then
    npm install --prefix "$GLTF_VALIDATOR_DIR" --no-audit --no-fund --loglevel=error \
      gltf-validator@2.0.0-dev.3.10 >/dev/null \
      || echo "[dev.sh] warning: npm could not install gltf-validator; its test will be skipped" >&2
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
