"""Which kernels can run here, and which one serves a call.

Backends:
  "reference"  plain PyTorch (pg_kernels.reference), any device; always available.
  "cpu"        the C++ extension pg_kernels._C (pg_kernels._C_avx512 on AVX-512 CPUs), CPU
               tensors.
  "triton"     Triton kernels, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
  "cuda"       the CUDA C++ extension pg_kernels._C_cuda, CUDA tensors.

Availability is data: `KERNELS` says which backends have a kernel for each op,
`unavailable_reason(backend, device)` why a backend cannot take inputs on a device (None when
it can); `resolve` uses both for "auto" and for the error raised when a user forces a backend.
The tests generate their (op, backend, device) cases from the same data.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# What "auto" tries, per device type, in order. CUDA before Triton: token_stats' CUDA kernel was
# the faster at every shape an H200 timed (benchmarks/results/cuda-h200: bf16 16384 x 151936
# forward 1.46 ms against 2.41, N = 512 0.071 against 0.131, fwd+bwd 4.56 against 5.00); the
# other ops have Triton kernels only.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

# The kernel backends of each op ("reference" serves every op on any device).
KERNELS = {
    "token_stats": ("cpu", "triton", "cuda"),
    "kl_divergence": ("cpu", "triton"),
    "mismatch_stats": ("cpu", "triton"),
    "pruned_logprob": ("cpu", "triton"),
    "topk_kl": ("cpu", "triton"),
    "step_stats": ("cpu", "triton"),
}

# The kernel backends of ops that serve the public ones (not in the public ops' test matrix):
# mismatch_stats' and step_stats' sampled-token estimators.
INTERNAL_KERNELS = {"sampled_estimators": ("cpu", "triton")}

# The device types each kernel backend takes tensors of (when it is available at all; Triton
# takes CPU tensors only under its interpreter, see `unavailable_reason`).
DEVICE_TYPES = {"cpu": ("cpu",), "triton": ("cpu", "cuda"), "cuda": ("cuda",)}


def _load(module: str):
    """(module, None) when the compiled module imports, (None, reason) otherwise."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, f"not built or not importable ({e})"


def _cpu_status():
    """The CPU kernels built for the vector ISA ATen itself runs here: pg_kernels._C_avx512 where
    `torch.backends.cpu.get_cpu_capability()` is AVX512 (ATEN_CPU_CAPABILITY=avx2 selects the
    AVX2 build on such a CPU), else pg_kernels._C (AVX2, or generic code)."""
    isa = torch.backends.cpu.get_cpu_capability()
    if isa == "AVX512":
        ext, _ = _load("pg_kernels._C_avx512")
        if ext is not None:
            return ext, None
    ext, why = _load("pg_kernels._C")
    if ext is not None and ext.cpu_capability == "avx2":
        if isa not in ("AVX2", "AVX512"):
            why = (
                "the extension was built for AVX2, which this CPU lacks "
                "(rebuild with PG_KERNELS_CPU_CAPABILITY=default)"
            )
    return ext, why


# Probed once at import, so that backend choice inside torch.compile is plain data.
_CPU_EXT, _CPU_REASON = _cpu_status()
_CUDA_EXT, _CUDA_REASON = _load("pg_kernels._C_cuda")
_TRITON_REASON = (
    None if importlib.util.find_spec("triton") else "not installed (pip install triton)"
)
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_extension():
    return _CPU_EXT


def cuda_extension():
    return _CUDA_EXT


def triton_interpreted() -> bool:
    """Whether Triton kernels run in its interpreter (TRITON_INTERPRET=1 at import)."""
    return _TRITON_INTERPRETED


