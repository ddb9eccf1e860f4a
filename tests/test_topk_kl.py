"""topk_kl against the float64 reference on every backend with a kernel, plus the op contract."""

from __future__ import annotations

import math

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
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
INF = float("inf")


pytestmark = pytest.mark.op("topk_kl")


@pytest.fixture
def bd(backend_device):
    """(backend, device) of a topk_kl kernel (conftest generates only pairs that exist)."""
    return backend_device


def _op(backend):
    def op(logits, topk_ids, topk_logprobs, **kw):
        return pg_kernels.topk_kl(logits, topk_ids, topk_logprobs, backend=backend, **kw)

    return op


def make_topk(logits, k, *, seed, noise=1.0, lp_dtype=None):
    """q from logits + noise (float64): its top-k ids (in random order), their log-probs, and
    q's full logits (for the full KL)."""
    g = torch.Generator().manual_seed(seed)
    base = logits.detach().double().cpu()
    ref_logits = base + torch.randn(base.shape, generator=g, dtype=torch.float64) * noise
    logq = ref_logits.log_softmax(-1)
    lp, ids = logq.topk(k, dim=-1)
    perm = torch.rand(ids.shape, generator=g).argsort(-1)
    lp_dtype = lp_dtype or (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    dev = logits.device
    return ids.gather(-1, perm).to(dev), lp.gather(-1, perm).to(lp_dtype).to(dev), ref_logits


def _shapes(backend: str, device: str):
    """(N, V, K): odd vocab sizes and a real one."""
    if interpreted(backend, device):
        return [(3, 7, 3), (4, 1000, 20), (2, 5003, 20)]
    return [(3, 7, 3), (16, 1000, 20), (8, 32003, 50), (2, 151936, 20)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(bd, dtype):
    backend, device = bd
    for i, (n, v, k) in enumerate(_shapes(backend, device)):
        x = make_logits(n, v, dtype, device=device, seed=i)
        near_one_hot(x, slice(0, 1))  # p's tail ~e^-40: log p_tail must not cancel
        ids, lp, _ = make_topk(x, k, seed=i, noise=0.5 + i)
        y = make_labels((n,), v, device=device, seed=i)
        check_against_reference(
            _op(backend), reference.topk_kl, (x, ids, lp), {"labels": y}, diff_fields=("out",),
            seed=i,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature(bd, dtype):
    backend, device = bd
    x = make_logits((2, 3), 1000, dtype, device=device, seed=1)
    ids, lp, _ = make_topk(x, 16, seed=1)
    per_row = torch.rand(2, 3, dtype=torch.float64, device=device) * 2 + 0.25
    for temperature in (0.7, per_row):
        check_against_reference(
            _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": temperature},
            diff_fields=("out",),
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fill", ["finfo.min", -1e30], ids=str)
def test_tail_masked_with_a_huge_finite_fill(bd, dtype, fill):
    """Most of the tail masked with a finite fill (finfo.min, as Hugging Face masks, or -1e30)
    instead of -inf: no mass. A Triton lane's reference r / tau rounds by up to e^(2^75) there
    (the exponent of its own max: a NaN row before `_lane_reference`)."""
    backend, device = bd
    lo = torch.finfo(dtype).min if fill == "finfo.min" else fill
    x = make_logits(3, 211, torch.float32, seed=5)
    ids, lp, _ = make_topk(x, 3, seed=5, noise=0.3)
    keep = torch.zeros(x.shape, dtype=torch.bool)
    keep.scatter_(1, ids, True)
    keep[:, 100:140] = True
    x = x.masked_fill(~keep, lo).to(dtype).to(device)
    ids, lp = ids.to(device), lp.to(device)
    for temperature in (1.0, 0.33):
        check_against_reference(
            _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": temperature},
            diff_fields=("out",),
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "fill, temperature",
    [(-1e30, 1.0), (-1e30, 0.6), (-1e30, 16.7), ("finfo.min", 1.0), ("finfo.min", 1.3)],
    ids=str,
)
def test_rows_masked_whole_with_a_finite_fill(bd, dtype, fill, temperature):
    """Row 0 masked whole with a huge finite fill, ids included: uniform, the KL of q against
    1 / V. Row 1: the tail masked so, the head not: log P_tail ~ fill / tau, a KL of ~q_tail
    |fill| / tau. Triton's lanes push logits that far out to no mass (`_lane_reference`): a
    tail of them is read again (`_row_tail`), and a row whose max is that far out takes its
    backward relative to its max logit read again (`_is_far`); both rows were +inf."""
    backend, device = bd
    lo = torch.finfo(dtype).min if fill == "finfo.min" else fill
    x = make_logits(3, 151, torch.float32, seed=11)
    ids, lp, _ = make_topk(x, 4, seed=11, noise=0.5)
    tail = torch.ones(x.shape, dtype=torch.bool).scatter_(1, ids, False)
    x[0] = lo
    x[1] = x[1].masked_fill(tail[1], lo)
    x = x.to(dtype).to(device)
    ids, lp = ids.to(device), lp.to(device)
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": temperature},
        diff_fields=("out",),
    )  # fmt: skip


def test_tail_far_below_the_head_gradient(bd):
    """The fuzzer's row (C++, seed 20261212): a tail of one -1e30 logit at tau 16.7, log P_tail
    = -6e28, and q_tail = 1.4e-8 (the top-2 log-probs' own rounding): a KL of 8.6e20, and the
    tail entry's gradient -q_tail / tau = -8.6e-10. The backward's single exponent (z_j - m) -
    (log s - log(q_tail / P_tail - Q)) cancelled two terms of 6e28 (-0.06 there); beyond
    |tail_log| = 32 it takes the tail's own softmax (Triton: read again, `_row_tail`)."""
    backend, device = bd
    x = torch.tensor([[-1e30, 3.0, 1.0]], device=device)
    ids = torch.tensor([[1, 2]], device=device)
    lp = torch.tensor([[-0.1269280165, -2.1269280910]], device=device)
    tau = torch.tensor([16.714989565055827], dtype=torch.float64, device=device)
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": tau}, diff_fields=("out",)
    )


def test_small_temperature_peaked_rows(bd):
    """p and q one-hot on the same id at |z| ~ 1e4 (tau 0.07): the gradient there, Q p - q, is 0
    to rounding. From a saved L the backward's p = exp(z - L) carried ulp(L) / 2 ~ 4.9e-4 and
    the C++ kernel's gradient entry was 2.2e-3 where the truth is 0 (plain PyTorch: 2.7e-7);
    the backward now works relative to the saved row max, p = exp((z - m) - log s)."""
    backend, device = bd
    x = make_logits(3, 383, torch.float32, device=device, scale=600.0, seed=21)
    near_one_hot(x, slice(0, 3), gap=60.0)
    ids, lp, _ = make_topk(x, 24, seed=21, noise=0.0)
    tau = torch.tensor([0.0736, 0.12, 0.3], dtype=torch.float64, device=device)
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": tau}, diff_fields=("out",)
    )


def test_tied_maxima_at_large_z_fp64(bd):
    """Two tied maxima at |z| ~ 4927 (tau 0.125), k = 1, q = p = 1/2 on the id (fuzzer, fp64
    [1, 7]): KL 2.7e-34 (50-digit mpmath), which the kernels give as 0. The float64 truth
    formed log p = z - L and read ulp(L) / 2 as 1.7e-13 (the rule then allowed 5e-14); it now
    forms log p relative to the row max, as the kernels do. Plain PyTorch keeps z - L and its
    1.7e-13."""
    backend, device = bd
    x = torch.tensor([[0.0, 0.0, 616.9736177414154, 616.9736177414154, -INF, -616.9736177414154,
                       308.4868088707077]], dtype=torch.float64, device=device)  # fmt: skip
    ids = torch.tensor([[3]], device=device)
    lp = torch.tensor([[-0.6931471805599453]], dtype=torch.float64, device=device)
    kw = {"temperature": torch.tensor([0.12523144392154753], dtype=torch.float64, device=device)}
    assert float(reference.topk_kl(x, ids, lp, **kw).abs()) < 1e-30
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), kw, diff_fields=("out",))


