#!/usr/bin/env bash
# Set up .venv (pinned deps + build), then benchmark token_stats on this machine's device:
# the GPU when torch sees one, else the CPU. Prints the comparison table and writes JSON,
# markdown and a PNG plot to benchmarks/results/. Extra args go to the benchmark script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
python -c "import pg_kernels; print(pg_kernels.env_report())"
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python benchmarks/bench_token_stats.py --device "$device" "$@"
