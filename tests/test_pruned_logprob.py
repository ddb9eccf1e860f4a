"""pruned_logprob against the float64 reference on every backend with a kernel, plus the op
contract and the properties of docs/math.md §6."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import pg_kernels
from pg_kernels import reference
from pg_kernels.testing import check_against_reference, make_labels, make_logits, near_one_hot

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DIFF = ("logprob",)
INF = float("inf")


pytestmark = pytest.mark.op("pruned_logprob")


@pytest.fixture
def bd(backend_device):
    """(backend, device) of a pruned_logprob kernel (conftest generates only pairs that exist)."""
    return backend_device


def _op(backend, alpha):
    def op(logits, labels, **kw):
        return pg_kernels.pruned_logprob(logits, labels, alpha=alpha, backend=backend, **kw)

    return op


def _ref(alpha):
    return functools.partial(reference.pruned_logprob, alpha=alpha)


def _shapes():
    """(N, V): odd vocab sizes and a real one."""
    return [(3, 7), (16, 1000), (8, 32003), (2, 151936)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [1e-3, 0.2])
def test_matches_reference(bd, dtype, alpha):
    backend, device = bd
    for i, (n, v) in enumerate(_shapes()):
        x = make_logits(n, v, dtype, device=device, seed=i)
        near_one_hot(x, slice(0, 1))
        y = make_labels((n,), v, device=device, seed=i)
        if n > 2:
            y[1] = x[1].float().argmax()  # a label surely in S
        out = check_against_reference(
            _op(backend, alpha), _ref(alpha), (x, y), {}, diff_fields=DIFF, seed=i
        )
        assert set(out) == {"logprob", "tail_mass", "grad0"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature(bd, dtype):
    backend, device = bd
    x = make_logits((2, 3), 1000, dtype, device=device, seed=1)
    y = make_labels((2, 3), 1000, device=device, seed=1)
    per_row = torch.rand(2, 3, dtype=torch.float64, device=device) * 2 + 0.25
    for temperature in (0.7, per_row):
        check_against_reference(
            _op(backend, 0.01), _ref(0.01), (x, y), {"temperature": temperature},
            diff_fields=DIFF,
        )  # fmt: skip


@pytest.mark.backends("triton")
def test_many_chunks_per_row(bd, small_triton_blocks):
    """Rows cut into many chunk programs (Triton; small blocks): the row max from the chunk
    maxes and the fixed-order sums of s_in / s_out match the reference, with the max in the
    last chunk and -inf runs covering whole chunks."""
    backend, device = bd
    for dtype in (torch.float32, torch.bfloat16):
        x = make_logits(4, 1000, dtype, device=device, seed=23)
        x[0, 990] = x[0].max() + 5.0  # the max in the last chunk: the threshold moves late
        x[1, 100:300] = -INF
        x[2, :500] = -INF
        y = make_labels((4,), 1000, device=device, seed=23)
        check_against_reference(
            _op(backend, 0.05), _ref(0.05), (x, y), {"temperature": 0.8}, diff_fields=DIFF
        )


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_of_odd_stride(bd, dtype, small_triton_blocks):
    """Rows that start at odd elements (a [4, 1001] tensor sliced to V = 1000: scalar loads on
    a GPU) give the same bits as the same rows contiguous, forward and gradient, with full
    blocks in every chunk (small blocks: the max kernel's unmasked full blocks and masked end),
    and the float64 reference's values."""
    backend, device = bd
    base = make_logits(4, 1001, dtype, device=device, seed=27)
    base[0, 990] = base[0].max() + 5.0  # the max in the last chunk
    base[1, 100:300] = -INF
    y = make_labels((4,), 1000, device=device, seed=27)

    def run(x):
        out = _op(backend, 0.05)(x, y, temperature=0.8)
        out.logprob.sum().backward()
        return out

    odd = base.clone().requires_grad_()
    dense = base[:, :1000].contiguous().requires_grad_()
    a, b = run(odd[:, :1000]), run(dense)
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(odd.grad[:, :1000], dense.grad)
    check_against_reference(
        _op(backend, 0.05), _ref(0.05), (base[:, :1000], y), {"temperature": 0.8},
        diff_fields=DIFF,
    )  # fmt: skip


def test_small_tail_beside_a_label_below_the_threshold(bd):
    """A label below the threshold joins S: its term is never in the tail's sum, so a small
    tail mass keeps its digits (Triton subtracted it from the tail's sum afterwards: 2.2e-9
    read as 3.5e-9 beside a label term of 5e-2)."""
    backend, device = bd
    x = torch.tensor([[10.0, 7.0, -10.0, -12.0], [10.0, 7.0, -10.0, -12.0]], device=device)
    y = torch.tensor([1, 0], device=device)
    out = pg_kernels.pruned_logprob(x, y, alpha=0.1, backend=backend)
    truth = reference.pruned_logprob(x.double(), y, alpha=0.1)
    assert out.in_safe.tolist() == [False, True]
    torch.testing.assert_close(out.tail_mass.double(), truth.tail_mass, rtol=1e-6, atol=0)


def test_tail_mass_of_large_scaled_logits(bd):
    """Logits of scale 150 at tau 0.07 and 0.19 (|z| up to ~6000): a tail mass of 2.9e-11
    from terms ~25 nats below the max. Summed from z = x / tau rounded (ulp(z) / 2 of each
    exponent, ~6e-5 at |z| ~ 1850), the C++ kernel's tail was 8.2e-5 off relative (the fuzzer:
    8.1e-5, plain fp32 PyTorch 2.4e-5); relative to the raw max, d = (x - m) / tau carries
    ulp(d) / 2: 4.8e-7 (C++), 1.1e-7 (Triton)."""
    backend, device = bd
    x = make_logits(2, 250, torch.float32, scale=150.0, seed=0)
    y = make_labels((2,), 250, seed=0)
    t = torch.tensor([0.0720832381, 0.1919880961], dtype=torch.float64)
    args, kw = (x.to(device), y.to(device)), {"temperature": t.to(device)}
    out = _op(backend, 1e-3)(*args, **kw)
    truth = reference.pruned_logprob(x.double(), y, alpha=1e-3, temperature=t)
    rel = float((out.tail_mass[1].double().cpu() - truth.tail_mass[1]) / truth.tail_mass[1])
    assert abs(rel) <= 2e-6, rel
    check_against_reference(_op(backend, 1e-3), _ref(1e-3), args, kw, diff_fields=DIFF)


def test_gradient_of_rows_far_from_zero(bd):
    """Logits 1000 + 3 randn (|z| up to ~1300, every entry in S): the gradient's error is
    relative to the row max, <= 1.7e-7 measured on both backends, where plain fp32's z - LSE_S
    carries ulp(z) / 2 (3.5e-5 at tau 0.78). With LSE_S saved in z units both backends had
    plain fp32's error here (3.5e-5)."""
    backend, device = bd
    g = torch.Generator().manual_seed(0)
    x = (1000 + 3 * torch.randn(8, 1000, generator=g, dtype=torch.float64)).float()
    y = torch.randint(0, 1000, (8,), generator=g)
    for tau in (0.78, 1.0, 2.3):
        xa = x.to(device).requires_grad_()
        out = _op(backend, 1e-30)(xa, y.to(device), temperature=tau)
        (grad,) = torch.autograd.grad(out.logprob.sum(), xa)
        xt = x.double().requires_grad_()
        truth = reference.pruned_logprob(xt, y, alpha=1e-30, temperature=tau)
        (want,) = torch.autograd.grad(truth.logprob.sum(), xt)
        err = float((grad.double().cpu() - want).abs().max())
        assert err <= 5e-7, (tau, err)


def _masked_rows(dtype, fill, device):
    """Row 0 masked whole with a huge finite fill (uniform: logprob log(1 / V)), row 1 masked
    but for 100 entries, rows 2-3 not masked."""
    lo = torch.finfo(dtype).min if fill == "finfo.min" else fill
    x = make_logits(4, 300, torch.float32, seed=3)
    x[0], x[1, 100:] = lo, lo
    return x.to(dtype).to(device), torch.tensor([5, 7, 299, 0], device=device)


MASKED_CASES = [(-1e30, 1.0), (-1e30, 0.6), ("finfo.min", 1.3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fill, temperature", MASKED_CASES, ids=str)
def test_rows_masked_whole_with_a_finite_fill_forward(bd, dtype, fill, temperature):
    """The forward of rows masked with a huge finite fill against the float64 truth, which
    takes z relative to the row max (z ~ -1e30 / tau has an fp64 ulp of ~1e14: the truth's own
    logprob of the row masked whole was 0 for log(1 / 300))."""
    backend, device = bd
    x, y = _masked_rows(dtype, fill, device)
    check_against_reference(
        _op(backend, 1e-3), _ref(1e-3), (x, y), {"temperature": temperature}, diff_fields=()
    )
    # Plain fp32 loses row 0 as the old truth did, so the rule's bound is vacuous there: log(1/V)
    # and a tail mass of 0 (every entry is in S), to fp32 rounding.
    out = _op(backend, 1e-3)(x, y, temperature=temperature)
    assert abs(float(out.logprob[0]) + math.log(300)) <= 1e-6
    assert float(out.tail_mass[0]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fill, temperature", MASKED_CASES, ids=str)
def test_rows_masked_whole_with_a_finite_fill(bd, dtype, fill, temperature):
    """The gradient of row 0, masked whole (every entry in S): (1[j = c] - 1 / V) / tau, to
    the rounding of the gradient's dtype (the rule's bound is vacuous there: plain fp32 loses
    the row, `test_rows_masked_whole_with_a_finite_fill_forward`)."""
    backend, device = bd
    x, y = _masked_rows(dtype, fill, device)
    xa = x.clone().requires_grad_()
    out = _op(backend, 1e-3)(xa, y, temperature=temperature)
    out.logprob[0].backward()
    want = torch.full((300,), -1 / (300 * temperature), dtype=torch.float64)
    want[5] += 1 / temperature
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(xa.grad[0].double().cpu(), want, rtol=2 * eps, atol=0.0)


def test_one_entry_rows_have_zero_gradient(bd):
    """V = 1: p = 1 on the label, so the log-prob and its gradient are exactly 0 (the float64
    truth and plain PyTorch have 0 too).

    The C++ backward recomputed z_c as x (1 / tau) - lse, which the compiler contracted into an
    fma: the exact product left z_c - lse at the rounding residual of z, p_c = 1 - ulp(z) / 2,
    and a gradient of -1.6e-5 at tau 0.135 (fuzzer; here up to 3e-5 at x = -161, tau 0.28).
    """
    backend, device = bd
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 1, generator=g, dtype=torch.float64) * 100).float().to(device)
    tau = torch.tensor([0.05, 0.135, 0.28, 0.7, 1.0, 1.26, 3.0, 20.0], dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long, device=device)
    for alpha in (1e-3, 0.2):
        xg = x.clone().requires_grad_()
        out = _op(backend, alpha)(xg, y, temperature=tau.to(device))
        (grad,) = torch.autograd.grad(out.logprob.sum(), xg)
        assert out.logprob.tolist() == [0.0] * 8
        assert grad.flatten().tolist() == [0.0] * 8
        check_against_reference(
            _op(backend, alpha), _ref(alpha), (x, y), {"temperature": tau.to(device)},
            diff_fields=("logprob",),
        )  # fmt: skip


def test_neg_inf_entries(bd):
    """-inf logits add 0; a label on a -inf logit has logprob -inf, is not in_safe, and its
    gradient is 1 at the label (p~_c = 0) minus p~ on S."""
    backend, device = bd
    v = 70000  # several CPU chunks; the first all -inf in row 1
    x = make_logits(4, v, torch.float32, device=device, seed=2)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    x[mask.to(device)] = -INF
    x[1, : v // 2] = -INF
    x[2, 5] = -INF
    y = torch.tensor([0, v - 1, 5, 17], device=device)
    x[[0, 1, 3], y[[0, 1, 3]]] = x[[0, 1, 3]].amax(-1) - 2.0  # keep those labels finite
    check_against_reference(_op(backend, 0.05), _ref(0.05), (x[[0, 1, 3]], y[[0, 1, 3]]), {},
                            diff_fields=DIFF)  # fmt: skip
    xg = x.clone().requires_grad_()
    out = _op(backend, 0.05)(xg, y)
    assert out.logprob[2] == -INF and not out.in_safe[2] and 0 <= out.tail_mass[2] < 1
    out.logprob[2].backward()
    xr = x.clone().requires_grad_()
    reference.pruned_logprob(xr, y, alpha=0.05).logprob[2].backward()
    assert xg.grad[2, 5] == 1.0
    torch.testing.assert_close(xg.grad.double(), xr.grad.double(), rtol=0, atol=1e-6)


def test_invalid_rows_stay_local(bd):
    backend, device = bd
    x = make_logits(5, 1000, torch.float32, device=device, seed=3)
    y = make_labels((5,), 1000, device=device, seed=3, ignore_index=-7)
    clean = _op(backend, 0.1)(x, y)
    x[1, 10] = float("nan")
    x[2, 999] = INF
    x[3] = -INF
    xg = x.clone().requires_grad_()
    out = _op(backend, 0.1)(xg, y)
    for name in ("logprob", "tail_mass"):
        got = getattr(out, name)
        assert torch.isnan(got[1:4]).all(), name
        assert torch.equal(got[[0, 4]], getattr(clean, name)[[0, 4]]), name
    assert not out.in_safe[1:4].any() and torch.equal(out.in_safe[[0, 4]], clean.in_safe[[0, 4]])
    out.logprob.sum().backward()
    assert torch.isnan(xg.grad[1:4]).all() and torch.isfinite(xg.grad[[0, 4]]).all()


def test_ignore_index_rows(bd):
    backend, device = bd
    x = make_logits(4, 1000, torch.float32, device=device, seed=4)
    y = torch.tensor([3, -1, 999, -1], device=device)
    xg = x.clone().requires_grad_()
    out = _op(backend, 0.1)(xg, y, ignore_index=-1)
    assert (out.logprob[[1, 3]] == 0).all() and (out.tail_mass[[1, 3]] == 0).all()
    assert not out.in_safe[[1, 3]].any()
    out.logprob.sum().backward()
    assert (xg.grad[[1, 3]] == 0).all() and (xg.grad[[0, 2]] != 0).any()


def test_alpha_to_zero_equals_full_logprob(bd):
    """With alpha = 1e-30 and moderate logits, S is the whole vocabulary."""
    backend, device = bd
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x = make_logits(6, 32003, dtype, device=device, seed=5)
        y = make_labels((6,), 32003, device=device, seed=5)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = _op(backend, 1e-30)(xa, y)
        full = pg_kernels.token_stats(xb, y, backend=backend)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out.logprob, full.logprob, rtol=0, atol=tol)
        keep = y != -100
        assert out.in_safe[keep].all() and (out.tail_mass == 0).all()
        out.logprob.sum().backward()
        full.logprob.sum().backward()
        grad_tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(xa.grad.double(), xb.grad.double(), rtol=2**-7, atol=grad_tol)


def test_properties(bd):
    """logprob >= the full log-prob; tail_mass in [0, 1); both monotone in alpha; in_safe is
    the threshold test; tail_mass = 1 - exp(LSE_S - L)."""
    backend, device = bd
    x = make_logits(32, 1000, torch.float32, device=device, seed=6, scale=4.0)
    y = make_labels((32,), 1000, device=device, seed=6)
    keep = y != -100
    full = pg_kernels.token_stats(x, y, backend=backend)
    prev = None
    for alpha in (1e-8, 1e-4, 1e-2, 0.1, 0.5, 0.9, 0.999999):
        out = _op(backend, alpha)(x, y)
        assert (out.logprob[keep] >= full.logprob[keep] - 1e-6).all(), alpha
        assert ((out.tail_mass >= 0) & (out.tail_mass < 1)).all(), alpha
        m = x.amax(-1)
        z_c = x.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        assert torch.equal(out.in_safe, keep & (z_c >= m + math.log(alpha))), alpha
        lse_safe = z_c.double() - out.logprob.double()
        torch.testing.assert_close(
            out.tail_mass[keep].double(),
            -torch.expm1(lse_safe - full.lse.double())[keep],
            rtol=0,
            atol=1e-5,
        )
        if prev is not None:
            assert (out.logprob[keep] >= prev.logprob[keep] - 1e-6).all(), alpha
            assert (out.tail_mass >= prev.tail_mass - 1e-6).all(), alpha
        prev = out


def test_strided_input_is_read_in_place(bd):
    backend, device = bd
    base = make_logits((3, 5), 1000, torch.float32, device=device, seed=7)
    y = make_labels((3, 4), 1000, device=device, seed=7)
    view = base[:, :-1]
    assert not view.is_contiguous()
    a, b = _op(backend, 0.01)(view, y), _op(backend, 0.01)(view.contiguous(), y)
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    rows = base.view(15, 1000)[::2]
    labels = y.reshape(-1)[:8]
    a, b = _op(backend, 0.01)(rows, labels[::1]), _op(backend, 0.01)(rows.contiguous(), labels)
    assert torch.equal(a.logprob, b.logprob)
    strided_labels = torch.stack([labels, labels], -1)[:, 0]  # a 1-d non-contiguous labels view
    assert torch.equal(_op(backend, 0.01)(rows, strided_labels).logprob, a.logprob)
    check_against_reference(_op(backend, 0.01), _ref(0.01), (view, y), {}, diff_fields=DIFF)


def test_int32_labels_and_shift_invariance(bd):
    backend, device = bd
    x = make_logits(6, 1000, torch.float32, device=device, seed=8)
    y = make_labels((6,), 1000, device=device, seed=8)
    a, b = _op(backend, 0.01)(x, y), _op(backend, 0.01)(x, y.int())
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = _op(backend, 0.01)(x + 11.0, y)
    torch.testing.assert_close(c.logprob, a.logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(c.tail_mass, a.tail_mass, rtol=0, atol=1e-5)


def test_deterministic_and_batch_invariant(bd):
    backend, device = bd
    v = 40000
    x = make_logits(9, v, torch.bfloat16, device=device, seed=9)
    y = make_labels((9,), v, device=device, seed=9)

    def run(xs, ys):
        xg = xs.clone().requires_grad_()
        out = _op(backend, 0.001)(xg, ys)
        out.logprob.sum().backward()
        return out, xg.grad

    (a, ga), (b, gb) = run(x, y), run(x, y)
    alone, g_alone = run(x[4:5], y[4:5])
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name)[4:5], getattr(alone, name)), name
    assert torch.equal(ga, gb) and torch.equal(ga[4:5], g_alone)


def test_empty_batch(bd):
    backend, device = bd
    x = torch.randn(0, 7, 100, device=device, requires_grad=True)
    out = _op(backend, 0.1)(x, torch.zeros(0, 7, dtype=torch.long, device=device))
    assert out.logprob.shape == (0, 7) and out.in_safe.dtype == torch.bool
    out.logprob.sum().backward()
    assert x.grad.shape == x.shape


def test_inputs_not_mutated(bd):
    backend, device = bd
    x = make_logits(4, 1000, torch.bfloat16, device=device, seed=10)
    y = make_labels((4,), 1000, device=device, seed=10)
    t = torch.rand(4, device=device) + 0.5
    copies = [x.clone(), y.clone(), t.clone()]
    xg = x.requires_grad_()
    _op(backend, 0.1)(xg, y, temperature=t).logprob.sum().backward()
    for before, after in zip(copies, (x.detach(), y, t)):
        assert torch.equal(before, after)


def test_auto_backend_and_reference_backend_agree():
    x = make_logits(4, 1000, torch.float32, seed=11)
    y = make_labels((4,), 1000, seed=11)
    a = pg_kernels.pruned_logprob(x, y, alpha=0.05)
    b = pg_kernels.pruned_logprob(x, y, alpha=0.05, backend="reference")
    for name in a._fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)


