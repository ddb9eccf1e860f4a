"""pg_kernels.testing: the rule every kernel test applies must be able to fail."""

from __future__ import annotations

import pytest
import torch

from pg_kernels import reference
from pg_kernels.outputs import TokenStats
from pg_kernels.testing import (
    FORWARD_TOL,
    GRAD_TOL,
    assert_close_to_truth,
    check_against_reference,
    make_labels,
    make_logits,
    near_one_hot,
)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_plain_baseline_does_not_widen_the_bound(bad):
    """A NaN / inf in plain PyTorch's result (an fp16 overflow) where the truth is finite made
    the bound 2 max|plain - truth| non-finite: any output passed."""
    truth = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    plain = torch.tensor([1.0, bad, 3.0])
    assert_close_to_truth("close", truth.float(), truth, plain, FORWARD_TOL[torch.float32])
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_truth("wrong", torch.tensor([5.0, -7.0, 100.0]), truth, plain,
                              FORWARD_TOL[torch.float32])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_per_row_bound_sees_a_small_row_wrong(dtype):
    """A confident row's gradient entries (~1e-6 here) doubled: within the whole tensor's bound
    (2x plain's largest error + 1e-5 of its largest entry), outside the row's own. The truth is
    rounded to the dtype, as check_against_reference's (the float64 gradient of a 16-bit leaf),
    so plain's 16-bit error is mostly 0."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(3, 50, generator=g, dtype=torch.float64)
    truth[1] *= 1e-6
    truth = truth.to(dtype).double()
    plain = (truth * (1 + 1e-7 * torch.randn(3, 50, generator=g, dtype=torch.float64))).to(dtype)
    out = truth.to(dtype)
    out[1] *= 2
    tol = GRAD_TOL[dtype]
    assert_close_to_truth("whole", out, truth, plain, tol)
    with pytest.raises(AssertionError, match=r"worst at \(1, "):
        assert_close_to_truth("per row", out, truth, plain, tol, per_row=True)
    assert_close_to_truth("per row, right", truth.to(dtype), truth, plain, tol, per_row=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_16bit_gradient_scaled_by_a_rounding_is_biased(dtype):
    """Every entry scaled by 1 + one ulp (half the elementwise rtol, 2 ulp: bf16's 1.004 that
    passed every op's tests): not within the bias rule; the truth rounded to the dtype (noise of
    mean 0) passes both."""
    g = torch.Generator().manual_seed(1)
    exact = torch.randn(8, 300, generator=g, dtype=torch.float64)
    tol = GRAD_TOL[dtype]
    # The truth exact, and rounded to the dtype as check_against_reference's is.
    for truth in (exact, exact.to(dtype).double()):
        plain = truth.to(dtype)
        assert_close_to_truth("rounded", truth.to(dtype), truth, plain, tol, per_row=True)
        scaled = (truth * (1 + tol.rtol / 2)).to(dtype)
        with pytest.raises(AssertionError, match="biased"):
            assert_close_to_truth("scaled", scaled, truth, plain, tol)
        # unless the caller's floor covers it (scaled by an ulp and rounded: up to two, rtol)
        floor = tol.rtol * truth.abs()
        assert_close_to_truth("scaled, floored", scaled, truth, plain, tol, floor)


@pytest.mark.parametrize(
    "field, gap, low, high",
    [("logprob", 15.0, -1e-5, -1e-6), ("lgp", 12.0, 1e-10, 1e-8)],
)
def test_per_value_bound_sees_a_small_output_wrong(field, gap, low, high):
    """A confident token's output doubled: its log-prob (-1.8e-6, plain fp32 1.5e-7 off) or its
    lgp (1.3e-9, plain 1.4e-10 off; a field the reference gives no gradient, whose sensitivity
    comes from `every_field_differentiable`). Within the whole tensor's bound (2x plain's
    largest error + 1e-6 of the largest value: 1.3e-5 for log-probs down to -12), outside the
    value's own (plain's error there, or an fp32 ulp of its size plus what rounding its logits
    moves it by)."""
    logits = make_logits(6, 500, seed=3)
    labels = make_labels((6,), 500, seed=3)
    near_one_hot(logits, [2], gap=gap)
    labels[2] = int(logits[2].argmax())

    def fp32(double: bool):
        def op(*args, **kwargs):
            out = reference.token_stats(*args, **kwargs, upcast=True)._asdict()
            out = {f: v.float() if v.is_floating_point() else v for f, v in out.items()}
            if double:
                out[field] = torch.where(torch.arange(6) == 2, 2, 1) * out[field]
            return TokenStats(**out)

        return op

    truth = getattr(reference.token_stats(logits, labels), field)[2]
    assert low < float(truth) < high
    check_against_reference(fp32(False), reference.token_stats, (logits, labels), {},
                            diff_fields=())  # fmt: skip
    with pytest.raises(AssertionError, match=rf"{field}: .*for this value\); worst at \(2,\)"):
        check_against_reference(fp32(True), reference.token_stats, (logits, labels), {},
                                diff_fields=())  # fmt: skip


def test_per_value_bound_allows_a_flush_below_the_smallest_normal():
    """An fp32 output below finfo(float32).tiny may read 0 (the kernels' exps flush subnormal
    results; plain PyTorch on a CPU keeps them); just above it, the value is checked."""
    tol = FORWARD_TOL[torch.float32]
    out, zero = torch.tensor([0.0, 1.0]), torch.zeros(2, dtype=torch.float64)
    t = torch.tensor([1e-40, 1.0], dtype=torch.float64)
    assert_close_to_truth("tiny", out, t, t.float(), tol, sensitivity=zero)
    t = torch.tensor([1e-37, 1.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="tiny"):
        assert_close_to_truth("tiny", out, t, t.float(), tol, sensitivity=zero)
