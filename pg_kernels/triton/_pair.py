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
exponent of an entry is (x - m) k with k = log2(e) / tau and m the lane's max logit, an exact
difference of 16-bit logits rounded once, so the error is relative to z - m, not to z, and
two rows that differ by a constant get the same exps bitwise at any temperature.
u takes d_w - d_v from exact differences of the logits at temperature 1, from the exponents
otherwise (each rounded relative to z - m, as z = x / tau itself would be relative to z).
A chunk's sums are relative to its max logit's own z, x_max / tau unrounded (e = x_max / tau -
m, the exact residual of the division rounded once, goes with m into the merges). The lane
holding the max counts that entry as exactly 1, not as 2^-rho 2^rho rounded, and each side's
sum is kept as r = s1 - 1 (the rest; `PARTIAL`): a one-hot or single-entry row sums to exactly
1 (its KL was 6e-8, then 1.4e-8 at V = 1 under a temperature, where the truth is 0), and a
peaked row's rest keeps its own 24 bits instead of ulp(1). The finish kernels evaluate the KL
in fp64 (`finalize_kl`: log1p of the rests, the logs cancelled first) and hand the backward
log s1 and c = E_w[d_w - d_v] moved to a / tau, a = (x_max / tau rounded) * tau rounded, the
raw logit it rebuilds from the saved max (`row_exponent`, `reference_shift`: a shift of 0 when
a = x_max, as usual), so that the backward's d_w - d_v and the forward's c cancel exactly at a
shared max (relative to the rounded max instead, they were ulp(z) / 2 apart: a gradient of
-2.0e-3 where the truth is 0, two one-hot rows at tau 0.07).
Near-equal rows: u / s1_w + log s1_v - log s1_w cancels O(1) terms to a KL of O(delta^2), and
fp32 lanes left each normalizer's rounding in it, a few ulp(1) absolute (an fp32 [1, 9] row at
tau 0.072: 6.0e-8 where the truth is 4.6e-17 and plain PyTorch, which rounds both rows alike,
2.7e-13). The lanes of fp32 logits (`pair_excess`) also sum the excess k = sum e^{d_w} f(delta),
f(x) = e^x - 1 - x, delta = d_v - d_w (`excess_terms`: a series where |delta| < 1/4), moved
with the maxes by `rescale_excess` (lanes, chunk, `merge_pair`), and the finish takes
k / s1_w - (r - log1p r), r = (k - u) / s1_w (docs/math.md §4, as the C++ pass): 5e-18 there.
A term with v_j = 0 (x_v = -inf) under x_w > -inf makes u infinite or NaN: the chunk's `inf`
flag (its u and k are stored as 0). A side holding a NaN or +inf has a NaN sum, hence a NaN max; the
two sides stay independent, so a broken rollout row leaves the logits' normalizer intact.
A chunk side with no logit above the lanes' floor (`lane_floor`: -1e30 or finfo.min masks) is
read again for its raw max M and the chunk summed relative to it (`redo_far_chunk`, rare), so
a row masked whole is uniform; fp32 / fp64 rows that far out under a temperature take their
later exponents relative to M read again (`reads_max`), not to m tau rounded.

The chunk's state goes to `partials` [PARTIAL, n_chunks, N] (chunk-major: the merge reads
consecutive rows), and the op's finish kernel merges each row's chunks in chunk order with
`merge_row`: a fixed order, elementwise over rows, so results are deterministic and batch
invariant. Partial-state traffic is 32 (fp32) or 64 (fp64) bytes per chunk and row (each side's max
carries its e into the merges): V = 151936 bf16 has 10 chunks per row, 320 B
against 608 KiB of logits read.

GPU design (sm_90, compiled offline by .ci/check_triton_sm90.py; the forward at T = 1 read at
0.97x two reads on an H200, benchmarks/results/cuda-h200): the
hot loop's SASS instructions per element pair, before (one block max, three block sums and a
merge per step: 8 block reductions, 24 BAR + 54 SHFL per step) -> after (no BAR, no SHFL):
    bf16  43.8 -> 19.2 at tau = 1,  74.8 -> 17.4 with a temperature;  74 / 64 registers
    fp16  42.8 -> 18.5,             73.8 -> 16.4;                      64 registers
    fp32  59.6 -> 17.8,             90.5 -> 15.8 (budget 40 per fp32 pair); 48 registers
    fp32 with the excess k: 35.1 at tau = 1, 35.9 with a temperature ((x - m) k there too);
          48-80 registers
    (x - m) k at every temperature (2026-12-04): bf16 19.2-19.4, fp16 17.9-18.0, fp32 with the
          excess k 33.1-33.8; 59-64 registers (16-bit), 63-64 (fp32)
    bf16 widened by `_common.widen` (a shift or a mask per element) and the excess k moved
          by a factor of 0 adding 0 (`rescale_excess`), 2026-12-05: bf16 17.8-18.6, fp16
          17.9-18.4, fp32 33.6-34.2
Full blocks are loaded unmasked (block i + 1 before block i is reduced; the last step reloads
its own block rather than masking, whose fill values cost an instruction per element).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    INTERPRETED,
    LOG2E,
    div_acc,
    ex2,
    exp_acc,
    floor_log_ratio,
    load_lanes,
    log1p_acc,
    lowest_finite,
    max_nan,
    round_to,
    row_offset,
    rows_align,
    widen,
)

LN2 = tl.constexpr(0.6931471805599453)

# Fields of a chunk's partial state: m_w, s1_w - 1, m_v, s1_v - 1, u, inf (0, 1 or
# `OVERFLOWED`), e_w, e_v, and the excess k (`excess_terms`; 0 without `pair_excess`).
# Each side's sum is kept as r = s1 - 1, the sum without its max entry (exactly 1): a peaked
# row's s1 = 1 + 2.6e-6 rounded to fp32 lost ulp(1) = 1.2e-7 of a log s1 ~ 2.6e-6 (a KL of
# 4.1e-5 off by 1.6e-7, plain PyTorch 3.9e-8); r keeps its own 24 bits (log1p in the finish).
PARTIAL = 9
# The `inf` flag of a chunk whose u overflowed in its own frame, no -inf against mass in it
# (`_shifted_chunk`): +inf only while that chunk's w side keeps mass in the row (`_moved_flag`).
OVERFLOWED = tl.constexpr(2.0)
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
def merge_pair(m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, bm_w, br_w, bm_v, br_v, bu, binf, be_w,
               be_v, bk, EXCESS: tl.constexpr):  # fmt: skip
    """merge_pair of softmax_stats.h, elementwise: both states rescaled to the joint maxes.

        u <- e^{D_w} (u + (D_w - D_v) s1_w)   per state, D = m_state - m_joint
    A NaN max (a broken side) makes that side's sums and u NaN, never the other side's sums.
    e_w, e_v: each side's sums are relative to m + e (`_side_total`); e goes with its max.
    r_w, r_v: each side's s1 - 1 (`PARTIAL`). EXCESS: k too (`rescale_excess`).
    """
    new_w = max_nan(m_w, bm_w)
    new_v = max_nan(m_v, bm_v)
    ne_w = tl.where(bm_w > m_w, be_w, e_w)
    ne_v = tl.where(bm_v > m_v, be_v, e_v)
    dw_a, aw = _rescale_factor(m_w, e_w, new_w, ne_w)
    dv_a, av = _rescale_factor(m_v, e_v, new_v, ne_v)
    dw_b, bw = _rescale_factor(bm_w, be_w, new_w, ne_w)
    dv_b, bv = _rescale_factor(bm_v, be_v, new_v, ne_v)
    if EXCESS:
        # An empty w side (m = -inf) sums to 0, whatever its r (the chunk kernel stores 0).
        s_a = tl.where(m_w == float("-inf"), 0.0, 1.0 + r_w)
        s_b = tl.where(bm_w == float("-inf"), 0.0, 1.0 + br_w)
        k = rescale_excess(k, u, s_a, aw, av, dv_a - dw_a) + rescale_excess(
            bk, bu, s_b, bw, bv, dv_b - dw_b
        )
    # A state whose w side moves by a factor of 0 adds nothing to u: its D_w - D_v can be ~1e38
    # (chunks masked whole with finfo.min, each side's M / tau at its own temperature), and
    # times s1_w that overflowed to inf, 0 * inf = NaN: a KL of 0 where the truth is 0.11.
    u = _moved_u(aw, u, dw_a - dv_a, 1.0 + r_w) + _moved_u(bw, bu, dw_b - dv_b, 1.0 + br_w)
    inf = tl.maximum(_moved_flag(aw, inf), _moved_flag(bw, binf))
    return (new_w, _merge_rest(aw, r_w, bw, br_w), new_v, _merge_rest(av, r_v, bv, br_v), u,
            inf, ne_w, ne_v, k)  # fmt: skip


