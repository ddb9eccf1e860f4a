"""The one timing and reporting harness of pg_kernels benchmarks.

A `bench_<op>.py` declares an `OpBench`: how to make inputs, the providers (callables from an
inputs dict to an outputs dict of per-row tensors), the float64 truth, the loss that drives the
backward modes, the minimum bytes the op must move, and the ceilings (reference passes over the
same tensors). Everything else lives here: the sweep, the correctness check before timing,
warm-up, rotation of input sets, the timing itself, peak memory, and the JSON / markdown / PNG
outputs. No timing code belongs anywhere else.

Conventions every OpBench follows:
  * Inputs and outputs are dicts of tensors whose first dim is the row dim N; rows are
    independent, so the check may compare the first `check_rows` rows of a full-size run with
    the float64 truth computed on those rows only (a float64 copy of a GPU-sized tensor would
    not fit). `shared_inputs` (an lm_head weight) have no row dim and are never sliced.
  * Modes: "fwd" runs the provider with no input requiring grad; "bwd" runs forward + loss
    outside the timed region, then times `torch.autograd.grad(loss, grad_inputs)`; "fwd+bwd"
    times all three. `autograd.grad` (not `.backward()`) so that no `.grad` accumulation adds
    an extra pass from the second repetition on.
  * A record's `speedup_vs[X]` is `ms(X) / ms(this row)`: above 1 means this row is faster.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

Inputs = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
REPO_ROOT = Path(__file__).resolve().parent.parent
LOAD_WARN = 0.25  # cores used by other processes during a timing before its row gets a '*'


class Skip(Exception):
    """Raised by `Provider.build` when a provider cannot run a case; the reason becomes a note."""


@dataclasses.dataclass
class Case:
    """One measurement point: op x mode x dtype x shape on a device."""

    op: str
    mode: str
    dtype: torch.dtype
    shape: dict[str, int]
    device: torch.device

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype).removeprefix("torch."))

    @property
    def shape_str(self) -> str:
        return "x".join(str(v) for v in self.shape.values())

    @property
    def group(self) -> tuple:
        """Cases sharing dtype and shape share input sets, ceilings and the float64 truth."""
        return (self.dtype_name, tuple(self.shape.items()))

    @property
    def needs_grad(self) -> bool:
        return self.mode != "fwd"


@dataclasses.dataclass
class Provider:
    """An implementation to time. `build(case)` returns `fn(inputs) -> outputs` or raises Skip.

    `build` runs outside timing (it may compile); the first calls of `fn` happen during the
    check and the warm-up, also outside timing. Set `mutates_inputs` for kernels that write
    into their inputs (e.g. in-place backward): they get private clones of the input sets.
    `peer`: another library, compared for speed at its own precision: its error against the
    float64 truth is recorded and noted, and it is timed even beyond pg_kernels' tolerance
    (Liger-Kernel returns a bf16 loss for bf16 logits: 1.7e-3 relative on an H200).
    `opt_in`: runs only when --providers names it (a kernel's blocking variants, for tuning).
    """

    name: str
    build: Callable[[Case], Callable[[Inputs], Outputs]]
    modes: tuple[str, ...] = MODES
    mutates_inputs: bool = False
    peer: bool = False
    opt_in: bool = False


@dataclasses.dataclass
class Ceiling:
    """A reference pass over the case's tensors, e.g. one read (`amax`) or read + write (`copy`).

    `prepare(inputs)` runs once per input set outside timing (allocate output buffers, make
    fp32 copies); `run(state)` is what gets timed; `bytes(case)` is what it moves.
    """

    name: str
    prepare: Callable[[Inputs], Any]
    run: Callable[[Any], Any]
    bytes: Callable[[Case], int]


def amax_ceiling(tensor: str, name: str | None = None) -> Ceiling:
    """One read of inputs[tensor] ([N, V]): the floor of a one-read op on that tensor."""
    return Ceiling(
        name or f"amax:{tensor}",
        prepare=lambda inputs: inputs[tensor],
        run=lambda x: torch.amax(x, -1),
        bytes=lambda c: c.shape["N"] * c.shape["V"] * c.dtype.itemsize,
    )


def copy_ceiling(tensor: str = "logits", name: str = "copy") -> Ceiling:
    """A device copy of inputs[tensor] into a preallocated buffer: read + write."""
    return Ceiling(
        name,
        prepare=lambda inputs: (torch.empty_like(inputs[tensor]), inputs[tensor]),
        run=lambda st: st[0].copy_(st[1]),
        bytes=lambda c: 2 * c.shape["N"] * c.shape["V"] * c.dtype.itemsize,
    )


def exp_ceiling(tensor: str = "logits", name: str | None = None) -> Ceiling:
    """One torch.exp pass over fp32 data of inputs[tensor]'s shape: the CPU floor (kernels exp
    in fp32 whatever the logits' dtype). The output is preallocated so that page faults of a
    fresh 100+ MB buffer are not counted as exp time."""

    def prepare(inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        x = inputs[tensor].float()
        return x, torch.empty_like(x)

    return Ceiling(
        name or f"exp:{tensor}",
        prepare=prepare,
        run=lambda st: torch.exp(st[0], out=st[1]),
        bytes=lambda c: 8 * c.shape["N"] * c.shape["V"],
    )


@dataclasses.dataclass
class CeilingRow:
    """A ceiling row of a mode: the sum of some ceilings' times, e.g. amax + copy for fwd+bwd.

    role "memory": the memory-only ceiling that `pct_of_ceiling` compares against (one per
    mode). role "floor": another lower bound worth a speedup column (e.g. one exp per element
    on a CPU, where arithmetic, not memory, is the floor).
    """

    parts: tuple[str, ...]
    role: str = "memory"

    @property
    def name(self) -> str:
        return "ceiling:" + "+".join(self.parts)


def one_read_ceilings(
    device: torch.device, amax: Ceiling | None = None
) -> tuple[dict[str, Ceiling], dict[str, list[CeilingRow]]]:
    """Ceilings and ceiling rows of an op that reads the logits once forward and reads them and
    writes a gradient once backward: amax (fwd), copy (bwd), amax + copy (fwd+bwd); on a CPU also
    the floor of one exp per element forward (the normalizer) and one more backward (p_j)."""
    ceilings = {"amax": amax or amax_ceiling("logits", "amax"), "copy": copy_ceiling()}
    rows: dict[str, list[CeilingRow]] = {
        "fwd": [CeilingRow(("amax",))],
        "bwd": [CeilingRow(("copy",))],
        "fwd+bwd": [CeilingRow(("amax", "copy"))],
    }
    if device.type == "cpu":
        ceilings["exp"] = exp_ceiling(name="exp")
        rows["fwd"].append(CeilingRow(("exp",), "floor"))
        rows["bwd"].append(CeilingRow(("exp",), "floor"))
        rows["fwd+bwd"].append(CeilingRow(("exp", "exp"), "floor"))
    return ceilings, rows


@dataclasses.dataclass(frozen=True)
class Target:
    """One target of an issue, read off a record's ratios: `speedup_vs[against]` of the
    `mode` row must be >= `at_least`, or the time ratio ms / ms(against) <= `at_most`."""

    header: str  # column header, e.g. "×eager ≥ 8"
    mode: str  # "fwd", "bwd" or "fwd+bwd"
    against: str  # a key of speedup_vs: "eager", "compile", "ceiling:amax+copy", ...
    at_least: float | None = None
    at_most: float | None = None  # compares the time ratio 1 / speedup_vs[against]
    time_ratio: bool = False  # show ms / ms(against) (implied by at_most)

    def cell(self, record: dict | None) -> str:
        speedup = None if record is None else record["speedup_vs"].get(self.against)
        paired = None if record is None else record.get("paired_vs", {}).get(self.against)
        if paired is not None:  # measured back to back: the steadier ratio
            speedup = 1 / paired["ratio"]
        if speedup is None:
            return "—"
        value = 1 / speedup if (self.time_ratio or self.at_most is not None) else speedup
        ok = (self.at_least is None or value >= self.at_least) and (
            self.at_most is None or value <= self.at_most
        )
        bound = self.at_least is not None or self.at_most is not None
        mark = ""
        if paired is not None:  # the spread of the per-pair ratios, as time ratios
            lo, hi = paired["q1"], paired["q3"]
            if not (self.time_ratio or self.at_most is not None):
                lo, hi = 1 / hi, 1 / lo
            mark = f" (paired: {paired['pairs']} pairs, IQR {lo:.2f}–{hi:.2f})"
        if (record.get("other_load") or 0.0) > LOAD_WARN:  # as the tables' rows: timed under load
            mark += " *"
        # Two decimals, or three where they would round onto the bound (1.0504 read "1.05 ❌")
        near = [b for b in (self.at_least, self.at_most) if b is not None]
        digits = 3 if any(abs(value - b) < 0.005 for b in near) else 2
        return f"{value:.{digits}f}" + (f" {'✅' if ok else '❌'}" if bound else "") + mark


def targets_summary(
    title: str, provider: str, shape: dict[str, int], targets: list[Target], memory: bool = False
) -> Callable[[list[dict]], list[str]]:
    """An OpBench.summary: one row per dtype with each target's value and verdict, from the
    records of `provider` at `shape` (ratios measured in the same run). `memory` adds the forward
    peak memory per row."""

    def summary(records: list[dict]) -> list[str]:
        mine = {
            (r["dtype"], r["mode"]): r
            for r in records
            if r["provider"] == provider and r["status"] == "ok" and r["shape"] == shape
        }
        dtypes = list(dict.fromkeys(dtype for dtype, _ in mine))
        if not dtypes:
            return []
        header = ["dtype", *(t.header for t in targets)] + (["peak MB (fwd)"] if memory else [])
        lines = [f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for dtype in dtypes:
            cells = [dtype, *(t.cell(mine.get((dtype, t.mode))) for t in targets)]
            fwd = mine.get((dtype, "fwd"))
            if memory and fwd is not None and fwd["peak_mem_mb"] is not None:
                per_row = fwd["peak_mem_mb"] * 2**20 / fwd["shape"]["N"]
                cells.append(f"{fwd['peak_mem_mb']:.3g} ({per_row:.0f} B/row)")
            elif memory:
                cells.append("—")
            lines.append("| " + " | ".join(cells) + " |")
        return lines + [""]

    return summary


@dataclasses.dataclass
class OpBench:
    """Everything op-specific about a benchmark; see the module docstring for the conventions."""

    op: str
    shape_dims: tuple[str, ...]
    make_inputs: Callable[[Case, int], Inputs]  # (case, seed) -> fresh random inputs, never zeros
    grad_inputs: tuple[str, ...]  # input names the backward modes differentiate
    loss: Callable[[Outputs, Inputs], torch.Tensor]  # scalar over whatever outputs are present
    bytes_moved: Callable[[Case], int]  # the minimum an ideal kernel must move
    truth: Callable[[Inputs], Outputs]  # float64 reference on float64 inputs
    check_fields: tuple[str, ...]  # outputs compared with the truth (when a provider has them)
    check_rows: Callable[[Case], int]  # leading rows compared with the truth
    tolerance_floor: Callable[[Case, str], float]  # (case, field or "grad:<input>") -> floor
    providers: list[Provider]
    ceilings: dict[str, Ceiling]
    ceiling_rows: dict[str, list[CeilingRow]]  # mode -> rows
    # Inputs shared by every row (an lm_head weight): never sliced for the truth, and their
    # gradients (sums over all rows) are checked only when check_rows covers every row.
    shared_inputs: tuple[str, ...] = ()
    precision_baseline: str = "eager"  # the plain implementation whose error sets tolerances
    baselines: tuple[str, ...] = ("eager", "compile")  # speedup columns of the markdown table
    notes: list[str] = dataclasses.field(default_factory=list)
    extra_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    # Markdown sections after the tables, e.g. an issue's targets (`targets_summary`).
    summaries: list[Callable[[list[dict]], list[str]]] = dataclasses.field(default_factory=list)
    # (provider, ceiling row) pairs whose time ratio a CPU target reads: also timed back to back
    # (`_paired_ratio`), since separately timed rows drift apart on a shared CPU.
    paired: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class Timing:
    """Warm-up and repetition policy. Repetitions aim at `target_s` of timed work per row."""

    warmup_s: float
    min_warmup: int
    target_s: float
    min_reps: int
    max_reps: int
    input_sets: int = 3  # rotation depth, lowered when memory is short
    # A shared CPU: wait up to quiet_wait_s for other processes to go under LOAD_WARN cores
    # before timing, and re-time up to `retries` times when they did not stay there. Waiting
    # and re-timing stop once they have cost quiet_budget_s in the sweep: past that, a busy
    # machine gets flagged rows rather than an endless run.
    quiet_wait_s: float = 0.0
    retries: int = 0
    quiet_budget_s: float = 0.0

    @staticmethod
    def default(device: torch.device, quick: bool) -> Timing:
        if device.type == "cuda":
            return Timing(0.05, 5, 0.1 if quick else 0.4, 10, 100 if quick else 300)
        return Timing(
            0.1, 2, 0.3 if quick else 1.0, 3 if quick else 5, 20 if quick else 50,
            quiet_wait_s=30.0, retries=2, quiet_budget_s=60.0 if quick else 180.0,
        )  # fmt: skip


# ----------------------------------------------------------------------------- environment


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model name with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def device_kind(device: torch.device) -> str:
    """Short tag for file names: 'cpu' or e.g. 'cuda-h100-80gb-hbm3'."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().removeprefix("nvidia").strip()
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def installed_versions(*dists: str) -> dict[str, str]:
    """The installed versions of the named distributions (the peers' wheels), the absent ones
    left out: from their metadata, since a module need not have `__version__` (liger_kernel
    0.8.5 has none)."""
    from importlib import metadata

    found = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def versions(extra: Mapping[str, str] | None = None) -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import pg_kernels

        pg_version = pg_kernels.__version__
    except ImportError:
        pg_version = None
    out: dict[str, str | None] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "pg_kernels": pg_version,
        "cuda": torch.version.cuda,
    }
    out.update(extra or {})
    return out


