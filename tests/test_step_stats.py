"""step_stats against the float64 references on every backend with a kernel, against the single
ops it bundles (token_stats bitwise, mismatch_stats and kl_divergence to rounding), and the op
contract (opcheck, fullgraph compile, gradients only where asked, bad input)."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import pytest
import torch
from conftest import small_blocks
from test_kl_divergence import (
    MODERATE_FILLS,
    NEAR_EQUAL_SMALL_V2_ROWS,
    NEAR_EQUAL_V2_ROWS,
    _kl_grad_floor,
    against_no_mass,
    kl_and_grads,
    moderate_fill_rows,
    neg_inf_against_a_far_weight,
    one_sided_fill_rows,
    other_side_errors,
    other_side_top_error,
    peaked_rows_with_shifted_tails,
    two_temperatures_past_the_range,
)
from test_token_stats import _logprob_grad_error, _peaked_rows

import pg_kernels
from pg_kernels import reference
from pg_kernels.reference._util import scaled
from pg_kernels.testing import (
    DOMINANT_COLUMN,
    TRITON_16BIT_PAIR_FLOOR,
    assert_dominant_entry,
    cases_of,
    check_against_reference,
    dominant_entry_rows,
    interpreted,
    make_labels,
    make_logits,
    masked_with_a_huge_finite_fill,
    near_equal_rows,
    near_one_hot,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DIRECTIONS = ("reverse", "forward")
INF = float("inf")

pytestmark = pytest.mark.op("step_stats")


@pytest.fixture
def bd(backend_device):
    """(backend, device) of a step_stats kernel (conftest generates only pairs that exist)."""
    return backend_device


class Flat(NamedTuple):
    """The bundle's float fields, flat, for check_against_reference (absent parts are empty)."""

    logprob: torch.Tensor
    entropy: torch.Tensor
    collision: torch.Tensor
    lgp: torch.Tensor
    lse: torch.Tensor
    max_prob: torch.Tensor
    token_kl: torch.Tensor
    token_tv: torch.Tensor
    k3: torch.Tensor
    kl: torch.Tensor


def _flat(token, token_kl, token_tv, k3, kl):
    empty = token.logprob.new_zeros(0)
    return Flat(
        token.logprob, token.entropy, token.collision, token.lgp, token.lse, token.max_prob,
        empty if token_kl is None else token_kl, empty if token_tv is None else token_tv,
        empty if k3 is None else k3, empty if kl is None else kl,
    )  # fmt: skip


def _op(backend):
    def op(x, y, xr, lp, xq, **kw):
        out = pg_kernels.step_stats(
            x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq, backend=backend, **kw
        )
        m = out.mismatch
        return _flat(out.token, *(None,) * 3 if m is None else (m.token_kl, m.token_tv, m.k3),
                     out.kl)  # fmt: skip

    return op


def _ref(x, y, xr, lp, xq, *, upcast, kl_direction="reverse", temperature=1.0,
         rollout_temperature=None, ref_temperature=None, ignore_index=-100):  # fmt: skip
    """The float64 reference bundle (upcast) or plain PyTorch at the input precision."""
    out = reference.step_stats(
        x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq, kl_direction=kl_direction,
        temperature=temperature, rollout_temperature=rollout_temperature,
        ref_temperature=ref_temperature, ignore_index=ignore_index, upcast=upcast,
    )  # fmt: skip
    m = out.mismatch
    return _flat(out.token, *((None,) * 3 if m is None else (m.token_kl, m.token_tv, m.k3)), out.kl)


def _inputs(n, v, dtype, device, seed):
    """Policy logits (row 0 near one-hot), rollout logits (a perturbation), a teacher (another
    draw, row 1 equal to the policy's), labels and the rollout's log-probs of them."""
    x = make_logits(n, v, dtype, device=device, seed=seed)
    near_one_hot(x, slice(0, 1))
    noise = make_logits(n, v, torch.float64, scale=0.1, seed=seed + 100).to(device)
    xr = (x.double() + noise - 2.0).to(dtype)
    xq = make_logits(n, v, dtype, device=device, scale=2.0, seed=seed + 200)
    if n > 1:
        xq[1] = x[1]
    y = make_labels((n,), v, device=device, seed=seed)
    lp = reference.token_stats(xr, y).logprob.float()
    return x, y, xr, lp, xq


def _check(backend, x, y, xr, lp, xq, **kw):
    diff = ["logprob", "entropy", "collision", "lse"] + (["kl"] if xq is not None else [])
    kl_floor = None if xq is None else _kl_grad_floor(
        x, xq, {"direction": kw.get("kl_direction", "reverse"), **{
            k: kw[k] for k in ("temperature", "ref_temperature") if k in kw}})  # fmt: skip

    def floor(i, ups):
        return None if kl_floor is None else kl_floor(i, {"out": ups["kl"]})

    return check_against_reference(
        _op(backend), _ref, (x, y, xr, lp, xq), kw, diff_fields=diff,
        grad_args=(0,) if xq is None else (0, 4), grad_floor=floor,
        forward_floor=_triton_floor(backend, x.dtype),
    )  # fmt: skip


# The Triton 16-bit pair sums: pg_kernels.testing.TRITON_16BIT_PAIR_FLOOR (measured here on a
# bf16 V = 7 row: mismatch_stats 6.6e-8 and 1.2e-7, the bundle 9.1e-8 and 3.4e-8). fp32 logits
# sum the excess k and get no floor.
TRITON_KL_FLOOR = {"token_kl": TRITON_16BIT_PAIR_FLOOR, "kl": TRITON_16BIT_PAIR_FLOOR}
def _triton_floor(backend, dtype):
    if backend != "triton":
        return None
    return TRITON_KL_FLOOR if dtype in BITS16 else None
BITS16 = (torch.bfloat16, torch.float16)


def _shapes(backend, device):
    if interpreted(backend, device):
        return [(3, 7), (4, 1000), (2, 5003)]
    return [(3, 7), (16, 1000), (4, 32003), (2, 151936)]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(bd, dtype, direction):
    backend, device = bd
    for i, (n, v) in enumerate(_shapes(backend, device)):
        x, y, xr, lp, xq = _inputs(n, v, dtype, device, seed=i)
        errors = _check(backend, x, y, xr, lp, xq, kl_direction=direction)
        assert {"token_tv", "kl", "grad0", "grad4"} <= set(errors)


@pytest.mark.parametrize("parts", ["none", "rollout", "ref", "logprobs only"])
def test_any_subset_of_the_other_tensors(bd, parts):
    backend, device = bd
    x, y, xr, lp, xq = _inputs(8, 3001, torch.float32, device, seed=5)
    xr = xr if parts == "rollout" else None
    lp = lp if parts in ("rollout", "logprobs only") else None
    xq = xq if parts == "ref" else None
    _check(backend, x, y, xr, lp, xq, temperature=0.7)
    out = pg_kernels.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                                backend=backend)  # fmt: skip
    assert (out.mismatch is None) == (lp is None) and (out.kl is None) == (xq is None)
    if out.mismatch is not None:
        assert (out.mismatch.token_kl is None) == (xr is None)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_near_one_hot_kls_under_a_temperature(bd, direction, blocks, request):
    """Near one-hot rows whose rollout and teacher share the argmax (KLs of 1e-38 .. 1e-14),
    under temperatures that keep each side in its own lane frame on Triton (fp32: `OWN_R`,
    `OWN_Q`), per value against float64 (the rule's 2x plain fp32 PyTorch, no floor). Triton's
    lanes read a token_kl of 2^-60 = 8.7e-19 where the truth is 6.2e-27 (plain 4e-26) and a kl
    of 1.3e-18 for 7.5e-27, until each own side's lane reference took the offset of the two
    frames' residuals (`step_stats._frame_offset`): ~1e-5 relative since."""
    backend, device = bd
    if blocks == "small":
        if backend != "triton":
            pytest.skip("Triton's blocking")
        request.getfixturevalue("small_triton_blocks")
    g = torch.Generator().manual_seed(8)
    x = make_logits(4, 1000, torch.float64, seed=8)
    near_one_hot(x, slice(None))
    xr = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) - 2.0).float()
    xq = (x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64) + 1.5).float()
    x, xr, xq = x.float().to(device), xr.to(device), xq.to(device)
    y = make_labels((4,), 1000, device=device, seed=8)
    per_row = torch.tensor([0.5, 0.7, 1.3, 0.3], dtype=torch.float64, device=device)
    temperatures = [(0.7, None, None), (0.5, None, 2.0), (per_row, 0.8, per_row)]
    # Small blocks (63 chunk programs of two steps per row: the offsets' moves between steps in
    # `_side_rescale`, and many chunks' ends) at the per-row temperatures alone: ~15 s per
    # direction interpreted.
    for t, tr, tq in temperatures[-1:] if blocks == "small" else temperatures:
        lp = reference.token_stats(xr, y, temperature=t if tr is None else tr).logprob.float()
        _check(backend, x, y, xr, lp, xq, kl_direction=direction, temperature=t,
               rollout_temperature=tr, ref_temperature=tq)  # fmt: skip


