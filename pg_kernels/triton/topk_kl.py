"""topk_kl in Triton: KL(q || p) on q's top-k ids plus one tail bucket (docs/math.md §4), with the
C++ launchers' interface. Formulas, derivation and edge cases: csrc/include/pg_kernels/
softmax_stats.h (topk_normalizer, topk_q_tail, topk_kl_grad_coef).

Rows are cut as `row_blocking` cuts them (a function of V and the dtype only) and every
reduction runs in a fixed order: results are bitwise deterministic and batch invariant. The
launcher sorts each row's K ids (a [N, K] sort, K << V), so the ids falling in a chunk are a
contiguous run [lo, hi) of the sorted list, found once per program.
Forward, one sweep, two kernels:
  1. `_tail_chunk_kernel`, grid (N, n_chunks): the tail's online sum over one chunk, per LANE:
     a lane is the FOLD neighbours one thread holds in one 16-byte vector (8 bf16/fp16, 4 fp32),
     with its own running max r of the raw logits, reference m = max(r / tau, lowest finite) and
     sum s = sum exp(z - m) in fp64 (one fp64 fma per lane per step: fp32 lanes lost ~1e-6 of
     4078 tied tail terms); a risen max rescales s by one exp per lane, without a branch. Before
     the loop the chunk's ids become per-lane bits (`_chunk_id_bits`: bit step * FOLD + k marks
     element k of the lane in that step; a few instructions per id, once per program); in the
     loop one AND + select per element drops them (x -> -inf). After the loop, one cross-lane
     merge: the chunk max, each lane rescaled to it, one sum. The chunk's (m_tail, s_tail) is
     stored, m_tail NaN when the chunk holds a NaN or +inf (a NaN sum: +inf - +inf in its exp),
     and for a chunk whose tail lies so far out that its lanes hold no mass (-1e30, finfo.min:
     `_lane_reference`) its max z as an exact fp64 product with s_tail 0;
  2. `_fwd_finish_kernel`, grid (N,): merges the chunk states in chunk order (a merged tail of
     finite logits and no mass is read again, `_row_tail`: a rare sweep), gathers the K head
     logits and joins them with the tail for L, so log p_tail needs no 1 - sum_K p_v; then the
     KL of docs/math.md §4, all in fp64 (`_finish_f64`, per row, so free): the head's z as
     exact products x (1 / tau), as the tail's fma exponents take them, log s = log1p(rest)
     relative to the exact max, log p_tail = -log1p(head / tail), q and q_tail from fp64 sums
     (`_q_masses`), each output rounded once.
Backward, `_bwd_kernel`, grid (N, n_chunks): dKL/dz_j = sign exp((z_j - m) - (log s - tail_log))
for every element of the chunk (a subtraction, an fma, a subtraction, an exp, a multiply),
relative to the saved row max m and log s = L - m (not z_j - L: a saved L carries ulp(L) / 2,
4.9e-4 at |z| ~ 1e4 under a small temperature, the relative error of every p_j); sign and
tail_log come from fp64 once per program. Rare rows move the logits first: a row far out
(`_is_far`) by its max logit read again, a tail far below the head by its own max (the tail's
softmax, `_row_tail`); the first subtraction is that move (0 on other rows). Then Q p_j - q_j
in fp64 over the chunk's ids (p_j and q_j near 1 cancel on peaked rows) (a K-wide gather and
a masked scatter store after a barrier, which orders it after the loop's stores to the same
entries). Ignored rows and rows with bad ids write 0 /
NaN and read nothing. Under the interpreter the fma exponents are emulated in fp64
(`_pair.fma_acc`): its tl.fma rounds the product first, a GPU does not.

Bytes per row of V elements of s bytes: forward V s read + 16 K (ids and log-probs, sorted
copies) + 16 n_chunks bytes of partial states (fp64) + ~16 B written; backward V s read +
V s written + ~(16 + 2 s) K (ids, log-probs, the head logits, the head entries written a
second time).
Checked under TRITON_INTERPRET=1 on CPU tensors and compiled for sm_90 offline
(.ci/check_triton_sm90.py); timed on an H200 (benchmarks/results/cuda-h200).

GPU design (sm_90, triton 3.6, offline compile; hot-loop SASS instructions per element, the
budget 12 for 16-bit logits, 24 for fp32; the same kernels serve temperature 1 and != 1: 1 / tau
is a per-row tensor either way):
  kernel               dtype  before (registers)          after (registers)
  _tail_chunk_kernel   bf16   45.6 (124), 3 BAR 16 SHFL   11.1 (40), no BAR/SHFL
                       fp16   45.1 (124)                  10.6 (40)
                       fp32   53.4 (80)                   12.2 (37)
  _bwd_kernel          bf16   19.8 (64)                   10.1 (32)
                       fp16   19.2 (64)                    9.6 (32)
                       fp32   58.9 (60)                    9.9 (32)
  (the backward's fp64 prologue and id entries took its registers from 32-36 to 38-40, and
  the finish kernel's from 47 to 58; the loops' counts are unchanged)
  "before" counts the old per-block id loop (a dependent scalar load per id) with the step loop
  it sits in; the check's old unroll detection divided them by 3 (15.2, 15.0, 17.8; fp32
  backward 19.6). The backward's "after" includes the subtraction that keeps it relative to the
  row max (one instruction more than from a saved L) and the rare rows' move (one more: 9.0
  bf16 and 8.9 fp32 without it; the tail loop's counts re-measured 2026-12-03). Per element
  the tail loop is now: convert, AND + select (ids), max, fma, mul (log2 e), ex2, add; per
  lane and step: mul, max, sub, mul, ex2, fma, shift. Rows not 16-byte aligned load each
  lane's elements by scalar loads (`_full_block`): tail 12.0 bf16 (40 registers), 13.1 fp32;
  backward 11.8 and 10.6 (2026-12-06; bf16 tail 10.6 aligned).
Duplicate ids are a user error: undefined here (the CPU paths raise).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    acc_dtype_of,
    cdiv,
    dense_row_offset,
    exp_acc,
    load_lanes,
    log1p_acc,
    lowest_finite,
    merge_states,
    next_power_of_2,
    per_row_inv_temperature,
    push_far,
    round_to,
    row_align,
    row_blocking,
    row_offset,
    rows_align,
    ulp_of_one,
    widen,
)
from pg_kernels.triton._pair import FAR_Z, fma_acc, row_max

# The block of the rare sweeps over a whole row (`_row_tail`, the far rows' `row_max`): narrow
# loads, which the SASS check never takes for the hot loop's.
SWEEP = tl.constexpr(128)


@triton.jit
def _row_setup(ids_ptr, labels_ptr, ignore_index, row, V, K, HAS_LABELS, K_PAD):
    """keep (not an ignored row), ok (kept, all ids in [0, V)), the sorted ids (padded with V)."""
    if HAS_LABELS:
        keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    else:
        keep = row >= 0
    kk = tl.arange(0, K_PAD)
    kmask = kk < K
    idv = tl.load(ids_ptr + row.to(tl.int64) * K + kk, mask=kmask, other=V).to(tl.int64)
    lo_ok = tl.min(tl.where(kmask, idv, 0), axis=0) >= 0
    hi_ok = tl.max(tl.where(kmask, idv, 0), axis=0) < V
    ok = keep & lo_ok & hi_ok
    return keep, ok, idv


@triton.jit
def _chunk_id_bits(ids_row, lo, hi, start, LANES: tl.constexpr, FOLD: tl.constexpr,
                   BLOCK_V: tl.constexpr):  # fmt: skip
    """Where the ids idv[lo:hi] (all in [start, start + CHUNK)) sit in a chunk's loop: one int32
    per accumulator lane, bit step * FOLD + k set when element k of the lane's group in step
    `step` (column start + step * BLOCK_V + lane * FOLD + k) is an id. A few instructions per
    id, once per program, so the step loop tests membership with one AND per element."""
    lane = tl.arange(0, LANES)
    bits = tl.zeros([LANES], tl.int32)
    for j in range(lo, hi):
        rel = (tl.load(ids_row + j) - start).to(tl.int32)
        pos = rel % BLOCK_V
        bit = (rel // BLOCK_V) * FOLD + pos % FOLD
        bits = bits | tl.where(lane == pos // FOLD, tl.full([LANES], 1, tl.int32) << bit, 0)
    return bits


@triton.jit
def _drop_id(x, cur, k: tl.constexpr):
    """x, -inf where bit k of the lane's id bits is set."""
    return tl.where((cur & (1 << k)) != 0, float("-inf"), x)


