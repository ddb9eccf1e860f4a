#!/usr/bin/env bash
# CUDA checks that need no GPU:
#   1. nvcc compile-checks the torch-free kernels (csrc/cuda/check/compile_check.cu instantiates
#      every kernel for every dtype) for sm_80 and sm_90 with the extension's flags; nvcc, host
#      compiler and ptxas warnings are errors, and a hot kernel (partial / backward) that spills
#      registers fails the check. Then builds and runs the host-side test (csrc/cuda/check/host_test.cu).
#   2. Link check (PG_KERNELS_CUDA_LINK_CHECK=1, the default): builds both extensions
#      (pg_kernels._C and _C_cuda) with .ci/build_ext.sh, the very command the GPU machine's
#      script (benchmarks/gpu_check.sh) runs, sm_90 only, against a CUDA build of torch in a
#      cached venv, in a copy of the repo (the CPU venv's in-tree _C.so and ./build stay
#      untouched); checks that setup.py printed "CUDA extension ON", that both .so exist, that
#      _C_cuda leaves none of our own symbols undefined, and that the package loads both and the
#      CUDA one rejects CPU tensors with our message. The target is the GPU machine's stack:
#        torch==2.11.0 (CUDA 13.0), Python 3.12 where found    venv /tmp/pgk-cuda-venv-2.11
#      a build that fails there loses the GPU slot. Python 3.12 is python3.12 on PATH, else
#      pyenv's ($PYENV_ROOT/versions/3.12*); without one that venv uses $PYTHON (other headers).
#      Newer torches (PG_KERNELS_CUDA_TORCH=torch==2.14.1) are checked on demand, not in every CI
#      run: each target costs a ~5 GB venv (~110 s to create) and a build of both extensions
#      (~320 s on 2 cores), and the CPU build already compiles the shared sources against the
#      dev torch.
# This catches compile and link errors, not run-time behaviour on a GPU.
#
# Environment:
#   CUDA_HOME                      toolkit root (default: asked from nvcc, which may be a wrapper)
#   PG_KERNELS_CUDA_LINK_CHECK     1 (default) | 0
#   PG_KERNELS_CUDA_TORCH          one torch requirement instead of the GPU machine's (e.g.
#                                  torch==2.14.1), built with $PYTHON in PG_KERNELS_CUDA_VENV
#                                  (default /tmp/pgk-cuda-venv-custom)
#   PYTHON                         interpreter for the checks' scripts (default python3)
# A venv is reused when it already holds the wanted torch with CUDA, else (re)created (~5 GB).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LINK_CHECK="${PG_KERNELS_CUDA_LINK_CHECK:-1}"
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
# The architectures compile side by side (nvcc and ptxas are single-threaded; CI has 2 cores),
# each into its own log; then each log is checked in turn.
t0=$(now)
for arch in "${ARCHS[@]}"; do
  { if "$NVCC" "${NVCC_FLAGS[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" \
         -c "$REPO/csrc/cuda/check/compile_check.cu" -o "$WORK/compile_check_sm${arch}.o" \
         > "$WORK/ptxas_sm${arch}.log" 2>&1; then echo 0; else echo 1; fi > "$WORK/rc_sm${arch}"; } &
done
wait
for arch in "${ARCHS[@]}"; do
  [[ "$(cat "$WORK/rc_sm${arch}")" == 0 ]] || { cat "$WORK/ptxas_sm${arch}.log"; die "nvcc sm_${arch}"; }
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
  log "nvcc -c compile_check.cu sm_${arch}: OK"
done
log "nvcc -c compile_check.cu, ${#ARCHS[@]} architectures side by side: $(elapsed "$t0")"
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

# ---- 2. link check against CUDA builds of torch ----------------------------------------------
python312() {  # an interpreter of Python 3.12 (the GPU machine's), or nothing
  local p
  for p in "$(command -v python3.12 || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if [[ -n "$p" && -x "$p" ]] &&
       "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$p"
      return
    fi
  done
}

venv_ok() {  # VENV TORCH_REQ: the venv holds that torch, a CUDA build, and setuptools
  [[ -x "$1/bin/python" ]] && "$1/bin/python" - "$2" <<'EOF' 2>/dev/null
import sys, torch, setuptools  # noqa: F401
want = sys.argv[1].split("==")[-1]
ok = torch.version.cuda is not None and torch.__version__.split("+")[0] == want
sys.exit(0 if ok else 1)
EOF
}

# A copy of the sources (tracked and untracked-but-not-ignored files): no .venv, build/ or .so.
copy_sources() {
  mkdir -p "$1"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
       xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' |
       tar --null -T - -cf -) | tar -xf - -C "$1"
  else
    tar -C "$REPO" --exclude='./.venv*' --exclude='./build' --exclude='*.so' --exclude='*.egg-info' \
      -cf - . | tar -xf - -C "$1"
  fi
}

