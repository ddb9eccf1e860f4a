"""Static SASS instruction budgets of the CUDA token_stats kernels' hot loops (sm_90, no GPU).

Compiles csrc/cuda/check/compile_check.cu (every kernel for every dtype) for sm_90 to a cubin with
the extension's device flags (setup.py, .ci/check_cuda.sh), reads the SASS with cuobjdump and, for
each hot kernel (forward partial, backward), counts the instructions of its hot loop
(`sass_loops.hot_loop`: the loop that moves the most global memory per trip; everything in its
address range counts, rarely taken branches included) per element, against BUDGETS (per 16-bit
element, as in .ci/check_triton_sm90.py; fp32 gets 2x per element = the same per byte; fp64 is not
budgeted). Temperature is a runtime value of these kernels (inv_tau per row), so one kernel covers
temperature 1 and != 1.

Elements per trip: the hot loop is the CTA's walk over (row, chunk) items; per item each thread
handles kSteps (unrolled) load steps of kUnroll 16-byte vectors of kVec elements (token_stats.cuh's
constants, read from the header). The item loops carry `#pragma unroll 1` (checked here: without
it the compiler could unroll them, and one pass of the loop would hold several items).

Budgeted: the kAligned = true kernels (16-byte aligned rows whose length is a whole number of
vectors: every contiguous row of a vocabulary divisible by 8). The kAligned = false kernels are the
fallback for other rows (element-wise loads); their counts are printed, not budgeted.

Kernels over budget are listed in OWED with their current count: the check fails when one gets
worse, when a kernel not in OWED goes over, and when an OWED kernel comes under budget (then delete
its entry). It fails too when a budgeted kernel is missing from the SASS.

Run: .venv/bin/python .ci/check_cuda_budgets.py   (~30 s of nvcc; skips, exit 0, without nvcc)
     .venv/bin/python .ci/check_cuda_budgets.py --dump partial BF16   also prints that aligned
     kernel's hot loop (address, predicate, opcode, operands), for reading where the count goes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_loops import Loop, functions, hot_loop  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(REPO, "csrc", "cuda", "token_stats.cuh")
SOURCE = os.path.join(REPO, "csrc", "cuda", "check", "compile_check.cu")
FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
ARCH = "sm_90"
# SASS instructions per 16-bit element in each hot kernel's hot loop (see check_triton_sm90.py).
BUDGETS = {"partial": 10, "backward": 12}
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}
# (kernel, dtype) -> worst count measured, for kernels still over budget.
# The 16-bit forward's top-thread epilogue (token_stats.cuh, top_vector_sums: one warp of the CTA
# sums the thread holding the chunk's max again in fp64, once per item) cost 10.0 -> 10.6 of its
# static count, ~15 instructions of it in every warp; load_item's address select for the slots
# past a chunk then took 2 instructions off each 16-byte load: 10.3 (2026-12-07). Owed until a
# GPU times it against `amax` (1.04x at 10.0 on an H200, 2026-12-04; the target is 1.05x).
OWED: dict[tuple[str, str], float] = {("partial", "BF16"): 10.3, ("partial", "F16"): 10.3}
_NAME = re.compile(r"token_stats_(partial|backward)_kernelINS0_\d+(BF16|F16|F32|F64)ELb([01])E")


def find_tool(name: str) -> str | None:
    """A CUDA toolkit binary: next to the real nvcc (the one on PATH may be a wrapper), else the
    copy in the Triton wheel (cuobjdump only)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dry = subprocess.run(
        [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
    for folder in ([os.path.join(top.group(1), "bin")] if top else []) + [os.path.dirname(nvcc)]:
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    if name == "cuobjdump":
        try:
            import triton
        except ImportError:
            return None
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.access(path, os.X_OK) else None
    return None


def header_constants() -> tuple[int, dict[str, int]]:
    """kUnroll x kSteps (16-byte vectors per thread per item) and each dtype's kVec, as
    token_stats.cuh defines them."""
    text = open(HEADER).read()
    unroll = int(re.search(r"constexpr int kUnroll = (\d+);", text).group(1))
    unroll *= int(re.search(r"constexpr int kSteps = (\d+);", text).group(1))
    vec = {
        tag: int(m.group(1))
        for tag in ITEMSIZE
        if (m := re.search(rf"struct DTypeTraits<{tag}> \{{.*?kVec = (\d+);", text, re.S))
    }
    if set(vec) != set(ITEMSIZE):
        raise RuntimeError(f"kVec not found for every dtype in {HEADER}: {vec}")
    loops = re.findall(r"(#pragma unroll 1\n)?  while \(next\.row < in\.N\)", text)
    if len(loops) != 2 or not all(loops):
        raise RuntimeError(f"{HEADER}: each item loop needs #pragma unroll 1 (one item per trip)")
    return unroll, vec


def compile_cubin(nvcc: str, out: str) -> None:
    cmd = [nvcc, *FLAGS, "-I", os.path.join(REPO, "csrc", "include")]
    cmd += ["-gencode", f"arch=compute_{ARCH[3:]},code={ARCH}", "--cubin", SOURCE, "-o", out]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")


def registers(cuobjdump: str, cubin: str) -> dict[str, int]:
    out = subprocess.run(
        [cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True, check=True
    ).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"Function (\S+):\s*REG:(\d+)", out)}


def dump(loop: Loop) -> None:
    """The hot loop's SASS, one instruction a line."""
    for i in loop.insns:
        print(f"    /*{i.addr:05x}*/ {i.pred:6s} {i.op}{i.args}")


def main(argv: list[str]) -> int:
    want = None
    if argv[:1] == ["--dump"]:
        if len(argv) != 3 or argv[1] not in BUDGETS or argv[2] not in ("BF16", "F16", "F32"):
            print(f"usage: check_cuda_budgets.py [--dump {{{','.join(BUDGETS)}}} {{BF16,F16,F32}}]")
            return 2
        want = (argv[1], argv[2])
    elif argv:
        print(f"check_cuda_budgets: unknown arguments {argv} (only --dump KERNEL DTYPE)")
        return 2
    nvcc = find_tool("nvcc")
    if nvcc is None:
        print("check_cuda_budgets: SKIPPED: nvcc not found (CI has it; install the CUDA toolkit)")
        return 0
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        print("check_cuda_budgets: FAIL: nvcc found but no cuobjdump (toolkit or Triton wheel)")
        return 1
    unroll, vec = header_constants()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "compile_check.cubin")
        compile_cubin(nvcc, cubin)
        sass = subprocess.run(
            [cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True
        ).stdout
        regs = registers(cuobjdump, cubin)
    print(f"hot-loop SASS instructions per element, {ARCH}, CUDA token_stats ({nvcc}):")
    failed, seen, worst = [], set(), {}
    for mangled, insns in sorted(functions(sass).items(), key=lambda kv: _NAME.findall(kv[0])):
        m = _NAME.search(mangled)
        if m is None:
            continue
        kernel, dtype, aligned = m.group(1), m.group(2), m.group(3) == "1"
        if dtype == "F64":
            continue
        loop = hot_loop(insns)
        if loop is None:
            failed.append(f"{kernel} {dtype}: no loop that moves global memory")
            continue
        vectors = len(loop.ops("LDG.E.128"))
        n = unroll * vec[dtype]  # one item per trip (#pragma unroll 1)
        count = loop.count / n
        budget = BUDGETS[kernel] * ITEMSIZE[dtype] // 2
        owed = OWED.get((kernel, dtype))
        if not aligned:
            verdict = "info"
        elif count <= budget:
            verdict = "ok"
        else:
            verdict = "OWED" if owed and count <= owed + 0.05 else "OVER"
        print(
            f"  {kernel:8s} {dtype:4s} {'aligned' if aligned else 'scalar ':7s} {count:5.1f} "
            f"<= {budget:2d} {verdict:4s} loop {loop.count} insns / {n} elements per thread, "
            f"regs={regs.get(mangled, -1)} ({len(loop.ops('MUFU'))} MUFU, "
            f"{len(loop.ops('BAR'))} BAR, {len(loop.ops('SHFL'))} SHFL, {vectors} LDG.128)"
        )
        if want == (kernel, dtype) and aligned:
            dump(loop)
        if not aligned:
            continue
        seen.add((kernel, dtype))
        worst[(kernel, dtype)] = count
        if verdict == "OVER":
            failed.append(f"{kernel} {dtype}: {count:.1f} > {budget}")
        elif owed and count <= budget:
            failed.append(f"{kernel} {dtype}: under budget now ({count:.1f}), remove from OWED")
    missing = [k for k in BUDGETS for d in ("BF16", "F16", "F32") if (k, d) not in seen]
    if missing:
        failed.append(f"kernels not found in the SASS: {missing}")
    owed_now = {k: round(v, 1) for k, v in worst.items() if v > BUDGETS[k[0]] * ITEMSIZE[k[1]] // 2}
    print(f"check_cuda_budgets: {len(owed_now)} (kernel, dtype) pairs over budget: {owed_now}")
    if failed:
        print(f"check_cuda_budgets: FAIL: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
