"""kl_divergence in Triton (SPEC section 4), with the C++ launchers' interface.

Forward, two kernels: the pair pass (`_pair.pair_chunk_kernel`, grid (N, n_chunks); weight
side w = p for reverse KL(p || q), w = q for forward KL(q || p)), then `_fwd_finish_kernel`,
which merges each row's chunk states in chunk order and writes kl and the row state (m, log s1)
of each side plus c = E_w[d_w - d_v] (SideState / kl_grad_shift of the C++ kernel).
Backward, one kernel `_bwd_kernel`, grid (N, n_chunks): recomputes w_j and v_j from the saved
row state and writes each requested gradient once:
    grad_w = g / tau_w * w_j ((d_w - d_v) - c),  0 where w_j = 0
    grad_v = g / tau_v * (v_j - w_j)
The blocking depends on V and the dtype only and every reduction runs in a fixed order:
deterministic and batch invariant.

Bytes per row of V elements of s bytes (the minimum: both rows read once; the gradient written):
  forward   2 V s read (0 for an ignored row) + 24 n_chunks bytes of partial state written and
            read back + 6 numbers out.
  backward  2 V s read + V s per requested gradient written.
Checked under TRITON_INTERPRET=1 on CPU tensors (the test suite); not yet run or timed on a GPU.
Untuned there: each loop step reduces its block (max, three sums) instead of keeping lane
accumulators as triton/token_stats.py does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    D_MIN,
    acc_dtype_of,
    exp_acc,
    per_row_temperature,
    round_to,
    row_blocking,
    row_offset,
)
from pg_kernels.triton._pair import (
    FINISH_BLOCK_R,
    finalize_kl,
    load_divided,
    merge_row,
    needs_division,
    pair_partials,
    side_is_valid,
)

OP = "kl_divergence"
ROW_STATE = 5  # (m, log s1) of the logits, of the reference, then c = E_w[d_w - d_v]


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_finish_kernel(
    part_ptr, labels_ptr, kl_ptr, st_ptr, N, n_chunks, ignore_index,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: merge each row's chunk states, write kl and the row state."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    keep = rmask
    if HAS_LABELS:
        keep = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64) != ignore_index
    m_w, s_w, m_v, s_v, u, inf = merge_row(part_ptr, rows, rmask, N, n_chunks)
    kl, l_w, l_v, c = finalize_kl(m_w, s_w, m_v, s_v, u, inf)
    nan = float("nan")
    # SideState: (m, log s1) of a side, NaN when that side is invalid.
    ok_w = side_is_valid(m_w)
    ok_v = side_is_valid(m_v)
    m_w, l_w = tl.where(ok_w, m_w, nan), tl.where(ok_w, l_w, nan)
    m_v, l_v = tl.where(ok_v, m_v, nan), tl.where(ok_v, l_v, nan)
    if REVERSE:
        m_p, l_p, m_q, l_q = m_w, l_w, m_v, l_v
    else:
        m_p, l_p, m_q, l_q = m_v, l_v, m_w, l_w
    st = st_ptr + rows * 5
    tl.store(kl_ptr + rows, tl.where(keep, kl, 0.0), mask=rmask)
    tl.store(st + 0, tl.where(keep, m_p, 0.0), mask=rmask)
    tl.store(st + 1, tl.where(keep, l_p, 0.0), mask=rmask)
    tl.store(st + 2, tl.where(keep, m_q, 0.0), mask=rmask)
    tl.store(st + 3, tl.where(keep, l_q, 0.0), mask=rmask)
    tl.store(st + 4, tl.where(keep, tl.where(ok_w & ok_v, c, nan), 0.0), mask=rmask)


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, xr_ptr, labels_ptr, t_ptr, tr_ptr, kl_ptr, st_ptr, gx_ptr, gxr_ptr, V,
    ignore_index, n_inner, s_outer, s_inner, r_n_inner, r_s_outer, r_s_inner,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, NEED_X: tl.constexpr,
    NEED_XR: tl.constexpr, DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): both requested gradients of one chunk of one row."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
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
    x_row = x_ptr + row_offset(row, n_inner, s_outer, s_inner)
    xr_row = xr_ptr + row_offset(row, r_n_inner, r_s_outer, r_s_inner)
    out = row.to(tl.int64) * V  # gradients are fresh contiguous tensors
    nan = tau * 0 + float("nan")
    start = chunk * CHUNK
    for off in range(0, tl.minimum(V - start, CHUNK), BLOCK_V):  # the last chunk can end early
        cols = start + off + tl.arange(0, BLOCK_V)
        in_row = cols < V
        mask = in_row & compute
        zp = load_divided(x_row, cols, mask, tau, DIVIDE)
        zq = load_divided(xr_row, cols, mask, tau_r, DIVIDE)
        if REVERSE:
            zw, zv = zp, zq
        else:
            zw, zv = zq, zp
        dw = zw - m_w
        dv = zv - m_v
        w = exp_acc(tl.maximum(dw - l_w, D_MIN))
        # d/dz_w of sum w (log w - log v) = w_j (log w_j - log v_j - KL) = w_j ((d_w - d_v) - c)
        # (A -inf d_v only meets w_j = 0 here, or a KL = +inf row: replaced, so that -inf - -inf
        # makes no NaN; the result is thrown away there.)
        dv_finite = tl.where(dv == float("-inf"), 0.0, dv)
        grad_w = tl.where(w == 0, 0.0, w * ((dw - dv_finite) - c) * g_w)
        grad_w = tl.where(zero_row, 0.0, tl.where(nan_row | w_nan, nan, grad_w))
        # d/dz_v of -sum w log v = v_j - w_j
        v = exp_acc(tl.maximum(dv - l_v, D_MIN))
        grad_v = tl.where(zero_row, 0.0, tl.where(nan_row, nan, (v - w) * g_v))
        if REVERSE:
            grad_x, grad_xr = grad_w, grad_v
        else:
            grad_x, grad_xr = grad_v, grad_w
        if NEED_X:
            tl.store(gx_ptr + out + cols, round_to(grad_x, gx_ptr.dtype.element_ty), mask=in_row)
        if NEED_XR:
            tl.store(gxr_ptr + out + cols, round_to(grad_xr, gxr_ptr.dtype.element_ty), mask=in_row)


def kl_divergence_forward(
    logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, reverse, n_inner, stride_outer, stride_inner,
    ref_n_inner, ref_stride_outer, ref_stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """(kl [N], row_state [N, 5]); the signature of pg_kernels._C.kl_divergence_forward.
    _block_v, _chunk: private overrides of the row blocking (tests and tuning only)."""
    V = logits.shape[-1]
    n = logits.numel() // V if V else 0
    acc = acc_dtype_of(logits.dtype)
    kl = torch.empty(n, dtype=acc, device=logits.device)
    state = torch.empty(n, ROW_STATE, dtype=acc, device=logits.device)
    if n == 0:
        return kl, state
    t = per_row_temperature(temperature, temperature_scalar, n, acc, logits.device)
    tr = per_row_temperature(ref_temperature, ref_temperature_scalar, n, acc, logits.device)
    layout = (n_inner, stride_outer, stride_inner)
    ref_layout = (ref_n_inner, ref_stride_outer, ref_stride_inner)
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    divide = needs_division(
        temperature, temperature_scalar, ref_temperature, ref_temperature_scalar
    )
    if reverse:  # the weight side first
        part = pair_partials(
            logits, ref_logits, labels, t, tr, ignore_index, layout, ref_layout, blk, divide
        )
    else:
        part = pair_partials(
            ref_logits, logits, labels, tr, t, ignore_index, ref_layout, layout, blk, divide
        )
    _fwd_finish_kernel[(triton.cdiv(n, FINISH_BLOCK_R),)](
        part, labels if labels is not None else kl, kl, state, n, blk.n_chunks, ignore_index,
        HAS_LABELS=labels is not None, REVERSE=bool(reverse), BLOCK_R=FINISH_BLOCK_R,
        num_warps=4,
    )  # fmt: skip
    return kl, state


def kl_divergence_backward(
    grad_kl, logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, reverse, kl, row_state, need_logits_grad,
    need_ref_grad, n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer,
    ref_stride_inner, *, _block_v=None, _chunk=None,
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
    acc = acc_dtype_of(logits.dtype)
    t = per_row_temperature(temperature, temperature_scalar, n, acc, logits.device)
    tr = per_row_temperature(ref_temperature, ref_temperature_scalar, n, acc, logits.device)
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    divide = needs_division(
        temperature, temperature_scalar, ref_temperature, ref_temperature_scalar
    )
    _bwd_kernel[(n, blk.n_chunks)](
        grad_kl, logits, ref_logits, labels if labels is not None else kl, t, tr, kl, row_state,
        grad if need_logits_grad else grad_ref, grad_ref if need_ref_grad else grad, V,
        ignore_index, n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer,
        ref_stride_inner, HAS_LABELS=labels is not None, REVERSE=bool(reverse),
        NEED_X=bool(need_logits_grad), NEED_XR=bool(need_ref_grad),
        DIVIDE=divide,
        CHUNK=blk.chunk, BLOCK_V=blk.block_v, num_warps=blk.num_warps,
    )  # fmt: skip
    return grad, grad_ref
