#!/usr/bin/env bash
# One command for a lent GPU machine (an H100 / H200 with torch, Triton, nvcc, compute-sanitizer
# preinstalled, no network): build, test, sanitize, graph-check and benchmark pg_kernels in
# ~9 minutes, and leave at most 6 files in OUT.
#
#   bash benchmarks/gpu_check.sh OUT              on the GPU machine, with its python3
#   bash benchmarks/gpu_check.sh --dry-run OUT    here, on CPU: every step in a CPU-sized mode
#
# Steps (each under its own `timeout`; a later step runs when an earlier one failed), in the
# order of what issue 9 needs most, since a budget of ~9 minutes does not fit them all:
#   preflight       nvidia-smi, versions, torch.cuda.is_available() (none: summary, exit), tools;
#                   private Triton and inductor caches under /tmp
#   build           .ci/build_ext.sh with this machine's python3 (both extensions, sm_90 only),
#                   in the background (CPU only)
#   tests_triton    pytest -m gpu -k triton (xdist workers), beside the build, then the skip
#                   check: any unexpected skip fails                                 } side by
#   tests_cuda      after the build: pytest -m gpu -k "not triton", the skip check    } side
#   memcheck        compute-sanitizer memcheck, benchmarks/gpu_sanitize.py bf16/fp32 }
#   racecheck       compute-sanitizer racecheck, token_stats bf16/fp32                }
#   throw_probe     after the build: a failed check in the CUDA extension must raise (it
#                   crashed once); a crash (a signal) is run again under cuda-gdb for its
#                   backtrace
#   graph           benchmarks/gpu_graph_check.py: token_stats fwd+bwd CUDA-graph replay == eager;
#                   then benchmarks/host_time.py: every op's forward at N = 1 against amax
#   then the benchmarks, alone on the GPU, in the order of what is still owed (the first H200
#   run, benchmarks/results/cuda-h200, timed the five ops at their headline shapes): token_stats
#   at 16384x151936 bf16 (CUDA, Triton, each without its max's fp64 re-sum (top32, lane32),
#   eager, Liger-Kernel); tune (the Triton
#   token_stats kernels' blocking variants at that shape, bench_token_stats.TRITON_BLOCKINGS:
#   why the forward reads at 1.72x one read where the CUDA kernel reads at 1.04x); step_stats (the
#   bundle against the three single ops); token_stats at V = 50257 (rows not 16-byte aligned:
#   element-wise loads) beside 50304; token_stats_from_hidden at 16384x151936x4096 against
#   the unfused path, Liger's fused linear cross entropy and Cut-Cross-Entropy (their wheels:
#   benchmarks/fetch_peers.sh, carried in benchmarks/peers/); excess (the 16-bit pair lanes'
#   excess k, kl_divergence's forward); torch.compile of the reference (PGK_BENCH_COMPILE), a
#   run of its own beside the kernels; the other ops at N in {16384,
#   512, 1}; token_stats' CUDA kernel beside Triton at 128256 and N in {512, 1}; every op at
#   T=0.7; kl_divergence_from_hidden's vocabulary blocks against row chunks and the unfused
#   path at 16384x151936x4096; fidelity (every op against float64 on the GPU, 256 x 32000).
# A benchmark step whose results are already in /tmp/pgk-gpucheck-bench (an earlier call on a
# still-warm machine) is not run again; its files are in bench.tar.gz with the new ones.
# OUT (created; at most 6 files, none deeper than OUT/):
#   run.log         every step's output as it runs, each line prefixed with [step]
#   summary.tsv     step, status, seconds, note: a line per finished step, written as they finish
#   summary.md      the final table (also printed last), the test skip counts, the bench targets
#   test_skips.txt  skip reasons and counts of the GPU test runs, the unexpected ones listed
#   logs.tar.gz     each step's full log, junit XML, nvidia-smi, versions (re-made after each step)
#   bench.tar.gz    the benchmark JSON, markdown and PNG files (re-made after each bench run)
# A run killed at its time limit still leaves run.log, summary.tsv and the archives so far.
# Status: PASS, FAIL, TIMEOUT, N/A (cannot run on this machine, e.g. compute-sanitizer under
# gVisor: "Device not supported"), SKIP (not run: no time left, or not in PGK_STEPS). Exit 1
# when a step FAILed or TIMEd OUT.
#
# Environment:
#   PYTHON            interpreter (default: python3 on a GPU; .venv/bin/python for --dry-run)
#   PGK_BUDGET_S      seconds for the whole run (default 540; dry run 420, ~250 s used on an
#                     idle 2-core machine)
#   PGK_STEPS         the steps to run (default all: "preflight build tests sanitize graph
#                     fidelity step_stats bench tune hidden excess"; tune = the Triton blocking
#                     sweep; hidden = the token_stats_from_hidden benchmark, after the others;
#                     excess = kl_divergence's forward with the 16-bit pair lanes' excess k
#                     beside the default, the A/B for open fidelity class (1)); kl_hidden =
#                     kl_divergence_from_hidden's orders at 16384x151936x4096, the last
#                     benchmark (it runs on what the others leave, or alone in a second call)
#   PGK_GIT_SHA       the commit this copy is (the device's copy has no .git): recorded in the
#                     results; PGK_GIT_DIRTY=1 if the tree differed from it
#   PGK_TEST_JOBS     pytest-xdist workers (default 8)
#   PGK_TEST_S        each GPU test step's time limit (default 200; the Triton step compiles
#                     every kernel variant: it was ~60 % done after 150 s beside the CUDA tests
#                     and the sanitizers on 16 cores)
#   PGK_BENCH_OPS     ops to benchmark (default all five)
#   PGK_BENCH_COMPILE ops whose torch.compile of the reference is timed, each in a run of its
#                     own beside the kernels at 16384x151936 (default token_stats, the target's
#                     comparison; each compile costs 30-60 s per shape and mode; empty for none)
# shellcheck disable=SC2329  # the step functions are invoked through run_step
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
[[ $# -eq 1 ]] || { echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT" >&2; exit 2; }
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$REPO" || exit 2

if [[ -z "${PYTHON:-}" ]]; then
  if [[ $DRY == 1 && -x .venv/bin/python ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
BUDGET="${PGK_BUDGET_S:-$([[ $DRY == 1 ]] && echo 420 || echo 540)}"
STEPS=" ${PGK_STEPS:-preflight build tests sanitize graph fidelity step_stats bench tune hidden excess kl_hidden} "
JOBS="${PGK_TEST_JOBS:-8}"
TEST_S="${PGK_TEST_S:-200}"
BENCH_OPS="${PGK_BENCH_OPS:-token_stats kl_divergence mismatch_stats pruned_logprob topk_kl}"
BENCH_COMPILE=" ${PGK_BENCH_COMPILE-token_stats} "
RESERVE=12  # seconds kept for the summary and the archives
MIN_START=$([[ $DRY == 1 ]] && echo 15 || echo 30)  # fewer seconds left than this: not started
T0=$SECONDS

WORK="$(mktemp -d /tmp/pgk-gpucheck.XXXXXX)"
# Benchmark results outlive the run (a second call on a still-warm machine keeps the first's
# and skips the steps it finished); a dry run keeps its own.
BENCH_DIR="$([[ $DRY == 1 ]] && echo "$WORK/bench" || echo /tmp/pgk-gpucheck-bench)"
mkdir -p "$WORK/logs" "$WORK/status" "$BENCH_DIR/.done"
[[ "$BENCH_DIR" == "$WORK/bench" ]] || ln -s "$BENCH_DIR" "$WORK/bench"
# Triton's cache outlives the run (a second call on a still-warm machine reuses the kernels
# compiled by the first); inductor's is per run (it does not key on our ops' fakes).
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/pgk-gpucheck-triton-cache}"
export TORCHINDUCTOR_CACHE_DIR="$WORK/inductor-cache"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
: > "$OUT/run.log"
printf 'step\tstatus\tseconds\tnote\n' > "$OUT/summary.tsv"
ORDER=()  # steps in the order they were started, for the table
# Peers the benchmarks compare with (Liger-Kernel, Cut-Cross-Entropy): pure Python + Triton
# wheels carried in benchmarks/peers/ (benchmarks/fetch_peers.sh), installed without network or
# dependencies into the run's own folder. Without them their providers skip with the reason.
if compgen -G "benchmarks/peers/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-index \
    --target "$WORK/peers" benchmarks/peers/*.whl >> "$OUT/run.log" 2>&1 &&
    export PYTHONPATH="$WORK/peers${PYTHONPATH:+:$PYTHONPATH}"
fi

say() { echo "[gpu_check] $*" | tee -a "$OUT/run.log"; }
left() { echo $((BUDGET - (SECONDS - T0) - RESERVE)); }
wants() { [[ "$STEPS" == *" $1 "* ]]; }

# OUT/<what>.tar.gz from $WORK/<what>, through a private temporary file (steps run side by side;
# a log still being written is archived as it stands).
archive() {
  local tmp="$WORK/$1.$BASHPID.tgz"
  tar -C "$WORK" --dereference --exclude=.done --warning=no-file-changed -czf "$tmp" "$1" \
    2>/dev/null
  mv -f "$tmp" "$OUT/$1.tar.gz"
}
archive_logs() { archive logs; }
archive_bench() { archive bench; }

record() {  # NAME STATUS SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" | tee "$WORK/status/$1" >> "$OUT/summary.tsv"
  say "$1: $2 in ${3}s${4:+ ($4)}"
}

skip_step() {  # NAME NOTE
  ORDER+=("$1")
  record "$1" SKIP 0 "$2"
}

# run_step NAME MAX_SECONDS CMD...: runs CMD under `timeout` (at most MAX_SECONDS, at most what
# the budget has left), output to $WORK/logs/NAME.log and, prefixed, to OUT/run.log. A step may
# set its status through $WORK/status/NAME.override ("STATUS note") before returning.
# MIN_LEFT (env, default MIN_START): fewer seconds left than this and the step is skipped (a
# benchmark writes its files at its end: cut short, it leaves nothing).
run_step() {
  local name="$1" max="$2" t rc start status note="" min="${MIN_LEFT:-$MIN_START}"
  shift 2
  t=$(left)
  (( t > max )) && t=$max
  (( min > max )) && min=$max
  # A step cut much shorter than its own limit would only time out: skip it instead.
  if (( t < max && t < min )); then record "$name" SKIP 0 "no time left (${t}s)"; return 0; fi
  start=$SECONDS
  say "$name: start (timeout ${t}s): $*"
  # timeout signals its whole process group: pytest workers and sanitized programs too.
  # PGK_STEP_DEADLINE (epoch seconds): when that happens, for a step that can wrap up first.
  PGK_STEP_DEADLINE=$(( $(date +%s) + t )) timeout -k 10 "$t" bash -c '"$@"' "$name" "$@" \
    > >(tee "$WORK/logs/$name.log" | sed -u "s/^/[$name] /" >> "$OUT/run.log") 2>&1
  rc=$?
  sleep 0.2  # let the log pipe drain
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT; note="killed after ${t}s" ;;
    *) status=FAIL; note="exit $rc" ;;
  esac
  if [[ -f "$WORK/status/$name.override" ]]; then
    read -r status note < "$WORK/status/$name.override"
  fi
  record "$name" "$status" $((SECONDS - start)) "$note"
  archive_logs
  return 0
}

start_step() { ORDER+=("$1"); run_step "$@"; }

# ---------------------------------------------------------------------------- steps

preflight() {
  echo "mode: $([[ $DRY == 1 ]] && echo dry-run || echo gpu), budget ${BUDGET}s, repo $REPO"
  echo "python: $PYTHON"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi 2>&1 | tee "$WORK/logs/nvidia-smi.txt"
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  for tool in nvcc compute-sanitizer ncu ninja; do
    printf '%-18s %s\n' "$tool" "$(command -v "$tool" || echo 'not found')"
  done
  nvcc --version 2>/dev/null | tail -n 2
  echo "cores $(nproc); $(free -g 2>/dev/null | awk '/Mem:/ { print $2 " GiB RAM" }'); /tmp: $(df -h /tmp | awk 'NR == 2 { print $4 " free" }')"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo 'no .git in this copy')"
  echo "TRITON_CACHE_DIR=$TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR"
  "$PYTHON" - <<'EOF' 2>&1 | tee "$WORK/logs/versions.txt"
import importlib, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "numpy", "pytest", "xdist", "pytest_timeout", "hypothesis",
             "matplotlib", "tqdm", "setuptools"):
    try:
        print(f"{name:15s}", getattr(importlib.import_module(name), "__version__", "present"))
    except ImportError:
        print(f"{name:15s} MISSING")
print("torch.version.cuda", torch.version.cuda)
print("torch.cuda.is_available()", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
import pg_kernels  # must import without the compiled extensions (they are built next)
print(pg_kernels.env_report())
EOF
  local rc=${PIPESTATUS[0]}
  if [[ $DRY == 0 ]]; then
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
      { echo "FAIL: torch sees no GPU"; return 1; }
  fi
  return "$rc"
}

build() {
  # Only what is needed: both extensions, for sm_90 alone (~8 compile units, one ninja run).
  # The dry run compiles nothing (minutes on a small CPU; .ci/check_cuda.sh runs this very
  # command against the GPU machine's torch 2.11): it checks the script and the CPU extension
  # that CI built.
  if [[ $DRY == 1 ]]; then
    bash -n .ci/build_ext.sh || return 1
    echo "would run: PG_KERNELS_BUILD_AVX512=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$(nproc) bash .ci/build_ext.sh $PYTHON"
    "$PYTHON" -c 'import pg_kernels._C as m; print("pg_kernels._C imports:", m.__file__)'
    return
  fi
  # Two cores left to the benchmarks that run beside it (their launches, the timing loop).
  # No AVX-512 CPU module: the GPU checks do not use it, and it would compile after _C (~35 s).
  local jobs=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
  # A second call's Triton test workers (started beside this build) may have an earlier call's
  # extensions mapped: unlink them rather than let the build rewrite them in place (a SIGBUS
  # in those workers). The objects stay in build/: an unchanged source only relinks.
  rm -f pg_kernels/_C*.so
  PG_KERNELS_BUILD_AVX512=0 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$jobs" bash .ci/build_ext.sh "$PYTHON"
}

pytest_args() {  # the plugin options this interpreter has
  "$PYTHON" -c 'import xdist' 2>/dev/null && printf '%s\n' -n "$JOBS" --dist worksteal
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && printf '%s\n' --timeout 150
}

# tests PHASE JUNIT PYTEST-SELECTION...: pytest, then the skip check on its junit XML.
tests() {
  local phase="$1" xml="$WORK/logs/$1.xml" rc skips
  shift
  mapfile -t plugins < <(pytest_args)
  # -v: each test's outcome as it finishes. 25 s before the step's limit the tests not yet
  # started skip ("deadline", tests/conftest.py), so that pytest still ends with its junit XML
  # and tracebacks (a killed pytest writes neither).
  PGK_TEST_DEADLINE=$(( PGK_STEP_DEADLINE - 25 )) \
    "$PYTHON" -m pytest -v -rs --durations=15 -p no:cacheprovider --junitxml="$xml" \
    "${plugins[@]}" "$@"
  rc=$?
  echo "pytest exit $rc"
  "$PYTHON" benchmarks/gpu_test_skips.py "$WORK/logs/$phase.skips.txt" "$xml"
  skips=$?
  { echo "== $phase: $*"; cat "$WORK/logs/$phase.skips.txt"; echo; } >> "$OUT/test_skips.txt"
  if [[ $skips == 3 ]]; then  # all that ran passed; the rest met the deadline
    echo "TIMEOUT $(grep -m1 -oE '[0-9]+ not run' "$WORK/logs/$phase.skips.txt") (deadline)" \
      > "$WORK/status/$phase.override"
    return 1
  fi
  if [[ $DRY == 1 && "$phase" == tests_triton ]]; then
    # No GPU here: every CUDA case skips with "no GPU". The check must catch that.
    if [[ $skips == 1 ]] && grep -q "no GPU" "$WORK/logs/$phase.skips.txt"; then
      echo "PASS unexpected 'no GPU' skips detected"
      echo "PASS dry run: the skip check caught the no-GPU skips" > "$WORK/status/$phase.override"
      return 0
    fi
    echo "FAIL: the skip check did not catch the no-GPU skips"
    return 1
  fi
  (( rc == 0 && skips == 0 ))
}

sanitizer() {
  local s
  s="$(command -v compute-sanitizer || true)"
  local nvcc_root=""
  command -v nvcc >/dev/null && nvcc_root="$(dirname "$(dirname "$(command -v nvcc)")")"
  for c in "${CUDA_HOME:-}/bin/compute-sanitizer" "${CUDA_HOME:-}/compute-sanitizer/compute-sanitizer" \
      "$nvcc_root/bin/compute-sanitizer" "$nvcc_root/compute-sanitizer/compute-sanitizer" \
      /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -z "$s" && -x "$c" ]] && s="$c"
  done
  echo "$s"
}