@triton.jit
def _moved_flag(a_w, inf):
    """A state's `inf` flag after its w side moved by a_w: an `OVERFLOWED` u is dropped where
    a_w is 0 (no mass of that state's w side is left in the row: a chunk masked with finfo.min
    whose own frame summed every fill as 1 against the other side's, +inf where the truth is
    0.25 .. 1.34); a -inf against mass (1) stays whatever the move."""
    return tl.where((inf == OVERFLOWED) & (a_w == 0), 0.0, inf)


@triton.jit
def _moved_u(a_w, u, dd, s_w):
    """u moved with its pair state, e^{D_w} (u + (D_w - D_v) s_w), 0 where e^{D_w} is 0: a
    state without mass after the move, whose dd may be infinite (a v side's move past the
    float range: a finfo.min fill, k > 1) or its product with s_w overflow (one near the
    range), 0 * inf. Where the `inf` flag travels apart from u (`merge_pair`: each chunk's
    flag; `_shifted_chunk`: the chunk read for a -inf against a finite logit), never where it
    is read off u (the main loop's lanes: a lane's u of +inf from a finite w logit against a
    -inf, whose w_j underflows after a later move, must still raise it)."""
    return tl.where(a_w == 0, 0.0, a_w * (u + dd * s_w))


@triton.jit
def _merge_rest(fa, ra, fb, rb):
    """s1 - 1 of fa (1 + ra) + fb (1 + rb) without forming either sum: fa ra + fb rb + (fa + fb
    - 1), the last as (max - 1) + min, exact where the larger factor is 1 (the state holding
    the joint max; 0 for two empty states, whose s1 - 1 is -1)."""
    return fa * ra + fb * rb + ((tl.maximum(fa, fb) - 1.0) + tl.minimum(fa, fb))


@triton.jit
def fma_acc(a, b, c):
    """a * b + c rounded once, as the GPU's fma. The interpreter rounds the product first (an
    error of ulp(a * b), not of the result): there, fp32 operands are multiplied in fp64 (exact)
    and added in fp64, so that CPU tests see the GPU's rounding."""
    if INTERPRETED and a.dtype == tl.float32:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


# f(x) = e^x - 1 - x = x^2 sum_n x^n / (n + 2)!: the coefficients 1 / (n + 2)! (softmax_stats.h
# excess_coef), 6 of them for fp32 (the first left out is below half an ulp of f where
# |x| < 1/4), 12 for fp64; and that bound, below which f comes from the series (above it from
# the exps, whose difference then cancels ~30x at most).
EXCESS_COEF = tl.constexpr(tuple(1.0 / math.factorial(n + 2) for n in range(12)))
NEAR = tl.constexpr(0.25)
# finalize_kl's excess form only below this KL (softmax_stats.h's kNearKl).
NEAR_KL = tl.constexpr(0.25)


@triton.jit
def horner(y, COEF: tl.constexpr, TOP: tl.constexpr):
    """sum_{n <= TOP} COEF[n] y^n by Horner's rule: one FFMA per coefficient after the first.
    It starts at y COEF[TOP] + COEF[TOP - 1]; a start at p = y * 0 + COEF[TOP] (to take y's
    shape) cost an FFMA per element, y * 0 not being 0 for an infinite y."""
    p = y * COEF[TOP] + COEF[TOP - 1]
    for n in tl.static_range(TOP - 2, -1, -1):
        p = p * y + COEF[n]
    return p


@triton.jit
def excess_series(y):
    """f(y) = e^y - 1 - y from its Taylor series (softmax_stats.h `expm1_excess`), accurate
    relative to f where |y| < 1/4 (garbage elsewhere)."""
    if y.dtype == tl.float64:
        p = horner(y, EXCESS_COEF, 11)
    else:
        p = horner(y, EXCESS_COEF, 5)
    return y * y * p


# f(-u x) = x^2 sum_n c_n (-u)^n u^2 x^n: the series of f at delta = -u x for the fp32 lanes'
# terms, the unit u folded into the coefficients, for x = d_w - d_v in nats (u = 1) or log2
# units (u = ln 2). 5 terms: the first left out is <= 3.9e-7 of f at |delta| = 1/4, a tenth of
# the far side's cancellation there (e_v - e_w (1 + delta): ~70 fp32 ulps of f), so a sixth
# would cost step_stats' forward, with two pairs per element, 2 SASS instructions per fp32
# element triple (56.7-56.9 of 60 now) for no accuracy.
EXCESS_NATS = tl.constexpr(tuple(c * (-1.0) ** n for n, c in enumerate(EXCESS_COEF.value[:5])))
EXCESS_LOG2 = tl.constexpr(
    tuple(c * (-LN2.value) ** n * LN2.value**2 for n, c in enumerate(EXCESS_COEF.value[:5]))
)


@triton.jit
def excess_terms(ew, ev, diff, LOG2: tl.constexpr):
    """The excess terms e_w f(delta) of a pair in fp32 lanes (docs/math.md §4; pair_rows.h
    `excess_terms`), delta = -diff u, diff = d_w - d_v in log2 units (LOG2, u = ln 2) or nats:
    from the series where |delta| < 1/4 (relative to the term, ~e_w delta^2 / 2); elsewhere
    e_v - e_w (1 + delta) from the exps (the term is then >= 0.028 e_w, their roundings a few
    ulps of it), which also gives e_v where e_w = 0 (diff floored, finite) and +inf where
    e_v = 0 < e_w (a KL = +inf row, flagged with u)."""
    tl.static_assert(ew.dtype == tl.float32)
    # far = e_v - e_w (1 + delta) as fma(e_w, delta - 1, e_v): bitwise the same, and no
    # unary minus (Triton's -x is 0 - x, one FADD per element that ptxas cannot fold).
    if LOG2:
        far = tl.fma(ew, tl.fma(diff, LN2, -1.0), ev)
        p = horner(diff, EXCESS_LOG2, 4)
        near = tl.abs(diff) < NEAR / LN2
    else:
        far = tl.fma(ew, diff - 1.0, ev)
        p = horner(diff, EXCESS_NATS, 4)
        near = tl.abs(diff) < NEAR
    return tl.where(near, (ew * diff) * (diff * p), far)


@triton.jit
def rescale_excess(k, u, s_w, a_w, a_v, dd):
    """k of a pair whose w side's sums move by a_w = e^{D_w} and v side's by a_v = e^{D_v}, every
    delta by dd = D_v - D_w (nats), u (nats) and s_w taken before the move (softmax_stats.h
    `rescale_pair`): f(delta + D) = e^D f(delta) + expm1(D) delta + f(D), so
        k <- a_v k - a_w expm1(dd) u + a_w f(dd) s_w
    with f(dd) from the series where |dd| < 1/4 (an exact move where dd = 0, as at a settled
    lane max), else from a_v - a_w (1 + dd) (a_w = e^{-dd} a_v, also where a_w underflows).
    An empty w side must come with s_w = u = 0."""
    near = tl.abs(dd) < NEAR
    fd = a_w * excess_series(tl.where(near, dd, 0.0))
    wd = tl.where(a_w == 0, 0.0, a_w * dd)  # 0, not 0 * inf, where the w side moved to nothing
    b = tl.where(near, fd, (a_v - a_w) - wd)  # a_w f(dd)
    a = tl.where(near, fd + wd, a_v - a_w)  # a_w expm1(dd)
    return a_v * k - a * u + b * s_w


# expm1(-u y) = sum_n (-u y)^n / n!, n = 1..6, as y sum_n c_n y^(n - 1): the coefficients of
# `other_side_difference` for y in nats (u = 1) or log2 units (u = ln 2). 6 terms: the first
# left out, delta^7 / 7!, is 4.8e-8 of delta at |delta| = 1/4, below half an fp32 ulp.
EXPM1_NATS = tl.constexpr(tuple((-1.0) ** n / math.factorial(n) for n in range(1, 7)))
EXPM1_LOG2 = tl.constexpr(tuple((-LN2.value) ** n / math.factorial(n) for n in range(1, 7)))


