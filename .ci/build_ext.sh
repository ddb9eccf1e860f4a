#!/usr/bin/env bash
# Build pg_kernels' compiled extensions in place (pg_kernels/_C*.so, pg_kernels/_C_cuda*.so)
# against the torch of the given interpreter: no venv, no network, no install.
#
#   bash .ci/build_ext.sh PYTHON [SRC]     (SRC: the source tree, default this repo)
#
# The one build command of both the GPU machine's script (benchmarks/gpu_check.sh) and the
# build proof (.ci/check_cuda.sh), so that what CI proves is what the GPU machine runs.
# With a CUDA build of torch and a toolkit, both extensions are built (PG_KERNELS_BUILD_CUDA=1
# makes a missing toolkit an error, not a silent CPU-only build); otherwise the CPU one only.
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0: sm_90 only, the H100 / H200), MAX_JOBS
# (default: the cores), PG_KERNELS_BUILD_CUDA (default: 1 when torch is a CUDA build).
set -euo pipefail
PY="${1:?usage: build_ext.sh PYTHON [SRC]}"
SRC="${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cuda=$("$PY" -c 'import torch; print(int(torch.version.cuda is not None))')
# The nvcc on PATH may be a wrapper script; torch would then guess CUDA_HOME as its parent folder
# and fail to link (-lcudart). Ask nvcc for its real root (TOP) instead.
if [[ "$cuda" == 1 && ( -z "${CUDA_HOME:-}" || ! -x "${CUDA_HOME:-}/bin/nvcc" ) ]] &&
   command -v nvcc >/dev/null; then
  top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  if [[ -n "$top" ]]; then CUDA_HOME="$(cd "$top" && pwd -P)"; export CUDA_HOME; fi
fi
cd "$SRC"
echo "[build_ext] $("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}")'), TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}, MAX_JOBS=${MAX_JOBS:-$(nproc)}"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  PG_KERNELS_BUILD_CUDA="${PG_KERNELS_BUILD_CUDA:-$cuda}" \
  "$PY" setup.py build_ext --inplace
ls pg_kernels/_C.*so >/dev/null 2>&1 || { echo "[build_ext] FAIL: no pg_kernels/_C*.so" >&2; exit 1; }
if [[ "${PG_KERNELS_BUILD_CUDA:-$cuda}" == 1 ]] && ! ls pg_kernels/_C_cuda.*so >/dev/null 2>&1; then
  echo "[build_ext] FAIL: torch is a CUDA build but no pg_kernels/_C_cuda*.so was built" >&2
  exit 1
fi
echo "[build_ext] built: $(cd pg_kernels && ls _C*.so | tr '\n' ' ')"