# sanitize TOOL: the driver under compute-sanitizer (dry run: the driver alone, on CPU).
sanitize() {
  local tool="$1" s rc
  if [[ $DRY == 1 ]]; then  # the driver alone, on CPU, small
    if [[ $tool == memcheck ]]; then
      "$PYTHON" benchmarks/gpu_sanitize.py --device cpu --vocabs 1000 --dtypes bf16 fp32
    else
      "$PYTHON" benchmarks/gpu_sanitize.py --device cpu --vocabs 1000 --dtypes fp32 --ops token_stats
    fi
    return
  fi
  s="$(sanitizer)"
  if [[ -z "$s" ]]; then
    echo "N/A compute-sanitizer not found" > "$WORK/status/$tool.override"
    return 1
  fi
  # Each tensor its own cudaMalloc, so that memcheck sees reads past a tensor's end. bf16 and
  # fp32 (each launch instrumented: all four dtypes did not fit the step's time); racecheck
  # the CUDA token_stats, the kernels with hand-written shared memory.
  local cases=(--dtypes bf16 fp32)
  [[ $tool == racecheck ]] && cases+=(--ops token_stats)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$s" --tool "$tool" --target-processes all --print-limit 50 \
    --error-exitcode 3 --report-api-errors no "$PYTHON" benchmarks/gpu_sanitize.py "${cases[@]}"
  rc=$?
  sleep 0.5  # the log's tee catches up
  if grep -qE "Device not supported|Unable to find injection library|error 999" "$WORK/logs/$tool.log"; then
    echo "N/A compute-sanitizer cannot attach here (gVisor?)" > "$WORK/status/$tool.override"
  elif (( rc == 3 )); then
    echo "FAIL $(grep -m1 -oE '(ERROR|RACECHECK) SUMMARY: [0-9]+ [a-z]+' "$WORK/logs/$tool.log")" \
      > "$WORK/status/$tool.override"
  fi
  return "$rc"
}

