#!/usr/bin/env bash
# Set up .venv (pinned deps + build), then benchmark token_stats on this machine's device (the
# GPU when torch sees one, else the CPU) at one default size: [1024, 32000] on CPU,
# [16384, 151936] on GPU. Prints the comparison table and writes JSON, markdown and a PNG plot
# to benchmarks/out/token_stats_<device>_default.* (git-ignored). With arguments, they go to the
# benchmark script instead (e.g. no --shapes for the full sweep; see benchmarks/README.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../.ci/setup.sh"
python -c "import pg_kernels; print(pg_kernels.env_report())"
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$#" -eq 0 ]; then
    shape=$([ "$device" = cuda ] && echo 16384x151936 || echo 1024x32000)
    set -- --shapes "$shape" --tag default
fi
python benchmarks/bench_token_stats.py --device "$device" "$@"