def test_tail_holding_most_of_the_mass(bd):
    """Near-uniform rows, k = 2 of V = 321, q = p on the ids (one row per call: the rule's 2x
    plain PyTorch is per batch): log P_tail ~ -0.006 is a small difference of log s_tail and
    log s (~5.8). As that difference of two fp32 logs, each rounded once, the KL was off by
    2.6e-7 and 3.3e-7 where the truth is ~1e-16 (plain PyTorch 2.3e-8 and 1.5e-7), 1.8e-7 and
    2.6e-7 on KLs of ~1e-5 (plain 5.2e-8, 2.4e-8); both kernels now take
    log P_tail = -log1p(head / tail) when the tail holds most of the mass (Triton: <= 8e-12)."""
    backend, device = bd
    for seed, scale, tau in ((0, 0.5, 1.0), (3, 0.5, 1.0), (8, 0.05, 2.0), (9, 0.05, 2.0)):
        x = make_logits(1, 321, torch.float64, scale=scale, seed=seed)
        ids, lp, _ = make_topk(x, 2, seed=seed, noise=0.0)
        t = torch.tensor([tau], dtype=torch.float64, device=device)
        args = (x.float().to(device), ids.to(device), lp.float().to(device))
        check_against_reference(
            _op(backend), reference.topk_kl, args, {"temperature": t}, diff_fields=("out",)
        )


# Open under a GPU's arithmetic (PGK_EMULATE_GPU, CONTRIBUTING.md):
# 4096 tied exps carry one ex2 error.
@pytest.mark.usefixtures("numpy_arithmetic")
def test_tail_sum_of_many_tied_logits(bd):
    """fp32 [1, 4096] of integer logits in [-4, 2], k = 18 with q = p rounded (a fuzzer find):
    fp32 lanes summed the ~4078 tail terms ~1e-6 short, and an id's gradient entry came out
    1.0e-6 off relative to p_j (plain PyTorch: 2e-8); the C++ pass now sums in double lanes
    (5.9e-8: ulp(log s) / 2 of the saved normalizer); the Triton lanes in fp64 (fp32 lanes: a
    gradient entry 8.3e-10 off where the truth is ~0, plain 7.3e-12)."""
    backend, device = bd
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(-4, 3, (1, 4096), generator=g).double()
        ids, lp, _ = make_topk(x, 18, seed=seed, noise=0.0)
        args = (x.float().to(device), ids.to(device), lp.to(device))
        check_against_reference(
            _op(backend), reference.topk_kl, args, {}, diff_fields=("out",), seed=seed
        )


def test_small_kl_of_two_entries(bd):
    """bf16 [1, 2], k = 1 at tau 0.645, a KL of 1.9e-6 (a fuzzer find): the Triton finish in
    fp32 took log s = log(tail + head) (ulp(log s) / 2 in every log-prob) and log P_tail as
    (m_tail - m) + log s_tail - log s, and was off by 4.7e-8 (allowed 2.6e-8, plain PyTorch
    1.3e-8); in fp64 with log P_tail = -log1p(head / tail) it is 3.4e-12 off (C++: 1.7e-8)."""
    backend, device = bd
    x = torch.tensor([[-1.2578125, -1.25]], dtype=torch.bfloat16, device=device)
    ids = torch.tensor([[1]], device=device)
    lp = torch.tensor([[-0.6890532374382019]], dtype=torch.float32, device=device)
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": 0.644772645674319},
        diff_fields=("out",),
    )  # fmt: skip


