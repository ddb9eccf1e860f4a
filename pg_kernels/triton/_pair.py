"""The pair pass of kl_divergence and mismatch_stats in Triton (PairState in softmax_stats.h).

A row of a weight side z_w and of another side z_v (z = x / tau) are read together. The row is
cut as `row_blocking` cuts it (a function of V and the dtype only) and `pair_chunk_kernel`, grid
(N, n_chunks), reduces one chunk per program, BLOCK_V entries per loop step, into the chunk's
    m_w, s1_w = sum e^{d_w},  m_v, s1_v = sum e^{d_v},  u = sum e^{d_w} (d_w - d_v),  inf
(d = z - m, m = the chunk's max of z). The state is kept per accumulator lane (`_pair_lanes`:
FOLD neighbours of one 16-byte vector share a lane, so nothing leaves a thread inside the loop):
each lane has its own running max per side and rescales itself when it rises (branchless, one
exp per lane and side per step). After the loop one cross-lane merge (`_side_total`: the chunk
max, each lane moved to it, plain sums) gives the chunk state. No division per element: the
exponent of an entry is one fma x k - r with k = log2(e) / tau and r = (lane max) k, whose
rounding r cancels exactly in the merge, so the error is relative to z - m, not to z.
u takes d_w - d_v from exact differences of the logits at temperature 1, from the exponents
otherwise (each rounded relative to z - m, as z = x / tau itself would be relative to z).
A chunk's sums are relative to a / tau, a = (x_max / tau rounded) * tau rounded: the raw logit
the backward rebuilds from the saved max (`row_exponent`), usually x_max itself, so that the
backward's d_w - d_v and the forward's c = E_w[d_w - d_v] cancel exactly at a shared max
(relative to the rounded max instead, they were ulp(z) / 2 apart: a gradient of -2.0e-3 where
the truth is 0, two one-hot rows at tau 0.07). The lane holding a chunk's max adds that entry
back as exactly 2^{(x_max - a) k} (1 when a = x_max), not as 2^-rho 2^rho rounded: a one-hot
row sums to exactly 1 (its KL was 6e-8 where the truth is 0).
A term with v_j = 0 (x_v = -inf) under x_w > -inf makes u infinite or NaN: the chunk's `inf`
flag (its u is stored as 0). A side holding a NaN or +inf has a NaN sum, hence a NaN max; the
two sides stay independent, so a broken rollout row leaves the logits' normalizer intact.

The chunk's state goes to `partials` [PARTIAL, n_chunks, N] (chunk-major: the merge reads
consecutive rows), and the op's finish kernel merges each row's chunks in chunk order with
`merge_row`: a fixed order, elementwise over rows, so results are deterministic and batch
invariant. Partial-state traffic is 32 (fp32) or 64 (fp64) bytes per chunk and row (each side's max
carries its e = a / tau - max into the merges): V = 151936 bf16 has 10 chunks per row, 320 B
against 608 KiB of logits read.

GPU design (sm_90, compiled offline by .ci/check_triton_sm90.py; not yet timed on a GPU): the
hot loop's SASS instructions per element pair, before (one block max, three block sums and a
merge per step: 8 block reductions, 24 BAR + 54 SHFL per step) -> after (no BAR, no SHFL):
    bf16  43.8 -> 19.1 at tau = 1,  74.8 -> 17.4 with a temperature;  74 / 64 registers
    fp16  42.8 -> 18.3,             73.8 -> 17.2;                      64 registers
    fp32  59.6 -> 18.0,             90.5 -> 15.8 (budget 40 per fp32 pair); 48 registers
Full blocks are loaded unmasked (block i + 1 before block i is reduced; the last step reloads
its own block rather than masking, whose fill values cost an instruction per element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    D_MIN,
    INTERPRETED,
    LOG2E,
    div_acc,
    exp_acc,
    max_nan,
    row_offset,
)

LN2 = tl.constexpr(0.6931471805599453)

# Fields of a chunk's partial state: m_w, s1_w, m_v, s1_v, u, inf (0 or 1), eps_w, eps_v.
PARTIAL = 8
# Rows per program of the finish kernels: they move ~32 bytes per (row, chunk).
FINISH_BLOCK_R = 128


@triton.jit
def load_divided(row_ptr, cols, mask, tau, DIVIDE: tl.constexpr):
    """z = x / tau in tau's dtype, -inf outside the mask. DIVIDE is False only when every
    temperature is exactly 1 (x / 1 is x: the same bits without the division)."""
    x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tau.dtype)
    if DIVIDE:
        return div_acc(x, tau)
    else:
        return x


@triton.jit
def _rescale_factor(m_old, e_old, m_new, e_new):
    """(shift, factor) moving a side's sums from max m_old to m_new >= m_old: (m_old - m_new,
    e^{shift}); (0, 0) for an empty side (m_old = -inf has zero sums and nothing to shift).
    The sums are relative to m + e (`_side_total`), so the shift carries e_old - e_new (0 for
    the state holding the joint max)."""
    has = m_old != float("-inf")
    # Both operands replaced where empty: -inf - -inf would be NaN (and a numpy warning).
    shift = (tl.where(has, m_old, 0.0) - tl.where(has, m_new, 0.0)) + tl.where(
        has, e_old - e_new, 0.0
    )
    return shift, tl.where(has, exp_acc(shift), 0.0)


@triton.jit
def merge_pair(m_w, s_w, m_v, s_v, u, inf, e_w, e_v, bm_w, bs_w, bm_v, bs_v, bu, binf, be_w,
               be_v):  # fmt: skip
    """merge_pair of softmax_stats.h, elementwise: both states rescaled to the joint maxes.

        u <- e^{D_w} (u + (D_w - D_v) s1_w)   per state, D = m_state - m_joint
    A NaN max (a broken side) makes that side's sums and u NaN, never the other side's sums.
    e_w, e_v: each side's sums are relative to m + e (`_side_total`); e goes with its max.
    """
    new_w = max_nan(m_w, bm_w)
    new_v = max_nan(m_v, bm_v)
    ne_w = tl.where(bm_w > m_w, be_w, e_w)
    ne_v = tl.where(bm_v > m_v, be_v, e_v)
    dw_a, aw = _rescale_factor(m_w, e_w, new_w, ne_w)
    dv_a, av = _rescale_factor(m_v, e_v, new_v, ne_v)
    dw_b, bw = _rescale_factor(bm_w, be_w, new_w, ne_w)
    dv_b, bv = _rescale_factor(bm_v, be_v, new_v, ne_v)
    u = aw * (u + (dw_a - dv_a) * s_w) + bw * (bu + (dw_b - dv_b) * bs_w)
    s_w = aw * s_w + bw * bs_w
    s_v = av * s_v + bv * bs_v
    return new_w, s_w, new_v, s_v, u, tl.maximum(inf, binf), ne_w, ne_v


@triton.jit
def fma_acc(a, b, c):
    """a * b + c rounded once, as the GPU's fma. The interpreter rounds the product first (an
    error of ulp(a * b), not of the result): there, fp32 operands are multiplied in fp64 (exact)
    and added in fp64, so that CPU tests see the GPU's rounding."""
    if INTERPRETED and a.dtype == tl.float32:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def exp_base(t):
    """The exponential of the lane arithmetic: 2^t in fp32 (t carries log2(e), one MUFU.EX2),
    e^t in fp64 (t in natural units: Triton has no fast fp64 exp2)."""
    if t.dtype == tl.float64:
        return tl.exp(t)
    else:
        return tl.exp2(t)


