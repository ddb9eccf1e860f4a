"""Property-based fidelity fuzzer: every op on every backend present, against float64.

Hypothesis draws the inputs (shapes with V = 1, 2, odd and prime V; strided rows; ignore rows;
scalar and per-row temperatures in [0.05, 20]; logit scales in [1e-3, 1e3]; near one-hot rows,
ties, -inf runs; fp32, bf16, fp16, fp64) and `check_against_reference` applies the rule the
other tests use: every output and gradient within 2x plain PyTorch's own error at the input
precision, plus the floors of `pg_kernels.testing`.

Profiles (env PGK_FUZZ): "ci", the default (part of every test run: derandomized, 20 examples
per case, ~1 min on 2 cores) and "long" (randomized, PGK_FUZZ_EXAMPLES examples per case, default
2000). Triton runs under its interpreter on CPU (ms per program step), so its shapes stay small.

The "ci" examples are a function of the test function and the hypothesis version only, not of
test order or checkout: hypothesis also mixes constants from the source of every local module
loaded so far into its draws (`_get_local_constants`), a pool that grew with whichever
pg_kernels modules earlier cases had imported and with each edit of their source (topk_kl on
Triton drew a failing example alone and none in the whole file; two checkouts drew different
examples). Under "ci" that pool is empty (`_fixed_draws`); "long" keeps it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import pytest
import torch

PROFILE = os.environ.get("PGK_FUZZ", "ci")
hypothesis = pytest.importorskip("hypothesis")
from conftest import small_blocks  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_kl_divergence import _kl_grad_floor, finite_abs_max  # noqa: E402
from test_step_stats import TRITON_KL_FLOOR as _STEP_TRITON_KL_FLOOR  # noqa: E402
from test_step_stats import Flat as _StepFlat  # noqa: E402
from test_step_stats import _op as _step_op  # noqa: E402
from test_step_stats import _ref as _step_ref  # noqa: E402
from test_topk_kl import make_topk  # noqa: E402

import pg_kernels  # noqa: E402
from pg_kernels import reference  # noqa: E402
from pg_kernels.ops import _linear as _linear_op  # noqa: E402
from pg_kernels.reference._util import scaled  # noqa: E402
from pg_kernels.testing import (  # noqa: E402
    Known,
    check_against_reference,
    make_labels,
    make_logits,
    near_one_hot,
)

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# CI: derandomized (the same examples every run) and unshrunk (a failure is reported as drawn,
# with its case line; rerun it under "long" to shrink it).
settings.register_profile(
    "ci", max_examples=int(os.environ.get("PGK_FUZZ_EXAMPLES", "20")), derandomize=True,
    deadline=None, suppress_health_check=_SLOW, print_blob=True,
    phases=[Phase.explicit, Phase.generate],
)  # fmt: skip
settings.register_profile(
    "long", max_examples=int(os.environ.get("PGK_FUZZ_EXAMPLES", "2000")), deadline=None,
    suppress_health_check=_SLOW, print_blob=True,
)  # fmt: skip
settings.load_profile(PROFILE)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
PRIMES = [2, 3, 5, 7, 11, 13, 31, 61, 127, 257, 509, 1009, 4099]


def _vocab(backend: str):
    """V = 1, 2, odd, prime, round; at most 300 for the Triton interpreter, 5000 for C++."""
    top = 300 if backend == "triton" else 5000
    return st.one_of(
        st.sampled_from([1, 2, 3] + [p for p in PRIMES if p <= top]),
        st.integers(1, top),
        st.sampled_from([v for v in (64, 128, 256, 1000, 4096) if v <= top]),
    )


def _temperature(draw, shape, allow_tensor=True, device="cpu"):
    """A float or a per-row float64 tensor on `device`, log-uniform in [0.05, 20]."""
    log_t = st.floats(math.log(0.05), math.log(20.0))
    if not allow_tensor or draw(st.booleans()):
        return math.exp(draw(log_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    return (u * (math.log(20.0) - math.log(0.05)) + math.log(0.05)).exp().to(device)


@st.composite
def logit_cases(draw, backend: str, device: str = "cpu"):
    """Logits and labels with ignore rows on `device`; on the CPU, the float64 master copy (the
    edits are made there, then cast once) and the -inf mask. Layouts: contiguous; "shifted",
    the [2, T+1, V][:, :-1] view (two strided levels of rows); "padded", rows of V inside rows
    of V + pad whose padding is NaN (a kernel that reads past V gives a NaN row)."""
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(_vocab(backend))
    max_rows = 4 if backend == "triton" else 12
    layout = draw(st.sampled_from(["contiguous", "shifted", "padded"]))
    strided = layout == "shifted"
    if strided:
        t = draw(st.integers(1, max(1, max_rows // 2)))
        full_shape, shape = (2, t + 1), (2, t)
    else:
        n = draw(st.integers(1, max_rows))
        full_shape = shape = (n,)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = math.exp(draw(st.floats(math.log(1e-3), math.log(1e3))))
    x64 = make_logits(full_shape, v, torch.float64, scale=scale, seed=seed)
    flat = x64.view(-1, v)
    rows = flat.shape[0]
    row = st.integers(0, rows - 1)
    if draw(st.booleans()):  # a near one-hot row
        near_one_hot(flat, [draw(row)], gap=draw(st.floats(5.0, 80.0)))
    if draw(st.booleans()):  # ties: a row rounded to a few levels, or a tied max
        r = draw(row)
        if draw(st.booleans()):
            flat[r] = (flat[r] / scale).round() * scale
        elif v >= 2:
            i, j = draw(st.integers(0, v - 1)), draw(st.integers(0, v - 1))
            flat[r, i] = flat[r, j] = flat[r].max() + draw(st.floats(0.0, 3.0))
    neg_inf = torch.zeros_like(flat, dtype=torch.bool)
    if v >= 2 and draw(st.booleans()):  # a -inf run, never the whole row
        r = draw(row)
        a = draw(st.integers(0, v - 2))
        e = draw(st.integers(a + 1, min(v, a + v - 1)))
        neg_inf[r, a:e] = True
        if bool(neg_inf[r].all()):
            neg_inf[r, draw(st.integers(0, v - 1))] = False
    # The run's fill: -inf, or a finite mask: -1e30 (fp16: its finfo.min), whose x / tau lies
    # far beyond what an fp32 exponent offset rounds to within 1 (Triton's `frame`), but in
    # the fp32 range at every drawn temperature. finfo(float32).min / tau overflows it, to
    # -inf as in fp32 PyTorch, which under another temperature on a pair's other side read a
    # KL of +inf against a finite truth: finding (10), fixed on both backends
    # (test_shared_finfo_min_mask_under_two_temperatures). Only the C++ draws take finfo.min:
    # on Triton the extra draw changes the derandomized CI examples, and some of those are
    # open (1) and (2) (README; a long run with it, seed 20261206: none of (10)). Not fp64:
    # docs/fidelity.md, (4).
    fill = float("-inf")
    if dtype != torch.float64 and draw(st.booleans()):
        fill = torch.finfo(dtype).min if dtype == torch.float16 else -1e30
        if backend == "cpu" and dtype != torch.float16 and draw(st.booleans()):
            fill = torch.finfo(dtype).min
    flat[neg_inf] = fill
    y = make_labels(full_shape, v, seed=seed)
    fy = y.view(-1)
    bad = (fy >= 0) & neg_inf.gather(1, fy.clamp_min(0)[:, None]).squeeze(1)
    fy[bad] = flat[bad].argmax(-1)  # labels on finite logits
    if draw(st.booleans()) and rows >= 2:  # an ignore row, whatever make_labels drew
        fy[draw(row)] = -100
    x = x64.to(dtype)
    if strided:
        x, y, x64, neg_inf = x[:, :-1], y[:, :-1], x64[:, :-1], neg_inf.view(*full_shape, v)[:, :-1]
    elif layout == "padded":
        wide = torch.full((*shape, v + draw(st.integers(1, 9))), float("nan"), dtype=dtype)
        wide[..., :v] = x
        x = wide[..., :v]
    # The long profile: Triton's small blocks at times, 64-byte steps and 1 or 2 loop steps per
    # chunk program, so that a drawn row spans several chunks and a lane's state moves within
    # one (a floored move went unseen while the tests ran one step per chunk: docs/fidelity.md).
    blocks = None
    if backend == "triton" and PROFILE != "ci" and draw(st.integers(0, 2)) == 0:
        blocks = draw(st.sampled_from([2, 4]))  # STEPS_PER_CHUNK (token_stats: 1 or 2 steps)
    return dict(x=x.to(device), y=y.to(device), x64=x64, neg_inf=neg_inf.reshape(x.shape),
                shape=shape, v=v, dtype=dtype, seed=seed, fill=fill, blocks=blocks)  # fmt: skip


def _perturbed(draw, c, shift: float, salt: int = 1):
    """A second set of logits, contiguous: c's plus noise of a drawn size, in c's dtype; the
    noise is 0 on some draws (p == q). `salt` tells two such sets apart. Its masked entries
    are c's, or on some draws one-sided: an extra -inf entry (a token one side cannot sample; a
    row keeps an unmasked entry), or c's masked entries made ordinary."""
    g = torch.Generator().manual_seed(c["seed"] + salt)
    noise_scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 5.0]))
    noise = torch.randn(c["x64"].shape, generator=g, dtype=torch.float64) * noise_scale
    out = (c["x64"] + noise + shift).contiguous()
    flat, v = out.view(-1, c["v"]), c["v"]
    masked = c["neg_inf"].reshape(flat.shape)  # c's -inf (or finfo.min) entries
    # A finite mask is shared: unmasked on one side only it is a log-ratio of ~1e30 (a KL of
    # that size, not +inf).
    one_sided = ["extra", "fewer"] if c["fill"] == float("-inf") else ["extra"]
    sides = draw(st.sampled_from(["shared", "shared", *one_sided]))
    if sides == "extra" and v >= 2:
        r = draw(st.integers(0, flat.shape[0] - 1))
        finite = (torch.isfinite(flat[r]) & ~masked[r]).nonzero().flatten()
        if finite.numel() >= 2:
            flat[r, int(finite[draw(st.integers(0, finite.numel() - 1))])] = float("-inf")
    elif sides == "fewer":
        gone = masked
        flat[gone] = torch.randn(int(gone.sum()), generator=g, dtype=torch.float64) + shift
    return out.to(c["x"].device, c["dtype"])