def test_peaked_row_at_large_logits(bd):
    """x = [1800, 1770], q one-hot on the max: KL = -log p_0 = log1p(e^-30) = 9.36e-14. The
    float64 truth took z - L, with L = 1800 + 9.4e-14 rounded at ulp(1800) / 2 = 1.1e-13, and
    said 0 (a fuzzer find: fp16 [1, 127] at |z| ~ 1800, a kernel's 1.1339e-13 failed against a
    truth of -7e-17; 60 digits: 1.1348e-13); the truth now keeps the normalizer's rest."""
    backend, device = bd
    x = torch.tensor([[1800.0, 1770.0]], device=device)
    ids = torch.tensor([[0]], device=device)
    lp = torch.zeros(1, 1, device=device)
    truth = float(reference.topk_kl(x, ids, lp))
    assert abs(truth - math.log1p(math.exp(-30.0))) <= 1e-28
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), {}, diff_fields=("out",))


def test_q_tail_of_a_peaked_row_at_a_small_temperature(bd):
    """fp32 [1, 63], k = 6 at tau 0.07 (the fuzzer's class: fp32 [2, 63] at tau 0.072, a KL of
    0.043 off by 1.05e-5, plain PyTorch 1.6e-6): p one-hot at |z| ~ 150, q's tail 1e-4 against
    log P_tail ~ -150. The KL's tail term q_tail (log q_tail - log P_tail) multiplies q_tail's
    error by ~150, and 1 - sum_K q_v from fp32 q's (q_max ~ 0.9997) carried 1-2 ulp(1) / 2:
    the C++ KL was 1.05e-5 off (plain PyTorch 7.9e-7, allowed 2.3e-6). q_tail now comes from
    double q's (Triton: fp64)."""
    backend, device = bd
    x = make_logits(1, 63, torch.float64, scale=1.0, seed=3)
    near_one_hot(x, [0], gap=10.0)
    ids, lp, _ = make_topk(x, 6, seed=3, noise=0.1)
    t = torch.tensor([0.07], dtype=torch.float64, device=device)
    args = (x.float().to(device), ids.to(device), lp.float().to(device))
    check_against_reference(
        _op(backend), reference.topk_kl, args, {"temperature": t}, diff_fields=("out",), seed=3
    )


def test_q_tail_below_ulp_of_one_fp64(bd):
    """fp64, q_tail = 6.4e-17 (60-digit mpmath) against log P_tail = -972.6 (the fuzzer's
    class: fp64 [1, 1282] at tau 0.135, the same log-probs): 1 - sum q_v rounds at
    ulp(1) / 2 even in float64 (exp(log q_max) alone rounds at 5.5e-17), times ~990. The
    float64 truth gave q_tail = 0 and a KL 6.0e-14 off, the C++ kernel 1.1e-16 and 4.4e-14
    off (the fuzzer's failure was their 1.0e-13 difference, allowed 5e-14); both now take
    -expm1(log q_max) - the other q's: 7e-21 and 3e-20 off. Triton's 1 - sum q_v in fp64
    keeps plain PyTorch's rounding, which the rule allows."""
    backend, device = bd
    x = torch.tensor([[0.0, -115.8, -113.3, -972.6]], dtype=torch.float64, device=device)
    ids = torch.tensor([[2, 1, 0]], device=device)
    lp = torch.tensor([[-15.332642365996401, -15.675443181180038, -3.750232849378334e-07]],
                      dtype=torch.float64, device=device)  # fmt: skip
    exact = 3.6700849795252624e-05  # 60-digit mpmath
    assert abs(float(reference.topk_kl(x, ids, lp)) - exact) < 1e-18
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), {}, diff_fields=("out",))
    if backend == "cpu":  # Triton's fp64 1 - sum q_v: within the rule (plain PyTorch's rounding)
        assert abs(float(_op(backend)(x, ids, lp)) - exact) < 1e-18


def test_empty_tail_and_fp64_log_probs_short_by_rounding(bd):
    """fp64 log-probs whose exps sum to 1 in float64 but fall short of it by 5.6e-17 in the
    -expm1 form, on ids that cover every finite logit (a fuzzer find against the truth's
    -expm1 q_tail): against an empty tail only whether q_tail > 0 matters, and the truth,
    the kernels and plain PyTorch all take 1 - sum q_v there: a finite KL, not +inf."""
    backend, device = bd
    x = torch.tensor([[-INF] * 11 + [6.0, 5.0]], dtype=torch.float64, device=device)
    ids = torch.tensor([[11, 12]], device=device)
    lp = torch.tensor([[-0.31326168751822286, -1.3132616875182228]], dtype=torch.float64,
                      device=device)  # fmt: skip
    kw = {"temperature": 16.715}
    assert math.isfinite(float(reference.topk_kl(x, ids, lp, **kw)))
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), kw, diff_fields=("out",))


def _fuzz_row(seed, v, k, dtype, scale, tau, noise, device):
    """One fuzzer-style row: logits ~ N(0, scale^2), q from them plus noise, a per-row tau."""
    x = make_logits(1, v, torch.float64, scale=scale, seed=seed)
    ids, lp, _ = make_topk(x, k, seed=seed, noise=noise)
    t = torch.tensor([tau], dtype=torch.float64, device=device)
    return (x.to(dtype).to(device), ids.to(device), lp.float().to(device)), {"temperature": t}