@triton.jit
def lane_scale(tau, DIVIDE: tl.constexpr):
    """K: the factor from a raw logit difference to the exponent's units, log2(e) / tau (fp32)
    or 1 / tau (fp64), rounded once. NaN for a temperature that is not finite and > 0 (a NaN
    row, as x / tau would give; the ops reject such temperatures on the host)."""
    if tau.dtype == tl.float64:
        base = tau * 0 + 1.0
    else:
        base = tau * 0 + LOG2E
    if DIVIDE:
        k = div_acc(base, tau)
        return tl.where((tau > 0) & (tau < float("inf")), k, float("nan"))
    else:
        return base


@triton.jit
def lane_floor(k):
    """The lanes' starting max: finite (an all -inf lane computes no -inf - -inf), below every
    logit that can matter, and (floor - x) * k stays finite. A lane whose logits all lie below
    it (|x| > 1e38 / k in fp32) counts as empty."""
    if k.dtype == tl.float64:
        big = -1e300
    else:
        big = -1e38
    return big / tl.maximum(k, 1.0)


@triton.jit
def row_exponent(m, log_s1, tau, DIVIDE: tl.constexpr):
    """(a, k, b) with (x - a) * k - b = (x / tau - a / tau - log_s1) * base, the exponent of a
    probability e^{z - a / tau - log s1} from a raw logit x (base = log2 e in fp32, 1 in fp64),
    with no division per element: a = m tau rounded, the row's max logit (or within an ulp of
    it), so x - a is exact or rounded relative to itself, k = base / tau and b = log s1 base.
    The pair pass sums relative to this same a / tau (`_side_total`), not to the rounded m: an
    entry at the max gets exponent -log s1 exactly, and the errors are relative to |z - m| and
    |log s1|, never to |z|. Without DIVIDE: a = m."""
    k = lane_scale(tau, DIVIDE)
    if DIVIDE:
        a = m * tau
        if m.dtype == tl.float64:
            b = log_s1
        else:
            b = log_s1 * LOG2E
    else:
        a = m
        b = log_s1 * k
    return a, k, b


