"""Compile every Triton kernel of pg_kernels for sm_90 (H100) without a GPU, and fail on spills.

CI has no GPU, so the test suite runs the Triton kernels under TRITON_INTERPRET=1, which never
compiles them: a kernel that the interpreter accepts can still fail to compile for a GPU (an
unsupported op, a type error the interpreter lets through) or spill registers. This script runs
each public op with backend="triton" on CPU tensors, forward and backward, for every dtype and
the launch variants that change a kernel's constexprs, with two patches:
  * Triton's active driver is replaced by one that reports an sm_90 target (Triton's own
    compiler and ptxas do the rest; no CUDA driver is needed);
  * every launch becomes a warmup: the kernel is compiled, never run (outputs are garbage, which
    nothing here reads).
Each compiled kernel's cubin is then read with cuobjdump (from the Triton wheel): registers,
spills (LOCAL) and the call stack. Any local memory fails the check.

Then the static instruction budgets: for every streaming kernel (one that loops over a row), the
SASS instructions of its hot loop (`sass_loops.hot_loop`, rare branches included) per element
each thread handles per trip (per element pair for the kernels that read two logit tensors), and
its registers, against BUDGETS below. A kernel over its budget fails the check. bf16 rows that
start at odd elements (an odd vocabulary, logits sliced to the tokenizer's size) are compiled
and budgeted too: their loads are scalar (`budget_of`).

Run: .venv/bin/python .ci/check_triton_sm90.py [OP ...]   (one line per kernel; with op names,
only those ops' kernels, in this process: a quick loop while tuning one kernel). Without, the
ops are compiled in WORKERS processes (Triton's compile and ptxas are single-threaded; CI has
2 cores), the step_stats bundle's many variants apart from the rest.
"""

from __future__ import annotations

