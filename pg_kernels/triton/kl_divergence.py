"""kl_divergence in Triton (docs/math.md §4), with the C++ launchers' interface.

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
  forward   2 V s read (0 for an ignored row) + 32 n_chunks bytes of partial state written and
            read back + 6 numbers out.
  backward  2 V s read + V s per requested gradient written.
Checked under TRITON_INTERPRET=1 on CPU tensors (the test suite); not yet run or timed on a GPU.

GPU design (sm_90, compiled offline by .ci/check_triton_sm90.py): the forward's pair pass keeps
per-lane state with one merge per chunk (see triton/_pair.py for its counts). The backward
divides nothing per element (`_pair.row_exponent`: w_j = 2^{(x - a) k - b} relative to the row
max) and folds the row cases into two factors (no selects per element). Hot-loop SASS
instructions per element pair, both gradients (one gradient), before -> after:
    bf16  33.9 (24.2) -> 19.9 (15.0) at tau = 1,  64.5 (55.2) -> 19.9 (16.0) with a temperature
    fp16  32.9 (23.0) -> 18.9 (14.0),             63.3 (54.2) -> 18.9 (15.0)
    fp32  35.0 (22.9) -> 18.9 (14.0),             62.4 (54.8) -> 18.9 (14.6)
with 40-56 registers (32 for one gradient).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    D_MIN,
    acc_dtype_of,
    div_acc,
    per_row_temperature,
    round_to,
    row_blocking,
    row_offset,
)
from pg_kernels.triton._pair import (
    FINISH_BLOCK_R,
    LN2,
    exp_base,
    finalize_kl,
    fma_acc,
    merge_row,
    needs_division,
    pair_partials,
    row_exponent,
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


@triton.jit
def _bwd_block(xw, xv, a_w, k_w, b_w, a_v, k_v, b_v, c_shift, s_w, s_v, DIVIDE: tl.constexpr):
    """Both gradients of one block from the raw logits of each side.

    w_j = 2^{t_w}, t_w = (x_w - a_w) k_w - b_w (`row_exponent`), and likewise v_j. The weight
    side needs (d_w - d_v) - c: without DIVIDE (x_w - m_w) - (x_v - m_v) - c, exact differences
    of the logits rounded relative to the result (the one-pass bound of the tests); with DIVIDE
    (t_w - t_v) ln 2 - (c - l_w + l_v), each t rounded relative to log w_j, not to z.
    """
    ACC: tl.constexpr = s_w.dtype
    dxw = xw.to(ACC) - a_w
    dxv = xv.to(ACC) - a_v
    tw = fma_acc(dxw, k_w, -b_w)
    tv = fma_acc(dxv, k_v, -b_v)
    w = exp_base(tw)
    v = exp_base(tv)
    if DIVIDE:
        if ACC == tl.float64:
            shifted = (tw - tv) - c_shift
        else:
            shifted = fma_acc(tw - tv, c_shift * 0 + LN2, -c_shift)
    else:
        shifted = (dxw - dxv) - c_shift
    # d/dz_w of sum w (log w - log v) = w_j ((d_w - d_v) - c). Where w_j = 0 (x_w = -inf) the
    # difference is -inf or NaN: floored (a select, NaN-free on the GPU and the interpreter).
    # x_v = -inf under w_j > 0 is a KL = +inf row, NaN through s_w.
    shifted = tl.where(shifted > D_MIN, shifted, D_MIN)
    grad_w = (w * s_w) * shifted
    # d/dz_v of -sum w log v = v_j - w_j
    grad_v = (v - w) * s_v
    return grad_w, grad_v


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, xr_ptr, labels_ptr, t_ptr, tr_ptr, kl_ptr, st_ptr, gx_ptr, gxr_ptr, V,
    ignore_index, n_inner, s_outer, s_inner, r_n_inner, r_s_outer, r_s_inner,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, NEED_X: tl.constexpr,
    NEED_XR: tl.constexpr, DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): both requested gradients of one chunk of one row. No division per
    element; the row cases (ignored or zero upstream: 0, NaN row: NaN, KL = +inf: the weight
    side NaN) are folded into the two factors s_w = g / tau_w and s_v = g / tau_v."""
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
    nan = float("nan")
    s_w = tl.where(
        zero_row, 0.0, tl.where(nan_row | w_nan, nan, div_acc(g, t_w))
    )  # d/dx = d/dz / tau
    s_v = tl.where(zero_row, 0.0, tl.where(nan_row, nan, div_acc(g, t_v)))
    # Rows not computed read no logits (0 in their place) and see w = v = 1: 0 or NaN out.
    m_w, l_w = tl.where(compute, m_w, 0.0), tl.where(compute, l_w, 0.0)
    m_v, l_v = tl.where(compute, m_v, 0.0), tl.where(compute, l_v, 0.0)
    c = tl.where(compute & (kl < big), c, 0.0)
    a_w, k_w, b_w = row_exponent(m_w, l_w, t_w, DIVIDE)
    a_v, k_v, b_v = row_exponent(m_v, l_v, t_v, DIVIDE)
    k_w, b_w = tl.where(compute, k_w, 0.0), tl.where(compute, b_w, 0.0)
    k_v, b_v = tl.where(compute, k_v, 0.0), tl.where(compute, b_v, 0.0)
    if DIVIDE:
        # t_w - t_v = ((d_w - d_v) - l_w + l_v) log2 e, d = z - a / tau: the reference the
        # pair pass summed relative to (row_exponent), so c cancels exactly at a shared max.
        c_shift = c - l_w + l_v
    else:
        c_shift = c
    x_row = x_ptr + row_offset(row, n_inner, s_outer, s_inner)
    xr_row = xr_ptr + row_offset(row, r_n_inner, r_s_outer, r_s_inner)
    out = row.to(tl.int64) * V  # gradients are fresh contiguous tensors
    start = chunk * CHUNK
    n_valid = tl.minimum(V - start, CHUNK)  # the last chunk can end early
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    for i in range(0, n_full):
        cols = start + i * BLOCK_V + lanes
        # A uniform mask: the loads stay vectorized.
        xp = tl.load(x_row + cols, mask=compute, other=0.0)
        xq = tl.load(xr_row + cols, mask=compute, other=0.0)
        _bwd_store(xp, xq, gx_ptr + out + cols, gxr_ptr + out + cols, a_w, k_w, b_w, a_v, k_v,
                   b_v, c_shift, s_w, s_v, cols >= 0, REVERSE, NEED_X, NEED_XR, DIVIDE)  # fmt: skip
    if n_full * BLOCK_V < n_valid:
        cols = start + n_full * BLOCK_V + lanes
        in_row = cols < V
        xp = tl.load(x_row + cols, mask=in_row & compute, other=0.0)
        xq = tl.load(xr_row + cols, mask=in_row & compute, other=0.0)
        _bwd_store(xp, xq, gx_ptr + out + cols, gxr_ptr + out + cols, a_w, k_w, b_w, a_v, k_v,
                   b_v, c_shift, s_w, s_v, in_row, REVERSE, NEED_X, NEED_XR, DIVIDE)  # fmt: skip


@triton.jit
def _bwd_store(xp, xq, gx, gxr, a_w, k_w, b_w, a_v, k_v, b_v, c_shift, s_w, s_v, mask,
               REVERSE: tl.constexpr, NEED_X: tl.constexpr, NEED_XR: tl.constexpr,
               DIVIDE: tl.constexpr):  # fmt: skip
    if REVERSE:
        grad_w, grad_v = _bwd_block(xp, xq, a_w, k_w, b_w, a_v, k_v, b_v, c_shift, s_w, s_v, DIVIDE)
        grad_x, grad_xr = grad_w, grad_v
    else:
        grad_w, grad_v = _bwd_block(xq, xp, a_w, k_w, b_w, a_v, k_v, b_v, c_shift, s_w, s_v, DIVIDE)
        grad_x, grad_xr = grad_v, grad_w
    if NEED_X:
        tl.store(gx, round_to(grad_x, gx.dtype.element_ty), mask=mask)
    if NEED_XR:
        tl.store(gxr, round_to(grad_xr, gxr.dtype.element_ty), mask=mask)


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