@triton.jit
def _pair_lanes(xw, xv, kw, kv, mw, mv, rw, rv, sw, sv, u, DIVIDE: tl.constexpr):
    """One block of [LANES, FOLD] logits of each side (raw, in the accumulation dtype, -inf where
    masked) into the per-lane state; FOLD neighbours of one 16-byte vector share a lane, so
    every reduction here stays inside a thread.

    Lane state: mw, mv = running max of the raw logits (monotone in z = x / tau, tau > 0);
    rw, rv = their exponents m * k (k = log2(e) / tau, rounded: every exponent below is
    relative to this r, and r cancels exactly in the chunk merge); sw, sv = sums of 2^t with
    t = x k - r (one fma, its rounding relative to t); u = sum 2^{t_w} (d_w - d_v), in nats
    (without DIVIDE: d_w - d_v = (x_w - x_v) - (m_w - m_v), exact differences of 16-bit logits,
    rounded once relative to the result) or in exponent units (DIVIDE: t_w - t_v, each t
    rounded relative to itself, i.e. to z - m, not z). A term with x_w finite and x_v = -inf
    (w_j > 0 = v_j) makes u +inf or NaN: the chunk's `inf` flag. Rescaling a lane to a higher
    max is branchless: 2^{delta}, delta = 0 once the lane's max has settled.
    """
    mw_new = tl.maximum(mw, tl.max(xw, 1))
    mv_new = tl.maximum(mv, tl.max(xv, 1))
    rw_new = mw_new * kw
    rv_new = mv_new * kv
    dw = rw - rw_new
    dv = rv - rv_new
    aw = exp_base(dw)
    av = exp_base(dv)
    ew = exp_base(fma_acc(xw, kw, -rw_new[:, None]))
    tv = fma_acc(xv, kv, -rv_new[:, None])
    ev = exp_base(tv)
    if DIVIDE:
        diff = fma_acc(xw, kw, -rw_new[:, None]) - tv
        shift = dw - dv
    else:
        diff = (xw - xv) - (mw_new - mv_new)[:, None]
        shift = (mw - mw_new) - (mv - mv_new)
    # x_w = -inf: diff = -inf (or NaN with x_v = -inf too) meets e_w = 0; the floor makes the
    # term 0. Written as a select, which drops NaN on the GPU and in the interpreter alike.
    diff = tl.where(diff > D_MIN, diff, D_MIN)
    u = aw * (u + shift * sw) + tl.sum(ew * diff, 1)
    sw = aw * sw + tl.sum(ew, 1)
    sv = av * sv + tl.sum(ev, 1)
    return mw_new, mv_new, rw_new, rv_new, sw, sv, u


