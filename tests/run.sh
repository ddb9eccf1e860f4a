#!/usr/bin/env bash
# Set up .venv (pinned deps + build), then run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
python -c "import pg_kernels; print(pg_kernels.env_report())"
# -rfE: a line per failure or error; skips (the CUDA cases without a GPU) are counted in the
# summary line, not listed.
python -m pytest tests -q -rfE "$@"
