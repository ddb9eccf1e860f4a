#!/usr/bin/env bash
# Download the pinned peer wheels of benchmarks/peers.txt into benchmarks/peers/ (git-ignored),
# on a machine with network, before a GPU run: the GPU machine has none, so the device call
# carries the folder (carry: ["benchmarks/peers"]) and benchmarks/gpu_check.sh installs from it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-$([[ -x ../.venv/bin/python ]] && echo ../.venv/bin/python || echo python3)}"
rm -rf peers
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps -d peers -r peers.txt \
  2> >(grep -v "^WARNING: Location" >&2)
ls -l peers