@triton.jit
def _side_total(m, r, s, k, tau, floor, DIVIDE: tl.constexpr):
    """One side of a chunk from its lanes: (max in z units, raw max, lane -> chunk exponent,
    2^exponent, sum, e: the sums are relative to mz + e, e = 0 without DIVIDE)."""
    mc = tl.max(m, 0)
    if DIVIDE:
        mz = div_acc(mc, tau)
        # The chunk's sums are relative to a / tau, a = mz tau rounded: the raw logit the
        # backward rebuilds from the saved mz (row_exponent), usually x_max itself. e = a / tau
        # - mz, the shift from mz to that reference, goes with mz into the merges.
        a = mz * tau
        e = div_acc(-fma_acc(mz, tau, -a), tau)
    else:
        mz = mc
        a = mc
        e = mc * 0
    c = fma_acc(-a, k, r)  # r - a k in one rounding: the lane's r cancels exactly
    # An empty lane (still at the floor) adds nothing; its r is ~1e38, rounded by ~1e31.
    f = tl.where(m == floor, 0.0, exp_base(c))
    # A lane holding the chunk max summed that entry as E = 2^rho (rho = m k - r, the rounding
    # of r) and f E, 2^-rho 2^rho rounded, is 1 - 2^-24 as often as 1: a one-hot row's KL came
    # out 6e-8 where the truth and plain PyTorch have 0. Its term is taken out of the lane sum
    # (the loop's own E, bitwise) and added back as 2^{(m - a) k}, exactly 1 when a = x_max.
    top = (m == mc) & (m != floor)
    e_top = exp_base(fma_acc(m, k, -tl.where(top, r, m * k)))
    one = exp_base(tl.where(top, m - a, 0.0) * k)
    total = tl.sum(tl.where(top, (s - e_top) * f + one, f * s), 0)
    return mz, mc, c, f, total, e


