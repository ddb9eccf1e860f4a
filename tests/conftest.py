"""Test configuration: which kernel cases exist, and the Triton interpreter on CPU-only machines.

TRITON_INTERPRET must be set before triton (or pg_kernels' Triton modules) is imported.
Without a CUDA build of torch there is no GPU, so the interpreter is the only way to run the
Triton kernels: on CPU tensors.

Kernel cases. A test that takes `backend_device` runs once per (backend, device) pair that has
a kernel for its op (`pg_kernels._backend.KERNELS` and `DEVICE_TYPES`); one that takes
`op_backend_device` once per (op, backend, device) triple over every op. The op is the
closest `@pytest.mark.op(name)` (a test module sets it in `pytestmark`). Narrowing markers:
  @pytest.mark.gpu                    the test needs a GPU: CUDA-device cases only.
  @pytest.mark.backends(*names)       only these backends.
  @pytest.mark.cpu_backends(*names)   on CPU tensors, only these backends.
Every CUDA-device case carries the `gpu` mark. A case that cannot run here is skipped with a
reason that starts with one of the SKIP_* phrases below, so that a script can tell them apart:
on a GPU machine with the extensions built, no CUDA case may skip (but for SKIP_TWO_GPUS on a
one-GPU machine).

PGK_TEST_DEADLINE (epoch seconds; benchmarks/gpu_check.sh sets it shortly before a step's time
limit): tests that have not started by then skip with SKIP_DEADLINE, so that a run cut short
still ends normally, with its junit XML and tracebacks.
"""

import contextlib
import os
import tempfile
import time

import torch

if torch.version.cuda is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The interpreter with a GPU's arithmetic where numpy's differs (pg_kernels/triton/_common.py):
# fp32 ex2 within ~2 ulp (MUFU.EX2) and an fma rounded once (numpy's x * y + z rounds twice: a
# max's residual fma(m, c, -(m c)) is 0 there, not on a GPU). A test that GPU arithmetic
# leaves open opts out with the `numpy_arithmetic` fixture (CONTRIBUTING.md lists them).
os.environ.setdefault("PGK_EMULATE_GPU", "1")

# Inductor's on-disk graph cache (/tmp/torchinductor_$USER, shared by every checkout on the
# machine) does not key on a custom op's fake: a graph compiled against another checkout's op
# can replay with stale output shapes. Each test session compiles into its own cache.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="pgk-inductor-"))

import pytest  # noqa: E402

from pg_kernels import _backend  # noqa: E402

SKIP_NO_GPU = "no GPU"
SKIP_NO_CUDA_EXT = "CUDA extension not importable"
SKIP_NO_CPU_EXT = "C++ extension unavailable"
SKIP_NO_TRITON = "Triton unavailable"
SKIP_TWO_GPUS = "needs 2 GPUs"  # the only skip expected on a one-GPU machine
SKIP_DEADLINE = "deadline: not started before PGK_TEST_DEADLINE"
_DEADLINE = float(os.environ.get("PGK_TEST_DEADLINE") or "inf")


def skip_reason(backend: str, device: str) -> str | None:
    """Why a kernel case (backend on tensors of `device`) cannot run here; None when it can.

    Only asks torch.cuda.is_available(), which creates no CUDA context.
    """
    if device == "cuda" and not torch.cuda.is_available():
        return SKIP_NO_GPU
    why = _backend.unavailable_reason(backend, torch.device(device))
    if why is None:
        return None
    prefix = {"cuda": SKIP_NO_CUDA_EXT, "cpu": SKIP_NO_CPU_EXT, "triton": SKIP_NO_TRITON}
    return f"{prefix[backend]}: {why}"


def kernel_cases(ops, *, devices=("cpu", "cuda"), backends=None, cpu_backends=None):
    """[(op, backend, device)] for every kernel of `ops` on `devices`, in table order."""
    cases = []
    for op in ops:
        for backend in _backend.KERNELS[op]:
            if backends is not None and backend not in backends:
                continue
            for device in _backend.DEVICE_TYPES[backend]:
                if device not in devices:
                    continue
                if device == "cpu" and cpu_backends is not None and backend not in cpu_backends:
                    continue
                cases.append((op, backend, device))
    return cases


