"""The PyTorch references themselves, the float64 truth (`upcast=True`) and the plain "reference"
backend (`upcast=False`): the contract's edge cases where autograd, not a kernel, decides."""

from __future__ import annotations

import pytest
import torch

from pg_kernels import reference

INF = float("inf")
NAN = float("nan")


def _ops(x, labels, upcast):
    """Each reference op's differentiable output on logits x [N, V] and labels [N]."""
    ids = torch.tensor([[0, 1]] * x.shape[0])
    q = torch.log(torch.tensor([[0.5, 0.3]] * x.shape[0], dtype=torch.float64))
    other = torch.zeros_like(x)  # a valid row everywhere
    kw = dict(labels=labels, upcast=upcast)
    return {
        "token_stats": reference.token_stats(x, labels, upcast=upcast).logprob,
        "pruned_logprob": reference.pruned_logprob(x, labels, alpha=1e-3, upcast=upcast).logprob,
        "topk_kl": reference.topk_kl(x, ids, q, **kw),
        "kl_divergence": reference.kl_divergence(x, other, **kw),
        "kl_divergence (reference side)": reference.kl_divergence(other, x, **kw),
        "rollout_tv": reference.rollout_tv(x, other, **kw),
    }


@pytest.mark.parametrize("upcast", [True, False], ids=["truth", "plain"])
@pytest.mark.parametrize("fill", [-INF, NAN, INF], ids=["-inf", "nan", "+inf"])
def test_ignored_rows_of_non_finite_logits_have_zero_gradient(upcast, fill):
    """An ignored row's outputs and gradient are 0 (SPEC §0) whatever it holds: a padding row
    of -inf, or a NaN / +inf. The references zeroed the outputs after computing them, and
    logsumexp's backward there was 0 * NaN: the whole row's gradient NaN (every reference op,
    both precisions), which a masked padding row spreads to every parameter."""
    x = torch.tensor([[1.0, 0.5, -2.0], [fill] * 3], dtype=torch.float64, requires_grad=True)
    if fill != -INF:  # one non-finite entry among finite ones
        x = torch.tensor([[1.0, 0.5, -2.0], [0.3, fill, 1.0]], dtype=torch.float64)
        x.requires_grad_()
    labels = torch.tensor([2, -100])
    for name, out in _ops(x, labels, upcast).items():
        assert float(out[1].detach()) == 0.0, name
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(grad[1], torch.zeros(3, dtype=torch.float64)), (name, grad)
        assert bool(torch.isfinite(grad[0]).all()), (name, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fill", [-1e30, -1e16, -1e6], ids=str)
@pytest.mark.parametrize("upcast", [True, False], ids=["truth", "plain"])
def test_topk_kl_tail_gradient_far_below_the_head(dtype, fill, upcast):
    """topk_kl's gradient on a tail far below the head (a masked vocabulary: three tied tail
    logits at `fill`): p_j (Q - q_tail / P_tail) = -q_tail / 3 each. The tail's logsumexp
    rounded to its entries' own value at |fill| >= 1e16 (plain fp32 from ~1e10), and its
    backward e^(z - lse) gave each entry 1, the tail -q_tail each (-0.2 for -0.0667)."""
    x = torch.tensor([[5.0, 4.0, fill, fill, fill]], dtype=dtype, requires_grad=True)
    q = torch.log(torch.tensor([[0.5, 0.3]], dtype=torch.float64))
    out = reference.topk_kl(x, torch.tensor([[0, 1]]), q, upcast=upcast)
    (grad,) = torch.autograd.grad(out.sum(), x)
    want = torch.full((3,), -0.2 / 3, dtype=torch.float64)
    torch.testing.assert_close(grad[0, 2:].double(), want, rtol=1e-6, atol=0)


def test_sampled_estimators_truth_of_tiny_log_ratios():
    """The float64 truth's k3 = e^d - 1 - d and chi2 = (e^d - 1)^2 without cancelling: rho - 1
    of d = 1e-23 is 0 in float64, and rho - 1 - d of d = 1e-9 kept 1e-7 of k3 (a truth of
    -6.1e-18 where the kernels read 5e-19). Plain keeps the trainers' form."""
    d = torch.tensor([1e-23, 1e-9, -1e-9, 1e-4, 0.2, -0.3, 3.0], dtype=torch.float64)
    exact = reference.sampled_mismatch(d, torch.zeros_like(d), exact=True)
    series = d * d * (0.5 + d * (1 / 6 + d * (1 / 24 + d / 120)))  # to d^5: enough below 1e-3
    small = d.abs() < 1e-3
    assert torch.allclose(exact["k3"][small], series[small], rtol=1e-15, atol=0)
    assert torch.allclose(exact["k3"][~small], torch.expm1(d[~small]) - d[~small], rtol=1e-14)
    assert torch.allclose(exact["chi2"], torch.expm1(d) ** 2, rtol=1e-15, atol=0)
    assert float(exact["chi2"][0]) > 0 and float(exact["k3"][1]) > 0
    naive = reference.sampled_mismatch(d, torch.zeros_like(d))
    assert float(naive["chi2"][0]) == 0.0  # rho - 1 = 0: why the truth does not take it


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_of_near_equal_rows_is_exact(direction):
    """fp64 rows 1e-9 apart: the direct sum w_j (log w_j - log v_j) of separately rounded
    log-probs read -3.9e-17 (reverse) where the truth is 1.38e-19. Truth: mpmath at 60 digits
    on these exact float64 inputs. Also a shared shift (rows that differ by a constant: KL 0)
    and masked columns (v's mass off w's support), against the same computation."""
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    xr = x + torch.tensor([[1e-9, -2e-9, 0.0]], dtype=torch.float64)
    truth = {"reverse": 1.3787621048151498e-19, "forward": 1.3787621045048373e-19}[direction]
    got = reference.kl_divergence(x, xr, direction=direction)
    assert abs(got.item() - truth) <= 1e-15 * truth, got.item()
    assert reference.kl_divergence(x, x + 7.25, direction=direction).item() == 0.0
    # every centred log-ratio within 1, so the near form serves; -inf on one side's columns
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 40, generator=g, dtype=torch.float64)
    b = a + 1e-6 * torch.randn(3, 40, generator=g, dtype=torch.float64)
    a[:, :2] = float("-inf")
    kl = reference.kl_divergence(a, b, direction="reverse", temperature=0.37)
    want = -torch.log1p(-torch.softmax(b / 0.37, -1)[:, :2].sum(-1))  # v's mass off w's support
    torch.testing.assert_close(kl, want, rtol=1e-6, atol=0)
