#!/usr/bin/env bash
# CUDA checks that need no GPU:
#   1. nvcc compile-checks the torch-free kernels (csrc/cuda/check/compile_check.cu instantiates
#      every kernel for every dtype) for sm_80 and sm_90 with the extension's flags; nvcc, host
#      compiler and ptxas warnings are errors, and a hot kernel (partial / backward) that spills
#      registers fails the check. Then builds and runs the host-side test (csrc/cuda/check/host_test.cu).
#   2. Link check (PG_KERNELS_CUDA_LINK_CHECK=1, the default): builds the real extension
#      pg_kernels._C_cuda against a CUDA build of torch (torch==2.14.1) in a second venv, in a copy
#      of the repo (the CPU venv's in-tree _C.so and ./build stay untouched), checks that setup.py
#      printed "CUDA extension ON", that pg_kernels/_C_cuda*.so exists, that it leaves none of our
#      own symbols undefined, and that it imports and rejects CPU tensors with our message.
# This catches compile and link errors, not ABI mismatches with a GPU machine's torch.
#
# Environment:
#   CUDA_HOME                      toolkit root (default: asked from nvcc, which may be a wrapper)
#   PG_KERNELS_CUDA_LINK_CHECK     1 (default) | 0
#   PG_KERNELS_CUDA_VENV           venv with CUDA torch (default /tmp/pgk-cuda-venv; reused when it
#                                  already holds torch 2.14.1 with CUDA, else (re)created)
#   PG_KERNELS_CUDA_TORCH          torch requirement for that venv (default torch==2.14.1)
#   PYTHON                         interpreter that creates the venv (default python3)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LINK_CHECK="${PG_KERNELS_CUDA_LINK_CHECK:-1}"
VENV="${PG_KERNELS_CUDA_VENV:-/tmp/pgk-cuda-venv}"
TORCH_REQ="${PG_KERNELS_CUDA_TORCH:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"
ARCHS=(80 90)

t_start=$(date +%s.%N)
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
log() { echo "[check_cuda] $*"; }
die() { echo "[check_cuda] FAIL: $*" >&2; exit 1; }

# ---- toolkit ---------------------------------------------------------------------------------
# The nvcc on PATH may be a wrapper script; torch would then guess CUDA_HOME as its parent folder
# and fail to link (-lcudart). Ask nvcc for its real root (TOP) instead.
if [[ -z "${CUDA_HOME:-}" || ! -x "${CUDA_HOME}/bin/nvcc" ]]; then
  command -v nvcc >/dev/null || die "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
  top="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  [[ -n "$top" ]] || die "could not find the CUDA toolkit root from 'nvcc --dryrun'"
  CUDA_HOME="$(cd "$top" && pwd -P)"
fi
export CUDA_HOME
NVCC="$CUDA_HOME/bin/nvcc"
[[ -x "$NVCC" ]] || die "$NVCC is not executable"
log "CUDA_HOME=$CUDA_HOME ($("$NVCC" --version | sed -n 's/^Cuda compilation tools, //p'))"

WORK="$(mktemp -d /tmp/pgk-check-cuda.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# ---- 1. torch-free compile check -------------------------------------------------------------
# Same device flags as setup.py's CUDAExtension, plus warnings as errors.
NVCC_FLAGS=(-std=c++17 -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr
            -I"$REPO/csrc/include" -Werror all-warnings
            -Xcompiler=-Wall,-Wextra,-Werror -Xptxas=-v,-Werror)
for arch in "${ARCHS[@]}"; do
  t0=$(now)
  "$NVCC" "${NVCC_FLAGS[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" \
    -c "$REPO/csrc/cuda/check/compile_check.cu" -o "$WORK/compile_check_sm${arch}.o" \
    > "$WORK/ptxas_sm${arch}.log" 2>&1 || { cat "$WORK/ptxas_sm${arch}.log"; die "nvcc sm_${arch}"; }
  # Registers, spills and shared memory of every kernel; spills in the hot kernels fail.
  "$PYTHON" - "$WORK/ptxas_sm${arch}.log" "$arch" <<'EOF'
import re, sys
log, arch = open(sys.argv[1]).read(), sys.argv[2]
bad = []
for m in re.finditer(r"Compiling entry function '(\S+)' for 'sm_\d+'\n(?:.*\n)*?.*?"
                     r"(\d+) bytes spill stores, (\d+) bytes spill loads\n.*?Used (\d+) registers", log):
    name, st, ld, regs = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
    short = re.sub(r"_ZN10pg_kernels3gpu\d+", "", name)
    short = re.sub(r"INS0_\d+", "<", re.sub(r"EEEvNS0.*", ">", short)).replace("ELb", ",")
    print(f"  sm_{arch} {short:42s} {regs:3d} regs  spill {st}/{ld} B")
    if (st or ld) and ("partial" in name or "backward" in name):
        bad.append(short)
if bad:
    sys.exit(f"register spills in hot kernels: {bad}")
EOF
  log "nvcc -c compile_check.cu sm_${arch}: OK in $(elapsed "$t0")"