def _show(c, **kw):
    """One line describing a case, for hypothesis' failure report."""
    x = c["x"]
    temps = {
        k: (f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else v) for k, v in kw.items()
    }
    n_inf, n_ignored = int(c["neg_inf"].sum()), int((c["y"] == -100).sum())
    return (f"dtype={c['dtype']} shape={list(x.shape)} stride={x.stride()} seed={c['seed']} "
            f"masked={n_inf} fill={c['fill']} ignore={n_ignored} blocks={c.get('blocks')} "
            f"{temps}")  # fmt: skip


# Failure classes the fuzzer has found that are the reference's or the rule's, not a kernel's:
# the elements a class describes are excused, and only those (`_known`: its outputs or
# gradients, its dtype, the Triton class on Triton only), and counted (hypothesis event
# "known: <key>"); the rest of the example is still checked. An example whose logits'
# rounding goes beyond first order is dropped if it fails. Run with
# --hypothesis-show-statistics to see the counts. Kernel findings that are still open are
# listed in README (Testing) and, where the "ci" examples meet them, in OPEN.
KNOWN = {
    "fp64 ~0": "fp64 output whose truth is ~0 (KL or TV of near-equal rows, tail mass below "
    "ulp(lse)): the rule's atol scales with the largest |truth| of the tensor (or of the value "
    "and its sensitivity, whichever is smaller), so a batch whose every row is ~0 gets no "
    "floor; seen: <= 3e-14 absolute, a few ulps of the O(1..100) terms "
    "that cancel (for pruned_logprob's tail_mass the fp64 reference's -expm1(lse_in - lse) is "
    "the inexact side)",
    "k3 ~0": "mismatch_stats' k3 = e^d - 1 - d of a tiny mismatch d ~ 1e-6: an ulp of the "
    "kernel's fp32 log-prob (within its own tolerance) moves d, so k3 ~ d^2/2 moves by d ulp(lp) "
    "~ 6e-12, more than 2x plain PyTorch's error on the batch",
    "logits rounding beyond first order": "the *_from_hidden cases: a row whose logits, rounded "
    "to the inputs' dtype by the fused path and by plain PyTorch alike, move its softmax by more "
    "than e^(1/8) (Lambda = log sum_j p_j e^eta_j > 1/8, _beyond_first_order: 16-bit logits of "
    "~80 at tau 0.05 move by ~5 nats), where the rounding floors' first-order bounds no longer "
    "hold and the output is the rounding's; seen: a bf16 near one-hot row at V = 4095, an "
    "entropy of 4.8e-5 computed 7.7e-3, plain 1.3e-3 off",
    "fp64 gradient at ulp(1)": "a gradient entry whose float64 truth is formed from numbers "
    "near 1 (topk_kl's near one-hot max: p_max - q_max with both 1 - O(1e-16)) is exact to "
    "ulp(1) = 2.2e-16 only; seen: fp32 [1, 63], k = 1, the kernel's 1.516e-16 is the exact "
    "value (60-digit mpmath), the reference's 0: errors below 1e-15 where the truth is ~0",
    "V = 1 gradient ~0": "a gradient of rows of one entry (V = 1), 0 by the math, where the "
    "rule's floor (1e-5 of the largest |truth| of the tensor) is 0 too: the Triton pair "
    "passes' backward rebuilds the max logit as a = m tau rounded and the row state's log s1 "
    "carries (x_max - a) / tau rounded, so p = 1 + O(1e-13) (mismatch_stats._bwd_kernel says "
    "3.8e-10 at worst over 300 random V = 1 rows); seen (seed 20261221): fp32 [2, 2, 1] at a "
    "per-row tau of 12.4, a logprob gradient of -3.7e-14, plain PyTorch and C++ exactly 0",
}


def _known(c, backend: str) -> Known:
    """The KNOWN classes as masks of the elements each describes (assert_close_to_truth's
    `known`); the rest of the example is still checked."""

    def masks(name: str, truth: torch.Tensor, err: torch.Tensor) -> dict[str, torch.Tensor]:
        t, grad = truth.abs(), name.startswith("grad")
        out = {}
        if c["dtype"] == torch.float64 and not grad:
            out["fp64 ~0"] = (t < 1e-6) & (err < 1e-13)
        if name == "k3":
            out["k3 ~0"] = (t < 1e-9) & (err < 1e-10)
        if grad:
            out["fp64 gradient at ulp(1)"] = (t < 1e-12) & (err < 1e-15)
        if grad and c["v"] == 1 and backend == "triton":
            out["V = 1 gradient ~0"] = (t == 0) & (err < 1e-9)
        assert out.keys() <= KNOWN.keys()
        return out

    return masks


def _check(c, backend: str, *args, **kwargs):
    """check_against_reference with the KNOWN classes' elements excused (counted as events); an
    example whose logits' rounding goes beyond first order is dropped if it fails (counted)."""
    excused: set[str] = set()
    if c.get("blocks") is not None:
        hypothesis.event(f"small Triton blocks, STEPS_PER_CHUNK {c['blocks']}")
    try:
        blocks = c.get("blocks")
        with contextlib.nullcontext() if blocks is None else small_blocks(blocks):
            check_against_reference(
                *args, seed=c["seed"], known=_known(c, backend), excused=excused, **kwargs
            )
    except AssertionError:
        if not c.get("beyond_first_order"):
            raise
        hypothesis.event("known: logits rounding beyond first order")
        hypothesis.assume(False)
    for key in sorted(excused):
        hypothesis.event(f"known: {key}")


# (test, backend) cases on which the CI profile's examples still find failures outside KNOWN,
# found by this fuzzer and open (README, Testing): xfail (not strict), so CI stays green while
# the rest of the fuzzer guards; remove an entry once its case passes.
# (Empty: Triton kl_divergence's entry, whose CI examples met open class (1), xpassed in every
# full run by 2026-12-04; its examples pass with and without the pair lanes' exact exponents.)
OPEN: dict[tuple[str, str], str] = {}

