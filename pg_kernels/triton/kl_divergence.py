"""kl_divergence in Triton (docs/math.md §4), with the C++ launchers' interface.

Forward, two kernels: the pair pass (`_pair.pair_chunk_kernel`, grid (N, n_chunks); weight
side w = p for reverse KL(p || q), w = q for forward KL(q || p)), then `_fwd_finish_kernel`,
which merges each row's chunk states in chunk order and writes kl and the row state (m, log s1)
of each side plus c = E_w[d_w - d_v] (SideState / kl_grad_shift of the C++ kernel).
Backward, one kernel `_bwd_kernel`, grid (N, n_chunks): recomputes w_j and v_j from the saved
row state and writes each requested gradient once:
    grad_w = g / tau_w * w_j ((d_w - d_v) - c),  0 where w_j = 0
    grad_v = g / tau_v * (v_j - w_j)   (fp32 logits: w_j expm1(delta) where the two are close)
Rows whose weight side has a dominant entry (w_j > 1/2, rest below 2^-7) are written by a second
launch of the same kernel (DOMINANT_ROWS, one program per row, `_dominant_row`), which writes
that entry's grad_w as minus the sum of the row's others where that is the more accurate form:
the direct form rounds at ulp of the log-ratio there (1e-6 off on a one-hot row, where plain
fp32 PyTorch is ~0), as the C++ kernel does; a vocab-parallel shard's others include those on
the other ranks (`outside_terms`, from pg_kernels.parallel's merge). The blocking depends on V
and the dtype only and every reduction runs in a fixed order: deterministic and batch
invariant.

Bytes per row of V elements of s bytes (the minimum: both rows read once; the gradient written):
  forward   2 V s read (0 for an ignored row) + 32 n_chunks bytes of partial state written and
            read back + 6 numbers out.
  backward  2 V s read + V s per requested gradient written.
Checked under TRITON_INTERPRET=1 on CPU tensors (the test suite); timed on an H200
(benchmarks/results/cuda-h200).

GPU design (sm_90, compiled offline by .ci/check_triton_sm90.py): the forward's pair pass keeps
per-lane state with one merge per chunk (see triton/_pair.py for its counts). The backward
divides nothing per element (`_bwd_block`: e^{d} = 2^{(x - a) k} relative to the row max, with
1 / s1, c and g / tau folded into per-row factors, no selects per element), loads the full
blocks of computed rows without masks and stores the other rows' constant in a second loop.
Hot-loop SASS instructions per element pair, both gradients (one gradient), at tau = 1 and
with a temperature alike:
    bf16  19.3 (13.4)    fp16  19.3 (13.4)    fp32  28.8-29.2 (12.6-12.8)
(with the cap of the log-ratio, `log_ratio_cap`: one FMNMX per pair, which `_common.widen`
paid for in bf16; 18.3 (12.4) fp16 and 28.6 (11.8) fp32 without it; first version 33.9 (24.2)
bf16 at tau = 1, 64.5 (55.2) with a temperature; fp32 17.6 before the other side's series,
`_bwd_block`'s SERIES, 32-40 registers, no spills). The dominant rows' loop (DOMINANT_ROWS, its
own budget in .ci/check_triton_sm90.py): 23.6-23.9 (18.1) bf16 / fp16, 32.4-33.1 (16.9-17.9)
fp32, 29.4 (23.6) on bf16 rows that start at odd elements. In the same kernel as the main
loop it had made that loop 1.8 instructions per pair dearer on rows that start at odd elements
(22.1 -> 23.9, over the budget of 23): a launch of its own leaves the main loop as it was.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    LOG2E,
    acc_dtype_of,
    bounded_log_ratio,
    cdiv,
    dense_row_offset,
    div_acc,
    exp_acc,
    expm1_acc,
    log_ratio_cap,
    per_row_temperature,
    round_to,
    row_blocking,
    row_offset,
    rows_align,
    widen,
)
from pg_kernels.triton._pair import (
    DOMINANT_LOG_S1,
    FINISH_BLOCK_R,
    LN2,
    finalize_kl,
    fma_acc,
    has_other_series,
    log_s1_difference,
    merge_row,
    needs_division,
    other_side_difference,
    others_add,
    others_column,
    others_total,
    others_zeros,
    pair_excess,
    pair_exps,
    pair_partials,
    reference_shift,
    row_exponent,
    side_is_valid,
)

OP = "kl_divergence"
ROW_STATE = 5  # (m, log s1) of the logits, of the reference, then c = E_w[d_w - d_v]


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_finish_kernel(
    part_ptr, x_ptr, labels_ptr, tw_ptr, tv_ptr, kl_ptr, st_ptr, N, n_chunks, ignore_index,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, DIVIDE: tl.constexpr,
    EXCESS: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: merge each row's chunk states, write kl and the row state
    (tw_ptr, tv_ptr: the weight and the other side's temperatures; x_ptr: the logits, for their
    dtype). EXCESS: the partials carry k (`_pair.pair_excess`)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    keep = rmask
    if HAS_LABELS:
        keep = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64) != ignore_index
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = merge_row(part_ptr, rows, rmask, N, n_chunks, EXCESS)
    dw = reference_shift(m_w, e_w, tl.load(tw_ptr + rows, mask=rmask, other=1.0), DIVIDE, XDT)
    dv = reference_shift(m_v, e_v, tl.load(tv_ptr + rows, mask=rmask, other=1.0), DIVIDE, XDT)
    kl, l_w, l_v, c = finalize_kl(m_w, r_w, m_v, r_v, u, inf, dw, dv, k, EXCESS)
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
def _bwd_block(xw, xv, a_w, k_w, a_v, k_v, f_wr, f_wc, f_vv, f_d, f_vw, dl_u, r_hi,
               DIVIDE: tl.constexpr, SERIES: tl.constexpr):  # fmt: skip
    """Both gradients of one block from the raw logits of each side.

    e_w = 2^{p_w}, p_w = (x_w - a_w) k_w: e^{d_w} relative to the row max (`row_exponent`'s a),
    rounded relative to d_w, not to log w_j = d_w - log s1_w; likewise e_v. The row's 1 / s1, c
    and g / tau are folded into the factors (`_bwd_factors`):
        w_j s_w ((d_w - d_v) - c) = e_w (r f_wr - f_wc),  r = d_w - d_v in the exponents' units
        (v_j - w_j) s_v = (e_v - e_w) f_vv - e_w f_d
    each probability then carries plain softmax's rounding, eps (|d| + 1), not eps |log p|
    (fp32 [2, 40]: 7.5e-8 off where plain PyTorch was 3.1e-8), and the normalizers never cancel
    (f_d). r: without DIVIDE (x_w - a_w) - (x_v - a_v), exact differences of the logits rounded
    relative to the result (the one-pass bound of the tests); with DIVIDE p_w - p_v, each p
    rounded relative to d, not to z. r_hi: the cap of r (`log_ratio_cap` of f_wr).
    SERIES (fp32 logits, `has_other_series`): where the two sides are close, (v_j - w_j) s_v =
    e_w f_vw expm1(delta) instead (`other_side_difference`, y = r + dl_u, f_vw = s_v / s1_w,
    dl_u = log s1_v - log s1_w in r's units): the difference of the two exps carried each one's
    rounding, a few ulps of w_j, into a result that near-equal rows cancel to ~w_j |delta|.
    """
    ACC: tl.constexpr = f_vv.dtype
    ew, ev, r = pair_exps(widen(xw, ACC), widen(xv, ACC), a_w, a_v, k_w, k_v, DIVIDE, False)
    # Where w_j = 0 (x_w = -inf) r is -inf or NaN: floored, so the product is 0 (r > -150 log2
    # units wherever e_w > 0, far above the floor). x_v = -inf under w_j > 0 is a KL = +inf
    # row, NaN through f_wr. Where w_j underflowed to 0 against a finfo.min fill, r is +inf or
    # near the float range: capped (`log_ratio_cap`), so the product is 0 there too.
    grad_w = ew * fma_acc(bounded_log_ratio(r, r_hi), f_wr, -f_wc)
    grad_v = fma_acc(ev - ew, f_vv, -(ew * f_d))
    if SERIES:
        grad_v = other_side_difference(ew * f_vw, r + dl_u, grad_v, DIVIDE)
    return grad_w, grad_v, ew


@triton.jit
def _bwd_factors(l_w, l_v, dl, c, s_w, s_v, DIVIDE: tl.constexpr):
    """(f_wr, f_wc, f_vv, f_d, f_vw) of `_bwd_block`, s = g / tau of a gradient's side: f_ww =
    s_w / s1_w, f_wr = f_ww in r's units (ln 2 per log2 unit with DIVIDE in fp32), f_wc = c f_ww,
    f_vv = s_v / s1_v and f_d = s_v / s1_w - f_vv = f_vv expm1(dl), dl = log s1_v - log s1_w,
    so that the other side's v_j - w_j never cancels the two normalizers (at a shared max
    e_v = e_w = 1 and v_j - w_j = -f_d alone: a near one-hot row's s1 = 1 + 1e-5 left that
    difference to the rounding of e^{dl} = 1 + 1e-5, 5 % off); f_vw = s_v / s1_w = f_vv + f_d.
    A vocab-parallel shard's row state (pg_kernels.parallel) carries log s1 minus the log of the
    shard's mass, hundreds where that side's mass lies on other ranks: there e^{-l_v} is 0 and
    e^{dl} overflows, so beyond dl = 64 (e^{-l_v} below 2^-92 of e^{-l_w}) f_d is s_v / s1_w -
    f_vv itself (was 0 * inf: NaN gradient rows). r_hi: `_bwd_block`'s cap of r."""
    inv_s1_w = exp_acc(-l_w)
    f_ww = s_w * inv_s1_w
    f_vv = s_v * exp_acc(-l_v)
    f_wr = f_ww
    if DIVIDE:
        if f_ww.dtype != tl.float64:
            f_wr = f_ww * LN2
    f_d = tl.where(dl > 64.0, s_v * inv_s1_w - f_vv, f_vv * expm1_acc(tl.minimum(dl, 64.0)))
    return f_wr, c * f_ww, f_vv, f_d, f_vv + f_d, log_ratio_cap(f_wr)


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, xr_ptr, labels_ptr, t_ptr, tr_ptr, kl_ptr, st_ptr, out_ptr, gx_ptr, gxr_ptr,
    V, ignore_index, n_inner, s_outer, s_inner, r_n_inner, r_s_outer, r_s_inner,
    HAS_LABELS: tl.constexpr, REVERSE: tl.constexpr, NEED_X: tl.constexpr,
    NEED_XR: tl.constexpr, DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr, DOMINANT: tl.constexpr, DOMINANT_ROWS: tl.constexpr,
    OUTSIDE: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): both requested gradients of one chunk of one row. No division per
    element; the row cases (ignored or zero upstream: 0, NaN row: NaN, KL = +inf: the weight
    side NaN) are folded into the two factors s_w = g / tau_w and s_v = g / tau_v. ALIGN: every
    row's (`rows_align`).
    DOMINANT (whole rows, the weight side's gradient asked for): rows whose weight side has a
    dominant entry (`DOMINANT_LOG_S1`) are left to a second launch with DOMINANT_ROWS, grid
    (N, 1), whose program writes such a row whole (`_dominant_row`); its other programs return
    at once. Their loop is not in the other launch's kernel, whose hot loop stays as it was.
    OUTSIDE: the rows are vocab-parallel shards; out_ptr [N, 2] holds the sum and summed size
    of each row's weight-side terms w_j ((d_w,j - d_v,j) - KL) on the other ranks."""
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
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    x_row = x_ptr + row_offset(row, n_inner, s_outer, s_inner, ALIGN)
    xr_row = xr_ptr + row_offset(row, r_n_inner, r_s_outer, r_s_inner, ALIGN)
    if REVERSE:
        w_row, v_row = x_row, xr_row
    else:
        w_row, v_row = xr_row, x_row
    a_w, k_w, _ = row_exponent(m_w, l_w, t_w, w_row, V, DIVIDE, XDT, BLOCK_V)
    a_v, k_v, _ = row_exponent(m_v, l_v, t_v, v_row, V, DIVIDE, XDT, BLOCK_V)
    k_w = tl.where(compute, k_w, 0.0)
    k_v = tl.where(compute, k_v, 0.0)
    # c is relative to the a / tau `row_exponent` rebuilds (`reference_shift`): at a shared max
    # p_w - p_v and c cancel exactly. log s1_v - log s1_w as KL - c, two small numbers where
    # the rows are near-equal (the C++ kernel's dl), or from the logs (`log_s1_difference`: a
    # KL = +inf row, whose other side is still exact, or one of ~1e29).
    dl = tl.where(compute, log_s1_difference(kl, c, l_w, l_v), 0.0)
    f_wr, f_wc, f_vv, f_d, f_vw, r_hi = _bwd_factors(l_w, l_v, dl, c, s_w, s_v, DIVIDE)
    SERIES: tl.constexpr = has_other_series(XDT)
    dl_u = dl  # in `_bwd_block`'s r units: log2 with DIVIDE in fp32, else nats
    if SERIES and DIVIDE:
        dl_u = dl * LOG2E
    out = dense_row_offset(row, V, ALIGN)  # gradients are fresh contiguous tensors
    dominant = row < 0
    if DOMINANT:
        dominant = compute & (l_w < DOMINANT_LOG_S1)
    if DOMINANT_ROWS:
        if dominant:
            o_sum = tl.zeros([], s_w.dtype)
            o_size = o_sum
            if OUTSIDE:
                o_row = out_ptr + row.to(tl.int64) * 2
                o_sum, o_size = s_w * tl.load(o_row), tl.abs(s_w) * tl.load(o_row + 1)
            _dominant_row(x_row, xr_row, gx_ptr + out, gxr_ptr + out, V, l_w, a_w, k_w, a_v,
                          k_v, f_wr, f_wc, f_vv, f_d, f_vw, dl_u, r_hi, o_sum, o_size, REVERSE,
                          NEED_X, NEED_XR, DIVIDE, SERIES, BLOCK_V)  # fmt: skip
        return
    compute = compute & ~dominant  # written by the DOMINANT_ROWS launch
    start = chunk * CHUNK
    n_valid = tl.minimum(V - start, CHUNK)  # the last chunk can end early
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    # Full blocks of computed rows: no masks (a masked load's fill values and predicates cost
    # ~0.6 instructions per element pair here). Other rows read nothing: their gradient is a
    # constant, 0 or NaN, stored by the second loop.
    for i in range(0, tl.where(compute, n_full, 0)):
        cols = start + i * BLOCK_V + lanes
        xp = tl.load(x_row + cols)
        xq = tl.load(xr_row + cols)
        _bwd_store(xp, xq, gx_ptr + out + cols, gxr_ptr + out + cols, a_w, k_w, a_v, k_v, f_wr,
                   f_wc, f_vv, f_d, f_vw, dl_u, r_hi, None, REVERSE, NEED_X, NEED_XR, DIVIDE,
                   SERIES)  # fmt: skip
    constant = tl.zeros([BLOCK_V], f_vv.dtype) + tl.where(nan_row, nan, 0.0)
    for i in range(0, tl.where(compute | dominant, 0, n_full)):
        cols = start + i * BLOCK_V + lanes
        if NEED_X:
            tl.store(gx_ptr + out + cols, round_to(constant, gx_ptr.dtype.element_ty))
        if NEED_XR:
            tl.store(gxr_ptr + out + cols, round_to(constant, gxr_ptr.dtype.element_ty))
    if (n_full * BLOCK_V < n_valid) & ~dominant:
        cols = start + n_full * BLOCK_V + lanes
        in_row = cols < V
        xp = tl.load(x_row + cols, mask=in_row & compute, other=0.0)
        xq = tl.load(xr_row + cols, mask=in_row & compute, other=0.0)
        _bwd_store(xp, xq, gx_ptr + out + cols, gxr_ptr + out + cols, a_w, k_w, a_v, k_v, f_wr,
                   f_wc, f_vv, f_d, f_vw, dl_u, r_hi, in_row, REVERSE, NEED_X, NEED_XR, DIVIDE,
                   SERIES)  # fmt: skip


@triton.jit
def _bwd_store(xp, xq, gx, gxr, a_w, k_w, a_v, k_v, f_wr, f_wc, f_vv, f_d, f_vw, dl_u, r_hi, mask,
               REVERSE: tl.constexpr, NEED_X: tl.constexpr, NEED_XR: tl.constexpr,
               DIVIDE: tl.constexpr, SERIES: tl.constexpr):  # fmt: skip
    """Stores the requested gradients of one block; returns the weight side's (before its
    rounding to the gradient's dtype) and its e_w, for `_dominant_row`."""
    if REVERSE:
        grad_w, grad_v, ew = _bwd_block(
            xp, xq, a_w, k_w, a_v, k_v, f_wr, f_wc, f_vv, f_d, f_vw, dl_u, r_hi, DIVIDE, SERIES
        )
        grad_x, grad_xr = grad_w, grad_v
    else:
        grad_w, grad_v, ew = _bwd_block(
            xq, xp, a_w, k_w, a_v, k_v, f_wr, f_wc, f_vv, f_d, f_vw, dl_u, r_hi, DIVIDE, SERIES
        )
        grad_x, grad_xr = grad_v, grad_w
    if NEED_X:
        tl.store(gx, round_to(grad_x, gx.dtype.element_ty), mask=mask)
    if NEED_XR:
        tl.store(gxr, round_to(grad_xr, gxr.dtype.element_ty), mask=mask)
    return grad_w, ew


@triton.jit
def _dominant_row(x_row, xr_row, gx, gxr, V, l_w, a_w, k_w, a_v, k_v, f_wr, f_wc, f_vv, f_d, f_vw,
                  dl_u, r_hi, o_sum, o_size, REVERSE: tl.constexpr, NEED_X: tl.constexpr,
                  NEED_XR: tl.constexpr, DIVIDE: tl.constexpr, SERIES: tl.constexpr,
                  BLOCK_V: tl.constexpr):  # fmt: skip
    """Both requested gradients of a whole row whose weight side has a dominant entry (w_j >
    1/2, rest below 2^-7), that entry's weight-side gradient then written again as minus the
    sum of the row's others where that is the more accurate form.

    The gradient sums to 0 over a whole row (sum_j w_j (delta_j - c) = c - c). At the dominant
    entry the direct form w_j ((d_w - d_v) - c) cancels to ~rest x |delta| (0 for a one-hot
    row) below the rounding of delta_j and c at ulp(|delta|): 1.1e-7 off where plain fp32
    PyTorch, whose w_j rounds to 1, is ~0. The others' errors are relative to themselves. The
    criterion is the C++ kernel's (`kl_backward_row`): 32 times the others' summed size below
    the direct form's rounding scale w_j (|delta_j| + |c|) |g / tau_w| (where both sides share
    the argmax, delta_j ~ 0 and the direct form is exact to ~eps c). The others sum in the
    lanes (the dominant entry's own term left out, each lane's step where it met it kept),
    then across them in fp64, with a vocab-parallel shard's others on other ranks (o_sum,
    o_size: their sum and summed size, times g / tau_w; 0 for whole rows)."""
    ACC: tl.constexpr = f_vv.dtype
    lanes = tl.arange(0, BLOCK_V)
    others, size, at = others_zeros(ACC, BLOCK_V)
    half_s1 = 0.5 * exp_acc(l_w)  # e_w above it: w_j > 1/2
    n_full = V // BLOCK_V
    for i in range(0, n_full):
        cols = i * BLOCK_V + lanes
        grad_w, ew = _bwd_store(
            tl.load(x_row + cols), tl.load(xr_row + cols), gx + cols, gxr + cols, a_w, k_w, a_v,
            k_v, f_wr, f_wc, f_vv, f_d, f_vw, dl_u, r_hi, None, REVERSE, NEED_X, NEED_XR, DIVIDE,
            SERIES,
        )  # fmt: skip
        top = ew > half_s1
        others, size, at = others_add(others, size, at, grad_w, top, top, i)
    if n_full * BLOCK_V < V:
        cols = n_full * BLOCK_V + lanes
        in_row = cols < V
        xp = tl.load(x_row + cols, mask=in_row, other=0.0)
        xq = tl.load(xr_row + cols, mask=in_row, other=0.0)
        grad_w, ew = _bwd_store(xp, xq, gx + cols, gxr + cols, a_w, k_w, a_v, k_v, f_wr, f_wc,
                                f_vv, f_d, f_vw, dl_u, r_hi, in_row, REVERSE, NEED_X, NEED_XR,
                                DIVIDE, SERIES)  # fmt: skip
        top = in_row & (ew > half_s1)
        others, size, at = others_add(others, size, at, grad_w, top, top | ~in_row, n_full)
    col = others_column(at, BLOCK_V)
    tl.debug_barrier()  # the rewrite after the loop's store of the same address by another thread
    if col >= 0:
        if REVERSE:
            xw, xv, gw = tl.load(x_row + col), tl.load(xr_row + col), gx + col
        else:
            xw, xv, gw = tl.load(xr_row + col), tl.load(x_row + col), gxr + col
        ew, _, r = pair_exps(widen(xw, ACC), widen(xv, ACC), a_w, a_v, k_w, k_v, DIVIDE, False)
        scale = ew * (tl.abs(r * f_wr) + tl.abs(f_wc))
        total, better = others_total(others, size, scale, o_sum, o_size)
        if better:
            tl.store(gw, round_to(-total, gw.dtype.element_ty))


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
    _fwd_finish_kernel[(cdiv(n, FINISH_BLOCK_R),)](
        part, logits, labels if labels is not None else kl, t if reverse else tr,
        tr if reverse else t, kl, state, n, blk.n_chunks, ignore_index,
        HAS_LABELS=labels is not None,
        REVERSE=bool(reverse), DIVIDE=divide, EXCESS=pair_excess(logits.dtype),
        BLOCK_R=FINISH_BLOCK_R, num_warps=4,
    )  # fmt: skip
    return kl, state


def kl_divergence_backward(
    grad_kl, logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, reverse, kl, row_state, need_logits_grad,
    need_ref_grad, outside_terms, n_inner, stride_outer, stride_inner, ref_n_inner,
    ref_stride_outer, ref_stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """(grad_logits, grad_ref_logits), empty where not requested; as the C++ launcher.
    outside_terms [N, 2] or None: a vocab-parallel shard's rows, the sum and summed size of each
    row's weight-side terms on the other ranks (`_dominant_row`); None: whole rows."""
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
    dominant = bool(need_logits_grad if reverse else need_ref_grad)
    for rows in (False, True) if dominant else (False,):
        _bwd_kernel[(n, 1 if rows else blk.n_chunks)](
            grad_kl, logits, ref_logits, labels if labels is not None else kl, t, tr, kl,
            row_state, outside_terms if outside_terms is not None else kl,
            grad if need_logits_grad else grad_ref,
            grad_ref if need_ref_grad else grad, V, ignore_index, n_inner, stride_outer,
            stride_inner, ref_n_inner, ref_stride_outer, ref_stride_inner,
            HAS_LABELS=labels is not None, REVERSE=bool(reverse), NEED_X=bool(need_logits_grad),
            NEED_XR=bool(need_ref_grad), DIVIDE=divide,
            CHUNK=blk.chunk, BLOCK_V=blk.block_v,
            ALIGN=rows_align((logits, n_inner, stride_outer, stride_inner),
                             (ref_logits, ref_n_inner, ref_stride_outer, ref_stride_inner), grad,
                             grad_ref),
            # OUTSIDE only where it is read: the main launch's code is the same either way.
            DOMINANT=dominant, DOMINANT_ROWS=rows, OUTSIDE=rows and outside_terms is not None,
            num_warps=blk.num_warps,
        )  # fmt: skip
    return grad, grad_ref