@triton.jit
def other_side_difference(w, y, far, LOG2: tl.constexpr):
    """The backward's other side of KL(w || v), v_j - w_j times a factor s, in fp32 (pair_rows.h
    `other_side_difference`): where |delta| < 1/4, delta = log v_j - log w_j = -y u (y in log2
    units with LOG2, u = ln 2, else nats), w_j s expm1(delta) from its series, w = w_j s (no
    two probabilities cancel: the error is relative to the result, plus delta's own); elsewhere
    `far`, the difference of the two exps. y = (d_w - d_v) + dl / u with dl = log s1_v -
    log s1_w taken as KL - c (two small numbers on near-equal rows). A NaN or infinite y (a -inf
    logit, a KL = +inf row's NaN dl) takes `far`."""
    tl.static_assert(w.dtype == tl.float32)
    if LOG2:
        p = horner(y, EXPM1_LOG2, 5)
        near = tl.abs(y) < NEAR / LN2
    else:
        p = horner(y, EXPM1_NATS, 5)
        near = tl.abs(y) < NEAR
    return tl.where(near, w * (y * p), far)


@triton.jit
def log_s1_difference(kl, c, l_w, l_v):
    """dl = log s1_v - log s1_w for the other side's gradient (pair_rows.h's
    log_s1_difference): KL - c (KL = c - l_w + l_v), rounded at ~ulp(max(|KL|, |c|)), or the
    two logs, rounded at ~ulp(max(1, |l_w|, |l_v|)), whichever is the finer: the logs where KL
    or c exceeds max(1, |l_w|, |l_v|).
    Peaked and near-equal rows keep KL - c (the top entry of a peaked row's v_j - w_j: 1.9e-6
    off against 4.5e-3 from the logs); a side masked in part with a fill where the other has
    mass takes the logs (KL - c: 0.62 off at -1e30, 3.4e-5 at -1e4 where plain fp32 PyTorch is
    6e-7). NaN or infinite KLs take the logs."""
    logs = tl.maximum(tl.maximum(tl.abs(l_w), tl.abs(l_v)), 1.0)
    small = tl.maximum(tl.abs(kl), tl.abs(c)) <= logs
    return tl.where(small, kl - c, l_v - l_w)


@triton.constexpr_function
def has_other_series(XDT):
    """Whether the backward of logits of dtype XDT takes the other side's v_j - w_j from
    `other_side_difference`: fp32 only. Its ~12 SASS instructions per element pair fit fp32's
    budget of 40 (17.6-19.1 without it), not the 16-bit loops' 20 (18.3-19.9); fp64's plain
    difference cancels at ~1e-16 (the rule's fp64 floor)."""
    return XDT == tl.float32


