"""step_stats in Triton (docs/math.md §9), with the C++ launchers' interface: token_stats of the
logits, the exact mismatch KL(pi_roll || pi_theta) and TV against the rollout logits, and the KL
to a reference (reverse or forward), from one read of each logits tensor.

Forward:
  1. `_fwd_chunk_kernel`, grid (N, n_chunks), the blocking and lane layout of token_stats'
     forward (`token_stats._forward_blocking`, [U, LANES, VEC] per step, bf16 pairs): program
     (r, k) reads chunk k of row r of the logits and, when given (constexpr flags), of the
     rollout and the reference logits, each element once. Per element one exp per tensor; the
     logits' e = 2^d2 (token_stats' `lane_exps`, relative to each lane's running max) feeds
     token_stats' sums (`add_exps`) and the logits' side of both pairs:
         rollout pair (w = roll, v = logits):   s_r += e_r,  u_r += e_r (t_r - t_p)
         reference, reverse (w = logits, v = q): s_q += e_q,  u_q += e_p (t_p - t_q)
                    forward (w = q, v = logits): s_q += e_q,  u_q += e_q (t_q - t_p)
     Every pair side forms its exponents t = x k - r in one rounding (`fma_acc`; `_pair`'s
     units: log2 in fp32, natural in fp64, `exp_base`), so equal rows at equal temperatures get
     equal exps bitwise (not `_pair`'s (x - m) k: the logits' side shares its fma and exp with
     token_stats' sums). The logits' side (t_p, e_p, sums s_p) is
     token_stats' d2 and e in fp32 on a GPU (the same fma and exp after CSE); under the
     interpreter, whose tl.fma rounds x c first, and in fp64 it is formed on its own. With both
     temperatures of a pair exactly 1 (no division), or one and the same temperature on 16-bit
     logits (`OWN_R` / `OWN_Q` False), the other side is framed on the logits' lanes:
     t = (x + d) k - r_p, d = the lanes' max difference (`_framed_exps`; x + d is exact for
     16-bit logits), so a row that differs from the logits by a constant gets their exponents
     bitwise. A lane whose d is far beyond its own scale (the logits masked there with a huge
     finite fill) gives the frame up, and its chunk is summed again in the side's own frame
     (`_framed_rescale`, `_pair_again`). Each side's lanes
     rescale themselves when their max rises (a pair's u moves by f_w (u + shift s_w),
     docs/math.md §4). After the loop: the token_stats chunk state (`chunk_total`,
     `store_partial`), bitwise the one token_stats' chunk kernel stores, and each pair's chunk
     state in `_pair`'s layout and convention [PARTIAL, n_chunks, N] (`_chunk_side`: sums
     relative to the max logit's own z, that entry exactly 1, each side's s1 - 1 kept apart,
     e = x_max / tau - m carried into the merges; a framed side with its shift d).
  2. `_fwd_finish_kernel`: token_stats' merge (`merge_rows`, so the token fields are bitwise
     those of token_stats), each pair merged with `_pair.merge_row` and finished with
     `finalize_kl` in fp64, log s1 and c moved to `row_exponent`'s a / tau
     (`reference_shift`): token_kl, kl, kl_state = the reference's (m, log s1) and
     c = E_w[d_w - d_v], as the TV pass and the backward rebuild their probabilities.
  3. TV needs both normalizers, known only now: mismatch_stats' second pass over the logits and
     the rollout logits (`_tv_chunk_kernel`, `_tv_finish_kernel`), only with rollout logits.
Backward, one kernel `_bwd_kernel`, grid (N, n_chunks): token_stats' coefficients (`bwd_row`)
plus the KL term, written once per element:
    dz_j = p_j (a + b log p_j + c p_j) + g_l [j = c] + g_kl K_j
    reverse K_j = p_j ((d_j - d_q,j) - c),   forward K_j = p_j - q_j
and the reference's gradient (kl_divergence's) when asked. A row whose g_kl is 0 (or with no
reference) skips the K term and never reads the reference: a NaN teacher row whose KL is not in
the loss leaves the policy's gradient finite. Each row case (ignored, without the K term, with
it) runs its own loop, so no loop carries a per-element select or a masked load. Rows whose KL
weight side (the logits for reverse, the reference for forward) has a dominant entry (w_j >
1/2, rest below 2^-7) are written by a second launch (DOMINANT_ROWS, one program per row,
`_dominant_row`), which writes that entry's K term as minus the sum of the row's others, as
kl_divergence does (its direct form rounds at ulp of the log-ratio: 1.8e-6 off at a spike of
40, where plain fp32 PyTorch reads ~0).

Bytes per row of V elements of s bytes (minimum: each tensor read once, each gradient written
once): forward (1 + [rollout] + [ref]) V s read, + 2 V s more for TV with rollout logits (the
second pass), + (20 + 32 [rollout] + 32 [ref]) n_chunks bytes of partial state written and
read back; backward V s (+ V s of the reference in rows with g_kl != 0) read, V s per requested
gradient written. Every reduction runs in a fixed order and the blocking depends on V and the
dtype only: deterministic and batch invariant. Checked under TRITON_INTERPRET=1 on CPU tensors
and compiled for sm_90 offline (.ci/check_triton_sm90.py); not yet timed on a GPU.

GPU design (sm_90 offline, not timed on a GPU): no spills. Hot-loop SASS instructions per
element triple (forward, budget 30) / pair (backward with the KL term, both gradients, budget
20), worst variant, first version -> now (.ci/check_triton_sm90.py):
    forward  bf16 33.8 -> 28.3, fp16 33.4 -> 27.8, fp32 33.3 -> 27.7 -> 58.0 with the excess
             (fp32 only, below; budget 60) -> 56.2-60.3 with token_stats' s1, s2 in fp64
             (`token_stats.sum_dtype`; the pair's s_p no longer shares s1's adds) -> 52.2-56.1
             with the excess terms' series started at its top coefficient (`_pair.horner`)
             and their far side without a unary minus (4 instructions per triple: Triton's
             -x is 0 - x, an FADD that ptxas cannot fold into the FFMA) -> 56.7-56.9 with
             the own sides' frame offsets (`_frame_offset`: an FADD per element and side)
    backward bf16 28.1 -> 19.6, fp16 27.1 -> 19.9, fp32 26.0 -> 19.1 -> 32.2 with the other
             side's series (fp32 only, `_bwd_values`' SERIES; budget 40) -> 31.2 with the
             weight side's d_p - d_q as one difference (SERIES); fp16 20.0 and fp32 31.6 with
             the fp64 label / argmax entries after the loop (their row numbers recomputed
             there, not kept live through it: kept, one variant read 20.1 and 80 registers);
             fp32 30.8 with the series' Horner start (`_pair.horner`)
The dominant rows' loop (DOMINANT_ROWS, its own budget in .ci/check_triton_sm90.py: the K term
formed alone beside the folded one, element loads, every block masked): 35.6-37.6 per bf16 /
fp16 pair, 43.2-45.2 on bf16 rows that start at odd elements, fp32 50.4-52.2; the main loop as
before (bf16 18.6-19.6, fp16 18.6-20.0, fp32 30.4-31.6).
Forward: unmasked full-step loads (a uniform -inf fill cost a MOV per register: 1.5 per triple)
and the log-ratio floors as tl.maximum (a select became compares whose predicates were packed
into integers and back: ~4 per floor). The pair sides in `_pair`'s convention (the top entry
taken out per chunk, the framed sides' shift d per lane) cost nothing per element (bf16 28.4 ->
28.3 at temperature 1, where the log-ratios are now one difference of exponents instead of
two of raw logits). Registers: bf16 255 / 182-254, fp16 192-255, fp32 187-245 with the excess
(128-204 without; the forward KL
variants at temperature 1 rose from ~200 to 254: the framed sides' d per lane; were 255,
193-255, 128-196 in the first version); the three blocks of a step live together (no
prefetch, unlike token_stats). Backward: the log-ratio's d_p folded into
token_stats' coefficients (reverse: 14 arithmetic instructions per pair instead of 16), the
reference's upstream factor into its log-ratio (forward: 15), one loop per row case, block
addresses from a scalar pointer, bf16 pairs loaded as int32; 48-64 registers (were 53-62;
fp32 48-64 with the series and the weight side's one difference, 40-59 before it, 32-40
without).
Accuracy: fp32 logits sum each pair's excess kx = sum e_w f(delta) too (`_pair.excess_terms`,
moved with the lanes by `_pair.rescale_excess`) and finish near-equal rows from it (a KL of 2e-8
to a near-equal V = 2 teacher: 3.0e-8 -> 1.1e-12 off); a side in its own frame takes the
offset of the two frames' rounding residuals on its lane reference (`_frame_offset`), so that a
shared argmax's log-ratio is ~0 (near one-hot rows at tau 0.7: KLs of ~1e-26 had read 2^-60,
~1e-5 relative since: docs/fidelity.md, finding (8)); what follows is of 16-bit logits, and
was of fp32 before. A KL of 1e-3 between near rows carries the fp32 roundings of both sums through
log s_w - log s_v: on a bf16 V = 7 row under the interpreter s_w and s_v were off by +4.7e-8 and
-4.2e-8 (relative), the KL by 9.1e-8, over tests/test_step_stats.py's 8.7e-8 (the C++ kernel:
6e-9 there); with the pair sides in `_pair`'s convention that row's token_kl is 3.5e-8 off
(plain fp32 PyTorch 2.3e-8), and single-entry rows, rows equal to the rollout (any
temperature) or shifted from it (temperature 1) are exact (tests/test_step_stats.py). Near
rows at |x| ~ 12 (fp32 [8, 3000], rollout noise 0.05, interpreter): token_kl 1.2e-6 -> 8.8e-8
off at tau 1, 1.2e-6 -> 2.2e-7 at 0.7 (plain PyTorch 5.1e-7 / 5.9e-7). A framed side's x + d
is exact for 16-bit logits at usual ranges; for fp32 it rounds at ulp(x) / 2, the KL then being
the exact KL of logits that far off. The backward takes d_p from token_stats' d2,
rounded relative to |log p_j| as plain PyTorch's log_softmax (not to |d_p - d_q|): on near
rows (fp32 [8, 3000], q = p + 0.01 noise, tau 1, interpreter) the weight side's gradient error
was 2.8e-8 reverse / 2.4e-8 forward (5.2e-9 before; plain fp32 PyTorch 1.1e-7 / 4.7e-8).
For fp32 logits (SERIES) the weight side now takes r = (x - m) c - (x_q - a_q) k_q, one
difference per element (kl_divergence's `_bwd_block` with a division), -c on token_stats' a:
on near-equal small rows (|z| < 0.03, teacher noise 1e-4, tau 2-20, V 2-5, interpreter) the
folded d_p failed 8 + 8 of 150 draws with the KL alone (reverse 2.8e-9 off where plain PyTorch
was 1.0e-10 on a V = 2 row), 0 + 8 beside token_stats' fields; now 0 of both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton import mismatch_stats as _mismatch
from pg_kernels.triton import token_stats as _token
from pg_kernels.triton._common import (
    D_MIN,
    INTERPRETED,
    LN2,
    LOG2E,
    LOG2E_F64,
    acc_dtype_of,
    acc_of,
    bounded_log_ratio,
    cdiv,
    dense_row_offset,
    div_acc,
    floor_log_ratio,
    log_ratio_cap,
    per_row_temperature,
    round_to,
    row_blocking,
    row_offset,
    rows_align,
    scalar_log2_scale_bits,
    widen,
)
from pg_kernels.triton._pair import (
    DOMINANT_LOG_S1,
    FINISH_BLOCK_R,
    PARTIAL,
    excess_terms,
    exp_base,
    finalize_kl,
    fma_acc,
    has_other_series,
    lane_scale,
    log_s1_difference,
    max_logit,
    merge_row,
    nats_per_unit,
    needs_division,
    other_side_difference,
    others_add,
    others_column,
    others_total,
    others_zeros,
    pair_excess,
    reads_max,
    reference_shift,
    rescale_excess,
    row_exponent,
    side_is_valid,
    store_chunk_state,
    store_tv_frame,
)
from pg_kernels.triton._pair import _shifted_chunk as pair_chunk_again
from pg_kernels.triton._pair import _side_total as pair_side_total
from pg_kernels.triton.token_stats import (
    MOVE_MIN,
    _log2_scale,
    _reference,
    _store_outputs,
    add_exps,
    bwd_exps,
    bwd_row,
    bwd_value64,
    chunk_total,
    far_lane,
    frame,
    lane_exps,
    load_last_step,
    load_step,
    merge_rows,
    rescale_lanes,
    step_halves,
    step_offsets,
    store_entry64,
    store_partial,
    sum_dtype,
)

OP = "step_stats"
KL_STATE = 3  # the reference's (m, log s1) and c = E_w[d_w - d_v] per row
# The backward's floor of a reference logit's difference to its max (-inf there: 0 weight):
# below any real logit difference, and its product with a gradient factor stays finite.
XQ_FLOOR = tl.constexpr(-1e30)
# The floor of the logits' exponent d2 (base 2) where forward KL's teacher gradient
# q_j ((d_q - d_p) - c) weighs it: token_stats' D_MIN (-1100) zeroes p_j but cut a sharp
# policy's d_p (-852 nats, tau 0.095, against a teacher at tau 14.3: a teacher-gradient entry
# 26 % off). Finite, so that a -inf logit keeps e (b d2) = 0 and q_j d2 finite, and small enough
# that b d2 and k_d d2 stay finite for any per-row factor below 1e26.
D2_FAR = tl.constexpr(-(2.0**40))


@triton.jit
def _ln2(x):
    """ln 2 in x's dtype (a bare Python float constant would be an fp32 one: 3e-9 off in fp64)."""
    return tl.full([], LN2, tl.float64).to(x.dtype)