def test_head_gradient_of_a_peaked_row(bd):
    """fp32 [1, 127], k = 11, |z| ~ 3300 (a fuzzer find): the max's gradient entry Q p - q
    cancels two numbers near 1, and from fp32 exps it was 4.3490e-5 where the truth is
    4.3289e-5 (plain PyTorch the same; with the drawn upstream gradient plain PyTorch was
    luckier by 2.06x). Both backwards form the ids' entries in fp64 / double: 4.3289e-5 (the
    C++ one's fp32 entries were 3.1e-9 off, plain PyTorch 1.5e-9; now 0)."""
    backend, device = bd
    args, kw = _fuzz_row(563425873, 127, 11, torch.float32, 121.68676789654674,
                         0.08634184900768847, 4.0, device)  # fmt: skip
    check_against_reference(
        _op(backend), reference.topk_kl, args, kw, diff_fields=("out",), seed=563425873
    )


def test_q_tail_of_rounding_size_beside_a_far_tail(bd):
    """fp32 [1, 127], k = 20, |z| ~ 5000 (a fuzzer find): the K log-probs sum past 1 in float64
    (by 4.4e-11), so q_tail = 0, but short of it in an fp32 tree sum (by 6e-8). The Triton
    backward took that 6e-8 as q_tail against a tail 5400 below the head: a gradient of 1.1e-6
    on the tail's max logit where the truth is 0. q_tail now comes from the float64 sum
    (wherever the fp32 sum leaves one at all), forward and backward alike."""
    backend, device = bd
    args, kw = _fuzz_row(896655678, 127, 20, torch.float32, 269.55535238759956,
                         0.05191488612268159, 4.0, device)  # fmt: skip
    check_against_reference(
        _op(backend), reference.topk_kl, args, kw, diff_fields=("out",), seed=896655678
    )


def test_fp16_subnormal_gradients(bd):
    """fp16 rows whose gradient entries fall below fp16's normal range (6.1e-5) by the
    thousand: each must be the float64 gradient rounded once, subnormals kept. From fp32
    coefficients (log s, q_tail, the tail factor) the Triton kernel was 1-2 subnormal ulps off
    on 33 of 9827 such entries and flushed one to 0 (the C++ kernel: 27 off, plain PyTorch
    24); the fp64 finish and coefficients leave none (C++, double: 3 of the first case's 56
    entries off before, none now). The first case's KL was also 1.7e-6 off (plain PyTorch
    6.8e-7)."""
    backend, device = bd
    for seed, scale, tau, noise, gap in ((1, 3.0, 0.3, 0.5, 12.0), (3, 4.0, 1.0, 0.1, 9.0)):
        x64 = make_logits(2, 300, torch.float64, scale=scale, seed=seed)
        near_one_hot(x64, [0, 1], gap=gap)
        ids, lp, _ = make_topk(x64, 8, seed=seed, noise=noise)
        x = x64.half().to(device)
        ids, lp = ids.to(device), lp.float().to(device)
        check_against_reference(
            _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": tau},
            diff_fields=("out",), seed=seed,
        )  # fmt: skip
        grads = []
        for fn in (_op(backend), reference.topk_kl):
            xx = x.clone().requires_grad_()
            (g,) = torch.autograd.grad(fn(xx, ids, lp, temperature=tau).double().sum(), xx)
            grads.append(g)  # the reference's: float64, rounded once to fp16 by autograd
        got, want = grads
        sub = (want != 0) & (want.abs() < 6.1e-5)
        assert int(sub.sum()) > 50
        assert torch.equal(got[sub], want[sub]), (got[sub] - want[sub]).abs().max()


def test_q_tail_short_by_rounding_beside_a_far_tail(bd):
    """fp32 [1, 7], k = 3 (a fuzzer find): three tied maxima with q = 1/3 each as fp32
    log-probs, which sum short of 1 by 2e-8 in float64, and a tail e^-64 below. Triton's fp32
    sum of the q's reached 1 and dropped the tail bucket: KL -2.0e-8 where the truth is 9.0e-7
    (plain PyTorch 4.6e-7). q_tail comes from the float64 sum unless the tail is empty. (The
    C++ kernel's fp32 q_tail, 6.0e-8, gave 2.8e-6; from double q's 9.0e-7, 1.1e-14 off.)"""
    backend, device = bd
    x = torch.tensor(
        [[68.73112487792969] * 3 + [4.758563041687012, 3.10560941696167, 2.791536331176758,
                                    4.593478679656982]], device=device,
    )  # fmt: skip
    ids = torch.tensor([[1, 2, 0]], device=device)
    lp = torch.full((1, 3), -1.0986123085021973, device=device)
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"labels": torch.tensor([4], device=device)},
        diff_fields=("out",),
    )  # fmt: skip


def test_q_tail_edge_cases(bd):
    """q_tail = 0 (top-k holding all of q), sum q_v > 1 (clamped), a q_v = 0 on a -inf logit."""
    backend, device = bd
    v, k = 1000, 8
    x = make_logits(4, v, torch.float32, device=device, seed=2)
    ids, lp, _ = make_topk(x, k, seed=2)
    lp[0] = lp[0] - lp[0].double().exp().sum().log().float()  # sum q = 1 up to rounding
    lp[1] = lp[1] - lp[1].double().exp().sum().log().float() + 1e-3  # sum q > 1: q_tail = 0
    lp[2, 0] = -INF  # q_v = 0 ...
    x[2, ids[2, 0]] = -INF  # ... on a -inf logit: adds exactly 0
    lp[3] = lp[3] - 30.0  # q's tail holds almost everything
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), {}, diff_fields=("out",))
    out = _op(backend)(x, ids, lp)
    assert torch.isfinite(out).all()


