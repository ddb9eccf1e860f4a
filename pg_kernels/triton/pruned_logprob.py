"""pruned_logprob in Triton: docs/math.md §6, with the C++ launchers' interface.

Rows are cut as `row_blocking` cuts them (a function of V and the dtype only) and every
reduction runs in a fixed order: results are bitwise deterministic and batch invariant.
Forward, two sweeps over the row (one exp per element in all), three kernels:
  1. `_max_chunk_kernel`, grid (N, n_chunks): each chunk's max raw logit x_m (no exp), NaN when
     the chunk holds a NaN or a z = x / tau of +inf;
  2. `_sum_chunk_kernel`, grid (N, n_chunks): the row's max from the chunk maxes (n_chunks
     loads) and its frame (`_frame`), then d = z - max z = fma(x, 1 / tau, -m) per element
     (one rounding), e = exp(d) into s_in where d >= log alpha and into s_out elsewhere
     (per-element accumulators, one predicated add per element, summed once per chunk). The
     label's term goes to s_in wherever it lies (S always holds it, as in finalize_pruned,
     softmax_stats.h): subtracting it from s_out afterwards left s_out's rounding in a small
     tail mass;
  3. `_fwd_finish_kernel`: sums each row's chunk sums in chunk order and finalizes, relative to
     the max's own term e_m = exp(d_m), d_m = fma(x_m, 1 / tau, -m) (the rounding residual of m,
     not 0 on a GPU, whose fma rounds once; e_m carries the GPU ex2's ~2 ulp): with d_c the
     label's exponent, logprob = (d_c - d_m) - (log s_safe - log e_m), exactly 0 for a row of
     one entry (e_m / s_safe = 1) and free of e_m's error on peaked rows.
  The set S depends on the final max, so a one-sweep online sum cannot drop the elements that
  fall below a risen threshold exactly (csrc/cpu/pruned_logprob.cpp says more).
Saved per row: the max raw logit x_m, LSE_S relative to the frame's m (d_m + log s_safe) and
the bound log alpha. LSE_S in z units (m + ...) rounded to ulp(m) / 2: 9.1e-6 of the gradient
at |z| ~ 1000 where relative it is 2.4e-7, and all of log s_safe on a row masked whole with a
huge finite fill (whose exponents also took m's residual, ~4e22 there: NaN; `_frame` shifts such
rows by x_m).
Backward, `_bwd_kernel`, grid (N, n_chunks): the forward's frame from x_m and the same d, bit for
bit (so the same S); d logprob / dz_j = -p~_j = -e^(d_j - LSE_S) on S, 0 off S, divided by tau,
for every element of the chunk; then the label's 1 - p~_c written over its entry by the program
whose chunk holds it, after a barrier that orders it after the loop's stores (as the C++ kernel
writes it last). Ignored and NaN rows read nothing: a store-only loop fills them.

Bytes per row of V elements of s bytes: forward 2 V s read + 12 n_chunks bytes of partials
(fp32) + ~28 B of per-row values; backward V s read + V s written (+ the label's entry twice).
Checked under TRITON_INTERPRET=1 on CPU tensors and compiled for sm_90 offline
(.ci/check_triton_sm90.py); timed on an H200 (benchmarks/results/cuda-h200).

GPU design (sm_90, triton 3.6, offline compile; hot-loop SASS instructions per element, the
budget 12 for 16-bit logits, 24 for fp32; the same kernels serve temperature 1 and != 1: 1 / tau
is a per-row tensor either way):
  kernel              dtype  first   now (registers, 8 warps)   rows not 16-byte aligned
  _max_chunk_kernel   bf16    8.1     6.8 (54)                   8.6 (64)
                      fp32            6.5 (32)                   8.0 (40)
  _sum_chunk_kernel   bf16   17.6     8.9 (79)                  12.8 (109)
                      fp16   16.9     8.9 (79)
                      fp32   17.1     9.0 (40)                  12.5 (64)
  _bwd_kernel         bf16   18.8    10.1 (32)                  11.8
                      fp16   18.6    10.1 (32)
                      fp32   20.0    10.1 (38)                  10.9 (2026-12-06)
  Per element the sum loop is: convert, add (the frame's shift), fma (d), mul (log2 e), ex2,
  compare (d >= log alpha), two predicated adds; the backward: convert, add, fma (d), compare,
  fma ((d - LSE_S) log2 e), select (-inf off S), ex2, mul (the scale), pack and store. Removed
  on the way: the label compare and select per element, the select + add pairs of the two sums
  (now predicated adds), the load mask's -inf moves, the mul for z (the test is on d). A select
  of the product instead of the exponent was moved past the bf16 rounding by the compiler: two
  byte permutes more per element (11.8).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pg_kernels.ops._common import check_labels
from pg_kernels.triton._common import (
    LOG2E,
    acc_dtype_of,
    cdiv,
    dense_row_offset,
    ex2,
    exp_acc,
    max_nan,
    per_row_inv_temperature,
    round_to,
    row_blocking,
    row_offset,
    rows_align,
    widen,
)
from pg_kernels.triton._pair import FAR_Z, fma_acc

# Rows per program of the finish kernel: it moves ~8 bytes per (row, chunk).
FINISH_BLOCK_R = 128


@triton.jit
def _row_max(part_ptr, row, N, n_chunks):
    """The row's max raw logit from its chunk maxes (part_ptr [n_chunks, N]); NaN if one chunk
    is bad."""
    m = tl.full([], float("-inf"), part_ptr.dtype.element_ty)
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        m = max_nan(m, tl.load(part_ptr + chunk_off + row))
        chunk_off += N
    return m


@triton.jit
def _max_step(x, inv_tau, mvec, bad):
    """One block of the chunk max: the running max of the raw logits, and a flag per lane for a
    NaN or a z = x / tau of +inf."""
    z = x * inv_tau
    return tl.maximum(mvec, x), bad | ((z != z) | (z == float("inf"))).to(tl.int32)


@triton.jit(do_not_specialize=["ignore_index"])
def _max_chunk_kernel(
    x_ptr, labels_ptr, inv_tau_ptr, ignore_index, V, N, n_inner, stride_outer, stride_inner,
    part_ptr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the chunk's max raw logit, NaN if it holds a NaN or a z of +inf (z
    = x / tau rounds monotonically, so m = x_m / tau is the max z)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    inv_tau = tl.load(inv_tau_ptr + row)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    mvec = tl.full([BLOCK_V], float("-inf"), ACC)
    bad = tl.zeros([BLOCK_V], tl.int32)
    start = chunk * CHUNK
    lanes = tl.arange(0, BLOCK_V)
    n_valid = tl.where(keep, tl.minimum(V - start, CHUNK), 0)  # ignored rows read nothing
    n_full = n_valid // BLOCK_V
    # Full blocks unmasked, then the row's end: a load mask in every block cost 7.6 SASS per
    # bf16 element against 6.8, and 13.1 against 8.6 on rows that are not 16-byte aligned,
    # whose loads are scalar (sm_90).
    for i in range(0, n_full):
        x = widen(tl.load(x_row + (start + i * BLOCK_V) + lanes), ACC)
        mvec, bad = _max_step(x, inv_tau, mvec, bad)
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        cols = start + n_full * BLOCK_V + lanes
        x = widen(tl.load(x_row + cols, mask=cols < V, other=float("-inf")), ACC)
        mvec, bad = _max_step(x, inv_tau, mvec, bad)
    m = tl.where(tl.max(bad, axis=0) > 0, float("nan"), tl.max(mvec, axis=0))
    tl.store(part_ptr + chunk.to(tl.int64) * N + row, m)


@triton.jit
def _row_validity(label, V, keep, inv_tau, m):
    """A kept row with its label in range, a finite max and a valid temperature."""
    valid = keep & (label >= 0) & (label < V) & (m > float("-inf")) & (m < float("inf"))
    return valid & (inv_tau > 0.0) & (inv_tau < float("inf"))  # bad GPU temperatures: NaN


@triton.jit
def _frame(x_m, inv_tau, valid):
    """(shift, m) of a row of max raw logit x_m: its exponents are d = fma(x - shift, 1 / tau,
    -m), z - max z rounded once, and S is d >= log alpha. Rows with |x_m / tau| < FAR_Z: shift
    0 and m = x_m / tau rounded, whose residual the fma keeps exactly (e_m below). Rows far out
    (a row masked whole with -1e30 / tau): shift x_m and m 0, as the residual of m (~ulp(m),
    4e22 there) would be every exponent's. Invalid rows: 0 and 0 (a finite frame: exp(-inf) =
    0, never NaN). The backward rebuilds the same frame from the saved x_m, bit for bit."""
    m = x_m * inv_tau
    far = valid & (tl.abs(m) >= FAR_Z)
    return tl.where(far, x_m, 0.0), tl.where(valid & ~far, m, 0.0)


@triton.jit
def _e_chunk(x_ptr, cols, V, inv_tau, shift, m, log_alpha, label, s_in, s_out,
             MASKED: tl.constexpr, LABEL: tl.constexpr):  # fmt: skip
    """One step of the sums: e = exp(d) into s_in where d >= log alpha or, with LABEL, at the
    label (S holds it always), s_out elsewhere; d in the row's frame (`_frame`)."""
    if MASKED:
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf"))
    else:
        x = tl.load(x_ptr + cols)
    d = fma_acc(widen(x, s_in.dtype) - shift, inv_tau, -m)  # as the finish kernel's d_c and d_m
    e = exp_acc(d)
    safe = d >= log_alpha
    if LABEL:
        safe = safe | (cols == label)
    s_in = tl.where(safe, s_in + e, s_in)
    s_out = tl.where(safe, s_out, s_out + e)
    return s_in, s_out