import importlib
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# This checkout's pg_kernels, not the editable install's (a script's sys.path starts at .ci/).
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from sass_loops import functions, hot_loop  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# SASS instructions per 16-bit element (per element pair for the two-tensor kernels) in each
# streaming kernel's hot loop. The H200 issues ~16 thread-instructions per bf16 element it can
# read at full bandwidth (sass_loops); these leave headroom for stalls and the per-program
# epilogue. fp32 elements arrive at half the rate: their budget is the same per byte (2x per
# element). fp64 has no bandwidth target (half-rate fp64 units, a software exp): not budgeted.
# Logit-sized tensors each hot loop streams per element (read or written), for unroll detection.
STREAMS = {
    "token_stats._bwd_kernel": 2,
    "_pair.pair_chunk_kernel": 2,
    "mismatch_stats._tv_chunk_kernel": 2,
    "kl_divergence._bwd_kernel": 3,
    "mismatch_stats._bwd_kernel": 2,
    "topk_kl._bwd_kernel": 2,
    "pruned_logprob._bwd_kernel": 2,
    "step_stats._fwd_chunk_kernel": 3,
    "step_stats._bwd_kernel": 4,
}
BUDGETS = {
    "token_stats._fwd_chunk_kernel": 10,
    "token_stats._bwd_kernel": 12,
    "_pair.pair_chunk_kernel": 20,
    "mismatch_stats._tv_chunk_kernel": 20,
    "kl_divergence._bwd_kernel": 20,
    "mismatch_stats._bwd_kernel": 12,
    "topk_kl._tail_chunk_kernel": 12,
    "topk_kl._bwd_kernel": 12,
    "pruned_logprob._max_chunk_kernel": 12,
    "pruned_logprob._sum_chunk_kernel": 12,
    "pruned_logprob._bwd_kernel": 12,
    # step_stats' forward reads three logits tensors per element (logits, rollout, reference):
    # ~3 reads of bandwidth per element, so at the H200's issue rate (~16 instructions per bf16
    # element read at full bandwidth, sass_loops) a triple may take ~3 x 16 = 48 at best; 30
    # per element triple keeps the same headroom as the single-tensor kernels' 10-12. Its
    # backward reads two tensors and writes two gradients, 8 bytes per bf16 pair, whose issue
    # line is ~75 instructions per pair (ROW_CASE_BUDGETS below): kl_divergence's pair budget
    # of 20 plus the one difference per pair that makes a teacher equal to the logits give
    # gradients of exactly 0 (`_bwd_values`' FRAMED, 2026-12-07: 19.6-20.0 -> 20.7-20.9), ~3.6x
    # below that line.
    "step_stats._fwd_chunk_kernel": 30,
    "step_stats._bwd_kernel": 21,
}
# Kernels compiled for a row case of their own (a constexpr flag, True): their hot loop's
# budget per element (pair) of 16-bit logits. kl_divergence's backward with DOMINANT_ROWS, a
# launch for rows whose weight side has a dominant entry (w_j > 1/2, rest below 2^-7: common
# among an RL policy's confident tokens), which also sums the others' gradients (`_dominant_row`:
# 4-5 instructions per pair; 23.6-23.9 measured, 29.4 on rows that start at odd elements,
# 2026-12-06). The H200's issue line for this loop, which moves 8 bytes per bf16 pair (two reads,
# two writes), is ~75 instructions per pair at the measured 3.56 TB/s (132 SMs x 4 schedulers x
# 1.98 GHz): the main loop's 20 is that line with ~4x headroom, this one ~3x. step_stats'
# backward with DOMINANT_ROWS (`_dominant_row`: the KL term formed alone beside the folded one,
# element loads, every block masked): 35.6-37.6 measured, 43.2-45.2 on odd-start rows, the same
# line ~75: a rare row case's loop, kept below it.
ROW_CASE_BUDGETS = {
    ("kl_divergence._bwd_kernel", "DOMINANT_ROWS"): 27,
    ("step_stats._bwd_kernel", "DOMINANT_ROWS"): 60,
}
# The 16-bit pair passes with the excess k (`_pair.EXCESS_16BIT`, PGK_PAIR_EXCESS_16BIT=1: off by
# default, an experiment the GPU run times, gpu_check.sh's step `excess`): their own budgets,
# the counts measured when it was added (2026-12-05: pair 32.0-32.8, bundle 52.8-61.2) with a
# little room, so that the variant keeps compiling, without spills, at the size it was timed.
EXCESS_16BIT_BUDGETS = {"_pair.pair_chunk_kernel": 34, "step_stats._fwd_chunk_kernel": 63}
PAIR_OPS = ("kl_divergence", "mismatch_stats", "step_stats")
# Budgeted kernels whose hot loop takes no exponential (a max only). Every other one exps each
# element: a hot loop without MUFU means `sass_loops.hot_loop` counted the wrong loop (it took
# the fp32 pair pass's far-chunk max re-read for its main loop: 5.8-7.2 reported for 33.1-33.8).
NO_EXP = {"pruned_logprob._max_chunk_kernel"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class OfflineDriver:
    """Just enough of a Triton driver to compile for TARGET on a machine without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


COMPILED: dict[tuple, tuple[str, object]] = {}
_run = JITFunction.run
# Whether launches of a row case of their own (ROW_CASE_BUDGETS' flags) are compiled: off for
# the pass that only checks spills at one chunk per row (CI time: those variants had taken the
# step_stats worker from 122 to 148 kernels).
ROW_CASES = True


def _compile_only(self, *args, grid, warmup, **kwargs):
    if not ROW_CASES and any(kwargs.get(flag) for _, flag in ROW_CASE_BUDGETS):
        return None
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    key = (self.fn.__name__, self.fn.__module__, kernel.hash)
    COMPILED.setdefault(key, (f"{self.fn.__module__.split('.')[-1]}.{self.fn.__name__}", kernel))
    return kernel


OPS = ("token_stats", "kl_divergence", "mismatch_stats", "topk_kl", "step_stats", "pruned_logprob")
# The ops of each worker process: step_stats (~half of the compile time: three tensors, both
# directions, every dtype) and the rest. kl_divergence and mismatch_stats share the pair
# kernel: one worker compiles it.
WORKERS = (("step_stats",), tuple(op for op in OPS if op != "step_stats"))


ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def exercise(
    only: tuple[str, ...], V: int = 151936, dtypes=ALL_DTYPES, pad: int = 0, scalar_tau: bool = True
) -> None:
    """The ops named in `only`, forward and backward, in the variants that change a kernel's
    constexprs. Blocking depends on V: the default is a real vocabulary, several chunks per row;
    a small V gives one chunk per row, n_chunks == 1, which Triton specializes into a constant
    (kernels that treated it as a tensor failed to compile there). `pad` widens each row's
    stride to V + pad: pad = 1 gives rows that start at odd elements (an odd vocabulary such as
    GPT-2's 50257, or logits sliced to the tokenizer's size), which take the unaligned loads.
    Without `scalar_tau`, only per-row temperatures (the kernels' dividing variants)."""
    import pg_kernels
    from pg_kernels import _backend

    _backend._TRITON_INTERPRETED = True  # lets backend="triton" take CPU tensors
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x, xr = (
            torch.randn(2, V + pad, generator=gen).to(dtype)[:, :V].detach().requires_grad_()
            for _ in range(2)
        )
        y = torch.tensor([3, V - 1])
        per_row = torch.tensor([0.7, 1.3], dtype=acc)
        lp = torch.tensor([-3.0, -4.0])
        ids = torch.tensor([[3, 5, 7, 11], [0, 1, 2, 3]])
        id_lp = torch.log_softmax(torch.randn(2, 4, generator=gen), -1) - 1.0
        for temperature in (1.0, per_row) if scalar_tau else (per_row,):
            t = dict(temperature=temperature, backend="triton")
            if "token_stats" in only:
                s = pg_kernels.token_stats(x, y, **t)
                (s.logprob + s.entropy + s.collision + s.lse).sum().backward()
            if "kl_divergence" in only:
                for direction in ("reverse", "forward"):
                    kl = pg_kernels.kl_divergence(x, xr, direction=direction, labels=y, **t)
                    kl.sum().backward()
                pg_kernels.kl_divergence(x, xr.detach(), **t).sum().backward()  # one side only
                if pad == 0:  # a vocab-parallel shard's backward (outside_terms)
                    tau = (per_row, 1.0) if temperature is per_row else (None, temperature)
                    fwd_args = (x.detach(), xr.detach(), None, *tau, None, 1.0, -100, "reverse")
                    kl, state = torch.ops.pg_kernels.kl_divergence(*fwd_args, "triton")
                    torch.ops.pg_kernels.kl_divergence_backward(
                        torch.ones_like(kl), *fwd_args, kl, state, True, True, "triton",
                        torch.zeros(2, 2, dtype=acc),
                    )  # fmt: skip
            if "mismatch_stats" in only:
                m = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr.detach(), **t)
                m.logprob.sum().backward()
                # Its sampled estimators (on CPU tensors the op takes the C++ kernel for them).
                estimators = importlib.import_module("pg_kernels.triton.sampled_estimators")
                estimators.sampled_estimators_forward(lp.to(acc), lp, y, -100, 2.0, 0.5, 2.0)
            if "topk_kl" in only:
                pg_kernels.topk_kl(x, ids, id_lp, labels=y, **t).sum().backward()
            if "step_stats" in only:
                # Every tensor given (the 3-tensor pass), both gradients; the other sides at the
                # logits' temperature (framed on the logits' lanes) and, under a temperature, at
                # their own (each side's own lanes).
                own = dict(rollout_temperature=per_row * 1.25, ref_temperature=0.9)
                for direction, others in itertools.product(
                    ("reverse", "forward"), ({}, own) if temperature is per_row else ({},)
                ):
                    out = pg_kernels.step_stats(
                        x,
                        y,
                        rollout_logprobs=lp,
                        rollout_logits=xr.detach(),
                        ref_logits=xr,
                        kl_direction=direction,
                        **t,
                        **others,
                    )
                    (out.token.logprob + out.token.entropy + out.kl).sum().backward()
            if "pruned_logprob" in only:
                pg_kernels.pruned_logprob(x, y, alpha=1e-3, **t).logprob.sum().backward()


def resources(kernel) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, found.groups())))


