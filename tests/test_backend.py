"""The backend table (`_backend.KERNELS`), the launchers' device guard, and the kernel cases
conftest generates from that table."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import conftest
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import pg_kernels
from pg_kernels import _backend, _library

OPS = ("token_stats", "kl_divergence", "mismatch_stats", "pruned_logprob", "topk_kl", "step_stats")


def _exported_ops(module) -> set[str]:
    return {name.removesuffix("_forward") for name in dir(module) if name.endswith("_forward")}


def test_kernel_table_matches_the_kernels():
    """Every op is in the table; each compiled module exports exactly the ops the table gives it
    (the public ops' and the internal ones'), and every Triton op has its module."""
    assert set(_backend.KERNELS) == set(OPS)
    tables = {**_backend.KERNELS, **_backend.INTERNAL_KERNELS}
    for op, backends in tables.items():
        assert set(backends) <= {"cpu", "triton", "cuda"}, op
        has_triton = importlib.util.find_spec(f"pg_kernels.triton.{op}") is not None
        assert has_triton == ("triton" in backends), op
    for backend, ext in (("cpu", _backend.cpu_extension()), ("cuda", _backend.cuda_extension())):
        if ext is None:
            continue  # not built here (the CUDA extension needs a CUDA build of torch)
        want = {op for op, backends in tables.items() if backend in backends}
        assert _exported_ops(ext) == want, backend


@pytest.mark.skipif(_backend.cpu_extension() is None, reason="C++ extension unavailable")
def test_cpu_module_follows_atens_vector_isa():
    """The AVX-512 build serves where ATen runs AVX-512 and it was built, the AVX2 one elsewhere
    and under ATEN_CPU_CAPABILITY=avx2 (chosen at import: a fresh interpreter)."""
    import subprocess
    import sys

    avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and (
        importlib.util.find_spec("pg_kernels._C_avx512") is not None
    )
    ext = _backend.cpu_extension()
    if avx512:
        assert (ext.__name__, ext.cpu_capability) == ("pg_kernels._C_avx512", "avx512")
    else:
        assert ext.__name__ == "pg_kernels._C"
    assert f"C++ kernels: {ext.__name__}" in _backend.env_report()
    code = "import pg_kernels._backend as b; print(b.cpu_extension().__name__)"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["pg_kernels._C"]


@pytest.mark.parametrize(
    ("mode", "env", "hinted"),
    [
        ("always [madvise] never\n", None, True),
        ("always [madvise] never\n", "1", False),
        ("[always] madvise never\n", None, False),
        ("always madvise [never]\n", None, False),
        (None, None, False),  # no such file: not Linux
    ],
)
def test_env_report_names_huge_pages_where_they_would_help(monkeypatch, tmp_path, mode, env,
                                                           hinted):  # fmt: skip
    """Huge pages for a CPU step's large new tensors: hinted only where Linux gives them on
    request (`madvise`) and PyTorch's allocator does not ask (THP_MEM_ALLOC_ENABLE unset)."""
    path = tmp_path / "enabled"
    if mode is not None:
        path.write_text(mode)
    monkeypatch.setattr(_backend, "THP_MODE_FILE", str(path))
    if env is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", env)
    assert ("THP_MEM_ALLOC_ENABLE=1" in _backend.env_report()) == hinted


def _huge_page_kib(address: int) -> int:
    """AnonHugePages (KiB) of this process's mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(maxsplit=1)[0]
            if not head.endswith(":"):  # a mapping's header: "start-end perms ..."
                start, end = (int(a, 16) for a in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _cpu_gradients(op: str) -> list[torch.Tensor]:
    """The gradients of each tensor the op differentiates (logits, and the reference logits of
    kl_divergence and step_stats), by the C++ backward, at 2560 x 4096 fp32: 42 MB each, past
    glibc's largest mmap threshold (32 MiB), so each is a fresh mapping, never reused memory."""
    g = torch.Generator().manual_seed(0)
    n, v = 2560, 4096
    x, xr, xq = (torch.randn(n, v, generator=g) for _ in range(3))
    x.requires_grad_()
    xq.requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    lp = torch.randn(n, generator=g) - 8
    kw = {"backend": "cpu"}
    if op == "token_stats":
        loss, wrt = pg_kernels.token_stats(x, y, **kw).entropy.sum(), [x]
    elif op == "kl_divergence":
        loss, wrt = pg_kernels.kl_divergence(x, xq, **kw).sum(), [x, xq]
    elif op == "mismatch_stats":
        loss, wrt = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr, **kw).logprob.sum(), [x]
    elif op == "pruned_logprob":
        loss, wrt = pg_kernels.pruned_logprob(x, y, alpha=1e-3, **kw).logprob.sum(), [x]
    elif op == "topk_kl":
        ids = torch.rand(n, v, generator=g).topk(8, -1).indices
        ref = torch.randn(n, 8, generator=g).log_softmax(-1)
        loss, wrt = pg_kernels.topk_kl(x, ids, ref, **kw).sum(), [x]
    else:
        out = pg_kernels.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                                    **kw)  # fmt: skip
        loss, wrt = (out.token.entropy + out.kl).sum(), [x, xq]
    return list(torch.autograd.grad(loss, wrt))


