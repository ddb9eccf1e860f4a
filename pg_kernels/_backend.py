"""Which kernels can run here, and which one serves a call.

Backends:
  "reference"  plain PyTorch (pg_kernels.reference), any device; always available.
  "cpu"        the C++ extension pg_kernels._C, CPU tensors.
  "triton"     Triton kernels, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
  "cuda"       the CUDA C++ extension pg_kernels._C_cuda, CUDA tensors.

Availability is data: `unavailable_reason(backend, device)` says why a backend cannot take
inputs on a device (None when it can); `resolve` uses it both for "auto" and for the error
raised when a user forces a backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

# What "auto" tries, per device type, in order.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def _load(module: str):
    """(module, None) when the compiled module imports, (None, reason) otherwise."""
    try:
        return importlib.import_module(module), None
    except ImportError as e:
        return None, f"not built or not importable ({e})"


def _cpu_status():
    ext, why = _load("pg_kernels._C")
    if ext is not None and ext.cpu_capability == "avx2":
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
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
    same signature (flat labels, per-row temperature, row layout ints).
    """
    if backend == "cpu":
        module = _CPU_EXT
    elif backend == "cuda":
        module = _CUDA_EXT
    elif backend == "triton":
        module = importlib.import_module(f"pg_kernels.triton.{op}")
    else:
        raise RuntimeError(f"{op}: no kernel for backend {backend!r}")
    return getattr(module, f"{op}_forward"), getattr(module, f"{op}_backward")


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
                else "CPU tensors need TRITON_INTERPRET=1 (set before importing pg_kernels)"
            )
        return f"no Triton kernels for {kind} tensors"
    if backend == "cuda":
        if kind != "cuda":
            return f"takes CUDA tensors, got {kind}"
        return _CUDA_REASON
    return f"unknown backend; choose one of {BACKENDS}"


def resolve(
    op: str, backend: str, device: torch.device, kernels: tuple[str, ...] | None = None
) -> str:
    """The backend that serves `op` for tensors on `device`; raises if a forced one cannot.

    `kernels` lists the backends that have a kernel for `op` (default: all); "reference" always
    serves.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")

    def reason(candidate: str) -> str | None:
        if kernels is not None and candidate != "reference" and candidate not in kernels:
            return f"{op} has no {candidate} kernel"
        return unavailable_reason(candidate, device)

    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("reference",)):
            if reason(candidate) is None:
                return candidate
        return "reference"
    why = reason(backend)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} cannot run here: {backend}: {why}")
    return backend


def env_report() -> str:
    """A human-readable account of what pg_kernels can use on this machine, and why not."""
    lines = [
        f"pg_kernels on {platform.machine()} / Python {platform.python_version()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"GPU available: {torch.cuda.is_available()}, CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()})",
    ]
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
    return "\n".join(lines)