@triton.jit(do_not_specialize=["ignore_index"])
def _sum_chunk_kernel(
    x_ptr, labels_ptr, inv_tau_ptr, log_alpha_ptr, ignore_index, V, N, n_chunks,
    n_inner, stride_outer, stride_inner, max_ptr, part_ptr,
    CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the chunk's s_in and s_out into part_ptr [2, n_chunks, N],
    relative to the row's max. The label's term goes to s_in wherever it lies: subtracted from
    s_out afterwards, it left the rounding of the sum (a tail mass of 2.2e-9 read as 3.5e-9
    beside a label term of 5e-2)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    inv_tau = tl.load(inv_tau_ptr + row)
    x_m = _row_max(max_ptr, row, N, n_chunks)
    valid = _row_validity(label, V, label != ignore_index, inv_tau, x_m * inv_tau)
    shift, m_ref = _frame(x_m, inv_tau, valid)
    log_alpha = tl.load(log_alpha_ptr)
    label32 = tl.where(valid, label, -1).to(tl.int32)  # in [0, V) where a row is read
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    s_in = tl.zeros([BLOCK_V], ACC)
    s_out = tl.zeros([BLOCK_V], ACC)
    start = chunk * CHUNK
    lanes = tl.arange(0, BLOCK_V)
    n_valid = tl.where(valid, tl.minimum(V - start, CHUNK), 0)  # invalid rows read nothing
    n_full = n_valid // BLOCK_V
    # Full blocks, unmasked vector loads; only the label's block compares ids (a compare per
    # element in every block put the bf16 loop over its instruction budget).
    at = label32 - start
    lb = tl.where((at >= 0) & (at < n_full * BLOCK_V), at // BLOCK_V, n_full)
    for i in range(0, lb):
        cols = start + i * BLOCK_V + lanes
        s_in, s_out = _e_chunk(
            x_row, cols, V, inv_tau, shift, m_ref, log_alpha, label32, s_in, s_out, False, False
        )
    if lb < n_full:
        cols = start + lb * BLOCK_V + lanes
        s_in, s_out = _e_chunk(
            x_row, cols, V, inv_tau, shift, m_ref, log_alpha, label32, s_in, s_out, False, True
        )
    for i in range(lb + 1, n_full):
        cols = start + i * BLOCK_V + lanes
        s_in, s_out = _e_chunk(
            x_row, cols, V, inv_tau, shift, m_ref, log_alpha, label32, s_in, s_out, False, False
        )
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        cols = start + n_full * BLOCK_V + lanes
        s_in, s_out = _e_chunk(
            x_row, cols, V, inv_tau, shift, m_ref, log_alpha, label32, s_in, s_out, True, True
        )
    idx = chunk.to(tl.int64) * N + row
    tl.store(part_ptr + idx, tl.sum(s_in, axis=0))
    tl.store(part_ptr + tl.num_programs(1).to(tl.int64) * N + idx, tl.sum(s_out, axis=0))


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_finish_kernel(
    x_ptr, labels_ptr, inv_tau_ptr, log_alpha_ptr, ignore_index, V, N, n_chunks,
    n_inner, stride_outer, stride_inner, max_ptr, part_ptr,
    logprob_ptr, in_safe_ptr, tail_mass_ptr, lse_safe_ptr, threshold_ptr, row_max_ptr,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: finalize_pruned (softmax_stats.h) from the chunk sums. Saves
    the row's max raw logit x_m, LSE_S relative to its frame's m (`_frame`) and the bound of
    the frame's membership test, log alpha."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    keep = label != ignore_index
    inv_tau = tl.load(inv_tau_ptr + rows, mask=rmask, other=1.0)
    x_m = tl.full([BLOCK_R], float("-inf"), ACC)
    s_in = tl.zeros([BLOCK_R], ACC)
    s_out = tl.zeros([BLOCK_R], ACC)
    # tl.cast: an n_chunks of 1 arrives as a Python int (Triton specializes 1)
    plane = tl.cast(n_chunks, tl.int64) * N
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        x_m = max_nan(x_m, tl.load(max_ptr + chunk_off + rows, mask=rmask, other=0.0))
        s_in += tl.load(part_ptr + chunk_off + rows, mask=rmask, other=0.0)
        s_out += tl.load(part_ptr + plane + chunk_off + rows, mask=rmask, other=0.0)
        chunk_off += N
    valid = _row_validity(label, V, keep, inv_tau, x_m * inv_tau)
    shift, m_ref = _frame(x_m, inv_tau, valid)
    log_alpha = tl.load(log_alpha_ptr)
    x_row = x_ptr + row_offset(rows, n_inner, stride_outer, stride_inner)
    x_c = tl.load(x_row + tl.where(valid, label, 0), mask=valid & rmask, other=0.0).to(ACC)
    d_c = fma_acc(x_c - shift, inv_tau, -m_ref)
    d_m = fma_acc(tl.where(valid, x_m, 0.0) - shift, inv_tau, -m_ref)
    log_e_m = tl.log(exp_acc(d_m))  # of the chunk kernel's term of the max, bit for bit
    in_safe = valid & (d_c >= log_alpha)
    # The chunk sums hold the label's term in s_in, above the threshold or not.
    s_safe = tl.where(valid, s_in, 1.0)  # invalid: a dummy state
    log_s = tl.log(s_safe) - log_e_m  # log(s_safe / e_m): 0 for a row of one entry
    lse_safe = d_m + log_s  # relative to m_ref: it keeps its digits whatever |m_ref|
    logprob = (d_c - d_m) - log_s
    tail_mass = s_out / (s_safe + s_out)
    nan = float("nan")
    tl.store(logprob_ptr + rows, tl.where(keep, tl.where(valid, logprob, nan), 0.0), mask=rmask)
    tl.store(tail_mass_ptr + rows, tl.where(keep, tl.where(valid, tail_mass, nan), 0.0), mask=rmask)
    tl.store(lse_safe_ptr + rows, tl.where(keep, tl.where(valid, lse_safe, nan), 0.0), mask=rmask)
    tl.store(threshold_ptr + rows, tl.where(keep, tl.where(valid, log_alpha, nan), 0.0), mask=rmask)
    tl.store(row_max_ptr + rows, tl.where(keep, x_m, 0.0), mask=rmask)
    tl.store(in_safe_ptr + rows, (keep & in_safe).to(tl.int8), mask=rmask)


@triton.jit
def _bwd_step(x_ptr, grad_ptr, cols, V, inv_tau, shift, m, threshold, lse, neg_g,
              MASKED: tl.constexpr):  # fmt: skip
    """d logprob / dz_j = -p~_j on S (d_j >= threshold), 0 off S; the label is written after.
    d and lse relative to the forward's frame (`_frame`), d bit for bit the forward's."""
    if MASKED:
        x = tl.load(x_ptr + cols, mask=cols < V, other=float("-inf"))
    else:
        x = tl.load(x_ptr + cols)
    d = fma_acc(widen(x, lse.dtype) - shift, inv_tau, -m)
    # p~ = e^(d - lse) on S, e^-inf = 0 off it: selected before the exp (a select of the product
    # was moved past the bf16 rounding, two byte permutes more per element). fp32: one fma and
    # an ex2, lse log2(e) a row constant.
    if d.dtype == tl.float64:
        p = tl.exp(tl.where(d >= threshold, d - lse, float("-inf")))
    else:
        log2e = tl.full([], LOG2E, tl.float32)
        p = ex2(tl.where(d >= threshold, fma_acc(d, log2e, -(lse * log2e)), float("-inf")))
    g = neg_g * p
    g = round_to(g, grad_ptr.dtype.element_ty)
    if MASKED:
        tl.store(grad_ptr + cols, g, mask=cols < V)
    else:
        tl.store(grad_ptr + cols, g)


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, labels_ptr, inv_tau_ptr, ignore_index, V, n_inner, stride_outer, stride_inner,
    lse_safe_ptr, threshold_ptr, row_max_ptr, grad_ptr, CHUNK: tl.constexpr,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the gradient of one chunk of one row: -p~_j g / tau on S, 0 off S,
    then the label's (1 - p~_c) g / tau written over its entry (the label is in S whatever its
    logit; a barrier orders the two stores)."""
    ACC: tl.constexpr = lse_safe_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    lse_safe = tl.load(lse_safe_ptr + row)
    threshold = tl.load(threshold_ptr + row)
    inv_tau = tl.load(inv_tau_ptr + row)
    g_tau = tl.load(g_ptr + row).to(ACC) * inv_tau
    valid = (lse_safe > float("-inf")) & (lse_safe < float("inf"))  # NaN rows stay NaN
    shift, m = _frame(tl.load(row_max_ptr + row), inv_tau, valid)  # the forward's, bit for bit
    read = keep & valid  # ignored and NaN rows read no logits: 0 or NaN from `fill` below
    neg_g = tl.where(keep, tl.where(valid, -g_tau, float("nan")), 0.0)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner, ALIGN)
    grad_row = grad_ptr + dense_row_offset(row, V, ALIGN)  # a fresh contiguous gradient
    start = chunk * CHUNK
    lanes = tl.arange(0, BLOCK_V)
    n_valid = tl.minimum(V - start, CHUNK)
    n_full = n_valid // BLOCK_V
    n_read = tl.where(read, n_full, 0)
    for i in range(0, n_read):  # full blocks: unmasked vector loads and stores
        cols = start + i * BLOCK_V + lanes
        _bwd_step(x_row, grad_row, cols, V, inv_tau, shift, m, threshold, lse_safe, neg_g, False)
    fill = round_to(tl.zeros([BLOCK_V], ACC) + neg_g * 0.0, grad_ptr.dtype.element_ty)
    for i in range(n_read, n_full):  # ignored rows: 0, NaN rows: NaN, nothing read
        tl.store(grad_row + start + i * BLOCK_V + lanes, fill)
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        cols = start + n_full * BLOCK_V + lanes
        if read:
            _bwd_step(x_row, grad_row, cols, V, inv_tau, shift, m, threshold, lse_safe, neg_g, True)
        else:  # the fill: a z of an unread row is no test (1 / tau of a NaN row may be 0 or NaN)
            tl.store(grad_row + cols, fill, mask=cols < V)
    # The label: d logprob / dz_c = 1 - p~_c, by the program whose chunk holds it.
    if read & (label >= start) & (label < start + n_valid):
        d_c = fma_acc(tl.load(x_row + label).to(ACC) - shift, inv_tau, -m)
        p_c = exp_acc(d_c - lse_safe)
        tl.debug_barrier()
        tl.store(grad_row + label, round_to((1.0 - p_c) * g_tau, grad_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------------------------
# Launchers: the signatures of the C++ ones (pg_kernels._C.pruned_logprob_forward / _backward).


def pruned_logprob_forward(
    logits, labels, temperature, temperature_scalar, alpha, ignore_index, n_inner, stride_outer,
    stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """labels: flat [N]. Returns flat [N] logprob, in_safe (bool), tail_mass, lse_safe,
    threshold, row_max. _block_v, _chunk: private overrides of the row blocking (tests, tuning)."""
    N, V = labels.numel(), logits.shape[-1]
    acc = acc_dtype_of(logits.dtype)
    if logits.device.type == "cpu":  # the interpreter: same error as the C++ kernel
        check_labels(labels, V, ignore_index)
    outs = [torch.empty(N, dtype=acc, device=logits.device) for _ in range(5)]
    in_safe = torch.empty(N, dtype=torch.int8, device=logits.device)
    if N > 0:
        inv_tau = per_row_inv_temperature(temperature, temperature_scalar, N, acc, logits.device)
        log_alpha = torch.full((1,), math.log(alpha), dtype=acc, device=logits.device)
        blk = row_blocking(V, logits.dtype, _block_v, _chunk)
        layout = (n_inner, stride_outer, stride_inner)
        maxes = torch.empty((blk.n_chunks, N), dtype=acc, device=logits.device)
        sums = torch.empty((2, blk.n_chunks, N), dtype=acc, device=logits.device)
        step = dict(CHUNK=blk.chunk, BLOCK_V=blk.block_v, num_warps=blk.num_warps,
                    ALIGN=rows_align((logits, *layout)))  # fmt: skip
        _max_chunk_kernel[(N, blk.n_chunks)](
            logits, labels, inv_tau, ignore_index, V, N, *layout, maxes, **step
        )
        _sum_chunk_kernel[(N, blk.n_chunks)](
            logits, labels, inv_tau, log_alpha, ignore_index, V, N, blk.n_chunks, *layout,
            maxes, sums, **step,
        )  # fmt: skip
        _fwd_finish_kernel[(cdiv(N, FINISH_BLOCK_R),)](
            logits, labels, inv_tau, log_alpha, ignore_index, V, N, blk.n_chunks, *layout,
            maxes, sums, outs[0], in_safe, *outs[1:],
            BLOCK_R=FINISH_BLOCK_R, num_warps=4,
        )  # fmt: skip
    return [outs[0], in_safe.bool(), *outs[1:]]


def pruned_logprob_backward(
    grad_logprob, logits, labels, temperature, temperature_scalar, ignore_index, lse_safe,
    threshold, row_max, n_inner, stride_outer, stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    N, V = labels.numel(), logits.shape[-1]
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N > 0:
        acc = lse_safe.dtype
        inv_tau = per_row_inv_temperature(temperature, temperature_scalar, N, acc, logits.device)
        blk = row_blocking(V, logits.dtype, _block_v, _chunk)
        _bwd_kernel[(N, blk.n_chunks)](
            grad_logprob.to(acc), logits, labels, inv_tau, ignore_index, V, n_inner,
            stride_outer, stride_inner, lse_safe, threshold, row_max, grad,
            CHUNK=blk.chunk, BLOCK_V=blk.block_v, num_warps=blk.num_warps,
            ALIGN=rows_align((logits, n_inner, stride_outer, stride_inner), grad),
        )  # fmt: skip
    return grad
