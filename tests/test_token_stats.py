"""token_stats against the float64 reference on every backend present, plus the op contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pg_kernels
from pg_kernels import reference
from pg_kernels.testing import (
    check_against_reference,
    interpreted,
    make_labels,
    make_logits,
    near_one_hot,
    peaked_logits,
)

pytestmark = pytest.mark.op("token_stats")

DIFF = ("logprob", "entropy", "collision", "lse")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _shapes(backend: str, device: str):
    """(N, V): odd vocab sizes and a real one; small for the Triton interpreter (2.5 ms/step)."""
    if interpreted(backend, device):
        return [(3, 7), (4, 1000), (2, 5003)]
    return [(3, 7), (16, 1000), (8, 32003), (2, 151936)]


def _op(backend):
    def op(logits, labels, **kw):
        return pg_kernels.token_stats(logits, labels, backend=backend, **kw)

    return op


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend_device, dtype):
    backend, device = backend_device
    for i, (n, v) in enumerate(_shapes(backend, device)):
        x = make_logits(n, v, dtype, device=device, seed=i)
        near_one_hot(x, slice(0, 1))
        y = make_labels((n,), v, device=device, seed=i)
        check_against_reference(
            _op(backend), reference.token_stats, (x, y), {}, diff_fields=DIFF, seed=i
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_near_one_hot_rows_alone(backend_device, dtype, temperature):
    """The rule's bound is per call (plain's largest error, the largest truth): next to O(1)
    rows, a near one-hot row's entropy (~1e-11) could be off by 1e-6 unseen. Alone, its own
    scale bounds it."""
    backend, device = backend_device
    for i, (n, v) in enumerate(_shapes(backend, device)):
        x = make_logits(n, v, dtype, device=device, seed=40 + i)
        near_one_hot(x, slice(0, n))
        y = make_labels((n,), v, device=device, seed=40 + i)
        check_against_reference(
            _op(backend), reference.token_stats, (x, y), {"temperature": temperature},
            diff_fields=DIFF, seed=i,
        )  # fmt: skip


# finfo(float64).min / tau is -inf in the float64 truth itself: not a case.
_FILLS = [
    (fill, dtype)
    for fill in ("finfo.min", -1e30, -1e9)
    for dtype in (torch.float32, torch.bfloat16, torch.float64)
    if not (fill == "finfo.min" and dtype == torch.float64)
]


@pytest.mark.parametrize(("fill", "dtype"), _FILLS, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_vocab_masked_with_a_huge_finite_fill(
    small_triton_blocks, backend_device, dtype, temperature, fill
):
    """Vocabulary masked with torch.finfo(dtype).min (finite, as Hugging Face masks), -1e30 or
    -1e9 instead of -inf: those entries have no mass, and a row masked whole is uniform over its
    V entries. x / tau of finfo.min is beyond the float range at tau <= 1, and every fill's
    x / tau in base 2 lies past 2^29, where its fp32 rounding (the Triton lanes' exponent
    offset) reaches 2^5: nothing may overflow into inf or NaN. Whole chunks and lanes of it
    (small Triton blocks), a label on a masked entry (log-prob -inf when it overflows, as the
    truth's rounded to the output dtype). fp64 logits: -1e30 lies beyond its exponent offsets'
    reach too (2^57); finfo(float64).min / tau is -inf in the float64 truth itself."""
    backend, device = backend_device
    lo = torch.finfo(dtype).min if fill == "finfo.min" else fill
    head = [2.0, 1.0, 0.5, 0.0]
    rows = [
        head + [lo] * 96,
        [lo] * 50 + [3.0, -1.0] + [lo] * 48,
        [lo] * 100,
        [lo] * 99 + [-7.0],
        head + [lo] * 96,
    ]
    x = torch.tensor(rows, dtype=dtype)
    y = torch.tensor([0, 51, 5, 99, 10])
    check_against_reference(
        _op(backend), reference.token_stats, (x.to(device), y.to(device)),
        {"temperature": temperature}, diff_fields=("logprob", "entropy", "collision", "lse"),
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_row_masked_whole_with_a_huge_finite_fill(backend_device, dtype):
    """A row masked whole with -1e30 (fp16: its finfo.min) is uniform over its V entries, in
    every chunk layout: V = 300 here, 40000 (several chunks of every kernel) on a GPU. The CUDA
    kernel's bf16 chunks that far out keep no term (`ForwardTermFast::ref_of`): such rows are
    finished exactly from the raw logits (`exact_row`), their gradient relative to the raw max
    (`token_stats_backward_far_kernel`)."""
    backend, device = backend_device
    lo = torch.finfo(dtype).min if dtype == torch.float16 else -1e30
    v = 300 if device == "cpu" and backend == "triton" else 40000
    x = torch.full((2, v), lo, dtype=dtype)
    y = torch.tensor([0, v - 1])
    for temperature in (1.0, 0.7):
        check_against_reference(
            _op(backend), reference.token_stats, (x.to(device), y.to(device)),
            {"temperature": temperature}, diff_fields=DIFF,
        )  # fmt: skip


@pytest.mark.parametrize("fill", ["finfo.min", -1e30], ids=str)
def test_masked_chunks_before_the_max(backend_device, fill):
    """4096 masked entries (two of the C++ kernel's 2048-element chunks) before the row's real
    logits: the masked chunks' state moves to the real max by e^-3.4e38, and t + delta s1 of
    it overflowed (0 * -inf: a NaN entropy, then a NaN gradient row, from the C++ kernel)."""
    backend, device = backend_device
    lo = torch.finfo(torch.float32).min if fill == "finfo.min" else fill
    x = torch.tensor([[lo] * 4096 + [-5.0, 1.0, 2.0, 0.5]] * 2)
    y = torch.tensor([4097, 4099])
    for temperature in (1.0, 16.7):
        check_against_reference(
            _op(backend), reference.token_stats, (x.to(device), y.to(device)),
            {"temperature": temperature}, diff_fields=DIFF,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature(backend_device, dtype):
    backend, device = backend_device
    n, v = 6, 1000
    x = make_logits((2, 3), v, dtype, device=device, seed=1)
    y = make_labels((2, 3), v, device=device, seed=1)
    per_row = torch.rand(2, 3, dtype=torch.float64, device=device) * 2 + 0.25
    for temperature in (0.7, per_row):
        check_against_reference(
            _op(backend),
            reference.token_stats,
            (x, y),
            {"temperature": temperature},
            diff_fields=DIFF,
        )
    assert n == x[..., 0].numel()


@pytest.mark.backends("triton")
def test_many_chunks_per_row(backend_device, small_triton_blocks):
    """Rows cut into many chunk programs (Triton; small blocks): the merge kernel, with the max
    and the argmax in late chunks, ties across chunks and -inf runs covering whole chunks."""
    backend, device = backend_device
    for dtype in (torch.float32, torch.bfloat16):
        x = make_logits(5, 1000, dtype, device=device, seed=25)
        x[0, 990] = x[0].max() + 4.0  # the argmax in the last chunk
        x[1, 100:300] = float("-inf")
        x[2, 40] = x[2, 700] = x[2].max() + 1.0  # a tie across chunks: the first index wins
        y = make_labels((5,), 1000, device=device, seed=25)
        check_against_reference(
            _op(backend), reference.token_stats, (x, y), {"temperature": 0.8}, diff_fields=DIFF
        )


def _peaked_rows(n, v, tau, seed):
    """fp32 logits [n, v] of very peaked rows at temperature tau: randn * 4 plus one spike per row,
    6.5-10.5 above the row's other scaled logits (p 0.996-0.99996), shifted so that the row's
    lse is 40. The label is the spike in the first half of the rows (the worst case of a z_c - L
    backward: p_c ~ 1) and a random column in the second half (then the spike is the argmax,
    p ~ 1, off the label)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 4
    spike = torch.randint(0, v, (n,), generator=g)
    gap = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 6.5
    x[torch.arange(n), spike] = (x.max(1).values / tau + gap) * tau
    x += (40 - torch.logsumexp(x / tau, 1))[:, None] * tau
    labels = torch.where(torch.arange(n) < n // 2, spike, torch.randint(0, v, (n,), generator=g))
    return x.float(), labels


def _logprob_grad_error(fn, x, truth):
    x = x.clone().requires_grad_()
    fn(x).sum().backward()
    return (x.grad.double() - truth).abs().max().item()


def test_fp64_entropy_of_peaked_rows_against_50_digits(backend_device):
    """fp64 rows of two entries at |L| ~ 35..65 (per-row temperatures), entropies 1e-13..1e-9.

    The reference's truth was L - sum p z, which cancels |L| to a few ulp(L): -4.3e-14 where a
    50-digit evaluation (of the same rounded z) gives 1.0752e-13, and 2.2e-13 off at L ~ 65,
    while the kernels' log s1 - t / s1 is right to ~1e-16 (ulp(1) of s1). Against that truth the
    kernels failed the rule (fuzzer: 1.4130e-12 against 1.5490e-12, allowed 1.2e-13, plain 0:
    for fp64 logits the plain baseline is the same formula). The float64 truth is now taken
    relative to the row max (reference.token_stats, upcast=True).
    """
    mpmath = pytest.importorskip("mpmath")
    backend, device = backend_device
    x = torch.tensor([[2.2027762948564207, 3.571048974572289],
                      [51.240421944169334, 14.54892414143496],
                      [15.968515642506631, 48.215908157865954],
                      [80.16423424754242, 11.773906793929136]], dtype=torch.float64)  # fmt: skip
    tau = torch.tensor([0.055361502877653436, 1.0985749074664062, 1.3488161351389838,
                        2.3902677375045873], dtype=torch.float64)  # fmt: skip
    z = x / tau[:, None]  # rounded once, as every backend and the reference have it
    with mpmath.workdps(50):

        def entropy(row):
            e = [mpmath.exp(mpmath.mpf(v) - mpmath.mpf(max(row))) for v in row]
            s = mpmath.fsum(e)
            return float(-mpmath.fsum(w / s * mpmath.log(w / s) for w in e))

        exact = torch.tensor([entropy(row.tolist()) for row in z], dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    kw = {"temperature": tau.to(device)}
    truth = reference.token_stats(x, y, temperature=tau).entropy
    got = _op(backend)(x.to(device), y.to(device), **kw).entropy.cpu()
    assert bool((exact > 1e-14).all() and (exact < 1e-8).all())  # the case this test is about
    assert (truth - exact).abs().max() <= 1e-15, (truth - exact).abs().max()
    assert (got - exact).abs().max() <= 1e-15, (got - exact).abs().max()
    check_against_reference(
        _op(backend), reference.token_stats, (x.to(device), y.to(device)), kw, diff_fields=DIFF
    )


def test_peaked_rows_logprob_gradient(backend_device):
    """fp32 at tau 0.7 on very peaked rows (lse 40): the log-prob gradient is as accurate as plain
    fp32 PyTorch's (log_softmax(x / tau) gathered, autograd), against float64. A backward from
    p_j = e^(z_j - L) with the saved fp32 L had 8-14x PyTorch's error there (ulp(40) / 2 on p ~ 1).
    Measured (2026-12-01, Triton under a GPU's arithmetic: tests/conftest.py): C++ and Triton
    1.1e-7, PyTorch 3.5e-7 (Triton had 5.8e-7 while its max_prob was 2^eps / s1, `_finalize`).
    CUDA (not measured yet) gets 2x: its p at the argmax is the forward's max_prob = 1 / s1, and
    s1 is an fp32 per-thread sum in which the thread holding the max (e = 1) rounds each later
    term to ulp(1) / 2; the C++ kernel had 4.3e-7 that way (3.0e-7 relative on max_prob,
    PyTorch's sum 1.8e-7) before it summed s1 in double."""
    backend, device = backend_device
    tau = 0.7
    x, y = _peaked_rows(16, 4000, tau, seed=31)
    x, y = x.to(device), y.to(device)
    p_c = torch.log_softmax(x.double() / tau, -1).gather(1, y[:, None]).exp()
    assert 0.996 < p_c[:8].min() and p_c[:8].max() < 0.99997  # the case this test is about

    def torch_logprob(z):
        return torch.log_softmax(z / tau, -1).gather(1, y[:, None])

    x64 = x.double().requires_grad_()
    torch_logprob(x64).sum().backward()
    truth = x64.grad
    err_torch = _logprob_grad_error(torch_logprob, x, truth)
    err_ours = _logprob_grad_error(
        lambda z: pg_kernels.token_stats(z, y, temperature=tau, backend=backend).logprob,
        x, truth,
    )  # fmt: skip
    factor = 2.0 if backend == "cuda" else 1.0
    assert err_ours <= factor * err_torch, (err_ours, err_torch)
    # The forward's log-prob against float64 too (relative to the max, no z_c - L cancellation).
    lp = pg_kernels.token_stats(x, y, temperature=tau, backend=backend).logprob
    err_lp = (lp.double() - p_c.log().squeeze(1)).abs().max().item()
    err_lp_torch = (torch_logprob(x).squeeze(1).double() - p_c.log().squeeze(1)).abs().max().item()
    assert err_lp <= 2 * err_lp_torch, (err_lp, err_lp_torch)


def test_logprob_at_temperature_below_plain_error(backend_device):
    """fp32 log-probs at tau 0.7 of realistic peaked rows (randn * 4, a +5..15 spike on half of
    them, labels sampled from the softmax: benchmarks/fidelity.py's inputs) against float64:
    below plain fp32 PyTorch's error, max and rms. From z = x / tau rounded, z - m carries
    ulp(z) / 2 of z_c and of the z_j the mass sits on (~1e-6 at |z| ~ 20), as plain PyTorch's
    does; the C++ rows load d = (x - x_max) / tau (exact near the max, then rounded once) and
    the Triton forward d2 = x c - fl(x_max c) (one fma). Measured on these 32 x 4000 rows: C++
    max 1.2e-7, rms 3.7e-8 (1.9e-6 and 4.5e-7 over fidelity.py's 1024 rows with z = x / tau);
    Triton 6.8e-7, 2.4e-7; plain PyTorch 1.4e-6, 6.3e-7. CUDA (not measured; its forward keeps
    x (1 / tau)) is held to the rule's 2x."""
    backend, device = backend_device
    tau = 0.7
    g = torch.Generator().manual_seed(0)
    x = peaked_logits(32, 4000, g).float()
    y = torch.multinomial(torch.softmax(x.double() / tau, -1), 1, generator=g).squeeze(1)
    truth = torch.log_softmax(x.double() / tau, -1).gather(1, y[:, None]).squeeze(1)
    plain = torch.log_softmax(x / tau, -1).gather(1, y[:, None]).squeeze(1).double() - truth
    ours = pg_kernels.token_stats(
        x.to(device), y.to(device), temperature=tau, backend=backend
    ).logprob.cpu().double() - truth  # fmt: skip
    err = (ours.abs().max().item(), ours.pow(2).mean().sqrt().item())
    err_plain = (plain.abs().max().item(), plain.pow(2).mean().sqrt().item())
    if backend == "cuda":
        assert err[0] <= 2 * err_plain[0], (err, err_plain)
    else:
        assert err[0] <= err_plain[0] and err[1] <= 0.6 * err_plain[1], (err, err_plain)


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_peaked_rows_logit_gradient_proxy(backend_device, tau):
    """lgp = (1 - p_c)^2 + sum_{j != c} p_j^2 on rows whose label is the argmax with p_c
    0.996-0.99996 (lgp 4e-9 .. 3e-6): relative error against float64 no worse than 2x plain
    fp32 PyTorch's on every backend (which sums p_j^2 to ~1 in fp32: 0.47 relative at tau 1,
    0.51 at 0.7), and 1e-5 on the C++ and Triton backends, which keep s1 and s2 of fp32 rows in
    fp64 and take s2 - p_c^2 s1^2 against the sums' own term of the max (measured 2026-12-01:
    C++ 7.5e-8 and 4.5e-7, Triton under a GPU's arithmetic 4.4e-7 and 5.7e-7; with s2 in fp32
    lanes they were 2.9 and 3.2, and Triton's 5.8 and 10.7 with e_m = 2^eps exactly)."""
    backend, device = backend_device
    x, y = _peaked_rows(16, 4000, tau, seed=31)
    rows = slice(0, 8)  # label = the spike

    def rel_err(lgp):
        truth = reference.token_stats(x.double(), y, temperature=tau).lgp[rows]
        return ((lgp[rows].double().cpu() - truth).abs() / truth).max().item()

    ours = rel_err(pg_kernels.token_stats(x.to(device), y.to(device), temperature=tau,
                                          backend=backend).lgp)  # fmt: skip
    plain = rel_err(reference.token_stats(x, y, temperature=tau, upcast=False).lgp)
    assert ours <= 2 * plain, (ours, plain)
    if backend in ("cpu", "triton"):
        assert ours <= 1e-5, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logit_gradient_proxy_far_below_ulp_1(backend_device, dtype):
    """lgp of rows more confident still: the label the argmax, a spike of 12-20 at tau 0.7 (lgp
    1e-7 .. 6e-18), under the rule per value (plain fp32 PyTorch reads 0 below ~1e-16, so the
    bound there is ~2x the value). The rests s1 - e_c, s2 - e_c^2 come out of the sums exactly
    at the max; C++ took (1 - p_c)^2 + (C - p_c^2), whose second term, a difference of two
    rounded numbers ~1 in double, read 2^-53 for an lgp of 2.0e-17, or 0 below it (as plain).
    Also within 1e-3 relative: what remains is the double lanes' rounding of s2 next to the
    max's e^2 = 1 (C++ 4.6-4.8e-4 at lgp 1e-14 over seeds 8-39; plain fp32 PyTorch reads 0).
    Triton's bf16 rows: 1.2e-2 while the lane holding the max summed in fp32, 4.6e-4 since it
    is summed again in fp64 (`token_stats.chunk_total`); CUDA's likewise its thread holding the
    max (`top_vector_sums`; host emulation, host_test.cu: 4.3e-4)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(8)
    x = torch.randn(9, 4000, generator=g, dtype=torch.float64) * 0.5
    y = torch.full((9,), 123)
    x[:, 123] += torch.linspace(12.0, 20.0, 9, dtype=torch.float64)
    x = x.to(dtype)
    truth = reference.token_stats(x, y, temperature=0.7).lgp
    assert float(truth.min()) < 1e-17 and float(truth.max()) > 1e-8
    check_against_reference(
        _op(backend), reference.token_stats, (x.to(device), y.to(device)), {"temperature": 0.7},
        diff_fields=(), check_fields=("lgp", "max_prob"),
    )  # fmt: skip
    lgp = pg_kernels.token_stats(x.to(device), y.to(device), temperature=0.7,
                                 backend=backend).lgp.cpu()  # fmt: skip
    rel = ((lgp.double() - truth) / truth).abs()
    assert float(rel.max()) <= 1e-3, (rel, lgp, truth)


def _peaked_rows_with_runner_ups(n, v, dtype, seed, beside_label=False):
    """16-bit logits [n, v]: randn * 2, 1-5 runner-ups 0-2 above the row's other logits, and the
    label a spike 5-13 above those (p_c 0.9 .. 0.9999): the rest of p, that the logit-gradient
    proxy is made of, lies in a few tokens whose p_j^2 are summed beside p_c^2 ~ 1. beside_label:
    the label at the start of a 16-byte vector and the runner-ups right after it, in the same
    vector (a Triton lane's 8 16-bit neighbours)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 2
    top = x.max(1).values
    if beside_label:
        labels = 8 * torch.randint(0, v // 8, (n,), generator=g)
    for i, k in enumerate(torch.randint(1, 6, (n,), generator=g).tolist()):
        if beside_label:
            cols = labels[i] + 1 + torch.arange(k)
        else:
            cols = torch.randperm(v, generator=g)[:k]
        x[i, cols] = top[i] + torch.rand(k, generator=g) * 2
    if not beside_label:
        labels = torch.randint(0, v, (n,), generator=g)
    x[torch.arange(n), labels] = top + 5 + torch.rand(n, generator=g) * 8
    return x.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_confident_rows_entropy_and_logprob_absolute(backend_device, dtype, tau):
    """Confident rows (1 - p_c from ~1e-2 down to ~1e-10 and below): entropy and log-prob
    within an absolute bound per row. The suite's rule scales its floor with the tensor's
    largest |truth| and plain fp32 PyTorch's worst row, and on such rows plain PyTorch is
    100 % off (z_c - L, L - sum p z): an entropy doubled on every row below 1e-2 passed it. The
    fp64 sums are within 1e-9 (measured 2026-12-05, 48 x 301: 2.6e-11 at most). Triton's 16-bit
    rows sum in fp32 lanes: 9.7e-8 (s1 = 1 + rest rounded at ulp(1) / 2 a few times) until the
    lane holding the max was summed again in fp64 (`token_stats.chunk_total`), 3.1e-11 since
    (bf16, tau 1; 1.3e-13 at tau 0.7; 2026-12-06). CUDA's threads likewise (`top_vector_sums`,
    2026-12-07; host emulation of these rows, host_test.cu: 1.6e-8 .. 1.4e-7 before, 4.8e-11
    after)."""
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 301, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 301, (48,), generator=g)
    gap = torch.linspace(8, 22, 48, dtype=torch.float64) + torch.log(torch.tensor(301.0))
    x[torch.arange(48), y] = x.max(1).values + gap
    x = x.to(dtype)
    truth = reference.token_stats(x.double(), y, temperature=tau)
    out = _op(backend)(x.to(device), y.to(device), temperature=tau)
    for name in ("entropy", "logprob"):
        err = (getattr(out, name).double().cpu() - getattr(truth, name)).abs().max().item()
        assert err <= 1e-9, (name, err)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("beside_label", [False, True], ids=["anywhere", "beside_label"])
def test_16bit_peaked_rows_with_runner_ups_logit_gradient_proxy(
    backend_device, dtype, tau, beside_label
):
    """The lgp of rows whose rest is a few runner-ups (lgp 1e-10 .. 2e-2): s2 - e_c^2 cancels
    ~1 down to their p_j^2, and every fp32 add beside the max's term rounds to ulp(1) / 2. Mean
    error at most 1/20 of plain fp32 PyTorch's, the worst at most 1/5 of its worst. Measured
    (256 x 128, bf16 and fp16, tau 1 and 0.7): plain fp32 1.0e-8 .. 2.5e-8 mean, 9.7e-8 ..
    1.5e-7 worst; C++ (fp64 sums) 5e-4 .. 1e-3x plain's mean. Triton under a GPU's arithmetic:
    1.3-1.5x plain's mean while its 16-bit chunk sums added the lanes in fp32; 0.18-0.39x with
    them added in fp64 (2026-12-05), its worst 0.64-0.77x plain's, what remained the fp32 lane
    holding the max; with that lane summed again in fp64 (`token_stats.chunk_total`,
    2026-12-06) 0.001-0.011x plain's mean, its worst 0.002-0.067x. With every runner-up in the
    label's own 16-byte vector (`beside_label`): 0.97-1.20x plain's mean before, its worst up
    to 1.06x plain's; 0.001-0.009x after, its worst 0.009-0.054x. CUDA (a numpy emulation of
    its threads, [64, 128] and [16, 4096]): 1.0-2.4x plain's mean, its worst up to 3.4x plain's,
    while the thread holding the max summed in fp32 like the others; 0.000-0.009x, its worst
    0.000-0.042x, with that thread summed again in fp64 (`top_vector_sums`, 2026-12-07)."""
    backend, device = backend_device
    x, y = _peaked_rows_with_runner_ups(256, 128, dtype, seed=5, beside_label=beside_label)
    truth = reference.token_stats(x.double(), y, temperature=tau).lgp
    ours = pg_kernels.token_stats(x.to(device), y.to(device), temperature=tau, backend=backend)
    err = (ours.lgp.double().cpu() - truth).abs()
    plain = (reference.token_stats(x, y, temperature=tau, upcast=False).lgp.double() - truth).abs()
    assert err.mean() <= 0.05 * plain.mean() and err.max() <= 0.2 * plain.max(), (
        err.mean().item(), plain.mean().item(), err.max().item(), plain.max().item())


def test_backward_rejects_a_foreign_saved_state(backend_device):
    """The backward reads the row max at the saved argmax: an argmax out of [0, V) or a max_prob
    outside (0, 1] (not a forward's) makes that row NaN, reads nothing out of the row, and leaves
    the other rows as they were."""
    backend, device = backend_device
    x = make_logits(4, 50, torch.float32, device=device, seed=41)
    y = make_labels((4,), 50, device=device, seed=41)
    out = pg_kernels.token_stats(x, y, backend=backend)
    argmax, max_prob = out.argmax.clone(), out.max_prob.clone()
    argmax[1] = 50
    max_prob[2] = 0.0
    max_prob[3] = float("nan")
    g = [torch.ones(4, device=device)] + [torch.zeros(4, device=device)] * 3
    saved = (out.lse, out.entropy, out.collision)
    bwd = torch.ops.pg_kernels.token_stats_backward
    good = bwd(*g, x, y, None, 1.0, -100, *saved, out.max_prob, out.argmax, backend)
    bad = bwd(*g, x, y, None, 1.0, -100, *saved, max_prob, argmax, backend)
    assert torch.equal(bad[0], good[0]) and good.isfinite().all()
    assert bad[1:].isnan().all()


def test_backward_writes_into_out(backend_device):
    """The backward launcher's `out` (a reused buffer for chunked callers) gets exactly the fresh
    gradient; a wrong shape or a buffer sharing the logits' memory is refused by name."""
    from pg_kernels.ops.token_stats import _token_stats_backward

    backend, device = backend_device
    x = make_logits(6, 300, torch.bfloat16, device=device, seed=43)
    y = make_labels((6,), 300, device=device, seed=43)
    out = pg_kernels.token_stats(x, y, backend=backend)
    g = [torch.randn(6, generator=torch.Generator().manual_seed(i)).to(device) for i in range(4)]
    args = (*g, x, y, None, 1.0, -100, out.lse, out.entropy, out.collision, out.max_prob,
            out.argmax, backend)  # fmt: skip
    fresh = _token_stats_backward(*args)
    buffer = torch.full_like(x, float("nan"))
    assert _token_stats_backward(*args, out=buffer) is not None
    assert torch.equal(buffer, fresh)
    with pytest.raises((RuntimeError, ValueError), match="out must be a contiguous tensor"):
        _token_stats_backward(*args, out=buffer[:5])
    overlap = "out must not share|single memory location"
    with pytest.raises((RuntimeError, ValueError), match=overlap):
        _token_stats_backward(*args, out=x)


def test_neg_inf_entries(backend_device):
    """-inf logits add exactly 0; a label on a -inf logit has logprob -inf and p_c = 0."""
    backend, device = backend_device
    v = 5003 if backend == "triton" else 70000  # several CPU chunks; the first all -inf
    x = make_logits(4, v, torch.float32, device=device, seed=2)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    x[mask.to(device)] = float("-inf")
    x[1, : v // 2] = float("-inf")  # a leading run of -inf longer than a chunk
    x[2, 5] = float("-inf")
    y = torch.tensor([0, v - 1, 5, 17], device=device)
    x[[0, 1, 3], y[[0, 1, 3]]] = 1.0  # keep those labels finite
    check_against_reference(
        _op(backend), reference.token_stats, (x, y), {}, diff_fields=("entropy", "collision", "lse")
    )
    out = _op(backend)(x, y)
    assert out.logprob[2] == float("-inf") and out.lgp[2] > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_neg_inf_entries_add_exactly_nothing(backend_device, dtype):
    """A -inf logit's gradient and a one-entry row's entropy are exactly 0 in every dtype: the
    exponent floor zeroes 2^d2 in fp64 too (Triton floored d2 at -1024, an fp64 subnormal: a
    gradient of 3.9e-306 and an entropy of 5.9e-305). And an fp64 row of finfo.min has a finite
    lse (Triton's mx log2(e) overflowed to -inf)."""
    backend, device = backend_device
    inf = float("inf")
    x = torch.tensor([[0.0, -inf, 1.0, -inf], [0.0, -inf, -inf, -inf]], dtype=dtype)
    x = x.to(device).requires_grad_()
    out = _op(backend)(x, torch.tensor([2, 0], device=device))
    (out.logprob + out.entropy + out.lse + out.collision).sum().backward()
    assert torch.all(x.grad[torch.isneginf(x.detach())] == 0), x.grad
    assert out.entropy[1] == 0 and out.logprob[1] == 0, out
    fmin = torch.finfo(dtype).min
    far = torch.full((1, 5), fmin, dtype=dtype, device=device)
    far[0, 1] = fmin / 2
    lse = _op(backend)(far, torch.tensor([1], device=device)).lse
    truth = reference.token_stats(far.double(), torch.tensor([1])).lse.to(lse.dtype)
    assert torch.isfinite(lse).all() and torch.equal(lse.cpu(), truth), (lse, truth)


def test_invalid_rows_stay_local(backend_device):
    """NaN, +inf and all -inf rows give NaN outputs (argmax -1) and leave other rows untouched."""
    backend, device = backend_device
    x = make_logits(5, 1000, torch.float32, device=device, seed=3)
    clean = _op(backend)(x, make_labels((5,), 1000, device=device, seed=3, ignore_index=-7))
    y = make_labels((5,), 1000, device=device, seed=3, ignore_index=-7)
    x[1, 10] = float("nan")
    x[2, 999] = float("inf")
    x[3] = float("-inf")
    out = _op(backend)(x, y)
    for name in ("logprob", "entropy", "collision", "lgp", "lse", "max_prob", "renyi2"):
        got = getattr(out, name)
        assert torch.isnan(got[1:4]).all(), name
        assert torch.equal(got[[0, 4]], getattr(clean, name)[[0, 4]]), name
    assert out.argmax[1:4].tolist() == [-1, -1, -1]
    xg = x.clone().requires_grad_()
    _op(backend)(xg, y).logprob.sum().backward()
    assert torch.isnan(xg.grad[1:4]).all() and torch.isfinite(xg.grad[[0, 4]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_first_argmax_and_nan_at_any_position(backend_device, dtype):
    """A row's max taken in several independent chains (the C++ loads: four, each lane of a
    vector its own) and its first index found a vector at a time: tied maxima inside one vector,
    across vectors and across chunks (the first wins, as torch.argmax), a max of 0 held as -0
    before +0, and a NaN at every position class of those chains and of the scalar tail (the
    row NaN, argmax -1)."""
    backend, device = backend_device
    v = 5003  # C++: chunks of 2048, the last of 907 entries (a scalar tail of 11)
    x = make_logits(12, v, torch.float64, seed=41)
    ties = {0: (17, 18), 1: (100, 1500), 2: (3000, 4500), 3: (4999, 5001)}
    for r, cols in ties.items():
        x[r, list(cols)] = x[r].max() + 2.0
    x[1, 40] = x[1].max() - 0.5  # a lower max in an earlier vector
    x[4] = -x[4].abs() - 1.0
    x[4, 5], x[4, 10] = -0.0, 0.0
    nan_cols = (5, 20, 40, 60, 2048 + 33, 4096 + 900)
    for r, col in enumerate(nan_cols, start=5):
        x[r, col] = float("nan")
    x = x.to(dtype=dtype, device=device)
    y = torch.randint(0, v, (12,), generator=torch.Generator().manual_seed(41)).to(device)
    out = _op(backend)(x, y)
    want = x[:5].double().cpu().argmax(-1)
    assert want.tolist()[:4] == [17, 100, 3000, 4999] and want[4] == 5
    assert torch.equal(out.argmax[:5].cpu(), want)
    assert out.argmax[5:11].tolist() == [-1] * 6 and torch.isnan(out.lse[5:11]).all()
    check_against_reference(
        _op(backend), reference.token_stats, (x[[0, 1, 2, 3, 4, 11]], y[[0, 1, 2, 3, 4, 11]]),
        {}, diff_fields=DIFF,
    )  # fmt: skip


def test_ignore_index_rows(backend_device):
    backend, device = backend_device
    x = make_logits(4, 1000, torch.float32, device=device, seed=4)
    y = torch.tensor([3, -1, 999, -1], device=device)
    xg = x.clone().requires_grad_()
    out = _op(backend)(xg, y, ignore_index=-1)
    for name in (*out._fields, "lgp_norm", "renyi2"):  # renyi2 = -log C, C = 0 there: not inf
        assert (getattr(out, name)[[1, 3]] == 0).all(), name
    assert not out.renyi2.requires_grad and bool(out.renyi2[[0, 2]].isfinite().all())
    (out.logprob + out.entropy + out.collision + out.lse).sum().backward()
    assert (xg.grad[[1, 3]] == 0).all() and (xg.grad[[0, 2]] != 0).any()


@pytest.mark.parametrize("upstream", [float("inf"), float("nan")])
def test_ignored_rows_ignore_a_non_finite_upstream_gradient(backend_device, upstream):
    """An ignored row's gradient is 0 whatever its upstream gradient: sqrt(collision) has an
    infinite derivative at an ignored row's collision = 0. Triton gave NaN there, its
    coefficients formed as 0 (1 / tau of an ignored row) times inf."""
    backend, device = backend_device
    x = make_logits(3, 7, torch.float32, device=device, seed=6).requires_grad_()
    y = torch.tensor([2, -100, 5], device=device)
    out = _op(backend)(x, y)
    g = torch.ones(3, device=device)
    g[1] = upstream
    for field in ("logprob", "entropy", "collision", "lse"):
        x.grad = None
        (getattr(out, field) * g).sum().backward(retain_graph=True)
        assert bool((x.grad[1] == 0).all()), (field, x.grad[1])
        assert bool(x.grad[[0, 2]].isfinite().all()), field


def test_strided_input_is_read_in_place(backend_device):
    """logits[:, :-1] of [B, T+1, V] (the shifted view trainers use) and a row slice."""
    backend, device = backend_device
    base = make_logits((3, 5), 1000, torch.float32, device=device, seed=5)
    y = make_labels((3, 4), 1000, device=device, seed=5)
    view = base[:, :-1]
    assert not view.is_contiguous()
    a, b = _op(backend)(view, y), _op(backend)(view.contiguous(), y)
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    rows = base.view(15, 1000)[::2]
    a, b = _op(backend)(rows, y.view(-1)[:8]), _op(backend)(rows.contiguous(), y.view(-1)[:8])
    assert torch.equal(a.entropy, b.entropy)
    strided_labels = make_labels((16,), 1000, device=device, seed=5)[::2]  # stays strided
    c = _op(backend)(rows, strided_labels)
    assert torch.equal(c.logprob, _op(backend)(rows, strided_labels.contiguous()).logprob)
    check_against_reference(_op(backend), reference.token_stats, (view, y), {}, diff_fields=DIFF)


def test_int32_labels_and_shift_invariance(backend_device):
    backend, device = backend_device
    x = make_logits(6, 1000, torch.float32, device=device, seed=6)
    y = make_labels((6,), 1000, device=device, seed=6)
    a, b = _op(backend)(x, y), _op(backend)(x, y.int())
    assert torch.equal(a.entropy, b.entropy) and torch.equal(a.logprob, b.logprob)
    c = _op(backend)(x + 11.0, y)
    torch.testing.assert_close(c.logprob, a.logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(c.entropy, a.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(c.collision, a.collision, rtol=1e-5, atol=0)


def test_deterministic_and_batch_invariant(backend_device):
    backend, device = backend_device
    v = 5003 if backend == "triton" else 40000
    x = make_logits(9, v, torch.bfloat16, device=device, seed=7)
    y = make_labels((9,), v, device=device, seed=7)

    def run(xs, ys):
        xg = xs.clone().requires_grad_()
        out = _op(backend)(xg, ys)
        (out.logprob * 0.3 + out.entropy - out.collision).sum().backward()
        return out, xg.grad

    (a, ga), (b, gb) = run(x, y), run(x, y)
    alone, g_alone = run(x[4:5], y[4:5])
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name)[4:5], getattr(alone, name)), name
    assert torch.equal(ga, gb) and torch.equal(ga[4:5], g_alone)


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("v", [301, 4096])
def test_rows_alone_and_in_a_batch_of_odd_stride(backend_device, dtype, v, request):
    """Rows alone (a copy, 16-byte aligned: vector loads, bf16's full steps int32 pairs) and
    inside a batch of odd row stride (each lane's elements by scalar loads, `load_lanes`) the
    same bits: odd V, and V = 4096 in a batch of stride 4097 (a V the compiler knows divides
    by 16: every mask of the aligned copy is whole vectors). The bf16 element path adds the
    pairs path's even and odd halves one after the other; it had added each lane's elements
    in one tree (V = 50257: a max_prob 1.5e-8 apart). Under the interpreter every order is
    numpy's: the V = 4096 case is for a GPU, where a load's layout (the order of a sum over
    its elements, as `token_stats.lane_sums64`'s) may follow the alignment; at the default
    blocking, the small blocks' merges being the odd V's."""
    backend, device = backend_device
    if v == 301:
        request.getfixturevalue("small_triton_blocks")
    n = 9 if v == 301 else 3
    # Rows of an odd stride: V itself, or V + 1 with the last column left out.
    base = make_logits(n, v + 1 - v % 2, dtype, device=device, seed=8)
    y = make_labels((n,), v, device=device, seed=8)

    def run(rows):
        # A copy of those rows of base (one row alone starts the copy: 16-byte aligned), the op
        # on its first V columns.
        leaf = base[rows].clone().requires_grad_()
        out = _op(backend)(leaf[:, :v], y[rows], temperature=0.8)
        (out.logprob * 0.3 + out.entropy - out.collision).sum().backward()
        return out, leaf.grad[:, :v]

    batch, g_batch = run(slice(None))
    for r in range(n):
        alone, g_alone = run(slice(r, r + 1))
        for name in batch._fields:
            assert torch.equal(getattr(batch, name)[r : r + 1], getattr(alone, name)), (r, name)
        assert torch.equal(g_batch[r : r + 1], g_alone), r


def test_lgp_expectation_links_to_collision(backend_device):
    """E_{c~p}[1 - 2 p_c + C] = 1 - C: one row, every label."""
    backend, device = backend_device
    v = 300
    x = make_logits(1, v, torch.float64, device=device, seed=8).expand(v, v)
    out = _op(backend)(x, torch.arange(v, device=device))
    p = out.logprob.exp()
    torch.testing.assert_close((p * out.lgp).sum(), 1 - out.collision[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.lgp_norm**2, out.lgp)
    torch.testing.assert_close(out.renyi2, -out.collision.log())


def test_empty_batch(backend_device):
    backend, device = backend_device
    x = torch.randn(0, 7, 100, device=device, requires_grad=True)
    out = _op(backend)(x, torch.zeros(0, 7, dtype=torch.long, device=device))
    assert out.logprob.shape == (0, 7) and out.argmax.dtype == torch.int64
    out.entropy.sum().backward()
    assert x.grad.shape == x.shape


def test_rows_of_one_entry_at_any_stride(backend_device):
    """V = 1 has no last-dim stride to respect: a transposed [N, 1] view (stride (1, N)) and an
    empty [0, 1] tensor with stride (1, 0) are read as they are."""
    backend, device = backend_device
    x = (torch.randn(1, 7, device=device) * 3).t()
    assert x.stride() == (1, 7)
    y = torch.zeros(7, dtype=torch.long, device=device)
    got, want = _op(backend)(x, y), _op(backend)(x.contiguous(), y)
    for name in got._fields:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    empty = torch.empty(0, 1, device=device).as_strided((0, 1), (1, 0))
    assert _op(backend)(empty, y[:0]).logprob.shape == (0,)


def test_inputs_not_mutated(backend_device):
    backend, device = backend_device
    x = make_logits(4, 1000, torch.bfloat16, device=device, seed=9)
    y = make_labels((4,), 1000, device=device, seed=9)
    t = torch.rand(4, device=device) + 0.5
    copies = [x.clone(), y.clone(), t.clone()]
    xg = x.requires_grad_()
    _op(backend)(xg, y, temperature=t).entropy.sum().backward()
    for before, after in zip(copies, (x.detach(), y, t)):
        assert torch.equal(before, after)


def test_auto_backend_and_reference_backend_agree():
    x = make_logits(4, 1000, torch.float32, seed=10)
    y = make_labels((4,), 1000, seed=10)
    a = pg_kernels.token_stats(x, y)
    b = pg_kernels.token_stats(x, y, backend="reference")
    for name in a._fields:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)


# --- the op contract (CPU extension) ------------------------------------------------------

needs_cpu_ext = pytest.mark.skipif(
    pg_kernels._backend.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="C++ extension not built",
)


@needs_cpu_ext
def test_gradcheck_float64():
    x = make_logits(3, 11, torch.float64, seed=11).requires_grad_()
    y = torch.tensor([0, 10, 4])
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def f(x):
        out = pg_kernels.token_stats(x, y, temperature=t, backend="cpu")
        return out.logprob, out.entropy, out.collision, out.lse

    assert torch.autograd.gradcheck(f, (x,))


@needs_cpu_ext
def test_opcheck():
    x = make_logits(4, 33, torch.float32, seed=12)
    y = make_labels((4,), 33, seed=12)
    t = torch.rand(4) + 0.5
    for temp in (None, t):
        torch.library.opcheck(
            torch.ops.pg_kernels.token_stats.default,
            (x.requires_grad_(), y, temp, 1.3, -100, "cpu"),
        )
    out = pg_kernels.token_stats(x, y, backend="cpu")
    g = [torch.randn(4) for _ in range(4)]
    # detached, as autograd hands them to the backward (differentiating it again raises)
    saved = tuple(t.detach() for t in (out.lse, out.entropy, out.collision, out.max_prob))
    args = (*g, x.detach(), y, None, 1.0, -100, *saved, out.argmax, "cpu")
    torch.library.opcheck(torch.ops.pg_kernels.token_stats_backward.default, args)


@needs_cpu_ext
def test_compile_fullgraph_matches_eager():
    x = make_logits((2, 3), 500, torch.float32, seed=13)
    y = make_labels((2, 3), 500, seed=13)

    def loss(x, y):
        out = pg_kernels.token_stats(x, y, temperature=0.9)
        return (out.logprob - 0.1 * out.entropy + out.collision).sum(), out

    compiled = torch.compile(loss, fullgraph=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, oa = loss(xa, y)
    lb, ob = compiled(xb, y)
    la.backward()
    lb.backward()
    # The op's outputs and gradient bitwise; the loss to rounding (Inductor fuses the elementwise
    # combination and the sum, and may contract them differently from eager: 1 ulp seen).
    assert all(torch.equal(a, b) for a, b in zip(oa, ob))
    assert torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)


@pytest.mark.slow
@needs_cpu_ext
def test_more_than_2_31_elements():
    """int64 offsets: a bf16 [16385, 131072] tensor has 2^31 + 2^17 elements (4.3 GB)."""
    n, v = 16385, 131072
    x = torch.empty(n, v, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(14)
    # One block of random rows, repeated (drawing 2^31 normals took most of the test's ~50 s),
    # the last two drawn apart: an offset wrapped modulo 2^31 would read row 0's twin there.
    block = (torch.randn(2048, v, generator=g) * 3).to(torch.bfloat16)
    for i in range(0, n, 2048):
        x[i : i + 2048] = block[: n - i]
    x[-2:] = torch.randn(2, v, generator=g) * 3
    y = torch.randint(0, v, (n,), generator=g)
    out = pg_kernels.token_stats(x, y, backend="cpu")
    rows = [0, n // 2, n - 2, n - 1]  # the last rows start past 2^31 elements
    ref = reference.token_stats(x[rows], y[rows])
    for name in ("logprob", "entropy", "collision", "lse"):
        torch.testing.assert_close(
            getattr(out, name)[rows].double(), getattr(ref, name), rtol=2e-5, atol=1e-5
        )


# --- bad input ----------------------------------------------------------------------------

BAD_INPUTS = [
    (lambda x, y: pg_kernels.token_stats(x[0], y[0, 0]), ValueError, "labels must have"),
    (lambda x, y: pg_kernels.token_stats(x, y[:, :-1]), ValueError, "labels must have"),
    (lambda x, y: pg_kernels.token_stats(x, y.float()), TypeError, "labels must be int64 or int32"),
    (lambda x, y: pg_kernels.token_stats(x.long(), y), TypeError, "logits must be bf16"),
    (lambda x, y: pg_kernels.token_stats(x[..., :0], y), ValueError, "V == 0"),
    (
        lambda x, y: pg_kernels.token_stats(x, y, temperature=0.0),
        ValueError,
        "temperature must be finite and > 0",
    ),
    (  # rounds to 0 in fp32, as the kernels take it
        lambda x, y: pg_kernels.token_stats(x, y, temperature=1e-46),
        ValueError,
        "temperature must be finite and > 0 in float32",
    ),
    (  # rounds to inf in fp32
        lambda x, y: pg_kernels.token_stats(x, y, temperature=4e38),
        ValueError,
        "temperature must be finite and > 0 in float32",
    ),
    (  # subnormal: 1 / tau overflows fp32 (NaN rows from the kernels; the truth is finite)
        lambda x, y: pg_kernels.token_stats(x, y, temperature=3e-39),
        ValueError,
        "temperature must be finite and > 0 in float32 (at least its smallest normal",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, temperature=torch.full((2, 3), 1e-39)),
        ValueError,
        "temperature.flatten()[0] = 1.0000002153053333e-39 must be finite and > 0 in float32",
    ),
    (  # the value as passed, not as rounded to fp32 (0.0)
        lambda x, y: pg_kernels.token_stats(
            x, y, temperature=torch.full((2, 3), 1e-320, dtype=torch.float64)
        ),
        ValueError,
        "temperature.flatten()[0] = 1e-320 must be",
    ),
    (  # an int past the float range: not a bare OverflowError naming nothing
        lambda x, y: pg_kernels.token_stats(x, y, temperature=10**400),
        ValueError,
        "temperature must be finite",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, temperature=float("nan")),
        ValueError,
        "temperature",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, temperature=-torch.ones(2, 3)),
        ValueError,
        "temperature.flatten()[0]",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, temperature=torch.ones(3)),
        ValueError,
        "per-row temperature",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, backend="tpu"),
        ValueError,
        "backend must be one of",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, backend="cuda"),
        RuntimeError,
        "backend 'cuda' cannot run here",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y.index_fill(1, torch.tensor([2]), 50)),
        ValueError,
        "labels[0, 2] = 50 is outside [0, 50)",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y.index_fill(0, torch.tensor([1]), -3)),
        ValueError,
        "labels[1, 0] = -3",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x.transpose(1, 2), y),
        ValueError,
        "contiguous in its last",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x, y, ignore_index=1.5),
        TypeError,
        "ignore_index must be an int",
    ),
    (  # torch would wrap 2**32 to 0 in labels != ignore_index; the kernels would not
        lambda x, y: pg_kernels.token_stats(x, y.int(), ignore_index=2**32),
        ValueError,
        "ignore_index = 4294967296 does not fit the labels' torch.int32",
    ),
    (
        lambda x, y: pg_kernels.token_stats(x.to("meta"), y),
        ValueError,
        "labels is on cpu but logits on meta",
    ),
]


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_clear_error(case):
    fn, exc, msg = BAD_INPUTS[case]
    x, y = make_logits((2, 3), 50, seed=15), make_labels((2, 3), 50, seed=15)
    with pytest.raises(exc, match=None) as info:
        fn(x, y)
    assert msg in str(info.value), str(info.value)