def _param(value, op, backend, device, with_op):
    marks = []
    why = skip_reason(backend, device)
    if why is not None:
        marks.append(pytest.mark.skip(reason=f"{why} ({op}, {backend} on {device})"))
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    ident = f"{op}-{backend}-{device}" if with_op else f"{backend}-{device}"
    return pytest.param(value, id=ident, marks=marks)


def pytest_generate_tests(metafunc):
    wants_pair = "backend_device" in metafunc.fixturenames
    wants_triple = "op_backend_device" in metafunc.fixturenames
    if not (wants_pair or wants_triple):
        return
    node = metafunc.definition
    op_mark = node.get_closest_marker("op")
    if op_mark is not None:
        ops = op_mark.args
    elif wants_triple:
        ops = tuple(_backend.KERNELS)
    else:
        raise pytest.UsageError(
            f"{node.nodeid}: backend_device needs @pytest.mark.op(<op>) on the test or module"
        )

    def narrowed(name):
        mark = node.get_closest_marker(name)
        return None if mark is None else mark.args

    cases = kernel_cases(
        ops,
        devices=("cuda",) if node.get_closest_marker("gpu") else ("cpu", "cuda"),
        backends=narrowed("backends"),
        cpu_backends=narrowed("cpu_backends"),
    )
    if wants_pair:
        params = [_param((b, d), o, b, d, len(ops) > 1) for o, b, d in cases]
        metafunc.parametrize("backend_device", params)
    else:
        params = [_param((o, b, d), o, b, d, True) for o, b, d in cases]
        metafunc.parametrize("op_backend_device", params)


def pytest_runtest_setup(item):
    if time.time() > _DEADLINE:
        pytest.skip(SKIP_DEADLINE)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (CUDA-device cases only)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "op(*names): the ops whose kernels parametrize the test")
    config.addinivalue_line("markers", "backends(*names): only these kernel backends")
    config.addinivalue_line("markers", "cpu_backends(*names): on CPU, only these backends")


@contextlib.contextmanager
def small_blocks(steps_per_chunk: int = 2):
    """Triton row blocking shrunk to 64-byte steps, `steps_per_chunk` per program (token_stats'
    and step_stats' forwards: half as many, of 4 such steps each): V = 1000 fp32 becomes 63
    chunk programs per row at 2, so the cross-program merges run on small test shapes. A
    context manager for tests/test_fuzz.py, whose hypothesis examples take no fixture."""
    from pg_kernels.triton import _common

    before = _common.STEP_BYTES, _common.STEPS_PER_CHUNK
    _common.STEP_BYTES, _common.STEPS_PER_CHUNK = 64, steps_per_chunk
    try:
        yield
    finally:
        _common.STEP_BYTES, _common.STEPS_PER_CHUNK = before


@pytest.fixture
def small_triton_blocks():
    """`small_blocks` for one test."""
    with small_blocks():
        yield


@pytest.fixture
def narrow_vocab_blocks(monkeypatch):
    """Vocabulary blocks of 64 columns at the tests' small D (`_linear.vocab_block_size`) for
    the *_from_hidden ops, so that a small vocabulary has several, the last ragged."""
    from pg_kernels.ops import _linear

    monkeypatch.setattr(_linear, "MIN_VOCAB_BLOCK", 64)


@pytest.fixture
def numpy_arithmetic(monkeypatch):
    """The Triton interpreter's own numpy arithmetic for one test (exps within ~0.5 ulp, fma
    rounded twice) instead of the GPU's the suite emulates: for the tests that GPU arithmetic
    leaves open until a GPU run decides them (CONTRIBUTING.md). Nothing to do on a GPU."""
    from pg_kernels.triton import _common

    if _common.EMULATE_GPU:
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder

        monkeypatch.setattr(_common, "EMULATE_GPU", tl.constexpr(False))
        monkeypatch.setattr(InterpreterBuilder, "create_fma", _common.NUMPY_FMA)


@pytest.fixture
def pair_excess_16bit(monkeypatch):
    """The Triton pair passes of 16-bit logits with the excess k (`_pair.EXCESS_16BIT`, as
    PGK_PAIR_EXCESS_16BIT=1 sets it; off by default until a GPU run times it, README, Testing,
    open class (1))."""
    from pg_kernels.triton import _pair

    monkeypatch.setattr(_pair, "EXCESS_16BIT", True)