@triton.jit
def _floor_at(d, lo):
    """max(d, lo), NaN -> lo, as `floor_log_ratio`."""
    if INTERPRETED:
        return tl.where(d > lo, d, lo)
    else:
        return tl.maximum(d, lo)


@triton.jit
def _pair_scale(c, tau):
    """A pair side's exponent scale, in `_pair`'s lane units: log2(e) / tau in fp32 (token_stats'
    `_log2_scale`, the logits' c bitwise at the same temperature, so that equal rows form equal
    exponents on every side), 1 / tau in fp64 (`lane_scale`: exps e^t, `exp_base`)."""
    if c.dtype == tl.float64:
        return lane_scale(tau, True)
    else:
        return c


@triton.jit
def _frame_offset(m, k, r, mx, kp, rp):
    """The offset c of an own-frame pair side's lane reference (OFFSET: fp32 with the excess k;
    exponents (x k - r) - c, sums relative to r + c): rho - rho_p, the rounding residuals of
    its frame (rho = m k - r, token_stats' `frame`) and of the logits' lane beside it (rho_p =
    mx kp - rp), each exact (`fma_acc`). Both lanes' maxes then sit at exponents rho_p: where
    the rows share their argmax its log-ratio is ~0 (rho - rho_p, rounded, less c), not the
    frames' difference of ~ulp(m k), whose excess ~2^-37 in a lane's fp32 k, moved out of it
    only at the chunk's end, had rounded away a near one-hot row's KL of ~1e-26 (2^-60 read).
    0 where a lane's frame lies far out (`frame`) or a max is NaN: any c is exact as long as
    every move and the chunk's end take the same one."""
    c = fma_acc(_reference(m), k, -r) - fma_acc(_reference(mx), kp, -rp)
    return tl.where(tl.abs(c) < 1.0, c, 0.0)


@triton.jit
def _side_rescale(xa, xb, k, m, r, s, c, mx, kp, rp, OFFSET: tl.constexpr):
    """A pair side's lanes moved to the block's max, as token_stats' `rescale_lanes` moves the
    logits' (in `_pair`'s units, `exp_base`); with OFFSET, relative to r + `_frame_offset` (c:
    the lanes' offset before the move; mx, rp: the logits' lanes after their own). Returns (m,
    r, s, delta, f = e^delta, the new offset, or c); delta unfloored (the move of the side's
    exponents, for the log-ratios), f = e^max(delta, MOVE_MIN)."""
    bmax = tl.max(tl.max(xa, axis=2), axis=0)
    if xb is not None:
        bmax = tl.maximum(bmax, tl.max(tl.max(xb, axis=2), axis=0))
    m_new = tl.maximum(m, bmax)
    r_new = frame(m_new, k)  # token_stats' frame: far out (finfo.min lanes) it sums exactly 0
    # <= 0: an empty lane (r = 0, sums 0) whose first max is negative adds nothing.
    delta = tl.minimum(r - r_new, 0.0)
    c_new = c
    if OFFSET:  # the offset's move too (|c| < 1 each; also where the logits' lane alone moved)
        c_new = _frame_offset(m_new, k, r_new, mx, kp, rp)
        delta = delta + (c - c_new)
    f = exp_base(tl.maximum(delta, MOVE_MIN))
    return m_new, r_new, f * s, delta, f, c_new


# How far (in units of max(1, |its lane max|)) a framed side's lane may lie from the logits'
# lane before its frame is given up (`_framed_rescale`): rows alike, or a teacher of the same
# scale, stay well inside; a lane masked with -1e4 or -1e30 in the logits only does not.
FRAME_SPAN = tl.constexpr(64.0)


@triton.jit
def _framed_rescale(xa, xb, k, m, d, s, mx, rp_old, rp):
    """A side framed on the logits' lanes (both temperatures exactly 1; `_framed_exps`) moved
    with them to the block's max: its exps e^{(x + d) k - rp} are relative to R = rp - d k,
    d = the logits' lane max - this side's. Returns (m, d, s, f = e^{R_old - R_new}, the move
    of its exponents relative to the logits' pair exponents, d_new - d_old times k)."""
    bmax = tl.max(tl.max(xa, axis=2), axis=0)
    if xb is not None:
        bmax = tl.maximum(bmax, tl.max(tl.max(xb, axis=2), axis=0))
    m_new = tl.maximum(m, bmax)
    d_new = _reference(mx) - _reference(m_new)
    # x + d rounds at ulp(d) and at ulp(x): where the logits' lane lies far from this side's (a
    # lane of either masked with a huge finite fill where the other's is not), its exponents
    # would lose x. Such a lane's d is made NaN, which poisons the side's sums for good (the
    # chunk is then summed again in the side's own frame: `_pair_again`). Measured against the
    # smaller of the two lane maxes: a teacher lane of finfo.min logits beside the logits' 8
    # (|d| ~ 3.4e38, within 64 |its max|) formed exps of ~0 +- 2e31 and a forward KL of +inf
    # where the truth is 48.3 (temperature 1). An empty lane (-inf) keeps its d.
    span = FRAME_SPAN * tl.maximum(tl.minimum(tl.abs(m_new), tl.abs(mx)), 1.0)
    d_new = tl.where(tl.abs(d_new) > span, float("nan"), d_new)
    dd = d_new - d
    # R_old - R_new in one rounding; a lane that was empty has zero sums (any factor would do).
    delta = tl.where(m == float("-inf"), 0.0, fma_acc(dd, k, rp_old - rp))
    f = exp_base(delta)
    return m_new, d_new, f * s, f, dd * k


@triton.jit
def _framed_exps(x, d, k, r):
    """The exponents of a side framed on the logits' lanes (`_framed_rescale`): (x + d) k - r
    with the logits' pair lane reference r, one rounding (`fma_acc`). With d = m_logits -
    m_side exact, a row that differs from the logits' by a constant gets their exponents
    bitwise (x + d is the logit itself), so its sums, KL and TV are exactly theirs."""
    return fma_acc(x + d[None, :, None], k, -r[None, :, None])


@triton.jit
def _add_half(x, xr, xq, c, r2, mx, kp, rp, kr, rr, cr, kq, rq, cq, s1, s2, t2, sp, sr, ur, kx_r,
              sq, uq, kx_q, HAS_ROLL: tl.constexpr, HAS_REF: tl.constexpr,
              REVERSE: tl.constexpr, OWN_R: tl.constexpr, OWN_Q: tl.constexpr,
              EXCESS: tl.constexpr):  # fmt: skip
    """One block (or bf16 half-block) of each tensor into the lanes' sums. Every pair side forms
    its exponents t = x k - r in one rounding (`fma_acc`; exps `exp_base`),
    so that equal rows at equal temperatures get equal exps bitwise on both sides of a pair;
    where OWN_R / OWN_Q is False the other side is framed on the logits' lanes
    (`_framed_exps`, rr / rq its shift d) and rows that differ by a constant match too.
    The logits' pair side (kp, rp, sums sp): in fp32 on a GPU the same fma and exp as
    token_stats' d2 and e (one instruction each after CSE: one exp per element per tensor);
    under the interpreter, whose tl.fma rounds x c first, the GPU's rounding (`fma_acc`), and
    in fp64 natural units (e^t, its own frame rp). Log-ratios are differences of exponents,
    floored (`floor_log_ratio`), in `_pair`'s units. EXCESS: each pair's excess kx too
    (`_pair.excess_terms`, delta = -(t_w - t_v) in nats), and an own side's exponents less its
    lane offset cr / cq (`_frame_offset`: a second rounding, one FADD per element)."""
    _, d2, e = lane_exps(x, c, r2)
    s1, s2, t2 = add_exps(d2, e, s1, s2, t2)
    if HAS_ROLL or HAS_REF:
        t_p = fma_acc(x, kp, -rp[None, :, None])
        e_p = exp_base(tl.maximum(t_p, D_MIN, propagate_nan=tl.PropagateNan.ALL))  # lane_exps' e
        sp += tl.sum(tl.sum(e_p, axis=2), axis=0)
    if HAS_ROLL:  # KL(pi_roll || pi_theta): w = rollout, v = logits
        if OWN_R:
            t_r = fma_acc(xr, kr, -rr[None, :, None])
            if EXCESS:
                t_r = t_r - cr[None, :, None]
        else:
            t_r = _framed_exps(xr, rr, kp, rp)
        e_r = exp_base(t_r)
        sr += tl.sum(tl.sum(e_r, axis=2), axis=0)
        diff = floor_log_ratio(t_r - t_p)
        ur += tl.sum(tl.sum(e_r * diff, axis=2), axis=0)
        if EXCESS:
            kx_r += _excess_sum(e_r, e_p, diff)
    if HAS_REF:
        if OWN_Q:
            t_q = fma_acc(xq, kq, -rq[None, :, None])
            if EXCESS:
                t_q = t_q - cq[None, :, None]
        else:
            t_q = _framed_exps(xq, rq, kp, rp)
        e_q = exp_base(t_q)
        sq += tl.sum(tl.sum(e_q, axis=2), axis=0)
        if REVERSE:  # KL(p || q): w = logits, v = reference
            diff = floor_log_ratio(t_p - t_q)
            uq += tl.sum(tl.sum(e_p * diff, axis=2), axis=0)
            if EXCESS:
                kx_q += _excess_sum(e_p, e_q, diff)
        else:  # KL(q || p): w = reference, v = logits
            diff = floor_log_ratio(t_q - t_p)
            uq += tl.sum(tl.sum(e_q * diff, axis=2), axis=0)
            if EXCESS:
                kx_q += _excess_sum(e_q, e_p, diff)
    return s1, s2, t2, sp, sr, ur, kx_r, sq, uq, kx_q


@triton.jit
def _excess_sum(e_w, e_v, diff):
    """A block's excess terms per lane (`_pair.excess_terms`), diff = t_w - t_v floored."""
    terms = excess_terms(e_w, e_v, diff, True)  # fp32 lanes: log2 units
    return tl.sum(tl.sum(terms, axis=2), axis=0)


@triton.jit
def _other_rescale(xa, xb, k, m, r, s, c, dp, mx, kp, rp_old, rp, OWN: tl.constexpr,
                   OFFSET: tl.constexpr):  # fmt: skip
    """The rollout's or the reference's lanes moved to the block's max: in their own frame
    (`_side_rescale`, with OFFSET relative to r + `_frame_offset`) with OWN, else framed on the
    logits' lanes (`_framed_rescale`, r holding d). Returns (m, r, s, f, the move of its
    exponents relative to the logits' pair exponents, dp = the latter's move, the offset c
    moved with the lanes)."""
    if OWN:
        m, r, s, delta, f, c = _side_rescale(xa, xb, k, m, r, s, c, mx, kp, rp, OFFSET)
        shift = delta - dp
    else:
        m, r, s, f, shift = _framed_rescale(xa, xb, k, m, r, s, mx, rp_old, rp)
    return m, r, s, f, shift, c


