"""pruned_logprob in Triton: SPEC section 6, with the C++ launchers' interface.

One program per row, BLOCK_V elements per loop step (a function of V and the dtype only, so
results are bitwise deterministic and batch invariant).
Forward, two sweeps over the row, one exp per element in all:
  1. max of z = x / tau (no exp), plus a flag for NaN / +inf;
  2. e = exp(z - m) per element, into s_in where z >= m + log alpha and into s_out elsewhere,
     the label masked out of both (added back as e_c) - see softmax_stats.h (finalize_pruned).
  The set S depends on the final max, so a one-sweep online sum cannot drop the elements that
  fall below a risen threshold exactly (csrc/cpu/pruned_logprob.cpp says more).
Backward, one sweep: d logprob / dz_j = 1[j = c] - p~_j on S, 0 off S, divided by tau.

Bytes per row of V elements of s bytes: forward 2 V s read (the second sweep mostly from L2 for
rows up to a few hundred KB) + ~24 B of per-row values; backward V s read + V s written.
One program per row: a GPU is filled by a few thousand rows (N = B T in training); small N
leaves SMs idle (no split of a row across programs here, unlike token_stats).

Kept self-contained on purpose (the helpers below mirror pg_kernels/triton/_common.py, which is
being reworked); fold them into _common.py when both land.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pg_kernels.ops._common import check_labels

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    r = row.to(tl.int64)  # N * V and the strides of [B, T, V] overflow int32
    return (r // n_inner) * stride_outer + (r % n_inner) * stride_inner


@triton.jit
def _exp(x):
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x * LOG2E)


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_kernel(
    x_ptr, labels_ptr, inv_tau_ptr, log_alpha_ptr, ignore_index, V,
    n_inner, stride_outer, stride_inner,
    logprob_ptr, in_safe_ptr, tail_mass_ptr, lse_safe_ptr, threshold_ptr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = lse_safe_ptr.dtype.element_ty
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    in_range = (label >= 0) & (label < V)
    inv_tau = tl.load(inv_tau_ptr + row)
    log_alpha = tl.load(log_alpha_ptr)
    x_row = x_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
    n = tl.where(keep, V, 0)  # ignored rows read nothing
    lanes = tl.arange(0, BLOCK_V)

    # Sweep 1: the max, and whether any z is NaN or +inf.
    mvec = tl.full([BLOCK_V], float("-inf"), ACC)
    bad = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, n, BLOCK_V):
        cols = start + lanes
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_tau
        mvec = tl.maximum(mvec, z)
        bad = bad | ((z != z) | (z == float("inf"))).to(tl.int32)
    m = tl.max(mvec, axis=0)
    valid = keep & in_range & (tl.max(bad, axis=0) == 0) & (m > float("-inf"))
    valid = valid & (inv_tau > 0.0) & (inv_tau < float("inf"))  # bad GPU temperatures: NaN
    threshold = m + log_alpha
    m_ref = tl.where(valid, m, 0.0)  # a finite reference: exp(-inf - m_ref) = 0, never NaN

    # Sweep 2: one exp per element, split by the threshold, the label masked out.
    s_in = tl.zeros([BLOCK_V], ACC)
    s_out = tl.zeros([BLOCK_V], ACC)
    n2 = tl.where(valid, V, 0)
    for start in range(0, n2, BLOCK_V):
        cols = start + lanes
        z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_tau
        e = _exp(z - m_ref)
        e = tl.where(cols == label, 0.0, e)
        safe = z >= threshold
        s_in += tl.where(safe, e, 0.0)
        s_out += tl.where(safe, 0.0, e)
    safe_label = tl.where(in_range, label, 0)
    z_c = tl.load(x_row + safe_label).to(ACC) * inv_tau
    # finalize_pruned (softmax_stats.h)
    e_c = _exp(z_c - m_ref)
    s_safe = tl.sum(s_in, axis=0) + e_c
    s_tail = tl.sum(s_out, axis=0)
    lse_safe = m_ref + tl.log(s_safe)
    logprob = z_c - lse_safe
    tail_mass = s_tail / (s_safe + s_tail)
    in_safe = valid & (z_c >= threshold)
    nan = float("nan")
    tl.store(logprob_ptr + row, tl.where(keep, tl.where(valid, logprob, nan), 0.0))
    tl.store(tail_mass_ptr + row, tl.where(keep, tl.where(valid, tail_mass, nan), 0.0))
    tl.store(lse_safe_ptr + row, tl.where(keep, tl.where(valid, lse_safe, nan), 0.0))
    tl.store(threshold_ptr + row, tl.where(keep, tl.where(valid, threshold, nan), 0.0))
    tl.store(in_safe_ptr + row, (keep & in_safe).to(tl.int8))


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, labels_ptr, inv_tau_ptr, ignore_index, V, n_inner, stride_outer, stride_inner,
    lse_safe_ptr, threshold_ptr, grad_ptr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    ACC: tl.constexpr = lse_safe_ptr.dtype.element_ty
    row = tl.program_id(0)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    lse_safe = tl.load(lse_safe_ptr + row)
    threshold = tl.load(threshold_ptr + row)
    inv_tau = tl.load(inv_tau_ptr + row)
    g_tau = tl.load(g_ptr + row).to(ACC) * inv_tau
    valid = (lse_safe > float("-inf")) & (lse_safe < float("inf"))  # NaN rows stay NaN
    x_row = x_ptr + _row_offset(row, n_inner, stride_outer, stride_inner)
    grad_row = grad_ptr + row.to(tl.int64) * V  # a fresh contiguous gradient
    lanes = tl.arange(0, BLOCK_V)
    n_read = tl.where(keep & valid, V, 0)  # ignored and NaN rows read no logits
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        z = tl.load(x_row + cols, mask=cols < n_read, other=float("-inf")).to(ACC) * inv_tau
        is_label = cols == label
        # d logprob / dz_j = 1[j = c] - p~_j on S (the label is in S whatever its logit), 0 off S
        p = tl.where((z >= threshold) | is_label, _exp(z - tl.where(valid, lse_safe, 0.0)), 0.0)
        g = g_tau * (tl.where(is_label, 1.0, 0.0) - p)
        g = tl.where(keep, tl.where(valid, g, float("nan")), 0.0)
        tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers: the signatures of the C++ ones (pg_kernels._C.pruned_logprob_forward / _backward).


def block_v(V: int, dtype: torch.dtype) -> int:
    """Elements per loop step: 8 KiB of logits, at most the row (a function of V and dtype)."""
    return min(8192 // dtype.itemsize, max(16, triton.next_power_of_2(V)))


def _num_warps(bv: int, dtype: torch.dtype) -> int:
    return max(1, min(8, bv * dtype.itemsize // 1024))


def inv_temperature(temperature, temperature_scalar: float, n: int, acc, device) -> torch.Tensor:
    """Per-row 1 / tau in acc as the C++ kernels compute it (acc(1) / acc(tau)): a fill kernel for
    a scalar (no host-to-device copy), an elementwise reciprocal for a per-row tensor."""
    if temperature is not None:
        return torch.reciprocal(temperature.to(acc))
    t = float(temperature_scalar)
    if acc == torch.float32:
        t = float(torch.tensor(t, dtype=torch.float32))
        inv = float(torch.tensor(1.0 / t, dtype=torch.float32))  # a double quotient, rounded once
    else:
        inv = 1.0 / t
    return torch.full((n,), inv, dtype=acc, device=device)


def pruned_logprob_forward(
    logits, labels, temperature, temperature_scalar, alpha, ignore_index, n_inner, stride_outer,
    stride_inner,
):  # fmt: skip
    """labels: flat [N]. Returns flat [N] logprob, in_safe (bool), tail_mass, lse_safe,
    threshold."""
    N, V = labels.numel(), logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if logits.device.type == "cpu":  # the interpreter: same error as the C++ kernel
        check_labels(labels, V, ignore_index)
    outs = [torch.empty(N, dtype=acc, device=logits.device) for _ in range(4)]
    in_safe = torch.empty(N, dtype=torch.int8, device=logits.device)
    if N > 0:
        inv_tau = inv_temperature(temperature, temperature_scalar, N, acc, logits.device)
        log_alpha = torch.full((1,), math.log(alpha), dtype=acc, device=logits.device)
        bv = block_v(V, logits.dtype)
        _fwd_kernel[(N,)](
            logits, labels, inv_tau, log_alpha, ignore_index, V, n_inner, stride_outer,
            stride_inner, outs[0], in_safe, outs[1], outs[2], outs[3],
            BLOCK_V=bv, num_warps=_num_warps(bv, logits.dtype),
        )  # fmt: skip
    return [outs[0], in_safe.bool(), outs[1], outs[2], outs[3]]


def pruned_logprob_backward(
    grad_logprob, logits, labels, temperature, temperature_scalar, ignore_index, lse_safe,
    threshold, n_inner, stride_outer, stride_inner,
):  # fmt: skip
    N, V = labels.numel(), logits.shape[-1]
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N > 0:
        acc = lse_safe.dtype
        inv_tau = inv_temperature(temperature, temperature_scalar, N, acc, logits.device)
        bv = block_v(V, logits.dtype)
        _bwd_kernel[(N,)](
            grad_logprob.to(acc), logits, labels, inv_tau, ignore_index, V, n_inner,
            stride_outer, stride_inner, lse_safe, threshold, grad,
            BLOCK_V=bv, num_warps=_num_warps(bv, logits.dtype),
        )  # fmt: skip
    return grad