@triton.jit(do_not_specialize=["ignore_index"])
def pair_chunk_kernel(
    xw_ptr, xv_ptr, labels_ptr, tw_ptr, tv_ptr, part_ptr, V, N, ignore_index,
    w_n_inner, w_s_outer, w_s_inner, v_n_inner, v_s_outer, v_s_inner,
    HAS_LABELS: tl.constexpr, DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    FOLD: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the pair state of one chunk of one row, into part_ptr
    [PARTIAL, n_chunks, N]. Ignored rows read nothing and store the empty state."""
    LANES: tl.constexpr = BLOCK_V // FOLD
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    keep = row >= 0
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    tau_w = tl.load(tw_ptr + row)
    tau_v = tl.load(tv_ptr + row)
    ACC: tl.constexpr = tau_w.dtype
    kw = lane_scale(tau_w, DIVIDE)
    kv = lane_scale(tau_v, DIVIDE)
    w_row = xw_ptr + row_offset(row, w_n_inner, w_s_outer, w_s_inner)
    v_row = xv_ptr + row_offset(row, v_n_inner, v_s_outer, v_s_inner)
    floor_w = lane_floor(kw)
    floor_v = lane_floor(kv)
    mw = tl.zeros([LANES], ACC) + floor_w
    mv = tl.zeros([LANES], ACC) + floor_v
    rw = mw * kw
    rv = mv * kv
    sw = tl.zeros([LANES], ACC)
    sv = tl.zeros([LANES], ACC)
    u = tl.zeros([LANES], ACC)
    start = chunk * CHUNK
    # Only the steps inside the row run (the last chunk can end early); none for ignored rows.
    n_valid = tl.where(keep, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    offs = tl.arange(0, LANES)[:, None] * FOLD + tl.arange(0, FOLD)[None, :]
    # Block i + 1 is loaded before block i is reduced (a block always in flight). Full blocks
    # need no bounds mask; the uniform flag (the last prefetch loads nothing) keeps the loads
    # vectorized.
    nxt_w = tl.load(w_row + start + offs, mask=n_full > 0, other=float("-inf"))
    nxt_v = tl.load(v_row + start + offs, mask=n_full > 0, other=float("-inf"))
    last = start + (n_full - 1) * BLOCK_V
    for i in range(0, n_full):
        xw = nxt_w.to(ACC)
        xv = nxt_v.to(ACC)
        # The last step prefetches its own block again: always in bounds, so no mask (whose
        # fill values cost an instruction per element).
        col = tl.minimum(start + (i + 1) * BLOCK_V, last)
        nxt_w = tl.load(w_row + col + offs)
        nxt_v = tl.load(v_row + col + offs)
        mw, mv, rw, rv, sw, sv, u = _pair_lanes(xw, xv, kw, kv, mw, mv, rw, rv, sw, sv, u, DIVIDE)
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        cols = start + n_full * BLOCK_V + offs
        xw = tl.load(w_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        xv = tl.load(v_row + cols, mask=cols < V, other=float("-inf")).to(ACC)
        mw, mv, rw, rv, sw, sv, u = _pair_lanes(xw, xv, kw, kv, mw, mv, rw, rv, sw, sv, u, DIVIDE)
    # One cross-lane merge per chunk: each lane moved to the chunk's max (merge_pair per lane).
    m_w, mc_w, cw, fw, s_w, e_w = _side_total(mw, rw, sw, kw, tau_w, floor_w, DIVIDE)
    m_v, mc_v, cv, fv, s_v, e_v = _side_total(mv, rv, sv, kv, tau_v, floor_v, DIVIDE)
    if DIVIDE:
        u = tl.sum(fw * (u + (cw - cv) * sw), 0)
        if ACC != tl.float64:
            u = u * LN2  # exponent units (log2) -> nats
    else:
        u = tl.sum(fw * (u + ((mw - mc_w) - (mv - mc_v)) * sw), 0)
    # u is +inf or NaN iff some x_w > -inf has x_v = -inf (or a side is NaN, which wins).
    inf = tl.where((u == u) & (tl.abs(u) < float("inf")), 0.0, 1.0).to(ACC)
    u = tl.where(inf > 0, 0.0, u)
    nan = float("nan")
    # A NaN or +inf logit makes that side's sum NaN (a NaN max or inf - inf): the side is NaN.
    # A side with no logit above the floor (all -inf) is empty: max -inf, sums 0.
    m_w = tl.where(s_w != s_w, nan, tl.where(mc_w == floor_w, float("-inf"), m_w))
    m_v = tl.where(s_v != s_v, nan, tl.where(mc_v == floor_v, float("-inf"), m_v))
    idx = chunk.to(tl.int64) * N + row
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(part_ptr + idx, m_w)
    tl.store(part_ptr + plane + idx, s_w)
    tl.store(part_ptr + 2 * plane + idx, m_v)
    tl.store(part_ptr + 3 * plane + idx, s_v)
    tl.store(part_ptr + 4 * plane + idx, u)
    tl.store(part_ptr + 5 * plane + idx, inf)
    # A side that is empty or NaN has no residual to carry (and e would be NaN).
    tl.store(part_ptr + 6 * plane + idx, tl.where(side_is_valid(m_w), e_w, 0.0))
    tl.store(part_ptr + 7 * plane + idx, tl.where(side_is_valid(m_v), e_v, 0.0))


@triton.jit
def merge_row(part_ptr, rows, rmask, N, n_chunks):
    """The merged pair state of `rows` from their n_chunks partial states, in chunk order (its
    sums relative to (m tau rounded) / tau: what `row_exponent` rebuilds from m)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    m_w = tl.full(rows.shape, float("-inf"), ACC)
    m_v = tl.full(rows.shape, float("-inf"), ACC)
    s_w = tl.zeros(rows.shape, ACC)
    s_v = tl.zeros(rows.shape, ACC)
    u = tl.zeros(rows.shape, ACC)
    inf = tl.zeros(rows.shape, ACC)
    e_w = tl.zeros(rows.shape, ACC)
    e_v = tl.zeros(rows.shape, ACC)
    plane = n_chunks.to(tl.int64) * N
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        idx = chunk_off + rows
        chunk_off += N
        m_w, s_w, m_v, s_v, u, inf, e_w, e_v = merge_pair(
            m_w, s_w, m_v, s_v, u, inf, e_w, e_v,
            tl.load(part_ptr + idx, mask=rmask, other=float("-inf")),
            tl.load(part_ptr + plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 2 * plane + idx, mask=rmask, other=float("-inf")),
            tl.load(part_ptr + 3 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 4 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 5 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 6 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 7 * plane + idx, mask=rmask, other=0.0),
        )  # fmt: skip
    return m_w, s_w, m_v, s_v, u, inf


@triton.jit
def side_is_valid(m):
    return (m > float("-inf")) & (m < float("inf"))


@triton.jit
def finalize_kl(m_w, s_w, m_v, s_v, u, inf):
    """KL(w || v) of a merged state (finalize_kl in softmax_stats.h): NaN if a side is invalid
    (all -inf, NaN or +inf), +inf if some w_j > 0 has v_j = 0, else u / s1_w - log s1_w +
    log s1_v clamped at 0. Also returns log s1 of each side and c = u / s1_w (the backward's
    shift; kl_grad_shift), from a dummy state for an invalid side (no log(0) or 0 / 0)."""
    ok_w = side_is_valid(m_w)
    ok_v = side_is_valid(m_v)
    valid = ok_w & ok_v
    # Each side is replaced on its own: a broken rollout row keeps the logits' log s1 exact.
    s_w = tl.where(ok_w, s_w, 1.0)
    s_v = tl.where(ok_v, s_v, 1.0)
    l_w = tl.log(s_w)
    l_v = tl.log(s_v)
    c = div_acc(u, s_w)
    kl = tl.maximum(c - l_w + l_v, 0.0)
    kl = tl.where(inf > 0, float("inf"), kl)
    return tl.where(valid, kl, float("nan")), l_w, l_v, c


def pair_partials(
    xw, xv, labels, tau_w, tau_v, ignore_index, w_layout, v_layout, blocking, divide
) -> torch.Tensor:
    """Launch `pair_chunk_kernel` over N rows of V; returns partials [PARTIAL, n_chunks, N]."""
    V = xw.shape[-1]
    N = tau_w.numel()
    part = torch.empty((PARTIAL, blocking.n_chunks, N), dtype=tau_w.dtype, device=xw.device)
    pair_chunk_kernel[(N, blocking.n_chunks)](
        xw, xv, labels if labels is not None else tau_w, tau_w, tau_v, part, V, N, ignore_index,
        *w_layout, *v_layout,
        HAS_LABELS=labels is not None, DIVIDE=divide, CHUNK=blocking.chunk,
        BLOCK_V=blocking.block_v, FOLD=lane_fold(xw.dtype, blocking.block_v),
        num_warps=blocking.num_warps,
    )  # fmt: skip
    return part


def lane_fold(dtype: torch.dtype, block_v: int) -> int:
    """Elements per accumulator lane: one 16-byte vector (8 bf16 / fp16, 4 fp32, 2 fp64)."""
    return max(1, min(16 // dtype.itemsize, block_v))


def needs_division(temperature, temperature_scalar, other_temperature, other_scalar) -> bool:
    """False only when both temperatures are the scalar 1: then z = x and no division runs."""
    return not (
        temperature is None
        and other_temperature is None
        and temperature_scalar == 1.0
        and other_scalar == 1.0
    )