# --- the op contract (CPU extension) ------------------------------------------------------

needs_cpu_ext = pytest.mark.skipif(
    pg_kernels._backend.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="C++ extension not built",
)


@needs_cpu_ext
def test_gradcheck_float64():
    x = make_logits(4, 11, torch.float64, seed=12).requires_grad_()
    y = torch.tensor([0, 10, 4, -100])
    y[2] = int(x[2].argmax())
    t = torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=torch.float64)

    def f(x):
        return pg_kernels.pruned_logprob(x, y, alpha=0.3, temperature=t, backend="cpu").logprob

    out = pg_kernels.pruned_logprob(x, y, alpha=0.3, temperature=t, backend="cpu")
    assert 0 < int(out.in_safe.sum()) < 3  # labels both in and out of S
    assert torch.autograd.gradcheck(f, (x,))


@needs_cpu_ext
def test_opcheck():
    x = make_logits(4, 33, torch.float32, seed=13)
    y = make_labels((4,), 33, seed=13)
    t = torch.rand(4) + 0.5
    for temp in (None, t):
        torch.library.opcheck(
            torch.ops.pg_kernels.pruned_logprob.default,
            (x.requires_grad_(), y, temp, 1.3, 0.05, -100, "cpu"),
        )
    *_, lse_safe, threshold, row_max = torch.ops.pg_kernels.pruned_logprob(
        x.detach(), y, None, 1.0, 0.05, -100, "cpu"
    )
    args = (torch.randn(4), x.detach(), y, None, 1.0, -100, lse_safe, threshold, row_max, "cpu")
    torch.library.opcheck(torch.ops.pg_kernels.pruned_logprob_backward.default, args)


