# Source this: creates/updates .venv with the pinned dependencies and builds pg_kernels in place.
# Used by both README commands (tests/run.sh, benchmarks/run.sh) and by .ci/run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, triton" # fail early if the install did not work
# --no-build-isolation: compile against the torch installed above (see BUILD notes in CONTRIBUTING.md).
python -m pip install -q -e . --no-build-isolation 2>&1 | grep -v "^WARNING: Location" || true
python -c "import pg_kernels._C" # fail early if the C++ extension did not build
