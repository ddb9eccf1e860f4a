"""The sampled-token estimators' op (mismatch_stats' and step_stats' sampled fields): each
kernel against float64 on the same inputs, every field rounded once."""

from __future__ import annotations

import math

import pytest
import torch

import pg_kernels
from pg_kernels import _backend
from pg_kernels.ops.sampled_estimators import KERNELS, OP, SAMPLED_FIELDS, sampled_estimators

BANDS = {"tis_cap": 2.0, "icepop_low": 0.5, "icepop_high": 2.0}
NAN, INF = float("nan"), float("inf")


@pytest.fixture(
    params=[
        pytest.param((b, d), marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{b}-{d}")
        for b in KERNELS
        for d in _backend.DEVICE_TYPES[b]
    ]
)
def bd(request):
    backend, device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    why = _backend.op_unavailable_reason(OP, backend, torch.device(device), KERNELS)
    if why is not None:
        pytest.skip(why)
    return backend, device


def _tokens(dtype, shape=(3, 67), seed=0):
    """Log-probs, rollout log-probs and labels of a shape: deltas from 1e-7 to ~30 (past the
    ratio clamp of 20) of both signs, a NaN, -inf on either side, ignore rows (-100)."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    lp = -torch.rand(n, generator=g, dtype=torch.float64) * 8
    scale = torch.logspace(-7, 1.5, n, dtype=torch.float64)
    rl = lp + torch.randn(n, generator=g, dtype=torch.float64) * scale
    rl[3], rl[5], lp[7] = NAN, -INF, -INF
    rl[9], rl[11] = lp[9] - 25.0, lp[11] + 25.0
    lp[15], rl[15] = -0.69314718, 0.0  # a ratio that rounds to icepop_low (0.5) in fp32
    y = torch.randint(0, 100, (n,), generator=g)
    y[::13] = -100
    return lp.to(dtype).view(shape), rl.to(dtype).view(shape), y.view(shape)


def _truth(lp, rl, labels):
    """The fields in float64 from the rounded inputs (the PyTorch formulas, "reference"), k3 of
    |delta| < 1/4 from its series: expm1(delta) - delta cancels even in float64 (2.4e-9
    relative at |delta| ~ 1e-7)."""
    out = sampled_estimators(lp.double(), rl.to(lp.dtype).double(), labels, -100, **BANDS,
                             backend="reference")  # fmt: skip
    d = out["log_ratio"]
    series = sum(d**n / float(math.factorial(n + 2)) for n in range(20)) * d * d
    out["k3"] = torch.where(d.abs() < 0.25, series, out["k3"])
    return out


def _kernel(backend, lp, rl, labels):
    """The op's kernel on `backend` itself (the public path takes the device's own kernel)."""
    if rl.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        rl = rl.to(lp.dtype)  # as sampled_estimators converts float8
    out = torch.ops.pg_kernels.sampled_estimators(lp, rl, labels, -100, *BANDS.values(), backend)
    return dict(zip(SAMPLED_FIELDS, out))


LAYOUTS = ["contiguous", "strided", "int32 labels", "bf16 rollout", "fp8 rollout"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_field_rounds_once(bd, dtype, layout):
    """Each field within half an ulp of its float64 value (fp32; fp64 within 1e-12 relative:
    k3 of fp64 from its series, as the truth's); NaN exactly where the truth
    has NaN; +0.0, never -0.0, in k1 of an ignored row. Plain fp32 PyTorch's k3 of a small
    delta cancels: 12 % off at delta ~1e-6. tis_weight and icepop_weight are the ratio field's
    own value capped and banded (a ratio that rounds to icepop_low is in the band, as the
    PyTorch formulas on the rounded ratio have it; the kernels once banded the unrounded one)."""
    backend, device = bd
    lp, rl, y = _tokens(dtype)
    if layout == "strided":
        lp, rl, y = (torch.stack([t, t], -1)[..., 0] for t in (lp, rl, y))
        assert not lp.is_contiguous()
    elif layout == "int32 labels":
        y = y.int()
    elif layout == "bf16 rollout":
        rl = rl.bfloat16()
    elif layout == "fp8 rollout":  # no kernel reads it: converted first
        rl = rl.clamp(-400.0, 400.0).to(torch.float8_e4m3fn)
    truth = _truth(lp, rl, y)
    got = _kernel(backend, lp.to(device), rl.to(device), y.to(device))
    rtol = torch.finfo(dtype).eps / 2 if dtype == torch.float32 else 1e-12
    ratio = got["ratio"].cpu()
    kept = y != -100
    capped = torch.where(ratio > BANDS["tis_cap"], BANDS["tis_cap"], ratio)
    banded = torch.where((ratio < 0.5) | (ratio > 2.0), 0.0, ratio)
    torch.testing.assert_close(got["tis_weight"].cpu(), capped, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got["icepop_weight"].cpu(), banded, rtol=0, atol=0,
                               equal_nan=True)  # fmt: skip
    if dtype == torch.float32 and layout != "fp8 rollout":
        assert float(got["icepop_weight"].cpu().view(-1)[15]) == 0.5
    for name in SAMPLED_FIELDS[:7]:
        g, t = got[name].cpu(), truth[name]
        assert g.shape == y.shape and g.dtype == dtype, name
        assert torch.equal(g.isnan(), t.isnan()), name
        err = (g.double() - t).abs().nan_to_num(0.0)  # inf - inf: equal infinities
        err[g.double() == t] = 0.0
        assert bool(((err <= rtol * t.abs()) | t.isnan()).all()), (name, float(err.max()))
    k1 = got["k1"].cpu()[~kept]
    assert bool((k1 == 0).all()) and not bool(k1.signbit().any())


def test_backends_and_ops_agree(bd):
    """mismatch_stats' sampled fields are the op's on its log-probs (the device's kernel),
    bitwise, whichever kernel computes them: both round each field once from double."""
    backend, device = bd
    x = torch.randn(4, 50, dtype=torch.float32, device=device)
    y = torch.tensor([3, -100, 7, 0], device=device)
    rl = torch.tensor([-4.0, -1.0, -30.0, NAN], device=device)
    out = pg_kernels.mismatch_stats(x, y, rl, backend="cpu" if device == "cpu" else "auto")
    direct = _kernel(backend, out.logprob, rl, y)
    for name in SAMPLED_FIELDS:
        torch.testing.assert_close(getattr(out, name), direct[name], equal_nan=True, rtol=0,
                                   atol=0)  # fmt: skip


def test_empty(bd):
    backend, device = bd
    e = torch.empty(0, 5, device=device)
    got = _kernel(backend, e, e, e.long())
    assert all(got[k].shape == (0, 5) for k in SAMPLED_FIELDS)


def test_opcheck(bd):
    """Schema, fake and kernel agree (nine separate outputs: the Triton launcher once returned
    nine views of one tensor, which the fake does not)."""
    backend, device = bd
    lp, rl, y = _tokens(torch.float32, shape=(2, 9))
    rl[0, 3] = -1.0  # a finite row: opcheck's comparisons take NaN != NaN
    args = (lp.to(device), rl.to(device), y.to(device), -100, 2.0, 0.5, 2.0, backend)
    torch.library.opcheck(torch.ops.pg_kernels.sampled_estimators, args)