# Environment variables that change what a run times: the C++ kernels' ISA (ATen's), huge
# pages and glibc's reuse of freed memory (pg_kernels' CPU backwards advise their gradients for
# huge pages, PyTorch's tensors take them only with THP_MEM_ALLOC_ENABLE=1: eager's backward
# moved 323 -> 104 ms with it, a 3x change of x eager), threads, and pg_kernels' own switches.
RUN_ENV_PREFIXES = ("ATEN_", "THP_", "MALLOC_", "OMP_", "MKL_", "PGK_", "PG_KERNELS_", "TRITON_")


def run_environment() -> dict[str, str | None]:
    """What beside the versions changes a CPU timing: the vector ISA ATen runs and the C++ build
    pg_kernels loaded for it, the kernel's transparent huge page mode, and the variables of
    RUN_ENV_PREFIXES that are set."""
    from pg_kernels import _backend

    ext = _backend.cpu_extension()
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = None
    variables = {k: v for k, v in sorted(os.environ.items()) if k.startswith(RUN_ENV_PREFIXES)}
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pg_kernels_cpu_build": None if ext is None else ext.__name__,
        "transparent_hugepage": thp,
        "variables": " ".join(f"{k}={v}" for k, v in variables.items()) or None,
    }


def git_state() -> tuple[str | None, bool | None]:
    """(HEAD sha, whether tracked files other than benchmark results differ from it: the
    harness and bench scripts count, benchmarks/results and benchmarks/out do not)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    if os.environ.get("PGK_GIT_SHA"):  # a copy without .git (gpu_check.sh on a lent machine)
        return os.environ["PGK_GIT_SHA"], os.environ.get("PGK_GIT_DIRTY") == "1"
    try:
        sha = git("rev-parse", "HEAD")
        changed = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results",
            ":!benchmarks/out",
        )  # fmt: skip
        return sha, bool(changed)
    except (OSError, subprocess.CalledProcessError):
        return None, None


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- compile helper

_compiled: dict[Any, Callable] = {}


def compile_once(fn: Callable, key: Any) -> Callable:
    """`torch.compile(fn, dynamic=False)`, compiled afresh for each new `key` (dtype, shape).

    dynamo keys its cache on fn's code object, so successive shapes would pile up as
    recompiles, turn dynamic after the second, and past the recompile limit silently fall back
    to eager. Resetting on a new key gives each shape its own static compile; the inference and
    the training graph of one key share the compiled object.
    """
    if key not in _compiled:
        torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = torch.compile(fn, dynamic=False)
    return _compiled[key]


# ----------------------------------------------------------------------------- measuring


def _flush_buffer(device: torch.device) -> torch.Tensor | None:
    """A buffer twice the L2 size (at least 256 MiB), overwritten before every CUDA repetition."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return torch.empty(max(2 * l2, 256 << 20), dtype=torch.int8, device=device)