def launchers(op: str, backend: str):
    """The (forward, backward) launchers of `op` on a kernel backend.

    Every backend names them alike: `<op>_forward` / `<op>_backward` in pg_kernels._C ("cpu"),
    pg_kernels._C_cuda ("cuda") or the module pg_kernels.triton.<op> ("triton"), all with the
    same signature (flat labels, per-row temperature, row layout ints). GPU launchers come
    wrapped in a device guard (`_on_inputs_device`).
    """
    found = _LAUNCHERS.get((op, backend))
    if found is None:
        if backend == "cpu":
            module = _CPU_EXT
        elif backend == "cuda":
            module = _CUDA_EXT
        elif backend == "triton":
            module = importlib.import_module(f"pg_kernels.triton.{op}")
        else:
            raise RuntimeError(f"{op}: no kernel for backend {backend!r}")
        # A forward-only op (sampled_estimators) has no backward launcher.
        found = (getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward", None))
        if backend in ("triton", "cuda"):
            found = tuple(f and _on_inputs_device(f) for f in found)
        _LAUNCHERS[(op, backend)] = found
    return found


_LAUNCHERS: dict = {}  # (op, backend) -> (forward, backward), filled by `launchers`


def _on_inputs_device(launch):
    """`launch` run with its tensors' CUDA device as the current device.

    A Triton launch compiles for, and enqueues on the current stream of, the *current* device,
    whatever device its tensors are on; so does a raw CUDA launch. With tensors on cuda:1 while
    cuda:0 is current, the kernels would run on the wrong GPU (an illegal address at best). All
    tensors of one call share a device (the ops check it), so the first one decides. Entering
    the guard costs a device query, and nothing when the device is already current; the ops are
    custom ops, so torch.compile runs this inside their opaque kernels, never traces it.
    """

    @functools.wraps(launch)
    def guarded(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if device.type != "cuda":
            return launch(*args, **kwargs)
        with torch.cuda.device(device):
            return launch(*args, **kwargs)

    return guarded


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when `backend` can run on tensors of `device`, else why it cannot."""
    kind = device.type
    if backend == "reference":
        return None
    if backend == "cpu":
        if kind != "cpu":
            return f"takes CPU tensors, got {kind}"
        return _CPU_REASON
    if backend == "triton":
        if _TRITON_REASON is not None:
            return _TRITON_REASON
        if kind == "cuda":
            return None
        if kind == "cpu":
            return (
                None
                if triton_interpreted()
                else "CPU tensors only under its interpreter (TRITON_INTERPRET=1 set before "
                "triton is imported): a correctness path, not a fast one"
            )
        return f"no Triton kernels for {kind} tensors"
    if backend == "cuda":
        if kind != "cuda":
            return f"takes CUDA tensors, got {kind}"
        return _CUDA_REASON
    return f"unknown backend; choose one of {BACKENDS}"


def op_unavailable_reason(
    op: str, backend: str, device: torch.device, kernels: tuple[str, ...] | None = None
) -> str | None:
    """Why `backend` cannot serve `op` for tensors on `device` (None: it can): no kernel for the
    op (`kernels`, default `KERNELS[op]`, or all for a name not in it), or `unavailable_reason`.
    "reference" always has one."""
    if kernels is None:
        kernels = KERNELS.get(op)
    if kernels is not None and backend != "reference" and backend not in kernels:
        return f"{op} has no {backend} kernel"
    return unavailable_reason(backend, device)


def resolve(
    op: str, backend: str, device: torch.device, kernels: tuple[str, ...] | None = None
) -> str:
    """The backend that serves `op` for tensors on `device`; raises if a forced one cannot.

    `kernels` lists the backends that have a kernel for `op` (default: `KERNELS[op]`, or all
    for a name not in it); "reference" always serves.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")

    def reason(candidate: str) -> str | None:
        return op_unavailable_reason(op, candidate, device, kernels)

    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if reason(candidate) is None:
                return candidate
        return "reference"
    why = reason(backend)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run here: {backend}: {why}")
    return backend


# Where Linux says whether transparent huge pages are on (`always`, `madvise` or `never`).
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """Linux's transparent huge pages mode, the bracketed word of THP_MODE_FILE: `always`,
    `madvise` or `never`; None where there is no such file (not Linux, or no THP support)."""
    try:
        with open(THP_MODE_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _huge_pages_hint() -> str | None:
    """How the rest of a CPU training step avoids faulting in every large new tensor page by
    page (README, Performance), where huge pages are available to PyTorch's allocator but not
    asked for. pg_kernels' own backwards ask for them (`fresh_gradient`)."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1":
        return None
    if thp_mode() != "madvise":  # `always` gives them unasked; `never` not at all
        return None
    return (
        "CPU training: PyTorch's large new tensors are faulted in 4 KiB at a time (pg_kernels' "
        "backwards ask for 2 MiB pages themselves: token_stats' fp32 backward at 1024 x 32000 "
        "46-52 ms -> 16-20 ms); set THP_MEM_ALLOC_ENABLE=1 before starting Python for the rest "
        "of the step (README, Performance)"
    )


def env_report() -> str:
    """What pg_kernels can use on this machine, and why not, in one screen.

    One line per (device, backend): "ok" or the reason it cannot run, then the backend that
    `backend="auto"` picks on that device, then what to do about what does not run. Also
    `python -m pg_kernels`. Nothing here touches a GPU beyond asking whether one is visible.
    """
    lines = [
        f"pg_kernels on {platform.machine()} / Python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"GPU available: {torch.cuda.is_available()}, CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()})",
    ]
    if _CPU_EXT is not None:
        lines.append(f"C++ kernels: {_CPU_EXT.__name__} ({_CPU_EXT.cpu_capability})")
    try:
        import triton

        lines.append(f"triton {triton.__version__} (interpreter: {triton_interpreted()})")
    except ImportError:
        lines.append("triton: not installed")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    for device in devices:
        for backend in BACKENDS[1:]:
            why = unavailable_reason(backend, device)
            lines.append(f"  {device.type:4s} {backend:9s} {'ok' if why is None else why}")
        lines.append(f"  {device.type:4s} auto ->   {resolve('env_report', 'auto', device)}")
    hints = []
    if _CPU_REASON is not None:
        hints.append(
            "the C++ kernels: build them with `bash .ci/build_ext.sh python` (or pip "
            "install --no-build-isolation .); until then the reference serves CPU tensors"
        )
    if torch.version.cuda is None:
        hints.append("GPU kernels need a CUDA build of torch and a visible GPU")
    elif torch.cuda.is_available() and _CUDA_REASON is not None:
        hints.append(
            "the CUDA kernels: rebuild with the CUDA toolkit (CUDA_HOME) present; the "
            "Triton kernels serve CUDA tensors meanwhile"
        )
    if _TRITON_REASON is None and not triton_interpreted():
        hints.append(
            "the Triton kernels take CPU tensors only under the interpreter "
            "(TRITON_INTERPRET=1 before import; the test suite sets it): a correctness "
            "path, not a fast one"
        )
    huge_pages = _huge_pages_hint()
    if huge_pages is not None:
        hints.append(huge_pages)
    lines += [f"note: {h}" for h in hints]
    return "\n".join(lines)