def test_tail_far_below_the_head(bd):
    """p's tail ~e^-150 below the head (exp(z - m) underflows in fp32; q_tail / p_tail would
    overflow): log p_tail and the tail gradient -q_tail p_j / p_tail stay accurate."""
    backend, device = bd
    v, k = 5000, 10
    x = make_logits(3, v, torch.float32, device=device, seed=20, scale=1.0)
    ids, lp, _ = make_topk(x, k, seed=20)
    for r, gap in enumerate((150.0, 60.0, 100.0)):
        x[r, ids[r]] += gap
    lp[2] = lp[2] - lp[2].double().exp().sum().log().float() - 1e-3  # q_tail ~1e-3
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), {}, diff_fields=("out",))
    xg = x.clone().requires_grad_()
    _op(backend)(xg, ids, lp).sum().backward()
    assert torch.isfinite(xg.grad).all() and (xg.grad[0].abs().sum() > 0)


def test_ids_at_edges_and_chunk_boundaries(bd):
    """Ids at 0, V - 1 and on both sides of the CPU kernel's 2048-element chunk boundaries."""
    backend, device = bd
    v = 10000
    x = make_logits(3, v, torch.float32, device=device, seed=21)
    edge = torch.tensor([0, v - 1, 2047, 2048, 4095, 4096, 8191, 8192], device=device)
    ids = torch.stack([edge, edge.flip(0), torch.randperm(v)[:8].to(device)])
    x[0, edge] += 6.0  # the head holds most of p in row 0
    lp = torch.randn(3, 8, generator=torch.Generator().manual_seed(21)).log_softmax(-1) - 0.1
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp.to(device)), {}, diff_fields=("out",)
    )


@pytest.mark.backends("triton")
def test_many_chunks_per_row(bd, small_triton_blocks):
    """Rows cut into many chunk programs (Triton; small blocks): ids masked inside chunks and on
    their edges, tail states merged in chunk order, a -inf run covering whole chunks."""
    backend, device = bd
    v = 1000  # fp32: 16-element blocks, 32-element chunks: 32 chunk programs per row
    x = make_logits(3, v, torch.float32, device=device, seed=24)
    ids, lp, _ = make_topk(x, 12, seed=24)
    ids[0, :4] = torch.tensor([31, 32, 63, 64], device=device)  # on chunk edges
    x[1, 200:400] = -INF
    x[2, 990] = x[2].max() + 3.0  # the tail max in the last chunk
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"temperature": 0.8}, diff_fields=("out",)
    )