# (test, backend) cases whose CI examples meet a class that only a GPU's arithmetic shows
# (tests/conftest.py, PGK_EMULATE_GPU) and that is open: they run on the interpreter's numpy
# arithmetic, as before it was emulated (CONTRIBUTING.md says what each is).
NUMPY_ARITHMETIC: dict[tuple[str, str], str] = {
    ("test_mismatch_stats", "triton"): "a bf16 row of 261 tied logits: token_stats' fp32 s1 "
    "sums 261 copies of the max's term 2^eps (eps: the residual of its scaled logit, 0 only "
    "under numpy's fma) with rounding, where plain PyTorch sums exact 1s (log-prob 3.3e-7 off, "
    "plain 1.3e-7)",
}


@pytest.fixture(autouse=True)
def _fixed_draws(monkeypatch):
    """Hypothesis mixes constants of the local modules loaded so far into its draws; under the
    derandomized "ci" profile that pool must not depend on which modules earlier tests (or
    earlier test files of the same run) imported."""
    if PROFILE != "ci":
        yield
        return
    from hypothesis.internal.conjecture import providers

    monkeypatch.setattr(providers, "_get_local_constants", lambda: providers.Constants())
    providers.CONSTANTS_CACHE.cache.clear()
    yield
    providers.CONSTANTS_CACHE.cache.clear()


@pytest.fixture(autouse=True)
def _open_findings(request):
    backend = request.node.callspec.params["backend_device"][0]
    why = OPEN.get((request.node.originalname, backend))
    if why is not None:
        request.node.add_marker(pytest.mark.xfail(reason=f"open fuzzer finding: {why}"))
    if (request.node.originalname, backend) in NUMPY_ARITHMETIC:
        request.getfixturevalue("numpy_arithmetic")


FIELDS = {"token_stats": ("logprob", "entropy", "collision", "lse")}


@pytest.mark.op("token_stats")
@given(data=st.data())
def test_token_stats(backend_device, data):
    backend, device = backend_device
    c = data.draw(logit_cases(backend, device))
    t = _temperature(data.draw, c["shape"], device=device)
    hypothesis.note(_show(c, temperature=t))
    op = functools.partial(pg_kernels.token_stats, backend=backend)
    _check(
        c, backend,
        op, reference.token_stats, (c["x"], c["y"]), {"temperature": t},
        diff_fields=FIELDS["token_stats"],
    )  # fmt: skip


@pytest.mark.op("kl_divergence")
@given(data=st.data())
def test_kl_divergence(backend_device, data):
    backend, device = backend_device
    c = data.draw(logit_cases(backend, device))
    xr = _perturbed(data.draw, c, shift=3.0)
    kw = {
        "direction": data.draw(st.sampled_from(["reverse", "forward"])),
        "temperature": _temperature(data.draw, c["shape"], device=device),
        "ref_temperature": _temperature(data.draw, c["shape"], device=device) if data.draw(st.booleans()) else None,  # noqa: E501
        "labels": c["y"],
    }  # fmt: skip
    hypothesis.note(_show(c, temperature=kw["temperature"], ref=kw["ref_temperature"]))
    op = functools.partial(pg_kernels.kl_divergence, backend=backend)
    _check(
        c, backend,
        op, reference.kl_divergence, (c["x"], xr), kw, diff_fields=("out",), grad_args=(0, 1),
        grad_floor=_kl_grad_floor(c["x"], xr, kw),
        forward_floor={"out": _z_rounding_floor(
            c, xr, kw["temperature"], kw["ref_temperature"], kw["direction"])},
    )  # fmt: skip


def _rollout_logprobs(data, c, xr, t, rt):
    """The rollout engine's log-probs of the labels: from xr, maybe off by a drawn amount (the
    ratio clamps), NaN on ignore rows (never read)."""
    lp = reference.token_stats(xr, c["y"], temperature=t if rt is None else rt).logprob.float()
    if data.draw(st.booleans()):
        lp = lp + data.draw(st.sampled_from([1e-6, -0.5, 30.0, -30.0]))
    lp[c["y"] == -100] = float("nan")
    return lp


def _tv_floor(c) -> dict[str, float]:
    """TV = 1/2 sum |p_j - q_j| from separately rounded p_j and q_j: each term carries their
    roundings, eps (p_j + q_j) at most, 2 eps over the row, however small TV itself is."""
    eps = torch.finfo(torch.float64 if c["dtype"] == torch.float64 else torch.float32).eps
    return {"token_tv": 2 * eps}


def _z_rounding_floor(c, x_other, t, t_other, direction) -> torch.Tensor:
    """Per row: what rounding z = x / tau to fp32 moves the KL of the two rows (c["x"] at t and
    x_other at t_other; `direction` "reverse": KL(p || other), "forward": KL(other || p)).

    Each z_j moves by <= u |z_j| (u = 2^-24). To first order the KL moves by
    sum_j |dKL / dz_j| |dz_j| <= u (sum_j |z_w,j| w_j |eta_j - KL| + sum_j |z_v,j| |v_j - w_j|)
    (w the weight side, eta = log w - log v). Plain PyTorch rounds z alike, then can lose that
    in its own rounding of the two log-softmaxes by luck: C++ kl_divergence, fp32 [1, 2] at tau
    0.252 (|z| ~ 50-64, seed 20261201): a KL of 2.0e-4 off by 3.9e-8 (the exact KL of the
    kernel's own z is 3.9e-8 from the truth, the kernel 3e-11 from it), plain 3.5e-9; this
    term: 8.5e-8.
    Rows the truth sees as shifted copies (KL ~0) keep the second-order part: the log-ratio's
    deviations |eta_j - E_w eta| reach 2 u zmax and KL ~ Var_w(eta) / 2 <= 2 u^2 zmax^2 =
    (eps zmax)^2 / 2 (e.g. [-5, -7, -9, -6, -8] and the same - 2 at tau = 1.5 give z whose exact
    KL is 1.06e-14; the C++ kernel: 1.04e-14; the truth ~0; plain 0 on one draw, 1.5e-7 off on
    the next). 0 for fp64 logits (their own floor)."""
    if c["dtype"] == torch.float64:
        return torch.zeros(())
    t_other = t if t_other is None else t_other
    z_p = scaled(c["x"], t, torch.float64)
    z_o = scaled(x_other, t_other, torch.float64)
    z_w, z_v = (z_p, z_o) if direction == "reverse" else (z_o, z_p)
    lw, lv = torch.log_softmax(z_w, -1), torch.log_softmax(z_v, -1)
    w, v = lw.exp(), lv.exp()
    eta = torch.where(w > 0, lw - lv, torch.zeros_like(lw))
    kl = (w * eta).sum(-1, keepdim=True)
    u = torch.finfo(torch.float32).eps / 2
    az_w, az_v = (z.abs().masked_fill(~torch.isfinite(z), 0.0) for z in (z_w, z_v))
    first = (az_w * w * (eta - kl).abs()).nan_to_num(0.0).sum(-1)
    first = first + (az_v * (v - w).abs()).nan_to_num(0.0).sum(-1)
    top = torch.maximum(finite_abs_max(z_p).squeeze(-1), finite_abs_max(z_o).squeeze(-1))
    return u * first + 0.5 * (2 * u * top) ** 2


