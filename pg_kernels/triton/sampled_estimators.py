"""The sampled-token estimators of mismatch_stats and step_stats in Triton (docs/math.md §5),
with the C++ launcher's interface: one launch over N tokens writes all nine fields, each computed
in fp64 and rounded once to the log-prob's dtype (as csrc/cpu/sampled_estimators.cpp). As
PyTorch ops they were ~22 elementwise kernels, each a launch: at small batches on a GPU, the
launches are the op's time."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import cdiv, expm1_acc, float64_bits
from pg_kernels.triton._pair import NEAR, excess_series

RATIO_CLAMP = tl.constexpr(20.0)  # rho = exp(clamp(delta, -20, 20)), as the ops' RATIO_CLAMP
FIELDS = 9
BLOCK = 1024


@triton.jit
def _f64(bits):
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit(do_not_specialize=["n", "ignore_index", "cap_bits", "low_bits", "high_bits"])
def _estimators_kernel(lp_ptr, rl_ptr, labels_ptr, log_ratio_ptr, ratio_ptr, k1_ptr, k2_ptr,
                       k3_ptr, abs_ptr, chi2_ptr, tis_ptr, icepop_ptr, n, ignore_index, cap_bits,
                       low_bits, high_bits, BLOCK: tl.constexpr):  # fmt: skip
    """Tokens [pid BLOCK, (pid + 1) BLOCK) into the nine fields (SAMPLED_FIELDS in
    pg_kernels/ops/sampled_estimators.py). delta = 0 where not kept; NaN stays NaN."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    lp = tl.load(lp_ptr + i, mask=mask, other=0.0)
    ACC: tl.constexpr = lp.dtype
    f64: tl.constexpr = tl.float64
    # The rollout's log-prob rounded to the log-prob's dtype first (rollout_logprobs.to(dtype)).
    rl = tl.load(rl_ptr + i, mask=mask, other=0.0).to(ACC).to(f64)
    keep = tl.load(labels_ptr + i, mask=mask, other=0).to(tl.int64) != ignore_index
    # The cap and the band as the log-prob's dtype holds them (a PyTorch comparison with a
    # Python float).
    cap = _f64(cap_bits).to(ACC).to(f64)
    low = _f64(low_bits).to(ACC).to(f64)
    high = _f64(high_bits).to(ACC).to(f64)
    delta = tl.where(keep, lp.to(f64) - rl, 0.0)
    # NaN passes through both selects, as torch.clamp.
    clamped = tl.where(delta < -RATIO_CLAMP, -RATIO_CLAMP,
                       tl.where(delta > RATIO_CLAMP, RATIO_CLAMP, delta))  # fmt: skip
    rho_m1 = expm1_acc(clamped)
    # The ratio as its field holds it: the cap and the band compare that value.
    rho = tl.where(keep, tl.exp(clamped).to(ACC), 0.0).to(f64)
    # e^delta - 1 - delta >= 0 inside the clamp: from its series where |delta| < 1/4, as
    # expm1(delta) - delta would cancel (2.4e-9 relative at |delta| ~ 1e-7, an fp64 k3's error).
    near = tl.abs(delta) < NEAR
    excess = tl.where(near, excess_series(tl.where(near, delta, 0.0)), rho_m1 - delta)
    abs_delta = tl.abs(delta)
    k3 = tl.where((abs_delta <= RATIO_CLAMP) & (excess < 0.0), 0.0, excess)
    icepop = tl.where((rho < low) | (rho > high), 0.0, rho)
    tl.store(log_ratio_ptr + i, delta.to(ACC), mask=mask)
    tl.store(ratio_ptr + i, rho.to(ACC), mask=mask)
    tl.store(k1_ptr + i, (0.0 - delta).to(ACC), mask=mask)  # +0 where not kept
    tl.store(k2_ptr + i, (0.5 * delta * delta).to(ACC), mask=mask)
    tl.store(k3_ptr + i, k3.to(ACC), mask=mask)
    tl.store(abs_ptr + i, abs_delta.to(ACC), mask=mask)
    tl.store(chi2_ptr + i, (rho_m1 * rho_m1).to(ACC), mask=mask)
    tl.store(tis_ptr + i, tl.where(rho > cap, cap, rho).to(ACC), mask=mask)  # NaN stays NaN
    tl.store(icepop_ptr + i, icepop.to(ACC), mask=mask)


def sampled_estimators_forward(logprob, rollout_logprobs, labels, ignore_index, tis_cap,
                               icepop_low, icepop_high):  # fmt: skip
    """The nine fields, each a tensor of the labels' shape in the log-prob's dtype (separate
    tensors, as the op's schema and fake have them); the signature of
    pg_kernels._C.sampled_estimators_forward."""
    n = labels.numel()
    out = [torch.empty(labels.shape, dtype=logprob.dtype, device=logprob.device)
           for _ in range(FIELDS)]  # fmt: skip
    if n > 0:
        _estimators_kernel[(cdiv(n, BLOCK),)](
            logprob.contiguous(), rollout_logprobs.contiguous(), labels.contiguous(), *out, n,
            ignore_index, float64_bits(tis_cap), float64_bits(icepop_low),
            float64_bits(icepop_high), BLOCK=BLOCK, num_warps=4,
        )  # fmt: skip
    return out
