"""mismatch_stats with rollout_logits in Triton (docs/math.md §§4 and 5), with the C++ launchers'
interface: the label's log-prob under the logits, the exact KL(pi_roll || pi_theta) and the total
variation 1/2 sum |pi_theta - pi_roll|.

Forward, four kernels (the blocking depends on V and the dtype only; every reduction runs in a
fixed order: deterministic and batch invariant):
  1. the pair pass (`_pair.pair_chunk_kernel`, grid (N, n_chunks)) with the rollout distribution
     q as the weight side and the logits p as the other: each side's max and s1, and u;
  2. `_fwd_finish_kernel`: merges each row's chunks, writes logprob = (z_c - m_p) - log s1_p,
     token_kl (finalize_kl) and the row state (m_p, log s1_p) the backward needs;
  3. `_tv_chunk_kernel`, grid (N, n_chunks): TV needs both normalizers, known only now, so each
     chunk is read again and sum |q_j - p_j| taken per lane (two exps per element);
  4. `_tv_finish_kernel`: token_tv = min(1/2 sum over the chunks in order, 1).
  (3 and 4 only with tv: `token_tv=False` stops after 2, two reads instead of four.)
Backward (of logprob only), `_bwd_kernel`, grid (N, n_chunks): g (1[j = c] - p_j) / tau with
p_j = e^{(z_j - m) - l} from the saved row state; the label's entry is -expm1(log p_c) g / tau
(no cancellation of 1 - p_c when p_c -> 1).

Bytes per row of V elements of s bytes: forward 4 V s read (both rows twice: the C++ kernel keeps
the row's exps in cache for the TV sweep, a GPU chunk program cannot hold them until the row's
normalizers exist) + 32 n_chunks + 4 n_chunks bytes of partial states; backward V s read + V s
written. Expected on a GPU: forward ~2x the "two reads" target, set by the second read.
The way down, once a GPU can measure it: the last chunk program of a row to finish (an
acq_rel counter per row) merges the row and re-reads it for TV while the row is still in L2 (it
was read by the row's programs microseconds before), keeping the fixed merge order.

Checked under TRITON_INTERPRET=1 on CPU tensors (the test suite) and compiled for sm_90 offline
(.ci/check_triton_sm90.py); timed on an H200 (benchmarks/results/cuda-h200). The TV pass and
the backward divide nothing per element (`_pair.row_exponent`: p_j = 2^{(x - a) k - b}
relative to the row max).
Hot-loop SASS instructions per element (pair for TV), tau = 1 / with a temperature, before ->
after: TV bf16 17.6 / 47.6 -> 12.2 / 12.2 (fp16 11.4, fp32 10.0; 59 / 44 / 32 registers);
backward bf16 16.8 / 30.9 -> 9.3 / 9.3 (fp16 8.8, fp32 8.6; 40 / 40 / 34 registers; the row
cases are one factor, the loads one uniform mask). A label outside [0, V) on a GPU gives
a NaN logprob (no host sync to check it); token_kl and token_tv do not depend on the label.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.triton._common import (
    acc_dtype_of,
    cdiv,
    dense_row_offset,
    div_acc,
    expm1_acc,
    per_row_temperature,
    round_to,
    row_blocking,
    row_offset,
    rows_align,
    widen,
)
from pg_kernels.triton._pair import (
    FINISH_BLOCK_R,
    LN2,
    exp_base,
    finalize_kl,
    fma_acc,
    frame_scales,
    merge_row,
    needs_division,
    pair_excess,
    pair_partials,
    reference_shift,
    row_exponent,
    side_is_valid,
    store_frame,
    store_tv_frame,
    tv_frame,
)

OP = "mismatch_stats"


@triton.jit(do_not_specialize=["ignore_index"])
def _fwd_finish_kernel(
    part_ptr, x_ptr, labels_ptr, t_ptr, tr_ptr, logprob_ptr, kl_ptr, st_ptr, p_norm_ptr,
    q_norm_ptr, V, N, n_chunks, ignore_index, n_inner, s_outer, s_inner,
    DIVIDE: tl.constexpr, EXCESS: tl.constexpr, TV: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: logprob, token_kl, the row state (m_p, log s1_p) of the
    backward, and with TV each side's frame for the TV pass (`tv_frame`: its max logit and log
    s1, p_norm_ptr and q_norm_ptr [N, 2]; NaN marks an invalid side, 0 an ignored row).
    EXCESS: the partials carry k (`_pair.pair_excess`)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    label = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    keep = label != ignore_index
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    m_q, r_q, m_p, r_p, u, inf, e_q, e_p, k = merge_row(part_ptr, rows, rmask, N, n_chunks, EXCESS)
    tau = tl.load(t_ptr + rows, mask=rmask, other=1.0)
    tau_q = tl.load(tr_ptr + rows, mask=rmask, other=1.0)
    d_p = reference_shift(m_p, e_p, tau, DIVIDE, XDT)
    kl, _, l_p, _ = finalize_kl(m_q, r_q, m_p, r_p, u, inf, 0.0 * e_q, d_p, k, EXCESS)
    ok_p = side_is_valid(m_p)
    in_range = (label >= 0) & (label < V)
    x_row = x_ptr + row_offset(rows, n_inner, s_outer, s_inner)
    read = rmask & keep & in_range & ok_p
    # The log-prob relative to the max logit itself, (x_c - a) / tau - log s1 (`tv_frame`: a =
    # x_max exactly, log s1 relative to a / tau unrounded), one rounding of the difference as
    # token_stats forms it. z_c - m, two quotients rounded apart, kept ulp(z) / 2 at |z| ~ 30:
    # 2.0e-6 at tau 0.7 in fp32 (plain fp32 PyTorch's own), token_stats 5.5e-7
    # (benchmarks/fidelity.py). At the max entry x_c - a is exactly 0: a single-entry row's
    # log-prob is exactly 0.
    a_p, log_s1_p = tv_frame(m_p, r_p, e_p, tau, DIVIDE)
    x_c = tl.load(x_row + tl.where(read, label, 0), mask=read, other=0.0).to(m_p.dtype)
    d_c = tl.where(read, x_c - a_p, 0.0)
    if DIVIDE:
        d_c = div_acc(d_c, tau)
    logprob = d_c - log_s1_p
    nan = float("nan")
    logprob = tl.where(keep, tl.where(read, logprob, nan), 0.0)
    tl.store(logprob_ptr + rows, logprob, mask=rmask)
    tl.store(kl_ptr + rows, tl.where(keep, kl, 0.0), mask=rmask)
    tl.store(st_ptr + 2 * rows, tl.where(keep, tl.where(ok_p, m_p, nan), 0.0), mask=rmask)
    tl.store(st_ptr + 2 * rows + 1, tl.where(keep, tl.where(ok_p, l_p, nan), 0.0), mask=rmask)
    if TV:
        store_frame(p_norm_ptr, rows, rmask, keep, ok_p, a_p, log_s1_p)
        store_tv_frame(q_norm_ptr, rows, rmask, keep, m_q, r_q, e_q, tau_q, DIVIDE)


@triton.jit
def _tv_block(x_p, x_q, a_p, k_p, a_q, k_q, c, r, acc):
    """acc + |q_j - p_j| / S_p for one block of raw logits of each side (-inf where masked):
    p_j = e_p S_p with e_p = 2^{(x_j - a_p) k_p} (e^ in fp64) and S_p = 2^{-b_p} the row's
    1 / s1, q_j likewise, so q_j - p_j = S_p (e_q (c + r) - e_p) with c + r = S_q / S_p
    (`_tv_scales`): near equal normalizers (c, r) = (1, S_q / S_p - 1), so that at both
    sides' top entries (e = 1 exactly) the difference is r, where 2^{-b} of each rounded to ~1
    lost it (near one-hot rows, a TV of 2.3e-26 read 6e-8 and one of 9.3e-8 read 2.8e-7; plain
    fp32 PyTorch rounds both top entries alike, or is as far off); far apart (0, S_q / S_p),
    which keeps the ratio to its own precision (as S_q / S_p - 1 near -1 would not: a one-hot
    row against a flat one, V = 40000, 5.1e-4 off). Two SASS instructions per element pair more
    (sm_90: bf16 12.2 -> 14.2 of 20, fp16 11.4 -> 13.6, fp32 10.0 -> 12.0 of 40)."""
    e_p = exp_base((widen(x_p, acc.dtype) - a_p) * k_p)
    e_q = exp_base((widen(x_q, acc.dtype) - a_q) * k_q)
    return acc + tl.abs(fma_acc(e_q, r, fma_acc(e_q, c, -e_p)))


@triton.jit
def _tv_scales(b_p, b_q):
    """(c, r) of `_tv_block` from b in the exponent's units (log2 for fp32 lanes), in fp64 and
    rounded once: r1 = S_q / S_p - 1 = expm1(b_p - b_q); (1, r1) where
    |r1| <= 1/2, else (0, S_q / S_p)."""
    y = b_p.to(tl.float64) - b_q.to(tl.float64)
    if b_p.dtype == tl.float32:
        y = y * LN2
    ratio = tl.exp(y)  # s1_p / s1_q, within [1 / V, V]
    r1 = expm1_acc(y)
    close = tl.abs(r1) <= 0.5
    c = tl.where(close, 1.0, 0.0)
    r = tl.where(close, r1, ratio)
    return c.to(b_p.dtype), r.to(b_p.dtype)


@triton.jit(do_not_specialize=["ignore_index"])
def _tv_chunk_kernel(
    x_ptr, xr_ptr, labels_ptr, t_ptr, tr_ptr, p_norm_ptr, q_norm_ptr, part_ptr, V, N,
    ignore_index, n_inner, s_outer, s_inner, r_n_inner, r_s_outer, r_s_inner,
    DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): sum |q_j - p_j| over one chunk, into part_ptr [n_chunks, N]. Rows
    that are ignored or invalid on either side read nothing (their TV is 0 or NaN anyway).
    p_j = 2^{(x_j - a) k - b} (`frame_scales`: no division per element; b, the normalizer,
    factored out, `_tv_block`), a the side's max logit itself (`tv_frame`, as this op's and
    step_stats' finish hand the frames on): two rows that differ by a constant get the same
    exps bitwise and r = 0."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    keep = tl.load(labels_ptr + row).to(tl.int64) != ignore_index
    a_p, l_p = tl.load(p_norm_ptr + 2 * row), tl.load(p_norm_ptr + 2 * row + 1)
    a_q, l_q = tl.load(q_norm_ptr + 2 * row), tl.load(q_norm_ptr + 2 * row + 1)
    read = keep & (a_p == a_p) & (a_q == a_q)  # the finish kernel wrote NaN for invalid sides
    a_p, l_p = tl.where(read, a_p, 0.0), tl.where(read, l_p, 0.0)
    a_q, l_q = tl.where(read, a_q, 0.0), tl.where(read, l_q, 0.0)
    x_row = x_ptr + row_offset(row, n_inner, s_outer, s_inner, ALIGN)
    xr_row = xr_ptr + row_offset(row, r_n_inner, r_s_outer, r_s_inner, ALIGN)
    k_p, b_p = frame_scales(l_p, tl.load(t_ptr + row), DIVIDE)
    k_q, b_q = frame_scales(l_q, tl.load(tr_ptr + row), DIVIDE)
    c, r = _tv_scales(b_p, b_q)
    acc = tl.zeros([BLOCK_V], a_p.dtype)
    start = chunk * CHUNK
    n_valid = tl.where(read, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    # Full blocks unmasked, block i + 1 loaded before block i is used (the last step loads its
    # own block again: in bounds, no mask and no fill values); the row's tail block masked.
    nxt_p = tl.load(x_row + start + lanes, mask=n_full > 0, other=float("-inf"))
    nxt_q = tl.load(xr_row + start + lanes, mask=n_full > 0, other=float("-inf"))
    last = start + (n_full - 1) * BLOCK_V
    for i in range(0, n_full):
        x_p = nxt_p
        x_q = nxt_q
        col = tl.minimum(start + (i + 1) * BLOCK_V, last)
        nxt_p = tl.load(x_row + col + lanes)
        nxt_q = tl.load(xr_row + col + lanes)
        acc = _tv_block(x_p, x_q, a_p, k_p, a_q, k_q, c, r, acc)
    if n_full * BLOCK_V < n_valid:
        cols = start + n_full * BLOCK_V + lanes
        x_p = tl.load(x_row + cols, mask=cols < V, other=float("-inf"))
        x_q = tl.load(xr_row + cols, mask=cols < V, other=float("-inf"))
        acc = _tv_block(x_p, x_q, a_p, k_p, a_q, k_q, c, r, acc)
    tl.store(part_ptr + chunk.to(tl.int64) * N + row, tl.sum(acc, 0) * exp_base(-b_p))


@triton.jit(do_not_specialize=["ignore_index"])
def _tv_finish_kernel(
    part_ptr, labels_ptr, p_norm_ptr, q_norm_ptr, tv_ptr, N, n_chunks, ignore_index,
    BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    keep = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64) != ignore_index
    a_p = tl.load(p_norm_ptr + 2 * rows, mask=rmask, other=0.0)
    a_q = tl.load(q_norm_ptr + 2 * rows, mask=rmask, other=0.0)
    valid = (a_p == a_p) & (a_q == a_q)  # NaN: that side is invalid (the finish kernel's mark)
    total = tl.zeros([BLOCK_R], part_ptr.dtype.element_ty)
    chunk_off = tl.zeros([], tl.int64)
    for _ in range(0, n_chunks):
        total += tl.load(part_ptr + chunk_off + rows, mask=rmask, other=0.0)
        chunk_off += N
    tv = tl.minimum(0.5 * total, 1.0)
    tl.store(tv_ptr + rows, tl.where(keep, tl.where(valid, tv, float("nan")), 0.0), mask=rmask)


@triton.jit(do_not_specialize=["ignore_index"])
def _bwd_kernel(
    g_ptr, x_ptr, labels_ptr, t_ptr, st_ptr, grad_ptr, V, ignore_index,
    n_inner, s_outer, s_inner,
    DIVIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): d logprob / dx of one chunk of one row, written once:
    -g / tau p_j with p_j = 2^{(x_j - a) k - b} (`row_exponent`: no division per element),
    the label's entry -expm1(log p_c) g / tau. Ignored rows write 0 and invalid rows NaN
    without reading the logits."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    m, log_s1 = tl.load(st_ptr + 2 * row), tl.load(st_ptr + 2 * row + 1)
    big = float("inf")
    ok = (tl.abs(m) < big) & (tl.abs(log_s1) < big) & (label >= 0) & (label < V)
    tau = tl.load(t_ptr + row)
    gt = div_acc(tl.load(g_ptr + row), tau)  # d/dx = d/dz / tau
    compute = keep & ok
    m, log_s1 = tl.where(compute, m, 0.0), tl.where(compute, log_s1, 0.0)
    x_row = x_ptr + row_offset(row, n_inner, s_outer, s_inner, ALIGN)
    a, k, b = row_exponent(m, log_s1, tau, x_row, V, DIVIDE, x_ptr.dtype.element_ty, BLOCK_V)
    k, b = tl.where(compute, k, 0.0), tl.where(compute, b, 0.0)  # p = 1 on rows not computed
    # d/dz_c of z_c - L = 1 - p_c = -expm1(log p_c): the label's entry, rounded once. log p_c =
    # (x_c - a) / tau - log s1, relative to the same a / tau as log s1 (`row_exponent`): not
    # z_c - m, whose roundings of x_c / tau and of m are ulp(z) apart from that reference (a
    # V = 1 fp32 row at |z| ~ 1e4 had a gradient of 5e-3 where the truth is 0; now 3.8e-10 at
    # worst over 300 random V = 1 rows: the state's log s1 carries (x_max - a) / tau rounded).
    x_c = tl.load(x_row + tl.where(compute, label, 0), mask=compute, other=0.0).to(tau.dtype)
    if DIVIDE:
        d_c = div_acc(tl.where(compute, x_c - a, 0.0), tau)
    else:
        d_c = tl.where(compute, x_c - a, 0.0)
    g_label = -expm1_acc(d_c - log_s1) * gt
    g_label = tl.where(keep, tl.where(ok, g_label, float("nan")), 0.0)
    label_col = tl.where(compute, label, -1).to(tl.int32)
    g_row = grad_ptr + dense_row_offset(row, V, ALIGN)  # a fresh contiguous gradient
    start = chunk * CHUNK
    n_valid = tl.minimum(V - start, CHUNK)  # the last chunk can end early
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    OUT: tl.constexpr = grad_ptr.dtype.element_ty
    # Ignored rows write 0, invalid rows (a non-finite saved state, a bad label) NaN, through
    # the same loop: their logits are not read (0 in their place) and the factor is 0 or NaN.
    scale = tl.where(keep, tl.where(ok, -gt, float("nan")), 0.0)
    for i in range(0, n_full):
        col0 = start + i * BLOCK_V
        # A uniform mask: the loads stay vectorized.
        x = tl.load(x_row + col0 + lanes, mask=compute, other=0.0)
        grad = _bwd_block(x, lanes, label_col - col0, a, k, b, scale, g_label)
        tl.store(g_row + col0 + lanes, round_to(grad, OUT))
    if n_full * BLOCK_V < n_valid:
        col0 = start + n_full * BLOCK_V
        in_row = col0 + lanes < V
        x = tl.load(x_row + col0 + lanes, mask=in_row & compute, other=0.0)
        grad = _bwd_block(x, lanes, label_col - col0, a, k, b, scale, g_label)
        tl.store(g_row + col0 + lanes, round_to(grad, OUT), mask=in_row)


@triton.jit
def _bwd_block(x, lanes, label_lane, a, k, b, scale, g_label):
    # d/dz_j of -L = -p_j (scale = -g / tau); the label's entry (lane label_lane) replaced.
    p = exp_base(fma_acc(widen(x, scale.dtype) - a, k, -b))
    return tl.where(lanes == label_lane, g_label, scale * p)


def mismatch_stats_forward(
    logits, rollout_logits, labels, temperature, temperature_scalar, rollout_temperature,
    rollout_temperature_scalar, ignore_index, tv, n_inner, stride_outer, stride_inner,
    rollout_n_inner, rollout_stride_outer, rollout_stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """[logprob, token_kl, token_tv, row_state [N, 2]]; the signature of
    pg_kernels._C.mismatch_stats_forward (tv False: token_tv [0], and no second read of the two
    tensors). _block_v, _chunk: private overrides of the row blocking (tests and tuning only)."""
    V = logits.shape[-1]
    n = labels.numel()
    acc = acc_dtype_of(logits.dtype)
    outs = [torch.empty(n if i < 2 or tv else 0, dtype=acc, device=logits.device) for i in range(3)]
    row_state = torch.empty(n, 2, dtype=acc, device=logits.device)
    if n == 0:
        return [*outs, row_state]
    logprob, token_kl, token_tv = outs
    t = per_row_temperature(temperature, temperature_scalar, n, acc, logits.device)
    tr = per_row_temperature(rollout_temperature, rollout_temperature_scalar, n, acc, logits.device)
    layout = (n_inner, stride_outer, stride_inner)
    roll_layout = (rollout_n_inner, rollout_stride_outer, rollout_stride_inner)
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    divide = needs_division(
        temperature, temperature_scalar, rollout_temperature, rollout_temperature_scalar
    )
    # KL(pi_roll || pi_theta): the rollout distribution is the weight side.
    part = pair_partials(
        rollout_logits, logits, labels, tr, t, ignore_index, roll_layout, layout, blk, divide
    )
    p_norm, q_norm = (torch.empty((n, 2) if tv else (0,), dtype=acc, device=logits.device)
                      for _ in "pq")  # fmt: skip
    finish_grid = (cdiv(n, FINISH_BLOCK_R),)
    _fwd_finish_kernel[finish_grid](
        part, logits, labels, t, tr, logprob, token_kl, row_state, p_norm, q_norm, V, n,
        blk.n_chunks, ignore_index, *layout, DIVIDE=divide, EXCESS=pair_excess(logits.dtype),
        TV=tv, BLOCK_R=FINISH_BLOCK_R, num_warps=4,
    )  # fmt: skip
    if not tv:
        return [logprob, token_kl, token_tv, row_state]
    tv_part = part[0]  # reused: the pair partials are spent; [n_chunks, N] of the same dtype
    _tv_chunk_kernel[(n, blk.n_chunks)](
        logits, rollout_logits, labels, t, tr, p_norm, q_norm, tv_part, V, n, ignore_index,
        *layout, *roll_layout, DIVIDE=divide, CHUNK=blk.chunk,
        BLOCK_V=blk.block_v, ALIGN=rows_align((logits, *layout), (rollout_logits, *roll_layout)),
        num_warps=blk.num_warps,
    )  # fmt: skip
    _tv_finish_kernel[finish_grid](
        tv_part, labels, p_norm, q_norm, token_tv, n, blk.n_chunks, ignore_index,
        BLOCK_R=FINISH_BLOCK_R, num_warps=4,
    )  # fmt: skip
    return [logprob, token_kl, token_tv, row_state]


def mismatch_stats_backward(
    grad_logprob, logits, labels, temperature, temperature_scalar, ignore_index, row_state,
    n_inner, stride_outer, stride_inner, *, _block_v=None, _chunk=None,
):  # fmt: skip
    """d(sum grad_logprob * logprob) / d logits: a new contiguous tensor of the logits' shape and
    dtype; ignored rows 0, NaN rows (a non-finite saved state, a bad label) NaN."""
    V = logits.shape[-1]
    n = labels.numel()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    acc = acc_dtype_of(logits.dtype)
    t = per_row_temperature(temperature, temperature_scalar, n, acc, logits.device)
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    _bwd_kernel[(n, blk.n_chunks)](
        grad_logprob, logits, labels, t, row_state, grad, V, ignore_index,
        n_inner, stride_outer, stride_inner,
        DIVIDE=needs_division(temperature, temperature_scalar, None, 1.0), CHUNK=blk.chunk,
        BLOCK_V=blk.block_v, num_warps=blk.num_warps,
        ALIGN=rows_align((logits, n_inner, stride_outer, stride_inner), grad),
    )  # fmt: skip
    return grad
