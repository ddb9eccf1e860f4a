"""mismatch_stats against the float64 reference on every backend with a kernel, the op contract,
and the properties of docs/math.md §5 (E_roll[k3] = KL, the first-order log-prob bound)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_kl_divergence import (
    against_no_mass,
    neg_inf_against_a_far_weight,
    two_temperatures_past_the_range,
)

import pg_kernels
from pg_kernels import reference
from pg_kernels.testing import (
    check_against_reference,
    interpreted,
    make_labels,
    make_logits,
    masked_with_a_huge_finite_fill,
    near_equal_rows,
    near_one_hot,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SAMPLED = ("log_ratio", "ratio", "k1", "k2", "k3", "abs_log_ratio", "chi2", "tis_weight",
           "icepop_weight")  # fmt: skip
INF = float("inf")


pytestmark = pytest.mark.op("mismatch_stats")


@pytest.fixture
def bd(backend_device):
    """(backend, device) of a mismatch_stats kernel (conftest generates only pairs that exist)."""
    return backend_device


def _op(backend):
    def op(logits, labels, rollout_logprobs, **kw):
        return pg_kernels.mismatch_stats(logits, labels, rollout_logprobs, backend=backend, **kw)

    return op


def _inputs(shape, v, dtype, device, seed, rollout_temperature=1.0):
    """Training logits, rollout logits (a perturbation; the last row independent), labels and
    the rollout engine's log-probs of the labels, with a few extreme rows."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    x = make_logits(shape, v, dtype, device=device, seed=seed)
    near_one_hot(x.view(-1, v), slice(0, 1))
    noise = make_logits(shape, v, torch.float64, scale=0.1, seed=seed + 100)
    noise -= noise.mean(-1, keepdim=True)
    xr = (x.double() + noise.to(device) - 2.0).to(dtype)
    xr.view(-1, v)[-1] = make_logits(1, v, dtype, device=device, seed=seed + 200)
    y = make_labels(shape, v, device=device, seed=seed)
    lp = reference.token_stats(xr, y, temperature=rollout_temperature).logprob.float()
    flat = lp.view(-1)
    if flat.numel() >= 4:
        flat[1] -= 30.0  # delta beyond the ratio clamp
        flat[2] += 1e-6  # a tiny mismatch: k3 ~ 5e-13
    flat[y.view(-1) == -100] = float("nan")  # ignored rows' rollout log-probs are never read
    return x, xr, y, lp


def _check(backend, x, y, lp, **kw):
    return check_against_reference(
        _op(backend), reference.mismatch_stats, (x, y, lp), kw, diff_fields=("logprob",)
    )


