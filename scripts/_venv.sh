# Sourced by scripts/test and scripts/serve: make sure a virtual environment with the project exists.
#
# The caller sets VENV_EXTRAS (e.g. "dev", or empty) before sourcing; positional arguments are not
# read, so the caller's own arguments (./scripts/serve --port 8001) never reach pip.
#   VENV        the environment's folder (default .venv)
#   VENV_PYTHON the interpreter that creates it (default python3)
#   TORCH_SPEC  what `pip install` gets for torch when the environment has none (default
#               torch==2.13.0). Split on spaces, so it may carry pip options, e.g. the CPU-only
#               build: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
#               A bare torch==X from PyPI on Linux x86-64 is the CUDA build (runs on the CPU too).
#
# Installing takes a minute, so it happens only when needed: the environment is missing, or the
# stamp file in it (written after a successful install) does not match this checkout's path, the
# hash of pyproject.toml and the extras asked for. Otherwise sourcing this costs milliseconds.
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
VENV_PYTHON="${VENV_PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV_EXTRAS="${VENV_EXTRAS:-}"
_venv_stamp="$VENV/.cascade-install-stamp"

_venv_say() { echo "setup: $*" >&2; }

_venv_hash() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum pyproject.toml | cut -d' ' -f1
    else
        shasum -a 256 pyproject.toml | cut -d' ' -f1
    fi
}

# The stamp: which checkout and pyproject.toml the editable install was made from, then its extras.
_venv_base="project $PWD
pyproject $(_venv_hash)"

# Sets _venv_extras (what to install) and _venv_reason; returns 1 when nothing needs installing.
_venv_plan() {
    local installed extra
    _venv_extras="$VENV_EXTRAS"
    if [ ! -x "$VENV/bin/python" ]; then
        _venv_reason="creating the virtual environment $VENV ($("$VENV_PYTHON" --version 2>&1))"
        return 0
    fi
    if [ ! -f "$_venv_stamp" ]; then
        _venv_reason="$VENV has no record of a finished install: installing"
        return 0
    fi
    if [ "$(head -n 2 "$_venv_stamp")" != "$_venv_base" ]; then
        _venv_reason="pyproject.toml (or the checkout) changed since $VENV was set up: installing"
        return 0
    fi
    # Same pyproject.toml: keep the extras already installed and add any new ones.
    installed="$(sed -n 's/^extras //p' "$_venv_stamp")"
    _venv_extras="$installed"
    for extra in ${VENV_EXTRAS//,/ }; do
        case ",$installed," in
        *",$extra,"*) ;;
        *) _venv_extras="${_venv_extras:+$_venv_extras,}$extra" ;;
        esac
    done
    if [ "$_venv_extras" = "$installed" ]; then
        return 1
    fi
    _venv_reason="adding the extras $VENV_EXTRAS to $VENV"
    return 0
}

if _venv_plan; then
    _venv_started=$SECONDS
    _venv_say "$_venv_reason"
    rm -f "$_venv_stamp"
    if [ ! -x "$VENV/bin/python" ]; then
        "$VENV_PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        _venv_say "installing $TORCH_SPEC (TORCH_SPEC; the largest download)"
        read -r -a _venv_torch <<<"$TORCH_SPEC"
        "$VENV/bin/python" -m pip install --quiet "${_venv_torch[@]}"
        _venv_say "installed $("$VENV/bin/python" -c 'import torch
cuda = torch.version.cuda
print(f"torch {torch.__version__}, " + (f"CUDA {cuda} build" if cuda else "CPU-only build"))')"
    fi
    _venv_target="."
    if [ -n "$_venv_extras" ]; then
        _venv_target=".[$_venv_extras]"
    fi
    _venv_say "installing the project and its dependencies (pip install -e \"$_venv_target\")"
    # PYTHONWARNINGS: setuptools' editable-install banner is a warning of the build backend.
    PYTHONWARNINGS=ignore "$VENV/bin/python" -m pip install --quiet -e "$_venv_target"
    printf '%s\nextras %s\n' "$_venv_base" "$_venv_extras" >"$_venv_stamp"
    _venv_say "ready in $((SECONDS - _venv_started)) s; later starts skip this until" \
        "pyproject.toml changes"
fi
export PATH="$VENV/bin:$PATH"