class _OtherLoad:
    """CPU cores used by everything but this process (plus hypervisor steal) over a window.

    On a small shared machine another job can double a CPU timing; this number says, per
    record, whether that happened. From /proc/stat (all CPUs) minus /proc/self/stat (this
    process, all threads). None where /proc is missing.
    """

    def __init__(self) -> None:
        self.start = self._read()
        self.t0 = time.perf_counter()

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        try:
            cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]  # user nice system irq softirq
            steal = cpu[7] if len(cpu) > 7 else 0
            return busy, steal, int(me[11]) + int(me[12])  # utime + stime of this process
        except (OSError, ValueError, IndexError):
            return None

    def cores(self) -> float | None:
        end, wall = self._read(), time.perf_counter() - self.t0
        if self.start is None or end is None or wall <= 0:
            return None
        busy, steal, mine = (e - s for e, s in zip(end, self.start))
        return max(0.0, (busy - mine + steal) / os.sysconf("SC_CLK_TCK") / wall)


def _measure(
    setup: Callable[[int], Any],
    timed: Callable[[Any], Any],
    device: torch.device,
    timing: Timing,
    flush: torch.Tensor | None,
) -> tuple[list[float], float | None]:
    """Warm up, then time `timed(setup(i))` over rotating i.

    Returns (per-repetition ms, cores used by other processes during the timed repetitions).
    `setup(i)` runs outside the timed region (it picks input set i % sets and, for bwd, runs
    the forward). CPU: perf_counter around each call (CPU ops are synchronous). CUDA: an event
    pair per repetition, L2 flushed before each, one synchronize at the end.
    """
    if device.type == "cuda":

        def run(i: int) -> tuple[torch.cuda.Event, torch.cuda.Event]:
            state = setup(i)
            flush.fill_(i & 0x7F)  # type: ignore[union-attr]  # evict L2 between reps
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = timed(state)
            end.record()
            del result, state
            return start, end

        def block(first: int, count: int) -> list[float]:
            events = [run(first + i) for i in range(count)]
            torch.cuda.synchronize(device)
            return [s.elapsed_time(e) for s, e in events]
    else:

        def block(first: int, count: int) -> list[float]:
            out = []
            for i in range(first, first + count):
                state = setup(i)
                t0 = time.perf_counter()
                result = timed(state)
                t1 = time.perf_counter()
                del result, state
                out.append((t1 - t0) * 1e3)
            return out

    # Python's GC pausing inside a timed region would add noise that is not the kernel's.
    gc.collect()
    gc.disable()
    try:
        warm: list[float] = []
        t_start = time.perf_counter()
        while len(warm) < timing.min_warmup or time.perf_counter() - t_start < timing.warmup_s:
            warm += block(len(warm), 1)
        est_ms = max(statistics.median(warm[-3:]), 1e-3)
        reps = int(min(timing.max_reps, max(timing.min_reps, timing.target_s * 1e3 / est_ms)))
        best: tuple[list[float], float | None] | None = None
        for attempt in range(1 + timing.retries):
            t_wait = time.perf_counter()
            _wait_until_quiet(min(timing.quiet_wait_s, timing.quiet_budget_s))
            load = _OtherLoad()
            times = block(len(warm), reps)
            other = load.cores()
            if best is None or (other or 0.0) < (best[1] or 0.0):
                best = (times, other)
            # The wait and any re-timing come out of the sweep's budget; the first timing is free.
            end = load.t0 if attempt == 0 else time.perf_counter()
            timing.quiet_budget_s -= end - t_wait
            if (other or 0.0) <= LOAD_WARN or timing.quiet_budget_s <= 0:
                break
        return best
    finally:
        gc.enable()