@needs_cpu_ext
def test_compile_fullgraph_matches_eager():
    x = make_logits((2, 3), 500, torch.float32, seed=14)
    y = make_labels((2, 3), 500, seed=14)

    def loss(x, y, alpha):
        out = pg_kernels.pruned_logprob(x, y, alpha=alpha, temperature=0.9)
        return out.logprob.sum(), out.logprob, out.in_safe, out.tail_mass

    compiled = torch.compile(loss, fullgraph=True)
    for alpha in (0.01, 0.2):  # alpha is a plain float argument of the op
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ea, eb = loss(xa, y, alpha), compiled(xb, y, alpha)
        ea[0].backward()
        eb[0].backward()
        # The op's outputs and gradient bitwise; the loss's own sum may be fused in another order.
        assert all(torch.equal(a, b) for a, b in zip(ea[1:], eb[1:]))
        torch.testing.assert_close(ea[0], eb[0], rtol=1e-6, atol=0)
        assert torch.equal(xa.grad, xb.grad)


# --- bad input ----------------------------------------------------------------------------


def _bad_cases():
    f = pg_kernels.pruned_logprob
    return [
        (lambda x, y: f(x, y, alpha=0.0), ValueError, "alpha must be in (0, 1), got 0.0"),
        (lambda x, y: f(x, y, alpha=1.0), ValueError, "alpha must be in (0, 1)"),
        (lambda x, y: f(x, y, alpha=-0.5), ValueError, "alpha must be in (0, 1)"),
        (lambda x, y: f(x, y, alpha=float("nan")), ValueError, "alpha must be in (0, 1)"),
        (lambda x, y: f(x, y, alpha=True), TypeError, "alpha must be a float"),
        (lambda x, y: f(x, y, alpha=torch.tensor(0.1)), TypeError, "alpha must be a float"),
        (lambda x, y: f(x, y[:, :-1], alpha=0.1), ValueError, "labels must have"),
        (lambda x, y: f(x, y.float(), alpha=0.1), TypeError, "labels must be int64 or int32"),
        (lambda x, y: f(x.long(), y, alpha=0.1), TypeError, "logits must be bf16"),
        (lambda x, y: f(x[..., :0], y, alpha=0.1), ValueError, "V == 0"),
        (
            lambda x, y: f(x, y, alpha=0.1, temperature=-torch.ones(2, 3)),
            ValueError,
            "temperature.flatten()[0]",
        ),
        (lambda x, y: f(x, y, alpha=0.1, backend="cuda"), RuntimeError, "cannot run here"),
        (lambda x, y: f(x, y.to("meta"), alpha=0.1), ValueError, "labels is on meta"),
        (
            lambda x, y: f(x, y.index_fill(1, torch.tensor([2]), 50), alpha=0.1),
            ValueError,
            "labels[0, 2] = 50 is outside [0, 50)",
        ),
        (
            lambda x, y: f(x.transpose(1, 2), y, alpha=0.1),
            ValueError,
            "contiguous in its last",
        ),
    ]


BAD_INPUTS = _bad_cases()


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_clear_error(case):
    fn, exc, msg = BAD_INPUTS[case]
    x, y = make_logits((2, 3), 50, seed=15), make_labels((2, 3), 50, seed=15)
    with pytest.raises(exc, match=None) as info:
        fn(x, y)
    assert msg in str(info.value), str(info.value)