def test_peaked_rows_logprob_gradient(bd):
    """token_stats' `test_peaked_rows_logprob_gradient` through the bundle, with a teacher whose
    KL is computed but not in the loss (the row's K term is off): the log-prob gradient of fp32
    rows at tau 0.7, p_c 0.996-0.99997, against float64. Triton under a GPU's arithmetic
    (tests/conftest.py) wrote the label's and the argmax's entries from fp32 2^d2 (within ~2
    ulp on a GPU): 3.3e-7, plain fp32 PyTorch 3.5e-7; token_stats' fp64 entries: 1.1e-7, as
    C++ (2026-12-01)."""
    backend, device = bd
    tau = 0.7
    x, y = _peaked_rows(16, 4000, tau, seed=31)
    xq = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    x, y, xq = x.to(device), y.to(device), xq.to(device)

    def torch_logprob(z):
        return torch.log_softmax(z / tau, -1).gather(1, y[:, None])

    def ours(z):
        out = pg_kernels.step_stats(z, y, ref_logits=xq, temperature=tau, backend=backend)
        return out.token.logprob

    x64 = x.double().requires_grad_()
    torch_logprob(x64).sum().backward()
    err_torch = _logprob_grad_error(torch_logprob, x, x64.grad)
    err_ours = _logprob_grad_error(ours, x, x64.grad)
    factor = 2.0 if backend == "cuda" else 0.5
    assert err_ours <= factor * err_torch, (err_ours, err_torch)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_equals_the_single_ops(bd, direction):
    """token_stats' fields bitwise (the same loads and order of operations), the mismatch and KL
    fields and the summed gradients of the three ops to rounding."""
    backend, device = bd
    x, y, xr, lp, xq = _inputs(6, 5003, torch.float32, device, seed=7)
    y[2] = -100
    kw = dict(temperature=0.7, backend=backend)
    xa, qa = x.clone().requires_grad_(), xq.clone().requires_grad_()
    out = pg_kernels.step_stats(xa, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=qa,
                                kl_direction=direction, **kw)  # fmt: skip
    xb, xc, qc = (t.clone().requires_grad_() for t in (x, x, xq))
    ts = pg_kernels.token_stats(xb, y, **kw)
    ms = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr, **kw)
    kl = pg_kernels.kl_divergence(xc, qc, direction=direction, labels=y, **kw)
    for f in ts._fields:
        assert torch.equal(getattr(out.token, f), getattr(ts, f)), f
    for f in ms._fields:
        torch.testing.assert_close(getattr(out.mismatch, f), getattr(ms, f), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl, kl, rtol=1e-5, atol=1e-6)
    g = torch.randn(5, 6, generator=torch.Generator().manual_seed(0)).to(device)
    t = out.token
    (g[0] * t.logprob + g[1] * t.entropy + g[2] * t.collision + g[3] * t.lse + g[4] * out.kl
     ).sum().backward()  # fmt: skip
    (g[0] * ts.logprob + g[1] * ts.entropy + g[2] * ts.collision + g[3] * ts.lse
     ).sum().backward()  # fmt: skip
    (g[4] * kl).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad + xc.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qa.grad, qc.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_ref", [False, True], ids=["rollout", "rollout+ref"])
def test_token_tv_off_keeps_every_other_field(bd, dtype, with_ref, small_triton_blocks):
    """token_tv=False skips TV (no second read of the logits and the rollout on a GPU): the
    kernel returns an empty token_tv, the op None, and every other field and both gradients
    are the same bits as with it; several chunks per row (C++: V past one 2048-wide chunk;
    Triton: small blocks), an ignore row, -inf entries and a NaN rollout row."""
    backend, device = bd
    if interpreted(backend, device) and dtype in (torch.float16, torch.float64):
        pytest.skip("interpreter time: Triton's token_tv switch is a launch, not a dtype's path")
    v = 4099 if backend == "cpu" else 301
    x, y, xr, lp, xq = _inputs(5, v, dtype, device, seed=41)
    y = y.clamp(min=0)
    y[2] = -100
    x[3, 7], xr[4, v - 3], xr[1, 5] = -INF, -INF, float("nan")
    t = torch.linspace(0.6, 1.4, 5, device=device)
    kw = dict(rollout_logprobs=lp, rollout_logits=xr, temperature=t, backend=backend)
    outs, grads = [], []
    for tv in (True, False):
        xa = x.clone().requires_grad_()
        qa = xq.clone().requires_grad_() if with_ref else None
        out = pg_kernels.step_stats(xa, y, ref_logits=qa, token_tv=tv, **kw)
        loss = out.token.logprob.sum() + out.token.entropy.sum()
        (loss + out.kl.sum() if with_ref else loss).backward()
        outs.append(out)
        grads.append((xa.grad, None if qa is None else qa.grad))
    (a, b), ((ga, qa), (gb, qb)) = outs, grads
    assert a.mismatch.token_tv is not None and b.mismatch.token_tv is None
    assert a.mismatch.token_kl[1].isnan() and a.mismatch.token_tv[1].isnan()  # the NaN row
    pairs = [(f, getattr(a.token, f), getattr(b.token, f)) for f in a.token._fields]
    pairs += [(f, getattr(a.mismatch, f), getattr(b.mismatch, f)) for f in a.mismatch._fields
              if f != "token_tv"]  # fmt: skip
    pairs += [("grad", ga, gb)] + ([("kl", a.kl, b.kl), ("grad_ref", qa, qb)] if with_ref else [])
    for name, u, w in pairs:
        torch.testing.assert_close(u, w, rtol=0, atol=0, equal_nan=True, msg=name)
    op = torch.ops.pg_kernels.step_stats.default
    for tv, rows in ((True, (5,)), (False, (0,))):  # the kernel's own token_tv
        out = op(x, xr, None, y, None, 0.8, None, 1.0, None, 1.0, "reverse", -100, backend, tv)
        assert out[8].shape == rows


def test_token_tv_off_on_the_reference_backend():
    """The reference path skips TV too (reference.mismatch_stats / step_stats' token_tv) and
    keeps every other field."""
    x, y, xr, lp, xq = _inputs(4, 50, torch.float32, "cpu", seed=42)
    for tv in (True, False):
        out = pg_kernels.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                                    token_tv=tv, backend="reference")  # fmt: skip
        ms = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr, token_tv=tv,
                                       backend="reference")  # fmt: skip
        ref = reference.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, token_tv=tv)
        assert (out.mismatch.token_tv is None) is (ms.token_tv is None) is (not tv)
        assert (ref.mismatch.token_tv is None) is (not tv)
        if tv:
            kept = out, ms
        else:
            assert torch.equal(out.mismatch.token_kl, kept[0].mismatch.token_kl)
            assert torch.equal(out.token.logprob, kept[0].token.logprob)
            assert torch.equal(ms.token_kl, kept[1].token_kl)


def test_temperature(bd):
    backend, device = bd
    gen = torch.Generator().manual_seed(2)
    per_row = (torch.rand(4, generator=gen, dtype=torch.float64) * 2 + 0.25).to(device)
    per_row_q = (torch.rand(4, generator=gen, dtype=torch.float64) * 2 + 0.25).to(device)
    x, y, xr, lp, xq = _inputs(4, 1000, torch.float32, device, seed=2)
    for t, tr, tq in ((0.7, None, None), (per_row, 1.3, per_row_q), (0.5, per_row, 2.0)):
        lp = reference.token_stats(xr, y, temperature=t if tr is None else tr).logprob.float()
        _check(backend, x, y, xr, lp, xq, temperature=t, rollout_temperature=tr,
               ref_temperature=tq)  # fmt: skip


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.backends("triton")
def test_many_chunks_per_row(bd, direction, small_triton_blocks):
    """Rows cut into many chunk programs (Triton; small blocks): the merges of token_stats' and
    both pairs' chunk states and of the TV sums, with -inf runs covering whole chunks, a max in
    a late chunk, an ignored row and a per-row temperature, match the references."""
    backend, device = bd
    t = torch.tensor([0.8, 1.3, 0.6, 1.0, 0.9], dtype=torch.float64).to(device)
    for dtype in (torch.float32, torch.bfloat16):
        x, y, xr, lp, xq = _inputs(5, 400, dtype, device, seed=23)  # 13 / 7 fp32 / bf16 chunks
        x[1, 40:120] = xr[1, 40:120] = xq[1, 40:120] = -INF  # shared: padded vocabulary
        x[2, :200] = xq[2, :200] = -INF  # many whole chunks impossible (finite KLs either way)
        x[3, 396] = x[3].max() + 4.0  # the row's max in its last chunk
        y[1], y[2], y[4] = 20, 280, -100
        lp = reference.token_stats(xr, y, temperature=t).logprob.float()
        _check(backend, x, y, xr, lp, xq, kl_direction=direction, temperature=t,
               ref_temperature=1.1)  # fmt: skip