def _wait_until_quiet(max_wait_s: float, window_s: float = 0.5) -> None:
    """Sleep in short windows until other processes use at most LOAD_WARN cores (or time's up)."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        probe = _OtherLoad()
        time.sleep(window_s)
        cores = probe.cores()
        if cores is None or cores <= LOAD_WARN:
            return


@contextlib.contextmanager
def _native_stderr_muted():
    """Process-level stderr (fd 2) to /dev/null: torch's profiler prints two "USDT: ...
    profiler_start/stop" lines from C++ on every use, into the middle of the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak bytes held by torch's CPU allocator during fn() above the level at its start.

    Read from the profiler's allocation events (every allocation and free through the c10 CPU
    allocator, which eager ops, inductor's generated code and C++ extensions all use). Memory
    that bypasses the allocator (thread stacks, std::vector in a kernel) is not counted.
    None when this torch cannot report it.
    """
    try:
        from torch.profiler import ProfilerActivity, profile

        with (
            _native_stderr_muted(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            result = fn()
            del result
        events = [
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        ]
    except Exception:  # noqa: BLE001  (private profiler API; no number beats a wrong one)
        return None
    level = peak = 0
    for _, nbytes in sorted(events):
        level += nbytes
        peak = max(peak, level)
    return peak


def _peak_bytes(
    setup: Callable[[], Any], timed: Callable[[Any], Any], device: torch.device
) -> int | None:
    """Peak extra memory of one timed-region call (inputs and forward state excluded)."""
    state = setup()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = timed(state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak
    return _cpu_peak_bytes(lambda: timed(state))


# The precision baseline (plain PyTorch at the input precision) is checked against this
# relative error instead of against itself: 8 bf16 ulps (2^-5), far above what a correct plain
# implementation errs by on the benchmarks' data (~2^-8 for bf16 gradients), far below a
# wrong one, whose error would otherwise widen every provider's tolerance.
BASELINE_MAX_ERR = 2.0**-5


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf for any NaN / inf or a shape mismatch."""
    if out.shape != ref.shape:
        return math.inf
    out, ref = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out).all()):  # the benchmark's inputs give finite truths
        return math.inf
    denom = float(ref.norm())
    num = float((out - ref).norm())
    return num / denom if denom > 0 else num


# ----------------------------------------------------------------------------- the sweep


class _GroupState:
    """Input sets, ceiling timings and truth of one (dtype, shape) group."""

    def __init__(self, bench: OpBench, case: Case, timing: Timing, notes: list[str]) -> None:
        first = bench.make_inputs(case, 0)
        set_bytes = sum(t.numel() * t.element_size() for t in first.values())
        # Rotation defeats warm caches; keep its copies under a quarter of free memory so the
        # providers' own temporaries still fit.
        fit = _available_bytes(case.device) // 4 // max(set_bytes, 1)
        self.n_sets = int(max(1, min(timing.input_sets, fit)))
        if self.n_sets < timing.input_sets:
            notes.append(
                f"{case.dtype_name} {case.shape_str}: {self.n_sets} input set(s) in rotation "
                f"(memory); L2 flush on CUDA keeps caches cold anyway"
            )
        self.sets = [first] + [bench.make_inputs(case, s) for s in range(1, self.n_sets)]
        self.set_bytes = set_bytes
        self.ceiling_ms: dict[str, list[float]] = {}
        self.ceiling_mem: dict[str, int | None] = {}
        self.ceiling_load: dict[str, float | None] = {}
        self.truth: dict[Any, tuple[Outputs, dict[str, torch.Tensor]]] = {}
        self.baseline_err: dict[str, dict[str, float]] = {}  # mode kind -> field -> err


def _slice_for_truth(bench: OpBench, inputs: Inputs, k: int) -> Inputs:
    """The first k rows of every input, floats upcast to float64 (exact for bf16/fp32)."""
    out = {}
    for name, t in inputs.items():
        s = t.detach()[:k] if t.dim() >= 1 and name not in bench.shared_inputs else t.detach()
        if s.is_floating_point():
            s = s.double()
        if name in bench.grad_inputs:
            s = s.clone().requires_grad_(True)
        out[name] = s
    return out


def _checked_grads(bench: OpBench, case: Case) -> list[str]:
    """Inputs whose gradient the check compares: shared ones only when every row is checked."""
    all_rows = bench.check_rows(case) >= case.shape[bench.shape_dims[0]]
    return [n for n in bench.grad_inputs if all_rows or n not in bench.shared_inputs]


def _truth(
    bench: OpBench, g: _GroupState, case: Case, fields: tuple[str, ...], grad: bool
) -> tuple[Outputs, dict[str, torch.Tensor]]:
    key = (fields, grad)
    if key not in g.truth:
        k = bench.check_rows(case)
        sl = _slice_for_truth(bench, g.sets[0], k)
        with torch.enable_grad():
            out = bench.truth(sl)
            grads: dict[str, torch.Tensor] = {}
            if grad:
                loss = bench.loss({f: out[f] for f in fields}, sl)
                names = _checked_grads(bench, case)
                gs = torch.autograd.grad(loss, [sl[n] for n in names])
                grads = {f"grad:{n}": gr.detach() for n, gr in zip(names, gs)}
        g.truth[key] = ({f: v.detach() for f, v in out.items()}, grads)
    return g.truth[key]


def _run_provider_once(
    bench: OpBench, fn: Callable, inputs: Inputs, grad: bool
) -> tuple[Outputs, dict[str, torch.Tensor]]:
    if not grad:
        with torch.no_grad():
            return fn(inputs), {}
    with torch.enable_grad():
        out = fn(inputs)
        loss = bench.loss(out, inputs)
        names = list(bench.grad_inputs)
        gs = torch.autograd.grad(loss, [inputs[n] for n in names])
    return out, {f"grad:{n}": gr for n, gr in zip(names, gs)}