def _shapes(backend: str, device: str):
    """(N, V): odd vocab sizes and a real one; fewer rows for the Triton interpreter."""
    if interpreted(backend, device):
        return [(3, 7), (16, 1000), (2, 5003), (2, 32003)]
    return [(3, 7), (16, 1000), (8, 32003), (2, 151936)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(bd, dtype):
    backend, device = bd
    for i, (n, v) in enumerate(_shapes(backend, device)):
        x, xr, y, lp = _inputs(n, v, dtype, device, seed=i)
        errors = _check(backend, x, y, lp, rollout_logits=xr)
        assert {"token_kl", "token_tv", "k3", "grad0"} <= set(errors)


@pytest.mark.op("token_stats")  # without rollout logits, only token_stats' kernel runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_rollout_logits(backend_device, dtype):
    """Sampled estimators only: any backend token_stats runs on; token_kl, token_tv are None."""
    backend, device = backend_device
    x, _, y, lp = _inputs(16, 1000, dtype, device, seed=1)
    out = _op(backend)(x, y, lp)
    assert out.token_kl is None and out.token_tv is None
    _check(backend, x, y, lp, tis_cap=1.5, icepop_low=0.8, icepop_high=1.25)


def test_temperature(bd):
    backend, device = bd
    gen = torch.Generator().manual_seed(2)
    per_row = (torch.rand(2, 3, generator=gen, dtype=torch.float64) * 2 + 0.25).to(device)
    per_row_r = (torch.rand(2, 3, generator=gen, dtype=torch.float64) * 2 + 0.25).to(device)
    # Row 0 is near one-hot: at tau 0.25 its log-probs reach ~ -200 while delta stays ~0.05.
    low = torch.tensor([[0.25, 0.5, 1.0], [2.0, 0.3, 1.5]], dtype=torch.float64, device=device)
    cases = ((0.7, None), (per_row, None), (0.7, 1.3), (per_row, per_row_r), (low, None))
    for t, tr in cases:
        x, xr, y, lp = _inputs((2, 3), 1000, torch.float32, device, seed=2,
                               rollout_temperature=t if tr is None else tr)  # fmt: skip
        _check(backend, x, y, lp, rollout_logits=xr, temperature=t, rollout_temperature=tr)


def test_neg_inf_entries(bd):
    """Shared -inf (padded vocab) adds 0; a token the rollout could sample but the policy cannot
    (-inf in logits only) makes token_kl = KL(pi_roll || pi_theta) = +inf; -inf in the rollout
    logits only is a zero-weight term: finite."""
    backend, device = bd
    v = 70000
    x, xr, _, lp = _inputs(5, v, torch.float32, device, seed=3)
    y = torch.tensor([0, v - 1, 100, 200, v - 1], device=device)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    mask[1, : v // 2] = True  # a leading run longer than a chunk
    mask[:, y] = False  # labels stay finite
    x[mask.to(device)] = -INF
    xr[mask.to(device)] = -INF
    xr[2, 12345] = -INF  # rollout only: finite
    _check(backend, x[:3], y[:3], lp[:3], rollout_logits=xr[:3])
    x[3, 5] = -INF  # policy only: +inf
    x[4, : v // 2] = -INF  # policy only, a run of chunks; the label (v - 1) stays finite
    out = _op(backend)(x, y, lp, rollout_logits=xr)
    assert out.token_kl[[3, 4]].tolist() == [INF, INF]
    assert torch.isfinite(out.token_kl[:3]).all() and torch.isfinite(out.token_tv).all()
    ref = reference.rollout_tv(x, xr, labels=y)
    torch.testing.assert_close(out.token_tv.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.1], ids=["tau1", "tau0.1"])
def test_one_hot_rows_token_kl_is_zero(bd, temperature):
    """Rollout and training rows one-hot on the same token (the rest below e^-100): token_kl is
    0 to fp32 underflow, as the float64 truth (~1e-50) and plain PyTorch (exactly 0) have it.

    The Triton pass summed each lane relative to r = m k rounded, so the max's own term was
    2^rho (rho = m k - r, up to ulp(m k) / 2) and the chunk merge's 2^-rho 2^rho rounded to
    1 - 2^-24: token_kl = 6.0e-8 (fp32 [4, 64] at tau 1, x ~ 900). The lanes now sum relative to
    the exact m k, so an entry at a lane's max contributes exactly 1.
    """
    backend, device = bd
    x = make_logits(4, 64, torch.float32, scale=300.0, seed=31)
    near_one_hot(x, slice(0, 4), gap=120.0)
    noise = make_logits(4, 64, torch.float64, scale=1.0, seed=32)
    xr = (x.double() + noise - 2.0).float()
    y = torch.tensor([0, 5, 63, 21])
    lp = reference.token_stats(xr, y, temperature=temperature).logprob.float()
    kw = dict(rollout_logits=xr.to(device), temperature=temperature)
    out = _op(backend)(x.to(device), y.to(device), lp.to(device), **kw)
    assert out.token_kl.tolist() == [0.0] * 4
    _check(backend, x.to(device), y.to(device), lp.to(device), **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_single_entry_rows_are_exact(bd, dtype):
    """V = 1: logprob and token_kl are exactly 0, as plain PyTorch gives, at any temperatures.
    Found by the fuzzer (fp16 [1, 1], per-row tau): Triton's token_kl was 4.5e-10, its sums
    then relative to (x / tau rounded) tau rounded, an ulp from x."""
    backend, device = bd
    x = torch.tensor([[0.0739], [3.0781], [-41.5]], dtype=dtype, device=device)
    xr = torch.tensor([[1.5], [0.0737], [7.25]], dtype=dtype, device=device)
    y = torch.zeros(3, dtype=torch.long, device=device)
    lp = torch.full((3,), -0.25, device=device)
    t = torch.tensor([16.714989565055827, 0.07, 1.3], dtype=torch.float64, device=device)
    for kw in (dict(temperature=t), dict(temperature=0.7, rollout_temperature=t), {}):
        out = _op(backend)(x, y, lp, rollout_logits=xr, **kw)
        assert torch.equal(out.logprob.cpu(), torch.zeros(3)), (kw, out.logprob)
        assert torch.equal(out.token_kl.cpu(), torch.zeros(3)), (kw, out.token_kl)


def test_single_entry_rows_token_tv_is_exact(bd):
    """V = 1 fp32 rows at temperatures where (x / tau rounded) tau rounded is an ulp from x: the
    TV pass's exponent of the one entry had been ~1e-16, not 0, a TV of 1.2e-7 under the
    suite's emulated MUFU.EX2 (within 2^-22 at every non-integer exponent; numpy's exp2 gave 1).
    Its frame is the max logit itself now (`_pair.tv_frame`): the exponent is exactly 0 and the
    TV exactly 0 under a GPU's arithmetic too (docs/fidelity.md, (5))."""
    backend, device = bd
    x = torch.tensor([[0.003835241077467799], [-0.006374443415552378]], device=device)
    xr = torch.tensor([[0.37651991844177246], [0.35916343331336975]], device=device)
    t = torch.tensor([0.8965713076026253, 0.20086091129838304], dtype=torch.float64)
    tr = torch.tensor([11.958354836665515, 0.10028520086701957], dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long, device=device)
    out = _op(backend)(x, y, torch.zeros(2, device=device), rollout_logits=xr,
                       temperature=t.to(device), rollout_temperature=tr.to(device))  # fmt: skip
    assert torch.equal(out.token_tv.cpu(), torch.zeros(2)), out.token_tv


def _grid_rows(dtype, device):
    """Logits on a 1/16 grid in [-7, 7] (V = 2600: two chunks of the C++ pass; row 1's second
    chunk has a lower max than its first), on which x - 2 is exact in every dtype."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 2600, generator=g) * 32).round().div(16).clamp(-7.0, 7.0)
    x[1, 2048:] = x[1, 2048:].clamp(max=1.0)
    x[2, 2:] = -INF  # V = 2 in effect: the reported [0, 1]-like row
    x[2, :2] = torch.tensor([0.0, 1.0])
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_and_shifted_rows_are_exact(bd, dtype):
    """Rollout logits equal to the logits, or the logits minus 2 (exact on the grid): token_kl
    and token_tv are exactly 0, as the truth and plain PyTorch give; under a temperature (scalar,
    per row) within the double finish's rounding (4 fp64 eps: seen 1e-31 for KLs, 2e-16 for an
    fp64 TV). A C++ TV sweep computing ew_j a - ev_j b, which GCC fuses into
    fnmadd(ev_j, b, RN(ew_j a)), kept the product's rounding error: ~1e-9 per token in fp32 and
    bf16, ~1e-17 in fp64. The Triton pair lanes' exponents as one fma x k - fl(m k) rounded
    each side's reference apart under a temperature: 16-bit token_kl of ~1e-8. Triton's TV pass
    of fp32 logits under a temperature rebuilt each side's frame from its rounded z max, a =
    fl(fl(x_max / tau) tau), an ulp from x_max on some rows, with each side's log s1 shifted to
    it and rounded to fp32 apart: TVs of 6.0e-8 (tau 0.7) and 3.0e-7 (tau 5.7) here, where
    plain fp32 PyTorch gives 9.8e-8 and 4.5e-8 at tau 0.7, 9.3e-9 at 5.7 and 12.7. Its frame
    is now the max logit itself (`_pair.tv_frame`): 0."""
    backend, device = bd
    x = _grid_rows(dtype, device)
    y = torch.tensor([3, 2100, 1], device=device)
    lp = torch.zeros(3, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_row = torch.tensor([5.7, 12.7, 0.3], dtype=acc, device=device)
    for xr, tau in itertools.product((x.clone(), x - 2), (1.0, 0.7, per_row)):
        out = _op(backend)(x, y, lp, rollout_logits=xr, temperature=tau)
        bound = 0.0 if isinstance(tau, float) and tau == 1.0 else 4 * torch.finfo(torch.float64).eps
        for name in ("token_kl", "token_tv"):
            value = getattr(out, name).cpu()
            assert value.shape == (3,) and bool((value.abs() <= bound).all()), (name, tau, value)


@pytest.mark.backends("cpu")
def test_near_equal_rows_fp32_token_kl(bd):
    """token_kl of fp32 rows whose rollout logits differ by noise of 1e-3 or 0.1 (V = 257, one
    row per call: the rule's 2x plain PyTorch is per batch), held to the rule.

    KL = u / s1_q - log s1_q + log s1_p cancels O(1) terms. With the pair pass's s1 summed in
    fp32 the lane holding the max (e = 1) rounded each later term at ulp(1) / 2, and log s1
    carried ~1e-7 (fuzzer, fp32 [2, 257]: token_kl 4.8e-7 where the truth is ~0, plain fp32
    PyTorch's error 3.7e-8). Here: 1.8e-7 and 3.9e-7 on KLs of ~5e-7 (allowed 2.9e-8 and
    4.1e-8), 1.1e-7 and 2.4e-7 on KLs of ~1e-3 (allowed 7.5e-8 and 1.6e-7). The C++ pass sums
    fp32 rows in double lanes and finishes them in double.
    """
    backend, device = bd
    for seed, scale, noise, tau in ((2, 0.7, 1e-3, 0.9), (2, 0.02, 1e-3, 0.9),
                                    (4, 2.0, 0.1, 1.5), (7, 2.0, 0.1, 2.4)):  # fmt: skip
        x64 = make_logits(1, 257, torch.float64, scale=scale, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        xr = (x64 + torch.randn(x64.shape, generator=g, dtype=torch.float64) * noise - 2.0).float()
        t = torch.tensor([tau], dtype=torch.float64)
        y = torch.tensor([seed])
        lp = reference.token_stats(xr, y, temperature=t).logprob.float()
        kw = dict(rollout_logits=xr.to(device), temperature=t.to(device))
        check_against_reference(
            _op(backend), reference.mismatch_stats, (x64.float().to(device), y.to(device),
            lp.to(device)), kw, diff_fields=("logprob",), check_fields=("logprob", "token_kl"),
        )  # fmt: skip


def test_near_equal_fp32_row_token_kl(bd):
    """token_kl of an fp32 [1, 9] row whose rollout logits are the logits - 2 (each rounded to
    fp32 from float64; kl_divergence's fuzzer row), at tau 0.072 and 0.7: KLs of 6.1e-18 and
    5.7e-15. The Triton pair pass took the KL as u / s1_q plus a difference of two rounded
    fp32 normalizers: 6.0e-8 and 1.1e-7 off (allowed 1.1e-12 and 1.1e-7; plain PyTorch 5.4e-13
    and 5.7e-8). Its fp32 lanes now sum the excess too (`_pair.excess_terms`): 2.4e-17 and
    1.1e-15."""
    backend, device = bd
    x64 = make_logits(1, 9, torch.float64, scale=1.0, seed=0)
    x, xr = x64.float(), (x64 - 2.0).float()
    y = torch.tensor([3])
    for tau in (torch.tensor([0.07208323812945885], dtype=torch.float64), 0.7):
        lp = reference.token_stats(xr, y, temperature=tau).logprob.float()
        t = tau.to(device) if isinstance(tau, torch.Tensor) else tau
        kw = dict(rollout_logits=xr.to(device), temperature=t)
        got = _op(backend)(x.to(device), y.to(device), lp.to(device), **kw).token_kl.cpu()
        truth = reference.mismatch_stats(
            x.double(), y, lp.double(), temperature=tau, rollout_logits=xr.double()
        ).token_kl
        assert float((got.double() - truth).abs()) < 1e-13  # C++: 2.0e-14
        check_against_reference(
            _op(backend), reference.mismatch_stats, (x.to(device), y.to(device), lp.to(device)),
            kw, diff_fields=("logprob",), check_fields=("logprob", "token_kl"),
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.backends("triton")
def test_near_equal_16bit_rows_token_kl_with_the_excess(bd, dtype, pair_excess_16bit):
    """token_kl of near-equal 16-bit rows (`near_equal_rows`; the rollout is the other side)
    with the pair lanes' excess k (`_pair.EXCESS_16BIT`, off by default until a GPU run times
    it; kl_divergence's test of the same): without it 1.5e-8 .. 1.9e-7 off (open class (1)),
    with it at most 3e-10."""
    backend, device = bd
    for x, xr, t in near_equal_rows(dtype):
        y = torch.zeros(x.shape[0], dtype=torch.long)
        lp = torch.full((x.shape[0],), -1.0)
        tt = t.double() if torch.is_tensor(t) else t
        kw = dict(rollout_logits=xr.to(device), temperature=t, rollout_temperature=t)
        kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
        got = _op(backend)(x.to(device), y.to(device), lp.to(device), **kw).token_kl.cpu()
        truth = reference.kl_divergence(xr.double(), x.double(), temperature=tt)
        err = float((got.double() - truth).abs().max())
        assert err < 1e-9, (tuple(x.shape), t, err)


@pytest.mark.backends("triton")
def test_many_chunks_per_row(bd, small_triton_blocks):
    """Rows cut into many chunk programs (Triton; small blocks): the merges of the pair pass and
    of the TV sums, with -inf runs covering whole chunks, match the reference."""
    backend, device = bd
    for dtype in (torch.float32, torch.bfloat16):
        x, xr, y, lp = _inputs(5, 400, dtype, device, seed=22)  # 13 / 7 fp32 / bf16 chunks
        x[1, 40:120] = -INF
        x[1, 120:124] = xr[1, 120:124] = -INF
        xr[2, :200] = -INF
        y[1], y[2] = 20, 280
        _check(backend, x, y, lp, rollout_logits=xr, temperature=0.8, rollout_temperature=1.1)


def _masked_finite(dtype, fill, whole, device):
    """Training and rollout logits masked alike with a huge finite fill
    (`masked_with_a_huge_finite_fill`), labels on unmasked entries."""
    x, xr = masked_with_a_huge_finite_fill(dtype, fill, [0.3], whole=whole, seed=7)
    return x.to(device), xr.to(device), torch.tensor([3, 51, 97, 7], device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("fill", ["finfo.min", -1e30], ids=str)
def test_shared_huge_finite_mask(bd, dtype, fill, small_triton_blocks):
    """A shared mask of a huge finite fill has no mass in logprob, token_kl and token_tv, where
    its x / tau leaves the float range (finfo.min at tau 0.7) and where it does not (fp64's
    finfo.min rows gave a token_tv of 1.0 at tau 1 and NaN rows at tau 2 under the Triton
    interpreter: its emulated fp64 fma overflowed, not the kernel)."""
    backend, device = bd
    x, xr, y = _masked_finite(dtype, fill, whole=False, device=device)
    for t in (1.0, 0.7, 2.0):
        lp = reference.token_stats(xr, y, temperature=t).logprob.float()
        _check(backend, x, y, lp, rollout_logits=xr, temperature=t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_finfo_min_mask_under_two_temperatures(bd, dtype, small_triton_blocks):
    """A shared finfo.min mask with the rollout at its own per-row temperature, where fill /
    tau leaves the float range on one side only: C++ token_kl read +inf (a finite logit
    against a quotient read as -inf) where the float64 truth is 0.06 .. 1.5
    (test_kl_divergence's test of the same name); Triton read +inf too, and 0 where a chunk
    is masked whole (small blocks). Its pair pass now sums a chunk whose `inf` flag is up
    again with the overflowed exponents clamped (`_pair.redo_far_chunk`)."""
    backend, device = bd
    x, xr, y = _masked_finite(dtype, "finfo.min", whole=False, device=device)
    t, t_roll = (u.to(device) for u in two_temperatures_past_the_range())
    lp = reference.token_stats(xr, y, temperature=t_roll).logprob.float()
    _check(backend, x, y, lp, rollout_logits=xr, temperature=t, rollout_temperature=t_roll)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("filled", ["rollout", "logits"])
def test_finfo_min_fill_against_logits_of_no_mass(bd, dtype, filled, small_triton_blocks):
    """One side filled with finfo.min where the other's logits are finite with no fp32 mass
    (`filled_against_no_mass`): token_kl is finite in float64. The Triton pair pass moved a
    lane or chunk state by an overflowed max shift times a sum under a factor of 0 (0 * inf):
    +inf at every temperature (test_kl_divergence's test of the same name)."""
    backend, device = bd
    x, xr, y, temps = against_no_mass(dtype, 12, filled == "logits", device)
    for temperature, rollout_temperature in temps:
        lp = reference.token_stats(xr, y, temperature=rollout_temperature).logprob.float()
        _check(backend, x, y, lp, rollout_logits=xr, temperature=temperature,
               rollout_temperature=rollout_temperature)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_neg_inf_against_a_weight_in_another_lane(bd, dtype):
    """KL(pi_roll || pi_theta) of rollout mass (underflowing at tau 0.05, 0.1) where the logits
    are -inf, the rollout's max in another lane or a later block: +inf
    (test_kl_divergence's test of the same name: the Triton pair lanes lost the flag)."""
    backend, device = bd
    xr, x = neg_inf_against_a_far_weight(dtype, device)
    y = torch.tensor([4, 0, 1, 0], device=device)
    for t in (0.05, 0.1):
        out = _op(backend)(x, y, torch.zeros(4, device=device), rollout_logits=xr,
                           temperature=t, rollout_temperature=t)  # fmt: skip
        assert out.token_kl.eq(INF).all(), (t, out.token_kl)


def test_finfo_min_fill_past_the_range_where_the_rollout_has_mass(bd):
    """The logits filled with finfo.min where the rollout has mass (w_j = 0.42), at a
    temperature that takes the fill past the float range: KL(pi_roll || pi_theta)'s term there,
    w_j |fill| / tau, is 5.8e38 in float64, +inf in fp32; the repair of overflowed fills must
    leave that -inf alone (a review found the first C++ repair reading 1.7e38 there)."""
    backend, device = bd
    x = torch.tensor([[0.0, torch.finfo(torch.float32).min, -1.0]], device=device)
    xr = torch.tensor([[0.0, 0.0, -1.0]], device=device)
    y = torch.tensor([0], device=device)
    out = _op(backend)(x, y, torch.zeros(1, device=device), rollout_logits=xr, temperature=0.25,
                       rollout_temperature=1.0)  # fmt: skip
    assert float(out.token_kl[0]) == INF


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_rows_masked_whole_with_a_finite_fill(bd, dtype, small_triton_blocks):
    """A row masked whole with -1e30 on both sides: uniform, token_kl and token_tv 0 (the
    Triton pair pass took it for a row of -inf, NaN, until its sides with nothing above the
    lane floor were read again for their raw max); and the rollout side alone masked whole:
    the uniform distribution, every output and the gradient those of a rollout row of zeros.
    At tau 0.6 the fp32 m tau rounded misses -1e30 by an ulp (test_kl_divergence's
    MISSES_THE_FILL): the C++ logprob gradient of the row masked whole was 0 there."""
    backend, device = bd
    x, xr, y = _masked_finite(dtype, -1e30, whole=True, device=device)
    for t in (1.0, 0.7, 0.6):
        lp = reference.token_stats(xr, y, temperature=t).logprob.float()
        _check(backend, x, y, lp, rollout_logits=xr, temperature=t)
        uniform = []
        for rollout in (torch.full_like(x, -1e30), torch.zeros_like(x)):
            xa = x.clone().requires_grad_()
            out = _op(backend)(xa, y, lp, rollout_logits=rollout, temperature=t)
            out.logprob.sum().backward()
            uniform.append((out.token_kl, out.token_tv, out.logprob, xa.grad))
        for got, want in zip(*uniform):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_invalid_rows_stay_local(bd):
    """A broken logits row is NaN everywhere; a broken rollout row only in token_kl / token_tv
    (logprob depends on the logits alone); NaN rollout_logprobs only in the estimators."""
    backend, device = bd
    x, xr, _, _ = _inputs(7, 1000, torch.float32, device, seed=4)
    y = torch.arange(7, device=device) * 100
    lp = torch.randn(7, generator=torch.Generator().manual_seed(4)).to(device) - 5
    clean = _op(backend)(x, y, lp, rollout_logits=xr)
    x[1, 10] = float("nan")
    x[2] = -INF
    xr[3, 999] = INF
    xr[4] = -INF
    lp[5] = float("nan")
    xg = x.clone().requires_grad_()
    out = _op(backend)(xg, y, lp, rollout_logits=xr)
    for name in ("token_kl", "token_tv"):
        got = getattr(out, name)
        assert torch.isnan(got[1:5]).all() and torch.equal(
            got[[0, 5, 6]], getattr(clean, name)[[0, 5, 6]]
        )
    assert torch.isnan(out.logprob[1:3]).all()
    assert torch.equal(out.logprob[[0, 3, 4, 5, 6]], clean.logprob[[0, 3, 4, 5, 6]])
    for name in SAMPLED:
        got = getattr(out, name)
        assert torch.isnan(got[[1, 2, 5]]).all(), name
        assert torch.equal(got[[0, 3, 4, 6]], getattr(clean, name)[[0, 3, 4, 6]]), name
    out.logprob.nan_to_num().sum().backward()
    assert torch.isnan(xg.grad[1:3]).all() and torch.isfinite(xg.grad[[0, 3, 4, 5, 6]]).all()


def test_ignore_index_rows(bd):
    backend, device = bd
    x, xr, y, lp = _inputs(4, 1000, torch.float32, device, seed=5)
    y = torch.tensor([3, -1, 999, -1], device=device)
    x[3, 0] = float("nan")
    xg = x.clone().requires_grad_()
    out = _op(backend)(xg, y, lp, rollout_logits=xr, ignore_index=-1)
    for name in out._fields:
        assert (getattr(out, name)[[1, 3]] == 0).all(), name
    out.logprob.sum().backward()
    assert (xg.grad[[1, 3]] == 0).all() and (xg.grad[[0, 2]] != 0).any()


def test_strided_inputs_are_read_in_place(bd):
    backend, device = bd
    base = make_logits((3, 5), 1000, torch.float32, device=device, seed=6)
    base_r = make_logits((3, 6), 1000, torch.float32, device=device, seed=7)
    x, xr = base[:, :-1], base_r[:, 2:]
    y = make_labels((3, 4), 1000, device=device, seed=6)
    lp = torch.randn(3, 4, device=device) - 5
    a = _op(backend)(x, y, lp, rollout_logits=xr)
    b = _op(backend)(x.contiguous(), y, lp, rollout_logits=xr.contiguous())
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    _check(backend, x, y, lp, rollout_logits=xr)
    # Strided 1-D labels and rollout log-probs (every other row), gradient included.
    rows, rows_r = base.view(15, 1000)[::2], base_r.view(18, 1000)[::2][:8]
    y_big, lp_big = make_labels((16,), 1000, device=device, seed=8), torch.randn(16) - 5
    y_s, lp_s = y_big[::2], lp_big.to(device)[::2]
    assert not y_s.is_contiguous()
    a = _op(backend)(rows, y_s, lp_s, rollout_logits=rows_r)
    b = _op(backend)(rows.contiguous(), y_s.contiguous(), lp_s, rollout_logits=rows_r.contiguous())
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    _check(backend, rows, y_s, lp_s, rollout_logits=rows_r)


def test_gradient_flows_through_logprob_only(bd):
    backend, device = bd
    x, xr, y, lp = _inputs(4, 1000, torch.float32, device, seed=8)
    xg = x.clone().requires_grad_()
    # rollout_logprobs that require grad (an engine's log-probs from a live graph) stay out too
    out = _op(backend)(xg, y, lp.clone().requires_grad_(), rollout_logits=xr)
    assert out.logprob.requires_grad
    for name in (*SAMPLED, "token_kl", "token_tv"):
        assert not getattr(out, name).requires_grad, name
    # logprob and its gradient are token_stats' (up to rounding).
    out.logprob.sum().backward()
    xt = x.clone().requires_grad_()
    ref = pg_kernels.token_stats(xt, y, backend=backend).logprob
    ref.sum().backward()
    torch.testing.assert_close(out.logprob, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(xg.grad, xt.grad, rtol=0, atol=1e-6)


def test_deterministic_and_batch_invariant(bd):
    backend, device = bd
    x, xr, y, lp = _inputs(9, 40000, torch.bfloat16, device, seed=9)
    a, b = (_op(backend)(x, y, lp, rollout_logits=xr) for _ in range(2))
    alone = _op(backend)(x[4:5], y[4:5], lp[4:5], rollout_logits=xr[4:5])
    for name in a._fields:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(getattr(a, name)[4:5], getattr(alone, name)), name


def test_empty_batch(bd):
    backend, device = bd
    x = torch.randn(0, 7, 100, device=device, requires_grad=True)
    y = torch.zeros(0, 7, dtype=torch.long, device=device)
    out = _op(backend)(x, y, torch.zeros(0, 7), rollout_logits=torch.randn(0, 7, 100))
    assert out.token_tv.shape == (0, 7)
    out.logprob.sum().backward()
    assert x.grad.shape == x.shape


# --- properties ---------------------------------------------------------------------------


def _one_row(v, seed, device="cpu"):
    """One fp64 row of logits and a perturbed rollout row (KL ~ 0.05)."""
    x = make_logits(1, v, torch.float64, device=device, seed=seed)
    noise = make_logits(1, v, torch.float64, scale=0.3, seed=seed + 1).to(device)
    return x, x + noise


def test_k3_is_unbiased_for_token_kl(bd):
    """E_{c ~ pi_roll}[k3] = KL(pi_roll || pi_theta) (docs/math.md §5): exactly as a q-weighted
    sum over every label, and within Monte-Carlo error when sampling labels from the rollout."""
    backend, device = bd
    v = 200
    x, xr = _one_row(v, seed=10, device=device)
    log_q = xr.log_softmax(-1)[0]

    def stats(labels):
        n = labels.numel()
        return _op(backend)(x.expand(n, v), labels, log_q[labels], rollout_logits=xr.expand(n, v))

    every = stats(torch.arange(v, device=device))
    kl = every.token_kl[0]
    assert kl > 0.01 and torch.equal(every.token_kl, kl.expand(v))
    torch.testing.assert_close((log_q.exp() * every.k3).sum(), kl, rtol=1e-10, atol=0)
    gen = torch.Generator().manual_seed(11)
    n = 200_000
    sampled = torch.multinomial(log_q.exp().cpu(), n, replacement=True, generator=gen).to(device)
    # Under the Triton interpreter (~30 ms per row) the samples' k3 are gathered from the rows
    # above: a row's outputs depend on its label alone (batch invariance has its own test).
    k3 = every.k3[sampled] if interpreted(backend, device) else stats(sampled).k3
    stderr = float(k3.std()) / math.sqrt(n)
    assert abs(float(k3.mean()) - float(kl)) < 5 * stderr, (float(k3.mean()), float(kl), stderr)
    # Pinsker: TV <= sqrt(KL / 2).
    assert every.token_tv[0] <= torch.sqrt(kl / 2)


def test_first_order_logprob_bound(bd):
    """|delta log p_c| <= 2 eps (1 - p_c) to first order for |delta z| <= eps (docs/math.md §5): the
    high-probability tokens barely move. The second-order rest is at most eps^2 / 2."""
    backend, device = bd
    v, eps = 500, 1e-3
    x = make_logits(8, v, torch.float64, device=device, seed=12)
    near_one_hot(x, slice(0, 3), gap=8.0)  # p_c close to 1 for the argmax label
    gen = torch.Generator().manual_seed(13)
    y = torch.randint(0, v, (8,), generator=gen).to(device)
    y[:3] = v // 3
    # The worst case for the label: +eps on it, -eps elsewhere (and the reverse); plus noise.
    worst = torch.full_like(x, -eps).scatter(-1, y[:, None], eps)
    noise = (torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(device) * eps
    for dz in (worst, -worst, noise):
        xr = x + dz
        lp_roll = xr.log_softmax(-1).gather(-1, y[:, None])[:, 0]
        out = _op(backend)(x, y, lp_roll, rollout_logits=xr)
        p_c = out.logprob.exp()
        bound = 2 * eps * (1 - p_c) + eps**2 / 2
        assert (out.abs_log_ratio <= bound).all(), (out.abs_log_ratio - bound).max()
        if dz is worst:  # the bound is tight to first order
            assert (out.abs_log_ratio >= 2 * eps * (1 - p_c) - eps**2).all()
    assert (p_c[:3] > 0.99).all()


def test_tv_properties(bd):
    backend, device = bd
    x, xr, y, lp = _inputs(16, 1000, torch.float32, device, seed=14)
    out = _op(backend)(x, y, lp, rollout_logits=xr)
    assert ((out.token_tv >= 0) & (out.token_tv <= 1)).all()
    assert (out.token_tv <= torch.sqrt(out.token_kl / 2) + 1e-6).all()  # Pinsker
    same = _op(backend)(x, y, lp, rollout_logits=x)
    assert (same.token_kl == 0).all() and (same.token_tv.abs() < 1e-6).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_tv_off_keeps_every_other_field(bd, dtype, small_triton_blocks):
    """token_tv=False skips TV (no second read of both tensors on a GPU): the kernel returns an
    empty token_tv, the op None, and every other field, and the logits' gradient, are the same
    bits as with it; several chunks per row (C++: V past one 2048-wide chunk; Triton: small
    blocks), an ignore row, per-row temperatures on both sides, -inf entries on both sides and
    a NaN rollout row."""
    backend, device = bd
    if interpreted(backend, device) and dtype in (torch.float16, torch.float64):
        pytest.skip("interpreter time: Triton's token_tv switch is a launch, not a dtype's path")
    v = 4099 if backend == "cpu" else 257
    x, xr, y, lp = _inputs(6, v, dtype, device, seed=40)
    y = y.clamp(min=0)
    y[3] = -100
    x[2, 3], xr[2, 9], xr[5, v - 2], xr[4, 0] = -INF, -INF, -INF, float("nan")
    t = torch.linspace(0.5, 1.5, 6, device=device)
    kw = dict(rollout_logits=xr, temperature=t, rollout_temperature=t.flip(0))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with_tv = _op(backend)(xa, y, lp, **kw)
    without = _op(backend)(xb, y, lp, token_tv=False, **kw)
    assert with_tv.token_tv is not None and without.token_tv is None
    for field in ("logprob", *SAMPLED, "token_kl"):
        a, b = getattr(with_tv, field), getattr(without, field)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=field)
    assert without.token_kl[4].isnan() and with_tv.token_tv[4].isnan()  # the NaN rollout row
    # KL(pi_roll || pi_theta): +inf where the logits hold a -inf against rollout mass (row 2),
    # finite where only the rollout does (row 5).
    assert without.token_kl[2] == INF and without.token_kl[5].isfinite()
    g = torch.randn(6, device=device)
    (with_tv.logprob * g).sum().backward()
    (without.logprob * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    op = torch.ops.pg_kernels.mismatch_stats.default
    for tv, rows in ((True, (6,)), (False, (0,))):  # the kernel's own token_tv
        assert op(x, xr, y, None, 0.7, None, 0.9, -100, backend, tv)[2].shape == rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_near_one_hot_rows_tv(bd, dtype):
    """Near one-hot rows (a spike 8..14 over the rest at tau 0.5 and 1) and a rollout equal but
    for noise: half the TV sits at the two top entries, each probability ~1, whose difference
    is below the rounding of either. Both backends took |q_j - p_j| from each side rounded on
    its own: a TV of 6.3e-10 read 3.2e-10 (C++) and 3.0e-8 (Triton), 9.3e-8 read 2.8e-7
    (Triton); plain fp32 PyTorch is up to 50 % off here. They now factor the normalizers out
    (C++ `total_variation`'s r - 1 in double, Triton's r1 in fp64): at most 1.4e-3 relative
    (the tails' own roundings, TVs of 4.5e-13 .. 1.8e-4)."""
    backend, device = bd
    x = make_logits(8, 500, torch.float64, seed=21)
    x[:, 7] = x.amax(-1) + torch.tensor([8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 10.5],
                                        dtype=torch.float64)  # fmt: skip
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    x, xr = x.to(dtype), (x + 0.1 * noise - 2.0).to(dtype)
    y = torch.full((8,), 7)
    for tau in (0.5, 1.0):
        truth = reference.rollout_tv(x, xr, temperature=tau)
        assert float(truth.min()) > 1e-13  # resolved by double normalizers (C++): ~1e-16
        lp = reference.token_stats(xr, y, temperature=tau).logprob.float()
        out = _op(backend)(x.to(device), y.to(device), lp.to(device), rollout_logits=xr.to(device),
                           temperature=tau).token_tv.cpu()  # fmt: skip
        rel = ((out.double() - truth) / truth).abs()
        assert float(rel.max()) < 1e-2, (tau, rel.max(), out, truth)
        _check(backend, x.to(device), y.to(device), lp.to(device),
               rollout_logits=xr.to(device), temperature=tau)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tv_of_a_peaked_row_against_a_flat_one(bd, dtype):
    """A one-hot policy row (a spike of 64) against a flat rollout, and the reverse, at V = 40000:
    a TV of 1 - 1/V. The normalizers' ratio is ~1/V: its difference from 1 near -1 keeps only
    ulp(1) of the ratio, the same sign in every term, which the TV passes' first form of the
    top entries' fix took (Triton 5.1e-4 off, C++ 2.4e-5; plain fp32 PyTorch 1.5e-7; the rule
    allows 2e-5 of the TV). Also a peaked row against the same row at rollout temperature 4
    (Triton 9.9e-6 off then). The TV is also held to 2x plain's own error there, with no
    relative allowance: C++'s fp32 lanes, 64 steps per chunk, had left 1.5e-6 (the lane holding
    the top entry rounds each later term at ulp(1) / 2); summed in double every 4 steps, 2.6e-8.
    Triton 2.0e-7 (interpreter, GPU arithmetic)."""
    backend, device = bd
    v = 40000
    flat = torch.zeros(2, v, dtype=dtype)
    peaked = flat.clone()
    peaked[:, 0] = 64.0
    y = torch.zeros(2, dtype=torch.long)
    lp = torch.zeros(2)
    for x, xr in ((peaked, flat), (flat, peaked)):
        check_against_reference(
            _op(backend), reference.mismatch_stats, (x.to(device), y.to(device), lp.to(device)),
            {"rollout_logits": xr.to(device)}, diff_fields=(), check_fields=("token_tv",),
        )  # fmt: skip
        out = _op(backend)(x.to(device), y.to(device), lp.to(device), rollout_logits=xr.to(device))
        truth = reference.rollout_tv(x, xr)
        plain = reference.mismatch_stats(x, y, lp, rollout_logits=xr, upcast=False).token_tv
        error = (out.token_tv.cpu().double() - truth).abs().max()
        assert error <= 2 * max((plain.double() - truth).abs().max(), 1e-15), (error, plain)
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(4, 32000, generator=g, dtype=torch.float64) * 4).to(dtype)
    x[:, 7] += 12.0
    kw = dict(rollout_logits=x.to(device), rollout_temperature=4.0)
    y = torch.full((4,), 7)
    lp = reference.token_stats(x, y, temperature=4.0).logprob.float()
    check_against_reference(
        _op(backend), reference.mismatch_stats, (x.to(device), y.to(device), lp.to(device)), kw,
        diff_fields=("logprob",), check_fields=("token_kl", "token_tv"),
    )  # fmt: skip


def test_fp64_tv_of_split_tied_maxima_at_large_z(bd):
    """fp64 logits at |z| ~ 2500 (T = 0.1372): two tied maxima, and a rollout that splits them
    by 5e-4 (the rest ~e^-1278, 0 in fp64). Then TV = tanh(delta / 2) / 2 = 9.1e-4 with
    delta = 5e-4 / T from the exact difference of the two rollout logits. z = x / T rounded
    carries ulp(z) / 2 per entry: plain fp64 PyTorch is 9.8e-14 off. The float64 truth must not
    be (`reference._util.scaled_from_max`; the fuzzer found it 9.3e-14 off where the C++
    step_stats kernel was 8e-20 from a 50-digit truth), and the kernel is held to the rule
    against the exact value: 2x plain's error plus the TV floor (2 eps)."""
    backend, device = bd
    t = 0.1372
    x = torch.tensor([[338.9941, 163.6319, 338.9941]], dtype=torch.float64, device=device)
    xr = x - 2.0
    xr[0, 2] += 5e-4
    delta = float((xr[0, 2] - xr[0, 0]).cpu()) / t  # the difference is exact (Sterbenz)
    exact = 0.5 * math.tanh(delta / 2)
    eps = torch.finfo(torch.float64).eps
    truth = float(reference.rollout_tv(x, xr, temperature=t)[0])
    # The truth's own rounding: |p_j - q_j| of two probabilities of 0.5, ~eps / 2 absolute.
    assert abs(truth - exact) <= eps, (truth, exact)
    plain = float(reference.rollout_tv(x, xr, temperature=t, upcast=False)[0])
    y, lp = torch.tensor([0], device=device), torch.zeros(1, device=device)
    out = float(_op(backend)(x, y, lp, rollout_logits=xr, temperature=t).token_tv[0].cpu())
    assert abs(out - exact) <= 2 * abs(plain - exact) + 2 * eps, (out, exact, plain)


def test_sampled_estimator_values():
    """The elementwise definitions, including the clamp and the IcePop band edges. Past the
    clamp k3 = rho - 1 - delta with rho = e^20 is negative for delta > e^20 - 1 (-inf for a
    rollout log-prob of -inf), as SPEC's formula gives it."""
    x = make_logits(8, 50, torch.float64, seed=15)
    y = torch.arange(8)
    lp = pg_kernels.token_stats(x, y).logprob
    delta = torch.tensor(
        [0.0, math.log(0.6), math.log(1.9), 25.0, -25.0, 1e-4, 1e9, math.inf], dtype=torch.float64
    )
    out = pg_kernels.mismatch_stats(x, y, lp - delta, tis_cap=1.5, icepop_low=0.5, icepop_high=2.0)
    torch.testing.assert_close(out.log_ratio, delta, rtol=0, atol=1e-12)
    rho = delta.clamp(-20, 20).exp()
    torch.testing.assert_close(out.ratio, rho, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.k3, rho - 1 - delta, rtol=1e-6, atol=1e-12)
    assert abs(float(out.k3[5]) - 1e-8 / 2) < 1e-12
    assert out.k3[6] < 0 and out.k3[7] == -math.inf
    assert out.icepop_weight.tolist()[:3] == pytest.approx([1.0, 0.6, 1.9])
    assert out.icepop_weight[3] == 0 and out.icepop_weight[4] == 0
    assert out.tis_weight.tolist()[:4] == pytest.approx([1.0, 0.6, 1.5, 1.5])


# --- the op contract (CPU extension) ------------------------------------------------------

needs_cpu_ext = pytest.mark.skipif(
    pg_kernels._backend.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="C++ extension not built",
)


@needs_cpu_ext
def test_gradcheck_float64():
    x = make_logits(3, 11, torch.float64, seed=16).requires_grad_()
    xr = make_logits(3, 11, torch.float64, seed=17)
    y = torch.tensor([0, 10, 4])
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)

    def f(x):
        return pg_kernels.mismatch_stats(
            x, y, torch.zeros(3, dtype=torch.float64), rollout_logits=xr, temperature=t,
            backend="cpu",
        ).logprob  # fmt: skip

    assert torch.autograd.gradcheck(f, (x,))


@needs_cpu_ext
def test_opcheck():
    x = make_logits(4, 33, torch.float32, seed=18)
    xr = make_logits(4, 33, torch.float32, seed=19)
    y = make_labels((4,), 33, seed=18)
    t = torch.rand(4) + 0.5
    op = torch.ops.pg_kernels.mismatch_stats.default
    for temp, roll_temp, tv in ((None, None, True), (t, None, True), (None, t, False)):
        args = (x.clone().requires_grad_(), xr, y, temp, 1.3, roll_temp, 0.9, -100, "cpu", tv)
        torch.library.opcheck(op, args)
    _, _, _, row_state = op(x, xr, y, t, 1.0, None, 1.0, -100, "cpu")
    bwd = torch.ops.pg_kernels.mismatch_stats_backward.default
    torch.library.opcheck(bwd, (torch.randn(4), x, y, t, 1.0, -100, row_state, "cpu"))


@needs_cpu_ext
def test_compile_fullgraph_matches_eager():
    x, xr, y, lp = _inputs((2, 3), 500, torch.float32, "cpu", seed=20)

    def loss(x, xr, y, lp):
        out = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr, temperature=0.9)
        mask = (out.token_kl < 0.05).float()
        return (out.tis_weight * mask * out.logprob).sum(), out.token_tv, out.k3

    compiled = torch.compile(loss, fullgraph=True)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    la, *ra = loss(xa, xr, y, lp)
    lb, *rb = compiled(xb, xr, y, lp)
    la.backward()
    lb.backward()
    # The op's outputs are bitwise equal; the elementwise tail may fuse (exp/expm1 by ulps).
    assert torch.equal(ra[0], rb[0])
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(ra[1], rb[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=0)


@needs_cpu_ext
def test_compile_fullgraph_without_token_tv():
    x, xr, y, lp = _inputs((2, 3), 500, torch.float32, "cpu", seed=20)

    def kl_only(x, xr, y, lp):
        out = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr, token_tv=False)
        assert out.token_tv is None
        return out.token_kl, out.logprob

    eager = kl_only(x, xr, y, lp)
    compiled = torch.compile(kl_only, fullgraph=True)(x, xr, y, lp)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


# --- bad input ----------------------------------------------------------------------------

MS = pg_kernels.mismatch_stats
BAD_INPUTS = [
    (lambda x, xr, y, lp: MS(x, y, lp, rollout_logits=xr[:1]), ValueError,
     "rollout_logits must have the logits' shape"),
    (lambda x, xr, y, lp: MS(x, y, lp, rollout_logits=xr.half()), TypeError,
     "rollout_logits must have the logits' dtype"),
    (lambda x, xr, y, lp: MS(x, y, lp[:, :2]), ValueError,
     "rollout_logprobs must have the labels'"),
    (lambda x, xr, y, lp: MS(x, y, lp.long()), TypeError, "rollout_logprobs must be a floating"),
    (lambda x, xr, y, lp: MS(x, y[:, :2], lp), ValueError, "labels must have"),
    (lambda x, xr, y, lp: MS(x, y, lp, tis_cap=0.0), ValueError, "tis_cap must be finite and > 0"),
    (lambda x, xr, y, lp: MS(x, y, lp, tis_cap="2"), TypeError, "tis_cap must be a float"),
    (lambda x, xr, y, lp: MS(x, y, lp, icepop_low=3.0), ValueError, "icepop_low <= icepop_high"),
    (lambda x, xr, y, lp: MS(x, y, lp, icepop_high=INF), ValueError, "icepop_high must be finite"),
    (lambda x, xr, y, lp: MS(x, y, lp, rollout_logits=xr, rollout_temperature=0.0), ValueError,
     "rollout_temperature must be finite and > 0"),
    (lambda x, xr, y, lp: MS(x, y, lp, rollout_logits=xr, backend="cuda"), RuntimeError,
     "mismatch_stats has no cuda kernel"),
    (lambda x, xr, y, lp: MS(x, y.index_fill(1, torch.tensor([2]), 50), lp, rollout_logits=xr),
     ValueError, "labels[0, 2] = 50 is outside [0, 50)"),
    # without rollout_logits too: named by this op (not the token_stats it calls), and the
    # rollout temperature checked though unused
    (lambda x, xr, y, lp: MS(x, y.index_fill(1, torch.tensor([2]), 50), lp), ValueError,
     "mismatch_stats: labels[0, 2] = 50"),
    (lambda x, xr, y, lp: MS(x, y, lp, rollout_temperature=-1.0), ValueError,
     "rollout_temperature must be finite and > 0"),
    (lambda x, xr, y, lp: MS(x, y, lp, backend="tpu"), ValueError,
     "mismatch_stats: backend must be one of"),  # without rollout logits: token_stats' kernel
    (lambda x, xr, y, lp: MS(x, y, lp, rollout_logits=xr, token_tv=0), TypeError,
     "mismatch_stats: token_tv must be a bool, got int"),
]  # fmt: skip


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_clear_error(case):
    fn, exc, msg = BAD_INPUTS[case]
    x, xr = make_logits((2, 3), 50, seed=21), make_logits((2, 3), 50, seed=22)
    y, lp = make_labels((2, 3), 50, seed=21), torch.randn(2, 3) - 4
    with pytest.raises(exc) as info:
        fn(x, xr, y, lp)
    assert msg in str(info.value), str(info.value)


# --- GPU only: sizes CPU CI cannot afford -------------------------------------------------


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements(bd):
    """bf16 [16384, 151936] logits and rollout logits: row offsets past 2^31."""
    backend, device = bd
    n, v = 16384, 151936
    g = torch.Generator(device=device).manual_seed(33)
    x = torch.randn(n, v, generator=g, device=device, dtype=torch.bfloat16) * 3
    xr = x + torch.randn(n, v, generator=g, device=device, dtype=torch.bfloat16) * 0.1
    y = torch.randint(0, v, (n,), generator=g, device=device)
    lp = torch.randn(n, generator=g, device=device) - 12
    xg = x.clone().requires_grad_()
    out = _op(backend)(xg, y, lp, rollout_logits=xr)
    out.logprob.nan_to_num().sum().backward()
    rows = [0, 8192, 16383]
    ref = reference.mismatch_stats(x[rows], y[rows], lp[rows], rollout_logits=xr[rows])
    for name in ("logprob", "token_kl", "token_tv"):
        torch.testing.assert_close(
            getattr(out, name)[rows].double(), getattr(ref, name).double(), rtol=2e-5, atol=1e-5
        )
    assert torch.isfinite(xg.grad[rows]).all()


@pytest.mark.gpu
def test_gpu_largest_vocab(bd):
    backend, device = bd
    for n in (1, 37):
        x, xr, y, lp = _inputs(n, 262144, torch.bfloat16, device, seed=34)
        _check(backend, x, y, lp, rollout_logits=xr)
