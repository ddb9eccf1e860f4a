"""The pair pass of kl_divergence and mismatch_stats in Triton (PairState in softmax_stats.h).

A row of a weight side z_w and of another side z_v (z = x / tau, one IEEE division, like the
reference and the C++ kernels) are read together. The row is cut as `row_blocking` cuts it
(a function of V and the dtype only) and `pair_chunk_kernel`, grid (N, n_chunks), reduces one
chunk per program, BLOCK_V entries per loop step. Per step: each side's block max, one exp per
element of each side, and three block sums
    s1_w = sum e^{d_w},  s1_v = sum e^{d_v},  u = sum e^{d_w} (d_w - d_v),   d = z - max,
relative to the block's maxes, merged into the chunk's running state (`merge_pair`: the SPEC
section 1 rule). A term with v_j = 0 < w_j sets the `inf` flag instead of entering u. A side
holding a NaN or +inf is marked by a NaN max (counted explicitly: a GPU max may drop NaN); the
two sides stay independent, so a broken rollout row leaves the logits' normalizer intact.

The chunk's state goes to `partials` [PARTIAL, n_chunks, N] (chunk-major: the merge reads
consecutive rows), and the op's finish kernel merges each row's chunks in chunk order with
`merge_row`: a fixed order, elementwise over rows, so results are deterministic and batch
invariant. Partial-state traffic is 24 (fp32) or 48 (fp64) bytes per chunk and row: V = 151936
bf16 has 10 chunks per row, 240 B against 608 KiB of logits read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import D_MIN, div_acc, exp_acc, max_nan, row_offset

# Fields of a chunk's partial state: m_w, s1_w, m_v, s1_v, u, inf (0 or 1).
PARTIAL = 6
# Rows per program of the finish kernels: they move ~24 bytes per (row, chunk).
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
def _rescale_factor(m_old, m_new):
    """(shift, factor) moving a side's sums from max m_old to m_new >= m_old: (m_old - m_new,
    e^{shift}); (0, 0) for an empty side (m_old = -inf has zero sums and nothing to shift)."""
    has = m_old != float("-inf")
    # Both operands replaced where empty: -inf - -inf would be NaN (and a numpy warning).
    shift = tl.where(has, m_old, 0.0) - tl.where(has, m_new, 0.0)
    return shift, tl.where(has, exp_acc(shift), 0.0)


@triton.jit
def merge_pair(m_w, s_w, m_v, s_v, u, inf, bm_w, bs_w, bm_v, bs_v, bu, binf):
    """merge_pair of softmax_stats.h, elementwise: both states rescaled to the joint maxes.

        u <- e^{D_w} (u + (D_w - D_v) s1_w)   per state, D = m_state - m_joint
    A NaN max (a broken side) makes that side's sums and u NaN, never the other side's sums.
    """
    new_w = max_nan(m_w, bm_w)
    new_v = max_nan(m_v, bm_v)
    dw_a, aw = _rescale_factor(m_w, new_w)
    dv_a, av = _rescale_factor(m_v, new_v)
    dw_b, bw = _rescale_factor(bm_w, new_w)
    dv_b, bv = _rescale_factor(bm_v, new_v)
    u = aw * (u + (dw_a - dv_a) * s_w) + bw * (bu + (dw_b - dv_b) * bs_w)
    s_w = aw * s_w + bw * bs_w
    s_v = av * s_v + bv * bs_v
    return new_w, s_w, new_v, s_v, u, tl.maximum(inf, binf)


@triton.jit(do_not_specialize=["ignore_index"])
def pair_chunk_kernel(
    xw_ptr, xv_ptr, labels_ptr, tw_ptr, tv_ptr, part_ptr, V, N, ignore_index,
    w_n_inner, w_s_outer, w_s_inner, v_n_inner, v_s_outer, v_s_inner,
    HAS_LABELS: tl.constexpr, DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the pair state of one chunk of one row, into part_ptr
    [PARTIAL, n_chunks, N]. Ignored rows read nothing and store the empty state."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    keep = row >= 0
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    tau_w = tl.load(tw_ptr + row)
    tau_v = tl.load(tv_ptr + row)
    w_row = xw_ptr + row_offset(row, w_n_inner, w_s_outer, w_s_inner)
    v_row = xv_ptr + row_offset(row, v_n_inner, v_s_outer, v_s_inner)
    zero = tau_w * 0
    m_w, s_w, m_v, s_v, u, inf = zero - float("inf"), zero, zero - float("inf"), zero, zero, zero
    bad_w = 0  # NaN / +inf entries of each side: that side is NaN
    bad_v = 0
    start = chunk * CHUNK
    # Only the steps inside the row run (the last chunk can end early); none for ignored rows.
    n_cols = tl.where(keep, tl.minimum(V - start, CHUNK), 0)
    for off in range(0, n_cols, BLOCK_V):
        cols = start + off + tl.arange(0, BLOCK_V)
        mask = (cols < V) & keep
        zw = load_divided(w_row, cols, mask, tau_w, DIVIDE)
        zv = load_divided(v_row, cols, mask, tau_v, DIVIDE)
        bad_w += tl.sum(((zw != zw) | (zw == float("inf"))).to(tl.int32), 0)
        bad_v += tl.sum(((zv != zv) | (zv == float("inf"))).to(tl.int32), 0)
        bm_w = tl.max(zw, 0)
        bm_v = tl.max(zv, 0)
        # An all -inf block side subtracts 0 instead of -inf (keeps d = -inf, e = 0, no NaN).
        dw = tl.maximum(zw - tl.where(bm_w == float("-inf"), 0.0, bm_w), D_MIN)
        dv = zv - tl.where(bm_v == float("-inf"), 0.0, bm_v)  # not clamped: real log-ratios
        ew = exp_acc(dw)
        ev = exp_acc(tl.maximum(dv, D_MIN))
        v_zero = dv == float("-inf")
        b_inf = tl.max((v_zero & (ew > 0)).to(tau_w.dtype), 0)
        b_u = tl.sum(ew * tl.where(v_zero, 0.0, dw - dv), 0)
        m_w, s_w, m_v, s_v, u, inf = merge_pair(
            m_w, s_w, m_v, s_v, u, inf, bm_w, tl.sum(ew, 0), bm_v, tl.sum(ev, 0), b_u, b_inf
        )
    nan = zero + float("nan")
    idx = chunk.to(tl.int64) * N + row
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(part_ptr + idx, tl.where(bad_w > 0, nan, m_w))
    tl.store(part_ptr + plane + idx, s_w)
    tl.store(part_ptr + 2 * plane + idx, tl.where(bad_v > 0, nan, m_v))
    tl.store(part_ptr + 3 * plane + idx, s_v)
    tl.store(part_ptr + 4 * plane + idx, u)
    tl.store(part_ptr + 5 * plane + idx, inf)


@triton.jit
def merge_row(part_ptr, rows, rmask, N, n_chunks):
    """The merged pair state of `rows` from their n_chunks partial states, in chunk order."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    m_w = tl.full(rows.shape, float("-inf"), ACC)
    m_v = tl.full(rows.shape, float("-inf"), ACC)
    s_w = tl.zeros(rows.shape, ACC)
    s_v = tl.zeros(rows.shape, ACC)
    u = tl.zeros(rows.shape, ACC)
    inf = tl.zeros(rows.shape, ACC)
    plane = n_chunks.to(tl.int64) * N
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        idx = chunk_off + rows
        chunk_off += N
        m_w, s_w, m_v, s_v, u, inf = merge_pair(
            m_w, s_w, m_v, s_v, u, inf,
            tl.load(part_ptr + idx, mask=rmask, other=float("-inf")),
            tl.load(part_ptr + plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 2 * plane + idx, mask=rmask, other=float("-inf")),
            tl.load(part_ptr + 3 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 4 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 5 * plane + idx, mask=rmask, other=0.0),
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
        BLOCK_V=blocking.block_v, num_warps=blocking.num_warps,
    )  # fmt: skip
    return part


def needs_division(temperature, temperature_scalar, other_temperature, other_scalar) -> bool:
    """False only when both temperatures are the scalar 1: then z = x and no division runs."""
    return not (
        temperature is None
        and other_temperature is None
        and temperature_scalar == 1.0
        and other_scalar == 1.0
    )