@triton.jit
def _e(x, inv_tau, m):
    """exp(z - m), z = x / tau, in one rounding before the exp (fma: the exact product, so the
    error is relative to z - m, not to z): 0 for x = -inf."""
    return exp_acc(fma_acc(x, inv_tau, -m))


@triton.jit
def _lane_reference(r, inv_tau, low):
    """A lane's reference max(r / tau, low), r its raw max. Its rounding is the exponent of the
    max's own term, up to ulp / 2: e^4 at 2^26, e^(2^75) at a mask of -1e30. From 2^26 (2^50
    for fp64 logits) on it is moved 2^-17 (2^-40) of itself up, 512 (1024) or more above the
    lane's logits: their exps are exactly 0, a tail of masked logits has no mass (they lie
    2^25 below any reference under 2^25)."""
    m = tl.maximum(r * inv_tau, low)
    if m.dtype == tl.float64:
        return push_far(m, 2.0**50, 2.0**-40)
    else:
        return push_far(m, 2.0**26, 2.0**-17)


@triton.jit
def _tail_step(x, cur, inv_tau, low, r, mref, s, FOLD: tl.constexpr):
    """One BLOCK_V step of the per-lane online tail sum, the ids dropped by their bits `cur`.

    A lane is FOLD neighbouring elements inside one thread's 16-byte vector (split out of the
    block without moving data). Lane state: r = max of its raw logits (-inf: none yet),
    mref = max(r / tau, low), low the lowest finite float (a finite reference while the lane is
    empty: exp(-inf - mref) = 0, never NaN), s = sum exp(z - mref). The rescale to a risen max
    is one exp per lane per step, without a branch: exp(mref_old - mref_new) <= 1, and an empty
    lane's s is 0 whatever it gives. s is fp64 (one conversion and one fp64 fma per lane per
    step, FOLD elements): fp32 lanes lost ~1e-6 of a tail of 4078 tied logits."""
    x = widen(x, r.dtype)
    if FOLD == 8:
        y0, y1 = tl.split(tl.reshape(x, [x.shape[0] // 8, 2, 2, 2]))  # element offset 4a + 2b + c
        y00, y01 = tl.split(y0)
        y10, y11 = tl.split(y1)
        x0, x4 = tl.split(y00)
        x2, x6 = tl.split(y01)
        x1, x5 = tl.split(y10)
        x3, x7 = tl.split(y11)
        x0 = _drop_id(x0, cur, 0)
        x1 = _drop_id(x1, cur, 1)
        x2 = _drop_id(x2, cur, 2)
        x3 = _drop_id(x3, cur, 3)
        x4 = _drop_id(x4, cur, 4)
        x5 = _drop_id(x5, cur, 5)
        x6 = _drop_id(x6, cur, 6)
        x7 = _drop_id(x7, cur, 7)
        hi = tl.maximum(tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3)),
                        tl.maximum(tl.maximum(x4, x5), tl.maximum(x6, x7)))  # fmt: skip
        r = tl.maximum(r, hi)
        m = _lane_reference(r, inv_tau, low)
        t = (_e(x0, inv_tau, m) + _e(x1, inv_tau, m)) + (_e(x2, inv_tau, m) + _e(x3, inv_tau, m))
        t += (_e(x4, inv_tau, m) + _e(x5, inv_tau, m)) + (_e(x6, inv_tau, m) + _e(x7, inv_tau, m))
    elif FOLD == 4:
        y0, y1 = tl.split(tl.reshape(x, [x.shape[0] // 4, 2, 2]))  # element offset 2a + b
        x0, x2 = tl.split(y0)
        x1, x3 = tl.split(y1)
        x0 = _drop_id(x0, cur, 0)
        x1 = _drop_id(x1, cur, 1)
        x2 = _drop_id(x2, cur, 2)
        x3 = _drop_id(x3, cur, 3)
        r = tl.maximum(r, tl.maximum(tl.maximum(x0, x1), tl.maximum(x2, x3)))
        m = _lane_reference(r, inv_tau, low)
        t = (_e(x0, inv_tau, m) + _e(x1, inv_tau, m)) + (_e(x2, inv_tau, m) + _e(x3, inv_tau, m))
    elif FOLD == 2:
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0] // 2, 2]))
        x0 = _drop_id(x0, cur, 0)
        x1 = _drop_id(x1, cur, 1)
        r = tl.maximum(r, tl.maximum(x0, x1))
        m = _lane_reference(r, inv_tau, low)
        t = _e(x0, inv_tau, m) + _e(x1, inv_tau, m)
    else:
        x = _drop_id(x, cur, 0)
        r = tl.maximum(r, x)
        m = _lane_reference(r, inv_tau, low)
        t = _e(x, inv_tau, m)
    # (<= 0 but across `_lane_reference`'s jump, whose lanes hold exactly 0.)
    s = tl.fma(s, exp_acc(tl.minimum(mref - m, 0.0)).to(s.dtype), t.to(s.dtype))
    return r, m, s


@triton.jit
def _off_ids(cols, n, ids_row, K):
    """cols < n and none of the K ids at ids_row: a scalar id load and a compare each, no
    cross-thread reduction (a [cols, K] compare reduced over K left a warp-collective fallback
    whose branch back spans the backward's main loop, which the SASS check took for its hot
    loop)."""
    keep = cols < n
    for k in range(0, K):
        keep = keep & (cols != tl.load(ids_row + k))
    return keep


@triton.jit
def _row_tail(x_row, V, ids_row, K, inv_tau, read):
    """(M, s) of a row's tail read again where `read` (else (-inf, 0)): M its max raw logit off
    the K ids at ids_row, in inv_tau's dtype, and s = sum of e^{(x - M) / tau} over the tail,
    summed in fp64, relative to the exact product M (1 / tau): x - M is exact wherever the
    term is not 0 (from x >= 2 M on), the entry at M counts exactly 1, and each other term
    rounds twice (the product, the exp), as C++'s z = x / tau and exp do. For the rare rows
    whose tail the lanes cannot sum: lying so far out that every lane was pushed
    (`_lane_reference`; a row masked whole with -1e30 or finfo.min), or so far below the head
    that the backward takes the tail's own softmax."""
    ACC: tl.constexpr = inv_tau.dtype
    cols = tl.arange(0, SWEEP)
    n = tl.where(read, V, 0)
    top = tl.full([SWEEP], float("-inf"), ACC)
    for i in range(0, n, SWEEP):
        x = tl.load(x_row + i + cols, mask=_off_ids(cols + i, n, ids_row, K), other=float("-inf"))
        top = tl.maximum(top, x.to(ACC))
    M = tl.max(top, axis=0)
    ref = tl.where(M > float("-inf"), M, 0.0)
    s = tl.zeros([SWEEP], tl.float64)
    for i in range(0, n, SWEEP):
        x = tl.load(x_row + i + cols, mask=_off_ids(cols + i, n, ids_row, K), other=float("-inf"))
        s += exp_acc((x.to(ACC) - ref) * inv_tau).to(tl.float64)
    return M, tl.sum(s, axis=0)


@triton.jit
def _is_far(m, valid):
    """Whether a valid row of saved max m takes its reference from its max logit read again
    (`_fwd_finish_kernel`): |m| >= FAR_Z with fp32 accumulation. fp64 rows keep m."""
    if m.dtype == tl.float32:
        return valid & (tl.abs(m) >= FAR_Z) & (tl.abs(m) < float("inf"))
    else:
        return valid & (m != m)  # false


@triton.jit
def _q_masses(lq, K, has_tail, tail_empty):
    """(q_v, q_tail) in fp64 from the log-probs lq (-inf where masked): q_tail = 1 - sum_K q_v
    clamped at 0 (topk_q_tail in softmax_stats.h), exactly 0 when the ids cover the
    vocabulary. From fp32 q's, q_tail was rounding noise where the fp64 sum passes 1 (6e-8
    against a tail 5400 below the head: a gradient of 1.1e-6 on the tail's max logit where
    the truth is 0) or where it falls short (three tied maxima, q = 1/3 each as fp32 log-probs:
    the fp32 sum reached 1 and dropped a q_tail of 2e-8 against a tail e^-64 below, a KL of
    9.0e-7 read as 0). Only against a tail with no finite logit (`tail_empty`), where any
    q_tail > 0 makes the KL +inf, is the bucket's existence a threshold: 1 - sum_K q_v at most
    2 K eps of lq's dtype is the log-probs' own rounding and leaves none (topk_tail_noise in
    softmax_stats.h; the C++ kernel and the reference decide it alike)."""
    q = tl.exp(lq.to(tl.float64))
    rest = 1.0 - tl.sum(q, axis=0)
    noise = tl.cast(K, tl.float64) * (2.0 * ulp_of_one(lq.dtype))
    has_tail = has_tail & ((tail_empty == 0) | (rest > noise))
    return q, tl.where(has_tail, tl.maximum(rest, 0.0), 0.0)


@triton.jit
def _finish_f64(m_tail, s_tail, zx, lq, q, q_tail, valid):
    """(KL, m, log s, log P_tail) of a row (topk_normalizer and the KL terms of
    softmax_stats.h), evaluated in fp64 from the merged tail state (m_tail, s_tail), the head's
    z as exact products zx and the given log-probs (per row, so free): KL and log P_tail
    rounded once to lq's dtype, m (the row max z, an exact product or a chunk's m) and log s
    relative to it in fp64, for `_fwd_finish_kernel` to save relative to the reference the
    backward rebuilds.

    In fp32, log s = log(tail + head) carried ulp(log s) / 2 into every log p_v and log P_tail,
    and log P_tail = (m_tail - m) + log s_tail - log s cancelled the two logs (bf16 [1, 2],
    k = 1: a KL of 1.9e-6 off by 4.7e-8, plain PyTorch 1.3e-8). Here log s = log1p(rest),
    rest = the sum without the max's own entry (exactly 1 when the head holds the max), and
    log P_tail = -log1p(head / tail) unless the tail is far below the head (head / tail >
    1e30); q and q_tail are `_q_masses`', which sum to 1 in fp64."""
    ACC: tl.constexpr = lq.dtype
    f64: tl.constexpr = tl.float64
    kk = tl.arange(0, zx.shape[0])
    tail_empty = m_tail == float("-inf")
    m_head = tl.max(zx, axis=0)
    head_max = m_head >= m_tail.to(f64)  # the head holds the row max (an empty tail: always)
    m = tl.where(valid, tl.where(head_max, m_head, m_tail.to(f64)), 0.0)
    mt = tl.where(tail_empty, m, m_tail.to(f64))  # finite operands: no -inf - -inf
    st = tl.where(tail_empty, 1.0, s_tail).to(f64)
    e = tl.exp(zx - m)  # relative to the row max: head terms <= 1
    s_head = tl.sum(e, axis=0)
    tail = tl.where(tail_empty, 0.0, st * tl.exp(mt - m))
    first = tl.min(tl.where(zx == m, kk, zx.shape[0]), axis=0)  # the max's entry in the head
    rest = tl.where(
        head_max, tl.sum(tl.where(kk == first, 0.0, e), axis=0) + tail, (st - 1.0) + s_head
    )
    log_s = log1p_acc(rest)
    near = s_head <= tail * 1e30  # false for an empty (or underflowed) tail
    logp_tail = tl.where(
        near,
        -log1p_acc(s_head / tl.where(near, tail, 1.0)),
        (mt - m) + tl.log(st) - log_s,
    )
    logp_tail = tl.where(tail_empty, float("-inf"), logp_tail)
    # q (log q - log p), exactly 0 where q = 0; log p_v = (z_v - m) - log s, relative to the
    # row max (topk_normalizer): z_v - L would carry ulp(L) on log-probs near 0.
    lq = lq.to(f64)
    head = tl.sum(tl.where(q == 0.0, 0.0, q * (lq - ((zx - m) - log_s))), axis=0)
    tail_kl = tl.where(
        q_tail == 0.0, 0.0, q_tail * (tl.log(tl.where(q_tail == 0.0, 1.0, q_tail)) - logp_tail)
    )
    return (head + tail_kl).to(ACC), m, log_s, logp_tail.to(ACC)


@triton.jit
def _full_block(x_row, col0, LANES: tl.constexpr, FOLD: tl.constexpr, ALIGN: tl.constexpr):
    """The [LANES * FOLD] block at column col0, unmasked: one vector load per lane, or on rows
    that are not 16-byte aligned (ALIGN 1) FOLD scalar loads laid out as the lanes
    (`load_lanes`): loaded flat, the split into lanes cost layout conversions through shared
    memory (13.4 SASS per bf16 element, 4 BAR, sm_90)."""
    if ALIGN == 1 and FOLD > 1:
        lane0 = tl.arange(0, LANES)[None, :] * FOLD
        return tl.reshape(load_lanes(x_row + col0 + lane0, FOLD, 1, lane0, 0, False),
                          [LANES * FOLD])  # fmt: skip
    else:
        return tl.load(x_row + col0 + tl.arange(0, LANES * FOLD))


@triton.jit(do_not_specialize=["ignore_index"])
def _tail_chunk_kernel(
    x_ptr, ids_ptr, labels_ptr, inv_tau_ptr, ignore_index, V, K, N,
    n_inner, stride_outer, stride_inner, part_ptr,
    HAS_LABELS: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    FOLD: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the tail state (m_tail, s_tail) of one chunk, into part_ptr
    [2, n_chunks, N] (fp64: s_tail's lanes are summed in fp64); m_tail is NaN when the chunk
    holds a NaN or +inf."""
    ACC: tl.constexpr = inv_tau_ptr.dtype.element_ty
    LANES: tl.constexpr = BLOCK_V // FOLD
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    keep, ok, idv = _row_setup(ids_ptr, labels_ptr, ignore_index, row, V, K, HAS_LABELS, K_PAD)
    inv_tau = tl.load(inv_tau_ptr + row)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    start = chunk * CHUNK
    # Ignored rows (and rows with bad ids) read nothing and have no ids to place.
    n_valid = tl.where(ok, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    # The chunk's ids: a contiguous run [lo, hi) of the sorted list (the padding V never counts).
    lo = tl.sum((idv < start).to(tl.int32), axis=0)
    hi = tl.sum((idv < start + n_valid).to(tl.int32), axis=0)
    bits = _chunk_id_bits(ids_ptr + row.to(tl.int64) * K, lo, hi, start, LANES, FOLD, BLOCK_V)
    lanes = tl.arange(0, BLOCK_V)
    r = tl.full([LANES], float("-inf"), ACC)
    low = lowest_finite(ACC)
    m = tl.zeros([LANES], ACC) + low
    s = tl.zeros([LANES], tl.float64)
    for i in range(0, n_full):  # full blocks: unmasked vector loads
        x = _full_block(x_row, start + i * BLOCK_V, LANES, FOLD, ALIGN)
        r, m, s = _tail_step(x, bits, inv_tau, low, r, m, s, FOLD)
        bits = bits >> FOLD  # the next step's bits
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        cols = start + n_full * BLOCK_V + lanes
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf"))
        r, m, s = _tail_step(x, bits, inv_tau, low, r, m, s, FOLD)
    # One cross-lane merge per chunk: the chunk max, each lane rescaled to it, then the sum.
    # A NaN or +inf logit left a NaN sum (+inf - +inf in its exp), which marks the chunk.
    m_chunk = tl.maximum(tl.max(r, axis=0) * inv_tau, low)
    move = tl.minimum(m.to(tl.float64) - m_chunk.to(tl.float64), 0.0)  # (see `_tail_step`)
    s_chunk = tl.sum(s * exp_acc(move), axis=0)
    # No mass: no finite tail logit (m -inf), or logits so far out that every lane was pushed
    # (`_lane_reference`), whose chunk keeps its max z, the exact product in fp64, with s 0:
    # the finish reads such a tail again (`_row_tail`).
    r_max = tl.max(r, axis=0)
    z_max = tl.where(r_max > float("-inf"), r_max.to(tl.float64) * inv_tau.to(tl.float64), r_max)
    m_chunk = tl.where(s_chunk == 0.0, z_max, m_chunk)
    idx = chunk.to(tl.int64) * N + row
    tl.store(part_ptr + idx, tl.where(s_chunk != s_chunk, float("nan"), m_chunk))
    tl.store(part_ptr + tl.num_programs(1).to(tl.int64) * N + idx, s_chunk)


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_finish_kernel(
    x_ptr, ids_ptr, lq_ptr, labels_ptr, inv_tau_ptr, ignore_index, V, K, N, n_chunks,
    n_inner, stride_outer, stride_inner, part_ptr,
    kl_ptr, m_ptr, log_s_ptr, logp_tail_ptr,
    HAS_LABELS: tl.constexpr, K_PAD: tl.constexpr,
):  # fmt: skip
    """Program row: the row's tail state from its chunks (in chunk order), the head, the KL;
    the row max m and log s = L - m, saved for the backward."""
    ACC: tl.constexpr = m_ptr.dtype.element_ty
    row = tl.program_id(0)
    keep, ok, idv = _row_setup(ids_ptr, labels_ptr, ignore_index, row, V, K, HAS_LABELS, K_PAD)
    inv_tau = tl.load(inv_tau_ptr + row)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    zero = tl.zeros([], tl.float64)  # the chunk states are fp64
    m_tail = zero - float("inf")
    s_tail = zero
    # tl.cast: an n_chunks of 1 arrives as a Python int (Triton specializes 1)
    plane = tl.cast(n_chunks, tl.int64) * N
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        m_k = tl.load(part_ptr + chunk_off + row)
        s_k = tl.load(part_ptr + plane + chunk_off + row)
        m_tail, s_tail, _, _ = merge_states(m_tail, s_tail, zero, zero, m_k, s_k, zero, zero)
        chunk_off += N
    tail_ok = m_tail == m_tail  # a NaN chunk max: the row held a NaN or +inf
    # A tail of finite logits with no mass in the lanes (`_tail_chunk_kernel`), read again.
    redo = ok & tail_ok & (s_tail == 0.0) & (m_tail > float("-inf"))
    M_t, s_t = _row_tail(x_row, V, ids_ptr + row.to(tl.int64) * K, K, inv_tau, redo)
    m_tail = tl.where(redo, M_t.to(tl.float64) * inv_tau.to(tl.float64), m_tail)
    s_tail = tl.where(redo, s_t, s_tail)

    # The head: K gathered logits, and q from the given log-probs.
    kk = tl.arange(0, K_PAD)
    hm = kk < tl.where(ok, K, 0)
    xh = tl.load(x_row + tl.where(hm, idv, 0), mask=hm, other=float("-inf")).to(ACC)
    zh = xh * inv_tau
    bad_h = tl.max(((zh != zh) | (zh == float("inf"))).to(tl.int32), axis=0)
    m_head = tl.max(zh, axis=0)
    m_all = tl.maximum(tl.where(tail_ok, m_tail, float("-inf")), m_head)
    valid = ok & tail_ok & (bad_h == 0) & (m_all > float("-inf"))
    valid = valid & (inv_tau > 0.0) & (inv_tau < float("inf"))  # bad GPU temperatures: NaN
    m_tail = tl.where(tail_ok, m_tail, float("-inf"))
    lq = tl.load(lq_ptr + row.to(tl.int64) * K + kk, mask=hm, other=float("-inf")).to(ACC)
    q, q_tail = _q_masses(lq, K, K < V, m_tail == float("-inf"))
    # The head's z as the exact products (fp32 operands: exact in fp64), as the tail's fma
    # exponents take them: rounded to fp32 they carried ulp(z) / 2 each, not an error relative
    # to z - m (fp32 [1, 127] at |z| ~ 3300: the max's gradient entry 4.7e-3 off, relative).
    zx = xh.to(tl.float64) * inv_tau.to(tl.float64)
    kl, m64, log_s, logp_tail = _finish_f64(m_tail, s_tail, zx, lq, q, q_tail, valid)
    # log s is saved relative to the reference the backward rebuilds from the saved m: m
    # itself (log s then holds the residual of m's rounding), or on a row far out (|m| >=
    # FAR_Z, fp32 accumulation) its max logit M read again, as the exact product M (1 / tau):
    # m rounded misses a -1e30 / tau by up to ulp / 2 (4e22), which log s would not hold.
    m = m64.to(ACC)
    far = _is_far(m, valid)
    M = row_max(x_row, V, far, ACC, SWEEP)
    ref = tl.where(far, M.to(tl.float64) * inv_tau.to(tl.float64), m.to(tl.float64))
    log_s = ((m64 - ref) + log_s).to(ACC)
    valid = valid & (tl.abs(m) < float("inf"))  # z = x / tau past the ACC range: as C++, NaN
    nan = float("nan")
    tl.store(kl_ptr + row, tl.where(keep, tl.where(valid, kl, nan), 0.0))
    tl.store(m_ptr + row, tl.where(keep, tl.where(valid, m, nan), 0.0))
    tl.store(log_s_ptr + row, tl.where(keep, tl.where(valid, log_s, nan), 0.0))
    tl.store(logp_tail_ptr + row, tl.where(keep, tl.where(valid, logp_tail, nan), 0.0))


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, ids_ptr, lq_ptr, labels_ptr, inv_tau_ptr, ignore_index, V, K,
    n_inner, stride_outer, stride_inner, m_ptr, log_s_ptr, logp_tail_ptr, grad_ptr,
    HAS_LABELS: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the gradient of one chunk of one row, written once."""
    ACC: tl.constexpr = m_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    keep, ok, idv = _row_setup(ids_ptr, labels_ptr, ignore_index, row, V, K, HAS_LABELS, K_PAD)
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    logp_tail = tl.load(logp_tail_ptr + row)
    valid = ok & (tl.abs(m) < float("inf")) & (tl.abs(log_s) < float("inf"))  # NaN rows: NaN
    inv_tau = tl.load(inv_tau_ptr + row)
    g_tau = tl.load(g_ptr + row).to(ACC) * inv_tau
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    lq_row = lq_ptr + row.to(tl.int64) * K
    grad_row = grad_ptr + dense_row_offset(row, V, ALIGN)  # a fresh contiguous gradient

    # topk_kl_grad_coef (softmax_stats.h) in fp64 (per program, so free), with log(1 - y) for
    # log1p(-y): the same absolute error in tail_log, i.e. the same relative error of the
    # gradient.
    kk = tl.arange(0, K_PAD)
    hm = kk < tl.where(valid, K, 0)
    f64: tl.constexpr = tl.float64
    tail_empty = logp_tail == float("-inf")
    lq = tl.load(lq_row + kk, mask=hm, other=float("-inf")).to(ACC)
    q, q_tail = _q_masses(lq, K, K < V, tail_empty)
    q_all = tl.sum(q, axis=0) + q_tail
    log_q = tl.log(q_all)
    lpt = tl.where(tail_empty, 0.0, logp_tail).to(f64)
    log_ratio = tl.where(tail_empty | (q_tail == 0.0), 0.0, tl.log(q_tail) - lpt)
    above = log_ratio > log_q
    tail_log = tl.where(
        above,
        log_ratio + tl.log(1.0 - tl.exp(log_q - log_ratio)),
        log_q + tl.log(1.0 - tl.exp(log_ratio - log_q)),
    )
    sign = tl.where(above, -1.0, 1.0)
    tail_log = tl.where(q_tail == 0.0, log_q, tl.where(tail_empty, float("-inf"), tail_log))
    sign = tl.where(q_tail == 0.0, tl.where(q_all > 0.0, 1.0, 0.0), sign)
    sign = tl.where((q_tail != 0.0) & tail_empty, 0.0, sign)
    q_all64 = q_all
    # Off the ids, one subtraction, one fma, one subtraction, one exp and one multiply per
    # element: g_j = scale exp(((x_j - shift) / tau - m) - off), the offset rounded once.
    # Usually shift = 0 and off = log s - tail_log, relative to the saved row max m. A row far
    # out (`_is_far`) is relative to its max logit M read again (shift M, m 0), as its saved
    # log s. A tail far below the head (|tail_log| >= 32: C++'s kFarTailLog) takes its own
    # softmax t_j = p_j / P_tail (`_row_tail`, relative to its max logit M_t): the two large
    # terms of (z_j - m) - (log s - tail_log) cancel there, each carrying ulp of its size (a
    # tail masked with -1e30 at tau 16.7: log P_tail = -6e28), while (Q P_tail - q_tail) t_j
    # has none: shift M_t, off = log s_t - log|q_tail - Q P_tail|.
    far = _is_far(m, valid)
    M = row_max(x_row, V, far, ACC, SWEEP)
    far_tail = valid & ~tail_empty & (sign != 0.0) & ~(tl.abs(tail_log) < 32.0)
    M_t, s_t = _row_tail(x_row, V, ids_ptr + row.to(tl.int64) * K, K, inv_tau, far_tail)
    # (Operands of 1 on other rows: no log of 0, nor the interpreter's warnings.)
    tail_gap = tl.where(far_tail, tl.abs(q_tail - q_all * tl.exp(lpt)), 1.0)
    log_st = tl.log(tl.where(far_tail, s_t, 1.0))
    off = tl.where(far_tail, log_st - tl.log(tail_gap), log_s.to(f64) - tail_log).to(ACC)
    shift = tl.where(far_tail, M_t, tl.where(far, M, 0.0))
    m_off = tl.where(far_tail | far, 0.0, m)
    # Ignored rows read nothing and get 0 (scale 0, off 0); other invalid rows NaN (off NaN).
    off = tl.where(keep, tl.where(valid, off, float("nan")), 0.0)  # +inf: factor 0
    m_off = tl.where(valid, m_off, 0.0)
    shift = tl.where(valid, shift, 0.0)
    scale = tl.where(keep, sign.to(ACC) * g_tau, 0.0)

    lanes = tl.arange(0, BLOCK_V)
    start = chunk * CHUNK
    n_valid = tl.minimum(V - start, CHUNK)
    n_full = n_valid // BLOCK_V
    for i in range(0, n_full):  # full blocks: vector loads and stores (a uniform load mask)
        cols = start + i * BLOCK_V + lanes
        x = widen(tl.load(x_row + cols, mask=valid, other=float("-inf")), ACC)
        g = scale * exp_acc(fma_acc(x - shift, inv_tau, -m_off) - off)
        tl.store(grad_row + cols, round_to(g, grad_ptr.dtype.element_ty))
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        cols = start + n_full * BLOCK_V + lanes
        end = tl.where(valid, V, 0)
        x = widen(tl.load(x_row + cols, mask=cols < end, other=float("-inf")), ACC)
        g = scale * exp_acc(fma_acc(x - shift, inv_tau, -m_off) - off)
        tl.store(grad_row + cols, round_to(g, grad_ptr.dtype.element_ty), mask=cols < V)

    # On the chunk's ids: dKL/dz_j = Q p_j - q_j, written over the values above once every
    # thread's stores are done (the barrier orders them within the program). Rows that are
    # ignored or invalid keep the 0 or NaN written above (their ids may be junk).
    on = (idv >= start) & (idv < tl.where(valid, start + n_valid, 0))
    x_h = tl.load(x_row + tl.where(on, idv, 0), mask=on, other=0.0).to(ACC)
    lq_h = tl.load(lq_row + kk, mask=on, other=0.0).to(f64)
    # In fp64 (K entries per program): Q p_j - q_j cancels two numbers near 1 on a peaked row,
    # where fp32 exps carried ulp(1) / 2 each (fp32 [1, 127] at |z| ~ 3300: the max's entry
    # 4.3490e-5 where the truth is 4.3289e-5, plain PyTorch the same). p_j relative to the row
    # max from the exact product x_j / tau, as the forward's head (log s holds the max's own
    # residual).
    # On a row far out, relative to its max logit M read again (x_h - M exact in fp64).
    shift_h = tl.where(far, M, 0.0).to(f64)
    m_h = tl.where(far | ~valid, 0.0, m).to(f64)
    p_h = tl.exp(((x_h.to(f64) - shift_h) * inv_tau.to(f64) - m_h) - log_s.to(f64))
    head = (g_tau.to(f64) * (q_all64 * p_h - tl.exp(lq_h))).to(ACC)
    tl.debug_barrier()
    tl.store(grad_row + idv, round_to(head, grad_ptr.dtype.element_ty), mask=on)


# ------------------------------------------------------------------------------------------------
# Launchers: the signatures of the C++ ones (pg_kernels._C.topk_kl_forward / _backward).


def _sorted(topk_ids, topk_logprobs, labels, V, ignore_index):
    """Ids sorted per row (and the log-probs in the same order), both contiguous [N, K]."""
    ids, order = topk_ids.long().sort(-1)
    lq = topk_logprobs.gather(-1, order).contiguous()
    if ids.device.type == "cpu":  # the interpreter: the C++ kernel's checks (kept rows only)
        kept = (
            torch.ones(ids.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
        )
        bad = ((ids < 0) | (ids >= V)).any(-1) & kept
        if bool(bad.any()):
            raise RuntimeError(
                f"topk_kl: topk_ids row {int(bad.nonzero()[0, 0])} is outside [0, {V})"
            )
        dup = (ids[:, 1:] == ids[:, :-1]).any(-1) & kept
        if bool(dup.any()):
            raise RuntimeError(
                f"topk_kl: topk_ids row {int(dup.nonzero()[0, 0])} holds an id twice; the top-k "
                "ids of a row must be distinct"
            )
    return ids.contiguous(), lq


def _lane_fold(blk, dtype):
    """Elements per accumulator lane of the tail kernel: one thread's 16-byte vector (so the
    lanes keep the layout of a plain [BLOCK_V // FOLD] tensor: no data moves between threads)."""
    return max(1, min(16 // dtype.itemsize, blk.block_v // 2))


def _launch_args(topk_ids, labels, V, dtype, block_v, chunk):
    blk = row_blocking(V, dtype, block_v, chunk)
    # A chunk's id bits (one int32 per lane, FOLD bits per step) cover at most 32 // FOLD steps:
    # longer chunks are cut (still a function of V and the dtype only).
    max_chunk = (32 // _lane_fold(blk, dtype)) * blk.block_v
    if blk.chunk > max_chunk:
        blk = blk._replace(chunk=max_chunk, n_chunks=cdiv(V, max_chunk))
    meta = dict(
        HAS_LABELS=labels is not None,
        K_PAD=max(16, next_power_of_2(topk_ids.shape[1])),
        CHUNK=blk.chunk,
        BLOCK_V=blk.block_v,
        num_warps=blk.num_warps,
    )
    return (topk_ids if labels is None else labels), blk, meta


def topk_kl_forward(
    logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar, ignore_index,
    n_inner, stride_outer, stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """topk_ids, topk_logprobs: [N, K]; labels: flat [N] or None. Returns flat [N] kl, the row
    max m, log s = L - m and log p_tail. _block_v, _chunk: private overrides of the row
    blocking (tests, tuning)."""
    (N, K), V = topk_ids.shape, logits.shape[-1]
    acc = acc_dtype_of(logits.dtype)
    outs = [torch.empty(N, dtype=acc, device=logits.device) for _ in range(4)]
    if N > 0:
        ids, lq = _sorted(topk_ids, topk_logprobs, labels, V, ignore_index)
        inv_tau = per_row_inv_temperature(temperature, temperature_scalar, N, acc, logits.device)
        labels_arg, blk, meta = _launch_args(topk_ids, labels, V, logits.dtype, _block_v, _chunk)
        part = torch.empty((2, blk.n_chunks, N), dtype=torch.float64, device=logits.device)
        _tail_chunk_kernel[(N, blk.n_chunks)](
            logits, ids, labels_arg, inv_tau, ignore_index, V, K, N, n_inner, stride_outer,
            stride_inner, part, FOLD=_lane_fold(blk, logits.dtype),
            ALIGN=row_align(logits, n_inner, stride_outer, stride_inner), **meta,
        )  # fmt: skip
        _fwd_finish_kernel[(N,)](
            logits, ids, lq, labels_arg, inv_tau, ignore_index, V, K, N, blk.n_chunks, n_inner,
            stride_outer, stride_inner, part, *outs, HAS_LABELS=meta["HAS_LABELS"],
            K_PAD=meta["K_PAD"], num_warps=1,
        )  # fmt: skip
    return outs


def topk_kl_backward(
    grad_kl, logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar,
    ignore_index, row_max, log_s, logp_tail, n_inner, stride_outer, stride_inner, *,
    _block_v=None, _chunk=None,
):  # fmt: skip
    (N, K), V = topk_ids.shape, logits.shape[-1]
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N > 0:
        acc = row_max.dtype
        ids, lq = _sorted(topk_ids, topk_logprobs, labels, V, ignore_index)
        inv_tau = per_row_inv_temperature(temperature, temperature_scalar, N, acc, logits.device)
        labels_arg, blk, meta = _launch_args(topk_ids, labels, V, logits.dtype, _block_v, _chunk)
        _bwd_kernel[(N, blk.n_chunks)](
            grad_kl.to(acc), logits, ids, lq, labels_arg, inv_tau, ignore_index, V, K, n_inner,
            stride_outer, stride_inner, row_max, log_s, logp_tail, grad,
            ALIGN=rows_align((logits, n_inner, stride_outer, stride_inner), grad), **meta,
        )  # fmt: skip
    return grad