def _mismatch(backend_device, data, with_rollout_logits):
    backend, device = backend_device
    c = data.draw(logit_cases(backend, device))
    t = _temperature(data.draw, c["shape"], device=device)
    rt = _temperature(data.draw, c["shape"], device=device) if data.draw(st.booleans()) else None  # noqa: E501
    xr = _perturbed(data.draw, c, shift=-2.0)
    lp = _rollout_logprobs(data, c, xr, t, rt)
    kw = {
        "temperature": t, "rollout_temperature": rt,
        "tis_cap": data.draw(st.sampled_from([1.5, 2.0, 10.0])),
        "icepop_low": 0.5, "icepop_high": 2.0,
    }  # fmt: skip
    if with_rollout_logits:
        kw["rollout_logits"] = xr
    # The long profile draws token_tv=False too (the ci profile's examples stay as they were).
    tv = data.draw(st.booleans()) if with_rollout_logits and PROFILE != "ci" else True
    hypothesis.note(_show(c, temperature=t, rollout=rt) + ("" if tv else " token_tv=False"))
    op = functools.partial(pg_kernels.mismatch_stats, backend=backend, token_tv=tv)
    # The sampled estimators are elementwise functions of logprob and the given rollout
    # log-prob: logprob (and the exact token_kl / token_tv) is held to the rule, the estimators
    # to the float64 formulas evaluated on the op's own logprob. Held to the rule directly,
    # log_ratio = logprob - lp would get a tolerance scaled by |log_ratio| ~ 0 for an error that
    # is logprob's own, ~ulp(|logprob|).
    fields = ("logprob", "token_kl", "token_tv") if with_rollout_logits else ("logprob",)
    fields = fields if tv else fields[:2]
    z_floor = _z_rounding_floor(c, xr, t, rt, "forward")  # KL(pi_roll || pi_theta)
    _check(
        c, backend,
        op, reference.mismatch_stats, (c["x"], c["y"], lp), kw, diff_fields=("logprob",),
        check_fields=fields, forward_floor=_tv_floor(c) | {"token_kl": z_floor},
    )  # fmt: skip
    _check_estimators(op(c["x"], c["y"], lp, **kw), lp, c["y"], kw)


def _check_estimators(out, lp, labels, kw):
    """Each estimator within a few roundings of its float64 formula on out.logprob (kept rows;
    icepop_weight away from the band's edges, where one rounding of rho flips the indicator)."""
    keep = labels != -100
    lp64 = out.logprob.double()
    want = reference.sampled_mismatch(
        lp64, lp.double(), tis_cap=kw["tis_cap"], icepop_low=kw["icepop_low"],
        icepop_high=kw["icepop_high"],
    )  # fmt: skip
    eps = torch.finfo(out.logprob.dtype).eps
    delta, rho = want["log_ratio"], want["ratio"]
    # A few roundings of each quantity the formulas combine: delta itself (one subtraction,
    # absolute error eps |delta|), rho = e^delta (relative error eps (1 + |delta|): the exp's
    # rounding plus delta's), squares (twice that), and the result.
    slack = (1 + delta.abs()) * (1 + rho)
    edge = torch.zeros_like(keep)
    for bound in (kw["icepop_low"], kw["icepop_high"]):
        edge |= (rho - bound).abs() <= 8 * eps * bound
    for name, ref in want.items():
        got = getattr(out, name).double()
        rows = keep & ~edge if name == "icepop_weight" else keep
        bound = 8 * eps * ((ref.abs() + 1) * (1 + delta.abs()) + slack)
        # Equal infinities pass: a rollout label logit of -inf (an "extra" -inf) gives
        # log_ratio = +inf.
        bad = rows & ~((got - ref).abs() <= bound) & ~(got.isnan() & ref.isnan()) & (got != ref)
        assert not bool(bad.any()), (
            f"{name}: got {got[bad][:3].tolist()}, float64 formula {ref[bad][:3].tolist()}"
        )


@pytest.mark.op("mismatch_stats")
@given(data=st.data())
def test_mismatch_stats(backend_device, data):
    _mismatch(backend_device, data, with_rollout_logits=True)


@pytest.mark.op("token_stats")  # without rollout logits, only token_stats' kernel runs
@given(data=st.data())
def test_mismatch_stats_without_rollout_logits(backend_device, data):
    _mismatch(backend_device, data, with_rollout_logits=False)


@pytest.mark.op("step_stats")
@given(data=st.data())
def test_step_stats(backend_device, data):
    """The bundle with a drawn subset of rollout log-probs, rollout logits and teacher logits,
    each side at its own temperature: every field held to the rule but the sampled estimators
    (k3 in the bundle's flat view), which are held to their float64 formulas on the op's own
    logprob as in `_mismatch`; the gradients of logprob, entropy, collision, lse and the KL to
    both logits tensors that require them."""
    backend, device = backend_device
    c = data.draw(logit_cases(backend, device))
    t = _temperature(data.draw, c["shape"], device=device)
    rt = _temperature(data.draw, c["shape"], device=device) if data.draw(st.booleans()) else None  # noqa: E501
    qt = _temperature(data.draw, c["shape"], device=device) if data.draw(st.booleans()) else None  # noqa: E501
    xr = _perturbed(data.draw, c, shift=-2.0) if data.draw(st.booleans()) else None
    lp = None
    if xr is not None or data.draw(st.booleans()):
        lp = _rollout_logprobs(data, c, c["x"] if xr is None else xr, t, rt)
    xq = _perturbed(data.draw, c, shift=3.0, salt=2) if data.draw(st.booleans()) else None
    kw = {"kl_direction": data.draw(st.sampled_from(["reverse", "forward"])),
          "temperature": t, "rollout_temperature": rt, "ref_temperature": qt}  # fmt: skip
    tv = data.draw(st.booleans()) if xr is not None and PROFILE != "ci" else True  # as _mismatch
    hypothesis.note(_show(c, temperature=t, rollout=rt, ref=qt) + f" rollout_logits="
                    f"{xr is not None} logprobs={lp is not None} ref={xq is not None}"
                    f" token_tv={tv}")  # fmt: skip
    diff = ("logprob", "entropy", "collision", "lse") + (("kl",) if xq is not None else ())
    kl_floor = None if xq is None else _kl_grad_floor(c["x"], xq, {
        "direction": kw["kl_direction"], "temperature": t, "ref_temperature": qt})  # fmt: skip

    def grad_floor(i, ups):
        return None if kl_floor is None else kl_floor(i, {"out": ups["kl"]})

    floors = _tv_floor(c)  # the KL fields are empty where their input is absent
    # The Triton bundle's 16-bit pair loops have no room for the excess sum (README, Testing):
    # their KLs keep test_step_stats' TRITON_KL_FLOOR, two fp32 ulps of an O(1) logarithm.
    lanes = _STEP_TRITON_KL_FLOOR["kl"] if backend == "triton" and c["dtype"] in (
        torch.bfloat16, torch.float16) else 0.0  # fmt: skip
    if xr is not None:
        floors["token_kl"] = _z_rounding_floor(c, xr, t, rt, "forward") + lanes
    if xq is not None:
        floors["kl"] = _z_rounding_floor(c, xq, t, qt, kw["kl_direction"]) + lanes

    _check(
        c, backend,
        functools.partial(_step_op(backend), token_tv=tv), _step_ref,
        (c["x"], c["y"], xr, lp, xq), kw, diff_fields=diff,
        grad_args=(0,) if xq is None else (0, 4), grad_floor=grad_floor,
        check_fields=[f for f in _StepFlat._fields if f != "k3" and (tv or f != "token_tv")],
        forward_floor=floors,
    )  # fmt: skip
    if lp is not None:
        est = {"tis_cap": 2.0, "icepop_low": 0.5, "icepop_high": 2.0}  # step_stats' defaults
        out = pg_kernels.step_stats(c["x"], c["y"], rollout_logprobs=lp, rollout_logits=xr,
                                    ref_logits=xq, backend=backend, **kw)  # fmt: skip
        _check_estimators(out.mismatch, lp, c["y"], est)


@pytest.mark.op("topk_kl")
@given(data=st.data())
def test_topk_kl(backend_device, data):
    backend, device = backend_device
    c = data.draw(logit_cases(backend, device))
    finite = int((~c["neg_inf"]).sum(-1).min())  # top-k of q stays finite
    k = data.draw(st.integers(1, max(1, min(finite, 24))))
    ids, lp, _ = make_topk(c["x64"], k, seed=c["seed"], noise=data.draw(st.sampled_from(
        [0.0, 0.1, 1.0, 4.0])))  # fmt: skip
    if c["dtype"] != torch.float64:
        lp = lp.float()
    t = _temperature(data.draw, c["shape"], device=device)
    hypothesis.note(_show(c, temperature=t) + f" k={k}")
    op = functools.partial(pg_kernels.topk_kl, backend=backend)
    _check(
        c, backend,
        op, reference.topk_kl, (c["x"], ids.to(device), lp.to(device)),
        {"temperature": t, "labels": c["y"]}, diff_fields=("out",),
        forward_floor={"out": _topk_z_rounding_floor(c, ids, lp, t)},
    )  # fmt: skip