@triton.jit
def _step(xa, xb, ra, rb, qa, qb, i, c, kp, kr, kq, mx, r2, s1, s2, t2, st, rp, sp, mr, rr, sr,
          ur, kx_r, cr, mq, rq, sq, uq, kx_q, cq, HAS_ROLL: tl.constexpr, HAS_REF: tl.constexpr,
          REVERSE: tl.constexpr, OWN_R: tl.constexpr, OWN_Q: tl.constexpr,
          EXCESS: tl.constexpr):  # fmt: skip
    """One loop step: every side's lanes moved to their new max (u and the excess kx moved with
    them, `_pair.rescale_excess`), then the block's exps added. xb / rb / qb: the second bf16
    halves, or None. cr / cq: each own side's `_frame_offset` (OWN with EXCESS; else 0, unused),
    carried from step to step."""
    rp_old = rp
    mx, r2, s1, s2, t2, st, _, fp = rescale_lanes(xa, xb, i, c, mx, r2, s1, s2, t2, st)
    # The logits' pair side: token_stats' frame and move in fp32, its own in fp64 (e^t).
    if mx.dtype == tl.float64:
        rp = frame(mx, kp)
        fp = exp_base(tl.maximum(tl.minimum(rp_old - rp, 0.0), MOVE_MIN))
    else:
        rp = r2
    # The move of the logits' pair exponents, unfloored: a log-ratio against them moves by all
    # of it where the other side keeps its mass. (Floored at MOVE_MIN, as the factor fp is, a
    # lane of the logits masked with -1e4 in one step and not in the next lost all but 2048
    # units of its log-ratio: a forward KL to a teacher with mass there of 3.0e28 for 1.7e29.)
    dp = tl.minimum(rp_old - rp, 0.0)
    sp_old = sp
    sp = fp * sp
    # u <- f_w (u + shift s_w) = f_w u + shift (f_w s_w), shift = the move of t_w - t_v.
    if HAS_ROLL:
        sr_old = sr
        mr, rr, sr, fr, shift, cr = _other_rescale(ra, rb, kr, mr, rr, sr, cr, dp, mx, kp,
                                                   rp_old, rp, OWN_R, OWN_R and EXCESS)
        if EXCESS:
            kx_r = _move_excess(kx_r, ur, sr_old, fr, fp, shift)
        ur = tl.fma(shift, sr, fr * ur)
    if HAS_REF:
        sq_old = sq
        mq, rq, sq, fq, shift, cq = _other_rescale(qa, qb, kq, mq, rq, sq, cq, dp, mx, kp,
                                                   rp_old, rp, OWN_Q, OWN_Q and EXCESS)
        if REVERSE:
            if EXCESS:
                kx_q = _move_excess(kx_q, uq, sp_old, fp, fq, -shift)
            uq = tl.fma(-shift, sp, fp * uq)
        else:
            if EXCESS:
                kx_q = _move_excess(kx_q, uq, sq_old, fq, fp, shift)
            uq = tl.fma(shift, sq, fq * uq)
    s1, s2, t2, sp, sr, ur, kx_r, sq, uq, kx_q = _add_half(
        xa, ra, qa, c, r2, mx, kp, rp, kr, rr, cr, kq, rq, cq, s1, s2, t2, sp, sr, ur, kx_r, sq,
        uq, kx_q, HAS_ROLL, HAS_REF, REVERSE, OWN_R, OWN_Q, EXCESS,
    )  # fmt: skip
    if xb is not None:
        s1, s2, t2, sp, sr, ur, kx_r, sq, uq, kx_q = _add_half(
            xb, rb, qb, c, r2, mx, kp, rp, kr, rr, cr, kq, rq, cq, s1, s2, t2, sp, sr, ur, kx_r,
            sq, uq, kx_q, HAS_ROLL, HAS_REF, REVERSE, OWN_R, OWN_Q, EXCESS,
        )  # fmt: skip
    return mx, r2, s1, s2, t2, st, rp, sp, mr, rr, sr, ur, kx_r, cr, mq, rq, sq, uq, kx_q, cq


@triton.jit
def _move_excess(kx, u, s_w, f_w, f_v, shift):
    """A pair's excess moved with its lanes (`_pair.rescale_excess`): s_w and u (in `_pair`'s
    units) before the move, f_w, f_v each side's factor, shift the move of t_w - t_v."""
    unit = nats_per_unit(u, True)
    return rescale_excess(kx, u * unit, s_w, f_w, f_v, shift * -unit)


@triton.jit
def _chunk_side(m, r, s, k, tau, d, off, DIVIDE: tl.constexpr):
    """A pair side's chunk from its lanes, in `_pair`'s convention (`_pair._side_total`: sums
    relative to the max logit's own z, x_max / tau unrounded, that entry exactly 1, kept as
    s1 - 1): (m, the chunk's raw max, each lane's move g to the chunk's reference and
    f = e^g, the rest, e). m = x_max / tau rounded, -inf while empty, NaN when the rest is (a
    NaN or +inf logit). d: the shift of a side framed on the logits' lanes
    (`_framed_rescale`; without DIVIDE z = x and e = 0), whose exponents are of x + d against
    the logits' pair references r, else None: a row that differs from the logits' by a
    constant has mc + d = the logits' mc and their g and rest bitwise. off: an own side's lane
    offsets (`_frame_offset`), its sums relative to r + off, else None."""
    mz, mc, g, f, rest, e = pair_side_total(m, r, s, k, tau, float("-inf"), DIVIDE, False, d,
                                            off)  # fmt: skip
    mz = tl.where(rest != rest, float("nan"), tl.where(mc == float("-inf"), mc, mz))
    return mz, mc, g, f, rest, e


@triton.jit
def _chunk_u(u, m_w, s_w, f_w, g_w, g_v):
    """A pair's chunk u in nats relative to both sides' chunk references (`_chunk_side`) from
    the lanes' u (in `_pair`'s units): the sum of f_w (u + (g_w - g_v) s_w), g = a lane's move
    to its chunk's reference, as `_pair.pair_chunk_kernel`. An empty weight lane adds 0."""
    shift = tl.where(m_w == float("-inf"), 0.0, g_w - g_v)
    u = tl.sum(f_w * (u + shift * s_w), axis=0)
    if u.dtype != tl.float64:
        u = u * _ln2(u)  # log2 units -> nats
    return u


@triton.jit
def _chunk_excess(kx, u, m_w, s_w, f_w, f_v, g_w, g_v):
    """A pair's chunk excess relative to both sides' chunk references, as `_chunk_u` moves u
    (`_pair.pair_chunk_kernel`): each lane's kx moved by `_pair.rescale_excess` (u in `_pair`'s
    units, before the move). An empty weight lane adds its v terms, moved by f_v."""
    unit = nats_per_unit(u, True)
    dd = tl.where(m_w == float("-inf"), 0.0, (g_v - g_w) * unit)
    return tl.sum(rescale_excess(kx, u * unit, s_w, f_w, f_v, dd), axis=0)


@triton.jit
def _store_pair(part_ptr, chunk, row, N, kx, u, lm_w, s_w, f_w, g_w, f_v, g_v, m_w, r_w, e_w,
                m_v, r_v, e_v, w_row, v_row, start, n_valid, tau_w, tau_v, DIVIDE: tl.constexpr,
                EXCESS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
                BLOCK_V: tl.constexpr):  # fmt: skip
    """A pair chunk state into part_ptr [PARTIAL, n_chunks, N] (`_pair.store_chunk_state`)
    from its lanes: the lanes' excess kx and u moved to both sides' chunk references
    (`_chunk_excess`, `_chunk_u`; lm_w, s_w the weight side's lane maxes and sums, f, g each
    side's lane moves), each side's chunk max m, s1 - 1 and e (`_chunk_side`); an infinite or
    NaN u (nats) as the `inf` flag. A side that came out empty though it holds finite logits
    (every lane far out, `far_lane`: a chunk masked whole with a huge finite fill) is summed
    again relative to its raw max (`_pair.store_chunk_state`, rows w_row, v_row; LANES lanes
    of VEC)."""
    k = tl.sum(kx, 0)  # 0 without EXCESS
    if EXCESS:
        k = _chunk_excess(kx, u, lm_w, s_w, f_w, f_v, g_w, g_v)
    u = _chunk_u(u, lm_w, s_w, f_w, g_w, g_v)
    inf = tl.where((u == u) & (tl.abs(u) < float("inf")), 0.0, 1.0).to(u.dtype)
    u = tl.where(inf > 0, 0.0, u)
    k = tl.where(inf > 0, 0.0, k)
    store_chunk_state(
        part_ptr, chunk, row, N, m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, w_row, v_row, start,
        n_valid, tau_w, tau_v, DIVIDE, EXCESS, LANES, VEC, BLOCK_V,
    )  # fmt: skip


@triton.jit
def _other_side(m, r, s, k, tau, far, rp, kp, off, OWN: tl.constexpr, DIVIDE: tl.constexpr):
    """The rollout's or the reference's chunk side (`_chunk_side`) from its lanes: in its own
    frame with OWN (a lane far out in it, `far_lane`, is empty; off its lane offsets or None,
    `_frame_offset`), else framed on the logits' lanes (r holding d; a lane far out in the
    logits', `far`, is empty). Returns its lane maxes as the pair's u and excess moves take
    them, then `_chunk_side`'s m, g, f, rest, e."""
    if OWN:
        m = tl.where(far_lane(m, k), float("-inf"), m)
        mz, _, g, f, rest, e = _chunk_side(m, r, s, k, tau, None, off, True)
    else:
        m = tl.where(far, float("-inf"), m)
        mz, _, g, f, rest, e = _chunk_side(m, rp, s, kp, tau, r, None, DIVIDE)
    return m, mz, g, f, rest, e


@triton.jit
def _gave_up(s, OWN: tl.constexpr):
    """Whether a framed side's lane sums s came out NaN or infinite (`_framed_rescale` gave a
    lane's frame up; a NaN logit; both rows' lanes masked with different huge fills, whose
    x + d cancelled to an exponent far above the frame): its chunk is summed again
    (`_pair_again`). Never for OWN lanes."""
    if OWN:
        return tl.full([], 0, tl.int32) > 0
    else:
        return tl.sum((~(tl.abs(s) < float("inf"))).to(tl.int32), 0) > 0