done
t0=$(now)
"$NVCC" -std=c++17 -O2 --expt-relaxed-constexpr -I"$REPO/csrc/include" -Werror all-warnings \
  -Xcompiler=-Wall,-Wextra,-Werror -arch=sm_90 "$REPO/csrc/cuda/check/host_test.cu" \
  -o "$WORK/host_test" || die "nvcc host_test.cu"
"$WORK/host_test" || die "host_test"
log "host_test: OK in $(elapsed "$t0")"

if [[ "$LINK_CHECK" != "1" ]]; then
  log "link check skipped (PG_KERNELS_CUDA_LINK_CHECK=$LINK_CHECK); total $(elapsed "$t_start")"
  exit 0
fi

# ---- 2. link check against a CUDA build of torch ---------------------------------------------
t0=$(now)
venv_ok() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "$TORCH_REQ" <<'EOF' 2>/dev/null
import sys, torch, setuptools  # noqa: F401
want = sys.argv[1].split("==")[-1]
ok = torch.version.cuda is not None and torch.__version__.split("+")[0] == want
sys.exit(0 if ok else 1)
EOF
}
if venv_ok; then
  log "reusing $VENV ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQ" setuptools ninja \
    numpy > "$WORK/venv.log" 2>&1 || { tail -n 30 "$WORK/venv.log"; die "pip install $TORCH_REQ"; }
  venv_ok || die "$VENV does not hold a CUDA build of $TORCH_REQ"
  log "created $VENV with $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') in $(elapsed "$t0")"
fi
log "venv disk use: $(du -sh "$VENV" | cut -f1)"

# A copy of the sources (tracked and untracked-but-not-ignored files): no .venv, build/ or .so.
t0=$(now)
SRC="$WORK/src"
mkdir -p "$SRC"
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
     xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' |
     tar --null -T - -cf -) | tar -xf - -C "$SRC"
else
  tar -C "$REPO" --exclude='./.venv*' --exclude='./build' --exclude='*.so' --exclude='*.egg-info' \
    -cf - . | tar -xf - -C "$SRC"
fi
log "copied sources to $SRC in $(elapsed "$t0")"

t0=$(now)
(cd "$SRC" && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" PG_KERNELS_BUILD_CUDA=1 \
   "$VENV/bin/python" -m pip install -v --no-build-isolation --no-deps --disable-pip-version-check \
   -e . > "$WORK/build.log" 2>&1) || {
  grep -nE "error|Error" "$WORK/build.log" | head -n 40
  tail -n 30 "$WORK/build.log"
  die "extension build"
}
grep -q "pg_kernels setup: CUDA extension ON" "$WORK/build.log" || {
  grep "pg_kernels setup" "$WORK/build.log" || true
  die "setup.py did not turn the CUDA extension on"
}
log "$(grep -m1 'pg_kernels setup: CUDA extension' "$WORK/build.log")"
so=$(ls "$SRC"/pg_kernels/_C_cuda*.so 2>/dev/null | head -n1)
[[ -n "$so" ]] || { tail -n 40 "$WORK/build.log"; die "pg_kernels/_C_cuda*.so was not produced"; }
log "built $(basename "$so") ($(du -h "$so" | cut -f1)) in $(elapsed "$t0")"
# Warnings located in our CUDA sources or the shared header fail the check (torch's own headers
# warn about their pragmas: not ours to fix; the CPU sources are checked by the CPU build).
# (gcc: "file:line:col: warning", nvcc's front end: "file(line): warning").
ours="$(grep -E "^$SRC/csrc/(cuda|include)/[^:(]+(:[0-9]+(:[0-9]+)?|\([0-9]+\)): warning" \
          "$WORK/build.log" || true)"
[[ -z "$ours" ]] || { echo "$ours" | head -n 20; die "compiler warnings in csrc/cuda or csrc/include"; }

# Our own symbols must all be defined in the module (a signature mismatch between module.cpp and
# token_stats.cu would otherwise surface only at import time on a GPU machine).
undefined=$(nm -D --undefined-only "$so" | c++filt | grep -E "pg_kernels" || true)
[[ -z "$undefined" ]] || { echo "$undefined"; die "undefined pg_kernels symbols in $so"; }

# Import the module on its own (no GPU needed) and check that it rejects CPU tensors.
"$VENV/bin/python" - "$so" <<'EOF' || die "import / call check"
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("_C_cuda", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
x = torch.randn(2, 8)
y = torch.zeros(2, dtype=torch.long)
try:
    mod.token_stats_forward(x, y, None, 1.0, -100, 2, 0, 8)
except RuntimeError as e:
    assert "expected CUDA tensors" in str(e), e
else:
    raise SystemExit("token_stats_forward accepted CPU tensors")
assert callable(mod.token_stats_backward)
print("[check_cuda] import OK:", sorted(n for n in dir(mod) if not n.startswith("__")))
EOF
log "build dir disk use: $(du -sh "$SRC" | cut -f1)"
# Leave the reusable venv as it was (the editable install points into $WORK, removed on exit).
"$VENV/bin/python" -m pip uninstall -q -y pg_kernels >/dev/null 2>&1 || true
log "all CUDA checks passed in $(elapsed "$t_start")"