def test_numpy_scalars_are_numbers():
    """NumPy scalars (a temperature read off a config array, an ignore_index from a tokenizer)
    are numbers: they were refused with a TypeError ("got float32", which reads as torch's)."""
    x, y = make_logits((2, 3), 50, seed=15), make_labels((2, 3), 50, seed=15)
    y[0, 1] = -100
    want = pg_kernels.token_stats(x, y, temperature=0.5, ignore_index=-100)
    got = pg_kernels.token_stats(x, y, temperature=np.float32(0.5), ignore_index=np.int64(-100))
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_least_temperature_is_the_smallest_normal():
    """The bound's edge: the smallest normal fp32 is taken and its rows are right (logits in
    units of it, so that x / tau stays in range; forward only: the gradient, divided by tau,
    leaves fp32's range)."""
    tau = torch.finfo(torch.float32).smallest_normal
    x, y = make_logits((3,), 7, seed=4) * tau, make_labels((3,), 7, seed=4)
    got = pg_kernels.token_stats(x, y, temperature=tau)
    want = reference.token_stats(x.double(), y, temperature=tau)
    for name in ("logprob", "entropy", "collision", "lse"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_check_labels_names_position():
    with pytest.raises(ValueError, match=r"labels\[1, 2\] = 9 is outside \[0, 9\)"):
        pg_kernels.check_labels(torch.tensor([[0, 1, 2], [3, 4, 9]]), 9)
    pg_kernels.check_labels(torch.tensor([[0, -100], [8, 3]]), 9)


def _allocated_bytes(fn) -> int:
    """Bytes of CPU tensor memory allocated while fn runs (torch profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@needs_cpu_ext
def test_memory_forward_o_n_backward_only_the_gradient():
    n, v = 256, 32000
    x = make_logits(n, v, torch.float32, seed=16)
    y = make_labels((n,), v, seed=16)
    pg_kernels.token_stats(x, y, backend="cpu")  # warm up
    # The measurement sees [N, V] temporaries: the eager reference makes several.
    assert _allocated_bytes(lambda: reference.token_stats(x, y, upcast=False)) > 2 * x.numel() * 4
    fwd = _allocated_bytes(lambda: pg_kernels.token_stats(x, y, backend="cpu"))
    assert fwd <= 16 * 8 * n, f"forward allocated {fwd} bytes for {n} rows: an [N, V] temporary?"
    xg = x.clone().requires_grad_()
    out = pg_kernels.token_stats(xg, y, backend="cpu")
    loss = (out.logprob + out.entropy + out.collision + out.lse).sum()
    bwd = _allocated_bytes(lambda: loss.backward())
    assert x.numel() * 4 <= bwd <= x.numel() * 4 + 64 * 8 * n, f"backward allocated {bwd} bytes"


def test_import_without_compiled_extensions():
    """With no _C, pg_kernels imports, says why, and the reference backend serves."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for m in ('_C', '_C_avx512', '_C_cuda'): sys.modules['pg_kernels.' + m] = None\n"
        "import torch, pg_kernels\n"
        "x = torch.randn(3, 10); y = torch.tensor([1, 2, 3])\n"
        "assert pg_kernels._backend.resolve('t', 'auto', x.device) == 'reference'\n"
        "print(pg_kernels.token_stats(x, y).logprob.shape)\n"
        "print(pg_kernels.env_report())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "cpu       not built or not importable" in run.stdout, run.stdout


# --- GPU only: sizes CPU CI cannot afford -------------------------------------------------


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements(backend_device):
    """bf16 [16384, 151936]: 2.49e9 elements, row offsets past 2^31 (int64 indexing)."""
    backend, device = backend_device
    n, v = 16384, 151936
    g = torch.Generator(device=device).manual_seed(17)
    x = (torch.randn(n, v, generator=g, device=device, dtype=torch.bfloat16) * 3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g, device=device)
    out = pg_kernels.token_stats(x, y, backend=backend)
    out.logprob.sum().backward()
    rows = [0, n // 2, n - 2, n - 1]
    ref = reference.token_stats(x.detach()[rows].double(), y[rows])
    for name in ("logprob", "entropy", "collision", "lse"):
        torch.testing.assert_close(
            getattr(out, name)[rows].double(), getattr(ref, name), rtol=2e-5, atol=1e-5
        )
    p = (x.detach()[rows[-1]].double() - ref.lse[-1]).exp()
    want = -p
    want[y[rows[-1]]] += 1
    torch.testing.assert_close(x.grad[rows[-1]].double(), want, rtol=2**-7, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_largest_vocab(backend_device, dtype):
    backend, device = backend_device
    for n in (1, 37):
        x = make_logits(n, 262144, dtype, device=device, seed=18)
        y = make_labels((n,), 262144, device=device, seed=18)
        check_against_reference(_op(backend), reference.token_stats, (x, y), {}, diff_fields=DIFF)