def _topk_z_rounding_floor(c, ids, lp, t) -> torch.Tensor:
    """Per row: what rounding the temperature and z = x / tau to fp32 moves topk_kl's KL by.
    Each z_j moves by eta_j, |eta_j| <= 2 u |z_j| (u = 2^-24: tau's rounding, then z's), so
    log p_j by eta_j - E_p eta and log P_tail by E_tail eta - E_p eta; the KL, sum over the
    ids of q_j (log q_j - log p_j) plus q_tail (log q_tail - log P_tail), by at most
    eps (sum over the ids of q_j |z_j| + q_tail max_tail |z| + E_p |z|), eps = 2 u: linear in
    |z|, unlike the pair KLs' (both sides move alike there). Measured: fp32 [9, 106], k = 1,
    tau 2.38 (a float64 per-row tensor), |z| ~ 1087: C++ 1.2e-5 off a KL of 0.0897, 2.5e-9
    from the exact KL of its own z = x / fp32(tau); plain PyTorch rounds z alike (3.7e-6 off).
    0 for fp64 logits."""
    if c["dtype"] == torch.float64:
        return torch.zeros(())
    z = scaled(c["x"], t, torch.float64).cpu()
    ids = ids.cpu()
    az = z.abs().masked_fill(torch.isneginf(z), 0.0)
    q = lp.double().cpu().exp()
    q_tail = (1.0 - q.sum(-1)).clamp_min(0.0)
    tail_max = az.scatter(-1, ids, 0.0).amax(-1)
    e_p = (z.softmax(-1) * az).nan_to_num().sum(-1)
    bound = (q * az.gather(-1, ids)).sum(-1) + q_tail * tail_max + e_p
    return (torch.finfo(torch.float32).eps * bound).nan_to_num()


@pytest.mark.op("pruned_logprob")
@given(data=st.data())
def test_pruned_logprob(backend_device, data):
    backend, device = backend_device
    c = data.draw(logit_cases(backend, device))
    alpha = data.draw(st.one_of(st.sampled_from([1e-3, 0.2]), st.floats(1e-6, 0.99)))
    t = _temperature(data.draw, c["shape"], device=device)
    hypothesis.note(_show(c, temperature=t) + f" alpha={alpha}")
    op = functools.partial(pg_kernels.pruned_logprob, alpha=alpha, backend=backend)
    ref = functools.partial(reference.pruned_logprob, alpha=alpha)
    # The kernels' fp32 exp flushes results below FLT_MIN to 0 (C++ exp_1ulp; a GPU's ex2 with
    # FTZ): a tail lying > 87.3 nats below the max (tail mass < V FLT_MIN) loses those terms.
    # Seen: fp32 [1, 879] at tau 0.082, a tail mass of 2.0e-36 computed 9.9e-37.
    floor = 0.0 if c["dtype"] == torch.float64 else c["v"] * torch.finfo(torch.float32).tiny
    _check(
        c, backend,
        op, ref, (c["x"], c["y"]), {"temperature": t}, diff_fields=("logprob",),
        forward_floor={"tail_mass": floor},
    )  # fmt: skip


# --- the fused lm_head path (ops/*_from_hidden.py) ------------------------------------------
# Its row kernels are the ops' own, fuzzed above; what these add is the chunking over rows (a
# ragged last chunk, chunks of one row, chunks straddling the two levels of a shifted hidden),
# the projection (D = 0, a bias with masked tokens, 16-bit weights whose gradient is summed
# over chunks in fp32) and the gradients w.r.t. hidden, weight and bias. The C++ kernels only:
# the chunking is the same Python on every backend and device, and each GPU case would compile
# Triton variants for its drawn shapes inside the GPU test step's time limit.


@st.composite
def projection_cases(draw):
    """hidden [..., D] (contiguous, the shifted [2, T+1, D][:, :-1] view, or rows inside
    NaN-padded ones), weight [V, D] scaled to a drawn logit size, an optional bias (maybe with
    a run of -inf tokens, never the whole vocabulary), labels with ignore rows and a chunk
    size, all drawn in float64 and cast once."""
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(_vocab("cpu"))
    d = draw(st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(1, 64)))
    layout = draw(st.sampled_from(["contiguous", "shifted", "padded"]))
    if layout == "shifted":
        t = draw(st.integers(1, 8))
        full_shape, shape = (2, t + 1), (2, t)
    else:
        full_shape = shape = (draw(st.integers(1, 16)),)
    n = math.prod(shape)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    logit_std = math.exp(draw(st.floats(math.log(1e-2), math.log(30.0))))
    h64 = torch.randn(*full_shape, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(v, d, generator=g, dtype=torch.float64) * (logit_std / max(d, 1) ** 0.5)
    flat_h = h64.view(-1, d) if d else h64
    if d >= 1 and draw(st.booleans()):  # a near one-hot row: aligned with one token's weights
        r, j = draw(st.integers(0, flat_h.shape[0] - 1)), draw(st.integers(0, v - 1))
        norm2 = float(w64[j].square().sum())
        if norm2 > 0:
            flat_h[r] = w64[j] / norm2 * draw(st.floats(5.0, 80.0))
    b64 = None
    masked = torch.zeros(v, dtype=torch.bool)
    if draw(st.booleans()):
        b64 = torch.randn(v, generator=g, dtype=torch.float64) * logit_std
        if v >= 2 and draw(st.booleans()):  # masked tokens (vocabulary padding), not all
            a = draw(st.integers(0, v - 2))
            masked[a : draw(st.integers(a + 1, v - 1))] = True
            b64[masked] = float("-inf")
    y = make_labels(full_shape, v, seed=seed)
    fy = y.view(-1)
    fy[(fy >= 0) & masked[fy.clamp_min(0)]] = int((~masked).nonzero()[0])  # labels on tokens
    if draw(st.booleans()) and fy.numel() >= 2:
        fy[draw(st.integers(0, fy.numel() - 1))] = -100
    h = h64.to(dtype)
    if layout == "shifted":
        h, y = h[:, :-1], y[:, :-1]
    elif layout == "padded":
        wide = torch.full((*shape, d + draw(st.integers(1, 9))), float("nan"), dtype=dtype)
        wide[..., :d] = h
        h = wide[..., :d]
    chunk = draw(st.one_of(st.none(), st.integers(1, n + 2)))
    return dict(h=h, w=w64.to(dtype), b=None if b64 is None else b64.to(dtype), y=y, d=d, v=v,
                shape=shape, dtype=dtype, seed=seed, masked=masked, chunk=chunk,
                layout=layout)  # fmt: skip


def _show_projection(p, **kw):
    temps = {k: (f"tensor{list(t.shape)}" if isinstance(t, torch.Tensor) else t)
             for k, t in kw.items()}  # fmt: skip
    return (f"dtype={p['dtype']} hidden={list(p['h'].shape)} stride={p['h'].stride()} "
            f"V={p['v']} bias={p['b'] is not None} masked={int(p['masked'].sum())} "
            f"chunk={p['chunk']} seed={p['seed']} {temps}")  # fmt: skip


# (hidden, weight, bias, ...)'s gradients are matmuls of the logits' gradient: checked whole
# (`check_against_reference`'s whole_args).
HIDDEN_ARGS = (0, 1, 2)


def _differentiated(draw, bias, first=0) -> list[int]:
    """A drawn non-empty subset of the argument indices of (hidden, weight, bias), from `first`
    (a frozen lm_head, a frozen bias, hidden alone...): each subset takes its own gradient work."""
    present = [first, first + 1] + ([first + 2] if bias is not None else [])
    return sorted(draw(st.lists(st.sampled_from(present), min_size=1, unique=True)))


# argmax is left out: from 16-bit logits it may pick the other of two tokens whose float64
# logits differ by less than the rounding (tests/test_from_hidden.py).
HIDDEN_FIELDS = ("logprob", "entropy", "collision", "lgp", "lse", "max_prob")


def _linear(hidden, weight, bias, upcast):
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    return torch.nn.functional.linear(hidden, weight, bias)


def _logit_rounding(h, w, b, t) -> tuple[torch.Tensor, torch.Tensor]:
    """z = (h @ w.T + b) / tau in float64 and eta, a bound on how far from it the logits that
    plain PyTorch and the fused path compute lie, in z units: both round each logit to the
    inputs' dtype (u |x_j|, u its unit roundoff) after a D-term dot product summed in fp32 (fp64
    for fp64 inputs), which may err by up to D u_acc sum_k |h_k w_jk| (its standard bound)."""
    u = torch.finfo(h.dtype).eps / 2
    u_acc = torch.finfo(torch.float64 if h.dtype == torch.float64 else torch.float32).eps / 2
    x = _linear(h, w, b, upcast=True)
    dots = torch.nn.functional.linear(h.double().abs(), w.double().abs())
    eta = u * x.abs() + h.shape[-1] * u_acc * dots
    return scaled(x, t, torch.float64), scaled(eta, t, torch.float64)


def _beyond_first_order(z, eta) -> bool:
    """Whether some row's logits' rounding bound moves its softmax by more than e^(1/8):
    Lambda = log sum_j p_j e^eta_j, the most the normalized p_j / e^eta_j can move by."""
    p = torch.softmax(z, -1)
    lam = torch.logsumexp(torch.where(p > 0, p.log() + eta, float("-inf")), -1)
    return bool((lam.nan_to_num(0.0) > 0.125).any())


def _softmax_moves(z, eta):
    """softmax quantities of z and, for each, its first-order move when every z_j moves by up to
    eta_j: p, log p, H, C and bounds dp_j = p_j (eta_j + E), E = sum_j p_j eta_j, dH, dC."""
    eta = eta.masked_fill(torch.isneginf(z), 0.0)
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1).masked_fill(p == 0, 0.0)
    big_e = (p * eta).sum(-1, keepdim=True)
    entropy = -(p * logp).sum(-1, keepdim=True)
    collision = (p * p).sum(-1, keepdim=True)
    dp = p * (eta + big_e)
    d_entropy = (p * eta * (logp + entropy).abs()).sum(-1, keepdim=True)
    d_collision = 2 * (p * eta * (p - collision).abs()).sum(-1, keepdim=True)
    return dict(p=p, logp=logp, eta=eta, big_e=big_e, entropy=entropy, collision=collision,
                dp=dp, d_entropy=d_entropy, d_collision=d_collision)  # fmt: skip