link_check() {  # TORCH_REQ PYTHON VENV
  local req="$1" py="$2" venv="$3" tag t0 src blog so undefined ours
  tag="$(echo "$req" | tr -c 'A-Za-z0-9.\n' '_')"
  log "== link check: $req, Python $("$py" -c 'import platform; print(platform.python_version())'), $venv"
  t0=$(now)
  if venv_ok "$venv" "$req"; then
    log "reusing $venv ($("$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
  else
    [[ "$(df -Pk "$(dirname "$venv")" | awk 'NR == 2 { print $4 }')" -gt $((8 << 20)) ]] ||
      die "less than 8 GiB free under $(dirname "$venv") for the $req venv (~5 GB)"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$req" setuptools ninja \
      numpy > "$WORK/venv_$tag.log" 2>&1 || { tail -n 30 "$WORK/venv_$tag.log"; die "pip install $req"; }
    venv_ok "$venv" "$req" || die "$venv does not hold a CUDA build of $req"
    log "created $venv with $("$venv/bin/python" -c 'import torch; print(torch.__version__)') in $(elapsed "$t0")"
  fi
  log "venv disk use: $(du -sh "$venv" | cut -f1)"

  src="$WORK/src_$tag"
  copy_sources "$src"
  blog="$WORK/build_$tag.log"
  t0=$(now)
  # As benchmarks/gpu_check.sh builds: no AVX-512 CPU module.
  PG_KERNELS_BUILD_AVX512=0 PG_KERNELS_BUILD_CUDA=1 bash "$REPO/.ci/build_ext.sh" "$venv/bin/python" "$src" > "$blog" 2>&1 || {
    grep -nE "error|Error" "$blog" | head -n 40
    tail -n 30 "$blog"
    die "extension build against $req"
  }
  grep -q "pg_kernels setup: CUDA extension ON" "$blog" || {
    grep "pg_kernels setup" "$blog" || true
    die "setup.py did not turn the CUDA extension on ($req)"
  }
  log "$(grep -m1 'pg_kernels setup: CUDA extension' "$blog")"
  so=$(ls "$src"/pg_kernels/_C_cuda*.so 2>/dev/null | head -n1)
  [[ -n "$so" ]] || { tail -n 40 "$blog"; die "pg_kernels/_C_cuda*.so was not produced ($req)"; }
  log "built $(cd "$src/pg_kernels" && ls _C*.so | tr '\n' ' ')(CUDA $(du -h "$so" | cut -f1)) in $(elapsed "$t0")"
  # Warnings located in our CUDA sources or the shared header fail the check (torch's own headers
  # warn about their pragmas: not ours to fix; the CPU sources are checked by the CPU build).
  # (gcc: "file:line:col: warning", nvcc's front end: "file(line): warning").
  ours="$(grep -E "^$src/csrc/(cuda|include)/[^:(]+(:[0-9]+(:[0-9]+)?|\([0-9]+\)): warning" \
            "$blog" || true)"
  [[ -z "$ours" ]] || { echo "$ours" | head -n 20; die "compiler warnings in csrc/cuda or csrc/include ($req)"; }

  # Our own symbols must all be defined in the module (a signature mismatch between module.cpp and
  # token_stats.cu would otherwise surface only at import time on a GPU machine).
  undefined=$(nm -D --undefined-only "$so" | c++filt | grep -E "pg_kernels" || true)
  [[ -z "$undefined" ]] || { echo "$undefined"; die "undefined pg_kernels symbols in $so"; }

  # Import both modules the way the package does (no GPU needed) and check that the CUDA one
  # rejects CPU tensors.
  (cd "$src" && "$venv/bin/python" - <<'EOF') || die "import / call check ($req)"
import torch
from pg_kernels import _backend
assert _backend.cpu_extension() is not None, _backend.unavailable_reason("cpu", torch.device("cpu"))
mod = _backend.cuda_extension()
assert mod is not None, _backend.unavailable_reason("cuda", torch.device("cuda"))
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
  log "build dir disk use: $(du -sh "$src" | cut -f1)"
  rm -rf "$src"
}

if [[ -n "${PG_KERNELS_CUDA_TORCH:-}" ]]; then
  link_check "$PG_KERNELS_CUDA_TORCH" "$PYTHON" "${PG_KERNELS_CUDA_VENV:-/tmp/pgk-cuda-venv-custom}"
else
  py312="$(python312)"
  if [[ -z "$py312" ]]; then
    log "WARNING: no Python 3.12 found; the torch 2.11.0 build uses $PYTHON's headers"
    py312="$PYTHON"
  fi
  link_check "torch==2.11.0" "$py312" /tmp/pgk-cuda-venv-2.11
fi
log "all CUDA checks passed in $(elapsed "$t_start")"