@triton.jit
def exp_base(t):
    """The exponential of the lane arithmetic: 2^t in fp32 (t carries log2(e), one MUFU.EX2),
    e^t in fp64 (t in natural units: Triton has no fast fp64 exp2)."""
    if t.dtype == tl.float64:
        return tl.exp(t)
    else:
        return ex2(t)


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
    it counts as empty: x k < -2^28 in fp32 (-2^50 in fp64), so that a lane's reference
    r = fl(m k) rounds by 8 (1/8) at most, the exponent of its max within the range (masks of
    `-1e30` or `finfo.min`, |x| k ~ 1e30: r rounded by ~2^75, and 2^(x k - r) was inf). A
    chunk side with no logit above it is summed again relative to its own raw max
    (`pair_chunk_kernel`'s second pass), so a row masked whole is uniform, not empty."""
    if k.dtype == tl.float64:
        big = -(2.0**50)
    else:
        big = -(2.0**28)
    return big / k


@triton.jit
def max_logit(m, tau, XDT: tl.constexpr):
    """The raw logit whose z is m: m tau rounded, and rounded once more to the logits' dtype XDT
    when that is 16-bit, where it is then the max logit itself (m tau is within 2^-23 of it,
    far inside half a 16-bit ulp): a single-entry or one-hot row's max then has exponent
    exactly 0 in the backward, as in the forward's sums (`_side_total`). fp32 and fp64 logits
    keep m tau, usually the max logit, else an ulp from it (`reference_shift`)."""
    a = m * tau
    if XDT.primitive_bitwidth == 16:
        a = round_to(a, XDT).to(m.dtype)
    return a


# |m| (z units) from which fp32 and fp64 sides under a temperature take their exponents relative
# to the max logit read again (`reads_max`): there a = m tau rounded can miss it by 2^24 tau
# ulp(1), an exponent of ~1 and more.
FAR_Z = tl.constexpr(2.0**24)


@triton.jit
def reads_max(m, DIVIDE: tl.constexpr, XDT: tl.constexpr):
    """Whether a valid side of max m (z units) takes its exponents relative to its max logit
    itself, read again from the row (`row_exponent`), not to `max_logit`'s a = m tau rounded:
    fp32 and fp64 logits under a temperature with |m| >= FAR_Z, such as a row masked whole
    with a huge finite fill (-1e30 / tau), where a misses the max logit by an ulp of it
    (7.6e22) and every exponent (x - a) k with it. `reference_shift` leaves such sides
    relative to M / tau, as `pair_chunk_kernel` summed them. 16-bit logits need no read:
    `max_logit` rounds back to the max logit itself."""
    if DIVIDE and XDT.primitive_bitwidth > 16:
        return side_is_valid(m) & (tl.abs(m) >= FAR_Z)
    else:
        return tl.abs(m) < 0  # false, NaN included


@triton.jit
def row_max(row_ptr, V, read, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The max of the V logits at row_ptr in ACC where `read`, else -inf: a pass over a whole
    row (the rare rows `reads_max` picks) or over one chunk (`redo_far_chunk`)."""
    top = tl.full([BLOCK], float("-inf"), ACC)
    cols = tl.arange(0, BLOCK)
    for i in range(0, tl.where(read, V, 0), BLOCK):
        x = tl.load(row_ptr + i + cols, mask=cols + i < V, other=float("-inf"))
        top = tl.maximum(top, x.to(ACC))
    return tl.max(top, 0)


@triton.jit
def row_exponent(m, log_s1, tau, row_ptr, V, DIVIDE: tl.constexpr, XDT: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """(a, k, b) with (x - a) * k - b = (x / tau - a / tau - log_s1) * base, the exponent of a
    probability e^{z - a / tau - log s1} from a raw logit x (base = log2 e in fp32, 1 in fp64),
    with no division per element: a = m tau rounded, the row's max logit (or within an ulp of
    it), so x - a is exact or rounded relative to itself, k = base / tau and b = log s1 base.
    The finish kernels hand over log s1 relative to this same a / tau (`reference_shift`), not
    to the rounded m: an entry at the max gets exponent -log s1 exactly, and the errors are
    relative to |z - m| and |log s1|, never to |z|. Without DIVIDE: a = m. A side far out
    (`reads_max`) takes a = its max logit itself, read again from row_ptr [0, V) in blocks of
    BLOCK: its log s1 is relative to that (`reference_shift`)."""
    if DIVIDE:
        a = max_logit(m, tau, XDT)
        if XDT.primitive_bitwidth > 16:
            far = reads_max(m, DIVIDE, XDT)
            a = tl.where(far, row_max(row_ptr, V, far, m.dtype, BLOCK), a)
    else:
        a = m
    k, b = frame_scales(log_s1, tau, DIVIDE)
    return a, k, b


@triton.jit
def frame_scales(log_s1, tau, DIVIDE: tl.constexpr):
    """(k, b) of a frame whose reference logit a is known: p = 2^{(x - a) k - b} (e^ in fp64),
    k = `lane_scale`, b = log s1 in the exponent's units."""
    k = lane_scale(tau, DIVIDE)
    if DIVIDE and log_s1.dtype != tl.float64:
        b = log_s1 * LOG2E
    elif DIVIDE:
        b = log_s1
    else:
        b = log_s1 * k
    return k, b


@triton.jit
def tv_frame(m, r, e, tau, DIVIDE: tl.constexpr):
    """(a, log s1) of a merged side (`merge_row`: max z m, rest r = s1 - 1, residual e) for the
    TV pass: a = the side's max logit itself and log s1 relative to a / tau unrounded, the
    reference the sums already have (`_side_total`), so no shift rounds into it. a comes back
    exactly from m and e: fma(m, tau, e tau) is x_max plus the residual's own rounding, ~2^-23
    of ulp(x_max). Relative to `row_exponent`'s a = fl(m tau) instead (an ulp from x_max on
    some fp32 rows) each side's log s1 carried its own shift, rounded to fp32 apart: fp32 rows
    that differ by a constant had TVs of 8.3e-9 and 3.0e-7 where the truth is 0 (plain fp32
    PyTorch 9.8e-8 and 9.3e-9). log s1 is rounded once from fp64."""
    ok = side_is_valid(m)
    m0 = tl.where(ok, m, 0.0)
    if DIVIDE:
        a = fma_acc(m0, tau, tl.where(ok, e, 0.0) * tau)
    else:
        a = m0
    log_s1 = log1p_acc(tl.where(ok, r, 0.0).to(tl.float64)).to(m.dtype)
    return a, log_s1


@triton.jit
def store_tv_frame(norm_ptr, rows, rmask, keep, m, r, e, tau, DIVIDE: tl.constexpr):
    """A side's `tv_frame` (max logit, log s1) into norm_ptr [N, 2] for `_tv_chunk_kernel`."""
    a, log_s1 = tv_frame(m, r, e, tau, DIVIDE)
    store_frame(norm_ptr, rows, rmask, keep, side_is_valid(m), a, log_s1)


@triton.jit
def store_frame(norm_ptr, rows, rmask, keep, ok, a, log_s1):
    """A frame already taken (`tv_frame`) into norm_ptr [N, 2]: NaN for an invalid side (not
    ok), 0 for a row not kept (ignored)."""
    nan = float("nan")
    tl.store(norm_ptr + 2 * rows, tl.where(keep, tl.where(ok, a, nan), 0.0), mask=rmask)
    tl.store(norm_ptr + 2 * rows + 1, tl.where(keep, tl.where(ok, log_s1, nan), 0.0), mask=rmask)


# The excess k in the 16-bit pair lanes as well (PGK_PAIR_EXCESS_16BIT=1; the launchers read
# this flag at each call): the accurate near-equal KL of open class (1) (README, Testing) at
# 13-14 more SASS instructions per pair, for the GPU run to time against the default
# (benchmarks/gpu_check.sh, step `excess`).
EXCESS_16BIT = os.environ.get("PGK_PAIR_EXCESS_16BIT", "0") == "1"


@contextlib.contextmanager
def excess_16bit():
    """`EXCESS_16BIT` on for the launches inside (the benchmarks' A/B against the default)."""
    global EXCESS_16BIT
    before, EXCESS_16BIT = EXCESS_16BIT, True
    try:
        yield
    finally:
        EXCESS_16BIT = before


def pair_excess(dtype: torch.dtype) -> bool:
    """Whether the pair states of logits of `dtype` carry the excess k (`excess_terms`; the
    kernels' constexpr EXCESS): fp32, and bf16 / fp16 with `EXCESS_16BIT`. In the 16-bit pair
    loop it costs 13-14 SASS instructions per pair (17.9-19.4 of their budget of 20 -> 31.6-32.8)
    and doubles the registers; fp64 lanes cancel at ~1e-16 (the rule's fp64 floor)."""
    return dtype == torch.float32 or (EXCESS_16BIT and dtype.itemsize == 2)


@triton.jit
def pair_exps(xw, xv, aw, av, kw, kv, DIVIDE: tl.constexpr, CLAMP: tl.constexpr):
    """Each side's exps 2^t, t = (x - a) k relative to a reference logit a (a lane's max in the
    forward, `row_exponent`'s a in the backward), and their log-ratio: t_w - t_v (DIVIDE: each t
    rounded relative to itself, i.e. to z - a / tau, not z), else (x_w - a_w) - (x_v - a_v) in
    nats (exact differences of 16-bit logits, rounded once relative to the result). Two rows
    that differ by a constant get the same exps bitwise, at any temperature.
    CLAMP (`redo_far_chunk`'s second pass, fp32 lanes): an exponent that overflowed to -inf from a
    finite logit (a finfo.min fill times k > 1) is the lowest finite value instead, a finite
    logit with no mass as in the float64 truth, not a masked entry: on the w side always, on
    the v side where w has no mass there. Where it has, the -inf stays (KL +inf), as the C++
    `unmask_overflowed`: the truth where w_j |x| / tau is past fp32's range; where w_j is small
    the truth is finite (open: `test_small_mass_against_a_finfo_min_fill`)."""
    dxw = xw - aw
    dxv = xv - av
    tw = dxw * kw
    tv = dxv * kv
    if CLAMP and tw.dtype != tl.float64:
        lo = lowest_finite(tw.dtype)
        tw = tl.where((tw == float("-inf")) & (dxw > float("-inf")), lo, tw)
    ew = exp_base(tw)
    if CLAMP and tv.dtype != tl.float64:
        tv = tl.where((tv == float("-inf")) & (dxv > float("-inf")) & (ew == 0), lo, tv)
    ev = exp_base(tv)
    if DIVIDE:
        diff = tw - tv
    else:
        diff = dxw - dxv
    return ew, ev, diff


@triton.jit
def _pair_lanes(xw, xv, kw, kv, mw, mv, sw, sv, u, k, DIVIDE: tl.constexpr,
                EXCESS: tl.constexpr, CLAMP: tl.constexpr):  # fmt: skip
    """One block of [LANES, FOLD] logits of each side (raw, in the accumulation dtype, -inf where
    masked) into the per-lane state; FOLD neighbours of one 16-byte vector share a lane, so
    every reduction here stays inside a thread.

    Lane state: mw, mv = running max of the raw logits (monotone in z = x / tau, tau > 0);
    sw, sv = sums of 2^t with t = (x - m) k (k = log2(e) / tau rounded; x - m is exact for
    16-bit logits, so t rounds once relative to itself, i.e. to z - m, not z); u = sum 2^{t_w}
    (d_w - d_v), in nats (without DIVIDE: d_w - d_v = (x_w - x_v) - (m_w - m_v), exact
    differences of 16-bit logits, rounded once relative to the result) or in exponent units
    (DIVIDE: t_w - t_v). Two rows that differ by a constant get the same exps bitwise, at any
    temperature, and a KL of exactly 0. (One fma x k - fl(m k) per entry, an instruction less
    per pair, rounded each row's reference differently: 16-bit KLs of 3e-8..6e-8 where the
    truth is 0 at tau 5.7 and 12.7, and peaked rows whose lane sums 1 + rest rounded apart by
    ulp(1) / 2, a KL of 6e-8 for 9e-14; in fp32, with the excess k, KLs of 1e-21..4e-16.)
    A term with x_w finite and x_v = -inf (w_j > 0 = v_j) makes u +inf or NaN: the chunk's
    `inf` flag. Rescaling a lane to a higher max is branchless: 2^{delta}, delta = 0 once the
    lane's max has settled.
    EXCESS: k = sum e_w f(delta) too (`excess_terms`, delta = -(d_w - d_v) in nats), moved with
    the lane's maxes by `rescale_excess`. CLAMP: `pair_exps`' and `_moved_u`'s (the rare second
    pass, `redo_far_chunk`).
    """
    mw_new = tl.maximum(mw, tl.max(xw, 1))
    mv_new = tl.maximum(mv, tl.max(xv, 1))
    ew, ev, diff = pair_exps(xw, xv, mw_new[:, None], mv_new[:, None], kw, kv, DIVIDE, CLAMP)
    dw = (mw - mw_new) * kw
    dv = (mv - mv_new) * kv
    if DIVIDE:
        shift = dw - dv
    else:
        shift = (mw - mw_new) - (mv - mv_new)
    aw = exp_base(dw)
    av = exp_base(dv)
    # x_w = -inf: diff = -inf (or NaN with x_v = -inf too) meets e_w = 0; the floor makes the
    # term 0.
    diff = floor_log_ratio(diff)
    if EXCESS:
        # u's units (log2 with DIVIDE in fp32, else nats) -> nats; delta = -diff.
        unit = nats_per_unit(xw, DIVIDE)
        k = rescale_excess(k, u * unit, sw, aw, av, shift * -unit)
        k += tl.sum(excess_terms(ew, ev, diff, DIVIDE), 1)
    if CLAMP:
        u = _moved_u(aw, u, shift, sw) + tl.sum(ew * diff, 1)
    else:
        u = aw * (u + shift * sw) + tl.sum(ew * diff, 1)
    sw = aw * sw + tl.sum(ew, 1)
    sv = av * sv + tl.sum(ev, 1)
    return mw_new, mv_new, sw, sv, u, k


@triton.jit
def z_residual(mz, x, tau):
    """x / tau - mz, the exact residual of mz = x / tau rounded once (fma's one rounding of
    mz tau - x is exact there), divided by tau rounded: what a side's reference m + e carries
    beyond its rounded z (`_side_total`, `_moved_max`, `reference_shift`)."""
    return div_acc(-fma_acc(mz, tau, -x), tau)


@triton.jit
def nats_per_unit(x, DIVIDE: tl.constexpr):
    """Nats per unit of the pair lanes' exponents and u: ln 2 with DIVIDE in fp32 (log2 units),
    else 1 (natural units: fp64, or temperature 1, where u takes raw logit differences)."""
    if DIVIDE and x.dtype != tl.float64:
        return LN2
    else:
        return 1.0


@triton.jit
def _side_total(m, r, s, k, tau, floor, DIVIDE: tl.constexpr, EXACT: tl.constexpr, d, off):
    """One side of a chunk from its lanes: (max in z units, raw max, lane -> chunk exponent,
    2^exponent, the sum less its max entry's 1, e: the sums are relative to mz + e, e = 0
    without DIVIDE). EXACT: the lanes' exponents are (x - m) k (`_pair_lanes`; r unused),
    else x k - r. d: None, or a per-lane shift of the logits whose exponents the lanes summed,
    (x + d) k - r (step_stats' sides framed on its logits' lanes, temperature 1; EXACT False):
    the lane maxes m are of x, the exponents of x + d, so a lane moves to the chunk's
    reference by r - (mc + d) k and its top entry is m + d. off: None, or a per-lane offset of
    the lanes' reference, exponents (x k - r) - off (step_stats' own sides, `_frame_offset`):
    a lane moves to the chunk's reference by (r - mc k) + off."""
    mc = tl.max(m, 0)
    mz = div_acc(mc, tau) if DIVIDE else mc
    # The chunk's sums are relative to the raw max itself, mc / tau unrounded: its entry is
    # exactly 1, so a single-entry (or one-hot) row sums to exactly 1 on each side and its KL
    # is exactly 0 (relative to a = mz tau rounded, which can differ from mc by an ulp, it was
    # 1.4e-8, V = 1 at tau 16.7). e = mc / tau - mz, the exact residual of the division
    # rounded once, goes with mz into the merges; `reference_shift` moves the row's sums to
    # the a / tau the backward rebuilds from mz.
    # c: each lane's exponents moved to the chunk's reference.
    if DIVIDE:
        e = z_residual(mz, mc, tau)
    else:
        e = mc * 0
    xt = m  # each lane's max and the chunk's, as the lanes' exponents saw them
    mt = mc
    if d is not None:
        xt = m + d
        mt = mc + d
    if EXACT:
        c = (m - mc) * k  # the lanes' exponents are relative to their max itself
    else:
        c = fma_acc(-mt, k, r)  # r - mc k in one rounding: the lane's r cancels exactly
        if off is not None:
            c = c + off  # at the top entry: minus its exponent (x k - r) - off, bitwise
    # An empty lane (still at the floor) adds nothing; its r is ~-2^28, rounded by 8 at most.
    f = tl.where(m == floor, 0.0, exp_base(c))
    # A lane holding the chunk max summed that entry as E = 2^rho (rho = m k - r, the rounding
    # of r) and f E, 2^-rho 2^rho rounded, is 1 - 2^-24 as often as 1: a one-hot row's KL came
    # out 6e-8 where the truth and plain PyTorch have 0. Its term is taken out of the lane sum
    # (the loop's own E, bitwise) and counted as exactly 1: the chunk's r = s1 - 1 is the rest,
    # plus 1 for each further lane that holds the max too (a tie).
    top = (m == mc) & (m != floor)
    if EXACT:
        e_top = exp_base((m - m) * k)  # 1 (0 * k), as the loop formed it
    else:
        t_top = fma_acc(xt, k, -tl.where(top, r, xt * k))
        if off is not None:
            t_top = t_top - tl.where(top, off, 0.0)
        e_top = exp_base(t_top)
    ties = tl.maximum(tl.sum(top.to(s.dtype), 0) - 1.0, 0.0)
    rest = tl.sum(tl.where(top, (s - e_top) * f, f * s), 0) + ties
    return mz, mc, c, f, rest, e


@triton.jit
def _pair_block(row_ptr, col, end, LANES: tl.constexpr, FOLD: tl.constexpr, ALIGN: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    """The raw [LANES, FOLD] block of a row at columns col + [0, LANES * FOLD); with MASKED,
    columns at or past `end` read -inf. Rows not 16-byte aligned (ALIGN 1) load element-wise,
    straight into the lanes (`load_lanes`)."""
    # (The forms measured best on sm_90: the loop's unmasked load adds the column to the row
    # pointer first, the offsets within the block staying constants; the masked one adds the
    # columns to the row pointer, which took the kernel from 99 to 58 registers in fp32.)
    if ALIGN > 1:
        offs = tl.arange(0, LANES)[:, None] * FOLD + tl.arange(0, FOLD)[None, :]
        if MASKED:
            cols = col + offs
            x = tl.load(row_ptr + cols, mask=cols < end, other=float("-inf"))
        else:
            x = tl.load(row_ptr + col + offs)
    else:
        lanes = tl.arange(0, LANES)[None, :] * FOLD
        x = load_lanes(row_ptr + col + lanes, FOLD, 1, col + lanes, end, MASKED)
        x = tl.reshape(x, [LANES, FOLD])
    return x


@triton.jit
def _widen_block(x, ACC: tl.constexpr, ALIGN: tl.constexpr):
    """A `_pair_block` in ACC: `widen` on vector loads' packed 16-bit pairs, a plain conversion
    of element-wise loads (one element per register already)."""
    if ALIGN > 1:
        x = widen(x, ACC)
    else:
        x = x.to(ACC)
    return x


@triton.jit(do_not_specialize=["ignore_index"])
def pair_chunk_kernel(
    xw_ptr, xv_ptr, labels_ptr, tw_ptr, tv_ptr, part_ptr, V, N, ignore_index,
    w_n_inner, w_s_outer, w_s_inner, v_n_inner, v_s_outer, v_s_inner,
    HAS_LABELS: tl.constexpr, DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    FOLD: tl.constexpr, EXCESS: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the pair state of one chunk of one row, into part_ptr
    [PARTIAL, n_chunks, N]. Ignored rows read nothing and store the empty state. EXCESS: the
    excess k too (`pair_excess`). ALIGN: both tensors' rows 16-byte aligned (`row_align`)."""
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
    w_row = xw_ptr + row_offset(row, w_n_inner, w_s_outer, w_s_inner, ALIGN)
    v_row = xv_ptr + row_offset(row, v_n_inner, v_s_outer, v_s_inner, ALIGN)
    floor_w = lane_floor(kw)
    floor_v = lane_floor(kv)
    mw, mv, sw, sv, u, k = _empty_lanes(floor_w, floor_v, LANES)
    start = chunk * CHUNK
    # Only the steps inside the row run (the last chunk can end early); none for ignored rows.
    n_valid = tl.where(keep, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    if ALIGN > 1:
        # Block i + 1 is loaded before block i is reduced (a block always in flight). Full
        # blocks need no bounds mask; the uniform flag (the last prefetch loads nothing) keeps
        # the loads vectorized.
        offs = tl.arange(0, LANES)[:, None] * FOLD + tl.arange(0, FOLD)[None, :]
        nxt_w = tl.load(w_row + start + offs, mask=n_full > 0, other=float("-inf"))
        nxt_v = tl.load(v_row + start + offs, mask=n_full > 0, other=float("-inf"))
        last = start + (n_full - 1) * BLOCK_V
        for i in range(0, n_full):
            xw = widen(nxt_w, ACC)
            xv = widen(nxt_v, ACC)
            # The last step prefetches its own block again: always in bounds, so no mask
            # (whose fill values cost an instruction per element).
            col = tl.minimum(start + (i + 1) * BLOCK_V, last)
            nxt_w = _pair_block(w_row, col, V, LANES, FOLD, ALIGN, False)
            nxt_v = _pair_block(v_row, col, V, LANES, FOLD, ALIGN, False)
            mw, mv, sw, sv, u, k = _pair_lanes(
                xw, xv, kw, kv, mw, mv, sw, sv, u, k, DIVIDE, EXCESS, False
            )
    else:
        # Rows not 16-byte aligned load element-wise, in the trip that reduces them: carried
        # into the next trip, a prefetched block's scalar registers cost copies (sm_90, bf16:
        # 21.3 SASS per element pair against 19.1).
        for i in range(0, n_full):
            col = start + i * BLOCK_V
            xw = _widen_block(_pair_block(w_row, col, V, LANES, FOLD, ALIGN, False), ACC, ALIGN)
            xv = _widen_block(_pair_block(v_row, col, V, LANES, FOLD, ALIGN, False), ACC, ALIGN)
            mw, mv, sw, sv, u, k = _pair_lanes(
                xw, xv, kw, kv, mw, mv, sw, sv, u, k, DIVIDE, EXCESS, False
            )
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        col = start + n_full * BLOCK_V
        xw = _widen_block(_pair_block(w_row, col, V, LANES, FOLD, ALIGN, True), ACC, ALIGN)
        xv = _widen_block(_pair_block(v_row, col, V, LANES, FOLD, ALIGN, True), ACC, ALIGN)
        mw, mv, sw, sv, u, k = _pair_lanes(
            xw, xv, kw, kv, mw, mv, sw, sv, u, k, DIVIDE, EXCESS, False
        )
    m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = _chunk_state(
        mw, mv, sw, sv, u, k, kw, kv, tau_w, tau_v, floor_w, floor_v, DIVIDE, EXCESS, False
    )
    store_chunk_state(
        part_ptr, chunk, row, N, m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, w_row, v_row, start,
        n_valid, tau_w, tau_v, DIVIDE, EXCESS, LANES, FOLD, BLOCK_V,
    )  # fmt: skip


@triton.jit
def store_chunk_state(part_ptr, chunk, row, N, m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, w_row,
                      v_row, start, n_valid, tau_w, tau_v, DIVIDE: tl.constexpr,
                      EXCESS: tl.constexpr, LANES: tl.constexpr, FOLD: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    """A chunk's pair state into part_ptr [PARTIAL, n_chunks, N] (grid (N, n_chunks)), after
    `redo_far_chunk` (the rows w_row, v_row; the chunk [start, start + n_valid))."""
    m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = redo_far_chunk(
        m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, w_row, v_row, start, n_valid, tau_w, tau_v,
        DIVIDE, EXCESS, LANES, FOLD, BLOCK,
    )  # fmt: skip
    idx = chunk.to(tl.int64) * N + row
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(part_ptr + idx, m_w)
    tl.store(part_ptr + plane + idx, r_w)
    tl.store(part_ptr + 2 * plane + idx, m_v)
    tl.store(part_ptr + 3 * plane + idx, r_v)
    tl.store(part_ptr + 4 * plane + idx, u)
    tl.store(part_ptr + 5 * plane + idx, inf)
    # A side that is empty or NaN has no residual to carry (and e would be NaN).
    tl.store(part_ptr + 6 * plane + idx, tl.where(side_is_valid(m_w), e_w, 0.0))
    tl.store(part_ptr + 7 * plane + idx, tl.where(side_is_valid(m_v), e_v, 0.0))
    if EXCESS:
        tl.store(part_ptr + 8 * plane + idx, k)


@triton.jit
def redo_far_chunk(m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k, w_row, v_row, start, n_valid, tau_w,
                   tau_v, DIVIDE: tl.constexpr, EXCESS: tl.constexpr, LANES: tl.constexpr,
                   FOLD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """A chunk's pair state as given (`PARTIAL`: m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k) or,
    where a side of it came out empty (m = -inf) and yet holds a finite logit, the chunk summed
    again relative to that side's raw max M (`_shifted_chunk`). Such a side had no logit above
    the lanes' floor (`lane_floor`): a chunk masked whole with a huge finite fill (-1e30,
    finfo.min), whose exps relative to the floor are all 0, so that a row masked whole read as
    a row of -inf (NaN) where it is uniform. A rare second pass over the chunk (BLOCK elements
    a step for the maxes; LANES lanes of FOLD for the sums, as the main loop's); a chunk of
    -inf on one side costs the read for its max only.
    With fp32 lanes a chunk whose `inf` flag is up is summed again too, with `pair_exps`'
    CLAMP: where a finite fill's exponent overflowed on one side only, its -inf had read as
    mass against none (finding (10), README; the backwards cap their log-ratio there,
    `_common.log_ratio_cap`). A row with a real -inf against mass pays that second pass and is
    +inf anyway."""
    empty_w = m_w == float("-inf")
    empty_v = m_v == float("-inf")
    repair = empty_w != empty_w  # False, as a tensor
    if m_w.dtype != tl.float64:
        repair = inf > 0
    if empty_w | empty_v | repair:
        top_w = row_max(w_row + start, n_valid, empty_w, m_w.dtype, BLOCK)
        top_v = row_max(v_row + start, n_valid, empty_v, m_v.dtype, BLOCK)
        shift_w = tl.where(side_is_valid(top_w), top_w, 0.0)
        shift_v = tl.where(side_is_valid(top_v), top_v, 0.0)
        if (shift_w != 0) | (shift_v != 0) | repair:
            m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = _shifted_chunk(
                w_row, v_row, start, n_valid, shift_w, shift_v, tau_w, tau_v, DIVIDE, EXCESS,
                LANES, FOLD, True,
            )  # fmt: skip
    return m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k


@triton.jit
def _chunk_state(mw, mv, sw, sv, u, k, kw, kv, tau_w, tau_v, floor_w, floor_v,
                 DIVIDE: tl.constexpr, EXCESS: tl.constexpr, CLAMP: tl.constexpr):  # fmt: skip
    """A chunk's pair state (`PARTIAL`: m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k) from its lane
    state (`_pair_lanes`). CLAMP: `_pair_lanes`' (lanes moved by a factor of 0 add 0)."""
    ACC: tl.constexpr = kw.dtype
    # One cross-lane merge per chunk: each lane moved to the chunk's max (merge_pair per lane).
    # The lanes' exponents are (x - m) k (`_pair_lanes`): no lane reference r.
    m_w, mc_w, cw, fw, r_w, e_w = _side_total(
        mw, None, sw, kw, tau_w, floor_w, DIVIDE, True, None, None
    )
    m_v, mc_v, cv, fv, r_v, e_v = _side_total(
        mv, None, sv, kv, tau_v, floor_v, DIVIDE, True, None, None
    )
    if DIVIDE:
        shift = cw - cv
    else:
        shift = (mw - mc_w) - (mv - mc_v)
    if EXCESS:
        unit = nats_per_unit(u, DIVIDE)
        # An empty w lane (still at the floor) has no terms but the v side's e_v, in k: moved by
        # f_v alone. A lane whose w entries only lie far below the chunk's max (f_w underflows
        # to 0: a peaked w side at a low temperature) is not empty: its k moves to f_v (k - u +
        # s_w) = f_v s_v through rescale_excess' far form (taken as empty, its k stayed in the
        # lane's frame: fp32 w at tau 0.2, KL 0.0413 where the truth is 0.0680).
        dd = tl.where(mw == floor_w, 0.0, shift * -unit)
        k = tl.sum(rescale_excess(k, u * unit, sw, fw, fv, dd), 0)
    else:
        k = tl.sum(k, 0)  # 0: one value per chunk, as with EXCESS
    if CLAMP:
        u = tl.sum(_moved_u(fw, u, shift, sw), 0)
    else:
        u = tl.sum(fw * (u + shift * sw), 0)
    if DIVIDE:
        if ACC != tl.float64:
            u = u * LN2  # exponent units (log2) -> nats
    # u is +inf or NaN iff some x_w > -inf has x_v = -inf (or a side is NaN, which wins).
    inf = tl.where((u == u) & (tl.abs(u) < float("inf")), 0.0, 1.0).to(ACC)
    u = tl.where(inf > 0, 0.0, u)
    k = tl.where(inf > 0, 0.0, k)
    nan = float("nan")
    # A NaN or +inf logit makes that side's sum NaN (a NaN max or inf - inf): the side is NaN.
    # A side with no logit above the floor (all -inf) is empty: max -inf, sums 0.
    m_w = tl.where(r_w != r_w, nan, tl.where(mc_w == floor_w, float("-inf"), m_w))
    m_v = tl.where(r_v != r_v, nan, tl.where(mc_v == floor_v, float("-inf"), m_v))
    return m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k


@triton.jit
def _empty_lanes(floor_w, floor_v, LANES: tl.constexpr):
    """The lane state of `_pair_lanes` before any logit: (mw, mv, sw, sv, u, k), each
    side's max at its floor (`lane_floor`, in the accumulation dtype), the sums 0."""
    ACC: tl.constexpr = floor_w.dtype
    mw = tl.zeros([LANES], ACC) + floor_w
    mv = tl.zeros([LANES], ACC) + floor_v
    sw = tl.zeros([LANES], ACC)
    sv = tl.zeros([LANES], ACC)
    u = tl.zeros([LANES], ACC)
    k = tl.zeros([LANES], ACC)
    return mw, mv, sw, sv, u, k


@triton.jit
def _shifted_chunk(w_row, v_row, start, n_valid, shift_w, shift_v, tau_w, tau_v,
                   DIVIDE: tl.constexpr, EXCESS: tl.constexpr, LANES: tl.constexpr,
                   FOLD: tl.constexpr, CLAMP: tl.constexpr):  # fmt: skip
    """The pair state of a chunk (`_chunk_state`) whose logits are moved by -shift_w and
    -shift_v, each side's raw max or 0: x - M is exact wherever it matters (from x >= 2 M;
    below that e^{(x - M) / tau} is 0 anyway), and the side's max is then 0, inside the floor;
    its sums are relative to 0, that is to M / tau: the state takes M's z and residual, as
    `_side_total` forms them. The rare second pass of `pair_chunk_kernel`: masked loads, no
    prefetch, half its lanes (so that the SASS checks see the main loop as the hot one).
    CLAMP: `pair_exps`' and `_moved_u`'s (`redo_far_chunk`'s repair), the `inf` flag then
    read off the logits themselves, a finite w logit against a -inf v (1), and a u that
    overflowed without one `OVERFLOWED`."""
    ACC: tl.constexpr = tau_w.dtype
    HALF: tl.constexpr = (LANES + 1) // 2
    kw = lane_scale(tau_w, DIVIDE)
    kv = lane_scale(tau_v, DIVIDE)
    floor_w = lane_floor(kw)
    floor_v = lane_floor(kv)
    mw, mv, sw, sv, u, k = _empty_lanes(floor_w, floor_v, HALF)
    offs = tl.arange(0, HALF)[:, None] * FOLD + tl.arange(0, FOLD)[None, :]
    unsupported = tl.zeros([HALF, FOLD], tl.int32)
    for i in range(0, n_valid, HALF * FOLD):
        valid = offs + i < n_valid
        xw = tl.load(w_row + start + i + offs, mask=valid, other=float("-inf")).to(ACC)
        xv = tl.load(v_row + start + i + offs, mask=valid, other=float("-inf")).to(ACC)
        if CLAMP:
            unsupported |= _against_none(xw, xv, tau_w, tau_v)
        mw, mv, sw, sv, u, k = _pair_lanes(
            xw - shift_w, xv - shift_v, kw, kv, mw, mv, sw, sv, u, k, DIVIDE, EXCESS, CLAMP
        )
    m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = _chunk_state(
        mw, mv, sw, sv, u, k, kw, kv, tau_w, tau_v, floor_w, floor_v, DIVIDE, EXCESS, CLAMP
    )
    if CLAMP:
        # The flag read off the logits (a finite w logit against a -inf v: KL +inf) is 1. A u
        # that overflowed without one (mass in the chunk's own frame against a fill whose
        # exponent left the range, or a sum of many ~1e38 terms) is `OVERFLOWED`, which
        # `merge_pair` drops where the chunk's w side moves into the row by a factor of 0; its
        # k is then the one that moves as its v side does (k = s_v - s_w + u, with u = 0).
        against_none = tl.max(tl.max(unsupported, 1), 0) > 0
        inf = tl.where(against_none, 1.0, OVERFLOWED * inf).to(ACC)
        u = tl.where(inf > 0, 0.0, u)
        k = tl.where(inf == OVERFLOWED, r_v - r_w, tl.where(inf > 0, 0.0, k))
    m_w, e_w = _moved_max(m_w, e_w, shift_w, tau_w, DIVIDE)
    m_v, e_v = _moved_max(m_v, e_v, shift_v, tau_v, DIVIDE)
    return m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k


@triton.jit
def _against_none(xw, xv, tau_w, tau_v):
    """1 where a w logit with support faces a v logit without (KL +inf), else 0, as the float64
    truth reads them: x = -inf, and for fp64 logits also x / tau past the range (the truth's own
    quotient; fp32 and 16-bit fills stay inside float64's range, where the lanes' exponents
    past fp32's only make u `OVERFLOWED`)."""
    zw = xw
    zv = xv
    if xw.dtype == tl.float64:
        zw = xw / tau_w
        zv = xv / tau_v
    return ((zv == float("-inf")) & (zw > float("-inf"))).to(tl.int32)


@triton.jit
def _moved_max(m, e, shift, tau, DIVIDE: tl.constexpr):
    """(m, e) of a side summed relative to its max with its logits moved by -shift (0: kept):
    the z of the max logit M = shift and its division's residual, as `_side_total` forms them.
    An M / tau past the float range (finfo.min under tau < 1) is -inf: an empty side, no mass
    beside the row's other chunks. Not clamped to the lowest finite value: a row masked whole
    would then read as a finite frame that its backward and TV cannot rebuild (silent wrong
    values where the row is NaN, as in fp32 PyTorch)."""
    moved = shift != 0
    if DIVIDE:
        mz = div_acc(shift, tau)
        e_moved = z_residual(mz, shift, tau)
    else:
        mz = shift
        e_moved = shift * 0
    return tl.where(moved, mz, m), tl.where(moved, e_moved, e)


@triton.jit
def merge_row(part_ptr, rows, rmask, N, n_chunks, EXCESS: tl.constexpr):
    """The merged pair state of `rows` from their n_chunks partial states, in chunk order: each
    side's s1 - 1 (`PARTIAL`), relative to m + e (`_side_total`: the row's max logit / tau,
    unrounded; `reference_shift` moves them to what `row_exponent` rebuilds from m), and with
    EXCESS (`pair_excess`) the excess k, else 0."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    m_w = tl.full(rows.shape, float("-inf"), ACC)
    m_v = tl.full(rows.shape, float("-inf"), ACC)
    r_w = tl.zeros(rows.shape, ACC) - 1.0  # s1 - 1 of the empty state
    r_v = tl.zeros(rows.shape, ACC) - 1.0
    u = tl.zeros(rows.shape, ACC)
    inf = tl.zeros(rows.shape, ACC)
    e_w = tl.zeros(rows.shape, ACC)
    e_v = tl.zeros(rows.shape, ACC)
    k = tl.zeros(rows.shape, ACC)
    # tl.cast: an n_chunks of 1 arrives as a Python int (Triton specializes 1)
    plane = tl.cast(n_chunks, tl.int64) * N
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        idx = chunk_off + rows
        chunk_off += N
        m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k = merge_pair(
            m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k,
            tl.load(part_ptr + idx, mask=rmask, other=float("-inf")),
            tl.load(part_ptr + plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 2 * plane + idx, mask=rmask, other=float("-inf")),
            tl.load(part_ptr + 3 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 4 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 5 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 6 * plane + idx, mask=rmask, other=0.0),
            tl.load(part_ptr + 7 * plane + idx, mask=rmask, other=0.0),
            _load_excess(part_ptr + 8 * plane + idx, rmask, EXCESS),
            EXCESS,
        )  # fmt: skip
    return m_w, r_w, m_v, r_v, u, inf, e_w, e_v, k


@triton.jit
def _load_excess(ptr, mask, EXCESS: tl.constexpr):
    """A chunk's k (`PARTIAL`), or 0 without EXCESS (the plane is not written then)."""
    if EXCESS:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        return tl.zeros(mask.shape, ptr.dtype.element_ty)


@triton.jit
def side_is_valid(m):
    return (m > float("-inf")) & (m < float("inf"))


@triton.jit
def reference_shift(m, e, tau, DIVIDE: tl.constexpr, XDT: tl.constexpr):
    """delta = e - e_a, both in z units: from a merged side's reference m + e (its max logit /
    tau, `_side_total`) to a / tau, a = `max_logit`, the reference `row_exponent` rebuilds
    from m (e_a = a / tau - m, formed as `_side_total` forms e, so delta is exactly 0 when
    a is the max logit: always for 16-bit logits, usually for fp32). 0 without DIVIDE, for
    an invalid side and for one far out (`reads_max`: a is the max logit itself there)."""
    if DIVIDE:
        ok = side_is_valid(m) & ~reads_max(m, DIVIDE, XDT)
        m0 = tl.where(ok, m, 0.0)
        e_a = z_residual(m0, max_logit(m0, tau, XDT), tau)
        return tl.where(ok, e - e_a, 0.0)
    else:
        return tl.zeros(m.shape, m.dtype)


@triton.jit
def _finalize_kl_f64(m_w, r_w, m_v, r_v, u, inf, dw, dv, k, EXCESS: tl.constexpr):
    """finalize_kl's arithmetic (finalize_kl in softmax_stats.h) in fp64: NaN if a side is
    invalid (all -inf, NaN or +inf), +inf if some w_j > 0 has v_j = 0, else u / s1_w +
    (log s1_v - log s1_w) clamped at 0 (the two logs first: equal normalizers cancel exactly);
    with EXCESS, where |r| < 1/2 (r = (k - u) / s1_w = s1_v / s1_w - 1) and that KL < NEAR_KL,
    k / s1_w - (r - log1p r) instead (docs/math.md §4: no O(1) term cancels, the exps'
    roundings enter relative to the KL through k or damped by r through u).
    Also each side's log s1 + delta and c + dw - dv, c = u / s1_w (the backward's shift,
    kl_grad_shift), both moved to `row_exponent`'s references by `reference_shift`'s deltas,
    from a dummy state for an invalid side (no log(0) or 0 / 0)."""
    ok_w = side_is_valid(m_w)
    ok_v = side_is_valid(m_v)
    valid = ok_w & ok_v
    # Each side is replaced on its own: a broken rollout row keeps the logits' log s1 exact.
    r_w = tl.where(ok_w, r_w, 0.0)
    r_v = tl.where(ok_v, r_v, 0.0)
    l_w = log1p_acc(r_w)
    l_v = log1p_acc(r_v)
    c = u / (1.0 + r_w)
    kl = c + (l_v - l_w)
    if EXCESS:
        # A w side of one entry (r_w = 0: s1_w is exactly 1, its log exactly 0) has no O(1) term
        # to cancel: u + log1p r_v as is. Its excess would carry only the lane frames' own
        # roundings (f of ~ulp(z k) on each side: 3.4e-21 on a V = 1 row whose KL is 0).
        # Near-equal rows only (softmax_stats.h's kNearKl): rows far apart can have |r| < 1/2
        # by chance (fp32 [1, 4095], |r| = 0.4999), and k's moves to the row's maxes cancel
        # terms of a lane's or chunk's own frame undamped where its w side drops far below the
        # row's (that KL of 3.76 came out 2.0e-6 off here; C++ 1.1e-4 before rescale_pair took
        # the form that rounds less, which `rescale_excess` here does not yet).
        r = (k - u) / (1.0 + r_w)
        near = (tl.abs(r) < 0.5) & (r_w != 0) & (kl < NEAR_KL)
        kl = tl.where(near, k / (1.0 + r_w) - _log1p_excess(tl.where(near, r, 0.0)), kl)
    kl = tl.maximum(kl, 0.0)
    kl = tl.where(inf > 0, float("inf"), kl)
    return tl.where(valid, kl, float("nan")), l_w + dw, l_v + dv, c + (dw - dv)


@triton.jit
def _log1p_excess(r):
    """r - log1p(r) (fp64, |r| < 1/2), relative to itself: r^2 sum_n (-r)^n / (n + 2) to r^11
    where |r| < 1/100 (the difference would keep ulp(r), 2e-7 of r^2 / 2 at r = 1e-9)."""
    small = tl.abs(r) < 0.01
    x = tl.where(small, r, 0.0)
    p = x * 0 + (1.0 / 11.0)
    for n in tl.static_range(10, 1, -1):
        p = (1.0 / n) - x * p
    return tl.where(small, x * x * p, r - log1p_acc(r))


@triton.jit
def finalize_kl(m_w, r_w, m_v, r_v, u, inf, dw, dv, k, EXCESS: tl.constexpr):
    """(KL(w || v), log s1_w, log s1_v, c) of a merged state (r = s1 - 1), the last three
    relative to `row_exponent`'s references (dw, dv: `reference_shift`), each evaluated in fp64 and
    rounded once to the state's dtype (per row, so free): KL cancels O(1) terms to a small
    number, and three fp32 roundings of log s1 ~ 5 would be ~1e-7 absolute (3.2e-7 against
    plain PyTorch's 1.4e-7 on near-uniform bf16 rows of 261 at tau 0.16, a fuzzer find)."""
    ACC: tl.constexpr = r_w.dtype
    f64 = tl.float64
    kl, l_w, l_v, c = _finalize_kl_f64(
        m_w.to(f64), r_w.to(f64), m_v.to(f64), r_v.to(f64), u.to(f64), inf.to(f64), dw.to(f64),
        dv.to(f64), k.to(f64), EXCESS,
    )  # fmt: skip
    return kl.to(ACC), l_w.to(ACC), l_v.to(ACC), c.to(ACC)


# The dominant entry of a whole row's weight side (w_j > 1/2, rest 1 - w_j below 2^-7: log s1
# relative to the max below -log(1 - 2^-7) ~ 2^-7). Its gradient's direct form w_j ((d_w - d_v)
# - c) cancels to ~rest x |delta| below the rounding of delta_j and c; the row's gradient sums
# to 0, so minus the others' sum is the more accurate form there (C++: DominantEntry in
# pair_rows.h, whose criterion these follow). Elsewhere that sum is rarely the more accurate
# (with rests up to 1/2 the fidelity table's fp32 KL gradient went 1.1e-7 -> 2.5e-7).
DOMINANT_LOG_S1 = tl.constexpr(2.0**-7)


@triton.jit
def others_zeros(ACC: tl.constexpr, BLOCK_V: tl.constexpr):
    """The lanes of `others_add`: (others' sum, their summed size, the step that met the top)."""
    zero = tl.zeros([BLOCK_V], ACC)
    return zero, zero, tl.full([BLOCK_V], -1, tl.int32)


@triton.jit
def others_add(others, size, at, term, top, skip, step):
    """Adds one block's weight-side terms but where `skip` (the dominant entry's own term, `top`,
    selected out rather than subtracted afterwards, and lanes past the row's end); a lane that
    meets the top keeps the step."""
    g = tl.where(skip, 0.0, term)
    return others + g, size + tl.abs(g), tl.where(top, step, at)


@triton.jit
def others_column(at, BLOCK_V: tl.constexpr):
    """The dominant entry's column from the lanes' steps (-1: not met)."""
    return tl.max(tl.where(at >= 0, at * BLOCK_V + tl.arange(0, BLOCK_V), -1))


@triton.jit
def others_total(others, size, scale, o_sum, o_size):
    """(the others' sum across the lanes in fp64, whether minus it beats the direct form): the
    direct form rounds at ~eps `scale`, the sum at up to ~32 eps of the others' sizes. o_sum,
    o_size: others outside the lanes (a vocab-parallel shard's on other ranks), their sum and
    summed size."""
    total = tl.sum(others.to(tl.float64)) + o_sum.to(tl.float64)
    size_all = tl.sum(size.to(tl.float64)) + o_size.to(tl.float64)
    better = (32.0 * size_all < scale) & (tl.abs(total) < float("inf"))
    return total, better


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
        EXCESS=pair_excess(xw.dtype), ALIGN=rows_align((xw, *w_layout), (xv, *v_layout)),
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