@triton.jit
def _pair_again(part_ptr, chunk, row, N, w_row, v_row, start, n_valid, tau_w, tau_v,
                DIVIDE: tl.constexpr, EXCESS: tl.constexpr, LANES: tl.constexpr,
                FOLD: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """A pair's chunk state summed again by `_pair`'s own lanes (`_pair._shifted_chunk`, each
    side in its own frame) and stored (`_pair.store_chunk_state`): the rare second pass of a
    chunk whose framed side gave up its frame (`_framed_rescale`) or holds a NaN."""
    zero = tau_w * 0
    m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = pair_chunk_again(
        w_row, v_row, start, n_valid, zero, zero, tau_w, tau_v, DIVIDE, EXCESS, LANES, FOLD,
        False,
    )  # fmt: skip
    store_chunk_state(
        part_ptr, chunk, row, N, m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, w_row, v_row, start,
        n_valid, tau_w, tau_v, DIVIDE, EXCESS, LANES, FOLD, BLOCK_V,
    )  # fmt: skip


@triton.jit
def _full_step(row_ptr, col0, step, ACC: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr,
               ALIGN: tl.constexpr):  # fmt: skip
    """A full step of one tensor as token_stats' (xa, xb) (`step_halves`), loaded unmasked:
    full steps lie inside the row, and an ignored row runs none (a masked load's fill values
    cost an instruction per 16-bit pair)."""
    ra, rb = load_step(row_ptr, col0, step, None, VEC, PAIRS, ALIGN)
    return step_halves(ra, rb, ACC, VEC, PAIRS, ALIGN)


@triton.jit(do_not_specialize=["scale_bits", "ignore_index"])
def _fwd_chunk_kernel(
    x_ptr, xr_ptr, xq_ptr, labels_ptr, temp_ptr, scale_bits, t_ptr, tr_ptr, tq_ptr,
    ignore_index, V, N, n_inner, stride_outer, stride_inner, r_n_inner, r_s_outer, r_s_inner,
    q_n_inner, q_s_outer, q_s_inner, part_ptr, part_idx_ptr, part_r_ptr, part_q_ptr,
    HAS_TEMP: tl.constexpr, HAS_ROLL: tl.constexpr, HAS_REF: tl.constexpr,
    REVERSE: tl.constexpr, DIV_R: tl.constexpr, DIV_Q: tl.constexpr, OWN_R: tl.constexpr,
    OWN_Q: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, U: tl.constexpr,
    VEC: tl.constexpr, PAIRS: tl.constexpr, EXCESS: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): token_stats' partial state of one chunk of one row (part_ptr
    [4, n_chunks, N], part_idx_ptr [n_chunks, N]) and the pair states against the rollout
    (part_r_ptr) and the reference (part_q_ptr), each [PARTIAL, n_chunks, N]. Ignored rows read
    nothing and store empty states. OWN_R / OWN_Q: that side sums in its own lanes; else its
    exponents are framed on the logits' lanes (`_framed_exps`; both temperatures 1, or the
    logits' own temperature on 16-bit logits: `step_stats_forward`), so a row that differs from
    the logits by a constant gets their exponents bitwise."""
    ACC: tl.constexpr = acc_of(x_ptr.dtype.element_ty)
    LANES: tl.constexpr = BLOCK_V // (U * VEC)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    c = _log2_scale(temp_ptr, row, True, scale_bits, HAS_TEMP).to(ACC)
    tau_p = tl.load(t_ptr + row)
    tau_r = tl.load(tr_ptr + row)
    tau_q = tl.load(tq_ptr + row)
    kp = _pair_scale(c, tau_p)
    kr = _pair_scale(_log2_scale(tr_ptr, row, True, 0, True).to(ACC), tau_r)
    kq = _pair_scale(_log2_scale(tq_ptr, row, True, 0, True).to(ACC), tau_q)
    # A framed side's exponents and moves take the logits' scale, bitwise (the same temperature).
    if not OWN_R:
        kr = kp
    if not OWN_Q:
        kq = kp
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    xr_row = xr_ptr + row_offset(row, r_n_inner, r_s_outer, r_s_inner, ALIGN)
    xq_row = xq_ptr + row_offset(row, q_n_inner, q_s_outer, q_s_inner, ALIGN)

    start = chunk * CHUNK
    n_valid = tl.where(keep, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    block = tl.arange(0, U)[:, None] * (LANES * VEC) + tl.arange(0, LANES * VEC)[None, :]
    step = step_offsets(U, LANES, VEC, PAIRS, ALIGN)
    mx = tl.full([LANES], float("-inf"), ACC)
    r2 = tl.zeros([LANES], ACC)
    s1 = tl.zeros([LANES], sum_dtype(x_ptr.dtype.element_ty))
    s2 = tl.zeros([LANES], sum_dtype(x_ptr.dtype.element_ty))
    t2 = tl.zeros([LANES], ACC)
    st = tl.zeros([LANES], tl.int32)
    rp = tl.zeros([LANES], ACC)
    sp = tl.zeros([LANES], ACC)
    mr = tl.full([LANES], float("-inf"), ACC)
    rr = tl.zeros([LANES], ACC)
    sr = tl.zeros([LANES], ACC)
    ur = tl.zeros([LANES], ACC)
    mq = tl.full([LANES], float("-inf"), ACC)
    rq = tl.zeros([LANES], ACC)
    sq = tl.zeros([LANES], ACC)
    uq = tl.zeros([LANES], ACC)
    kx_r = tl.zeros([LANES], ACC)
    kx_q = tl.zeros([LANES], ACC)
    # Each own side's lane offset (`_frame_offset`; 0 for the empty lanes it starts from).
    cr = tl.zeros([LANES], ACC)
    cq = tl.zeros([LANES], ACC)
    # No prefetch (unlike token_stats): three tensors' blocks in flight would not fit in
    # registers; the other tensors' loads of a step overlap each other instead.
    for i in range(0, n_full):
        col0 = start + i * BLOCK_V
        # (Absent tensors take the logits' block as a placeholder, never read.) A bf16 step's
        # even and odd elements apart, however a row was loaded (`bf16_halves`): the same sums
        # bitwise whichever path a row's layout (and its batch's) takes.
        xa, xb = _full_step(x_row, col0, step, ACC, VEC, PAIRS, ALIGN)
        ra, rb, qa, qb = xa, xb, xa, xb
        if HAS_ROLL:
            ra, rb = _full_step(xr_row, col0, step, ACC, VEC, PAIRS, ALIGN)
        if HAS_REF:
            qa, qb = _full_step(xq_row, col0, step, ACC, VEC, PAIRS, ALIGN)
        if x_ptr.dtype.element_ty != tl.bfloat16:
            xb, rb, qb = None, None, None
        mx, r2, s1, s2, t2, st, rp, sp, mr, rr, sr, ur, kx_r, cr, mq, rq, sq, uq, kx_q, cq = _step(
            xa, xb, ra, rb, qa, qb, i, c, kp, kr, kq, mx, r2, s1, s2, t2, st, rp, sp, mr, rr,
            sr, ur, kx_r, cr, mq, rq, sq, uq, kx_q, cq, HAS_ROLL, HAS_REF, REVERSE, OWN_R, OWN_Q,
            EXCESS,
        )  # fmt: skip
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        col0 = start + n_full * BLOCK_V
        xa = load_last_step(x_row, col0, V, U, LANES, VEC, ALIGN).to(ACC)
        ra, qa = xa, xa
        if HAS_ROLL:
            ra = load_last_step(xr_row, col0, V, U, LANES, VEC, ALIGN).to(ACC)
        if HAS_REF:
            qa = load_last_step(xq_row, col0, V, U, LANES, VEC, ALIGN).to(ACC)
        mx, r2, s1, s2, t2, st, rp, sp, mr, rr, sr, ur, kx_r, cr, mq, rq, sq, uq, kx_q, cq = _step(
            xa, None, ra, None, qa, None, n_full, c, kp, kr, kq, mx, r2, s1, s2, t2, st, rp, sp,
            mr, rr, sr, ur, kx_r, cr, mq, rq, sq, uq, kx_q, cq, HAS_ROLL, HAS_REF, REVERSE, OWN_R,
            OWN_Q, EXCESS,
        )  # fmt: skip

    cmax, s1_sum, s2_sum, t2_sum, am = chunk_total(
        mx, r2, s1, s2, t2, st, c, x_row, start, n_valid, block, V, U, LANES, VEC, BLOCK_V, CHUNK,
        True,
    )  # fmt: skip
    store_partial(part_ptr, part_idx_ptr, chunk, row, N, cmax, s1_sum, s2_sum, t2_sum, am)
    # The pairs' chunk states in `_pair`'s convention (`_chunk_side`), u moved with them. A lane
    # whose frame lies far out (token_stats' `frame`: finfo.min logits) summed exactly 0: to
    # the pairs it is an empty lane, as a lane below `_pair.lane_floor`; a chunk side of
    # nothing else is summed again relative to its raw max (`_store_pair`).
    # The own sides' lane offsets as the loop's last step left them.
    off_r = cr if OWN_R and EXCESS else None
    off_q = cq if OWN_Q and EXCESS else None
    if HAS_ROLL or HAS_REF:
        far = far_lane(mx, kp)
        mx = tl.where(far, float("-inf"), mx)
        m_p, _, g_p, f_p, r_p, e_p = _chunk_side(mx, rp, sp, kp, tau_p, None, None, True)
    if HAS_ROLL:
        # A framed side whose frame was given up (or that holds a NaN) has non-finite sums: its
        # chunk is summed again in its own frame (`_pair_again`; KL(pi_roll || pi_theta), w =
        # the rollout).
        if _gave_up(sr, OWN_R):
            _pair_again(part_r_ptr, chunk, row, N, xr_row, x_row, start, n_valid, tau_r, tau_p,
                        DIV_R, EXCESS, U * LANES, VEC, BLOCK_V)  # fmt: skip
        else:
            mr, m_r, g_r, f_r, r_r, e_r = _other_side(mr, rr, sr, kr, tau_r, far, rp, kp, off_r,
                                                      OWN_R, DIV_R)  # fmt: skip
            _store_pair(part_r_ptr, chunk, row, N, kx_r, ur, mr, sr, f_r, g_r, f_p, g_p, m_r, r_r,
                        e_r, m_p, r_p, e_p, xr_row, x_row, start, n_valid, tau_r, tau_p, DIV_R,
                        EXCESS, U * LANES, VEC, BLOCK_V)  # fmt: skip
    if HAS_REF:
        if _gave_up(sq, OWN_Q):
            if REVERSE:
                _pair_again(part_q_ptr, chunk, row, N, x_row, xq_row, start, n_valid, tau_p,
                            tau_q, DIV_Q, EXCESS, U * LANES, VEC, BLOCK_V)  # fmt: skip
            else:
                _pair_again(part_q_ptr, chunk, row, N, xq_row, x_row, start, n_valid, tau_q,
                            tau_p, DIV_Q, EXCESS, U * LANES, VEC, BLOCK_V)  # fmt: skip
        else:
            mq, m_q, g_q, f_q, r_q, e_q = _other_side(mq, rq, sq, kq, tau_q, far, rp, kp, off_q,
                                                      OWN_Q, DIV_Q)  # fmt: skip
            if REVERSE:
                _store_pair(part_q_ptr, chunk, row, N, kx_q, uq, mx, sp, f_p, g_p, f_q, g_q, m_p,
                            r_p, e_p, m_q, r_q, e_q, x_row, xq_row, start, n_valid, tau_p, tau_q,
                            DIV_Q, EXCESS, U * LANES, VEC, BLOCK_V)  # fmt: skip
            else:
                _store_pair(part_q_ptr, chunk, row, N, kx_q, uq, mq, sq, f_q, g_q, f_p, g_p, m_q,
                            r_q, e_q, m_p, r_p, e_p, xq_row, x_row, start, n_valid, tau_q, tau_p,
                            DIV_Q, EXCESS, U * LANES, VEC, BLOCK_V)  # fmt: skip


@triton.jit(do_not_specialize=["scale_bits", "ignore_index"])
def _fwd_finish_kernel(
    x_ptr, labels_ptr, temp_ptr, t_ptr, tr_ptr, tq_ptr, scale_bits, ignore_index, V, N,
    n_chunks, n_inner, stride_outer, stride_inner, part_ptr, part_idx_ptr, part_r_ptr,
    part_q_ptr, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr, max_prob_ptr,
    argmax_ptr, token_kl_ptr, kl_ptr, kl_state_ptr, p_norm_ptr, r_norm_ptr,
    HAS_TEMP: tl.constexpr, HAS_ROLL: tl.constexpr, HAS_REF: tl.constexpr,
    REVERSE: tl.constexpr, DIV_R: tl.constexpr, DIV_Q: tl.constexpr, EXCESS: tl.constexpr,
    TV: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: token_stats' outputs (its merge), token_kl and, with TV, the
    (m, log s1) of the logits and of the rollout (p_norm_ptr, r_norm_ptr [N, 2], for the TV
    pass), kl and kl_state [N, 3]. A row whose logits' state is invalid has NaN KLs; ignored
    rows are 0."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    vals, mx = merge_rows(
        x_ptr, labels_ptr, temp_ptr, scale_bits, ignore_index, V, N, n_chunks,
        n_inner, stride_outer, stride_inner, part_ptr, part_idx_ptr, rows, rmask, HAS_TEMP,
    )  # fmt: skip
    _store_outputs(
        rows, rmask, vals, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr,
        max_prob_ptr, argmax_ptr,
    )  # fmt: skip
    keep = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64) != ignore_index
    valid = side_is_valid(mx)  # the logits' state (softmax_stats.h state_is_valid)
    nan = float("nan")
    # Each side's sums are relative to its max logit's own z (`_chunk_side`); the reference's
    # log s1 and c are handed on relative to a / tau (`reference_shift`), the raw logit
    # `row_exponent` rebuilds from m in the backward, as kl_divergence's finish; the TV pass
    # takes each side's max logit itself (`tv_frame`).
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    tau_p = tl.load(t_ptr + rows, mask=rmask, other=1.0)
    if HAS_ROLL:
        m_r, r_r, m_p, r_p, u, inf, e_r, e_p, k = merge_row(
            part_r_ptr, rows, rmask, N, n_chunks, EXCESS
        )
        tau_r = tl.load(tr_ptr + rows, mask=rmask, other=1.0)
        kl, _, _, _ = finalize_kl(m_r, r_r, m_p, r_p, u, inf, 0.0 * e_r, 0.0 * e_p, k, EXCESS)
        tl.store(token_kl_ptr + rows, tl.where(keep, tl.where(valid, kl, nan), 0.0), mask=rmask)
        if TV:
            # mismatch_stats' TV pass reads these (NaN marks an invalid side, 0 an ignored
            # row); a row whose token_stats state is invalid is invalid there too.
            m_p = tl.where(valid, m_p, nan)
            store_tv_frame(p_norm_ptr, rows, rmask, keep, m_p, r_p, e_p, tau_p, DIV_R)
            store_tv_frame(r_norm_ptr, rows, rmask, keep, m_r, r_r, e_r, tau_r, DIV_R)
    if HAS_REF:
        m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = merge_row(
            part_q_ptr, rows, rmask, N, n_chunks, EXCESS
        )
        tau_q = tl.load(tq_ptr + rows, mask=rmask, other=1.0)
        if REVERSE:
            tau_w, tau_v = tau_p, tau_q
        else:
            tau_w, tau_v = tau_q, tau_p
        d_w = reference_shift(m_w, e_w, tau_w, DIV_Q, XDT)
        d_v = reference_shift(m_v, e_v, tau_v, DIV_Q, XDT)
        kl, l_w, l_v, c = finalize_kl(m_w, r_w, m_v, r_v, u, inf, d_w, d_v, k, EXCESS)
        if REVERSE:
            m_q, l_q = m_v, l_v
        else:
            m_q, l_q = m_w, l_w
        ok_q = side_is_valid(m_q)
        st = kl_state_ptr + rows * 3
        tl.store(kl_ptr + rows, tl.where(keep, tl.where(valid, kl, nan), 0.0), mask=rmask)
        tl.store(st, tl.where(keep, tl.where(ok_q, m_q, nan), 0.0), mask=rmask)
        tl.store(st + 1, tl.where(keep, tl.where(ok_q, l_q, nan), 0.0), mask=rmask)
        tl.store(st + 2, tl.where(keep, c, 0.0), mask=rmask)


@triton.constexpr_function
def frames_reference(XDT):
    """Whether the backward takes the reference's exponent in the logits' frame (`_bwd_values`'
    FRAMED): 16-bit logits, whose loop has no room for fp32's two products and other side's
    series (`has_other_series`), and whose x - a_q is exact (a_q the max logit itself)."""
    return XDT.primitive_bitwidth == 16


@triton.jit
def _bwd_values(x, xq, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q,
                f_o, dl_u, r_hi, KL: tl.constexpr, REVERSE: tl.constexpr, SERIES: tl.constexpr,
                FRAMED: tl.constexpr):  # fmt: skip
    """(dz_p, dz_q) / tau of one block of logits x and reference logits xq (ACC), without the
    label term; with KL the K term and the reference's gradient (per-row factors set up by
    `_bwd_kernel`), else dz_q = 0. p_j = kp e, e = 2^d2 (token_stats' backward); q_j = exp of
    (x_q - a_q) k_q - b_q (`row_exponent`: no division per element), d_q = (x_q - a_q) / tau_q
    from a difference of the raw logits.
    Reverse KL: p_j g ((d_p - d_q) - c) with d_p = z - m = ln2 (d2 + rho_hi) joins token_stats'
    coefficients: its d_p part is b's (b += G ln2, G = kp g / tau) and a's, so per element only
    -G d_q is added: e (a + b d2 + q e + g_p max(x_q - a_q, floor)), g_p = -G / tau_q.
    Forward KL: p_j g / tau is in a, q_j g / tau subtracted (g_p = g / tau); the reference's
    gradient q_j g_q ((d_q - d_p) - c) = q_j (f_q (x_q - a_q) - k_d d2 + shift), f_q =
    g_q / tau_q, k_d = g_q ln2, shift = -g_q (ln2 rho_hi + c) (per-row factors), d2 here
    floored at D2_FAR, not D_MIN (a p_j of 0 may face a q_j that is not).
    SERIES (fp32 logits, `_pair.has_other_series`): the other side's difference (reverse: the
    reference's q_j - p_j, f_o = kp g_q; forward: the logits' p_j - q_j, f_o = kp g_p, then not
    in a) from `_pair.other_side_difference` where the two are close, y = (d_w - d_v) + dl_u in
    log2 units, d_p = (x - m) c, d_q = (x_q - a_q) k_q, dl_u = (KL - c) log2(e): p_j and q_j
    carry different roundings (token_stats' normalizer and the pair pass's), a few ulps of
    either that near-equal rows left in their difference. SERIES also forms the weight side
    from r = (d_p - d_q) / ln2 (reverse; forward (d_q - d_p) / ln2) in one difference per
    element, not from d_p folded into O(1) coefficients: reverse e fma(r, G ln2, coef), -G c in
    a and b as token_stats' (g_p = G ln2); forward q_j fma(r, k_d, shift), shift = -g_q c;
    r capped at r_hi (`log_ratio_cap` of g_p, reverse, or k_d, forward); r = d_p c - d_xq k_q
    from two products rounded alike, so that a reference equal to the logits gives r = 0.
    FRAMED (16-bit logits, `frames_reference`): the reference's exponent in the logits' frame,
    d2_q = (x_q - a_q) k_q - rho_hi, e_q = 2^d2_q (k_q = c where both sides share a temperature,
    so that equal or constant-shifted rows give e_q = e and d2_q = d2 bitwise), q_j = e_q kq;
    p_j and q_j then differ by the per-row `ratio` of their normalizers (e^dl, 1 exactly where
    the forward's KL and c are 0) and by e_q - e, and the log-ratio is d2 - d2_q in one
    difference: reverse, dq = (e_q - ratio e) f_q (ratio = kp / kq, f_q = kq g_q) and the
    weight e (G ln2 (d2 - d2_q) + coef) (g_p = G ln2, -G c in a); forward, dz = e coef +
    (e - ratio e_q) g_p (ratio = kq / kp, g_p = kp g / tau) and dq = e_q (k_d (d2_q - d2) +
    shift) (k_d = kq g_q ln2, shift = -kq g_q c). Both products are 0 on such rows, where the
    folded forms left each probability's rounding (up to 7.7e-7 on fp16 rows equal to the
    logits, tau 0.7)."""
    # Forward KL weighs d_p by q_j, which is not 0 where p_j is: d2 floored far lower there.
    d2, e = bwd_exps(x, m, c, rho_hi, D2_FAR if KL and not REVERSE else D_MIN)
    coef = tl.fma(q, e, tl.fma(b, d2, a))
    dq = tl.zeros_like(e)
    if KL and FRAMED:
        # Floored before the product: -1e30 k_q - rho_hi is finite, its exponent 0.
        d2_q = tl.fma(tl.maximum(xq - a_q, XQ_FLOOR), k_q, -rho_hi)
        e_q = exp_base(d2_q)
        if REVERSE:
            dq = tl.fma(e, -ratio, e_q) * f_q
            dz = e * tl.fma(d2 - d2_q, g_p, coef)
        else:
            dz = tl.fma(tl.fma(e_q, -ratio, e), g_p, e * coef)
            dq = e_q * tl.fma(d2_q - d2, k_d, shift)
    elif KL:
        dxq = xq - a_q
        q_j = exp_base(fma_acc(dxq, k_q, -b_q))
        if REVERSE:
            # d/dz_j KL(p || q) = p_j ((d_p - d_q) - c); d/dz_q,j = q_j - p_j. A -inf reference
            # logit under a -inf logit (e = 0) must add 0: its difference floored, far below
            # any logit (not D_MIN: x_q - a_q is not a log-ratio and may be < -1100).
            dq = tl.fma(e, -kp, q_j) * g_q
            if SERIES:
                # r = (d_p - d_q) / ln2, one small difference of two products rounded alike
                # (near-equal rows: ~|d_p - d_q|, not the O(1) coefficients' ulps; a reference
                # equal to the logits: 0); g_p = G ln2, -G c in a. r is -inf or NaN only where
                # e = 0 (a -inf logit, or a finfo.min one whose product overflows): floored,
                # the product 0. +inf where the reference's finfo.min fill overflowed: capped.
                r = (x - m) * c - dxq * k_q
                dz = e * tl.fma(bounded_log_ratio(r, r_hi), g_p, coef)
                dq = other_side_difference(e * f_o, r + dl_u, dq, True)
            else:
                dz = e * tl.fma(g_p, _floor_at(dxq, XQ_FLOOR), coef)
        else:
            # d/dz_j KL(q || p) = p_j - q_j; d/dz_q,j = q_j ((d_q - d_p) - c) with
            # d_p = ln2 (d2 + rho_hi), g_q folded into the factors: finite by the floors of d2
            # and x_q - a_q, so no floor (which would drop a NaN factor) after it.
            if SERIES:
                qg = q_j * g_p
                # r = (d_q - d_p) / ln2 (as reverse); k_d = g_q ln2, shift = -g_q c.
                r = dxq * k_q - (x - m) * c
                dz = tl.fma(e, coef, other_side_difference(qg, r + dl_u, tl.fma(e, f_o, -qg), True))
                dq = q_j * tl.fma(bounded_log_ratio(r, r_hi), k_d, shift)
            else:
                dz = tl.fma(q_j, -g_p, e * coef)
                dxq = _floor_at(dxq, XQ_FLOOR)
                dq = q_j * tl.fma(dxq, f_q, tl.fma(d2, -k_d, shift))
    else:
        dz = e * coef
    return dz, dq


@triton.jit
def _kl_term(x, xq, m, c, rho_hi, kp, a_q, k_q, b_q, big_w, c_w, inv_qw, REVERSE: tl.constexpr,
             SERIES: tl.constexpr, FRAMED: tl.constexpr):  # fmt: skip
    """The KL term of the weight side alone, unfolded, and that side's w_j and log-ratio
    delta = d_w - d_v in nats (`_dominant_row`): reverse p_j G ((d_p - d_q) - c) with p_j =
    kp e, G = kp g_p; forward q_j g_q ((d_q - d_p) - c). d_p - d_q as `_bwd_values` forms it
    (fp32: two products rounded alike; FRAMED: d2 - d2_q; fp64: d_p = ln2 (d2 + rho_hi) and
    d_q = (x_q - a_q) / tau_q floored as `_bwd_values` floors it), so that a reference equal to
    the logits leaves every term 0 (a 0 weight's term is 0)."""
    d2, e = bwd_exps(x, m, c, rho_hi, D_MIN if REVERSE else D2_FAR)
    dxq = _floor_at(xq - a_q, XQ_FLOOR)
    if FRAMED:
        d_pq = LN2 * (d2 - tl.fma(dxq, k_q, -rho_hi))
    elif SERIES:
        d_pq = LN2 * floor_log_ratio((x - m) * c - dxq * k_q)
    else:
        d_pq = LN2 * (d2 + rho_hi) - dxq * inv_qw
    if REVERSE:
        delta = d_pq
        w = kp * e
        term = e * (big_w * (delta - c_w))
    else:
        delta = -d_pq
        w = exp_base(fma_acc(dxq, k_q, -b_q))
        term = w * (big_w * (delta - c_w))
    return tl.where(w == 0, 0.0, term), w, delta


@triton.jit
def _dominant_row(x_row, xq_row, g_row, gq_row, row, label, V, m, c, rho_hi, a, b, q, kp, ratio,
                  a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi, big_w, c_w, inv_qw,
                  g_l, inv_tau, g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr, lse_ptr,
                  entropy_ptr, collision_ptr, max_prob_ptr, argmax_ptr, REVERSE: tl.constexpr,
                  NEED_X: tl.constexpr, NEED_Q: tl.constexpr, SERIES: tl.constexpr,
                  FRAMED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """A whole row whose KL weight side has a dominant entry (w_j > 1/2, rest below 2^-7): its
    requested gradients as `_bwd_chunk` and the label's entry as `_bwd_kernel` write them, then
    that entry's KL term written as minus the sum of the row's others, where that is the more
    accurate form (kl_divergence's `_dominant_row`, the C++ DominantEntry): the direct form
    rounds at ulp of the log-ratio there (1.8e-6 off at a spike of 40, where plain fp32 PyTorch
    reads ~0). The loop forms the weight side's KL term alone as well (`_kl_term`; the stored
    gradients fold it into token_stats' coefficients) and sums the others' in the lanes, then
    across them in fp64. The dominant entry's other terms (token_stats', on the logits) come
    from fp64 (`bwd_value64`), as the label's or the argmax's entry of a row without the KL.
    Elements are loaded one tensor element at a time (no int32 pairs)."""
    ACC: tl.constexpr = m.dtype
    OUT: tl.constexpr = g_row.dtype.element_ty
    lanes = tl.arange(0, BLOCK_V)
    others, size, at = others_zeros(ACC, BLOCK_V)
    n_full = V // BLOCK_V
    for i in range(0, n_full + 1):
        cols = i * BLOCK_V + lanes
        in_row = cols < V
        x = widen(tl.load(x_row + cols, mask=in_row, other=float("-inf")), ACC)
        xq = widen(tl.load(xq_row + cols, mask=in_row, other=0.0), ACC)
        dz, dq = _bwd_values(x, xq, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q, b_q, f_q, k_d,
                             shift, g_p, g_q, f_o, dl_u, r_hi, True, REVERSE, SERIES,
                             FRAMED)  # fmt: skip
        if NEED_X:
            tl.store(g_row + cols, round_to(dz, OUT), mask=in_row)
        if NEED_Q:
            tl.store(gq_row + cols, round_to(dq, OUT), mask=in_row)
        term, w, _ = _kl_term(x, xq, m, c, rho_hi, kp, a_q, k_q, b_q, big_w, c_w, inv_qw,
                              REVERSE, SERIES, FRAMED)  # fmt: skip
        top = in_row & (w > 0.5)
        others, size, at = others_add(others, size, at, term, top, top | ~in_row, i)
    col = others_column(at, BLOCK_V)
    found = col >= 0
    at_col = tl.maximum(col, 0)
    x_t = tl.load(x_row + at_col).to(ACC)
    xq_t = tl.load(xq_row + at_col).to(ACC)
    _, w_t, delta_t = _kl_term(x_t, xq_t, m, c, rho_hi, kp, a_q, k_q, b_q, big_w, c_w, inv_qw,
                               REVERSE, SERIES, FRAMED)  # fmt: skip
    # The direct form rounds at ~eps w_j (|delta_j| + |c|) |G / kp|, the others' sum at up to
    # ~32 eps of their sizes (the C++ DominantEntry's criterion).
    if REVERSE:
        scale = w_t * (tl.abs(delta_t) + tl.abs(c_w)) * tl.abs(big_w / kp)
    else:
        scale = w_t * (tl.abs(delta_t) + tl.abs(c_w)) * tl.abs(big_w)
    no_outside = tl.zeros([], tl.float64)  # whole rows
    total, better = others_total(others, size, scale, no_outside, no_outside)
    better = found & better
    tl.debug_barrier()  # after the loop's block stores of the same addresses
    if NEED_Q:
        if not REVERSE:
            if better:
                tl.store(gq_row + col, round_to(-total, OUT))
    if NEED_X:
        row64 = bwd_row(x_row, row, label, row >= 0, c, V, g_logprob_ptr, g_entropy_ptr,
                        g_collision_ptr, g_lse_ptr, lse_ptr, entropy_ptr, collision_ptr,
                        max_prob_ptr, argmax_ptr)[10]  # fmt: skip
        rewrite = better & (row < 0)  # the logits' entry: reverse only
        if REVERSE:
            rewrite = better
        if rewrite & (col == label):
            value = bwd_value64(x_t, m, c, rho_hi, row64, g_l) - total
            tl.store(g_row + label, round_to(value, OUT))
        else:
            # The label's entry as `_bwd_kernel` writes it in a row with the KL term.
            x_c = tl.load(x_row + label).to(ACC)
            xq_c = tl.load(xq_row + label).to(ACC)
            dz_c, _ = _bwd_values(x_c, xq_c, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q, b_q, f_q,
                                  k_d, shift, g_p, g_q, f_o, dl_u, r_hi, True, REVERSE, SERIES,
                                  FRAMED)  # fmt: skip
            tl.store(g_row + label, round_to(dz_c + g_l * inv_tau, OUT))
            if rewrite:
                tl.store(g_row + col, round_to(bwd_value64(x_t, m, c, rho_hi, row64, 0.0) - total,
                                               OUT))  # fmt: skip


@triton.jit
def _load_halves(row_ptr, col0, BLOCK_V: tl.constexpr):
    """A full block of bf16 logits as int32 pairs -> (even, odd) elements in fp32: a bf16 is
    the upper half of its fp32, so each is one shift or one mask (token_stats' PAIRS)."""
    w = tl.load((row_ptr.to(tl.pointer_type(tl.int32)) + col0 // 2) + tl.arange(0, BLOCK_V // 2))
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _bwd_chunk(x_row, xq_row, g_row, gq_row, start, n_valid, V, m, c, rho_hi, a, b, q, kp, ratio,
               a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi, READ: tl.constexpr,
               KL: tl.constexpr, REVERSE: tl.constexpr, NEED_X: tl.constexpr,
               NEED_Q: tl.constexpr, PAIRS: tl.constexpr, SERIES: tl.constexpr,
               FRAMED: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """One chunk's requested gradients, block by block: READ (not an ignored row) reads the
    logits (and with KL the reference) and writes `_bwd_values`; else zeros. One such loop per
    row case, so that none carries a per-element select or a masked load's fill values.
    PAIRS: bf16 rows at even offsets, full blocks loaded as int32 pairs (`_load_halves`)."""
    ACC: tl.constexpr = m.dtype
    OUT: tl.constexpr = g_row.dtype.element_ty
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], OUT)
    for i in range(0, n_full):
        # Each block's address: a per-block scalar pointer plus the loop-invariant lanes (the
        # vectors of a thread then sit at immediate offsets from one address per tensor).
        col0 = start + i * BLOCK_V
        if READ:
            if PAIRS:
                x_lo, x_hi = _load_halves(x_row, col0, BLOCK_V)
                xq_lo, xq_hi = x_lo, x_hi
                if KL:
                    xq_lo, xq_hi = _load_halves(xq_row, col0, BLOCK_V)
                dz_lo, dq_lo = _bwd_values(x_lo, xq_lo, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q,
                                           b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi, KL,
                                           REVERSE, SERIES, FRAMED)  # fmt: skip
                dz_hi, dq_hi = _bwd_values(x_hi, xq_hi, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q,
                                           b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi, KL,
                                           REVERSE, SERIES, FRAMED)  # fmt: skip
                dz = tl.reshape(tl.join(dz_lo, dz_hi), [BLOCK_V])
                dq = tl.reshape(tl.join(dq_lo, dq_hi), [BLOCK_V])
            else:
                x = widen(tl.load((x_row + col0) + lanes), ACC)
                xq = x
                if KL:
                    xq = widen(tl.load((xq_row + col0) + lanes), ACC)
                dz, dq = _bwd_values(x, xq, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q, b_q, f_q,
                                     k_d, shift, g_p, g_q, f_o, dl_u, r_hi, KL, REVERSE, SERIES,
                                     FRAMED)  # fmt: skip
            if NEED_X:
                tl.store((g_row + col0) + lanes, round_to(dz, OUT))
            if NEED_Q:
                tl.store((gq_row + col0) + lanes, round_to(dq, OUT))
        else:
            if NEED_X:
                tl.store((g_row + col0) + lanes, zero)
            if NEED_Q:
                tl.store((gq_row + col0) + lanes, zero)
    if n_full * BLOCK_V < n_valid:
        cols = start + n_full * BLOCK_V + lanes
        in_row = cols < V
        if READ:
            x = widen(tl.load(x_row + cols, mask=in_row, other=float("-inf")), ACC)
            xq = x
            if KL:
                xq = widen(tl.load(xq_row + cols, mask=in_row, other=0.0), ACC)
            dz, dq = _bwd_values(x, xq, m, c, rho_hi, a, b, q, kp, ratio, a_q, k_q, b_q, f_q, k_d,
                                 shift, g_p, g_q, f_o, dl_u, r_hi, KL, REVERSE, SERIES,
                                 FRAMED)  # fmt: skip
            if NEED_X:
                tl.store(g_row + cols, round_to(dz, OUT), mask=in_row)
            if NEED_Q:
                tl.store(gq_row + cols, round_to(dq, OUT), mask=in_row)
        else:
            if NEED_X:
                tl.store(g_row + cols, zero, mask=in_row)
            if NEED_Q:
                tl.store(gq_row + cols, zero, mask=in_row)


@triton.jit(do_not_specialize=["scale_bits", "ignore_index", "same_tau"])
def _bwd_kernel(
    x_ptr, xq_ptr, labels_ptr, temp_ptr, scale_bits, t_ptr, tq_ptr, same_tau, ignore_index, V,
    n_inner, stride_outer, stride_inner, q_n_inner, q_s_outer, q_s_inner,
    g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr, g_kl_ptr, lse_ptr, entropy_ptr,
    collision_ptr, max_prob_ptr, argmax_ptr, kl_ptr, kl_state_ptr, grad_ptr, grad_q_ptr,
    HAS_TEMP: tl.constexpr, HAS_REF: tl.constexpr, REVERSE: tl.constexpr,
    NEED_X: tl.constexpr, NEED_Q: tl.constexpr, DIVIDE_Q: tl.constexpr, PAIRS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, DOMINANT: tl.constexpr,
    DOMINANT_ROWS: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the requested gradients of one chunk of one row, written once.

    DOMINANT (the KL in the loss, its weight side's gradient asked for): rows whose weight side
    (the logits for reverse, the reference for forward) has a dominant entry are left to a
    second launch with DOMINANT_ROWS, grid (N, 1), whose program writes such a row whole
    (`_dominant_row`: that entry's KL term as minus the sum of the row's others); its other
    programs return at once, and the main launch's hot loop stays as it was.

    Row cases (as the C++ kernel): ignored rows 0; a NaN token row NaN (and its reference
    gradient NaN when the KL is in the loss); with the KL in the loss (g_kl != 0): a NaN KL or
    reference state makes both NaN, KL = +inf the weight side NaN. g_kl = 0: no K term, the
    reference is not read, its gradient 0. Each case runs its own loop (`_bwd_chunk`); a NaN
    row's NaN comes from its per-row factors."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    c = _log2_scale(temp_ptr, row, True, scale_bits, HAS_TEMP).to(ACC)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    xq_row = xq_ptr + row_offset(row, q_n_inner, q_s_outer, q_s_inner, ALIGN)
    m, c, rho_hi, a, b, q, inv_tau, g_l, ok, kp, _row64 = bwd_row(
        x_row, row, label, keep, c, V, g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr,
        lse_ptr, entropy_ptr, collision_ptr, max_prob_ptr, argmax_ptr,
    )  # fmt: skip
    nan = float("nan")
    big = float("inf")
    # The K term's per-row factors (`_bwd_values`), 0 without a reference.
    a_q = tl.zeros([], ACC)
    k_q = tl.zeros([], ACC)
    b_q = tl.zeros([], ACC)
    f_q = tl.zeros([], ACC)
    k_d = tl.zeros([], ACC)
    shift = tl.zeros([], ACC)
    g_p = tl.zeros([], ACC)
    g_q = tl.zeros([], ACC)
    f_o = tl.zeros([], ACC)
    dl_u = tl.zeros([], ACC)
    r_hi = tl.zeros([], ACC)  # `_bwd_values`' cap of its SERIES log-ratio
    ratio = tl.zeros([], ACC)  # FRAMED: the two normalizers' ratio (`_bwd_values`)
    SERIES: tl.constexpr = has_other_series(x_ptr.dtype.element_ty)
    FRAMED: tl.constexpr = frames_reference(x_ptr.dtype.element_ty)
    a_kl = a
    b_kl = b
    read_q = keep & (row < 0)
    kl_on = read_q
    dominant = read_q  # False; see DOMINANT
    # The KL term unfolded, for `_dominant_row`: its factor G on the weight side (kp g_p
    # reverse, g_q forward, both over tau) and c, and 1 / tau_q.
    big_w = tl.zeros([], ACC)
    c_w = tl.zeros([], ACC)
    inv_qw = tl.zeros([], ACC)
    if HAS_REF:
        up = tl.load(g_kl_ptr + row)
        kl = tl.load(kl_ptr + row)
        st = kl_state_ptr + row.to(tl.int64) * 3
        m_q, l_q, c_kl = tl.load(st), tl.load(st + 1), tl.load(st + 2)
        kl_on = keep & (up != 0)
        kl_ok = (kl == kl) & (tl.abs(m_q) < big) & (tl.abs(l_q) < big)
        read_q = kl_on & kl_ok & ok
        tau_q = tl.load(tq_ptr + row)
        m_q, l_q = tl.where(read_q, m_q, 0.0), tl.where(read_q, l_q, 0.0)
        c_kl = tl.where(read_q & (kl < big), c_kl, 0.0)
        # The forward's l_q and c are relative to a_q / tau_q, a_q = `max_logit` (its finish's
        # `reference_shift`), what `row_exponent` rebuilds here.
        a_q, k_q, b_q = row_exponent(m_q, l_q, tau_q, xq_row, V, DIVIDE_Q,
                                     xq_ptr.dtype.element_ty, BLOCK_V)  # fmt: skip
        if FRAMED or SERIES:
            # One scale for both exponents where the temperatures are the same one: the
            # logits' c (from the fp64 tau) and the reference's own (fp32 tau) may be an ulp
            # apart, which would leave equal rows' exponents apart too.
            k_q = tl.where(same_tau != 0, c, k_q)
        one = tl.full([], 1.0, ACC)
        inv_q = div_acc(one, tau_q)
        tau_p = tl.load(t_ptr + row)
        inv_p = div_acc(one, tau_p)
        d_ref_q = tl.zeros([], ACC)
        if SERIES:
            # fp32: the reference's frame a_q = (m_q / tau_q) tau_q rounded, an ulp from its max
            # logit, would leave a teacher equal to the logits with (x - m) c and (x_q - a_q) k_q
            # rounded apart. Where a_q lies within a few ulps of m, the reference takes m as its
            # frame too: its exponent offset, log s1 and c move by d_ref_q = (m - a_q) / tau_q,
            # once per row (a frame further away keeps a_q: x_q - m would round relative to
            # the distance between the two maxes).
            near_m = tl.abs(m - a_q) <= tl.abs(m) * 2.0**-21
            d_ref_q = tl.where(near_m & read_q, (m - a_q) * inv_q, 0.0)
            a_q = tl.where(near_m & read_q, m, a_q)
            b_q = b_q - d_ref_q * LOG2E
            l_q = l_q - d_ref_q
        # The forward's c is relative to each side's a / tau: the reference's a_q and the
        # logits' a_p = `max_logit` of the forward's stored max m / tau rounded (m itself for
        # 16-bit logits, else usually). d_p here is relative to m: the difference
        # (m - a_p) / tau moves c, once per row.
        # A row far out (`_pair.reads_max`) is summed relative to its max logit itself: 0.
        XDT: tl.constexpr = x_ptr.dtype.element_ty
        m_z = div_acc(m, tau_p)
        d_ref = (m - max_logit(m_z, tau_p, XDT)) * inv_p
        d_ref = tl.where(reads_max(m_z, DIVIDE_Q, XDT), 0.0, d_ref)
        if REVERSE:
            c_kl = (c_kl - d_ref) + d_ref_q
            p_nan = kl_on & ((~kl_ok) | (kl == big))  # the weight side of an infinite KL
            q_nan = kl_on & ((~kl_ok) | (~ok))
        else:
            p_nan = kl_on & (~kl_ok)
            q_nan = kl_on & ((~kl_ok) | (~ok) | (kl == big))
            c_kl = (c_kl + d_ref) - d_ref_q
        g_p = tl.where(kl_on, tl.where(p_nan, nan, up * inv_p), 0.0)  # d/dx = d/dz / tau
        g_q = tl.where(kl_on, tl.where(q_nan, nan, div_acc(up, tau_q)), 0.0)
        # The other side's log s1_v - log s1_w (c now relative to m), in log2 units, for
        # `_bwd_values`' SERIES: KL - c, or from the logs where KL and c are far larger
        # (`_pair.log_s1_difference`). The logits' log s1 relative to m / tau is -log max_prob
        # (max_prob = e_m / s1, the sums' own term), good to ~1e-7 absolute; as L - m / tau it
        # carried ulp(L) (7.6e-6 at L ~ 110: on near-equal rows masked in part with -1e6, tau
        # 0.3, the other side's gradient 7.7e-4 off where plain fp32 PyTorch is 1.0e-4). NaN
        # (so never near) on a KL = +inf or unread row.
        f64 = tl.float64
        l_p = -tl.log(tl.load(max_prob_ptr + row).to(f64))
        if REVERSE:
            dl = log_s1_difference(kl.to(f64), c_kl.to(f64), l_p, l_q.to(f64))
        else:
            dl = log_s1_difference(kl.to(f64), c_kl.to(f64), l_q.to(f64), l_p)
        dl_u = tl.where(read_q & (kl < big), (dl * LOG2E_F64).to(ACC), nan)
        c_w = c_kl
        inv_qw = inv_q
        big_w = kp * g_p if REVERSE else g_q
        if DOMINANT:
            # The weight side's rest 1 - w_max below 2^-7 (log s1 relative to its max).
            l_w = l_p if REVERSE else l_q.to(f64)
            dominant = read_q & (kl < big) & (l_w < DOMINANT_LOG_S1)
        # The log-ratio's d_p = z - m = ln2 (d2 + rho_hi) (`bwd_exps`: d2 = (x - m) c - rho_hi)
        # goes into per-row factors, its constant part computed in fp64 and rounded once.
        ln2 = _ln2(g_p)
        ln2_rho = _ln2(rho_hi.to(f64)) * rho_hi.to(f64)
        if FRAMED:
            # q_j = e_q kq, kq = 2^(rho_hi - b_q): kp / kq (reverse; kq / kp forward) is e^dl,
            # exactly 1 where the forward's KL and c are 0 (a reference equal to the logits);
            # where dl is not finite (a KL = +inf row, whose other side keeps its gradient)
            # from the two normalizers.
            kq_own = tl.exp((rho_hi.to(f64) - b_q.to(f64)) * _ln2(rho_hi.to(f64)))
            own = kp.to(f64) / kq_own if REVERSE else kq_own / kp.to(f64)
            ratio64 = tl.where(tl.abs(dl) < big, tl.exp(dl), own)
            kq = kp.to(f64) / ratio64 if REVERSE else kp.to(f64) * ratio64
            ratio = ratio64.to(ACC)
        if REVERSE:
            big_g = kp * g_p
            if FRAMED:
                # (q_j - p_j) g_q = (e_q - ratio e) kq g_q; the weight's G ((d_p - d_q) - c) =
                # G ln2 (d2 - d2_q) - G c: G ln2 as g_p, -G c on a.
                a_kl = (a.to(f64) - big_g.to(f64) * c_kl.to(f64)).to(ACC)
                g_p = big_g * ln2
                f_q = (kq * g_q.to(f64)).to(ACC)
            elif SERIES:
                # p_j g_p ((d_p - d_q) - c) = e (G ln2 r - G c), G = kp g_p, r = (d_p - d_q) /
                # ln2 from one small difference per element (`_bwd_values`): G ln2 as g_p, -G c
                # on a; token_stats' b as it is.
                a_kl = (a.to(f64) - big_g.to(f64) * c_kl.to(f64)).to(ACC)
                g_p = big_g * ln2
                r_hi = log_ratio_cap(g_p)
            else:
                # = e G (ln2 d2 + ln2 rho_hi - c - d_q): G ln2 on b, G (ln2 rho_hi - c) on a,
                # -G / tau_q on x_q - a_q (as g_p).
                b_kl = tl.fma(big_g, ln2, b)
                a_kl = (a.to(f64) + big_g.to(f64) * (ln2_rho - c_kl.to(f64))).to(ACC)
                g_p = -big_g * inv_q
            f_o = kp * g_q
        else:
            f_o = kp * g_p
            k_d = g_q * ln2
            if FRAMED:
                # (p_j - q_j) g_p = (e - ratio e_q) kp g_p (not on a); q_j g_q ((d_q - d_p) - c)
                # = e_q (kq g_q ln2 (d2_q - d2) - kq g_q c).
                g_p = kp * g_p
                kq_g = kq * g_q.to(f64)
                k_d = (kq_g * ln2.to(f64)).to(ACC)
                shift = (-kq_g * c_kl.to(f64)).to(ACC)
            elif SERIES:
                # p_j g_p joins the other side's difference; g_q ((d_q - d_p) - c) = g_q ln2 r -
                # g_q c, r = (d_q - d_p) / ln2 from one small difference per element.
                shift = -g_q * c_kl
                r_hi = log_ratio_cap(k_d)
            else:
                # p_j g_p on a; g_q ((d_q - d_p) - c) = f_q (x_q - a_q) - k_d d2 + shift.
                a_kl = tl.fma(kp, g_p, a)
                f_q = g_q * inv_q
                shift = (-g_q.to(f64) * (ln2_rho + c_kl.to(f64))).to(ACC)

    out = dense_row_offset(row, V, ALIGN)  # the gradients are fresh contiguous tensors
    g_row = grad_ptr + out
    gq_row = grad_q_ptr + out
    if DOMINANT_ROWS:
        if dominant:
            _dominant_row(x_row, xq_row, g_row, gq_row, row, label, V, m, c, rho_hi, a_kl, b_kl,
                          q, kp, ratio, a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u,
                          r_hi, big_w, c_w, inv_qw, g_l, inv_tau, g_logprob_ptr,
                          g_entropy_ptr, g_collision_ptr, g_lse_ptr, lse_ptr, entropy_ptr,
                          collision_ptr, max_prob_ptr, argmax_ptr, REVERSE, NEED_X, NEED_Q,
                          SERIES, FRAMED, BLOCK_V)  # fmt: skip
        return
    start = chunk * CHUNK
    # Dominant rows are the DOMINANT_ROWS launch's: nothing to write here.
    n_valid = tl.where(dominant, 0, tl.minimum(V - start, CHUNK))
    if keep:
        if kl_on:
            _bwd_chunk(x_row, xq_row, g_row, gq_row, start, n_valid, V, m, c, rho_hi, a_kl, b_kl,
                       q, kp, ratio, a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi,
                       True, HAS_REF, REVERSE, NEED_X, NEED_Q, PAIRS, SERIES, FRAMED,
                       BLOCK_V)  # fmt: skip
        else:
            _bwd_chunk(x_row, xq_row, g_row, gq_row, start, n_valid, V, m, c, rho_hi, a, b, q,
                       kp, ratio, a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi, True,
                       False, REVERSE, NEED_X, NEED_Q, PAIRS, SERIES, FRAMED,
                       BLOCK_V)  # fmt: skip
    else:
        _bwd_chunk(x_row, xq_row, g_row, gq_row, start, n_valid, V, m, c, rho_hi, a, b, q, kp,
                   ratio, a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u, r_hi, False, False,
                   REVERSE, NEED_X, NEED_Q, PAIRS, SERIES, FRAMED, BLOCK_V)  # fmt: skip
    # The label's entry: dz + g_l / tau, rounded once, by the program holding it (the barrier
    # orders it after the block store of the same address by another thread). Without the KL
    # term in the row (no reference, or its upstream gradient 0) the label's and the argmax's
    # entries are token_stats' own, from fp64 (`bwd_value64`: the row's largest p_j, whose
    # fp32 2^d2 is within ~2 ulp on a GPU; peaked fp32 rows at tau 0.7, under a GPU's
    # arithmetic: 3.3e-7 off, plain PyTorch 3.5e-7, now 1.1e-7); with it, the label's entry
    # adds the K term in fp32 (the reference is not read otherwise: q_j = 1).
    if NEED_X:
        if keep & ok & ~dominant:
            am = tl.load(argmax_ptr + row).to(tl.int64)
            label_here = (label >= start) & (label < start + n_valid)
            am_here = (am >= start) & (am < start + n_valid) & (am != label) & (~kl_on)
            if label_here | am_here:
                tl.debug_barrier()
                # The row's fp64 numbers again, not kept live through the loop (registers).
                row64 = bwd_row(
                    x_row, row, label, keep, c, V, g_logprob_ptr, g_entropy_ptr,
                    g_collision_ptr, g_lse_ptr, lse_ptr, entropy_ptr, collision_ptr,
                    max_prob_ptr, argmax_ptr,
                )[10]  # fmt: skip
                if am_here:
                    store_entry64(x_row, g_row, am, m, c, rho_hi, row64, 0.0)
                if label_here:
                    if kl_on:
                        x_c = tl.load(x_row + label).to(ACC)
                        xq_c = tl.load(xq_row + label, mask=read_q, other=0.0).to(ACC)
                        dz_c, _ = _bwd_values(x_c, xq_c, m, c, rho_hi, a_kl, b_kl, q, kp, ratio,
                                              a_q, k_q, b_q, f_q, k_d, shift, g_p, g_q, f_o, dl_u,
                                              r_hi, HAS_REF, REVERSE, SERIES, FRAMED)  # fmt: skip
                        dz_c += g_l * inv_tau
                        tl.store(g_row + label, round_to(dz_c, g_row.dtype.element_ty))
                    else:
                        store_entry64(x_row, g_row, label, m, c, rho_hi, row64, g_l)


# ------------------------------------------------------------------------------------------------
# Launchers: the interface of pg_kernels._C step_stats_forward / step_stats_backward.


def _same_temperature(a, b) -> bool:
    """Whether two (per-row tensor or None, scalar) temperatures are the same one: the same
    scalar, or the same tensor (the ops pass the logits' own when the other is not given)."""
    (ta, sa), (tb, sb) = a, b
    if ta is None or tb is None:
        return ta is None and tb is None and sa == sb
    return (ta.data_ptr(), ta.shape, ta.stride(), ta.dtype) == (
        tb.data_ptr(), tb.shape, tb.stride(), tb.dtype,
    )  # fmt: skip


def _temperatures(t, scalar, n, acc, device):
    """(HAS_TEMP, the tensor passed as temp_ptr, scale_bits) as token_stats' kernels take them."""
    if t is not None:
        return True, t.contiguous(), 0
    return False, None, scalar_log2_scale_bits(scalar, acc)


def step_stats_forward(
    logits, rollout_logits, ref_logits, labels, temperature, temperature_scalar,
    rollout_temperature, rollout_temperature_scalar, ref_temperature, ref_temperature_scalar,
    reverse, ignore_index, tv, n_inner, stride_outer, stride_inner, rollout_n_inner,
    rollout_stride_outer, rollout_stride_inner, ref_n_inner, ref_stride_outer, ref_stride_inner,
    *, _block_v=None, _chunk=None,
):  # fmt: skip
    """[logprob, entropy, collision, lgp, lse, max_prob, argmax, token_kl, token_tv, kl,
    kl_state]: as pg_kernels._C.step_stats_forward (an absent tensor's outputs are empty:
    token_kl / token_tv / kl [0], kl_state [0, 3]; token_tv [0] with tv False, which skips its
    second read of the logits and the rollout). _block_v, _chunk: private overrides of the row
    blocking (tests and tuning only)."""
    _token._check_inputs(logits, labels, temperature, ignore_index)
    N, V = labels.numel(), logits.shape[-1]
    acc = acc_dtype_of(logits.dtype)
    dev = logits.device
    has_roll, has_ref = rollout_logits is not None, ref_logits is not None

    def rows(given):
        return torch.empty(N if given else 0, dtype=acc, device=dev)

    token = [rows(True) for _ in range(6)] + [torch.empty(N, dtype=torch.int64, device=dev)]
    tv = tv and has_roll
    token_kl, token_tv, kl = rows(has_roll), rows(tv), rows(has_ref)
    kl_state = torch.empty((N if has_ref else 0, KL_STATE), dtype=acc, device=dev)
    outs = [*token, token_kl, token_tv, kl, kl_state]
    if N == 0:
        return outs
    blk = _token._forward_blocking(V, logits.dtype, _block_v, _chunk)
    vec = min(16 // logits.dtype.itemsize, blk.block_v)
    u = max(1, min(8, blk.block_v // (vec * 32 * blk.num_warps)))
    layout = (n_inner, stride_outer, stride_inner)
    roll_layout = (rollout_n_inner, rollout_stride_outer, rollout_stride_inner)
    ref_layout = (ref_n_inner, ref_stride_outer, ref_stride_inner)
    # Full steps load 16-byte vectors where every row of every tensor starts 16-byte aligned
    # (bf16 as int32 pairs), else element-wise (`row_align`).
    align = rows_align((logits, *layout), (rollout_logits, *roll_layout),
                       (ref_logits, *ref_layout))  # fmt: skip
    pairs = logits.dtype == torch.bfloat16 and align > 1
    has_temp, temp, scale_bits = _temperatures(temperature, temperature_scalar, N, acc, dev)
    t = per_row_temperature(temperature, temperature_scalar, N, acc, dev)
    tr = per_row_temperature(rollout_temperature, rollout_temperature_scalar, N, acc, dev)
    tq = per_row_temperature(ref_temperature, ref_temperature_scalar, N, acc, dev)
    part = torch.empty((4, blk.n_chunks, N), dtype=_token.PART_DTYPE, device=dev)
    unused = rows(False)  # the pointer of an absent tensor's arguments, never read
    part_idx = torch.empty((blk.n_chunks, N), dtype=torch.int32, device=dev)
    part_r = torch.empty((PARTIAL, blk.n_chunks, N) if has_roll else (0,), dtype=acc, device=dev)
    part_q = torch.empty((PARTIAL, blk.n_chunks, N) if has_ref else (0,), dtype=acc, device=dev)
    exact_move = logits.dtype.itemsize == 2  # x + d of 16-bit logits is exact in fp32
    div_r = needs_division(
        temperature, temperature_scalar, rollout_temperature, rollout_temperature_scalar
    )
    # An fp32 / fp64 teacher sums in its own lanes at temperature 1 too (the division path, by
    # 1): x + d rounds at ulp(the logits' lane max), and a teacher of another scale lost that
    # (logits at +1000, a teacher at -300: the other side's KL gradient 2.9e-5 off where plain
    # fp32 PyTorch is 4e-8; 4.4e-7 since). Shifted teacher rows' KLs are then ~1e-15 (the
    # excess k), not 0; the rollout, the same model's logits, stays framed.
    div_q = not exact_move or needs_division(
        temperature, temperature_scalar, ref_temperature, ref_temperature_scalar
    )
    # Framed on the logits' lanes under a temperature too where x + d, the other side's logit
    # moved by the lanes' max difference, is exact: 16-bit logits (fp32 rounds it at ulp(|d|):
    # rows far apart, a KL gradient of 2.1e-6 where the truth is 0 and each side's own lanes
    # give 1.9e-7; its excess k keeps shifted rows' KLs at ~1e-15 instead).
    t_args = (temperature, temperature_scalar)
    roll_args = (rollout_temperature, rollout_temperature_scalar)
    same_r = exact_move and _same_temperature(t_args, roll_args)
    same_q = exact_move and _same_temperature(t_args, (ref_temperature, ref_temperature_scalar))
    flags = dict(HAS_TEMP=has_temp, HAS_ROLL=has_roll, HAS_REF=has_ref, REVERSE=bool(reverse))
    flags |= dict(EXCESS=pair_excess(logits.dtype))
    _fwd_chunk_kernel[(N, blk.n_chunks)](
        logits, rollout_logits if has_roll else logits, ref_logits if has_ref else logits, labels,
        temp if has_temp else labels, scale_bits, t, tr, tq, ignore_index, V, N, *layout,
        *roll_layout, *ref_layout, part, part_idx, part_r if has_roll else unused,
        part_q if has_ref else unused, **flags, CHUNK=blk.chunk, BLOCK_V=blk.block_v, U=u,
        VEC=vec, PAIRS=pairs, ALIGN=align, DIV_R=div_r, DIV_Q=div_q, OWN_R=div_r and not same_r,
        OWN_Q=div_q and not same_q, num_warps=blk.num_warps,
    )  # fmt: skip
    p_norm, r_norm = (torch.empty((N, 2) if tv else (0,), dtype=acc, device=dev) for _ in "pr")
    _fwd_finish_kernel[(cdiv(N, FINISH_BLOCK_R),)](
        logits, labels, temp if has_temp else labels, t, tr, tq, scale_bits, ignore_index, V, N,
        blk.n_chunks, *layout, part, part_idx, part_r if has_roll else unused,
        part_q if has_ref else unused, *token, token_kl if has_roll else unused,
        kl if has_ref else unused, kl_state if has_ref else unused, p_norm if tv else unused,
        r_norm if tv else unused, **flags, DIV_R=div_r, DIV_Q=div_q, TV=tv,
        BLOCK_R=FINISH_BLOCK_R, num_warps=4,
    )  # fmt: skip
    if tv:
        # TV needs both normalizers: mismatch_stats' second pass over the logits and the rollout.
        tv_blk = row_blocking(V, logits.dtype, _block_v, _chunk)
        tv_part = torch.empty((tv_blk.n_chunks, N), dtype=acc, device=dev)
        _mismatch._tv_chunk_kernel[(N, tv_blk.n_chunks)](
            logits, rollout_logits, labels, t, tr, p_norm, r_norm, tv_part, V, N, ignore_index,
            *layout, *roll_layout, DIVIDE=div_r, CHUNK=tv_blk.chunk,
            BLOCK_V=tv_blk.block_v, num_warps=tv_blk.num_warps,
            ALIGN=rows_align((logits, *layout), (rollout_logits, *roll_layout)),
        )  # fmt: skip
        _mismatch._tv_finish_kernel[(cdiv(N, FINISH_BLOCK_R),)](
            tv_part, labels, p_norm, r_norm, token_tv, N, tv_blk.n_chunks, ignore_index,
            BLOCK_R=FINISH_BLOCK_R, num_warps=4,
        )  # fmt: skip
    return outs


def _bf16_pairs(logits: torch.Tensor, n_inner: int, stride_outer: int, stride_inner: int) -> bool:
    """Whether every row of bf16 logits starts 4-byte aligned, so the backward's full steps can
    load int32 pairs (`PAIRS`)."""
    even_rows = stride_outer % 2 == 0 and (n_inner == 1 or stride_inner % 2 == 0)
    return logits.dtype == torch.bfloat16 and logits.data_ptr() % 4 == 0 and even_rows


def step_stats_backward(
    grad_logprob, grad_entropy, grad_collision, grad_lse, grad_kl, logits, ref_logits, labels,
    temperature, temperature_scalar, ref_temperature, ref_temperature_scalar, reverse,
    ignore_index, lse, entropy, collision, max_prob, argmax, kl, kl_state, need_logits_grad,
    need_ref_grad, n_inner, stride_outer, stride_inner, ref_n_inner, ref_stride_outer,
    ref_stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """[grad_logits, grad_ref_logits]: new contiguous tensors of the logits' (reference's) shape
    and dtype, or empty where not requested; as pg_kernels._C.step_stats_backward."""
    _token._check_inputs(logits, labels, temperature, ignore_index)
    N, V = labels.numel(), logits.shape[-1]
    has_ref = ref_logits is not None
    if has_ref and (grad_kl is None or kl is None or kl_state is None):
        raise ValueError(f"{OP}_backward: ref_logits needs grad_kl, kl and kl_state")
    if need_ref_grad and not has_ref:
        raise ValueError(f"{OP}_backward: need_ref_grad without ref_logits")
    dev = logits.device
    grad = (
        torch.empty(logits.shape, dtype=logits.dtype, device=dev)
        if need_logits_grad
        else logits.new_empty(0)
    )
    grad_ref = (
        torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=dev)
        if need_ref_grad
        else logits.new_empty(0)
    )
    if N == 0 or not (need_logits_grad or need_ref_grad):
        return [grad, grad_ref]
    acc = acc_dtype_of(logits.dtype)
    per_row = dict(grad_logprob=grad_logprob, grad_entropy=grad_entropy,
                   grad_collision=grad_collision, grad_lse=grad_lse, lse=lse, entropy=entropy,
                   collision=collision, max_prob=max_prob)  # fmt: skip
    if has_ref:
        per_row |= dict(grad_kl=grad_kl, kl=kl)
    for name, t in per_row.items():
        if t.numel() != N:
            raise ValueError(f"{OP}_backward: {name} has {t.numel()} elements, expected {N}")
    flat = {k: t.reshape(-1).to(acc).contiguous() for k, t in per_row.items()}
    am = argmax.reshape(-1).to(torch.int64).contiguous()
    if has_ref and kl_state.numel() != KL_STATE * N:
        raise ValueError(f"{OP}_backward: kl_state must hold {N} x {KL_STATE} numbers")
    st = kl_state.reshape(-1).to(acc).contiguous() if has_ref else flat["lse"]
    has_temp, temp, scale_bits = _temperatures(temperature, temperature_scalar, N, acc, dev)
    t = per_row_temperature(temperature, temperature_scalar, N, acc, dev)
    tq = per_row_temperature(ref_temperature, ref_temperature_scalar, N, acc, dev)
    same_tau = int(_same_temperature(
        (temperature, temperature_scalar), (ref_temperature, ref_temperature_scalar)
    ))  # fmt: skip
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    layout = (n_inner, stride_outer, stride_inner)
    pairs = _bf16_pairs(logits, *layout) and blk.block_v % 2 == 0
    if has_ref:
        pairs = pairs and _bf16_pairs(ref_logits, ref_n_inner, ref_stride_outer,
                                      ref_stride_inner)  # fmt: skip
    g_kl = flat["grad_kl"] if has_ref else flat["lse"]
    kl_rows = flat["kl"] if has_ref else flat["lse"]
    # Rows whose KL weight side has a dominant entry take a launch of their own (DOMINANT_ROWS).
    dominant = has_ref and bool(need_logits_grad if reverse else need_ref_grad)
    for rows in (False, True) if dominant else (False,):
        _bwd_kernel[(N, 1 if rows else blk.n_chunks)](
            logits, ref_logits if has_ref else logits, labels, temp if has_temp else labels,
            scale_bits, t, tq, same_tau, ignore_index, V, n_inner, stride_outer, stride_inner,
            ref_n_inner,
            ref_stride_outer, ref_stride_inner, flat["grad_logprob"], flat["grad_entropy"],
            flat["grad_collision"], flat["grad_lse"], g_kl, flat["lse"], flat["entropy"],
            flat["collision"], flat["max_prob"], am, kl_rows, st,
            grad if need_logits_grad else grad_ref, grad_ref if need_ref_grad else grad,
            HAS_TEMP=has_temp, HAS_REF=has_ref, REVERSE=bool(reverse),
            NEED_X=bool(need_logits_grad), NEED_Q=bool(need_ref_grad),
            DIVIDE_Q=needs_division(ref_temperature, ref_temperature_scalar, None, 1.0),
            PAIRS=pairs, CHUNK=blk.chunk, BLOCK_V=blk.block_v, num_warps=blk.num_warps,
            ALIGN=rows_align((logits, *layout), grad, grad_ref,
                             (ref_logits, ref_n_inner, ref_stride_outer, ref_stride_inner)),
            DOMINANT=dominant, DOMINANT_ROWS=rows,
        )  # fmt: skip
    return [grad, grad_ref]