def _check(
    bench: OpBench, g: _GroupState, case: Case, prov: Provider, fn: Callable, inputs: Inputs
) -> tuple[bool, dict[str, float], dict[str, float]]:
    """Compare one full-size run's first rows with the float64 truth; returns (ok, errs, tols)."""
    grad = case.needs_grad
    out, grads = _run_provider_once(bench, fn, inputs, grad)
    fields = tuple(f for f in bench.check_fields if f in out)
    truth_out, truth_grads = _truth(bench, g, case, fields, grad)
    k = bench.check_rows(case)
    errs = {f: _rel_err(out[f][:k], truth_out[f]) for f in fields}
    # A shared input's gradient (the lm_head weight, no row dim) is whole on both sides: its
    # truth exists only when every row was checked (`_checked_grads`).
    errs.update(
        {
            n: _rel_err(gr if n[len("grad:") :] in bench.shared_inputs else gr[:k], truth_grads[n])
            for n, gr in grads.items()
            if n in truth_grads
        }
    )
    kind = "grad" if grad else "fwd"
    if prov.name == bench.precision_baseline and all(e <= BASELINE_MAX_ERR for e in errs.values()):
        g.baseline_err[kind] = errs
    # flash-attention's rule: at most twice the error of the plain implementation at the input
    # precision (measured on the same data), plus a small floor. A baseline over
    # BASELINE_MAX_ERR (or NaN) is not recorded: the floor alone then bounds the others. No
    # provider passes with a non-finite error of its own.
    # The forward fields of fwd+bwd are the forward's: the fwd run's baseline errors stand in
    # where the baseline has none of its own here (out of memory with its autograd graph).
    base = {**g.baseline_err.get("fwd", {}), **g.baseline_err.get(kind, {})}
    tols = {f: 2 * base.get(f, 0.0) + bench.tolerance_floor(case, f) for f in errs}
    if prov.name == bench.precision_baseline:  # its own bound is no check: a sanity ceiling
        tols = {f: BASELINE_MAX_ERR for f in errs}
    ok = bool(errs) and all(math.isfinite(errs[f]) and errs[f] <= tols[f] for f in errs)
    return ok, errs, tols


def _clone_sets(sets: list[Inputs]) -> list[Inputs]:
    return [
        {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in s.items()} for s in sets
    ]


def _base_record(case: Case, provider: str, env: dict) -> dict:
    return {
        "op": case.op,
        "mode": case.mode,
        "provider": provider,
        "dtype": case.dtype_name,
        "shape": dict(case.shape),
        "status": "ok",
        "ms": None,
        "ms_spread": None,
        "reps": None,
        "bytes": None,
        "gbps": None,
        "ceiling_gbps": None,
        "pct_of_ceiling": None,
        "peak_mem_mb": None,
        "speedup_vs": {},
        "check": None,
        "other_load": None,
        "device": env["device"],
        "versions": env["versions"],
        "git_sha": env["git_sha"],
    }