# A check that fails in the CUDA extension must raise, not kill the process: on the first H200
# run a wrong-shape `out` to the backward (test_backward_writes_into_out) crashed its worker
# (SIGSEGV) when the extension's TORCH_CHECK threw. The op layer now refuses that `out` before
# any backend runs; this probe calls the extension's launcher itself. The call alone, then, if
# it did not exit cleanly, again under cuda-gdb for the native backtrace.
throw_probe() {
  local code rc
  code='import torch, pg_kernels
from pg_kernels import _backend
from pg_kernels.ops._common import row_layout
x = torch.randn(4, 64, device="cuda")
y = torch.zeros(4, dtype=torch.long, device="cuda")
o = pg_kernels.token_stats(x, y, backend="cuda")
g = [torch.ones(4, device="cuda")] * 4
_, backward = _backend.launchers("token_stats", "cuda")
args = (*g, x, y, None, 1.0, -100, o.lse, o.entropy, o.collision, o.max_prob, o.argmax,
        *row_layout("token_stats", "logits", x))
try:
    backward(*args, torch.empty(3, 64, device="cuda"))
except (RuntimeError, ValueError) as e:
    print("raised:", str(e).splitlines()[0])
    raise SystemExit(0)
raise SystemExit("no error for a wrong-shape out")'
  "$PYTHON" -X faulthandler -c "$code"
  rc=$?
  if (( rc > 128 )) && command -v cuda-gdb >/dev/null; then  # a signal, not an exception
    echo "exit $rc; the same under cuda-gdb:"
    timeout 90 cuda-gdb -q -batch -ex 'set pagination off' -ex run -ex bt --args "$PYTHON" -c "$code"
  fi
  return "$rc"
}

