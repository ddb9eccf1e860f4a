"""pg_kernels.algorithms.sampled_kl: Schulman's k1-k3 against float64, verl's opt-in clamps."""

from __future__ import annotations

import math

import pytest
import torch

from pg_kernels.algorithms import sampled_kl
from pg_kernels.ops.sampled_estimators import sampled_estimators


def _pair(n=256, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = -torch.rand(n, generator=g, dtype=torch.float64) * 6
    b = a + torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-6, 0.5, n).double()
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_matches_float64_formula(kind):
    a, b = _pair()
    s = a.double() - b.double()
    truth = {"k1": s, "k2": s * s / 2, "k3": torch.expm1(-s) + s}[kind]
    got = sampled_kl(a, b, kind)
    assert got.dtype == torch.float32
    # The only roundings: s = a - b (exact in fp32 by Sterbenz for close a, b, else 1 ulp of
    # |a|, |b| <= 6, i.e. ~5e-7) and the formula's 2-3 fp32 operations.
    err = (got.double() - truth).abs()
    bound = 4 * 2**-24 * (truth.abs() + 6 * (1 + s.abs()))
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_low_precision_inputs_compute_in_float32(kind, dtype):
    # In bf16, expm1(-s) was rounded to bf16 before + s: k3 of s = 2^-8 came out 0 (true
    # 7.6e-6). bf16 / fp16 inputs now give the float64 formula of the same rounded inputs to
    # fp32 rounding (test_matches_float64_formula's bound), in fp32; gradients in the inputs'
    # dtype.
    a, b = _pair(dtype=dtype)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s = a.detach().double() - b.detach().double()
    truth = {"k1": s, "k2": s * s / 2, "k3": torch.expm1(-s) + s}[kind]
    got = sampled_kl(a, b, kind)
    err = (got.detach().double() - truth).abs()
    bound = 4 * 2**-24 * (truth.abs() + 6 * (1 + s.abs()))
    assert bool((err <= bound).all()), float((err - bound).max())
    got.sum().backward()
    assert got.dtype == torch.float32 and a.grad.dtype == dtype and b.grad.dtype == dtype


def test_k3_small_ratio_keeps_digits():
    a = torch.tensor([-1.0], dtype=torch.float32)
    b = a + 1e-4
    s = a.double() - b.double()
    truth = torch.expm1(-s) + s  # ~ s^2 / 2 = 5e-9
    assert abs(float(sampled_kl(a, b, "k3")) - float(truth)) < 1e-3 * float(truth)


def test_rollout_direction_matches_mismatch_stats():
    """docs/math.md §5's k1 / k3 (tokens from the rollout) are sampled_kl(rollout, train)."""
    train, rollout = _pair(seed=1)
    labels = torch.zeros(train.shape, dtype=torch.int64)
    ref = sampled_estimators(
        train, rollout, labels, -100, tis_cap=2.0, icepop_low=0.5, icepop_high=2.0,
        backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(sampled_kl(rollout, train, "k1"), ref["k1"])
    torch.testing.assert_close(sampled_kl(rollout, train, "k2"), ref["k2"])
    torch.testing.assert_close(sampled_kl(rollout, train, "k3"), ref["k3"], rtol=1e-5, atol=1e-7)


def test_verl_clamp_is_opt_in():
    s = torch.tensor([-30.0, 30.0, -1.0, 5.0, 12.0, -100.0])  # s = sample - other
    lp = torch.zeros(6, requires_grad=True)
    ref = -s
    exact = [math.expm1(-x) + x for x in s.tolist()[:5]]
    free = sampled_kl(lp, ref, "k3")
    for got, want in zip(free.tolist()[:5], exact, strict=True):
        assert math.isclose(got, want, rel_tol=1e-6)
    assert free[5] == torch.inf  # e^100 overflows fp32 without verl's clamp
    # verl: s clamped to +-20 before exp, the estimate to +-10 after
    clamped = sampled_kl(lp, ref, "k3", clamp=True)
    want = [10.0, 10.0, exact[2], exact[3], 10.0, 10.0]
    for got, w in zip(clamped.tolist(), want, strict=True):
        assert math.isclose(got, w, rel_tol=1e-6)
    # the gradient is 0 where the outer clamp is active, as in verl, and finite everywhere
    (g,) = torch.autograd.grad(clamped.sum(), lp)
    assert g[[0, 1, 4, 5]].abs().max() == 0
    torch.testing.assert_close(g[2:4], -torch.expm1(-s[2:4]))  # d/ds (e^-s - 1 + s) = 1 - e^-s
    # k1 / k2 are never clamped
    torch.testing.assert_close(sampled_kl(lp, ref, "k1", clamp=True), s)
    torch.testing.assert_close(sampled_kl(lp, ref, "k2", clamp=True), s * s / 2)


def test_bad_arguments():
    a, b = _pair(8)
    with pytest.raises(ValueError, match="kind"):
        sampled_kl(a, b, "k4")
    with pytest.raises(ValueError, match="other_logprob"):
        sampled_kl(a, b[:4])
    with pytest.raises(TypeError, match="sample_logprob"):
        sampled_kl(a.long(), b)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_fullgraph_compile_and_no_host_reads(kind):
    """Traces under torch.compile(fullgraph=True) and runs on meta tensors (no host sync)."""
    torch._dynamo.reset()
    a, b = _pair(16)
    eager = sampled_kl(a, b, kind, clamp=True)
    compiled = torch.compile(
        lambda x, y: sampled_kl(x, y, kind, clamp=True), fullgraph=True, backend="aot_eager"
    )(a, b)
    torch.testing.assert_close(compiled, eager)
    meta = torch.zeros(4, 5, device="meta")
    assert sampled_kl(meta, meta, kind, clamp=True).shape == (4, 5)
