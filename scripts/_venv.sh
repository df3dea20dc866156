# Sourced by scripts/test and scripts/serve: make sure a virtual environment with the project exists.
# VENV (default .venv) picks its folder; TORCH_SPEC (default torch==2.13.0, the CPU wheel) the torch
# to install when none is there yet. Extras (e.g. "dev") come from $1.
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
fi
if [ -n "$EXTRAS" ]; then
    "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
else
    "$VENV/bin/python" -m pip install --quiet -e .
fi
export PATH="$PWD/$VENV/bin:$PATH"