def _through_projection(d_g, hidden, weight, part):
    """An elementwise bound d_g [N, V] on the logits' gradient, carried to the gradient of the
    projection's `part` (0 hidden, 1 weight, 2 bias): |d_g| @ |weight|, |d_g|^T @ |hidden|, the
    rows' sum."""
    d_g = d_g.nan_to_num(0.0, posinf=0.0).reshape(-1, weight.shape[0])
    if part == 0:
        return (d_g @ weight.double().abs()).reshape(hidden.shape)
    if part == 1:
        return d_g.t() @ hidden.double().abs().reshape(d_g.shape[0], hidden.shape[-1])
    return d_g.sum(0)


def _hidden_grad_floor(m, h, w, y, t):
    """grad_floor for test_token_stats_from_hidden (m: _softmax_moves of its logits' rounding):
    the first-order move of each gradient entry when every logit moves by up to eta_j
    (_logit_rounding), as the forward's floor. The loss is
    sum over rows of g_lp logprob + g_H H + g_C C + g_lse lse (`ups`), whose logits' gradient is
    G_j = (g_lp (1[j = c] - p_j) - g_H p_j (log p_j + H) + 2 g_C p_j (p_j - C) + g_lse p_j) / tau,
    and a move of z moves each term by at most (dp_j from _softmax_moves)
    dp_j, dp_j |log p_j + H| + p_j (eta_j + E + dH), 2 dp_j |p_j - C| + 2 p_j (p_j dp_j / p_j + dC)
    and dp_j; and both paths round G itself to the inputs' dtype before the projection's
    matmuls, u |G_j|. Through the projection: |dG| @ |weight| for hidden, |dG|^T @ |hidden| for
    weight, the rows' sum for bias (ignore rows carry no gradient). Seen: fp16 [2, 8, 1] hidden
    at per-row tau, V = 160, a weight-gradient entry of 0.965 off by 5.9e-3 where plain was
    1.5e-3 off; bf16 at D = 0 (logits = bias), a bias-gradient entry of 0.0559, the sum of four
    rows' rounded G, 2 ulps off where plain was 1.5e-5 off."""
    p, dp = m["p"], m["dp"]
    tau = (t.double().unsqueeze(-1) if isinstance(t, torch.Tensor)
           else torch.tensor(float(t), dtype=torch.float64))  # fmt: skip
    keep = (y != -100).unsqueeze(-1)
    moves = {
        "logprob": dp,
        "entropy": dp * (m["logp"] + m["entropy"]).abs()
        + p * (m["eta"] + m["big_e"] + m["d_entropy"]),
        "collision": 2 * dp * (p - m["collision"]).abs() + 2 * p * (dp + m["d_collision"]),
        "lse": dp,
    }  # fmt: skip
    onehot = torch.zeros_like(p).scatter_(-1, y.clamp_min(0).unsqueeze(-1), 1.0)
    grads = {
        "logprob": onehot - p,
        "entropy": -p * (m["logp"] + m["entropy"]),
        "collision": 2 * p * (p - m["collision"]),
        "lse": p,
    }
    u = torch.finfo(h.dtype).eps / 2

    def floor(i, ups):
        d_g = sum(ups[f].abs().unsqueeze(-1) * moves[f] for f in moves) / tau
        d_g = d_g + u * sum(ups[f].unsqueeze(-1) * grads[f] for f in grads).abs() / tau
        return _through_projection(torch.where(keep, d_g, 0.0), h, w, i)

    return floor


def _hidden_rounding_floor(m, y) -> dict[str, torch.Tensor]:
    """Per row and field of token_stats (m: _softmax_moves of the logits' rounding): the
    first-order move of the output when every logit
    moves by up to eta_j (_logit_rounding). The truth takes the float64 logits; plain PyTorch
    and the fused path each round them, and which of the two lands nearer on a row is luck (a
    bf16 [2, 1, 2] hidden, V = 1584, a peaked row: entropy 1.2e-5 off where plain was 4.8e-6 off
    and the bound is 3.8e-5). With p = softmax(z), H the entropy, C = sum p^2, E = sum_j p_j eta_j:
    lse E; log p_c eta_c + E; H sum_j p_j eta_j |log p_j + H|; C 2 sum_j p_j eta_j |p_j - C|;
    p_c, p_max p (eta + E); lgp = 1 - 2 p_c + C the sum of two of those."""
    p, eta, big_e = m["p"], m["eta"], m["big_e"][..., 0]
    label = y.clamp_min(0)[..., None]
    p_c, eta_c = p.gather(-1, label)[..., 0], eta.gather(-1, label)[..., 0]
    p_max, arg = p.max(-1)
    eta_max = eta.gather(-1, arg[..., None])[..., 0]
    floors = {
        "lse": big_e,
        "logprob": eta_c + big_e,
        "entropy": m["d_entropy"][..., 0],
        "collision": m["d_collision"][..., 0],
        "lgp": 2 * p_c * (eta_c + big_e) + m["d_collision"][..., 0],
        "max_prob": p_max * (eta_max + big_e),
    }
    return {k: v.nan_to_num(0.0, posinf=0.0) for k, v in floors.items()}


def _hidden_floors(p, t):
    """(forward floors per field, grad_floor, beyond first order) of the token_stats cases, from
    one evaluation of the logits' rounding (_logit_rounding)."""
    z, eta = _logit_rounding(p["h"], p["w"], p["b"], t)
    m = _softmax_moves(z, eta)
    return (_hidden_rounding_floor(m, p["y"]), _hidden_grad_floor(m, p["h"], p["w"], p["y"], t),
            _beyond_first_order(z, eta))  # fmt: skip


