"""Test configuration: Triton runs under its interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton (or pg_kernels' Triton modules) is imported.
Without a CUDA build of torch there is no GPU, so the interpreter is the only way to run the
Triton kernels: on CPU tensors.
"""

import os
import tempfile

import torch

if torch.version.cuda is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's on-disk graph cache (/tmp/torchinductor_$USER, shared by every checkout on the
# machine) does not key on a custom op's fake: a graph compiled against another checkout's op
# can replay with stale output shapes. Each test session compiles into its own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pgk-inductor-"))

import pytest  # noqa: E402

from pg_kernels import _backend  # noqa: E402


def _kernel_backends() -> list:
    """(backend, device) pairs to test, each skipped with the reason it cannot run here."""
    pairs = [("cpu", "cpu"), ("triton", "cpu"), ("triton", "cuda"), ("cuda", "cuda")]
    params = []
    for backend, device in pairs:
        gpu_missing = device == "cuda" and not torch.cuda.is_available()
        why = (
            "no GPU" if gpu_missing else _backend.unavailable_reason(backend, torch.device(device))
        )
        marks = [pytest.mark.skip(reason=f"{backend} on {device}: {why}")] if why else []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
        params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


KERNEL_BACKENDS = _kernel_backends()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(params=KERNEL_BACKENDS)
def backend_device(request):
    return request.param


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Triton row blocking shrunk to 64-byte steps, 2 steps per program: V = 1000 fp32 becomes
    63 chunk programs per row, so the cross-program merges run on small test shapes."""
    from pg_kernels.triton import _common

    monkeypatch.setattr(_common, "STEP_BYTES", 64)
    monkeypatch.setattr(_common, "STEPS_PER_CHUNK", 2)
