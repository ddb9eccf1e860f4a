# Source this: creates/updates .venv with the pinned dependencies and builds pg_kernels in place.
# Used by both README commands (tests/run.sh, benchmarks/run.sh) and by .ci/run.
#
# Incremental: dependencies are installed only when requirements-dev.txt changed, the compiled
# extensions are rebuilt only when setup.py, csrc/ or torch changed, and then by ninja, which
# recompiles only the changed files (in parallel, one line per file). An unchanged tree costs
# a few seconds. The repository is put on the venv's path (a .pth file), not pip-installed:
# pip would rebuild the extensions from scratch in a temporary folder every time.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "pg_kernels: creating .venv"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate

stamp() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

reqs="$(stamp requirements-dev.txt)"
if [ "$(cat .venv/.pgk-requirements 2>/dev/null)" != "$reqs" ]; then
    echo "pg_kernels: installing the pinned dependencies (first run: about a minute)"
    # (This machine's pip config names local indexes that may be absent: pip warns about each.)
    python -m pip install -q --disable-pip-version-check -r requirements-dev.txt \
        2> >(grep -v "^WARNING: Location" >&2)
    echo "$reqs" > .venv/.pgk-requirements
fi
# The RL trainers tests/test_integrations.py compares with: without their dependencies, into a
# folder off sys.path (tests/trainer_sources.py says why). ~6 s, 25 MB. A failure (no network,
# no wheel for this Python) only makes those tests skip with the reason.
trainers="$(stamp requirements-trainers.txt)"
if [ "$(cat .venv/.pgk-trainers 2>/dev/null)" != "$trainers" ]; then
    echo "pg_kernels: installing the pinned RL trainers (no dependencies) into .venv/trainers"
    rm -rf .venv/trainers
    if python -m pip install -q --disable-pip-version-check --no-deps --target .venv/trainers \
        -r requirements-trainers.txt 2> >(grep -v "^WARNING: Location" >&2); then
        echo "$trainers" > .venv/.pgk-trainers
    else
        echo "pg_kernels: could not install the RL trainers; tests/test_integrations.py will skip" \
            "(fail under .ci/run, PGK_REQUIRE_TRAINERS=1)" >&2
    fi
fi
# One interpreter start (importing torch takes seconds): fails early if the install did not
# work, and gives the venv's site-packages and the torch version.
read -r site torch_version < <(python -c '
import sysconfig, torch, triton
print(sysconfig.get_paths()["purelib"], torch.__version__)')
echo "$ROOT" > "$site/pg_kernels_dev.pth"
sources="$( (echo "$torch_version"; cat setup.py; find csrc -type f | sort | xargs cat) | stamp)"
if [ "$(cat .venv/.pgk-build 2>/dev/null)" != "$sources" ] || ! python -c "import pg_kernels._C" 2>/dev/null; then
    echo "pg_kernels: building the C++ extension (first build: ~3.6 CPU-minutes; later builds recompile only changed files)"
    log="$(mktemp)"
    # One line per compiled file (ninja's [i/n] progress), the full log only on failure.
    if ! bash .ci/build_ext.sh python 2>&1 | tee "$log" |
        sed -un 's/^\[\([0-9]*\/[0-9]*\)\].* -c \(\S*\) .*/  [\1] \2/p'; then
        cat "$log"
        echo "pg_kernels: the build failed (full log above)" >&2
        exit 1
    fi
    rm -f "$log"
    echo "$sources" > .venv/.pgk-build
fi
python -c "import pg_kernels._C" # fail early if the C++ extension did not build