@pytest.mark.op("token_stats")
@pytest.mark.backends("cpu")
@given(data=st.data())
def test_token_stats_from_hidden(backend_device, data):
    backend, device = backend_device
    p = data.draw(projection_cases())
    t = _temperature(data.draw, p["shape"])
    ignore, y = -100, p["y"]
    if PROFILE != "ci" and data.draw(st.booleans()):
        # A non-negative ignore_index, maybe a column of the backward's vocabulary blocks or
        # their dropped-label column (test_from_hidden.py: a kept row read as ignored there).
        # Not in the ci profile, whose derandomized examples stay as they were.
        ignore = data.draw(st.integers(0, p["v"] + 1))
        y = torch.where(y == -100, ignore, y)
    hypothesis.note(_show_projection(p, temperature=t, ignore_index=ignore))

    def op(h, w, b, y, **kw):
        return pg_kernels.token_stats_from_hidden(h, w, y, bias=b, chunk_size=p["chunk"],
                                                  backend=backend, **kw)  # fmt: skip

    def ref(h, w, b, y, *, upcast, **kw):
        return reference.token_stats(_linear(h, w, b, upcast), y, upcast=upcast, **kw)

    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                 for a in (p["h"], p["w"], p["b"], y))  # fmt: skip
    # The floors take p["y"]'s ignore rows (-100): a label equal to a drawn ignore_index by
    # chance is ignored by both paths (0 either way) and only loosens its row's floor.
    forward_floor, grad_floor, p["beyond_first_order"] = _hidden_floors(p, t)
    with _narrow_vocab_blocks():
        _check(
            p, backend, op, ref, args, {"temperature": t, "ignore_index": ignore},
            diff_fields=("logprob", "entropy", "collision", "lse"), check_fields=HIDDEN_FIELDS,
            grad_args=tuple(_differentiated(data.draw, p["b"])), whole_args=HIDDEN_ARGS,
            forward_floor=forward_floor, grad_floor=grad_floor,
        )  # fmt: skip


@contextlib.contextmanager
def _narrow_vocab_blocks():
    """The backward's vocabulary blocks 64 columns wide at the drawn D (<= 64), so that a drawn
    vocabulary spans several, the last ragged; at the default width (at least 1024 columns)
    each would be one block. (A context manager: hypothesis's health checks reject a
    function-scoped fixture such as monkeypatch.)"""
    before = _linear_op.MIN_VOCAB_BLOCK
    _linear_op.MIN_VOCAB_BLOCK = 64
    try:
        yield
    finally:
        _linear_op.MIN_VOCAB_BLOCK = before


def _teacher(draw, p):
    """The teacher's hidden, weight and bias for p's student: its own width and weights, or the
    student's own projection perturbed by a drawn amount (0: p == q; near-equal rows take the
    pair passes' excess path). A bias shares the student's masked tokens: a token one side
    cannot produce makes the KL infinite (the ops' own fuzz cases draw that)."""
    g = torch.Generator().manual_seed(p["seed"] + 2)
    h64, w64 = p["h"].double(), p["w"].double()
    b64 = None if p["b"] is None else p["b"].double()
    if draw(st.booleans()):  # another model
        d = draw(st.one_of(st.sampled_from([0, 1]), st.integers(1, 48)))
        rh = torch.randn(*p["h"].shape[:-1], d, generator=g, dtype=torch.float64)
        scale = math.exp(draw(st.floats(math.log(1e-2), math.log(30.0))))
        rw = torch.randn(p["v"], d, generator=g, dtype=torch.float64) * (scale / max(d, 1) ** 0.5)
        rb = None
        if b64 is not None or bool(p["masked"].any()) or draw(st.booleans()):
            rb = torch.randn(p["v"], generator=g, dtype=torch.float64) * scale
            rb[p["masked"]] = float("-inf")
    else:
        noise = draw(st.sampled_from([0.0, 1e-3, 0.1]))
        rh = h64.clone()
        rw = w64 + noise * torch.randn(w64.shape, generator=g, dtype=torch.float64) * (
            w64.abs().max() if w64.numel() else 0.0
        )
        rb = (
            None
            if b64 is None
            else b64 + noise * torch.randn(b64.shape, generator=g, dtype=torch.float64)
        )
    return rh.to(p["dtype"]), rw.to(p["dtype"]), None if rb is None else rb.to(p["dtype"])


def _kl_hidden_floors(p, rh, rw, rb, kw):
    """(forward floor per row, grad_floor) for test_kl_divergence_from_hidden: the op's own
    floors on the logits both paths compute (test_kl_divergence's _kl_grad_floor, the forward's
    _z_rounding_floor), plus the first-order move of the KL and of each logit's gradient when
    the student's and the teacher's logits move by up to their eta (_logit_rounding), as
    _hidden_rounding_floor. With w the weight side, v the other, rho_j = log w_j - log v_j:
      KL:     sum_j eta_w,j w_j |rho_j - KL| + sum_j eta_v,j |v_j - w_j|, and for near-equal
              rows the second-order 1/2 (max_j (eta_w,j + eta_v,j))^2 (KL ~ Var_w / 2 of the moves);
      w side: g w_j (rho_j - KL) moves by g (dw_j |rho_j - KL| + w_j (dw_j / w_j + dv_j / v_j
              + dKL)), dw_j = w_j (eta_w,j + E_w) (_softmax_moves);
      v side: g (v_j - w_j) by g (dv_j + dw_j);
    and each side's G rounded to the inputs' dtype, u |G_j|; each over its side's tau, then
    through the projection as _hidden_grad_floor. The third value: _beyond_first_order of
    either side. Seen: bf16 [2, 1, 24] hidden, V = 2, a KL of 3.7e-6 computed 8.1e-6 where
    plain was 5.1e-7 off; fp32 [1, 10], V = 31 at a per-row tau, a weight-gradient entry of
    5.1e-5 off by 4.1e-9 (plain 1.2e-9, allowed 2.9e-9)."""
    t = kw["temperature"]
    rt = t if kw["ref_temperature"] is None else kw["ref_temperature"]
    reverse = kw["direction"] == "reverse"
    sides = [(p["h"], p["w"], p["b"], t), (rh, rw, rb, rt)]  # the student's, the teacher's
    rounded = [_linear(h, w, b, upcast=False) for h, w, b, _ in sides]
    z, eta = zip(*(_logit_rounding(h, w, b, tau) for h, w, b, tau in sides))
    w_i, v_i = (0, 1) if reverse else (1, 0)  # which side is the weight side w
    mw, mv = _softmax_moves(z[w_i], eta[w_i]), _softmax_moves(z[v_i], eta[v_i])
    w, v = mw["p"], mv["p"]
    rho = torch.where(w > 0, mw["logp"] - mv["logp"], 0.0)
    kl = (w * rho).sum(-1, keepdim=True)
    d_kl = (mw["eta"] * w * (rho - kl).abs()).sum(-1, keepdim=True) + (
        mv["eta"] * (v - w).abs()).sum(-1, keepdim=True)  # fmt: skip
    mass = (w > 0) | (v > 0)
    near = 0.5 * torch.where(mass, mw["eta"] + mv["eta"], 0.0).amax(-1, keepdim=True) ** 2
    rows = (d_kl + near).squeeze(-1).nan_to_num(0.0, posinf=0.0)
    op_kw = {k: kw[k] for k in ("direction", "temperature", "ref_temperature")}
    forward = rows + _z_rounding_floor({"dtype": p["dtype"], "x": rounded[0]}, rounded[1], t,
                                       kw["ref_temperature"], kw["direction"])  # fmt: skip
    op_floor = _kl_grad_floor(rounded[0], rounded[1], op_kw)
    ratio_w = torch.where(w > 0, mw["dp"] / w, 0.0)
    ratio_v = torch.where(v > 0, mv["dp"] / v, 0.0)
    moves = [None, None]
    moves[w_i] = mw["dp"] * (rho - kl).abs() + w * (ratio_w + ratio_v + d_kl)
    moves[v_i] = mv["dp"] + mw["dp"]
    u = torch.finfo(p["dtype"]).eps / 2
    grads = [None, None]
    grads[w_i], grads[v_i] = w * (rho - kl), v - w
    keep = None if kw["labels"] is None else (kw["labels"] != -100).unsqueeze(-1)

    def floor(i, ups):
        side, part = divmod(i, 3)  # (student, teacher) x (hidden, weight, bias)
        h, wt, _, tau = sides[side]
        tau = tau.double().unsqueeze(-1) if isinstance(tau, torch.Tensor) else tau
        g = ups["out"].abs().unsqueeze(-1)
        d_g = g * (moves[side] + u * grads[side].abs()) / tau + op_floor(side, ups)
        if keep is not None:
            d_g = torch.where(keep, d_g, 0.0)
        return _through_projection(d_g, h, wt, part)

    beyond = any(_beyond_first_order(zs, es) for zs, es in zip(z, eta))
    return forward, floor, beyond


