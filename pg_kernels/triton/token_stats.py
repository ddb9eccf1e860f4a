"""token_stats in Triton: docs/math.md §§1-3 over [..., V] logits, behind the C++ launchers'
interface.

Everything is accumulated in base 2: c = log2(e) / tau (rounded once), d2 = x c - r2 (one fma per
element, r2 = a max times c), 2^d2 = e^(z - m). Log-probabilities are taken relative to the row
max with that same fma, so p_c and the sums agree to the last bit (no z_c - L cancellation).

Forward, two kernels:
  1. `_fwd_chunk_kernel`, grid (N, n_chunks): program (r, k) reads elements [k CHUNK, (k+1) CHUNK)
     of row r once, BLOCK_V per loop step, viewed as [U, LANES, VEC]: each thread is one lane and
     holds U 16-byte vectors per step. Each lane keeps its own state (raw max, s1, s2, t2, the
     step that raised its max); per step: the lane's max (in-thread), a branchless rescale (one
     exp2 per lane), then one exp2 per element feeding
         s1 += e,  s2 += e * e,  t2 += e * d2,   e = 2^d2,
     s1 and s2 in fp64 for fp32 logits (`sum_dtype`: e converted once). No block-wide
     reduction, shuffle or barrier inside the loop. After the loop: the chunk max (one
     reduction), every lane rescaled to it, three sums, and the first argmax: the lanes
     holding the chunk max re-read their elements of the step that raised it (just read: L2)
     and take the first column equal to it. The chunk's partial state (raw max, s1, s2, t2,
     first argmax) is stored. Ignored rows read nothing.
  2. `_fwd_merge_kernel`, grid (cdiv(N, BLOCK_R)): per row, the max and first argmax over its
     chunks, then every chunk's sums rescaled to the row's reference and added in chunk order;
     writes the seven outputs.
  When a row fits in one chunk (n_chunks == 1), kernel 1 finalizes the row itself (no kernel 2).

  n_chunks, CHUNK and BLOCK_V depend on V and the dtype only (`_forward_blocking`), never on N,
  every reduction runs in a fixed order and each row's merge is elementwise: results are bitwise
  deterministic and batch invariant.

Backward, one kernel `_bwd_kernel`, grid (N, n_chunks): recomputes p_j = e^((z_j - m) - log s1)
relative to the row max, from the forward's saved argmax (m: the raw logit there) and max_prob
(log2 s1 = -log2 max_prob, split in fp64 into hi + lo, the low part folded into per-row
coefficients), and writes dz_j / tau = e (a + b d2 + q e) with e = 2^((x - m) c - hi); the
label's entry is rewritten after the loop by the program that holds it (no per-element compare).

Passes over V: forward 1 (read), backward 1 (read + write).
Bytes per row of V elements of s bytes (the minimum is the logits once, the gradient once):
  forward   V s read (0 for an ignored row) + label, temperature and the label's logit
            + 36 n_chunks bytes of partial state written and read back (`PART_DTYPE`; none
            when n_chunks == 1) + 6 * 4 + 8 bytes of outputs, + the argmax re-read (one lane's
            share of one step per chunk, from L2). V = 151936 bf16: 303872 B of logits, 5
            chunks, 360 B of partial-state traffic (0.12 %).
  backward  V s read (0 for an ignored row) + V s written + ~40 B of per-row scalars.

GPU design (H200 target: bf16, N = 16384, V = 151936; timed once, benchmarks/results/cuda-h200):
  - Forward step: 32 KiB of logits (BLOCK_V = 16384 bf16 / 8192 fp32 / 4096 fp64) at 8 warps,
    U = 8 16-byte vectors per thread, unmasked except on a row's last step; bf16 rows at even
    element offsets load int32 pairs and convert each half by one shift or mask (PAIRS). Two
    steps per program (CHUNK = 32768 bf16): V = 151936 gives 5 programs per row. The next step
    is prefetched into registers while the current one is reduced.
  - Static SASS of the hot loops (.ci/check_triton_sm90.py, triton 3.6, sm_90, 2026-12-07):
    forward 9.6 instructions per element bf16 (pairs), 9.95 fp16, 10.9 fp32 (budget 10 per
    16-bit element), no BAR/SHFL in the loop, 128 registers (bf16/fp16; 2 programs = 16 warps
    and 64 KiB of loads in flight per SM), 80 fp32. Per program beside the loop: ~290
    instructions of epilogue with ~15 barriers (the chunk's max, sums, the max lane's fp64
    re-sum and the argmax), against 616 per step.
    Backward 10.5 bf16 and fp16, 10.9-11.0 fp32 (budget 12), 32 registers, LDG.128 / STG.128.
    Before this design: forward 23.4 (a block max with barriers every step and an argmax
    branch), backward 15.9 (a per-element label compare).
  - Accuracy (fp32 [16, 4099], randn * 4 with a +40..50 spike, float64 truth, interpreter): at
    tau = 1 logprob 1.2e-6, lse 1.9e-9, gradient 1.9e-9 (plain fp32 PyTorch: 1.2e-6, -, 1.9e-9);
    at tau = 0.7 logprob 1.7e-6 (PyTorch 3.3e-6), gradient 4.8e-6 (PyTorch 3.4e-8) when the
    backward took p_j = e^(z_j - L) from the saved fp32 L (ulp(86) / 2 = 3.8e-6). Relative to the
    row max (saved argmax and max_prob), on peaked fp32 rows at tau 0.7 (L = 40, p 0.996-0.99996,
    [16, 4000]; tests/test_token_stats.py::test_peaked_rows_logprob_gradient): log-prob gradient
    2.7e-6 -> 2.4e-7 (PyTorch 3.5e-7).
  - Knobs to tune on a GPU (one config, no autotune): `_common.STEP_BYTES`, `STEPS_PER_CHUNK`,
    `BYTES_PER_THREAD_STEP` (num_warps), or per call `_block_v` / `_chunk`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from pg_kernels.ops._common import check_gradient_out, check_labels
from pg_kernels.triton import _common
from pg_kernels.triton._common import (
    D_MIN,
    LN2,
    LOG2E_F64,
    acc_dtype_of,
    acc_of,
    cdiv,
    dense_row_offset,
    exp2_acc,
    load_lanes,
    lowest_finite,
    max_nan,
    push_far,
    round_to,
    row_align,
    row_blocking,
    row_offset,
    rows_align,
    scalar_log2_scale_bits,
    ulp_of_one,
    valid_inv_temperature,
    widen,
)

OP = "token_stats"
# Rows per program of the merge kernel: it moves ~20 bytes per (row, chunk), a tiny kernel.
MERGE_BLOCK_R = 128
# False: the 16-bit forward leaves the lane holding each chunk's max in fp32 (`chunk_total`'s
# RESUM off), only to time `lane_sums64` beside the default in one run (`lane_resum_off`;
# benchmarks/bench_token_stats.py's provider lane32:triton).
LANE_RESUM = True


@triton.jit
def _log2_scale(temp_ptr, rows, mask, scale_bits, HAS_TEMP: tl.constexpr):
    """c = log2(e) / tau in float64: from the per-row tensor (a float64 quotient per row), or the
    launcher's scalar (float64 bits, `scalar_log2_scale_bits`). The hot loops use it rounded
    once to ACC; the per-row finalize uses it whole. Anything but a finite positive c (tau <= 0,
    inf, NaN) makes the row NaN."""
    if HAS_TEMP:
        tau = tl.load(temp_ptr + rows, mask=mask, other=1.0).to(tl.float64)
        return tl.full([], LOG2E_F64, tl.float64) / tau
    else:
        return scale_bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _reference(mx):
    """The finite reference a state's sums are taken against: its max, or 0 while empty (-inf),
    so that x - reference stays -inf (not NaN) for -inf logits."""
    return tl.where(mx == float("-inf"), 0.0, mx)


# The floor of a state's move to a higher frame, 2^delta: 2^-2048 is exactly 0 in fp32 and fp64,
# and a finite floor keeps delta * s1 finite (a lane of finfo.min logits moved to its row's
# frame at tau = 2 is -2.5e38 log2 units below it: times its count -inf, and 0 * -inf a NaN t2).
MOVE_MIN = tl.constexpr(-2048.0)


@triton.jit
def frame(mx, c):
    """r2, the exponent offset of a lane whose raw max is mx: d2 = x c - r2 (one fma per
    element), r2 = reference(mx) * c rounded. Its rounding residual eps = mx c - r2 is the max's
    own exponent, |eps| <= ulp(r2) / 2: fine (e = 2^eps <= 2^16) while |r2| < 2^28 in fp32
    (2^57 in fp64, `exact_frame`). Far beyond (a vocabulary masked with -1e30 or finfo.min,
    |x| / tau up to inf), 2^eps would be inf: from 2^29 (2^58) on, the frame is moved 2^-20 of
    itself up, so that every exp of the lane is exactly 0 (d2 <= -2^9 |r2| / 2^29), and held
    within half the float range. Such a lane has no mass next to a max below 2^28 (2^57)
    units (they lie 2^28 apart); a chunk whose max lies beyond that is summed again exactly
    (`exact_sums`)."""
    half = -0.5 * lowest_finite(c.dtype)
    r2 = tl.minimum(tl.maximum(_reference(mx) * c, -half), half)
    return push_far(r2, 64.0 / ulp_of_one(c.dtype), 9.5367431640625e-07)  # 2^-20: `far_lane`


@triton.jit
def far_lane(mx, c):
    """Whether `frame` moved a lane of max mx far out, so that it summed exactly 0."""
    return tl.abs(_reference(mx) * c) >= 64.0 / ulp_of_one(c.dtype)


@triton.jit
def exact_frame(mx, c):
    """Whether the sums of a chunk or row of max mx are taken exactly relative to mx c
    (`exact_sums`: its own exponent 0) rather than to `frame`'s rounded r2: |mx c| >= 2^28
    in fp32, 2^57 in fp64 (inf included, NaN not)."""
    return tl.abs(_reference(mx) * c) >= 32.0 / ulp_of_one(c.dtype)


@triton.jit
def max_exponent(mx, c):
    """The exponent of the max itself in the sums of its chunk or row: `frame`'s rounding
    residual eps = fma(mx, c, -mx c), or 0 in an exact frame (`exact_frame`)."""
    ref = _reference(mx)
    return tl.where(exact_frame(mx, c), 0.0, tl.fma(ref, c, -(ref * c)))


@triton.jit
def move(mx_a, mx_b, c):
    """The exponent delta <= 0 (floored at MOVE_MIN) that moves a chunk's sums, max mx_a, into
    the frame of max mx_b >= mx_a: 2^delta scales them. Between frames within the range,
    r2_a - r2_b (as the lanes move); where either is exact, (mx_a - mx_b) c plus the two
    residuals (`max_exponent`), in fp64."""
    delta = tl.minimum(frame(mx_a, c) - frame(mx_b, c), 0.0)
    f64: tl.constexpr = tl.float64
    wide = (_reference(mx_a).to(f64) - _reference(mx_b).to(f64)) * c.to(f64)
    wide += max_exponent(mx_b, c).to(f64) - max_exponent(mx_a, c).to(f64)
    wide = tl.minimum(wide, 0.0).to(c.dtype)
    delta = tl.where(exact_frame(mx_a, c) | exact_frame(mx_b, c), wide, delta)
    return tl.maximum(delta, MOVE_MIN)


@triton.jit
def exact_sums(x_row, start, n_valid, cmax, c, s1, s2, t2):
    """A chunk's sums relative to cmax c exactly, when its max lies far out (`exact_frame`; a
    rare second pass over the chunk [start, start + n_valid), e.g. one masked whole with -1e30
    or finfo.min): d2 = (x - cmax) c per element, e = 2^d2, summed as the loop sums (NaN for
    a NaN logit). In the dtypes of s1, s2, t2. 1024 elements a step: the kernel's registers
    are its widest loop's, and this one at the hot loop's BLOCK_V took 241 of them (128)."""
    EB: tl.constexpr = 1024
    cols = tl.arange(0, EB)
    a1 = tl.zeros([EB], s1.dtype)
    a2 = tl.zeros([EB], s2.dtype)
    b2 = tl.zeros([EB], t2.dtype)
    for off in range(0, n_valid, EB):
        x = tl.load(x_row + start + off + cols, mask=off + cols < n_valid, other=float("-inf"))
        d2 = tl.maximum((x.to(c.dtype) - cmax) * c, D_MIN, propagate_nan=tl.PropagateNan.ALL)
        e = exp2_acc(d2)
        ew = e.to(s1.dtype)
        a1 += ew
        a2 += ew * ew
        b2 += e * d2
    return tl.sum(a1, axis=0), tl.sum(a2, axis=0), tl.sum(b2, axis=0)


@triton.constexpr_function
def sum_dtype(XDT):
    """The dtype of the s1 and s2 sums (lanes, chunk states, merge) of logits of dtype XDT: fp64
    for fp32 and fp64 logits, fp32 for 16-bit ones (the 16-bit loops have no room for it).
    In fp32 the term of the row's max (e ~ 1) rounds every later term to ulp(1) / 2, and the
    rests beside it are what a peaked row's outputs are made of: the logit-gradient proxy's
    s2 - e_c^2 (lgp 4e-9 .. 3e-6 on rows at p_c 0.996 - 0.99996 was up to 10x off, plain fp32
    PyTorch 0.5) and log s1 (the log-prob of p_c -> 1). As the C++ rows (vec_rows.h, WideLanes):
    the exps stay fp32, each is converted once and added in fp64."""
    return tl.float64 if XDT == tl.float32 or XDT == tl.float64 else tl.float32


# The chunk states [4, n_chunks, N] (raw max, s1, s2, t2; the max and t2 travel exactly) are
# fp64 for every logits dtype: a peaked row's s1 and s2 hold its max's term ~1, and the rests
# beside it are its outputs (lgp's s2 - e_c^2); 32 bytes per chunk and row (36 with the argmax).
PART_DTYPE = torch.float64


@triton.jit
def _lanes(x, ACC: tl.constexpr, VEC: tl.constexpr):
    """A loaded [U, LANES * VEC] block of logits (coalesced: each thread one 16-byte vector per
    row u) seen as [U, LANES, VEC] in ACC: the same registers, no data moves."""
    return tl.reshape(x.to(ACC), [x.shape[0], x.shape[1] // VEC, VEC])


@triton.jit
def _bf16_pair_halves(w):
    """bf16 logits loaded as int32 pairs [U, LANES * VEC // 2] -> the two [U, LANES, VEC // 2]
    fp32 halves: a bf16 is the upper 16 bits of its fp32, so each element is one shift or one
    mask of the pair (the generic conversion spends ~2 instructions per element)."""
    w = tl.reshape(w, [w.shape[0], w.shape[1] // 4, 4])
    lo = (w << 16).to(tl.float32, bitcast=True)
    hi = (w & -65536).to(tl.float32, bitcast=True)
    return lo, hi


@triton.jit
def even_odd(x):
    """A full step's [U, LANES, VEC] bf16 block loaded element-wise -> its even and odd
    elements, [U, LANES, VEC // 2] each: the halves the pairs path (`_bf16_pair_halves`) adds
    one after the other. A row's sums then do not depend on which path its layout took (alone,
    or in a batch whose odd row stride rules the pairs out): bitwise batch invariance."""
    return tl.split(tl.reshape(x, [x.shape[0], x.shape[1], x.shape[2] // 2, 2]))


@triton.jit
def bf16_halves(raw, ACC: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr):
    """A full step's raw bf16 block, int32 pairs (PAIRS) or elements -> its even and odd
    elements, the halves a step adds one after the other whichever the load."""
    if PAIRS:
        xa, xb = _bf16_pair_halves(raw)
    else:
        xa, xb = even_odd(_lanes(raw, ACC, VEC))
    return xa, xb


@triton.jit
def step_offsets(U: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr,
                  ALIGN: tl.constexpr):  # fmt: skip
    """The offsets `load_step` loads a full step at: [U, LANES * VEC // 2] int32 pairs (PAIRS),
    each lane's first element [U, LANES] (rows not 16-byte aligned: `load_lanes`), or the
    elements [U, LANES * VEC]."""
    if PAIRS:
        return tl.arange(0, U)[:, None] * (LANES * VEC // 2) + tl.arange(0, LANES * VEC // 2)
    elif ALIGN == 1:
        return tl.arange(0, U)[:, None] * (LANES * VEC) + tl.arange(0, LANES)[None, :] * VEC
    else:
        return tl.arange(0, U)[:, None] * (LANES * VEC) + tl.arange(0, LANES * VEC)[None, :]


@triton.jit
def load_step(x_row, col0, step, mask, VEC: tl.constexpr, PAIRS: tl.constexpr,
               ALIGN: tl.constexpr):  # fmt: skip
    """The raw full step at column col0 (`step_offsets`' `step`) as two tensors for
    `step_halves`: a bf16 step loaded element-wise as its even and odd elements, any other
    step twice. `mask` is uniform (a prefetch past the last step loads nothing) or None (no
    mask: a mask's fill values cost an instruction per 16-bit pair). Rows that are not 16-byte
    aligned (ALIGN 1) load unmasked."""
    if PAIRS:
        w_row = x_row.to(tl.pointer_type(tl.int32))
        if mask is None:
            ra = tl.load(w_row + col0 // 2 + step)
        else:
            ra = tl.load(w_row + col0 // 2 + step, mask=mask, other=-8388608)
        rb = ra
    elif ALIGN == 1:
        tl.static_assert(mask is None, "load_step: rows not 16-byte aligned load unmasked")
        lanes = x_row + col0 + step
        if x_row.dtype.element_ty == tl.bfloat16:  # even and odd elements apart
            ra = load_lanes(lanes, VEC // 2, 2, step, 0, False)
            rb = load_lanes(lanes + 1, VEC // 2, 2, step, 0, False)
        else:
            ra = load_lanes(lanes, VEC, 1, step, 0, False)
            rb = ra
    elif mask is None:
        ra = tl.load(x_row + col0 + step)
        rb = ra
    else:
        ra = tl.load(x_row + col0 + step, mask=mask, other=float("-inf"))
        rb = ra
    return ra, rb


@triton.jit
def load_last_step(x_row, col0, V, U: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr,
                   ALIGN: tl.constexpr):  # fmt: skip
    """The raw step at column col0 that holds the row's end, as [U, LANES, VEC] lanes: columns
    at or past V read -inf."""
    if ALIGN == 1:
        lanes = col0 + step_offsets(U, LANES, VEC, False, ALIGN)
        x = load_lanes(x_row + lanes, VEC, 1, lanes, V, True)
    else:
        block = tl.arange(0, U)[:, None] * (LANES * VEC) + tl.arange(0, LANES * VEC)[None, :]
        x = tl.load(x_row + col0 + block, mask=col0 + block < V, other=float("-inf"))
        x = _lanes(x, x_row.dtype.element_ty, VEC)
    return x


@triton.jit
def step_halves(ra, rb, ACC: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr,
                 ALIGN: tl.constexpr):  # fmt: skip
    """A raw step (`load_step`) -> (xa, xb): a bf16 step's even and odd elements
    [U, LANES, VEC // 2] (`bf16_halves`), another dtype's [U, LANES, VEC] lanes twice."""
    if PAIRS or ra.dtype == tl.bfloat16 and ALIGN > 1:
        xa, xb = bf16_halves(ra, ACC, VEC, PAIRS)
    elif ALIGN == 1:  # already in lanes (`load_lanes`)
        xa, xb = ra.to(ACC), rb.to(ACC)
    else:
        xa = _lanes(ra, ACC, VEC)
        xb = xa
    return xa, xb


@triton.jit
def _fwd_step(xa, xb, i, c, mx, r2, s1, s2, t2, st):
    """One loop step (see `rescale_lanes`): the lanes moved to their new max, then the block's
    exps added."""
    mx, r2_new, s1, s2, t2, st, _, _ = rescale_lanes(xa, xb, i, c, mx, r2, s1, s2, t2, st)
    s1, s2, t2 = _accumulate(xa, c, r2_new, s1, s2, t2)
    if xb is not None:
        s1, s2, t2 = _accumulate(xb, c, r2_new, s1, s2, t2)
    return mx, r2_new, s1, s2, t2, st


@triton.jit
def rescale_lanes(xa, xb, i, c, mx, r2, s1, s2, t2, st):
    """The lanes' part of one loop step over a block of raw logits in ACC, [U, LANES, H] (-inf
    where masked off), whole in xa or as two halves xa, xb (bf16 pairs). Each lane is one
    thread's share of the step (U 16-byte vectors).

    Each lane keeps its own state: mx = max of its raw logits so far, r2 = reference(mx) * c (log2
    units), and
        s1 = sum 2^d2,  s2 = sum 2^(2 d2),  t2 = sum 2^d2 d2,   d2 = x c - r2 (one fma),
    i.e. the docs/math.md §1 sums in base 2 (2^d2 = e^(z - m), d2 = (z - m) log2 e). st = the last
    step whose block raised the lane's max (where the lane's first argmax lies). The rescale to
    a new max is per lane and branchless: one exp2 per lane per step, not per element.
    Returns the state moved to the block's max (its sums not yet holding the block) and the
    lanes' (delta, f = 2^delta) of that move.
    """
    bmax = tl.max(tl.max(xa, axis=2), axis=0)
    if xb is not None:
        bmax = tl.maximum(bmax, tl.max(tl.max(xb, axis=2), axis=0))
    st = tl.where(bmax > mx, i, st)
    mx = tl.maximum(mx, bmax)
    r2_new = frame(mx, c)
    # f = 2^(r2 - r2_new) <= 1; clamped to <= 0 in the exponent: an empty lane (r2 = 0, sums 0)
    # whose first max is negative would otherwise scale zeros by a large factor (and floored,
    # `MOVE_MIN`).
    delta = tl.maximum(tl.minimum(r2 - r2_new, 0.0), MOVE_MIN)
    f = exp2_acc(delta)
    t2 = f * tl.fma(delta, s1.to(t2.dtype), t2)  # t relative to the new max: f (t + delta s1)
    # The old terms are all below the new max: the fp32 factors' rounding is relative to them.
    s1 = f * s1
    s2 = (f * f) * s2
    return mx, r2_new, s1, s2, t2, st, delta, f


@triton.jit
def _accumulate(x, c, r2, s1, s2, t2):
    _, d2, e = lane_exps(x, c, r2)
    return add_exps(d2, e, s1, s2, t2)


@triton.jit
def lane_exps(x, c, r2):
    """The one exp per element of a [U, LANES, H] block: (d2 unclamped, d2, e = 2^d2). d2 is
    clamped to a finite floor: a -inf logit has e = 0 and must add e * d2 = 0, not 0 * -inf.
    A NaN stays NaN (PropagateNan.ALL, one FMNMX.NAN): the plain max returns D_MIN for it on a
    GPU, and the row's only NaN check is its sums'."""
    d2_raw = tl.fma(x, c, -r2[None, :, None])
    d2 = tl.maximum(d2_raw, D_MIN, propagate_nan=tl.PropagateNan.ALL)
    return d2_raw, d2, exp2_acc(d2)


@triton.jit
def add_exps(d2, e, s1, s2, t2):
    """The block's exps into the lanes' sums (s1, s2 in `sum_dtype`: e converted once, e^2
    formed in it)."""
    ew = e.to(s1.dtype)
    s1 += tl.sum(tl.sum(ew, axis=2), axis=0)
    s2 += tl.sum(tl.sum(ew * ew, axis=2), axis=0)  # 2^(2 d2) as the square of the exp we have
    t2 += tl.sum(tl.sum(e * d2, axis=2), axis=0)
    return s1, s2, t2


@triton.jit
def _finalize(mx, s1, s2, t2, am, x_label, c64, keep, ok):
    """docs/math.md §2 from a row's merged base-2 state (softmax_stats.h's finalize_token_stats).

    mx: the row's raw max; s1, s2, t2 relative to r2 = reference(mx) * c (c = c64 rounded to ACC,
    as the sums used it), so the max itself entered the sums as e_m = 2^eps, eps = fma(mx, c,
    -r2) (its rounding residual; 0 in an exact frame, `max_exponent`), as the loop computed it:
    an fp32 ex2, within ~2 ulp on a GPU.
    The row's numbers are taken relative to that term, log2 of the very e_m in the sums, not
    eps: on a peaked row s1 = e_m + (the rest), and log p_c, max_prob = e_m / s1 and the rests
    s1 - e_m, s2 - e_m^2 then carry no ex2 error of e_m (it was ~2 ulp(1) absolute in each,
    10x the logit-gradient proxy of rows at p_c 0.99996). Per row, in float64, with the logits
    relative to the max through the exact scale c64 (l_m = log2 e_m):
        lse      = ln2 (mx c64 + log2 s1 - l_m)
        logprob  = ln2 ((x_c - mx) c64 + l_m - log2 s1)
        lgp      = ((s1 - e_c)^2 + (s2 - e_c^2)) / s1^2,   e_c = e_m 2^((x_c - mx) c64)
                   (e_c^2 at the max: e_m^2, exact in fp64 as the sums hold it)
        entropy  = ln2 (log2 s1 - t2 / s1),  t2's max term e_m eps taken as e_m l_m
    round once: log p_c stays exact as p_c -> 1 (no z_c - L cancellation), large |log p| carry
    no base-2 rounding, and lgp = (1 - p_c)^2 + sum_{j != c} p_j^2 cancels nothing (at the
    label = argmax, e_c is the sums' own term). keep: not an ignored row (else every output 0,
    argmax 0). ok: the label is in range and c is finite and positive (else NaN). A row whose
    max is not finite (all -inf, a NaN, a +inf) is NaN with argmax -1.
    """
    ACC: tl.constexpr = t2.dtype
    f64: tl.constexpr = tl.float64
    valid = ok & (mx > float("-inf")) & (mx < float("inf"))
    # Rows that end up 0 or NaN anyway compute on a dummy state: no log(0) or 0 / 0 (numpy
    # warnings under the interpreter), same results.
    s1 = tl.where(valid, s1, 1.0).to(f64)
    s2 = s2.to(f64)
    mx = tl.where(valid, mx, 0.0)
    x_label = tl.where(valid, x_label, 0.0).to(f64)
    # The max's own term as the loop formed it (the same fma and exp, bitwise).
    c = c64.to(ACC)
    eps = max_exponent(mx, c)
    e_m = exp2_acc(eps).to(f64)
    log2_e_m = tl.log2(e_m)
    mx = mx.to(f64)
    log2_s1 = tl.log2(s1)
    ln2 = tl.full([], LN2, f64)
    # mx / tau as mx (ln2 c64), not ln2 (mx c64): an fp64 row's mx c64 overflows from |mx| ~
    # 1.2e308 tau (finfo(float64).min at tau 1 had an lse of -inf).
    lse = (mx * (ln2 * c64) + ln2 * (log2_s1 - log2_e_m)).to(ACC)
    log2_p_c = (x_label - mx) * c64 + log2_e_m - log2_s1
    logprob = (ln2 * log2_p_c).to(ACC)
    e_c = e_m * tl.exp(ln2 * ((x_label - mx) * c64))  # e_m itself at the max (exp(0) = 1)
    # s2 - e_c^2 is the rest of a peaked row's s2: at the max, take away the very term the sums
    # hold, e_m squared in fp64 (the lane holding the max is summed in fp64 on every dtype:
    # `chunk_total`), not e_c^2 through exp (an lgp of 1e-7 at ulp(1) / 2).
    e_c2 = tl.where(x_label == mx, e_m * e_m, e_c * e_c)
    lgp = ((s1 - e_c) * (s1 - e_c) + (s2 - e_c2)) / (s1 * s1)
    lgp = tl.where(lgp > 0.0, lgp, 0.0).to(ACC)
    collision = (s2 / (s1 * s1)).to(ACC)
    # t2 holds the max's term as e_m eps (rounded in ACC): entropy is taken relative to the
    # sums' own term, log2 e_m, as log2(s1 / e_m) + log2 e_m (s1 - e_m) / s1 - rest / s1 with
    # rest = t2 - e_m eps, and a rest within that term's rounding in t2 is none (t2 cannot
    # resolve it): a row whose mass is its max alone (one entry, -inf elsewhere) has entropy
    # exactly 0. (Under numpy's fma eps = 0, and every rest is kept.)
    eps = eps.to(f64)
    rest = t2.to(f64) - e_m * eps
    rest = tl.where(tl.abs(rest) <= tl.abs(e_m * eps) * ulp_of_one(ACC), 0.0, rest)
    entropy = (log2_s1 - log2_e_m) + (log2_e_m * (s1 - e_m) - rest) / s1
    entropy = tl.where(entropy > 0.0, ln2 * entropy, 0.0).to(ACC)
    max_prob = (e_m / s1).to(ACC)
    nan = float("nan")
    logprob = tl.where(keep, tl.where(valid, logprob, nan), 0.0)
    entropy = tl.where(keep, tl.where(valid, entropy, nan), 0.0)
    collision = tl.where(keep, tl.where(valid, collision, nan), 0.0)
    lgp = tl.where(keep, tl.where(valid, lgp, nan), 0.0)
    lse = tl.where(keep, tl.where(valid, lse, nan), 0.0)
    max_prob = tl.where(keep, tl.where(valid, max_prob, nan), 0.0)
    argmax = tl.where(keep, tl.where(valid, am.to(tl.int64), -1), 0)
    return logprob, entropy, collision, lgp, lse, max_prob, argmax


@triton.jit
def _store_outputs(
    rows, mask, vals, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr, max_prob_ptr,
    argmax_ptr,
):  # fmt: skip
    logprob, entropy, collision, lgp, lse, max_prob, argmax = vals
    tl.store(logprob_ptr + rows, logprob, mask=mask)
    tl.store(entropy_ptr + rows, entropy, mask=mask)
    tl.store(collision_ptr + rows, collision, mask=mask)
    tl.store(lgp_ptr + rows, lgp, mask=mask)
    tl.store(lse_ptr + rows, lse, mask=mask)
    tl.store(max_prob_ptr + rows, max_prob, mask=mask)
    tl.store(argmax_ptr + rows, argmax, mask=mask)


@triton.jit
def chunk_total(
    mx, r2, s1, s2, t2, st, c, x_row, start, n_valid, block, V,
    U: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr, RESUM: tl.constexpr,
):  # fmt: skip
    """A chunk's state from its lanes: (raw max, NaN if a sum is; s1, s2, t2 in the frame of
    the max (`frame`; exactly relative to max * c when it lies far out, `exact_sums`); first
    argmax as int32). The chunk is [start, start + n_valid) of the row x_row. RESUM: the fp32
    lane holding the max summed again in fp64 (`lane_sums64`); off only to time it
    (`LANE_RESUM`)."""
    # The chunk: every lane rescaled to the chunk's max, then plain sums (one reduction each).
    cmax = tl.max(mx, axis=0)
    r2_max = frame(cmax, c)
    delta = tl.maximum(tl.minimum(r2 - r2_max, 0.0), MOVE_MIN)
    f = exp2_acc(delta)
    # s1, s2 added across the lanes in fp64 (once per chunk): the lane holding the max carries
    # its term ~1, and a 16-bit row's fp32 tree over 256 lanes would round each rest against it.
    s1_lanes = f * s1.to(tl.float64)
    s2_lanes = (f * f) * s2.to(tl.float64)
    if s1.dtype == tl.float32 and RESUM:
        # 16-bit logits, fp32 lanes: the lane holding the max has rounded every term it added
        # beside the max's ~1 at ulp(1) / 2, and a peaked row's outputs are those rests (lgp's
        # s2 - e_c^2, entropy's and log p_c's s1 - e_m). That lane is summed again in fp64.
        lanes = tl.arange(0, LANES)
        lane = tl.min(tl.where(mx == cmax, lanes, LANES), axis=0)
        own = lanes == lane
        own_s1, own_s2 = lane_sums64(x_row, lane, start, n_valid, r2_max, c, U, LANES, VEC,
                                     BLOCK_V, CHUNK)  # fmt: skip
        s1_sum = tl.sum(tl.where(own, 0.0, s1_lanes), axis=0) + own_s1
        s2_sum = tl.sum(tl.where(own, 0.0, s2_lanes), axis=0) + own_s2
    else:
        s1_sum = tl.sum(s1_lanes, axis=0)
        s2_sum = tl.sum(s2_lanes, axis=0)
    t2_sum = tl.sum(f * tl.fma(delta, s1.to(t2.dtype), t2), axis=0)
    if exact_frame(cmax, c):
        s1_sum, s2_sum, t2_sum = exact_sums(x_row, start, n_valid, cmax, c, s1_sum, s2_sum, t2_sum)
    # The first argmax: the lanes holding the chunk max re-read their elements of the step that
    # raised it (from L2: just read) and take the first column equal to it.
    # (An empty chunk, e.g. an ignored row, re-reads nothing: its bound is 0.)
    lane_hit = mx == cmax
    cols = start + st[None, :, None] * BLOCK_V + tl.reshape(block, [U, LANES, VEC])
    bound = tl.where(cmax > float("-inf"), V, 0)
    again = tl.load(
        x_row + cols, mask=lane_hit[None, :, None] & (cols < bound), other=float("-inf")
    )
    hit = again.to(s1.dtype) == cmax
    am = tl.min(tl.min(tl.min(tl.where(hit, cols, 2147483647), axis=2), axis=0), axis=0)
    am = tl.where(cmax > float("-inf"), am, 0).to(tl.int32)
    # A NaN logit (or +inf - +inf) shows up as a NaN sum: carry it in the max, which the merge
    # and the finalize check (the max itself may have dropped the NaN).
    cmax = tl.where(s1_sum != s1_sum, float("nan"), cmax)
    return cmax, s1_sum, s2_sum, t2_sum, am


@triton.jit
def lane_sums64(
    x_row, lane, start, n_valid, r2, c,
    U: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr,
    CHUNK: tl.constexpr,
):  # fmt: skip
    """s1 and s2 of one lane of the chunk [start, start + n_valid) (NaN for lane LANES, which
    `chunk_total` passes only when no lane holds the max: a chunk holding a NaN, NaN anyway),
    its elements read again (from L2: just read, CHUNK / LANES of them) and their exps formed
    as the loop formed them relative to r2, the lane's frame, then summed in fp64. Once per
    chunk, outside the loop: the hot loop keeps its fp32 lanes (fp64 ones took 161-168
    registers against 128, and a rest kept beside each lane 2-3 instructions per element).
    The load is scalar on every path (sm_90 TTGIR, Triton 3.6: sizePerThread [1, 1, 1] for
    aligned and unaligned rows alike), so the fp64 sums run in one order whatever the row's
    alignment: a row's outputs stay bitwise the same alone, in a batch of odd stride, and in
    the step_stats bundle."""
    STEPS: tl.constexpr = triton.next_power_of_2(CHUNK // BLOCK_V)
    # Element (step, u, k) of the lane: column step * BLOCK_V + u * LANES * VEC + lane * VEC + k.
    first = tl.arange(0, STEPS)[:, None] * BLOCK_V + tl.arange(0, U)[None, :] * (LANES * VEC)
    cols = tl.reshape(first, [STEPS * U, 1, 1]) + lane * VEC + tl.arange(0, VEC)[None, None, :]
    x = tl.load(x_row + start + cols, mask=(cols < n_valid) & (lane < LANES),
                other=float("-inf"))  # fmt: skip
    _, _, e = lane_exps(x.to(c.dtype), c, tl.zeros([1], c.dtype) + r2)
    e = tl.reshape(e, [STEPS * U * VEC]).to(tl.float64)
    return tl.sum(e, axis=0), tl.sum(e * e, axis=0)


@triton.jit
def store_partial(part_ptr, part_idx_ptr, chunk, row, N, cmax, s1, s2, t2, am):
    """A chunk's state into part_ptr [4, n_chunks, N] and part_idx_ptr [n_chunks, N]."""
    idx = chunk.to(tl.int64) * N + row
    plane = tl.num_programs(1).to(tl.int64) * N
    tl.store(part_ptr + idx, cmax)
    tl.store(part_ptr + plane + idx, s1)
    tl.store(part_ptr + 2 * plane + idx, s2)
    tl.store(part_ptr + 3 * plane + idx, t2)
    tl.store(part_idx_ptr + idx, am)


@triton.jit(do_not_specialize=["scale_bits", "ignore_index"])
def _fwd_chunk_kernel(
    x_ptr, labels_ptr, temp_ptr, scale_bits, ignore_index, V, N,
    n_inner, stride_outer, stride_inner,
    part_ptr, part_idx_ptr,
    logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr, max_prob_ptr, argmax_ptr,
    HAS_TEMP: tl.constexpr, FINALIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    U: tl.constexpr, VEC: tl.constexpr, PAIRS: tl.constexpr, ALIGN: tl.constexpr,
    RESUM: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the partial state of one chunk of one row.

    part_ptr: [4, n_chunks, N] (raw max, s1, s2, t2; base 2, relative to reference(max) * c),
    part_idx_ptr: [n_chunks, N] int32 first argmax; chunk-major so that the merge kernel's loads
    are contiguous over rows. With FINALIZE (one chunk per row) the row's outputs are written
    directly instead.
    """
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    LANES: tl.constexpr = BLOCK_V // (U * VEC)
    SUM: tl.constexpr = sum_dtype(x_ptr.dtype.element_ty)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    c64 = _log2_scale(temp_ptr, row, True, scale_bits, HAS_TEMP)
    c = c64.to(ACC)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)

    start = chunk * CHUNK
    # Ignored rows: no step runs, nothing is read, the state stays empty.
    n_valid = tl.where(keep, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    # Element (u, lane, k) of a step: u * LANES * VEC + lane * VEC + k. A thread holds one lane:
    # U 16-byte vectors, LANES * VEC elements apart (coalesced across the warp).
    block = tl.arange(0, U)[:, None] * (LANES * VEC) + tl.arange(0, LANES * VEC)[None, :]
    mx = tl.full([LANES], float("-inf"), ACC)
    r2 = tl.zeros([LANES], ACC)
    s1 = tl.zeros([LANES], SUM)
    s2 = tl.zeros([LANES], SUM)
    t2 = tl.zeros([LANES], ACC)
    st = tl.zeros([LANES], tl.int32)
    # Rows of 16-byte vectors (ALIGN > 1): software pipelining by hand, block i + 1 loaded (into
    # registers, as raw logits) before block i is reduced. Full blocks need no bounds mask; the
    # mask is one uniform flag (the last prefetch loads nothing), which keeps the loads
    # vectorized. Other rows load element-wise (`load_lanes`) in the trip that reduces them:
    # carried into the next trip, a prefetched block's scalar registers cost copies (sm_90:
    # 10.0-10.8 SASS per element against 9.7-10.4; CONTRIBUTING.md).
    PREFETCH: tl.constexpr = ALIGN > 1
    step = step_offsets(U, LANES, VEC, PAIRS, ALIGN)
    if PREFETCH:
        ra, rb = load_step(x_row, start, step, n_full > 0, VEC, PAIRS, ALIGN)
    for i in range(0, n_full):
        col0 = start + i * BLOCK_V
        if not PREFETCH:
            ra, rb = load_step(x_row, col0, step, None, VEC, PAIRS, ALIGN)
        # Converted first: the raw registers are then free for the prefetch to land in (no
        # register copies to carry the prefetched block into the next trip).
        xa, xb = step_halves(ra, rb, ACC, VEC, PAIRS, ALIGN)
        if x_ptr.dtype.element_ty != tl.bfloat16:
            xb = None
        if PREFETCH:
            ra, rb = load_step(x_row, col0 + BLOCK_V, step, i + 1 < n_full, VEC, PAIRS, ALIGN)
        mx, r2, s1, s2, t2, st = _fwd_step(xa, xb, i, c, mx, r2, s1, s2, t2, st)
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        col0 = start + n_full * BLOCK_V
        x = load_last_step(x_row, col0, V, U, LANES, VEC, ALIGN).to(ACC)
        mx, r2, s1, s2, t2, st = _fwd_step(x, None, n_full, c, mx, r2, s1, s2, t2, st)

    cmax, s1_sum, s2_sum, t2_sum, am = chunk_total(
        mx, r2, s1, s2, t2, st, c, x_row, start, n_valid, block, V, U, LANES, VEC, BLOCK_V, CHUNK,
        RESUM,
    )  # fmt: skip

    if FINALIZE:
        ok = keep & (label >= 0) & (label < V) & valid_inv_temperature(c)
        x_label = tl.load(x_row + tl.where(ok, label, 0), mask=ok, other=0.0).to(ACC)
        vals = _finalize(cmax, s1_sum, s2_sum, t2_sum, am, x_label, c64, keep, ok)
        _store_outputs(
            row, True, vals, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr,
            max_prob_ptr, argmax_ptr,
        )  # fmt: skip
    else:
        store_partial(part_ptr, part_idx_ptr, chunk, row, N, cmax, s1_sum, s2_sum, t2_sum, am)


@triton.jit(do_not_specialize=["scale_bits", "ignore_index"])
def _fwd_merge_kernel(
    x_ptr, labels_ptr, temp_ptr, scale_bits, ignore_index, V, N, n_chunks,
    n_inner, stride_outer, stride_inner,
    part_ptr, part_idx_ptr,
    logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr, max_prob_ptr, argmax_ptr,
    HAS_TEMP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: merge the n_chunks partial states of each row in chunk order
    (a fixed order, elementwise over rows: each row's result is independent of the others)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    vals, _ = merge_rows(
        x_ptr, labels_ptr, temp_ptr, scale_bits, ignore_index, V, N, n_chunks,
        n_inner, stride_outer, stride_inner, part_ptr, part_idx_ptr, rows, rmask, HAS_TEMP,
    )  # fmt: skip
    _store_outputs(
        rows, rmask, vals, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr,
        max_prob_ptr, argmax_ptr,
    )  # fmt: skip


@triton.jit
def merge_rows(
    x_ptr, labels_ptr, temp_ptr, scale_bits, ignore_index, V, N, n_chunks,
    n_inner, stride_outer, stride_inner, part_ptr, part_idx_ptr, rows, rmask,
    HAS_TEMP: tl.constexpr,
):  # fmt: skip
    """The seven outputs of `rows` (see `_finalize`) from their n_chunks partial states, merged
    in chunk order, and the rows' merged raw max (NaN for a NaN row)."""
    ACC: tl.constexpr = acc_of(x_ptr.dtype.element_ty)
    label = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    keep = label != ignore_index
    c64 = _log2_scale(temp_ptr, rows, rmask, scale_bits, HAS_TEMP)
    c64 = tl.zeros(rows.shape, tl.float64) + c64  # a scalar temperature: broadcast to the rows
    c = c64.to(ACC)

    # tl.cast: an n_chunks of 1 arrives as a Python int (Triton specializes 1)
    plane = tl.cast(n_chunks, tl.int64) * N
    # First the row's max and first argmax (strictly greater: among equal maxima the earliest
    # chunk, i.e. the first index, wins), then every chunk's sums rescaled straight to the row's
    # reference, added in chunk order: a fixed order, so bitwise deterministic.
    mx = tl.full(rows.shape, float("-inf"), ACC)
    am = tl.zeros(rows.shape, tl.int32)
    idx = rows
    for _ in range(0, n_chunks):
        mx_k = tl.load(part_ptr + idx, mask=rmask, other=float("-inf")).to(ACC)
        am = tl.where(mx_k > mx, tl.load(part_idx_ptr + idx, mask=rmask, other=0), am)
        mx = max_nan(mx, mx_k)
        idx += N
    s1 = tl.zeros(rows.shape, part_ptr.dtype.element_ty)  # sum_dtype
    s2 = tl.zeros(rows.shape, part_ptr.dtype.element_ty)
    t2 = tl.zeros(rows.shape, ACC)
    idx = rows
    for _ in range(0, n_chunks):
        # The chunk kernel's frame, rounded the same way (same c, same product).
        mx_k = tl.load(part_ptr + idx, mask=rmask, other=0.0).to(ACC)
        delta = move(mx_k, mx, c)
        f = exp2_acc(delta)
        s1_k = tl.load(part_ptr + plane + idx, mask=rmask, other=0.0)
        s1 += f * s1_k
        s2 += (f * f) * tl.load(part_ptr + 2 * plane + idx, mask=rmask, other=0.0)
        t2_k = tl.load(part_ptr + 3 * plane + idx, mask=rmask, other=0.0).to(ACC)
        t2 += f * tl.fma(delta, s1_k.to(ACC), t2_k)
        idx += N

    ok = keep & (label >= 0) & (label < V) & valid_inv_temperature(c)
    x_row = x_ptr + row_offset(rows, n_inner, stride_outer, stride_inner)
    x_label = tl.load(x_row + tl.where(ok, label, 0), mask=ok & rmask, other=0.0).to(ACC)
    return _finalize(mx, s1, s2, t2, am, x_label, c64, keep, ok), mx


@triton.jit
def bwd_row(
    x_row, row, label, keep, c, V, g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr,
    lse_ptr, entropy_ptr, collision_ptr, max_prob_ptr, argmax_ptr,
):  # fmt: skip
    """The per-row numbers of the backward (see `_bwd_kernel`): (m, c, rho_hi, a, b, q, 1 / tau
    (0 for an ignored row), g_l, ok: the saved state is a finished forward row's, k = 2^-rho_lo
    (p_j = k 2^d2), and in fp64 for single entries (`bwd_value64`): (rho_lo, A, g_h, g_c))."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    collision = tl.load(collision_ptr + row)
    # An ignored row's upstream gradients are dropped here, not zeroed by inv_tau = 0 below: they
    # may be infinite or NaN (sqrt(collision) at an ignored row's 0), and 0 * inf is NaN.
    g_l = tl.where(keep, tl.load(g_logprob_ptr + row), 0.0)
    g_h = tl.where(keep, tl.load(g_entropy_ptr + row), 0.0)
    g_c = tl.where(keep, tl.load(g_collision_ptr + row), 0.0)
    g_big_l = tl.where(keep, tl.load(g_lse_ptr + row), 0.0)
    # A NaN row (bad label, bad temperature, or a forward NaN row: L NaN) gets NaN everywhere,
    # through L; an infinite L is a row whose max / tau is beyond the float range (finfo.min
    # masks at tau < 1), whose gradient is finite. Ignored rows read nothing (x = -inf gives
    # e = 0) and get exactly 0: coefficients 0 and a finite L2 and c whatever their saved values.
    # A saved state that is not a finished forward row's (argmax out of range, max_prob not in
    # (0, 1]) also gives a NaN row, and nothing out of the row is read.
    am = tl.load(argmax_ptr + row)
    max_prob = tl.load(max_prob_ptr + row)
    ok = (label >= 0) & (label < V) & valid_inv_temperature(c)
    ok = ok & (lse == lse)
    ok = ok & (am >= 0) & (am < V) & (max_prob > 0.0) & (max_prob <= 1.0)
    m = tl.load(x_row + tl.where(keep & ok, am, 0), mask=keep & ok, other=0.0).to(ACC)
    log2_mp = tl.log2(tl.where(keep & ok, max_prob, 1.0).to(tl.float64))
    rho = tl.where(keep, tl.where(ok, -log2_mp, float("nan")), 0.0)
    rho_hi = rho.to(ACC)
    rho_lo64 = rho - rho_hi.to(tl.float64)
    rho_lo = rho_lo64.to(ACC)
    # k in fp64, rounded once: an fp32 2^-rho_lo is a GPU's MUFU.EX2, within ~2 ulp of 1, and
    # k scales every p_j of the row.
    k = tl.exp(-rho_lo64 * LN2).to(ACC)
    inv_tau = tl.where(keep, c * LN2, 0.0)  # 1 / tau, or 0: an ignored row's coefficients
    c = tl.where(keep, c, 1.0)
    f64: tl.constexpr = tl.float64
    big_a64 = g_big_l.to(f64) - g_l.to(f64) - g_h.to(f64) * entropy - 2.0 * g_c.to(f64) * collision
    big_a = big_a64.to(ACC)
    a = inv_tau * k * (big_a + g_h * LN2 * rho_lo)
    b = inv_tau * k * (-g_h * LN2)
    q = inv_tau * (k * k) * (2.0 * g_c)
    return m, c, rho_hi, a, b, q, inv_tau, g_l, ok, k, (rho_lo64, big_a64, g_h, g_c)


@triton.jit
def _bwd_values(x, m, c, rho_hi, a, b, q):
    """dz / tau of logits x (ACC) without the label term, in base 2 (see _bwd_kernel):
    e = 2^d2, d2 = (x - m) c - rho_hi, dz = e (a + b d2 + q e). d2 is clamped to a finite floor:
    a -inf logit has e = 0 and e (b d2) must be 0, not 0 * inf."""
    d2, e = bwd_exps(x, m, c, rho_hi, D_MIN)
    return bwd_dz(d2, e, a, b, q)


@triton.jit
def bwd_exps(x, m, c, rho_hi, FLOOR: tl.constexpr):
    """(d2, e = 2^d2) of logits x: e = p_j / k (see `_bwd_values`)."""
    d2 = bwd_exponent(x, m, c, rho_hi, FLOOR)
    return d2, exp2_acc(d2)


@triton.jit
def bwd_exponent(x, m, c, rho_hi, FLOOR: tl.constexpr):
    """d2 = (x - m) c - rho_hi of logits x, floored at FLOOR (D_MIN, or lower where d2 itself
    is weighed by another side's probability; see `_bwd_values`): any floor at which 2^d2 is 0
    gives the same e, and a finite one keeps e (b d2) = 0 for a -inf logit."""
    return tl.maximum(tl.fma(x - m, c, -rho_hi), FLOOR)


@triton.jit
def bwd_dz(d2, e, a, b, q):
    """dz / tau without the label term: e (a + b d2 + q e)."""
    return e * tl.fma(q, e, tl.fma(b, d2, a))


@triton.jit(do_not_specialize=["scale_bits", "ignore_index"])
def _bwd_kernel(
    x_ptr, labels_ptr, temp_ptr, scale_bits, ignore_index, V,
    n_inner, stride_outer, stride_inner,
    g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr, lse_ptr, entropy_ptr, collision_ptr,
    max_prob_ptr, argmax_ptr, grad_ptr,
    HAS_TEMP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the gradient of one chunk of one row, written once (rounded once).

    docs/math.md §3 with p_j = e^((z_j - m_z) - log s1) recomputed relative to the row max, in
    base 2: m = the raw logit at the saved argmax (exact; the logits near the max enter as small
    differences x - m, so the scale's rounding barely touches the large p_j) and rho = log2 s1 =
    -log2(max_prob) (both saved by the forward), split in fp64 once per row into rho_hi + rho_lo;
    d2 = (x - m) c - rho_hi (c = log2(e) / tau rounded), p_j = k 2^d2 with k = 2^-rho_lo and
    log p_j = ln2 (d2 - rho_lo). (Not p_j = e^(z_j - L) from the saved L: fp32 L carries
    ulp(L) / 2 = 1.9e-6 at L ~ 40, i.e. that absolute error on p ~ 1.) Then
        dz_j = p_j (A + B log p_j + C p_j) + g_l 1[j = c]
             = e (a + b d2 + q e) + g_l 1[j = c],     e = 2^d2,
    A = g_L - g_l - g_H H - 2 g_C C, B = -g_H, C = 2 g_C (token_stats_grad_coef), and
    a = k (A - B ln2 rho_lo), b = k B ln2, q = k^2 C, all divided by tau: every correction lives
    in per-row coefficients. The label's entry is rewritten after the loop (by the program that
    holds it, after a barrier), so the loop has no per-element compare.
    """
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    c64 = _log2_scale(temp_ptr, row, True, scale_bits, HAS_TEMP)
    c = c64.to(ACC)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    m, c, rho_hi, a, b, q, inv_tau, g_l, ok, _, row64 = bwd_row(
        x_row, row, label, keep, c, V, g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr,
        lse_ptr, entropy_ptr, collision_ptr, max_prob_ptr, argmax_ptr,
    )  # fmt: skip

    g_row = grad_ptr + dense_row_offset(row, V, ALIGN)  # a fresh contiguous gradient
    start = chunk * CHUNK
    n_valid = tl.minimum(V - start, CHUNK)
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    for i in range(0, n_full):
        cols = start + i * BLOCK_V + lanes
        # A uniform mask (one flag for the whole block) keeps the loads vectorized.
        x = widen(tl.load(x_row + cols, mask=keep, other=float("-inf")), ACC)
        dz = _bwd_values(x, m, c, rho_hi, a, b, q)
        tl.store(g_row + cols, round_to(dz, g_row.dtype.element_ty))
    if n_full * BLOCK_V < n_valid:
        cols = start + n_full * BLOCK_V + lanes
        in_row = cols < V
        x = widen(tl.load(x_row + cols, mask=in_row & keep, other=float("-inf")), ACC)
        dz = _bwd_values(x, m, c, rho_hi, a, b, q)
        tl.store(g_row + cols, round_to(dz, g_row.dtype.element_ty), mask=in_row)
    # The label's and the argmax's entries again, in fp64 from fp64 coefficients and rounded
    # once (as the C++ rows do the label's): the row's largest p_j sit there, whose fp32 2^d2
    # is within ~2 ulp on a GPU (MUFU.EX2), ~2 ulp(1) of their gradient, and the label's
    # g_l (1 - p_c) cancels on a peaked row (fp32 at tau 0.7, with the interpreter's exp2 given
    # the GPU's error, PGK_EMULATE_GPU: 6.1e-7 off where plain PyTorch has 3.5e-7; now
    # 2.9e-7). The barrier orders them after the block stores of the same addresses (by other
    # threads of this program).
    if keep & ok:
        am = tl.load(argmax_ptr + row).to(tl.int64)
        label_here = (label >= start) & (label < start + n_valid)
        am_here = (am >= start) & (am < start + n_valid) & (am != label)
        if label_here | am_here:
            tl.debug_barrier()
            if am_here:
                store_entry64(x_row, g_row, am, m, c, rho_hi, row64, 0.0)
            if label_here:
                store_entry64(x_row, g_row, label, m, c, rho_hi, row64, g_l)


@triton.jit
def store_entry64(x_row, g_row, j, m, c, rho_hi, row64, g_l):
    """Entry j of the gradient row rewritten from fp64 (`bwd_value64`), rounded once."""
    x = tl.load(x_row + j).to(m.dtype)
    tl.store(g_row + j, round_to(bwd_value64(x, m, c, rho_hi, row64, g_l), g_row.dtype.element_ty))


@triton.jit
def bwd_value64(x, m, c, rho_hi, row64, g_l):
    """dz of one logit x in fp64 (docs/math.md §3): p (A + B log p + C p) + g_l, over tau, with
    log p = ln2 (d2 - rho_lo) from the loop's own d2 and the row's fp64 numbers row64 =
    (rho_lo, A, g_h, g_c) of `bwd_row` (B = -g_h, C = 2 g_c); g_l: the label's term, or 0."""
    f64: tl.constexpr = tl.float64
    rho_lo, big_a, g_h, g_c = row64
    d2 = bwd_exponent(x, m, c, rho_hi, D_MIN).to(f64)  # the loop's own d2
    log_p = LN2 * (d2 - rho_lo)
    p = tl.exp(log_p)
    inv_tau = c.to(f64) * LN2
    return inv_tau * (p * (big_a - g_h.to(f64) * log_p + 2.0 * g_c.to(f64) * p) + g_l)


# ------------------------------------------------------------------------------------------------
# Launchers: the interface of the C++ kernels (pg_kernels/_C token_stats_forward / _backward).


def _forward_blocking(V: int, dtype: torch.dtype, block_v: int | None, chunk: int | None):
    """The forward's steps are four common steps (32 KiB: eight 16-byte vectors per thread at 8
    warps), so each lane's rescale and the loop overhead spread over 64 bf16 elements; a chunk
    is two such steps (64 KiB)."""
    if block_v is None:
        block_v = 4 * _common.STEP_BYTES // dtype.itemsize
        if chunk is None:
            chunk = max(1, _common.STEPS_PER_CHUNK // 2) * block_v
    return row_blocking(V, dtype, block_v, chunk)


def _check_inputs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor | None, ignore_index: int
) -> None:
    """Guards the invariants the kernels rely on (the public op validates user input first)."""
    if (
        logits.dim() < 1
        or logits.shape[-1] < 1
        or (logits.stride(-1) != 1 and logits.shape[-1] > 1 and logits.numel() > 0)
    ):
        raise ValueError(f"{OP}: logits must be [..., V] with V >= 1 and a contiguous last dim")
    if labels.dim() != 1 or not labels.is_contiguous():
        raise ValueError(f"{OP}: labels must be flat and contiguous")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{OP}: labels must be int64 or int32, got {labels.dtype}")
    if logits.numel() != labels.numel() * logits.shape[-1]:
        raise ValueError(
            f"{OP}: logits has {logits.numel() // logits.shape[-1]} rows but labels has "
            f"{labels.numel()}"
        )
    if temperature is not None:
        acc = acc_dtype_of(logits.dtype)
        if (
            temperature.dtype != acc
            or not temperature.is_contiguous()
            or temperature.numel() != labels.numel()
        ):
            raise ValueError(
                f"{OP}: per-row temperature must be a contiguous {acc} tensor of "
                f"{labels.numel()} elements"
            )
    if labels.device.type == "cpu":
        # Free on CPU tensors (the interpreter); on CUDA a bad label gives a NaN row, no sync.
        try:
            check_labels(labels, logits.shape[-1], ignore_index)
        except ValueError as e:
            raise ValueError(f"{OP}: {e}") from None


def token_stats_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | None,
    temperature_scalar: float,
    ignore_index: int,
    n_inner: int,
    stride_outer: int,
    stride_inner: int,
    *,
    _block_v: int | None = None,
    _chunk: int | None = None,
) -> list[torch.Tensor]:
    """Per-token statistics of softmax(logits / temperature).

    Args:
        logits: [..., V] bf16/fp16/fp32/fp64, last dim contiguous; row r starts at element
            (r // n_inner) * stride_outer + (r % n_inner) * stride_inner. Not copied.
        labels: [N] int64 or int32, contiguous.
        temperature: None (use temperature_scalar) or [N] contiguous, fp32 (fp64 for fp64 logits).
        ignore_index: label of rows whose outputs are all 0.
        _block_v, _chunk: private overrides of the row blocking (tests and tuning only).

    Returns:
        [logprob, entropy, collision, lgp, lse, max_prob, argmax]: [N] fp32 (fp64 for fp64
        logits) and argmax [N] int64.
    """
    _check_inputs(logits, labels, temperature, ignore_index)
    N, V = labels.numel(), logits.shape[-1]
    acc = acc_dtype_of(logits.dtype)
    outs = [torch.empty(N, dtype=acc, device=logits.device) for _ in range(6)]
    argmax = torch.empty(N, dtype=torch.int64, device=logits.device)
    if N == 0:
        return [*outs, argmax]
    blk = _forward_blocking(V, logits.dtype, _block_v, _chunk)
    vec = min(16 // logits.dtype.itemsize, blk.block_v)
    u = max(1, min(8, blk.block_v // (vec * 32 * blk.num_warps)))
    has_temp = temperature is not None
    temp = temperature if has_temp else labels  # never read without HAS_TEMP
    scale_bits = 0 if has_temp else scalar_log2_scale_bits(temperature_scalar, acc)
    single = blk.n_chunks == 1
    align = row_align(logits, n_inner, stride_outer, stride_inner)
    if single:
        part = outs[0]  # unused
        part_idx = argmax
    else:
        part = torch.empty((4, blk.n_chunks, N), dtype=PART_DTYPE, device=logits.device)
        part_idx = torch.empty((blk.n_chunks, N), dtype=torch.int32, device=logits.device)
    _fwd_chunk_kernel[(N, blk.n_chunks)](
        logits, labels, temp, scale_bits, ignore_index, V, N,
        n_inner, stride_outer, stride_inner,
        part, part_idx, *outs, argmax,
        HAS_TEMP=has_temp, FINALIZE=single, CHUNK=blk.chunk, BLOCK_V=blk.block_v,
        U=u, VEC=vec, PAIRS=logits.dtype == torch.bfloat16 and align > 1, ALIGN=align,
        RESUM=LANE_RESUM, num_warps=blk.num_warps,
    )  # fmt: skip
    if not single:
        _fwd_merge_kernel[(cdiv(N, MERGE_BLOCK_R),)](
            logits, labels, temp, scale_bits, ignore_index, V, N, blk.n_chunks,
            n_inner, stride_outer, stride_inner,
            part, part_idx, *outs, argmax,
            HAS_TEMP=has_temp, BLOCK_R=MERGE_BLOCK_R, num_warps=4,
        )  # fmt: skip
    return [*outs, argmax]


@contextlib.contextmanager
def lane_resum_off():
    """`LANE_RESUM` off for the launches inside (the benchmark's A/B against the default)."""
    global LANE_RESUM
    before, LANE_RESUM = LANE_RESUM, False
    try:
        yield
    finally:
        LANE_RESUM = before


def gradient_output(logits: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` when given (checked), else a fresh contiguous tensor of logits' shape and dtype."""
    if out is None:
        return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    check_gradient_out(f"{OP}_backward", logits, out)
    return out


def token_stats_backward(
    g_logprob: torch.Tensor,
    g_entropy: torch.Tensor,
    g_collision: torch.Tensor,
    g_lse: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor | None,
    temperature_scalar: float,
    ignore_index: int,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    collision: torch.Tensor,
    max_prob: torch.Tensor,
    argmax: torch.Tensor,
    n_inner: int,
    stride_outer: int,
    stride_inner: int,
    out: torch.Tensor | None = None,
    *,
    _block_v: int | None = None,
    _chunk: int | None = None,
) -> torch.Tensor:
    """Gradient of sum(g_logprob logprob + g_entropy entropy + g_collision collision + g_lse lse)
    w.r.t. logits (docs/math.md §3).

    Args:
        g_*: [N] upstream gradients, fp32 (fp64 for fp64 logits).
        logits, labels, temperature, ignore_index, layout: as in `token_stats_forward`.
        lse, entropy, collision, max_prob, argmax: [N] as saved by the forward.

        out: optional contiguous tensor of logits' shape, dtype and device (not overlapping them)
            to write the gradient into.

    Returns:
        The gradient, in `out` or a new contiguous tensor of logits' shape and dtype (computed
        in fp32/fp64, rounded once). Ignored rows are 0; NaN rows (L not finite, bad label or
        temperature) are NaN.
    """
    _check_inputs(logits, labels, temperature, ignore_index)
    N, V = labels.numel(), logits.shape[-1]
    acc = acc_dtype_of(logits.dtype)
    grad = gradient_output(logits, out)
    if N == 0:
        return grad
    per_row = {"g_logprob": g_logprob, "g_entropy": g_entropy, "g_collision": g_collision}
    per_row |= {"g_lse": g_lse, "lse": lse, "entropy": entropy, "collision": collision}
    per_row |= {"max_prob": max_prob, "argmax": argmax}
    for name, t in per_row.items():
        if t.numel() != N:
            raise ValueError(f"{OP}_backward: {name} has {t.numel()} elements, expected {N}")
    # No-ops (no copy) for what the op layer passes: flat, contiguous, acc dtype.
    upstream = [t.reshape(-1).to(acc).contiguous() for t in (g_logprob, g_entropy, g_collision)]
    upstream.append(g_lse.reshape(-1).to(acc).contiguous())
    saved = [t.reshape(-1).to(acc).contiguous() for t in (lse, entropy, collision, max_prob)]
    saved.append(argmax.reshape(-1).to(torch.int64).contiguous())
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    has_temp = temperature is not None
    temp = temperature if has_temp else labels
    scale_bits = 0 if has_temp else scalar_log2_scale_bits(temperature_scalar, acc)
    _bwd_kernel[(N, blk.n_chunks)](
        logits, labels, temp, scale_bits, ignore_index, V,
        n_inner, stride_outer, stride_inner,
        *upstream, *saved, grad,
        HAS_TEMP=has_temp, CHUNK=blk.chunk, BLOCK_V=blk.block_v, num_warps=blk.num_warps,
        ALIGN=rows_align((logits, n_inner, stride_outer, stride_inner), grad),
    )  # fmt: skip
    return grad