def test_ignore_rows_and_strided_inputs(bd):
    """[B, T + 1, V] views shifted by one token, read in place; ignored rows are 0 with a zero
    gradient."""
    backend, device = bd
    b, t, v = 2, 4, 777
    x, xr, xq = (make_logits((b, t + 1), v, torch.bfloat16, device=device, seed=s)
                 for s in (1, 2, 3))  # fmt: skip
    y = make_labels((b, t), v, device=device, seed=4)
    y[0, 1] = y[1, 3] = -100
    lp = reference.token_stats(xr[:, 1:], y).logprob.float()
    _check(backend, x[:, :-1], y, xr[:, 1:], lp, xq[:, :-1], kl_direction="forward")
    out = pg_kernels.step_stats(x[:, :-1], y, rollout_logprobs=lp, rollout_logits=xr[:, 1:],
                                ref_logits=xq[:, :-1], backend=backend)  # fmt: skip
    ignored = y == -100
    for f in (*out.token[:6], out.mismatch.token_kl, out.mismatch.token_tv, out.kl):
        assert bool((f[ignored] == 0).all())


def test_neg_inf_entries(bd):
    """A token only the rollout can sample makes token_kl = +inf; a teacher that gives 0 where the
    policy does not makes reverse KL +inf (its logits' gradient NaN, the teacher's finite)."""
    backend, device = bd
    x, y, xr, lp, xq = _inputs(4, 4099, torch.float32, device, seed=9)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    mask[:, y] = False
    x[mask], xr[mask], xq[mask] = -INF, -INF, -INF  # shared -inf: padded vocabulary
    x[1, (y[1] + 1) % 4099] = xq[1, (y[1] + 1) % 4099] = -INF  # rollout-only token:
    xr[1, (y[1] + 1) % 4099] = 5.0  # token_kl = +inf
    xq[2, (y[2] + 1) % 4099] = -INF  # teacher-only zero under a finite policy entry
    # Forward KL(q || p) is finite here (the teacher-only zero has weight 0); an infinite KL
    # gets no float64 gradient to compare with (the reference's is NaN even where the loss
    # does not use it).
    _check(backend, x, y, xr, lp, xq, kl_direction="forward")
    out = pg_kernels.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                                backend=backend)  # fmt: skip
    assert out.mismatch.token_kl[1] == INF and out.kl[2] == INF
    xa, qa = x.clone().requires_grad_(), xq.clone().requires_grad_()
    out = pg_kernels.step_stats(xa, y, ref_logits=qa, backend=backend)
    (out.kl + out.token.logprob).sum().backward()  # an infinite loss; its gradient per row
    assert bool(xa.grad[2].isnan().all()) and bool(xa.grad[[0, 1, 3]].isfinite().all())
    assert bool(qa.grad.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vocab_masked_with_a_huge_finite_fill(bd, dtype, temperature, small_triton_blocks):
    """All three tensors masked alike with torch.finfo(dtype).min (finite, as Hugging Face
    masks) instead of -inf: whole lanes and chunks of it (small Triton blocks), x / tau beyond
    the float range at tau < 1. With the pairs: rows partly masked (a row masked whole reads
    as a row of -inf at tau < 1 there, as in fp32 PyTorch: -1e30 in the test below); the token
    fields alone: a row masked whole too (uniform)."""
    backend, device = bd
    x, xr, xq = (
        t.to(device)
        for t in masked_with_a_huge_finite_fill(dtype, "finfo.min", [0.1, 0.5], whole=True, seed=3)
    )
    y = torch.tensor([3, 50, 2, 7], device=device)
    kw = {"temperature": temperature}
    _check(backend, x, y, None, None, None, **kw)
    lp = reference.token_stats(xr[:3], y[:3], **kw).logprob.float()
    for direction in DIRECTIONS:
        _check(backend, x[:3], y[:3], xr[:3], lp, xq[:3], kl_direction=direction, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_finfo_min_mask_at_two_temperatures_in_range(bd, dtype, small_triton_blocks):
    """All three tensors masked alike with finfo.min, the rollout and the teacher at their own
    temperatures, every quotient in range (test_kl_divergence's test of the same name: the
    Triton finish's merge of chunks masked whole)."""
    backend, device = bd
    x, xr, xq = (
        u.to(device)
        for u in masked_with_a_huge_finite_fill(dtype, "finfo.min", [0.1, 0.5], whole=False, seed=3)
    )
    y = torch.tensor([3, 50, 2, 7], device=device)
    for t, t_other in ((1.5, 2.0), (2.0, 1.6)):
        lp = reference.token_stats(xr, y, temperature=t_other).logprob.float()
        for direction in DIRECTIONS:
            _check(backend, x, y, xr, lp, xq, kl_direction=direction, temperature=t,
                   rollout_temperature=t_other, ref_temperature=t_other)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shared_finfo_min_mask_under_two_temperatures(bd, dtype, small_triton_blocks):
    """All three tensors masked alike with finfo.min, the rollout and the teacher at their own
    per-row temperatures, fill / tau past the float range on one side of each pair only: the
    bundle's KL and token_kl read +inf on C++ where the float64 truth is finite
    (test_kl_divergence's test of the same name)."""
    backend, device = bd
    x, xr, xq = (
        u.to(device)
        for u in masked_with_a_huge_finite_fill(dtype, "finfo.min", [0.1, 0.5], whole=False, seed=3)
    )
    y = torch.tensor([3, 50, 2, 7], device=device)
    t, t_other = (u.to(device) for u in two_temperatures_past_the_range())
    lp = reference.token_stats(xr, y, temperature=t_other).logprob.float()
    for direction in DIRECTIONS:
        _check(backend, x, y, xr, lp, xq, kl_direction=direction, temperature=t,
               rollout_temperature=t_other, ref_temperature=t_other)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_neg_inf_against_a_weight_in_another_lane(bd, dtype):
    """The bundle's reverse KL with the teacher -inf where the logits have (underflowing) mass,
    and its token_kl with the logits -inf where the rollout has, the weight's max in another
    lane or a later block: +inf (test_kl_divergence's test of the same name)."""
    backend, device = bd
    x, other = neg_inf_against_a_far_weight(dtype, device)
    lp = torch.zeros(4, device=device)
    for t in (0.05, 0.1):
        kw = {"temperature": t, "rollout_temperature": t, "ref_temperature": t}
        out = pg_kernels.step_stats(x, torch.tensor([4, 0, 2048, 0], device=device),
                                    ref_logits=other, backend=backend, **kw)  # fmt: skip
        assert out.kl.eq(INF).all(), (t, out.kl)
        out = pg_kernels.step_stats(other, torch.tensor([4, 0, 1, 0], device=device),
                                    rollout_logprobs=lp, rollout_logits=x, backend=backend,
                                    **kw)  # fmt: skip
        assert out.mismatch.token_kl.eq(INF).all(), (t, out.mismatch.token_kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("filled", ["others", "logits"])
def test_finfo_min_fill_against_logits_of_no_mass(bd, dtype, filled, small_triton_blocks):
    """The rollout and the teacher filled with finfo.min where the logits are finite with no
    fp32 mass (`filled_against_no_mass`), or the logits filled where the other two have none:
    the bundle's token_kl and KL are finite in float64 (test_kl_divergence's test of the same
    name: +inf and NaN gradients on Triton at every temperature)."""
    backend, device = bd
    x, other, y, temps = against_no_mass(dtype, 13, filled == "logits", device)
    # The interpreter: each temperature pair, and each direction, once.
    for (temperature, t_o), direction in cases_of(temps, DIRECTIONS, cover=interpreted(*bd)):
        lp = reference.token_stats(other, y, temperature=t_o).logprob.float()
        _check(backend, x, y, other, lp, other, kl_direction=direction, temperature=temperature,
               rollout_temperature=t_o, ref_temperature=t_o)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_masked_whole_with_a_finite_fill(bd, dtype, small_triton_blocks):
    """All three tensors masked alike with -1e30, row 3 whole: its three distributions are
    uniform and equal, so its KLs and TV are exactly 0, and the KL's gradient on both tensors
    0 to the rounding of 1 / V (the float64 floor of `_check` is vacuous on that row: |z| ~
    1e30 with mass). The
    Triton pairs took every lane of such a row for empty, a NaN row, until a chunk side with
    nothing above the lanes' floor was summed again relative to its raw max."""
    backend, device = bd
    x, xr, xq = (
        t.to(device)
        for t in masked_with_a_huge_finite_fill(dtype, -1e30, [0.1, 0.5], whole=True, seed=3)
    )
    y = torch.tensor([3, 50, 2, 7], device=device)
    # 0.6: m tau rounded misses -1e30 (test_kl_divergence). The interpreter: each temperature,
    # and each direction, once.
    for t, direction in cases_of((1.0, 0.7, 0.6), DIRECTIONS, cover=interpreted(*bd)):
        lp = reference.token_stats(xr, y, temperature=t).logprob.float()
        kw = {"temperature": t, "kl_direction": direction}
        _check(backend, x, y, xr, lp, xq, **kw)
        xa, qa = x.clone().requires_grad_(), xq.clone().requires_grad_()
        out = pg_kernels.step_stats(xa, y, rollout_logprobs=lp, rollout_logits=xr,
                                    ref_logits=qa, backend=backend, **kw)  # fmt: skip
        out.kl.sum().backward()
        assert float(out.kl[3]) == 0.0 and float(out.mismatch.token_kl[3]) == 0.0
        assert float(out.mismatch.token_tv[3]) == 0.0
        # The other side's q_j - p_j takes p_j and q_j from two normalizers (token_stats'
        # and the pair pass's), each rounded: a few fp32 ulps of p_j = 1 / V, / tau
        # (Triton bf16: 9.3e-10 at tau 1, 1.3e-9 at 0.7; the weight side exactly 0).
        bound = 4 * torch.finfo(torch.float32).eps / x.shape[-1] / t
        assert float(xa.grad[3].abs().max()) <= bound
        assert float(qa.grad[3].abs().max()) <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_logits_masked_where_the_others_are_not(bd, dtype, blocks, request):
    """The logits masked with a huge finite fill (-1e4, -1e20, -1e30) where the rollout and the
    teacher are not: part of row 0, every third entry of row 1, and row 2 whole (its rollout
    masked whole with another fill, its teacher not), at temperature 1 and, 16-bit, at
    the logits' own 0.7. The Triton bundle frames the other sides on the logits' lanes there
    (exponents (x + d) k - r_p, d = the lanes' max difference), and x + d lost x where d is a
    fill: a TV of 1.0 where the truth is 0.8585, half the KL, NaN for row 2 (a review of the TV
    pass found it). A lane that far from the logits' gives its frame up, and its chunk is
    summed again in the side's own frame."""
    backend, device = bd
    if blocks == "small":
        request.getfixturevalue("small_triton_blocks")
    g = torch.Generator().manual_seed(11)
    V = 300
    x, xr, xq = (torch.randn(4, V, generator=g) * 2 for _ in range(3))
    xr = x + 0.3 * xr  # a rollout near the logits, a teacher that is not
    for k, f in enumerate((-1e4, -1e20, -1e30)):
        x[0, 40 + 60 * k : 100 + 60 * k] = f
    x[1, ::3] = -1e30
    x[2] = -1e30
    xr[2] = float(torch.finfo(torch.float32).min) if dtype == torch.float32 else -1e4
    x, xr, xq = (t.to(dtype=dtype, device=device) for t in (x, xr, xq))
    y = torch.tensor([3, 1, 2, 7], device=device)
    temperatures = (1.0, 0.7) if dtype == torch.bfloat16 else (1.0,)
    for t in temperatures:
        lp = reference.token_stats(xr, y, temperature=t).logprob.float()
        kw = {"temperature": t, "rollout_temperature": t}
        _check(backend, x, y, xr, lp, xq, kl_direction="reverse", **kw)
        # Forward KL: the teacher's gradient q_j ((d_q - d_p) - c) at a masked logit weighs d_p
        # floored at D2_FAR (2^40 log2 units, step_stats.py) on Triton's 16-bit path, where the
        # truth has -1e30: wrong there (a KL of ~1e29, a loss no one trains on); the logits'
        # gradient and every output are held to the rule.
        grad_args = (0,) if backend == "triton" and dtype == torch.bfloat16 else (0, 4)
        check_against_reference(
            _op(backend), _ref, (x, y, xr, lp, xq), {"kl_direction": "forward", **kw},
            diff_fields=["logprob", "entropy", "collision", "lse", "kl"], grad_args=grad_args,
            forward_floor=_triton_floor(backend, x.dtype),
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_run_ending_inside_a_chunk(bd, dtype):
    """One side masked with -1e4 over a whole step of a chunk and not in its next step, the
    other sides with mass there: each lane's max rises by ~1.4e4 log2 units from one step to the
    next, so a log-ratio against that side moves by as much. Row 0: the logits masked (forward
    KL to the teacher, and the rollout's token_kl, both ~1e3); row 1: the teacher masked
    (reverse KL); row 2: the rollout masked; row 3 plain. The Triton bundle floored that move
    at 2048 units (MOVE_MIN, the floor of its factor 2^delta) wherever the other side kept its
    mass: a forward KL of 3.0e28 for 1.7e29 on test_logits_masked_where_the_others_are_not's
    rows at two steps per chunk. Small blocks of two steps per chunk (the GPU default's count;
    the fixture's alone gives one), the mask on the second chunk's first step."""
    backend, device = bd
    step = 4 * 64 // dtype.itemsize  # small blocks: 64-byte common steps, 4 per loop step
    v = 4 * step + 44
    g = torch.Generator().manual_seed(17)
    x, xr, xq = (torch.randn(4, v, generator=g) * 2 for _ in range(3))
    xr = x + 0.3 * xr
    run = slice(2 * step, 3 * step)
    x[0, run], xq[1, run], xr[2, run] = -1e4, -1e4, -1e4
    x, xr, xq = (t.to(dtype=dtype, device=device) for t in (x, xr, xq))
    y = torch.tensor([3, 1, 2, 7], device=device)
    # At tau 0.7 fp32 takes the rollout's and the teacher's own lanes (the move above), at 1
    # (16-bit: at both) the logits' frame; the interpreter runs the former only.
    with small_blocks(4):  # the forward's chunks: 4 // 2 loop steps
        for t, direction in cases_of((0.7,) if interpreted(*bd) else (0.7, 1.0), DIRECTIONS):
            lp = reference.token_stats(xr, y, temperature=t).logprob.float()
            kw = {"temperature": t, "rollout_temperature": t, "kl_direction": direction}
            _check(backend, x, y, xr, lp, xq, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fill", ["finfo.min", -1e30], ids=str)
def test_one_sided_huge_finite_mask_kl(bd, dtype, fill):
    """The bundle's KL and its gradients on a teacher masked with a huge finite fill where the
    logits have mass, and the other way round, are kl_divergence's (held to float64 there:
    test_kl_divergence's test_one_sided_huge_finite_mask), +inf and NaN included: the same
    chunk sums again in double (C++), and the same dl from the logs where KL and c are ~1e29
    (Triton's bundle had the other side's gradient 2.1e-4 off, -1e30 at tau 1)."""
    backend, device = bd
    x, xq = one_sided_fill_rows(dtype, fill, device)
    y = torch.tensor([3, 1, 2, 7], device=device)

    def bundle(a, b, t, direction):
        out = pg_kernels.step_stats(a, y, ref_logits=b, temperature=t, kl_direction=direction,
                                    backend=backend)  # fmt: skip
        return out.kl

    def op(a, b, t, direction):
        return pg_kernels.kl_divergence(a, b, temperature=t, direction=direction, backend=backend)

    for t in (1.0, 1.3):
        for direction in DIRECTIONS:
            kw = {"t": t, "direction": direction}
            got, want = kl_and_grads(bundle, x, xq, **kw), kl_and_grads(op, x, xq, **kw)
            # Relative: entries of the weight side's gradient are ~1e37. bf16 gradients: an ulp
            # of their output apart (2^-8 relative, 2^-7 below a power of two).
            rtol = 2e-5 if dtype == torch.float32 else 2.0**-7
            if backend == "triton" and dtype == torch.bfloat16 and direction == "forward":
                # Row 2's teacher gradient q_j ((d_q - d_p) - c) at the logits' -1e30 weighs d_p
                # floored at D2_FAR on Triton's 16-bit path (as in the test above).
                got, want = (*got[:2], got[2][[0, 1, 3]]), (*want[:2], want[2][[0, 1, 3]])
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=rtol, atol=4e-7, equal_nan=True)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_dominant_entry_kl_gradient(bd, direction, small_triton_blocks):
    """Finding (9) in the bundle: the KL's gradient on its weight side (the logits for reverse,
    the reference for forward) at the dominant entry of a row whose rest is below fp32's
    ulp(1) / 2, written as minus the sum of the row's others, as kl_divergence's
    (`assert_dominant_entry`); on the logits with token_stats' terms beside it (the label at
    that entry: its double-precision path takes the others' sum too). C++ was 3e-6 off at a
    spike of 40 (tau 0.7), where plain fp32 PyTorch reads 0 and the truth is 0, Triton 1.8e-6;
    now 5e-20 and ~1e-19 (Triton: the dominant rows' own launch, `_dominant_row`)."""
    backend, device = bd
    # V = 4000: 2 C++ chunks (a one-chunk row's direct form happened to be exact); 301 for
    # the interpreter, cut into chunks of 32 (small blocks) with a ragged last block.
    w, other = dominant_entry_rows(301 if backend == "triton" else 4000)
    col = DOMINANT_COLUMN
    # The interpreter: each dtype, and each (temperature, tokens), once.
    runs = ((1.0, False), (0.7, False), (0.7, True))
    for dtype, (tau, tokens) in cases_of((torch.float32, torch.bfloat16), runs,
                                         cover=interpreted(*bd)):  # fmt: skip
        x, xq = ((w, other) if direction == "reverse" else (other, w))
        x, xq = x.to(dtype), xq.to(dtype)
        y = torch.full((x.shape[0],), col if direction == "reverse" else 7)
        kw = dict(kl_direction=direction, temperature=tau)

        def grad(fn, a, b, kw=kw, tokens=tokens, y=y, **more):
            a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
            out = fn(a, y.to(a.device), ref_logits=b, **kw, **more)
            loss = out.kl.sum()
            if tokens:
                loss = loss + 0.5 * out.token.logprob.sum() + 0.3 * out.token.entropy.sum()
            g = torch.autograd.grad(loss, (a, b))
            return (g[0] if direction == "reverse" else g[1]).cpu()

        ours = grad(functools.partial(pg_kernels.step_stats, backend=backend), x.to(device),
                    xq.to(device))  # fmt: skip
        truth = grad(reference.step_stats, x.double(), xq.double()).double()
        plain = grad(reference.step_stats, x.float(), xq.float(), upcast=False)
        lp, lq = (scaled(t, tau, torch.float64).log_softmax(-1) for t in (x, xq))
        lw, lv = (lp, lq) if direction == "reverse" else (lq, lp)
        assert_dominant_entry(ours, truth, plain, lw, lv, dtype, (dtype, tau, tokens))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_peaked_rows_other_side_gradient(bd, direction):
    """The bundle's other-side KL gradient at the top token of peaked rows, as kl_divergence's
    (test_kl_divergence.py, same name): dl from the logs made it 0.10 off on Triton (its l_p =
    L - m / tau carries ulp(L)) and 3.1e-3 on C++, where KL - c gives ~2e-6."""
    backend, device = bd
    y = torch.zeros(6, dtype=torch.long, device=device)
    for offset in (0.0, 30.0):
        x, xq = (t.to(device) for t in peaked_rows_with_shifted_tails(offset))
        for t in (1.0, 0.7):

            def op(a, b, t=t):
                kw = {"temperature": t, "kl_direction": direction, "backend": backend}
                return pg_kernels.step_stats(a, y, ref_logits=b, **kw).kl

            err = other_side_top_error(op, x, xq, direction, t)
            assert err <= 1e-4, (offset, t, err)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_moderate_one_sided_fills_other_side_gradient(bd, direction):
    """The bundle's other-side KL gradient on sides masked in part with fills from -1e2 to
    -1e6 (test_kl_divergence.py, same name, and its bound). The Triton bundle's logits' log s1
    is -log max_prob: as L - m / tau it carried ulp(L), 7.7e-4 off at -1e6 on rows at +30,
    tau 0.3 (plain fp32 PyTorch 1.0e-4), and 22 % when the switch weighed |L| at 1024x."""
    backend, device = bd
    eps = torch.finfo(torch.float32).eps
    y = torch.zeros(3, dtype=torch.long, device=device)
    for fill, t, offset in MODERATE_FILLS:
        x, xq = (v.to(device) + offset for v in moderate_fill_rows(direction, fill))

        def op(a, b, t=t):
            kw = {"temperature": t, "kl_direction": direction, "backend": backend}
            return pg_kernels.step_stats(a, y, ref_logits=b, **kw).kl

        err, plain_err = other_side_errors(op, x, xq, direction, t)
        assert bool((err <= 2 * plain_err + 16 * eps).all()), (fill, t, err, plain_err)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_neg_inf_label_logit_kl_gradient(bd, direction):
    """A label whose logit is -inf (logprob -inf) has p_c = 0: with the KL alone in the loss its
    gradient entry is kl_divergence's (0 for the reverse KL, -q_c / tau for the forward), not
    p_c (log p_c - ...) = -inf through a floored p_c (the C++ label entry, recomputed in
    double)."""
    backend, device = bd
    x, y, _, _, xq = _inputs(3, 257, torch.float32, device, seed=12)
    x[1, y[1]] = -INF
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    kl = pg_kernels.step_stats(xa, y, ref_logits=xq, kl_direction=direction, temperature=0.8,
                               backend=backend).kl  # fmt: skip
    kl.sum().backward()
    pg_kernels.kl_divergence(xb, xq, direction=direction, temperature=0.8,
                             backend=backend).sum().backward()  # fmt: skip
    assert bool(xa.grad.isfinite().all())
    assert direction == "forward" or float(xa.grad[1, y[1]]) == 0.0
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)


def test_nan_rows_stay_local(bd):
    """A NaN policy row is NaN everywhere; a NaN rollout or teacher row spoils only its own
    statistic, and a teacher whose KL is not in the loss is never read by the backward."""
    backend, device = bd
    x, y, xr, lp, xq = _inputs(4, 1000, torch.float32, device, seed=11)
    x[0, 3] = float("nan")
    xr[1, 5] = float("nan")
    xq[2, 7] = float("nan")
    xa = x.clone().requires_grad_()
    out = pg_kernels.step_stats(xa, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                                backend=backend)  # fmt: skip
    assert bool(out.token.logprob[0].isnan()) and bool(out.kl[0].isnan())
    assert bool(out.mismatch.token_kl[1].isnan()) and bool(out.token.logprob[1].isfinite())
    assert bool(out.kl[2].isnan()) and bool(out.mismatch.token_tv[2].isfinite())
    out.token.entropy.sum().backward()  # the KL is not in the loss: row 2 is finite
    assert bool(xa.grad[0].isnan().all()) and bool(xa.grad[1:].isfinite().all())
    xb = x.clone().requires_grad_()
    pg_kernels.step_stats(xb, y, ref_logits=xq, backend=backend).kl[1:].sum().backward()
    assert bool(xb.grad[2].isnan().all()) and bool(xb.grad[[1, 3]].isfinite().all())


def test_gradients_only_where_asked(bd):
    backend, device = bd
    x, y, xr, lp, xq = _inputs(3, 500, torch.float32, device, seed=13)
    qa = xq.clone().requires_grad_()  # a trained teacher, a frozen policy
    out = pg_kernels.step_stats(x, y, ref_logits=qa, kl_direction="forward", backend=backend)
    out.kl.sum().backward()
    qb = xq.clone().requires_grad_()
    pg_kernels.kl_divergence(x, qb, direction="forward", backend=backend).sum().backward()
    # The bundles sum c = E_q[d_q - d_p] in another order than kl_divergence's pair pass (C++:
    # its u lanes in one chain where kl_divergence runs two, for AVX2's registers; Triton: in
    # token_stats' lane layout): fp32 sums of 500 terms in two orders. Measured here: Triton's c
    # of row 0 off the float64 truth by 9.4e-7 (bundle) and 4.8e-6 (kl_divergence), a gradient
    # entry of 0.0148 apart by 3.6e-7; the C++ gradients 3.0e-7 (bundle) and 1.8e-7
    # (kl_divergence) off the truth, plain fp32 PyTorch 4.5e-7: the 1e-6 of
    # test_equals_the_single_ops.
    torch.testing.assert_close(qa.grad, qb.grad, rtol=1e-5, atol=1e-6)
    xa = x.clone().requires_grad_()
    out = pg_kernels.step_stats(xa, y, rollout_logprobs=lp, rollout_logits=xr, backend=backend)
    assert not out.mismatch.token_kl.requires_grad and not out.mismatch.k3.requires_grad
    out.mismatch.logprob.sum().backward()
    assert xa.grad is not None


def test_reference_backend_rounds_a_16bit_gradient_once():
    """backend="reference" converts 16-bit logits once, so their gradient is the fp32 one rounded
    to bf16 once, not the sum of three ops' gradients each rounded to bf16."""
    x, y, xr, lp, xq = _inputs(4, 300, torch.bfloat16, "cpu", seed=21)
    xa, xf = x.clone().requires_grad_(), x.float().requires_grad_()
    for leaf, op in ((xa, functools.partial(pg_kernels.step_stats, backend="reference")),
                     (xf, functools.partial(reference.step_stats, upcast=False))):  # fmt: skip
        out = op(leaf, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq)
        (out.token.logprob + out.token.entropy + out.mismatch.logprob + out.kl).sum().backward()
    assert torch.equal(xa.grad, xf.grad.to(torch.bfloat16))


def test_deterministic_and_batch_invariant(bd):
    backend, device = bd
    x, y, xr, lp, xq = _inputs(8, 2500, torch.bfloat16, device, seed=15)

    def run(rows):
        out = pg_kernels.step_stats(x[rows], y[rows], rollout_logprobs=lp[rows],
                                    rollout_logits=xr[rows], ref_logits=xq[rows],
                                    backend=backend)  # fmt: skip
        return torch.stack([*out.token[:6], out.mismatch.token_kl, out.mismatch.token_tv, out.kl])

    full = run(slice(None))
    assert torch.equal(full, run(slice(None)))
    assert torch.equal(full[:, 3:5], run(slice(3, 5)))


@pytest.mark.backends("triton")
@pytest.mark.parametrize(
    "dtype, tensors",
    [(torch.bfloat16, "both"), (torch.float16, "both"), (torch.float32, "both"),
     (torch.bfloat16, "rollout"), (torch.bfloat16, "ref")],
    ids=str,
)  # fmt: skip
def test_rows_alone_and_in_a_batch_of_odd_stride(bd, dtype, tensors, small_triton_blocks):
    """Rows of odd V: alone (16-byte aligned: vector loads, bf16's full steps int32 pairs) and
    inside the batch (odd row stride: each lane's elements by scalar loads, `load_lanes`) the
    same bits, for every output and both gradients, with rollout and teacher logits, or one of
    them (each set of tensors is a kernel variant): the bf16 element path adds the pairs path's
    even and odd halves apart."""
    backend, device = bd
    x, y, xr, lp, xq = _inputs(6, 301, dtype, device, seed=16)
    has_rollout, has_ref = tensors in ("both", "rollout"), tensors in ("both", "ref")

    def run(rows):
        xg, xqg = x[rows].clone().requires_grad_(), xq[rows].clone().requires_grad_()
        out = pg_kernels.step_stats(xg, y[rows], rollout_logprobs=lp[rows],
                                    rollout_logits=xr[rows] if has_rollout else None,
                                    ref_logits=xqg if has_ref else None, temperature=0.8,
                                    backend=backend)  # fmt: skip
        m = out.mismatch
        loss = out.token.logprob + out.token.entropy
        loss = loss + m.token_kl if has_rollout else loss
        (loss + out.kl if has_ref else loss).sum().backward()
        stats = [*out.token[:6], *(f for f in m if f is not None and f.dtype.is_floating_point)]
        if has_ref:
            stats.append(out.kl)
        return [torch.stack(stats), xg.grad] + ([xqg.grad] if has_ref else [])

    batch = run(slice(None))
    for r in range(6):
        alone = run(slice(r, r + 1))
        for i, (b, a) in enumerate(zip(batch, alone)):
            b = b[:, r : r + 1] if i == 0 else b[r : r + 1]
            assert torch.equal(b, a), (r, i)


def test_empty_batch(bd):
    backend, device = bd
    x, y, xr, lp, xq = _inputs(2, 50, torch.float32, device, seed=1)
    xa = x[:0].clone().requires_grad_()
    out = pg_kernels.step_stats(xa, y[:0], rollout_logprobs=lp[:0], rollout_logits=xr[:0],
                                ref_logits=xq[:0], backend=backend)  # fmt: skip
    assert out.kl.shape == (0,) and out.mismatch.token_tv.shape == (0,)
    (out.token.logprob.sum() + out.kl.sum()).backward()
    assert xa.grad.shape == (0, 50)


needs_cpu_ext = pytest.mark.skipif(
    "cpu" not in pg_kernels._backend.KERNELS["step_stats"]
    or pg_kernels._backend.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="C++ extension unavailable",
)


@needs_cpu_ext
def test_opcheck():
    x, y, xr, lp, xq = _inputs(4, 33, torch.float32, "cpu", seed=17)
    t = torch.rand(4) + 0.5
    op = torch.ops.pg_kernels.step_stats.default
    for roll, ref, temp in ((None, None, None), (xr, None, t), (None, xq, None), (xr, xq, t)):
        for direction, tv in zip(DIRECTIONS, (True, False)):
            args = (x.clone().requires_grad_(), roll, None if ref is None else
                    ref.clone().requires_grad_(), y, temp, 1.3, None, 0.8, t, 1.0, direction,
                    -100, "cpu", tv)  # fmt: skip
            torch.library.opcheck(op, args)
    outs = op(x, xr, xq, y, None, 1.0, None, 1.0, None, 1.0, "reverse", -100, "cpu")
    _, entropy, collision, _, lse, max_prob, argmax, _, _, kl, kl_state = outs
    bwd = torch.ops.pg_kernels.step_stats_backward.default
    g = [torch.randn(4) for _ in range(5)]
    for need in ((True, True), (True, False), (False, True)):
        args = (*g, x, xq, y, None, 1.0, t, 1.0, "reverse", -100, lse, entropy, collision,
                max_prob, argmax, kl, kl_state, *need, "cpu")  # fmt: skip
        torch.library.opcheck(bwd, args)


@needs_cpu_ext
def test_compile_fullgraph_matches_eager():
    x, y, xr, lp, xq = _inputs(6, 500, torch.float32, "cpu", seed=19)
    x, xr, xq, y, lp = (
        x.view(2, 3, 500),
        xr.view(2, 3, 500),
        xq.view(2, 3, 500),
        y.view(2, 3),
        lp.view(2, 3),
    )

    def loss(x, xq, tv):
        out = pg_kernels.step_stats(x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xq,
                                    temperature=0.9, token_tv=tv)  # fmt: skip
        t = out.token
        total = (t.logprob * out.mismatch.tis_weight + 0.1 * t.entropy + out.kl).sum()
        tv_field = out.mismatch.token_tv if tv else torch.zeros_like(t.logprob)
        return total, torch.stack([t.logprob, out.mismatch.token_kl, tv_field, out.kl])

    compiled = torch.compile(loss, fullgraph=True)
    for tv in (True, False):
        xa, xb, qa, qb = (t.clone().requires_grad_() for t in (x, x, xq, xq))
        la, fa = loss(xa, qa, tv)
        lb, fb = compiled(xb, qb, tv)
        la.backward()
        lb.backward()
        assert torch.equal(fa, fb)
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
        assert torch.equal(xa.grad, xb.grad) and torch.equal(qa.grad, qb.grad)


# --- bad input ----------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    x, y, xr, lp, xq = _inputs(3, 10, torch.float32, "cpu", seed=1)
    S = pg_kernels.step_stats
    with pytest.raises(ValueError, match="rollout_logits needs rollout_logprobs"):
        S(x, y, rollout_logits=xr)
    with pytest.raises(ValueError, match="kl_direction"):
        S(x, y, ref_logits=xq, kl_direction="backward")
    with pytest.raises(ValueError, match="ref_logits"):
        S(x, y, ref_logits=xq[:, :9])
    with pytest.raises(ValueError, match="rollout_logprobs"):
        S(x, y, rollout_logprobs=lp[:2])
    with pytest.raises(ValueError, match="tis_cap"):
        S(x, y, rollout_logprobs=lp, tis_cap=-1.0)
    # checked without rollout_logprobs too, as rollout_temperature is (it returned normally)
    for kw in (dict(tis_cap=-1.0), dict(icepop_low=3.0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            S(x, y, **kw)
    with pytest.raises(ValueError, match="ref_temperature"):
        S(x, y, ref_logits=xq, ref_temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        S(x, y[:2])
    with pytest.raises(TypeError, match="step_stats: labels must be a torch.Tensor"):
        S(x, None)
    with pytest.raises(TypeError, match="step_stats: token_tv must be a bool, got Tensor"):
        S(x, y, rollout_logprobs=lp, rollout_logits=xr, token_tv=torch.tensor(True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_and_shifted_rollout_rows_are_exact(bd, dtype):
    """Rollout (and teacher) logits equal to the logits at any temperature, or the logits minus 2
    (exact on a 1/16 grid in [-7, 7]) at temperature 1: token_kl, token_tv and the KL to the
    teacher are exactly 0, as the truth and the single ops give. V = 2600 spans two chunks of
    the C++ pass and row 1's second chunk has a lower max than its first (both sides' exps are
    relative to their running max).
    The Triton bundle took the logits' pair sums from token_stats' exps (tl.fma, which the
    interpreter rounds in two steps) and the rollout's from `fma_acc`, and each side's
    exponents x k - fl(m k) relative to its own lane max, which a shifted row rounds
    differently: token_kl up to 4.0e-7 and token_tv up to 2.3e-7 on these rows in fp32 (bf16
    3.0e-7 / 1.7e-7). Every pair side now forms its exponents one way, and at temperature 1 the
    other side's relative to the logits' lanes (`step_stats._framed_exps`). The C++ bundle
    took the teacher's exps relative to each chunk's own max (the logits' and the rollout's
    to their running max): a KL of 2.1e-9 on fp32 row 1 shifted, 1.7e-17 on fp64 equal rows
    at 0.7; now a running max too.
    Shifted rows under a temperature (the other sides at the logits' own): within the double
    finish's rounding (4 fp64 eps; C++ 5.5e-32) on 16-bit logits. The Triton bundle framed the
    other sides on the logits' lanes at temperature 1 only, and under a temperature each side's
    exponents x k - fl(m k) were rounded apart: 16-bit token_kl and KL of 6.7e-8 and 1.2e-7
    here (bf16 3.0e-7 in the fuzzer); it now frames them under a temperature too, where the
    move x + d is exact (16-bit logits). fp32 and fp64 rows keep their own lanes there: the
    fp32 excess k leaves the frames' roundings squared, (eps32 max|z|)^2 (seen 5.5e-15), fp64
    the double finish's (seen 7.8e-16, bound 8 eps64); Triton's fp32 TV keeps the two sides'
    sums a rounding apart (their own lanes' exponents x k - fl(m k)): 6.5e-8 on row 0 at 0.7,
    where plain fp32 PyTorch has 9.8e-8, 0 elsewhere; bound eps32 (1 + log V). (Its frames were
    rebuilt from the rounded z max before `_pair.tv_frame`: 5.1e-9 and 3.3e-8.) Since
    2026-12-05 the Triton bundle's fp32 / fp64 teacher keeps its own lanes at temperature 1 too
    (framed, a teacher far from the logits lost ulp(the logits' max)): its shifted rows' KL is
    held to those same bounds, equal rows' to 0."""
    backend, device = bd
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 2600, generator=g) * 32).round().div(16).clamp(-7.0, 7.0)
    x[1, 2048:] = x[1, 2048:].clamp(max=1.0)
    x[2, 2:] = -float("inf")
    x[2, :2] = torch.tensor([0.0, 1.0])
    x = x.to(dtype=dtype, device=device)
    y = torch.tensor([3, 2100, 1], device=device)
    lp = torch.zeros(3, device=device)
    per_row = torch.tensor([0.7, 1.3, 0.35], dtype=torch.float64, device=device)
    for xr, t, direction in ((x.clone(), 1.0, "reverse"), (x - 2, 1.0, "forward"),
                             (x - 2, 1.0, "reverse"), (x.clone(), 0.7, "forward"),
                             (x.clone(), per_row, "reverse"), (x - 2, 0.7, "reverse"),
                             (x - 2, per_row, "forward")):  # fmt: skip
        out = pg_kernels.step_stats(
            x, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=xr, kl_direction=direction,
            temperature=t, backend=backend,
        )  # fmt: skip
        m = out.mismatch
        eps64, eps32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
        exact = torch.equal(xr, x) or (isinstance(t, float) and t == 1.0)
        bound = tv_bound = 0.0 if exact else 4 * eps64
        # The Triton bundle's fp32 / fp64 teacher keeps its own lanes at temperature 1 too.
        own_q = backend == "triton" and dtype.itemsize != 2
        kl_exact = torch.equal(xr, x) or (exact and not own_q)
        kl_bound = 0.0 if kl_exact else 4 * eps64
        if backend == "triton" and dtype == torch.float32:
            z = float(x[x.isfinite()].abs().max()) / float(torch.as_tensor(t).min())
            bound = 0.0 if exact else (eps32 * z) ** 2
            kl_bound = 0.0 if kl_exact else (eps32 * z) ** 2
            tv_bound = 0.0 if exact else eps32 * (1 + math.log(x.shape[-1]))
        elif backend == "triton" and dtype == torch.float64:
            bound = tv_bound = 0.0 if exact else 8 * eps64
            kl_bound = 0.0 if kl_exact else 8 * eps64
        for name, value, most in (("token_kl", m.token_kl, bound), ("token_tv", m.token_tv,
                                  tv_bound), ("kl", out.kl, kl_bound)):  # fmt: skip
            value = value.cpu()
            assert value.shape == (3,) and bool((value.abs() <= most).all()), (name, t, value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_teacher_equal_to_the_logits_has_zero_kl_gradients(bd, dtype, direction):
    """The KL penalty's first step: a reference (teacher) whose logits equal the policy's, or
    16-bit logits shifted by a constant, at the logits' own temperature. The KL is 0 and so are
    both its gradients, exactly, as plain PyTorch, kl_divergence and the C++ bundle give. The
    Triton bundle's 16-bit backward formed p_j from token_stats' frame and q_j from the
    reference's own, and the weight side's log-ratio from per-row coefficients: up to 7.7e-7
    (fp16, tau 0.7) on these rows (the fuzzer: 1.1e-8 on a bf16 row shifted by 3 at tau 16.7,
    plain 5e-10). Both sides now share one frame (`_bwd_values`' FRAMED). fp32 rows take the
    log-ratio from two products rounded alike, with one scale where the temperature is shared
    and the reference framed at the logits' max logit where its rebuilt frame lies an ulp from
    it (peaked rows at tau 0.7 kept 1.3e-9 without the frame); fp64 rows keep ~1e-16."""
    backend, device = bd
    g = torch.Generator().manual_seed(11)
    # On grids that 16-bit logits and their shifts by 3 and -2 hold exactly.
    x = (torch.randn(12, 700, generator=g, dtype=torch.float64) * 12).round().div(4).clamp(-30, 30)
    x[:4] = (x[:4] * 4).round().clamp(-120, 120)  # peaked rows: the dominant-entry launch
    x[5, 600:] = -INF  # a masked tail on both sides
    y = torch.randint(0, 700, (12,), generator=g)
    per_row = torch.linspace(0.3, 17.0, 12, dtype=torch.float64)
    cases = [(0.0, 1.0), (0.0, 0.7), (0.0, per_row)]
    if dtype.itemsize == 2:
        cases += [(3.0, 0.7), (-2.0, per_row)]  # exact shifts of 16-bit logits
    for shift, t in cases:
        xs = x.to(dtype)
        xq = (xs.double() + shift).to(dtype)
        finite = xs.isfinite()
        assert bool(((xq.double() - xs.double())[finite] == shift).all()), shift
        xa = xs.to(device).requires_grad_()
        qa = xq.to(device).requires_grad_()
        tt = t.to(device) if isinstance(t, torch.Tensor) else t
        out = pg_kernels.step_stats(xa, y.to(device), ref_logits=qa, kl_direction=direction,
                                    temperature=tt, backend=backend)  # fmt: skip
        up = torch.rand(12, generator=g, dtype=torch.float64).to(device=device,
                                                                 dtype=out.kl.dtype)  # fmt: skip
        gx, gq = torch.autograd.grad(out.kl, (xa, qa), up)
        where = (shift, "per-row" if isinstance(t, torch.Tensor) else t)
        # Triton's fp64 rows keep the plain difference of the two sides (`has_other_series`):
        # ~1e-16 (seen 1.3e-16), the rule's fp64 floor; 8 eps64 of a gradient entry's scale.
        most = 8 * torch.finfo(torch.float64).eps / float(torch.as_tensor(t).min()) if (
            backend == "triton" and dtype == torch.float64) else 0.0  # fmt: skip
        assert float(out.kl.abs().max()) == 0.0, where
        assert float(gx.abs().max()) <= most, (where, float(gx.abs().max()))
        assert float(gq.abs().max()) <= most, (where, float(gq.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_entry_rows_are_exact(bd, dtype):
    """V = 1: every distribution is [1]: logprob, token_kl, token_tv and the KL to the teacher
    are exactly 0 at any temperatures, as plain PyTorch gives, and the KL's gradients are 0 to
    the fp32 rounding of the saved state. The Triton bundle summed each side relative to
    (x / tau rounded) tau rounded, an ulp from x, and formed s1 - 1 from s1: KL up to 7.8e-7,
    token_kl 6e-8 and token_tv 4.2e-7 (fp32), KL gradient 1.2e-7 (bf16). Its pair sides now
    sum relative to the max logit itself with that entry exactly 1 (`_pair`'s convention); the
    fp32 gradients keep ~1e-14 (the backward rebuilds a = (x / tau rounded) tau rounded, and
    the forward's c carries (x - a) / tau rounded once to fp32)."""
    backend, device = bd
    x = torch.tensor([[0.0737], [3.0781], [-41.5]], dtype=dtype, device=device)
    xr = torch.tensor([[1.5], [0.0737], [7.25]], dtype=dtype, device=device)
    xq = torch.tensor([[3.0781], [0.0737], [7.25]], dtype=dtype, device=device)
    y = torch.zeros(3, dtype=torch.long, device=device)
    lp = torch.full((3,), -0.25, device=device)
    per_row = torch.tensor([16.714989565055827, 0.07, 1.3], dtype=torch.float64, device=device)
    zeros = torch.zeros(3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    for t in (per_row, 0.7, 1.0):
        for direction in DIRECTIONS:
            xa, qa = x.clone().requires_grad_(), xq.clone().requires_grad_()
            out = pg_kernels.step_stats(
                xa, y, rollout_logprobs=lp, rollout_logits=xr, ref_logits=qa,
                kl_direction=direction, temperature=t, ref_temperature=3.1, backend=backend,
            )  # fmt: skip
            m = out.mismatch
            for name, v in (("kl", out.kl), ("logprob", out.token.logprob),
                            ("token_kl", m.token_kl), ("token_tv", m.token_tv)):  # fmt: skip
                assert torch.equal(v.detach().cpu(), zeros), (name, t, direction, v)
            out.kl.sum().backward()
            for name, grad in (("logits", xa.grad), ("ref_logits", qa.grad)):
                assert float(grad.abs().max()) <= 1e-12, (name, t, direction, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.backends("triton")
def test_near_equal_16bit_rows_with_the_excess(bd, dtype, pair_excess_16bit):
    """The bundle's token_kl and KL of near-equal 16-bit rows (`near_equal_rows`: the rollout
    the other side, the teacher its copy - 3) with the pair lanes' excess k
    (`_pair.EXCESS_16BIT`, off by default until a GPU run times it; kl_divergence's test of the
    same): without it 4e-9 .. 1.7e-7 off (open class (1)), with it at most 3e-10."""
    backend, device = bd
    for x, xr, t in near_equal_rows(dtype):
        xq = (xr.double() - 3.0).to(dtype)
        y = torch.zeros(x.shape[0], dtype=torch.long)
        lp = torch.full((x.shape[0],), -1.0)
        tt = t.double() if torch.is_tensor(t) else t
        td = t.to(device) if torch.is_tensor(t) else t
        for direction in DIRECTIONS:
            out = pg_kernels.step_stats(
                x.to(device), y.to(device), rollout_logprobs=lp.to(device),
                rollout_logits=xr.to(device), ref_logits=xq.to(device), temperature=td,
                rollout_temperature=td, ref_temperature=td, kl_direction=direction,
                backend=backend,
            )  # fmt: skip
            token_kl = reference.kl_divergence(xr.double(), x.double(), temperature=tt)
            kl = reference.kl_divergence(x.double(), xq.double(), direction=direction,
                                         temperature=tt)  # fmt: skip
            for name, got, truth in (("token_kl", out.mismatch.token_kl, token_kl),
                                     ("kl", out.kl, kl)):  # fmt: skip
                err = float((got.cpu().double() - truth).abs().max())
                assert err < 1e-9, (name, tuple(x.shape), t, direction, err)


def test_near_equal_teacher_rows_kl(bd):
    """The KL to a near-equal fp32 teacher (kl_divergence's reverse V = 2 rows: reference =
    logits + 3, + noise of 1e-3 or 0), with its gradients, one row per call. The Triton
    bundle's fp32 lanes took it as u / s1_w plus a difference of two rounded normalizers:
    3.0e-8 off where 2.0e-8 is allowed (a KL of 2.0e-8, plain PyTorch 9.8e-9) and 1.4e-8 where
    3.7e-9 is (a KL of 1.2e-14). Its pair sides now sum the excess too (`_pair.excess_terms`):
    1.1e-12 and 3.1e-15."""
    _check_kl_alone(bd, NEAR_EQUAL_V2_ROWS[:2])


def _check_kl_alone(bd, rows):
    """The bundle's KL and both its gradients with the KL alone in the loss, one row per call
    (the rule's 2x plain PyTorch is per batch); rows of (x, teacher logits, tau, direction)."""
    backend, device = bd
    for x, xq, tau, direction in rows:
        kw = {"kl_direction": direction, "temperature": torch.tensor([tau], device=device)}
        x, xq = (torch.tensor([r], device=device) for r in (x, xq))
        kl_floor = _kl_grad_floor(x, xq, {"direction": direction, **kw})
        check_against_reference(
            _op(backend), _ref, (x, torch.tensor([0], device=device), None, None, xq), kw,
            diff_fields=("kl",), check_fields=("kl",), grad_args=(0, 4),
            grad_floor=lambda i, ups, f=kl_floor: f(i, {"out": ups["kl"]}),
        )  # fmt: skip


@pytest.mark.backends("cpu")
@pytest.mark.parametrize("reverse_rows", [True, False], ids=["reverse", "forward"])
def test_near_equal_teacher_rows_other_side_gradient(bd, reverse_rows):
    """The KL's gradient w.r.t. its other side (the teacher's for reverse KL(p || q), the
    logits' for forward KL(q || p)), g / tau (v_j - w_j), on kl_divergence's near-equal fp32
    V = 2 rows, each label: it cancels two probabilities of ~0.5 to 1e-8..1e-5. From v_j and w_j
    each rounded once the C++ bundle carried their roundings: the teacher's gradient (reverse)
    1.1e-7 off against 8.2e-8 allowed (plain PyTorch 4.1e-8), the logits' (forward) 5.2e-8
    against 3.6e-8 (plain 1.8e-8). It takes kl_divergence's w_j expm1(log v_j - log w_j) where
    the two are close, with log s1_v - log s1_w = KL - c from the saved kl and shift (the
    label's entry, in double, too): 4.7e-8 and 1.8e-9. Only the KL is in the loss, so the
    tolerance is the KL term's own."""
    backend, device = bd
    for x, xq, tau, direction in NEAR_EQUAL_V2_ROWS:
        if (direction == "reverse") != reverse_rows:
            continue
        kw = {"kl_direction": direction, "temperature": torch.tensor([tau], device=device)}
        x, xq = (torch.tensor([r], device=device) for r in (x, xq))
        kl_floor = _kl_grad_floor(x, xq, {"direction": direction, **kw})

        def floor(i, ups, kl_floor=kl_floor):
            return kl_floor(i, {"out": ups["kl"]})

        for label in (0, 1):
            y = torch.tensor([label], device=device)
            check_against_reference(
                _op(backend), _ref, (x, y, None, None, xq), kw, diff_fields=("kl",),
                check_fields=("kl",), grad_args=(0, 4), grad_floor=floor,
            )  # fmt: skip


def test_near_equal_small_teacher_rows_other_side_gradient(bd):
    """The KL's other side (the teacher's gradient for reverse KL, the logits' for forward) on
    kl_divergence's fp32 V = 2 rows within 1e-4 of their teacher at |z| < 0.01, the KL alone in
    the loss: q_j - p_j ~ 1e-6 from two probabilities of ~0.5 rounded apart (token_stats' p_j,
    the pair pass's q_j). Triton's fp32 bundle took their difference: 6.2e-9 off against 7.1e-10
    allowed (reverse; plain PyTorch 2.9e-10), 3.5e-9 against 4.1e-10 (forward). It now takes
    p_j expm1(delta) where the two are close (`_pair.other_side_difference`): 1.1e-12, 2.3e-12."""
    _check_kl_alone(bd, NEAR_EQUAL_SMALL_V2_ROWS)


# fp32 V = 2 rows within 1e-4 of their teacher (no shift) at |z| < 0.03: x, teacher logits,
# temperature, direction, the upstream fields of each check
# (test_near_equal_small_teacher_rows_weight_side_gradient).
NEAR_EQUAL_SMALL_WEIGHT_ROWS = (
    ([0.02658946067094803, 0.029899148270487785], [0.02651354670524597, 0.0298389233648777],
     13.18372917175293, "reverse", [("kl",)]),
    ([0.010983196087181568, -0.016174787655472755], [0.010999211110174656, -0.016147330403327942],
     14.936689376831055, "forward", [("kl",), ("logprob", "entropy", "kl")]),
)  # fmt: skip


def test_near_equal_small_teacher_rows_weight_side_gradient(bd):
    """The KL's weight side (the logits' gradient p_j ((d_p - d_q) - c) for reverse KL, the
    teacher's q_j ((d_q - d_p) - c) for forward) on near-equal fp32 rows, the KL alone in the
    loss (forward: also beside token_stats' fields, whose gradient the teacher's does not
    carry): (d_p - d_q) - c ~ 1e-6 against O(1) parts. Triton's fp32 bundle folded d_p into
    token_stats' coefficients (ln 2 (d2 + rho_hi), each O(1)), so the small difference carried
    their roundings, a few ulps of O(1) in a result of ~1e-8 (interpreter): reverse 2.8e-9 off
    against 2.5e-10 allowed (plain PyTorch 1.0e-10); forward 4.8e-9 against 5.1e-10 (2.5e-10),
    2.1e-9 against 7.4e-10 (3.6e-10) beside token_stats' fields. It now forms d_p - d_q as one
    difference per element (`_bwd_values`' SERIES), as kl_divergence: 3.9e-13, 1.1e-11,
    1.6e-11 (the C++ kernel: 1.0e-12, 9.2e-13, 1.3e-12)."""
    backend, device = bd
    for x, xq, tau, direction, field_sets in NEAR_EQUAL_SMALL_WEIGHT_ROWS:
        kw = {"kl_direction": direction, "temperature": torch.tensor([tau], device=device)}
        x, xq = (torch.tensor([r], device=device) for r in (x, xq))
        kl_floor = _kl_grad_floor(x, xq, {"direction": direction, **kw})
        for fields in field_sets:
            check_against_reference(
                _op(backend), _ref, (x, torch.tensor([0], device=device), None, None, xq), kw,
                diff_fields=fields, check_fields=("kl",), grad_args=(0, 4),
                grad_floor=lambda i, ups, f=kl_floor: f(i, {"out": ups["kl"]}),
            )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_kl_teacher_gradient_far_below_the_policy_max(bd, dtype):
    """Forward KL(q || p) to a flat teacher (tau_q 14.3) from a sharp policy (tau 0.095): the
    policy's log p_j reaches -852 nats, below the exponent floor that zeroes p_j (2^-1100) but
    not the teacher's gradient q_j ((d_q - d_p) - c), whose d_p must stay exact there. Triton's
    16-bit bundle took d_p from token_stats' floored exponent: a teacher-gradient entry 0.00479
    where the truth is 0.00650 (bf16 [2, 2, 257], the fuzzer, seed 20261205)."""
    backend, device = bd
    g = torch.Generator().manual_seed(20261205)
    x = (torch.rand(3, 257, generator=g, dtype=torch.float64) * 81 - 40).to(dtype)
    x[:, 0] = -40.0  # the row's floor: d_p = -81 / 0.095 = -852 nats
    xq = (x.double() + 3.0).to(dtype)
    kw = {"kl_direction": "forward", "temperature": torch.full((3,), 0.095, device=device),
          "ref_temperature": 14.3}  # fmt: skip
    x, xq = x.to(device), xq.to(device)
    kl_floor = _kl_grad_floor(x, xq, kw | {"direction": "forward"})
    y = torch.tensor([5, 100, 256], device=device)
    check_against_reference(
        _op(backend), _ref, (x, y, None, None, xq), kw, diff_fields=("kl",), check_fields=("kl",),
        grad_args=(0, 4), grad_floor=lambda i, ups, f=kl_floor: f(i, {"out": ups["kl"]}),
    )  # fmt: skip
