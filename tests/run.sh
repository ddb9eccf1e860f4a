#!/usr/bin/env bash
# Set up .venv (pinned deps + build), then run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
python -c "import pg_kernels; print(pg_kernels.env_report())"
python -m pytest tests -q -ra "$@"
