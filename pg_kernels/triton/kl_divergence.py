"""kl_divergence in Triton (SPEC section 4), with the C++ launchers' interface.

The same pair pass as csrc/cpu/divergence.cpp (see PairState in softmax_stats.h): the weight
side w (p for reverse KL(p || q), q for forward KL(q || p)) and the other side v are read
together, BLOCK_V entries per loop step, one program per row. Per step: each side's block
max, one exp per element of each side, and three block sums (tree reductions)
    s1_w = sum e^{d_w},  s1_v = sum e^{d_v},  u = sum e^{d_w} (d_w - d_v),   d = z - max,
relative to the block's maxes; the block state then merges into the row's running state with
the SPEC section 1 rule (rescale_pair / merge_pair). A term with v_j = 0 < w_j sets the +inf
flag instead of entering u. Rows holding NaN or +inf are flagged explicitly (a GPU max may
drop NaN). z = x / tau: one rounding, like the reference.

Forward: reads both [N, V] rows once (0 bytes for an ignored row), writes kl and the row state
(m, log s1) of each side plus c = E_w[d_w - d_v] (6 numbers per row) for the backward.
Backward: reads both rows once, writes each requested gradient once:
    grad_w = g / tau_w * w_j ((d_w - d_v) - c),  0 where w_j = 0
    grad_v = g / tau_v * (v_j - w_j)
Rows are independent and every reduction runs in a fixed order: deterministic and batch
invariant.

Status: checked under TRITON_INTERPRET=1 on CPU tensors (the test suite) and compiled for
sm_90 (triton.compile with GPUTarget("cuda", 90, 32): bf16/fp32/fp64, both directions, no
spills); not yet run or timed on a GPU. One program per row keeps it simple; small N at large V
would want rows split across programs (as triton/token_stats.py does) before this is a
performance path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

OP = "kl_divergence"
ROW_STATE = 5  # (m, log s1) of the logits, of the reference, then c = E_w[d_w - d_v]
NUM_WARPS = 8  # BLOCK_V = 4096: 16 elements of each tensor per thread and step (untuned)


@triton.jit
def _row_offset(row, n_inner, stride_outer, stride_inner):
    """Element offset of row `row` of a [..., V] tensor with a two-level row layout (int64)."""
    r = row.to(tl.int64)
    return (r // n_inner) * stride_outer + (r % n_inner) * stride_inner


@triton.jit
def _load_scaled(row_ptr, cols, mask, tau):
    """z = x / tau in the accumulation dtype (tau's), -inf outside the mask."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf"))
    return x.to(tau.dtype) / tau


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_kernel(
    x_ptr, xr_ptr, labels_ptr, t_ptr, tr_ptr, kl_ptr, st_ptr, V, ignore_index,
    n_inner, s_outer, s_inner, r_n_inner, r_s_outer, r_s_inner,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, LOW: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    keep = row >= 0
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    tau = tl.load(t_ptr + row)
    tau_r = tl.load(tr_ptr + row)
    x_row = x_ptr + _row_offset(row, n_inner, s_outer, s_inner)
    xr_row = xr_ptr + _row_offset(row, r_n_inner, r_s_outer, r_s_inner)
    zero = tau * 0
    ninf = zero - float("inf")
    m_w, s_w, m_v, s_v, u = ninf, zero, ninf, zero, zero
    n_bad = 0  # NaN / +inf entries: the row is NaN
    n_inf = 0  # terms with w_j > 0 = v_j: KL = +inf
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = (cols < V) & keep
        zp = _load_scaled(x_row, cols, mask, tau)
        zq = _load_scaled(xr_row, cols, mask, tau_r)
        if REVERSE:
            zw, zv = zp, zq
        else:
            zw, zv = zq, zp
        bad = (zw != zw) | (zv != zv) | (zw == float("inf")) | (zv == float("inf"))
        n_bad += tl.sum(bad.to(tl.int32), 0)
        bm_w = tl.max(zw, 0)
        bm_v = tl.max(zv, 0)
        # An all -inf block side subtracts 0 instead of -inf (keeps d = -inf, e = 0, no NaN).
        dw = tl.maximum(zw - tl.where(bm_w == float("-inf"), 0.0, bm_w), LOW)
        dv = zv - tl.where(bm_v == float("-inf"), 0.0, bm_v)  # not clamped: real log-ratios
        ew = tl.exp(dw)
        ev = tl.exp(tl.maximum(dv, LOW))
        v_zero = dv == float("-inf")
        n_inf += tl.sum((v_zero & (ew > 0)).to(tl.int32), 0)
        b_s_w = tl.sum(ew, 0)
        b_s_v = tl.sum(ev, 0)
        b_u = tl.sum(ew * tl.where(v_zero, 0.0, dw - dv), 0)
        # merge_pair(running, block): rescale both to the new maxes. An empty side (max -inf)
        # has zero sums and contributes nothing (its factor is 0, its shift 0).
        new_w = tl.maximum(m_w, bm_w)
        new_v = tl.maximum(m_v, bm_v)
        has_w, has_v = m_w != float("-inf"), m_v != float("-inf")
        bh_w, bh_v = bm_w != float("-inf"), bm_v != float("-inf")
        dw_a = tl.where(has_w, m_w - new_w, 0.0)
        dv_a = tl.where(has_v, m_v - new_v, 0.0)
        dw_b = tl.where(bh_w, bm_w - new_w, 0.0)
        dv_b = tl.where(bh_v, bm_v - new_v, 0.0)
        aw = tl.where(has_w, tl.exp(dw_a), 0.0)
        av = tl.where(has_v, tl.exp(dv_a), 0.0)
        bw = tl.where(bh_w, tl.exp(dw_b), 0.0)
        bv = tl.where(bh_v, tl.exp(dv_b), 0.0)
        u = aw * (u + (dw_a - dv_a) * s_w) + bw * (b_u + (dw_b - dv_b) * b_s_w)
        s_w = aw * s_w + bw * b_s_w
        s_v = av * s_v + bv * b_s_v
        m_w, m_v = new_w, new_v
    valid = (n_bad == 0) & (m_w > float("-inf")) & (m_v > float("-inf"))
    nan = zero + float("nan")
    l_w = tl.log(s_w)
    l_v = tl.log(s_v)
    kl = tl.maximum(u / s_w - l_w + l_v, 0.0)
    kl = tl.where(n_inf > 0, zero + float("inf"), kl)
    kl = tl.where(keep, tl.where(valid, kl, nan), 0.0)
    if REVERSE:
        m_p, l_p, m_q, l_q = m_w, l_w, m_v, l_v
    else:
        m_p, l_p, m_q, l_q = m_v, l_v, m_w, l_w
    st_row = st_ptr + row.to(tl.int64) * 5
    tl.store(kl_ptr + row, kl)
    tl.store(st_row + 0, tl.where(keep, tl.where(valid, m_p, nan), 0.0))
    tl.store(st_row + 1, tl.where(keep, tl.where(valid, l_p, nan), 0.0))
    tl.store(st_row + 2, tl.where(keep, tl.where(valid, m_q, nan), 0.0))
    tl.store(st_row + 3, tl.where(keep, tl.where(valid, l_q, nan), 0.0))
    tl.store(st_row + 4, tl.where(keep, tl.where(valid, u / s_w, nan), 0.0))


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, xr_ptr, labels_ptr, t_ptr, tr_ptr, kl_ptr, st_ptr, gx_ptr, gxr_ptr, V,
    ignore_index, n_inner, s_outer, s_inner, r_n_inner, r_s_outer, r_s_inner,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, NEED_X: tl.constexpr,
    NEED_XR: tl.constexpr, LOW: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    keep = row >= 0
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    tau = tl.load(t_ptr + row)
    tau_r = tl.load(tr_ptr + row)
    g = tl.load(g_ptr + row)
    kl = tl.load(kl_ptr + row)
    st_row = st_ptr + row.to(tl.int64) * 5
    m_p, l_p = tl.load(st_row + 0), tl.load(st_row + 1)
    m_q, l_q = tl.load(st_row + 2), tl.load(st_row + 3)
    c = tl.load(st_row + 4)
    big = float("inf")
    ok = (tl.abs(m_p) < big) & (tl.abs(l_p) < big) & (tl.abs(m_q) < big) & (tl.abs(l_q) < big)
    ok = ok & (kl == kl)
    # Row cases, as in the C++ kernel: ignored or zero upstream -> 0; NaN row -> NaN; KL = +inf
    # -> the weight side NaN, the other side exact.
    zero_row = (~keep) | (ok & (g == 0))
    nan_row = keep & (~ok)
    w_nan = keep & ok & (g != 0) & (kl == big)
    compute = keep & ok & (g != 0)
    if REVERSE:
        m_w, l_w, m_v, l_v, t_w, t_v = m_p, l_p, m_q, l_q, tau, tau_r
    else:
        m_w, l_w, m_v, l_v, t_w, t_v = m_q, l_q, m_p, l_p, tau_r, tau
    g_w = g / t_w  # d/dx = d/dz / tau
    g_v = g / t_v
    x_row = x_ptr + _row_offset(row, n_inner, s_outer, s_inner)
    xr_row = xr_ptr + _row_offset(row, r_n_inner, r_s_outer, r_s_inner)
    out = row.to(tl.int64) * V  # gradients are fresh contiguous tensors
    nan = tau * 0 + float("nan")
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        mask = in_row & compute
        zp = _load_scaled(x_row, cols, mask, tau)
        zq = _load_scaled(xr_row, cols, mask, tau_r)
        if REVERSE:
            zw, zv = zp, zq
        else:
            zw, zv = zq, zp
        dw = zw - m_w
        dv = zv - m_v
        w = tl.exp(tl.maximum(dw - l_w, LOW))
        # d/dz_w of sum w (log w - log v) = w_j (log w_j - log v_j - KL) = w_j ((d_w - d_v) - c)
        grad_w = tl.where(w == 0, 0.0, w * ((dw - dv) - c) * g_w)
        grad_w = tl.where(zero_row, 0.0, tl.where(nan_row | w_nan, nan, grad_w))
        # d/dz_v of -sum w log v = v_j - w_j
        v = tl.exp(tl.maximum(dv - l_v, LOW))
        grad_v = tl.where(zero_row, 0.0, tl.where(nan_row, nan, (v - w) * g_v))
        if REVERSE:
            grad_x, grad_xr = grad_w, grad_v
        else:
            grad_x, grad_xr = grad_v, grad_w
        if NEED_X:
            tl.store(gx_ptr + out + cols, grad_x.to(gx_ptr.dtype.element_ty), mask=in_row)
        if NEED_XR:
            tl.store(gxr_ptr + out + cols, grad_xr.to(gxr_ptr.dtype.element_ty), mask=in_row)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _low(dtype: torch.dtype) -> float:
    """Where exp is already 0 in the accumulation dtype (softmax_stats.h, exp_zero_below)."""
    return -1024.0 if dtype == torch.float64 else -128.0


def _block_v(V: int) -> int:
    return min(4096, triton.next_power_of_2(max(V, 16)))


def _per_row(t: torch.Tensor | None, scalar: float, n: int, like: torch.Tensor) -> torch.Tensor:
    """A per-row temperature tensor (a scalar becomes a filled one: N numbers, one dtype path)."""
    if t is not None:
        return t.contiguous()
    return torch.full((max(n, 1),), scalar, dtype=_acc(like.dtype), device=like.device)


def kl_divergence_forward(
    logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, reverse, n_inner, stride_outer, stride_inner,
    ref_n_inner, ref_stride_outer, ref_stride_inner,
):  # fmt: skip
    """(kl [N], row_state [N, 5]); the signature of pg_kernels._C.kl_divergence_forward."""
    V = logits.shape[-1]
    n = logits.numel() // V if V else 0
    acc = _acc(logits.dtype)
    kl = torch.empty(n, dtype=acc, device=logits.device)
    state = torch.empty(n, ROW_STATE, dtype=acc, device=logits.device)
    if n == 0:
        return kl, state
    t = _per_row(temperature, temperature_scalar, n, logits)
    tr = _per_row(ref_temperature, ref_temperature_scalar, n, logits)
    lab = labels.contiguous() if labels is not None else kl
    _fwd_kernel[(n,)](
        logits, ref_logits, lab, t, tr, kl, state, V, ignore_index,
        n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer, ref_stride_inner,
        HAS_LABELS=labels is not None, REVERSE=bool(reverse), LOW=_low(logits.dtype),
        BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
    )  # fmt: skip
    return kl, state


def kl_divergence_backward(
    grad_kl, logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, reverse, kl, row_state, need_logits_grad,
    need_ref_grad, n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer,
    ref_stride_inner,
):  # fmt: skip
    """(grad_logits, grad_ref_logits), empty where not requested; as the C++ launcher."""
    V = logits.shape[-1]
    n = logits.numel() // V if V else 0
    grad = (
        torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if need_logits_grad
        else logits.new_empty(0)
    )
    grad_ref = (
        torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=ref_logits.device)
        if need_ref_grad
        else ref_logits.new_empty(0)
    )
    if n == 0 or not (need_logits_grad or need_ref_grad):
        return grad, grad_ref
    t = _per_row(temperature, temperature_scalar, n, logits)
    tr = _per_row(ref_temperature, ref_temperature_scalar, n, logits)
    lab = labels.contiguous() if labels is not None else kl
    _bwd_kernel[(n,)](
        grad_kl, logits, ref_logits, lab, t, tr, kl, row_state,
        grad if need_logits_grad else grad_ref, grad_ref if need_ref_grad else grad, V,
        ignore_index, n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer,
        ref_stride_inner, HAS_LABELS=labels is not None, REVERSE=bool(reverse),
        NEED_X=bool(need_logits_grad), NEED_XR=bool(need_ref_grad), LOW=_low(logits.dtype),
        BLOCK_V=_block_v(V), num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad, grad_ref