graph() {
  if [[ $DRY == 1 ]]; then
    "$PYTHON" benchmarks/gpu_graph_check.py --shape 64x1000 || return
    "$PYTHON" benchmarks/host_time.py --device cpu --calls 200
  else
    "$PYTHON" benchmarks/gpu_graph_check.py --shape 4096x151936 --temperature 0.7 || return
    # Each op's forward at N = 1 against amax (the small-batch target), host time included.
    "$PYTHON" benchmarks/host_time.py --device cuda --vocab 151936 --dtype bf16 --calls 300
  fi
}

# Every op against float64 on the GPU, beside plain PyTorch (the dry run: the C++ kernels, small).
fidelity() {
  local rc=0
  if [[ $DRY == 1 ]]; then
    "$PYTHON" benchmarks/fidelity.py --backend cpu --rows 8 --vocab 1000 --out "$WORK/bench" || rc=1
  else
    "$PYTHON" benchmarks/fidelity.py --backend triton --device cuda --out "$WORK/bench" || rc=1
    "$PYTHON" benchmarks/fidelity.py --backend cuda --device cuda --ops token_stats \
      --out "$WORK/bench" || rc=1
  fi
  archive_bench
  return "$rc"
}

# bench OP TEMPERATURE TAG PROVIDERS SHAPES...
bench() {
  local op="$1" temp="$2" tag="$3" providers="$4" rc
  shift 4
  # Every row with a dominant weight entry (bench_kl_divergence's PGK_BENCH_DOMINANT).
  [[ $tag == dominant ]] && export PGK_BENCH_DOMINANT=1
  if [[ $DRY == 1 && $tag == excess16 ]]; then
    # The excess provider's code path under the interpreter (its timings mean nothing).
    TRITON_INTERPRET=1 "$PYTHON" benchmarks/bench_"$op".py --device cpu --shapes 4x3000 \
      --dtypes bf16 --modes fwd --providers eager excess16:triton --max-wait 0 \
      --temperature "$temp" --tag "$tag" --out "$WORK/bench" --no-progress
  elif [[ $DRY == 1 && $tag == tune ]]; then
    # The blocking variants' code path, one forward and one backward variant (the interpreter;
    # its timings mean nothing).
    # shellcheck disable=SC2046  # two provider names
    TRITON_INTERPRET=1 "$PYTHON" benchmarks/bench_"$op".py --device cpu --shapes 4x3000 \
      --dtypes bf16 --modes fwd fwd+bwd --providers eager $("$PYTHON" -c '
from benchmarks.bench_token_stats import blocking_providers
names = blocking_providers()
print(names[0], next(n for n in names if "@B" in n))') \
      --max-wait 0 --temperature "$temp" --tag "$tag" --out "$WORK/bench" --no-progress
  elif [[ $DRY == 1 ]]; then
    local small=16x1000
    [[ $op == *_from_hidden ]] && small=16x1000x32
    [[ $tag == odd_v ]] && small=16x1001  # rows not 16-byte aligned
    local dry_providers="pg_kernels:cpu eager"
    # Plain bf16 PyTorch fails the float64 check on a spike's rows (a KL 6e-2 off): not a peer.
    [[ $tag == dominant ]] && dry_providers="pg_kernels:cpu"
    # shellcheck disable=SC2086  # providers is a list
    "$PYTHON" benchmarks/bench_"$op".py --device cpu --shapes "$small" --dtypes bf16 --modes fwd \
      --providers $dry_providers --max-wait 0 --temperature "$temp" --tag "$tag" \
      --out "$WORK/bench" --no-progress
  else
    local modes="fwd fwd+bwd"
    [[ $tag == excess16 ]] && modes="fwd"  # the excess k is the forward's only
    # shellcheck disable=SC2086  # providers and modes are lists
    "$PYTHON" benchmarks/bench_"$op".py --device cuda --shapes "$@" --dtypes bf16 \
      --modes $modes --providers $providers --temperature "$temp" --tag "$tag" \
      --out "$WORK/bench" --no-progress
  fi
  rc=$?
  archive_bench
  return "$rc"
}

# The steps run in `bash -c` under timeout: they see these functions and variables.
export -f preflight build pytest_args tests sanitizer sanitize throw_probe graph fidelity bench \
  archive archive_bench
export DRY PYTHON WORK OUT JOBS REPO BUDGET

# ---------------------------------------------------------------------------- schedule

say "start: $([[ $DRY == 1 ]] && echo dry run || echo GPU run), budget ${BUDGET}s, work dir $WORK"
if wants preflight; then start_step preflight 45 preflight; else skip_step preflight "not in PGK_STEPS"; fi
NO_GPU=0
if [[ $DRY == 0 ]] && ! "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  say "torch sees no GPU: nothing else can run"
  NO_GPU=1
fi

build_pid=""
if (( ! NO_GPU )) && wants build; then
  ORDER+=(build)
  run_step build 300 build &
  build_pid=$!
else
  skip_step build "$( (( NO_GPU )) && echo 'no GPU' || echo 'not in PGK_STEPS')"
fi

# Correctness first, no timing beside it. The Triton tests need no extension: they start
# beside the build; after it, the CUDA tests and both sanitizers, side by side.
GPU_TESTS=(tests)
[[ $DRY == 1 ]] && GPU_TESTS=(tests/test_token_stats.py)
pids=()
if (( ! NO_GPU )) && wants tests; then
  ORDER+=(tests_triton)
  # One inductor compile thread per test worker (8 workers, each compiling, on 16 cores); the
  # benchmarks' torch.compile keeps the default.
  TORCHINDUCTOR_COMPILE_THREADS=1 \
    run_step tests_triton "$TEST_S" tests tests_triton "${GPU_TESTS[@]}" -m gpu -k triton &
  pids+=($!)
  [[ $DRY == 1 ]] && { wait "${pids[@]}"; pids=(); }  # two cores: one at a time
fi
if [[ -n "$build_pid" ]]; then
  say "waiting for the build"
  wait "$build_pid"
fi
if (( NO_GPU )); then
  :
elif wants tests; then
  ORDER+=(tests_cuda)
  if [[ $DRY == 1 ]]; then
    run_step tests_cuda 120 tests tests_cuda tests/test_token_stats.py -k "cpu-cpu and ignore" &
  else
    TORCHINDUCTOR_COMPILE_THREADS=1 \
      run_step tests_cuda "$TEST_S" tests tests_cuda tests -m gpu -k "not triton" &
    pids+=($!)
    ORDER+=(throw_probe)
    run_step throw_probe 120 throw_probe &
  fi
  pids+=($!)
  [[ $DRY == 1 ]] && { wait "${pids[@]}"; pids=(); }
else
  skip_step tests_triton "not in PGK_STEPS"
  skip_step tests_cuda "not in PGK_STEPS"
fi
if (( NO_GPU )); then
  :
elif wants sanitize; then
  for tool in memcheck racecheck; do
    ORDER+=("$tool")
    run_step "$tool" 150 sanitize "$tool" &
    pids+=($!)
    [[ $DRY == 1 ]] && { wait "${pids[@]}"; pids=(); }
  done
else
  skip_step memcheck "not in PGK_STEPS"
  skip_step racecheck "not in PGK_STEPS"
fi
(( ${#pids[@]} )) && wait "${pids[@]}"

if (( NO_GPU )); then
  :
elif wants graph; then start_step graph 90 graph; else skip_step graph "not in PGK_STEPS"; fi

# bench_step NAME MAX OP TEMP TAG PROVIDERS SHAPES...: a benchmark, skipped when an earlier call
# on this machine finished it (its files are in $BENCH_DIR already).
bench_step() {
  local name="$1"
  if [[ -f "$BENCH_DIR/.done/$name" ]]; then skip_step "$name" "done by an earlier call"; return; fi
  ORDER+=("$name")
  MIN_LEFT=$([[ $DRY == 1 ]] && echo 15 || echo 60) run_step "$1" "$2" bench "${@:3}"
  [[ "$(cut -f2 "$WORK/status/$name" 2>/dev/null)" == PASS ]] && : > "$BENCH_DIR/.done/$name"
  return 0
}

# Then the benchmarks, alone on the GPU, in the order of what issue 9 still owes (the first run,
# benchmarks/results/cuda-h200, timed the five ops' headline shapes): token_stats against
# torch.compile and Liger-Kernel; the bundle; the fused lm_head path; then the rest again.
if (( NO_GPU )); then
  :
elif [[ $DRY == 1 ]]; then
  if wants bench; then
    # eager sets the check's tolerance: it runs beside the kernel.
    for op in $BENCH_OPS; do bench_step "bench_${op}_t0.7" 60 "$op" 0.7 dry x; done
  fi
  wants tune && bench_step bench_token_stats_tune 60 token_stats 1 tune x
  wants step_stats && bench_step bench_step_stats_t0.7 60 step_stats 0.7 dry x
  wants bench && bench_step bench_token_stats_odd_v 60 token_stats 1 odd_v x
  wants hidden && bench_step bench_token_stats_from_hidden 60 token_stats_from_hidden 1 dry x
  wants excess && bench_step bench_kl_divergence_excess16 60 kl_divergence 0.7 excess16 x
  wants bench && bench_step bench_kl_divergence_dominant 60 kl_divergence 1 dominant x
  wants kl_hidden && bench_step bench_kl_divergence_from_hidden 60 kl_divergence_from_hidden 1 dry x
else
  if wants bench; then
    # top32:cuda, lane32:triton: each forward without its max's thread / lane summed again in
    # fp64 (that epilogue's cost, same build).
    bench_step bench_token_stats_t1_n16384 120 token_stats 1 n16384 \
      "pg_kernels:cuda top32:cuda pg_kernels:triton lane32:triton eager liger" 16384x151936
  fi
  if wants tune; then  # the Triton kernels' blockings (bench_token_stats.TRITON_BLOCKINGS)
    blockings=$("$PYTHON" -c 'from benchmarks.bench_token_stats import blocking_providers as b
print(*b())')
    bench_step bench_token_stats_tune 120 token_stats 1 tune "eager $blockings" 16384x151936
  fi
  if wants step_stats; then  # the bundle (one read of each logits tensor) against the three ops;
    # no_tv: token_tv=False, without TV's second read of the logits and the rollout logits
    bench_step bench_step_stats_t1_n16384 170 step_stats 1 n16384 \
      "pg_kernels:triton no_tv:triton separate:triton eager" 16384x151936
  fi
  if wants bench; then  # rows not 16-byte aligned (GPT-2's V = 50257) beside aligned ones
    bench_step bench_token_stats_odd_v 90 token_stats 1 odd_v \
      "pg_kernels:triton pg_kernels:cuda eager" 16384x50257 16384x50304
  fi
  if wants hidden; then  # the fused lm_head path at a real model's shape (bf16, D = 4096)
    # eager (plain PyTorch on the bf16 logits) sets the others' tolerance: without it, the
    # float64 check allows only its floor, and bf16 logits are ~1e-3 off. rows:cuda: the
    # backward in row chunks beside the default vocabulary blocks (docs/performance.md);
    # token_loss: the loss fused, in vocabulary blocks (CUDA's default) and in row chunks.
    bench_step bench_token_stats_from_hidden 140 token_stats_from_hidden 1 hidden \
      "eager pg_kernels:triton pg_kernels:cuda rows:cuda token_loss:triton token_loss_rows:triton unfused:triton liger_flce cce" \
      16384x151936x4096
  fi
  if wants excess; then  # the 16-bit pair lanes' excess k beside the default (fidelity (1))
    for temp in 1 0.7; do
      bench_step "bench_kl_divergence_excess16_t$temp" 90 kl_divergence "$temp" excess16 \
        "pg_kernels:triton excess16:triton" 16384x151936
    done
  fi
  if wants bench; then
    # kl_divergence's backward on rows with a dominant weight entry (their own launch, one
    # program per row: finding (9)), beside the same shape's random rows (the step below).
    # (No eager: plain bf16 PyTorch fails the float64 check on these rows, a KL 6e-2 off.)
    bench_step bench_kl_divergence_dominant 90 kl_divergence 1 dominant pg_kernels:triton \
      16384x151936 512x151936
  fi
  if wants bench; then
    # torch.compile of the reference (30-60 s of compiling per shape and mode) in a run of its
    # own, after the rows that need none, with the kernels it is compared with.
    for op in $BENCH_COMPILE; do
      bench_step "bench_${op}_compile_t1" 200 "$op" 1 compile \
        "pg_kernels:cuda pg_kernels:triton eager compile" 16384x151936
    done
    for op in $BENCH_OPS; do
      [[ $op == token_stats ]] && continue
      providers="pg_kernels:triton eager"
      # token_tv=False: the forward without TV's second read of both tensors
      [[ $op == mismatch_stats ]] && providers="pg_kernels:triton no_tv:triton eager"
      bench_step "bench_${op}_t1_n16384" 150 "$op" 1 n16384 "$providers" \
        16384x151936 512x151936 1x151936
    done
    bench_step bench_token_stats_cuda_t1 150 token_stats 1 cuda \
      "pg_kernels:cuda pg_kernels:triton" 16384x128256 512x151936 1x151936
    for op in $BENCH_OPS; do
      bench_step "bench_${op}_t0.7_n16384" 150 "$op" 0.7 n16384 \
        "pg_kernels:triton pg_kernels:cuda eager" 16384x151936
    done
  fi
  if wants kl_hidden; then  # dense KL to a teacher from both lm_heads: vocabulary blocks (each
    # run as a vocab-parallel shard, then merged) against row chunks and the unfused path;
    # kl_loss: the loss fused, in vocabulary blocks (CUDA's default) and in row chunks
    bench_step bench_kl_divergence_from_hidden 180 kl_divergence_from_hidden 1 kl_hidden \
      "eager pg_kernels:triton rows:triton kl_loss:triton kl_loss_rows:triton unfused:triton" \
      16384x151936x4096
  fi
fi

# Last: it compiles every Triton kernel variant again at its shapes (~1 s each, tens of them),
# so it runs on what time the benchmarks left (or alone: PGK_STEPS=fidelity).
if (( NO_GPU )); then
  :
elif wants fidelity; then start_step fidelity 120 fidelity; else skip_step fidelity "not in PGK_STEPS"; fi

# ---------------------------------------------------------------------------- summary

{
  echo "# gpu_check $([[ $DRY == 1 ]] && echo '(dry run, CPU)') $(date -u +%FT%TZ)"
  echo
  echo "| step | status | seconds | note |"
  echo "|---|---|---:|---|"
  for name in "${ORDER[@]}"; do
    if [[ -f "$WORK/status/$name" ]]; then
      IFS=$'\t' read -r s st sec note < "$WORK/status/$name"
      echo "| $s | $st | $sec | $note |"
    else
      echo "| $name | TIMEOUT | | did not finish |"
    fi
  done
  echo
  echo "total $((SECONDS - T0)) s of a ${BUDGET} s budget; commit ${PGK_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  for tool in memcheck racecheck; do
    [[ -f "$WORK/logs/$tool.log" ]] || continue
    echo
    echo "## $tool"
    grep -hE "(ERROR|RACECHECK) SUMMARY|gpu_sanitize: " "$WORK/logs/$tool.log" | sed 's/^/    /'
    echo "    cases passed so far: $(grep -cE '[0-9] s  ok$' "$WORK/logs/$tool.log")"
  done
  if [[ -f "$OUT/test_skips.txt" ]]; then
    echo
    echo "## Tests"
    grep -E '^(== |passed )' "$OUT/test_skips.txt" | sed 's/^/    /'
  fi
  for md in "$WORK"/bench/*.md; do
    [[ -f "$md" ]] || continue
    targets=$(awk '/^## Targets/ { on = 1; print; next } /^#/ { on = 0 } on && /^\|/' "$md")
    [[ -n "$targets" ]] && printf '\n## %s\n\n%s\n' "$(basename "$md" .md)" "$targets"
  done
} > "$OUT/summary.md"
archive_logs
archive_bench
rm -rf "$WORK"

echo
cat "$OUT/summary.md"
echo "OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if cut -f2 "$OUT/summary.tsv" | grep -qE '^(FAIL|TIMEOUT)$' ||
   grep -q '| TIMEOUT |' "$OUT/summary.md"; then
  exit 1
fi
exit 0
