#!/usr/bin/env bash
# Set up .venv (pinned deps + build), then run the test suite. Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
python -c "import pg_kernels; print(pg_kernels.env_report())"
# -rfE: a line per failure or error; skips (the CUDA cases without a GPU) are counted in the
# summary line, not listed.
# pytest-xdist workers, one per core up to 4 (PGK_TEST_JOBS; 0: one process, e.g. for
# --pdb): most of the suite's time is the Triton interpreter, one core per process (2 cores:
# 1107 -> 691 s). worksteal: the slowest tests (~50 s each) do not queue behind one worker.
cores="$(nproc)"
workers="${PGK_TEST_JOBS:-$((cores < 2 ? 0 : cores < 4 ? cores : 4))}"
python -m pytest tests -q -rfE -n "$workers" --dist worksteal "$@"