def _fill_time(rec: dict, times: list[float], nbytes: int) -> None:
    ms = statistics.median(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [ms] * 4
    rec.update(
        ms=ms,
        ms_spread={"p20": q[0], "p80": q[3], "min": min(times), "max": max(times)},
        reps=len(times),
        bytes=nbytes,
        gbps=nbytes / (ms * 1e-3) / 1e9,
    )


class CutShort(BaseException):
    """SIGTERM during a sweep (a time limit: benchmarks/gpu_check.sh runs each benchmark under
    `timeout`): the sweep stops and the rows timed so far are written. A BaseException, so that
    no provider's `except Exception` takes it for the provider's own failure."""


def _cut_short(signum, frame):
    raise CutShort


def run_sweep(
    bench: OpBench,
    cases: list[Case],
    timing: Timing,
    providers: Sequence[str] | None = None,
    progress: bool = True,
) -> tuple[list[dict], list[str], dict]:
    """Check, time and measure every (case, provider) and ceiling; returns (records, notes, env)."""
    from tqdm import tqdm

    notes = list(bench.notes)
    sha, dirty = git_state()
    device = cases[0].device
    env = {
        "device": device_name(device),
        "versions": versions(bench.extra_versions),
        "git_sha": sha,
        "git_dirty": dirty,
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "environment": run_environment(),
    }
    selected = [
        p for p in bench.providers if (not p.opt_in if providers is None else p.name in providers)
    ]
    unknown = sorted(set(providers or ()) - {p.name for p in bench.providers})
    if unknown:
        notes.append(f"not providers of {bench.op} (not run): {', '.join(unknown)}")
    # The precision baseline runs first in each mode: its error sets the others' tolerance.
    order = sorted(selected, key=lambda p: p.name != bench.precision_baseline)
    groups: dict[tuple, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    total = sum(
        len([p for p in order if c.mode in p.modes]) + len(bench.ceiling_rows.get(c.mode, []))
        for c in cases
    )
    bar = tqdm(total=total, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    flush = _flush_buffer(device)
    records: list[dict] = []
    skipped: set[tuple[str, str]] = set()
    done: dict[str, dict] = {}
    mine: dict[str, dict] = {}
    on_term = signal.signal(signal.SIGTERM, _cut_short)
    try:
        for group_cases in groups.values():
            g = _GroupState(bench, group_cases[0], timing, notes)
            for case in group_cases:
                done: dict[str, dict] = {}
                for prov in order:
                    if case.mode not in prov.modes:
                        continue
                    bar.set_postfix_str(
                        f"{case.mode} {case.dtype_name} {case.shape_str} {prov.name}"
                    )
                    rec = _time_provider(bench, g, case, prov, timing, flush, env, notes, skipped)
                    if rec is not None:
                        done[prov.name] = rec
                    bar.update(1)
                built = {name: rec.pop("_fn") for name, rec in done.items() if "_fn" in rec}
                # Report in the declared order, whatever order the check needed.
                mine = {p.name: done.pop(p.name) for p in selected if p.name in done}
                for row in bench.ceiling_rows.get(case.mode, []):
                    bar.set_postfix_str(
                        f"{case.mode} {case.dtype_name} {case.shape_str} {row.name}"
                    )
                    mine[row.name] = _time_ceiling_row(bench, g, case, row, timing, flush, env)
                    bar.update(1)
                records += mine.values()
                for prov_name, row_name in bench.paired if device.type == "cpu" else ():
                    rec, fn = mine.get(prov_name), built.get(prov_name)
                    row = next((r for r in bench.ceiling_rows.get(case.mode, [])
                                if r.name == row_name), None)  # fmt: skip
                    if rec is None or fn is None or row is None or rec["status"] != "ok":
                        continue
                    rec.setdefault("paired_vs", {})[row_name] = _paired_ratio(
                        bench, g, case, fn, row, timing
                    )
                del built
            del g
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except CutShort:
        # The rows of the case being timed that are finished: kept, without their callables.
        for rec in (*mine.values(), *done.values()):
            rec.pop("_fn", None)
            if not any(rec is r for r in records):
                records.append(rec)
        env["cut_short"] = True
        notes.append(
            f"cut short by SIGTERM (a time limit) after {len(records)} rows: the rest not run"
        )
    finally:
        signal.signal(signal.SIGTERM, on_term)
        bar.close()
    _fill_ratios(bench, records)
    return records, notes, env


def _time_provider(
    bench: OpBench,
    g: _GroupState,
    case: Case,
    prov: Provider,
    timing: Timing,
    flush: torch.Tensor | None,
    env: dict,
    notes: list[str],
    skipped: set[tuple[str, str]],
) -> dict | None:
    """Check, time and measure one provider on one case; None when it does not apply."""
    for s in g.sets:
        for n in bench.grad_inputs:
            s[n].requires_grad_(case.needs_grad)
    rec = _base_record(case, prov.name, env)
    try:
        fn = prov.build(case)
    except Skip as e:
        if (prov.name, str(e)) not in skipped:
            skipped.add((prov.name, str(e)))
            notes.append(f"{prov.name}: skipped ({e})")
        return None
    except Exception as e:  # noqa: BLE001
        rec["status"] = "failed"
        rec["error"] = f"build: {type(e).__name__}: {e}"[:500]
        return rec
    try:
        sets = _clone_sets(g.sets) if prov.mutates_inputs else g.sets
        check_input = _clone_sets(sets[:1])[0] if prov.mutates_inputs else sets[0]
        ok, errs, tols = _check(bench, g, case, prov, fn, check_input)
        del check_input
        rec["check"] = {"rel_err": errs, "tol": tols, "rows": bench.check_rows(case)}
        bad = [f"{f} {errs[f]:.2e} > {tols[f]:.2e}" for f in errs if not errs[f] <= tols[f]]
        if not ok and prov.peer and errs and all(math.isfinite(e) for e in errs.values()):
            notes.append(
                f"{prov.name} {case.mode} {case.shape_str}: timed at its own precision, beyond "
                "pg_kernels' tolerance: " + ", ".join(bad)
            )
        elif not ok:
            rec["status"] = "failed"
            rec["error"] = "check against float64 truth failed: " + ", ".join(bad or ["no fields"])
            return rec
        setup, timed = _mode_fns(bench, case, fn, sets)
        rec["_fn"] = fn  # for _paired_ratio; run_sweep drops it
        times, rec["other_load"] = _measure(setup, timed, case.device, timing, flush)
        _fill_time(rec, times, bench.bytes_moved(case))
        peak = _peak_bytes(lambda: setup(0), timed, case.device)
        rec["peak_mem_mb"] = None if peak is None else peak / 2**20
    except torch.OutOfMemoryError:
        rec["status"] = "skipped"
        rec["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001  (a broken provider is a result, not a crash)
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
    finally:
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def _paired_ratio(
    bench: OpBench, g: _GroupState, case: Case, fn: Callable, row: CeilingRow, timing: Timing
) -> dict:
    """The provider's time over the ceiling row's (its parts run back to back), measured as
    pairs: each repetition times one provider call, then one call of every part, on the same
    input set, and the ratio is the median of the per-pair ratios. On a shared CPU, rows timed
    minutes apart see different neighbours (2x swings on the 2-core VMs); a pair sees the same.
    CPU only (synchronous calls). About 2 x target_s of calls, at least 31 pairs."""
    setup, timed = _mode_fns(bench, case, fn, g.sets)
    plain = [{k: v.detach() for k, v in s.items()} for s in g.sets]
    parts = [bench.ceilings[p] for p in row.parts]
    states = [[c.prepare(s) for c in parts] for s in plain]

    def against(i: int) -> None:
        with torch.no_grad():
            for c, st in zip(parts, states[i % len(states)]):
                c.run(st)

    gc.collect()
    gc.disable()
    try:
        ratios: list[float] = []
        t_end = time.perf_counter() + 2 * timing.target_s
        i = 0
        while len(ratios) < 31 or (time.perf_counter() < t_end and len(ratios) < timing.max_reps):
            state = setup(i)
            t0 = time.perf_counter()
            timed(state)
            t1 = time.perf_counter()
            against(i)
            ratios.append((t1 - t0) / (time.perf_counter() - t1))
            del state
            i += 1
    finally:
        gc.enable()
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"ratio": statistics.median(ratios), "q1": q[0], "q3": q[2], "pairs": len(ratios)}


def _mode_fns(
    bench: OpBench, case: Case, fn: Callable, sets: list[Inputs]
) -> tuple[Callable[[int], Any], Callable[[Any], Any]]:
    """(setup(i), timed(state)) for the case's mode; setup work is never timed."""
    names = list(bench.grad_inputs)
    if case.mode == "fwd":

        def timed_fwd(inputs: Inputs) -> Outputs:
            with torch.no_grad():
                return fn(inputs)

        return (lambda i: sets[i % len(sets)]), timed_fwd
    if case.mode == "bwd":

        def setup_bwd(i: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
            inputs = sets[i % len(sets)]
            with torch.enable_grad():
                loss = bench.loss(fn(inputs), inputs)
            return loss, [inputs[n] for n in names]

        return setup_bwd, lambda st: torch.autograd.grad(st[0], st[1])

    def timed_fwd_bwd(inputs: Inputs) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            loss = bench.loss(fn(inputs), inputs)
            return torch.autograd.grad(loss, [inputs[n] for n in names])

    return (lambda i: sets[i % len(sets)]), timed_fwd_bwd


def _time_ceiling_row(
    bench: OpBench,
    g: _GroupState,
    case: Case,
    row: CeilingRow,
    timing: Timing,
    flush: torch.Tensor | None,
    env: dict,
) -> dict:
    """Time the row's ceilings (each once per group, reused across modes) and sum them."""
    rec = _base_record(case, row.name, env)
    rec["role"] = row.role
    try:
        for part in row.parts:
            if part in g.ceiling_ms:
                continue
            ceil = bench.ceilings[part]
            plain = [{k: v.detach() for k, v in s.items()} for s in g.sets]
            states = [ceil.prepare(s) for s in plain]

            def timed(st: Any, run: Callable[[Any], Any] = ceil.run) -> Any:
                with torch.no_grad():
                    return run(st)

            g.ceiling_ms[part], g.ceiling_load[part] = _measure(
                lambda i, states=states: states[i % len(states)], timed, case.device, timing, flush
            )
            g.ceiling_mem[part] = _peak_bytes(lambda states=states: states[0], timed, case.device)
            del states, plain
        # Parts run back to back in a real kernel pair: add medians, and add spreads as a bound.
        per_part = [g.ceiling_ms[p] for p in row.parts]
        nbytes = sum(bench.ceilings[p].bytes(case) for p in row.parts)
        medians = [statistics.median(t) for t in per_part]
        _fill_time(rec, per_part[0] if len(per_part) == 1 else [sum(medians)], nbytes)
        if len(per_part) > 1:
            spreads = [
                statistics.quantiles(t, n=5, method="inclusive")
                if len(t) > 1
                else [statistics.median(t)] * 4
                for t in per_part
            ]
            rec["ms_spread"] = {
                "p20": sum(s[0] for s in spreads),
                "p80": sum(s[3] for s in spreads),
                "min": sum(min(t) for t in per_part),
                "max": sum(max(t) for t in per_part),
            }
            rec["reps"] = min(len(t) for t in per_part)
        loads = [g.ceiling_load[p] for p in row.parts]
        rec["other_load"] = None if None in loads else max(loads)
        mems = [g.ceiling_mem[p] for p in row.parts]
        rec["peak_mem_mb"] = None if None in mems else max(mems) / 2**20
    except torch.OutOfMemoryError:
        rec["status"] = "skipped"
        rec["error"] = "out of memory"
    return rec


def _fill_ratios(bench: OpBench, records: list[dict]) -> None:
    """pct_of_ceiling against the mode's memory ceiling row; speedup_vs every other ok row."""
    by_case: dict[tuple, list[dict]] = {}
    for r in records:
        by_case.setdefault((r["op"], r["mode"], r["dtype"], tuple(r["shape"].items())), []).append(
            r
        )
    for (_, mode, _, _), rows in by_case.items():
        memory = [row.name for row in bench.ceiling_rows.get(mode, []) if row.role == "memory"]
        ok = {r["provider"]: r for r in rows if r["status"] == "ok"}
        ceil = ok.get(memory[0]) if memory else None
        for r in rows:
            if r["status"] != "ok":
                continue
            if ceil is not None:
                r["ceiling_gbps"] = ceil["gbps"]
                r["pct_of_ceiling"] = 100.0 * r["gbps"] / ceil["gbps"]
            r["speedup_vs"] = {
                name: other["ms"] / r["ms"] for name, other in ok.items() if name != r["provider"]
            }


# ----------------------------------------------------------------------------- reporting


def _fmt(x: float | None, kind: str) -> str:
    if x is None:
        return "—"
    if kind == "ms":
        return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:.0f}"
    if kind == "gbps":
        return f"{x:.1f}" if x < 100 else f"{x:.0f}"
    if kind == "pct":
        return f"{x:.0f}%"
    if kind == "x":
        return f"{x:.2f}×"
    if kind == "mb":
        return f"{x:.3g}" if x >= 0.001 else "0"
    return str(x)


def markdown(bench: OpBench, records: list[dict], notes: list[str], meta: dict) -> str:
    """The comparison tables, one per (mode, dtype), plus a header with device and versions."""
    v = meta["versions"]
    lines = [
        f"# {bench.op} benchmark: {meta['device']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']} · runtime {meta['runtime_s']:.0f} s · git {meta['git_sha']}"
        + (" (tracked files modified, results aside)" if meta.get("git_dirty") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
        f"- temperature: {meta.get('temperature', 1.0):g}",
    ]
    if meta.get("torch_threads"):
        lines.append(f"- torch threads: {meta['torch_threads']}")
    run_env = meta.get("environment") or {}
    if any(val is not None for val in run_env.values()):
        lines.append(
            "- environment: "
            + ", ".join(f"{k} {val}" for k, val in run_env.items() if val is not None)
        )
    lines += [
        (
            "- ms: median over repetitions (p20–p80 beside it); GB/s: minimum bytes the op must "
            "move / median time; % ceil: GB/s over the mode's measured memory ceiling row; "
            "peak MB: extra memory of one timed call (MiB); ×X: ms(X) / ms(row), above 1 = "
            "faster than X."
        ),
        "",
    ]
    # A backward alone timed slower than forward + backward of the same case cannot both be
    # right: say so instead of printing the two as if they were.
    ms = {
        (r["provider"], r["dtype"], tuple(r["shape"].values()), r["mode"]): r["ms"]
        for r in records
        if r["status"] == "ok"
    }
    odd = sorted(
        f"{p} {dt} {'×'.join(map(str, sh))}"
        for (p, dt, sh, mode), t in ms.items()
        if mode == "bwd" and t > ms.get((p, dt, sh, "fwd+bwd"), math.inf)
    )
    if odd:
        notes = [
            *notes,
            f"bwd alone timed slower than fwd+bwd for {', '.join(odd)}: the two rows disagree "
            "(noise or load); re-run with the machine quiet before reading either",
        ]
    busy = [r for r in records if (r.get("other_load") or 0) > LOAD_WARN]
    if busy:
        worst = max(r["other_load"] for r in busy)
        notes = [
            *notes,
            f"{len(busy)} row(s) marked * were timed while other processes used more than "
            f"{LOAD_WARN} core on average (up to {worst:.2f}); treat them with care",
        ]
    for note in notes:
        lines.append(f"> {note}")
    if notes:
        lines.append("")
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in records))
    for mode in modes:
        floor_names = [row.name for row in bench.ceiling_rows.get(mode, []) if row.role == "floor"]
        for dt in dtypes:
            rows = [r for r in records if r["mode"] == mode and r["dtype"] == dt]
            if not rows:
                continue
            cols = [b for b in bench.baselines if any(r["provider"] == b for r in rows)]
            header = ["shape", "provider", "ms", "p20–p80", "GB/s", "% ceil", "peak MB"]
            header += [f"×{b}" for b in cols] + [
                f"×{f.removeprefix('ceiling:')}" for f in floor_names
            ]
            lines += [f"## {mode}, {dt}", "", "| " + " | ".join(header) + " |"]
            lines.append(
                "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"
            )
            for r in rows:
                shape = "×".join(str(x) for x in r["shape"].values())
                if r["status"] != "ok":
                    cells = [shape, r["provider"], r["status"].upper(), r.get("error", "")]
                    cells += [""] * (len(header) - len(cells))
                else:
                    sp = r["ms_spread"]
                    busy = (r.get("other_load") or 0) > LOAD_WARN
                    cells = [
                        shape,
                        r["provider"],
                        _fmt(r["ms"], "ms") + ("*" if busy else ""),
                        f"{_fmt(sp['p20'], 'ms')}–{_fmt(sp['p80'], 'ms')}",
                        _fmt(r["gbps"], "gbps"),
                        _fmt(r["pct_of_ceiling"], "pct"),
                        _fmt(r["peak_mem_mb"], "mb"),
                    ]
                    for b in cols + floor_names:
                        cells.append(
                            "" if b == r["provider"] else _fmt(r["speedup_vs"].get(b), "x")
                        )
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    for summary in bench.summaries:
        lines += summary(records)
    return "\n".join(lines).rstrip() + "\n"


HATCHES = ("//", "..", "\\\\", "xx", "--")  # one per ceiling row, so greys stay apart


def plot(bench: OpBench, records: list[dict], path: Path, title: str) -> None:
    """GB/s per provider per shape, one panel per (mode, dtype).

    Up to 4 shapes: grouped bars (ceilings hatched grey). More (the GPU sweep): one line per
    provider over the shapes (ceilings dashed grey), which stays readable at 16 shapes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    dtypes = list(dict.fromkeys(r["dtype"] for r in ok))
    if not modes:
        return
    providers = list(dict.fromkeys(r["provider"] for r in records))
    # Providers in colour, ceilings in greys, so the eye separates the two.
    real = [p for p in providers if not p.startswith("ceiling:")]
    ceils = [p for p in providers if p.startswith("ceiling:")]
    color = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(real)}
    color.update({p: str(0.3 + 0.45 * i / max(len(ceils) - 1, 1)) for i, p in enumerate(ceils)})
    shapes = list(dict.fromkeys(tuple(r["shape"].values()) for r in records))
    as_bars = len(shapes) <= 4
    width = min(14.0, max(5.0, (0.2 * len(providers) if as_bars else 0.5) * len(shapes) + 1.5))
    fig, axes = plt.subplots(
        len(modes), len(dtypes), figsize=(width * len(dtypes), 3.4 * len(modes) + 1.0),
        squeeze=False, sharey=True,
    )  # fmt: skip
    for i, mode in enumerate(modes):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            rows = [r for r in ok if r["mode"] == mode and r["dtype"] == dt]
            present = [p for p in providers if any(r["provider"] == p for r in rows)]
            bar_w = 0.8 / max(len(present), 1)
            for k, p in enumerate(present):
                points = [
                    (s_idx, r["gbps"], (r.get("other_load") or 0) > LOAD_WARN)
                    for s_idx, s in enumerate(shapes)
                    for r in rows
                    if r["provider"] == p and tuple(r["shape"].values()) == s
                ]
                xs, ys = [x for x, _, _ in points], [y for _, y, _ in points]
                is_ceil = p.startswith("ceiling:")
                if as_bars:
                    xs = [x - 0.4 + bar_w * (k + 0.5) for x in xs]
                    hatch = HATCHES[ceils.index(p) % len(HATCHES)] if is_ceil else None
                    ax.bar(
                        xs, ys, bar_w, color=color[p], label=p, hatch=hatch,
                        edgecolor="white" if is_ceil else None,
                    )  # fmt: skip
                else:
                    ax.plot(
                        xs, ys, color=color[p], label=p, marker="o", markersize=3,
                        linestyle="--" if is_ceil else "-", linewidth=1.2,
                    )  # fmt: skip
                for x, y, busy in zip(xs, ys, (b for _, _, b in points)):
                    if busy:  # timed under load, as the table's *
                        ax.annotate("*", (x, y), ha="center", va="bottom", fontsize=11)
            ax.set_title(f"{bench.op} {mode}, {dt}", fontsize=10)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(
                ["×".join(map(str, s)) for s in shapes], fontsize=8,
                rotation=0 if as_bars else 60, ha="center" if as_bars else "right",
            )  # fmt: skip
            ax.set_yscale("log")
            ax.grid(axis="y", which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("GB/s (minimum bytes / time)")
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    names = [p for p in providers if p in handles]
    fig.legend(
        [handles[k] for k in names], names, loc="lower center", ncol=min(len(names), 6),
        fontsize=8, frameon=False,
    )  # fmt: skip
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def parse_shape(text: str, dims: tuple[str, ...]) -> dict[str, int]:
    parts = re.split(r"[x,×]", text.strip())
    if len(parts) != len(dims) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"shape {text!r} is not {'x'.join(dims)} (e.g. 1024x32000)"
        )
    return dict(zip(dims, map(int, parts)))


def main(
    make_bench: Callable[[torch.device, float], OpBench],
    default_shapes: Callable[[torch.device, bool], list[dict[str, int]]],
    shape_dims: tuple[str, ...],
    op: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Command line of every bench_<op>.py: parse, sweep, print the table, write the files."""
    parser = argparse.ArgumentParser(description=f"Benchmark {op} (see benchmarks/README.md).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small subset, fewer repetitions")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="x".join(shape_dims))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--providers", nargs="+", default=None, help="only these (and ceilings)")
    parser.add_argument(
        "--out", default=str(REPO_ROOT / "benchmarks" / "out"),
        help="where the JSON, markdown and PNG go (default benchmarks/out, which git ignores; "
        "the committed reference runs live in benchmarks/results/<machine>/)",
    )  # fmt: skip
    parser.add_argument(
        "--tag", default=None, help="file name suffix (default: 'quick' with --quick)"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--temperature", type=float, default=1.0, metavar="T",
        help="softmax temperature of every provider (default 1; another value runs the "
        "kernels' division path and adds _t<T> to the file names)",
    )  # fmt: skip
    parser.add_argument(
        "--max-wait", type=float, default=None, metavar="S",
        help="CPU: seconds a sweep may spend waiting for a quiet machine and re-timing "
        "(default 180, 60 with --quick; 0 times at once; rows timed under load are marked *)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    shapes = (
        [parse_shape(s, shape_dims) for s in args.shapes]
        if args.shapes
        else default_shapes(device, args.quick)
    )
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        parser.error(f"--temperature must be finite and > 0, got {args.temperature}")
    bench = make_bench(device, args.temperature)
    cases = [
        Case(op, mode, DTYPES[dt], shape, device)
        for dt in args.dtypes
        for shape in shapes
        for mode in args.modes
    ]
    timing = Timing.default(device, args.quick)
    if args.max_wait is not None:
        timing.quiet_budget_s = max(0.0, args.max_wait)
    policy = dataclasses.asdict(timing)  # before the sweep spends the waiting budget
    if timing.quiet_budget_s > 0:
        print(
            f"timing on a shared CPU: other processes skew the numbers, so the sweep waits for "
            f"a quiet machine and re-times busy rows, up to {timing.quiet_budget_s:.0f} s in all "
            f"(--max-wait S; 0 times at once); rows still timed under load are marked *",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    records, notes, env = run_sweep(bench, cases, timing, args.providers, not args.no_progress)
    runtime = time.perf_counter() - t0
    meta = {
        "op": op,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        if argv is None
        else " ".join(argv),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runtime_s": runtime,
        "temperature": args.temperature,
        "timing": policy,
        **env,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag if args.tag is not None else ("quick" if args.quick else "")
    if args.temperature != 1.0:
        tag = "_".join(t for t in (tag, f"t{args.temperature:g}") if t)
    stem = f"{op}_{device_kind(device)}" + (f"_{tag}" if tag else "")
    md = markdown(bench, records, notes, meta)
    (out_dir / f"{stem}.md").write_text(md)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({**meta, "notes": notes, "records": records}, indent=1, default=str) + "\n"
    )
    plot(bench, records, out_dir / f"{stem}.png", f"{op} on {env['device']}")
    print(md)
    print(f"wrote {out_dir / stem}.{{json,md,png}} in {runtime:.0f} s", file=sys.stderr)
    if env.get("cut_short"):
        return 1
    return 0 if all(r["status"] != "failed" for r in records) else 1