@pytest.mark.parametrize("op", OPS)
def test_cpu_backwards_ask_for_huge_pages(op):
    """Each C++ backward advises its fresh gradient for transparent huge pages
    (`fresh_gradient`, gradient_output.h): faulting it in 4 KiB at a time was most of a CPU
    backward (token_stats fp32 at 1024 x 32000: 46-52 ms, 16-20 with 2 MiB pages). Where Linux
    gives huge pages only on request (`madvise`), a gradient not advised has none."""
    why = _backend.op_unavailable_reason(op, "cpu", torch.device("cpu"))
    if why is not None:
        pytest.skip(why)
    mode = _backend.thp_mode()
    if mode is None:
        pytest.skip("no transparent huge pages here (not Linux, or not in this kernel)")
    if mode == "never":
        pytest.skip("transparent huge pages are off here")
    for grad in _cpu_gradients(op):
        assert grad.is_contiguous() and grad.nbytes > 32 << 20
        # The advice splits the mapping at 2 MiB boundaries: read the part at the middle.
        assert _huge_page_kib(grad.data_ptr() + grad.nbytes // 2) > 0, (op, tuple(grad.shape))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_forcing_a_backend_without_a_kernel_names_it(backend):
    for op, backends in _backend.KERNELS.items():
        if backend not in backends:
            with pytest.raises(RuntimeError, match=f"{op} has no {backend} kernel"):
                _backend.resolve(op, backend, torch.device("cpu"))


def test_gpu_launchers_run_on_their_tensors_device(monkeypatch):
    """The launchers of the GPU backends make the tensors' device current around the launch
    (cuda:1 tensors while cuda:0 is current); CPU tensors pass straight through."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(torch.device(d))
        yield
        entered.append(None)

    monkeypatch.setattr(torch.cuda, "device", device)
    calls = []

    def launch(*args, **kwargs):
        calls.append((list(entered), args, kwargs))  # the guard state at launch time
        return "out"

    guarded = _backend._on_inputs_device(launch)
    with FakeTensorMode():  # CUDA tensors without a GPU: the guard reads only `.device`
        x = torch.empty(2, 3, device="cuda:1")
    assert guarded(None, x, 1.5, flag=True) == "out"
    assert calls[-1] == ([torch.device("cuda:1")], (None, x, 1.5), {"flag": True})
    assert entered == [torch.device("cuda:1"), None]  # entered for the launch, then left
    entered.clear()
    y = torch.empty(2, 3)
    assert guarded(y) == "out" and calls[-1][0] == [] and entered == []
    # The table's GPU backends come guarded; the C++ CPU kernels do not.
    forward, backward = _backend.launchers("token_stats", "triton")
    assert forward.__wrapped__.__module__ == "pg_kernels.triton.token_stats"
    assert backward.__name__ == "token_stats_backward"
    if _backend.cpu_extension() is not None:
        assert not hasattr(_backend.launchers("token_stats", "cpu")[0], "__wrapped__")


def test_kernel_cases_are_the_table():
    """conftest's cases: every kernel of every op on each device type it takes, nothing else;
    CUDA cases skip with exactly "no GPU" when there is none."""
    want = {
        (op, backend, device)
        for op, backends in _backend.KERNELS.items()
        for backend in backends
        for device in _backend.DEVICE_TYPES[backend]
    }
    assert set(conftest.kernel_cases(OPS)) == want
    assert ("kl_divergence", "cuda", "cuda") not in want  # no such kernel: no such case
    assert set(conftest.kernel_cases(OPS, devices=("cuda",))) == {c for c in want if c[2] == "cuda"}
    assert conftest.kernel_cases(["topk_kl"], cpu_backends=("cpu",)) == [
        ("topk_kl", "cpu", "cpu"),
        ("topk_kl", "triton", "cuda"),
    ]
    if not torch.cuda.is_available():
        for backend in ("triton", "cuda"):
            assert conftest.skip_reason(backend, "cuda") == conftest.SKIP_NO_GPU
    if _backend.cpu_extension() is not None:
        assert conftest.skip_reason("cpu", "cpu") is None


def test_eager_calls_skip_the_dispatcher_only_where_it_adds_nothing(monkeypatch):
    """`_library.call` runs an op's kernel straight (no ~12 us of Python dispatch) only in plain
    eager calls; a gradient to track, a dispatch mode, the profiler or fake tensors go through
    the dispatcher, and both paths give the same outputs in the labels' shape."""
    if _backend.cpu_extension() is None:
        pytest.skip("C++ extension unavailable")
    direct = []

    def count(name):
        op, kernel = _library._KERNELS[name]

        def counted(*args):
            direct.append(args[-1])  # the backend argument
            return kernel(*args)

        monkeypatch.setitem(_library._KERNELS, name, (op, counted))
        return op

    op = count("token_stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 17, generator=gen) * 4
    labels = torch.randint(0, 17, (3, 5), generator=gen)
    labels[1, 2] = -100
    backend = "cpu"

    def stats(logits):
        return pg_kernels.token_stats(logits, labels, temperature=0.7, backend=backend)

    eager = stats(x)
    assert direct == [backend]
    dispatched = op(x, labels, None, 0.7, -100, backend)
    assert len(direct) == 1  # torch.ops itself runs the registered kernel, not `call`'s
    for got, want in zip(eager, dispatched):
        assert got.shape == labels.shape and torch.equal(got, want)

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        stats(x)
    assert "pg_kernels.token_stats.default" in mode.ops
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        stats(x)
    assert any(e.name == "pg_kernels::token_stats" for e in prof.events())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast rules live in the dispatcher
        stats(x)
    # A negative-bit view (what the dispatcher resolves before a kernel sees the data).
    flipped = torch._neg_view(-x)
    assert flipped.is_neg()
    for got, want in zip(stats(flipped), eager):
        assert torch.equal(got, want)
    assert len(direct) == 1
    logits = x.clone().requires_grad_()
    out = stats(logits)
    assert out.logprob.requires_grad and len(direct) == 1
    # The backward (no create_graph: grad mode is off there) takes the direct path.
    count("token_stats_backward")
    (g,) = torch.autograd.grad(out.logprob.sum() + out.entropy.sum(), logits)
    assert len(direct) == 2 and torch.isfinite(g).all()
    with FakeTensorMode() as fake:
        fx, fl = fake.from_tensor(x), fake.from_tensor(labels)
        out = _library.call("token_stats", fx, fl, None, 1.0, -100, backend)
    assert out[0].shape == labels.shape and len(direct) == 2  # the op's fake ran


def test_row_alignment_the_triton_launchers_pass():
    """`row_align` / `rows_align`: the ALIGN a Triton launcher tells its kernel (every row offset
    a multiple of it; a claim too large is a misaligned vector access on a GPU, which the
    interpreter cannot show). 16 bytes in elements where the pointer and the strides allow it,
    else 1; the least over the tensors a kernel applies it to."""
    from pg_kernels.triton._common import row_align, rows_align

    bf16 = torch.zeros(4, 1001, dtype=torch.bfloat16)
    assert row_align(bf16[:, :1000].contiguous(), 1, 1000, 0) == 8
    assert row_align(bf16[:, :1000], 1, 1001, 0) == 1  # odd stride
    assert row_align(bf16[:, :1000].contiguous()[:, 1:], 1, 1000, 0) == 1  # odd start
    wide = torch.zeros(4, 1016, dtype=torch.bfloat16)
    assert row_align(wide[:, :1000], 1, 1016, 0) == 8  # 8 mod 16: `row_offset` tells Triton
    fp32 = torch.zeros(2, 3, 1002)
    assert row_align(fp32, 3, 3006, 1002) == 1  # 1002 % 4 != 0
    assert row_align(fp32[..., :1000], 3, 3006, 1002) == 1
    assert row_align(torch.zeros(2, 3, 1000), 3, 3000, 1000) == 4
    assert row_align(torch.zeros(2, 3, 1000, dtype=torch.float64), 3, 3000, 1000) == 2
    # A gradient (a tensor alone: fresh and contiguous, rows V apart) and the least of several.
    assert rows_align(torch.zeros(4, 1000, dtype=torch.bfloat16)) == 8
    assert rows_align(torch.zeros(4, 1001, dtype=torch.bfloat16)) == 1
    x = torch.zeros(4, 1000, dtype=torch.bfloat16)
    assert rows_align((x, 1, 1000, 0), torch.zeros(4, 1000)) == 4  # fp32: 4 elements
    assert rows_align((x, 1, 1000, 0), (bf16[:, :1000], 1, 1001, 0)) == 1
    assert rows_align((x, 1, 1000, 0), (None, 1, 0, 0)) == 8  # an input not given
