"""pg_kernels.testing: the rule every kernel test applies must be able to fail."""

from __future__ import annotations

import pytest
import torch

from pg_kernels.testing import FORWARD_TOL, assert_close_to_truth


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