@pytest.mark.backends("triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_of_odd_stride(bd, dtype, small_triton_blocks):
    """Rows that start at odd elements (a [3, 1001] tensor sliced to V = 1000: `row_align` 1,
    each lane's elements by scalar loads) give the same bits as the same rows contiguous
    (vector loads), forward and gradient, with ids on the lanes' bits of full blocks (small
    blocks), and the float64 reference's values."""
    backend, device = bd
    base = make_logits(3, 1001, dtype, device=device, seed=26)
    ids, lp, _ = make_topk(base[:, :1000], 12, seed=26)
    ids[0, :4] = torch.tensor([31, 32, 63, 64], device=device)  # on block and chunk edges
    base[1, 200:400] = -INF

    def run(x):
        out = _op(backend)(x, ids, lp, temperature=0.8)
        out.sum().backward()
        return out

    odd = base.clone().requires_grad_()
    dense = base[:, :1000].contiguous().requires_grad_()
    assert torch.equal(run(odd[:, :1000]), run(dense))
    assert torch.equal(odd.grad[:, :1000], dense.grad)
    check_against_reference(
        _op(backend), reference.topk_kl, (base[:, :1000], ids, lp), {"temperature": 0.8},
        diff_fields=("out",),
    )  # fmt: skip


def test_ids_on_every_lane_bit(bd):
    """Ids on chosen elements of 16-byte vectors (8 bf16) at the first and the last step of a
    Triton chunk (4096-element steps, 4 per chunk: bits 0-31 of a lane's id bits), next to
    elements that are not ids, and across a step boundary. Row 0's ids lie 30 above the rest:
    one counted in the tail would dominate p_tail."""
    backend, device = bd
    v = 20000
    x = make_logits(2, v, torch.bfloat16, device=device, seed=25)
    last = 3 * 4096
    picked = [1, 3, 5, 7, 14, last + 15, last + 16, last + 18, 4094, 4095, 4096, 4097]
    rest = 13000 + torch.randperm(7000, generator=torch.Generator().manual_seed(25))[:24]
    ids = torch.stack([torch.cat([torch.tensor(picked), rest[:12]]), rest]).to(device)
    x[0, ids[0]] += 30.0
    lp = torch.randn(2, 24, generator=torch.Generator().manual_seed(25)).log_softmax(-1) - 0.05
    lp = lp.to(device)
    out = _op(backend)(x, ids, lp, temperature=0.9)
    # fp32 sums of the rounded logits: the fp32 tolerance against the float64 truth (the bf16
    # rule's plain-PyTorch term would hide an id counted in the tail)
    truth = reference.topk_kl(x.double(), ids, lp.double(), temperature=0.9)
    torch.testing.assert_close(out.double(), truth, rtol=2e-5, atol=1e-6)


def test_neg_inf_entries(bd):
    """-inf logits add 0; q_v > 0 on a -inf logit, or q_tail > 0 against an all -inf tail, give
    +inf with the finite limit gradient (Q p_j - q_j on the ids, 0 on -inf logits)."""
    backend, device = bd
    # several CPU chunks / Triton blocks; the first all -inf in row 1
    v, k = (9000 if interpreted(backend, device) else 70000), 30
    x = make_logits(5, v, torch.float32, device=device, seed=3)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    x[mask.to(device)] = -INF
    x[1, : v // 2] = -INF
    ids, lp, _ = make_topk(torch.where(torch.isneginf(x), -1e4, x), k, seed=3)
    check_against_reference(_op(backend), reference.topk_kl, (x, ids, lp), {}, diff_fields=("out",))
    # Row 3: a q_v > 0 on a -inf logit. Row 4: every logit off the ids is -inf, q_tail > 0.
    x[3, ids[3, 5]] = -INF
    keep = torch.zeros(v, dtype=torch.bool, device=device)
    keep[ids[4]] = True
    x[4, ~keep] = -INF
    xk = x.clone().requires_grad_()
    out = _op(backend)(xk, ids, lp)
    xr = x.clone().requires_grad_()
    truth = reference.topk_kl(xr, ids, lp)
    assert out[3] == INF and out[4] == INF and torch.isfinite(out[:3]).all()
    torch.testing.assert_close(out[:3].double(), truth[:3], rtol=2e-5, atol=1e-6)
    out.sum().backward()
    truth.sum().backward()
    assert torch.isfinite(xk.grad).all()
    torch.testing.assert_close(xk.grad.double(), xr.grad.double(), rtol=0, atol=1e-6)
    assert (xk.grad[4][~keep] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ids_covering_every_finite_logit(bd, dtype):
    """Top-k ids that cover every finite logit (a policy masked to the engine's top-p support):
    log-probs summing to 1 within their own rounding leave no tail bucket, and the KL is finite
    on every row, in every backend and in the reference, whichever side of 1 each row's sum
    falls. A real tail mass (1e-3 here, beyond 2 K eps) against those -inf logits is +inf."""
    backend, device = bd
    n, v, k = 64, 50, 5
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    ids = torch.rand(n, v, generator=g).argsort(-1)[:, :k]
    support = torch.zeros(n, v, dtype=torch.bool).scatter_(-1, ids, True)
    x = x.masked_fill(~support, -INF)
    # The engine's log-probs of the same support, rounded to the op's accumulation dtype.
    lp = (x.gather(-1, ids) + torch.randn(n, k, generator=g, dtype=torch.float64) * 0.1)
    lp = lp.log_softmax(-1).to(dtype)
    x = x.to(dtype)
    short = 1.0 - lp.double().exp().sum(-1)
    assert (short > 0).any() and (short < 0).any()  # both sides of 1 are drawn
    out = _op(backend)(x.to(device), ids.to(device), lp.to(device))
    truth = reference.topk_kl(x, ids, lp)
    assert torch.isfinite(out).all() and torch.isfinite(truth).all()
    torch.testing.assert_close(out.double().cpu(), truth, rtol=2e-5, atol=1e-6)
    leaky = lp + math.log1p(-1e-3)  # q_tail = 1e-3 against an all -inf tail
    assert (_op(backend)(x.to(device), ids.to(device), leaky.to(device)) == INF).all()
    assert (reference.topk_kl(x, ids, leaky) == INF).all()


def test_equals_full_kl_at_k_equals_v(bd):
    backend, device = bd
    for v in (7, 200 if interpreted(backend, device) else 1000):
        x = make_logits(3, v, torch.float64, device=device, seed=4)
        ids, lp, ref_logits = make_topk(x, v, seed=4)
        xk = x.clone().requires_grad_()
        out = _op(backend)(xk, ids, lp)
        full = reference.kl_divergence(x, ref_logits.to(device), direction="forward")
        torch.testing.assert_close(out, full, rtol=1e-12, atol=1e-13)
        out.sum().backward()
        grad = x.softmax(-1) - ref_logits.to(device).softmax(-1)  # docs/math.md §4: p - q
        torch.testing.assert_close(xk.grad, grad, rtol=0, atol=1e-13)
        # fp32 log-probs (sum q != 1 by rounding): still finite and close
        out32 = _op(backend)(x.float(), ids, lp.float())
        torch.testing.assert_close(out32.double(), full, rtol=1e-5, atol=1e-6)


def test_lower_bound_on_full_kl(bd):
    """Data processing: KL_k <= KL(q || p) for every k, and KL_k grows with k."""
    backend, device = bd
    v = 200 if interpreted(backend, device) else 1000
    x = make_logits(8, v, torch.float64, device=device, seed=5)
    _, _, ref_logits = make_topk(x, 1, seed=5, noise=2.0)
    logq = ref_logits.log_softmax(-1).to(device)
    full = reference.kl_divergence(x, ref_logits.to(device), direction="forward")
    order = logq.argsort(-1, descending=True)
    prev = torch.zeros_like(full)
    for k in (1, 5, 50, v // 2, v - 1, v):
        ids = order[:, :k]
        out = _op(backend)(x, ids, logq.gather(-1, ids))
        assert (out <= full + 1e-12).all() and (out >= prev - 1e-12).all(), k
        prev = out
    torch.testing.assert_close(prev, full, rtol=1e-12, atol=1e-13)
    # fp32 logits and log-probs: within rounding of the bound
    ids = order[:, :20]
    out = _op(backend)(x.float(), ids, logq.gather(-1, ids).float())
    assert (out.double() <= full * (1 + 1e-5) + 1e-6).all()


def test_invalid_rows_stay_local(bd):
    backend, device = bd
    x = make_logits(5, 1000, torch.float32, device=device, seed=6)
    ids, lp, _ = make_topk(x, 10, seed=6)
    clean = _op(backend)(x, ids, lp)
    x[1, 10] = float("nan")
    x[2, ids[2, 3]] = INF  # +inf on one of the ids
    x[3] = -INF
    xg = x.clone().requires_grad_()
    out = _op(backend)(xg, ids, lp)
    assert torch.isnan(out[1:4]).all()
    assert torch.equal(out[[0, 4]], clean[[0, 4]])
    out.sum().backward()
    assert torch.isnan(xg.grad[1:4]).all() and torch.isfinite(xg.grad[[0, 4]]).all()


def test_ignore_index_rows(bd):
    """Ignored rows give 0 and zero gradient; their ids are never read (padding may be junk)."""
    backend, device = bd
    x = make_logits(4, 1000, torch.float32, device=device, seed=7)
    ids, lp, _ = make_topk(x, 10, seed=7)
    ids[1] = -1  # junk padding
    ids[3] = 0  # duplicates
    y = torch.tensor([3, -1, 999, -1], device=device)
    xg = x.clone().requires_grad_()
    out = _op(backend)(xg, ids, lp, labels=y, ignore_index=-1)
    assert (out[[1, 3]] == 0).all() and (out[[0, 2]] > 0).all()
    out.sum().backward()
    assert (xg.grad[[1, 3]] == 0).all() and (xg.grad[[0, 2]] != 0).any()
    check_against_reference(
        _op(backend), reference.topk_kl, (x, ids, lp), {"labels": y, "ignore_index": -1},
        diff_fields=("out",),
    )  # fmt: skip


def test_strided_input_is_read_in_place(bd):
    backend, device = bd
    base = make_logits((3, 5), 1000, torch.float32, device=device, seed=8)
    view = base[:, :-1]
    ids, lp, _ = make_topk(view, 12, seed=8)
    assert not view.is_contiguous()
    assert torch.equal(_op(backend)(view, ids, lp), _op(backend)(view.contiguous(), ids, lp))
    ids_view = torch.cat([ids, ids], -1)[..., :12]  # non-contiguous ids too
    assert torch.equal(_op(backend)(view, ids_view, lp), _op(backend)(view, ids, lp))
    check_against_reference(
        _op(backend), reference.topk_kl, (view, ids, lp), {}, diff_fields=("out",)
    )


def test_int32_ids_and_shift_invariance(bd):
    backend, device = bd
    x = make_logits(6, 1000, torch.float32, device=device, seed=9)
    ids, lp, _ = make_topk(x, 10, seed=9)
    a, b = _op(backend)(x, ids, lp), _op(backend)(x, ids.int(), lp)
    assert torch.equal(a, b)
    torch.testing.assert_close(_op(backend)(x + 11.0, ids, lp), a, rtol=1e-4, atol=1e-5)


def test_deterministic_and_batch_invariant(bd):
    backend, device = bd
    v = 40000
    x = make_logits(9, v, torch.bfloat16, device=device, seed=10)
    ids, lp, _ = make_topk(x, 20, seed=10)

    def run(xs, i, lps):
        xg = xs.clone().requires_grad_()
        out = _op(backend)(xg, i, lps)
        out.sum().backward()
        return out, xg.grad

    (a, ga), (b, gb) = run(x, ids, lp), run(x, ids, lp)
    alone, g_alone = run(x[4:5], ids[4:5], lp[4:5])
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.equal(a[4:5], alone) and torch.equal(ga[4:5], g_alone)


def test_empty_batch(bd):
    backend, device = bd
    x = torch.randn(0, 7, 100, device=device, requires_grad=True)
    ids = torch.zeros(0, 7, 5, dtype=torch.long, device=device)
    out = _op(backend)(x, ids, torch.zeros(0, 7, 5, device=device))
    assert out.shape == (0, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_inputs_not_mutated(bd):
    backend, device = bd
    x = make_logits(4, 1000, torch.bfloat16, device=device, seed=11)
    ids, lp, _ = make_topk(x, 10, seed=11)
    t = torch.rand(4, device=device) + 0.5
    copies = [x.clone(), ids.clone(), lp.clone(), t.clone()]
    xg = x.requires_grad_()
    _op(backend)(xg, ids, lp, temperature=t).sum().backward()
    for before, after in zip(copies, (x.detach(), ids, lp, t)):
        assert torch.equal(before, after)


def test_auto_backend_and_reference_backend_agree():
    x = make_logits(4, 1000, torch.float32, seed=12)
    ids, lp, _ = make_topk(x, 10, seed=12)
    a = pg_kernels.topk_kl(x, ids, lp)
    b = pg_kernels.topk_kl(x, ids, lp, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the op contract (CPU extension) ------------------------------------------------------

needs_cpu_ext = pytest.mark.skipif(
    pg_kernels._backend.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="C++ extension not built",
)


@needs_cpu_ext
def test_gradcheck_float64():
    x = make_logits(4, 11, torch.float64, seed=13).requires_grad_()
    ids, lp, _ = make_topk(x, 4, seed=13)
    lp[1] += 0.2  # sum q > 1: q_tail clamped to 0
    ids_all, lp_all, _ = make_topk(x, 11, seed=14)  # k = V
    t = torch.tensor([0.5, 1.0, 2.0, 1.3], dtype=torch.float64)
    y = torch.tensor([0, -100, 4, 7])

    def f(x):
        return (
            pg_kernels.topk_kl(x, ids, lp, temperature=t, labels=y, backend="cpu"),
            pg_kernels.topk_kl(x, ids_all, lp_all, temperature=0.8, backend="cpu"),
        )

    assert torch.autograd.gradcheck(f, (x,))


@needs_cpu_ext
def test_opcheck():
    x = make_logits(4, 33, torch.float32, seed=15)
    ids, lp, _ = make_topk(x, 5, seed=15)
    y = make_labels((4,), 33, seed=15)
    t = torch.rand(4) + 0.5
    for temp, labels in ((None, None), (t, y)):
        torch.library.opcheck(
            torch.ops.pg_kernels.topk_kl.default,
            (x.requires_grad_(), ids, lp, labels, temp, 1.3, -100, "cpu"),
        )
    kl, row_max, log_s, logp_tail = torch.ops.pg_kernels.topk_kl(
        x.detach(), ids, lp, y, None, 1.0, -100, "cpu"
    )
    args = (torch.randn(4), x.detach(), ids, lp, y, None, 1.0, -100, row_max, log_s, logp_tail,
            "cpu")  # fmt: skip
    torch.library.opcheck(torch.ops.pg_kernels.topk_kl_backward.default, args)


@needs_cpu_ext
def test_compile_fullgraph_matches_eager():
    x = make_logits((2, 3), 500, torch.float32, seed=16)
    ids, lp, _ = make_topk(x, 7, seed=16)
    y = make_labels((2, 3), 500, seed=16)

    def loss(x, ids, lp, y):
        kl = pg_kernels.topk_kl(x, ids, lp, temperature=0.9, labels=y)
        return (kl * 0.5).sum(), kl

    compiled = torch.compile(loss, fullgraph=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, ka = loss(xa, ids, lp, y)
    lb, kb = compiled(xb, ids, lp, y)
    la.backward()
    lb.backward()
    # The op's outputs and gradient bitwise; the loss's own sum may be fused in another order.
    assert torch.equal(ka, kb) and torch.equal(xa.grad, xb.grad)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)


@needs_cpu_ext
def test_kernel_rejects_bad_ids_without_python_checks():
    """The C++ kernel never reads out of bounds, even when called directly (no Python checks)."""
    x = make_logits(2, 50, torch.float32, seed=17)
    lp = torch.full((2, 3), -2.0)
    for bad, msg in (
        ([[0, 1, 50], [1, 2, 3]], "outside [0, 50)"),
        ([[0, 1, 1], [1, 2, 3]], "twice"),
    ):
        with pytest.raises(RuntimeError, match=None) as info:
            torch.ops.pg_kernels.topk_kl(x, torch.tensor(bad), lp, None, None, 1.0, -100, "cpu")
        assert msg in str(info.value)


# --- bad input ----------------------------------------------------------------------------


def _bad_cases():
    f = pg_kernels.topk_kl
    return [
        (lambda x, i, lp: f(x, i.float(), lp), TypeError, "topk_ids must be int64 or int32"),
        (lambda x, i, lp: f(x, i, lp.long()), TypeError, "topk_logprobs must be a floating"),
        (lambda x, i, lp: f(x, i[..., :0], lp[..., :0]), ValueError, "K >= 1"),
        (lambda x, i, lp: f(x, i, lp[..., :2]), ValueError, "topk_logprobs must have the shape"),
        (lambda x, i, lp: f(x, i[0], lp[0]), ValueError, "topk_ids must have shape [..., K]"),
        (lambda x, i, lp: f(x[..., :3], i, lp), ValueError, "K = 4 distinct ids cannot exist"),
        (lambda x, i, lp: f(x, i.tolist(), lp), TypeError, "topk_ids must be a torch.Tensor"),
        (
            lambda x, i, lp: f(x, i.index_fill(2, torch.tensor([1]), 50), lp),
            ValueError,
            "topk_ids[0, 0, 1] = 50 is outside [0, 50)",
        ),
        (
            lambda x, i, lp: f(x, i.index_fill(2, torch.tensor([3]), -1), lp),
            ValueError,
            "topk_ids[0, 0, 3] = -1",
        ),
        (
            lambda x, i, lp: f(x, torch.cat([i[..., :3], i[..., 1:2]], -1), lp),
            ValueError,
            "topk_ids[0, 0, 1] and topk_ids[0, 0, 3] are both",
        ),
        (
            lambda x, i, lp: f(x, i, lp.clone().requires_grad_()),
            ValueError,
            "topk_logprobs is not differentiable",
        ),
        (
            lambda x, i, lp: f(x, i, lp, labels=torch.zeros(2, dtype=torch.long)),
            ValueError,
            "labels must have",
        ),
        (lambda x, i, lp: f(x.long(), i, lp), TypeError, "logits must be bf16"),
        (lambda x, i, lp: f(x, i, lp, temperature=0.0), ValueError, "temperature must be finite"),
        (lambda x, i, lp: f(x, i, lp, backend="tpu"), ValueError, "backend must be one of"),
        (lambda x, i, lp: f(x, i, lp, backend="cuda"), RuntimeError, "cannot run here"),
        (lambda x, i, lp: f(x, i, lp, ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (
            lambda x, i, lp: f(x.to("meta"), i, lp),
            ValueError,
            "topk_ids is on cpu but logits on meta",
        ),
    ]


BAD_INPUTS = _bad_cases()


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_clear_error(case):
    fn, exc, msg = BAD_INPUTS[case]
    x = make_logits((2, 3), 50, seed=18)
    ids, lp, _ = make_topk(x, 4, seed=18)
    with pytest.raises(exc, match=None) as info:
        fn(x, ids, lp)
    assert msg in str(info.value), str(info.value)