def _kl_hidden_case(draw, device):
    """The KL-from-hidden ops' drawn case: the student (projection_cases), the teacher
    (_teacher), the KL's keyword arguments, whether the teacher's gradients are asked for, the
    six tensors on `device` and the indices of those differentiated."""
    p = draw(projection_cases())
    rh, rw, rb = _teacher(draw, p)
    kw = {
        "direction": draw(st.sampled_from(["reverse", "forward"])),
        "temperature": _temperature(draw, p["shape"]),
        "ref_temperature": _temperature(draw, p["shape"]) if draw(st.booleans()) else None,
        "labels": p["y"] if draw(st.booleans()) else None,
    }
    teacher_grads = draw(st.booleans())
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                 for a in (p["h"], p["w"], p["b"], rh, rw, rb))  # fmt: skip
    grad_args = _differentiated(draw, p["b"])
    if teacher_grads:
        grad_args += _differentiated(draw, rb, first=3)
    return p, (rh, rw, rb), kw, teacher_grads, args, tuple(grad_args)


@pytest.mark.op("kl_divergence")
@pytest.mark.backends("cpu")
@given(data=st.data())
def test_kl_divergence_from_hidden(backend_device, data):
    backend, device = backend_device
    p, (rh, rw, rb), kw, teacher_grads, args, grad_args = _kl_hidden_case(data.draw, device)
    # The default order is vocabulary blocks; the long profile draws row chunks too (the ci
    # profile's derandomized examples stay as they were).
    order = data.draw(st.sampled_from(["auto", "rows"])) if PROFILE != "ci" else "auto"
    hypothesis.note(
        _show_projection(p, temperature=kw["temperature"], ref=kw["ref_temperature"])
        + f" teacher D={rh.shape[-1]} bias={rb is not None} grads={teacher_grads} {order}"
    )

    def op(h, w, b, rh, rw, rb, **kw):
        return pg_kernels.kl_divergence_from_hidden(
            h, w, rh, rw, bias=b, ref_bias=rb, chunk_size=p["chunk"], backward_order=order,
            backend=backend, **kw,
        )  # fmt: skip

    def ref(h, w, b, rh, rw, rb, *, upcast, **kw):
        return reference.kl_divergence(_linear(h, w, b, upcast), _linear(rh, rw, rb, upcast),
                                       upcast=upcast, **kw)  # fmt: skip

    forward_floor, grad_floor, p["beyond_first_order"] = _kl_hidden_floors(p, rh, rw, rb, kw)
    with _narrow_vocab_blocks():
        _check(
            p, backend, op, ref, args, kw, diff_fields=("out",), grad_args=grad_args,
            whole_args=(*HIDDEN_ARGS, 3, 4, 5), forward_floor={"out": forward_floor},
            grad_floor=grad_floor,
        )  # fmt: skip


@pytest.mark.op("kl_divergence")
@pytest.mark.backends("cpu")
@given(data=st.data())
def test_kl_loss_from_hidden(backend_device, data):
    """A loss linear in the KL with drawn per-row coefficients, its gradients formed in the
    forward: the loss and the six inputs' gradients, under test_kl_divergence_from_hidden's
    floors with those coefficients (times the loss's upstream gradient) as the KL's upstream
    gradient."""
    backend, device = backend_device
    p, (rh, rw, rb), kw, teacher_grads, args, grad_args = _kl_hidden_case(data.draw, device)
    order = data.draw(st.sampled_from(["auto", "vocab"]))  # auto: row chunks on a CPU
    hypothesis.note(
        _show_projection(p, temperature=kw["temperature"], ref=kw["ref_temperature"])
        + f" teacher D={rh.shape[-1]} bias={rb is not None} grads={teacher_grads} {order}"
    )
    coef = torch.randn(p["shape"], generator=torch.Generator().manual_seed(p["seed"] + 5),
                       dtype=torch.float64)  # fmt: skip

    def linear_loss(kl, rows=slice(None)):
        return (kl.reshape(-1) * coef.reshape(-1)[rows].to(device=kl.device, dtype=kl.dtype)).sum()

    def op(h, w, b, rh, rw, rb, **kw):
        return pg_kernels.kl_loss_from_hidden(
            h, w, rh, rw, linear_loss, bias=b, ref_bias=rb, chunk_size=p["chunk"],
            backward_order=order, backend=backend, **kw,
        ).loss  # fmt: skip

    def ref(h, w, b, rh, rw, rb, *, upcast, **kw):
        return linear_loss(reference.kl_divergence(
            _linear(h, w, b, upcast), _linear(rh, rw, rb, upcast), upcast=upcast, **kw
        ))  # fmt: skip

    rows, kl_floor, p["beyond_first_order"] = _kl_hidden_floors(p, rh, rw, rb, kw)

    def grad_floor(i, ups):
        return kl_floor(i, {"out": coef * ups["out"].abs()})

    with _narrow_vocab_blocks():
        _check(
            p, backend, op, ref, args, kw, diff_fields=("out",), grad_args=grad_args,
            whole_args=(*HIDDEN_ARGS, 3, 4, 5),
            forward_floor={"out": (coef.abs() * rows).sum()}, grad_floor=grad_floor,
        )  # fmt: skip


@pytest.mark.op("token_stats")
@pytest.mark.backends("cpu")
@given(data=st.data())
def test_token_loss_from_hidden(backend_device, data):
    """A loss linear in the four differentiable statistics with drawn per-row coefficients, its
    gradients formed in the forward chunk by chunk: the loss and the gradients w.r.t. hidden,
    weight and bias, under test_token_stats_from_hidden's floors with those coefficients (times
    the loss's upstream gradient) as the statistics' upstream gradients."""
    backend, device = backend_device
    p = data.draw(projection_cases())
    t = _temperature(data.draw, p["shape"])
    # Row chunks are a CPU's default order; the long profile draws vocabulary blocks (CUDA's)
    # too (the ci profile's derandomized examples stay as they were).
    order = data.draw(st.sampled_from(["auto", "vocab"])) if PROFILE != "ci" else "auto"
    hypothesis.note(_show_projection(p, temperature=t) + f" {order}")
    diff = ("logprob", "entropy", "collision", "lse")
    g = torch.Generator().manual_seed(p["seed"] + 3)
    coef = {f: torch.randn(p["shape"], generator=g, dtype=torch.float64) for f in diff}

    def linear_loss(stats, rows=slice(None)):
        def term(f):
            x = getattr(stats, f).reshape(-1)
            return (x * coef[f].reshape(-1)[rows].to(device=x.device, dtype=x.dtype)).sum()

        return sum(term(f) for f in diff)

    def op(h, w, b, y, **kw):
        return pg_kernels.token_loss_from_hidden(
            h, w, y, linear_loss, bias=b, chunk_size=p["chunk"], backward_order=order,
            backend=backend, **kw,
        ).loss  # fmt: skip

    def ref(h, w, b, y, *, upcast, **kw):
        return linear_loss(reference.token_stats(_linear(h, w, b, upcast), y, upcast=upcast, **kw))

    rows, stats_floor, p["beyond_first_order"] = _hidden_floors(p, t)
    forward = sum((coef[f].abs() * rows[f]).sum() for f in diff)

    def grad_floor(i, ups):
        return stats_floor(i, {f: coef[f] * ups["out"].abs() for f in diff})

    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a
                 for a in (p["h"], p["w"], p["b"], p["y"]))  # fmt: skip
    with _narrow_vocab_blocks():
        _check(
            p, backend, op, ref, args, {"temperature": t}, diff_fields=("out",),
            grad_args=tuple(_differentiated(data.draw, p["b"])), whole_args=HIDDEN_ARGS,
            forward_floor={"out": forward}, grad_floor=grad_floor,
        )  # fmt: skip