def sass(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run(
            [CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout


# Kernels still over their budget: (kernel, dtype) -> the worst count measured. The check fails
# when one of these gets worse, and when one comes under its budget (so the list stays true).
# (Empty: step_stats' fp32 forward, the last entry at 60.3, came to 56.1 with `_pair.horner`.)
OWED: dict[tuple[str, str, str], float] = {}  # (kernel, dtype, "aligned" / "unaligned")
ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def budget_of(name: str, dtype: str, rows: str, case: str | None = None) -> int:
    """The hot loop's budget per element (pair) for `dtype` logits (of a rare row case's
    variant: ROW_CASE_BUDGETS). Rows that start at odd elements (`exercise`'s pad) load element
    by element: one more instruction per element for each logit-sized tensor the loop moves
    (STREAMS) than a vector load of aligned rows."""
    budget = (ROW_CASE_BUDGETS[name, case] if case else BUDGETS[name]) * ITEMSIZE[dtype] // 2
    return budget + STREAMS.get(name, 1) if rows == "unaligned" else budget


def logits_dtype(kernel) -> str:
    """The element type of the kernel's (first) logits argument, x_ptr or xw_ptr."""
    sig = kernel.src.signature
    return str(next(sig[a] for a in ("x_ptr", "xw_ptr") if a in sig))[1:]


def per_element(name: str, kernel) -> tuple[float, str, int]:
    """Hot-loop SASS instructions per element (pair), a description of the count, and the
    loop's MUFU count."""
    names = list(kernel.src.signature)
    const = {names[k[0]]: v for k, v in kernel.src.constants.items() if isinstance(k, tuple)}
    threads = 32 * kernel.metadata.num_warps
    insns = next(iter(functions(sass(kernel)).values()))
    loop = hot_loop(insns)
    if loop is None:
        raise RuntimeError(f"{name}: no loop that moves global memory")
    per_trip = const["BLOCK_V"] / threads
    # The compiler may unroll the step loop: count trips by the stream bytes a step moves (the
    # widest accesses only: a scalar load of an id or a label in the loop is no extra trip).
    itemsize = ITEMSIZE[logits_dtype(kernel)]
    unroll = max(1, round(loop.stream_bytes() / (per_trip * itemsize * STREAMS.get(name, 1))))
    n = per_trip * unroll
    return loop.count / n, (
        f"loop {loop.count} insns / {n:g} elements (fast path {loop.fast_path() / n:.1f}, "
        f"{len(loop.ops('MUFU'))} MUFU, {len(loop.ops('BAR'))} BAR, {len(loop.ops('SHFL'))} SHFL)"
    ), len(loop.ops("MUFU"))


def compile_and_measure(ops: tuple[str, ...]) -> list[dict]:
    """Compile the kernels of `ops` for TARGET; a record per kernel variant: its resources and,
    for a budgeted streaming kernel, its hot loop's instructions per element (pair)."""
    driver.set_active(OfflineDriver())
    JITFunction.run = _compile_only
    try:
        exercise(ops)
        pair_ops = tuple(op for op in ops if op in PAIR_OPS)
        if pair_ops:  # the 16-bit excess variants (EXCESS_16BIT_BUDGETS)
            pair = importlib.import_module("pg_kernels.triton._pair")
            pair.EXCESS_16BIT = True
            try:
                exercise(pair_ops, dtypes=(torch.bfloat16, torch.float16))
            finally:
                pair.EXCESS_16BIT = False
        aligned = set(COMPILED)
        # (bf16 and per-row temperatures only: every dtype and temperature took CI past its 30
        # minutes; fp32 and the scalar temperatures' variants, compiled by hand, were within
        # budget, 2026-12-06.)
        exercise(ops, dtypes=(torch.bfloat16,), pad=1, scalar_tau=False)
        unaligned = set(COMPILED) - aligned
        measured = set(COMPILED)
        # One chunk per row: compiled and checked for spills, not budgeted (no streaming loop);
        # the row cases' launches (grid (N, 1) whatever the chunking) were compiled above.
        global ROW_CASES
        ROW_CASES = False
        try:
            exercise(ops, V=1000, dtypes=(torch.bfloat16, torch.float32))
        finally:
            ROW_CASES = True
    finally:
        JITFunction.run = _run
    records = []
    for key, (name, kernel) in COMPILED.items():
        src, warps = kernel.src, kernel.metadata.num_warps
        pointers = [t for t in src.signature.values() if str(t).startswith("*")]
        record = dict(
            # Triton's kernel hash (and the cubin) depends on what the process compiled before:
            # the same kernel had other hashes in the two workers. The launch's signature,
            # constexprs, argument specializations and warps identify a variant.
            key=(name, *map(repr, (src.signature, src.constants, src.attrs)), warps),
            name=name,
            pointer=str(pointers[0]) if pointers else "",
            warps=warps,
            widest=max(
                (int(w) for w in re.findall(r"ld\.global(?:\.\w+)*\.v(\d)", kernel.asm["ptx"])),
                default=1,
            ),
            **resources(kernel),
        )
        # fp64 has no bandwidth target (BUDGETS).
        if key in measured and name in BUDGETS and logits_dtype(kernel) != "fp64":
            record["dtype"] = logits_dtype(kernel)
            record["count"], record["how"], record["mufu"] = per_element(name, kernel)
            names = list(src.signature)
            flags = {names[k[0]] for k, v in src.constants.items() if isinstance(k, tuple) and v}
            record["excess16"] = "EXCESS" in flags and record["dtype"] in ("bf16", "fp16")
            record["unaligned"] = key in unaligned
            # A rare row case's variant (ROW_CASE_BUDGETS), else None.
            record["case"] = next((f for (k, f) in ROW_CASE_BUDGETS if k == name and f in flags),
                                  None)  # fmt: skip
        records.append(record)
    return records


def main() -> int:
    only = tuple(sys.argv[1:])  # op names: check only their kernels (while iterating on a kernel)
    unknown = [op for op in only if op not in OPS]
    if unknown:
        print(f"check_triton_sm90: unknown op(s) {unknown}; the ops are {list(OPS)}")
        return 2
    if only:
        records = compile_and_measure(only)
    else:
        spawn = multiprocessing.get_context("spawn")  # fresh processes: no forked torch state
        with ProcessPoolExecutor(len(WORKERS), mp_context=spawn) as pool:
            records = [r for part in pool.map(compile_and_measure, WORKERS) for r in part]
    # A variant both workers compiled (`key`) counts once.
    records = sorted(
        {r["key"]: r for r in records}.values(), key=lambda r: (r["name"], r["pointer"], r["key"])
    )
    failed = []
    for r in records:
        # LOCAL is spill memory. STACK alone is an ABI call frame (an fp64 libdevice call that
        # ptxas did not inline, 16 bytes in topk_kl's fp64 backward): reported, not failed.
        spills = r["local"] > 0
        print(
            f"{r['name']:38s} {r['pointer']:6s} warps={r['warps']} regs={r['regs']:3d} "
            f"local={r['local']} stack={r['stack']} widest-load=v{r['widest']}"
            + ("  SPILLS" if spills else "")
        )
        if spills:
            failed.append(r["name"])
    if failed:
        print(f"check_triton_sm90: FAIL: local memory (spills) in {sorted(set(failed))}")
    print(f"check_triton_sm90: {len(records)} kernel variants compiled for sm_90")
    print("\nhot-loop SASS instructions per element (pair), sm_90, against the budget:")
    over = []
    worst: dict[tuple[str, str, str], float] = {}
    for r in records:
        if "count" not in r:
            continue
        name, dtype, count, how = r["name"], r["dtype"], r["count"], r["how"]
        if r["excess16"]:
            budget = EXCESS_16BIT_BUDGETS[name]
            verdict = "ok" if count <= budget else "OVER"
            print(f"  {name:34s} {dtype:6s} {count:5.1f} <= {budget:2d} {verdict:4s} {how} "
                  "[EXCESS_16BIT]")  # fmt: skip
            if verdict == "OVER":
                over.append(f"{name} ({dtype}, EXCESS_16BIT: {count:.1f} > {budget})")
            continue
        rows = "unaligned" if r["unaligned"] else "aligned"
        if r["case"]:
            budget = budget_of(name, dtype, rows, r["case"])
            verdict = "ok" if count <= budget else "OVER"
            print(f"  {name:34s} {dtype:6s} {count:5.1f} <= {budget:2d} {verdict:4s} {how} "
                  f"[{r['case']}]" + (" [unaligned rows]" if r["unaligned"] else ""))  # fmt: skip
            if verdict == "OVER":
                over.append(f"{name} ({dtype}, {rows} rows, {r['case']}: {count:.1f} > {budget})")
            continue
        budget = budget_of(name, dtype, rows)
        owed = OWED.get((name, dtype, rows))
        verdict = "ok" if count <= budget else "OWED" if owed and count <= owed + 0.05 else "OVER"
        print(f"  {name:34s} {dtype:6s} {count:5.1f} <= {budget:2d} {verdict:4s} {how}"
              + (" [unaligned rows]" if r["unaligned"] else ""))  # fmt: skip
        worst[(name, dtype, rows)] = max(worst.get((name, dtype, rows), 0.0), count)
        if verdict == "OVER":
            over.append(f"{name} ({dtype}, {rows} rows: {count:.1f} > {budget})")
        if r["mufu"] == 0 and name not in NO_EXP:
            over.append(f"{name} ({dtype}, {rows} rows): its counted loop has no exp, not the "
                        "hot loop")  # fmt: skip
    stale = [k for k in OWED if k in worst and worst[k] <= budget_of(*k)]
    if over or stale:
        print(
            f"check_triton_sm90: FAIL: over the instruction budget (or miscounted): {over}; "
            f"under budget now, remove from OWED: {stale}"
        )
        failed.extend(over + stale)
    owed_now = {k: round(v, 1) for k, v in worst.items() if v > budget_of(*k)}
    print(f"check_triton_sm90: {len(owed_now)} (kernel, dtype, rows) over budget: {owed_now}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
