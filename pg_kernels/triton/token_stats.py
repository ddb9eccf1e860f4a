"""token_stats in Triton: SPEC sections 1-3 over [..., V] logits, with the C++ launchers' interface.

Forward, two kernels:
  1. `_fwd_chunk_kernel`, grid (N, n_chunks): program (r, k) reads elements [k CHUNK, (k+1) CHUNK)
     of row r once, BLOCK_V per loop step. Per step: the block max (one reduction); when it rises
     (rare after the first steps), rescale the running state and take the block's first argmax;
     then one exp2 per element feeding the three sums of the accumulator, kept per lane
     (BLOCK_V / FOLD lanes, no reduction inside the loop):
         s1 += e,  s2 += e * e,  t += e * d,   d = z - m,  e = exp(d),  z = x / tau.
     After the last step the lanes are summed (a fixed tree) and the chunk's partial state
     (max of x, s1, s2, t, first argmax) is stored. Ignored rows read nothing.
  2. `_fwd_merge_kernel`, grid (cdiv(N, BLOCK_R)): merges each row's n_chunks partial states in
     chunk order with the SPEC section 1 rule and writes the seven outputs.
  When a row fits in one chunk (n_chunks == 1), kernel 1 finalizes the row itself (no kernel 2).

  n_chunks, CHUNK, BLOCK_V and FOLD depend on V and the dtype only (`row_blocking`), never on N,
  every reduction runs in a fixed order and each row's merge is elementwise: results are bitwise
  deterministic and batch invariant.

Backward, one kernel `_bwd_kernel`, grid (N, n_chunks): recomputes p_j = exp(z_j - L) from the
saved L and writes dz_j / tau = p_j (a + b d_j + c p_j) / tau + g_l 1[j = c] / tau (no merge).

Passes over V: forward 1 (read), backward 1 (read + write).
Bytes per row of V elements of s bytes (the minimum is the logits once, the gradient once):
  forward   V s read (0 for an ignored row) + label, temperature and the label's logit
            + 20 n_chunks bytes of partial state written and read back (36 for fp64; none when
            n_chunks == 1) + 6 * 4 + 8 bytes of outputs. V = 151936 bf16: 303872 B of logits,
            10 chunks, 400 B of partial-state traffic (0.13 %).
  backward  V s read (0 for an ignored row) + V s written + ~40 B of per-row scalars.

GPU design (H100 target: bf16, N = 16384, V = 151936; not timed here, no GPU was available):
  - A step is 8 KiB of logits (BLOCK_V = 4096 bf16 / 2048 fp32 / 1024 fp64) at 8 warps: 32 bytes
    per thread, i.e. two (bf16) or more 16-byte vector loads, unmasked except on the last step of
    a row (V % 16 == 0 and 16-element aligned row strides keep them vectorized). A program runs
    4 steps (CHUNK = 16384 bf16): V = 151936 gives 10 programs per row, 163840 at N = 16384 and
    already 160 at N = 16, so small batches fill the GPU too.
  - The forward prefetches block i + 1 into registers before reducing block i, and folds FOLD = 4
    neighbouring elements (inside one thread's vector) onto one accumulator lane. Compiled offline
    for sm_90 with triton 3.6 (ptxas from its wheel): the bf16 chunk kernel uses ~80 registers,
    no spills, LDG.128 (3 programs = 24 warps per SM, ~24 KiB of loads in flight per SM); fp32
    ~50 registers; the backward 32 registers with LDG.128 / STG.128; the merge kernel 32.
  - Per element the forward is one convert, one fma (d), one mul (log2 e), one MUFU.EX2, one max
    (clamp), one add and two fmas, plus the block max: ~9 instructions, below the ~19 fp32
    instructions per element that 3 TB/s of bf16 leaves an H100 SM. The backward is ~11.
  - Knobs to tune on a GPU (one config, no autotune): `_common.STEP_BYTES`, `STEPS_PER_CHUNK`,
    `BYTES_PER_THREAD_STEP` (num_warps), or per call `_block_v` / `_chunk`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pg_kernels.ops._common import check_labels
from pg_kernels.triton._common import (
    D_MIN,
    acc_dtype_of,
    div_acc,
    exp_acc,
    inv_temperature,
    max_nan,
    merge_states,
    round_to,
    row_blocking,
    row_offset,
    scalar_inv_temperature_bits,
    valid_inv_temperature,
)

OP = "token_stats"
# Rows per program of the merge kernel: it moves ~20 bytes per (row, chunk), a tiny kernel.
MERGE_BLOCK_R = 128


@triton.jit
def _fwd_step(x, col0, inv_tau, mx, m, am, s1, s2, t, FOLD: tl.constexpr):
    """One BLOCK_V step of the online accumulator over the logits x of columns col0 + lanes
    (-inf where masked off).

    State: mx = max of the raw logits so far (-inf: nothing finite yet), m = mx / tau (0 while
    empty: a finite reference keeps z - m finite for -inf logits), am = first index of mx, and the
    per-lane sums s1, s2, t relative to m. The max is tracked on raw x because x -> x / tau is
    monotone: comparing raw values keeps argmax the first index of the max even when two logits
    round to the same z.
    """
    x = x.to(s1.dtype)
    bmax = tl.max(x, axis=0)
    if bmax > mx:
        # Rescale to the new max: s1 <- f s1, s2 <- f^2 s2, t <- f (t + delta s1), f = e^delta.
        # delta <= 0; clamped to [D_MIN, 0] so that an empty state (m = 0, sums 0) stays 0 and a
        # huge drop gives f = 0 exactly rather than 0 * inf.
        m_new = bmax * inv_tau
        delta = tl.minimum(tl.maximum(m - m_new, D_MIN), 0.0)
        f = exp_acc(delta)
        t = f * (t + delta * s1)
        s1 = f * s1
        s2 = (f * f) * s2
        # Strictly above every earlier max: its first index in this block is the first argmax.
        am = col0 + tl.argmax(x, axis=0)
        mx = bmax
        m = m_new
    # The block folds onto BLOCK_V / FOLD accumulator lanes: FOLD neighbours (inside one
    # thread's 16-byte vector, so no data moves) add into one lane in turn. Same one add or fma
    # per element and sum, 1 / FOLD of the accumulator registers: bf16 at 8 warps needs ~80
    # registers instead of ~124, so 3 programs fit per SM instead of 2 (more loads in flight).
    if FOLD == 4:
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0] // 4, 2, 2]))
        x00, x01 = tl.split(x0)
        x10, x11 = tl.split(x1)
        s1, s2, t = _accumulate(x00, inv_tau, m, s1, s2, t)
        s1, s2, t = _accumulate(x01, inv_tau, m, s1, s2, t)
        s1, s2, t = _accumulate(x10, inv_tau, m, s1, s2, t)
        s1, s2, t = _accumulate(x11, inv_tau, m, s1, s2, t)
    elif FOLD == 2:
        x0, x1 = tl.split(tl.reshape(x, [x.shape[0] // 2, 2]))
        s1, s2, t = _accumulate(x0, inv_tau, m, s1, s2, t)
        s1, s2, t = _accumulate(x1, inv_tau, m, s1, s2, t)
    else:
        s1, s2, t = _accumulate(x, inv_tau, m, s1, s2, t)
    return mx, m, am, s1, s2, t


@triton.jit
def _accumulate(x, inv_tau, m, s1, s2, t):
    # d = z - m in one rounding (fma); e = e^d is the one exp per element. NaN logits make e NaN,
    # which the caller turns into a NaN row; d = -inf (a -inf logit) gives e = 0 and, clamped,
    # e * d = 0 instead of 0 * -inf.
    d = tl.fma(x, inv_tau, -m)
    e = exp_acc(d)
    s1 = s1 + e
    s2 = tl.fma(e, e, s2)  # exp(2 d) as the square of the exp we have
    t = tl.fma(e, tl.maximum(d, D_MIN), t)
    return s1, s2, t


@triton.jit
def _finalize(m, s1, s2, t, am, z_label, keep, ok):
    """SPEC section 2 from a row's merged state (finalize_token_stats in softmax_stats.h).

    m is in z units. keep: not an ignored row (else every output 0, argmax 0). ok: the label is
    in range and 1 / tau is finite and positive (else NaN). A row whose max is not finite
    (all -inf, a NaN, a +inf) is NaN with argmax -1.
    """
    valid = ok & (m > float("-inf")) & (m < float("inf"))
    # Rows that end up 0 or NaN anyway (ignored, padding, invalid) compute on a dummy state:
    # no log(0) or 0 / 0 (numpy warnings under the interpreter), same results.
    s1 = tl.where(valid, s1, 1.0)
    m = tl.where(valid, m, 0.0)
    z_label = tl.where(valid, z_label, 0.0)
    log_s1 = tl.log(s1)
    lse = m + log_s1
    logprob = z_label - lse
    collision = div_acc(s2, s1 * s1)
    p_c = exp_acc(logprob)
    # Two non-negative terms instead of 1 - 2 p_c + C: no cancellation when p_c -> 1.
    lgp = (1.0 - p_c) * (1.0 - p_c) + (collision - p_c * p_c)
    lgp = tl.where(lgp > 0.0, lgp, 0.0)
    entropy = log_s1 - div_acc(t, s1)
    max_prob = div_acc(tl.full(s1.shape, 1.0, s1.dtype), s1)
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


@triton.jit(do_not_specialize=["inv_tau_bits", "ignore_index"])
def _fwd_chunk_kernel(
    x_ptr, labels_ptr, temp_ptr, inv_tau_bits, ignore_index, V, N,
    n_inner, stride_outer, stride_inner,
    part_ptr, part_idx_ptr,
    logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr, max_prob_ptr, argmax_ptr,
    HAS_TEMP: tl.constexpr, FINALIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
    FOLD: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the partial state of one chunk of one row.

    part_ptr: [4, n_chunks, N] (max of x, s1, s2, t), part_idx_ptr: [n_chunks, N] int32 argmax;
    chunk-major so that the merge kernel's loads are contiguous over rows. With FINALIZE (one
    chunk per row) the row's outputs are written directly instead.
    """
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    inv_tau = inv_temperature(temp_ptr, row, True, inv_tau_bits, HAS_TEMP, ACC)
    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner)

    start = chunk * CHUNK
    # Ignored rows: no step runs, nothing is read, the state stays empty.
    n_valid = tl.where(keep, tl.minimum(V - start, CHUNK), 0)
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    mx = tl.full([], float("-inf"), ACC)
    m = tl.zeros([], ACC)
    am = tl.zeros([], tl.int32)
    s1 = tl.zeros([BLOCK_V // FOLD], ACC)
    s2 = tl.zeros([BLOCK_V // FOLD], ACC)
    t = tl.zeros([BLOCK_V // FOLD], ACC)
    # Software pipelining by hand: block i + 1 is loaded (into registers, as raw logits) before
    # block i is reduced, so a program always has a block in flight, not only between steps.
    # Full blocks need no bounds mask; the mask here is one uniform flag (the last prefetch
    # loads nothing), which keeps the loads vectorized.
    x_next = tl.load(x_row + start + lanes, mask=n_full > 0, other=float("-inf"))
    for i in range(0, n_full):
        x = x_next
        col0 = start + i * BLOCK_V
        x_next = tl.load(x_row + (col0 + BLOCK_V) + lanes, mask=i + 1 < n_full, other=float("-inf"))
        mx, m, am, s1, s2, t = _fwd_step(x, col0, inv_tau, mx, m, am, s1, s2, t, FOLD)
    if n_full * BLOCK_V < n_valid:  # only the row's last chunk can end inside a block
        col0 = start + n_full * BLOCK_V
        x = tl.load(x_row + col0 + lanes, mask=col0 + lanes < V, other=float("-inf"))
        mx, m, am, s1, s2, t = _fwd_step(x, col0, inv_tau, mx, m, am, s1, s2, t, FOLD)
    s1_sum = tl.sum(s1, axis=0)
    s2_sum = tl.sum(s2, axis=0)
    t_sum = tl.sum(t, axis=0)
    # A NaN logit (or +inf - +inf) shows up as a NaN sum: carry it in the max, which the merge
    # and the finalize check (the block max itself may have dropped the NaN).
    mx = tl.where(s1_sum != s1_sum, float("nan"), mx)

    if FINALIZE:
        ok = keep & (label >= 0) & (label < V) & valid_inv_temperature(inv_tau)
        x_label = tl.load(x_row + tl.where(ok, label, 0), mask=ok, other=0.0).to(ACC)
        vals = _finalize(mx * inv_tau, s1_sum, s2_sum, t_sum, am, x_label * inv_tau, keep, ok)
        _store_outputs(
            row, True, vals, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr,
            max_prob_ptr, argmax_ptr,
        )  # fmt: skip
    else:
        idx = chunk.to(tl.int64) * N + row
        plane = tl.num_programs(1).to(tl.int64) * N
        tl.store(part_ptr + idx, mx)
        tl.store(part_ptr + plane + idx, s1_sum)
        tl.store(part_ptr + 2 * plane + idx, s2_sum)
        tl.store(part_ptr + 3 * plane + idx, t_sum)
        tl.store(part_idx_ptr + idx, am)


@triton.jit(do_not_specialize=["inv_tau_bits", "ignore_index"])
def _fwd_merge_kernel(
    x_ptr, labels_ptr, temp_ptr, inv_tau_bits, ignore_index, V, N, n_chunks,
    n_inner, stride_outer, stride_inner,
    part_ptr, part_idx_ptr,
    logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr, max_prob_ptr, argmax_ptr,
    HAS_TEMP: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """BLOCK_R rows per program: merge the n_chunks partial states of each row in chunk order
    (a fixed order, elementwise over rows: each row's result is independent of the others)."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    label = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    keep = label != ignore_index
    inv_tau = inv_temperature(temp_ptr, rows, rmask, inv_tau_bits, HAS_TEMP, ACC)
    inv_tau = tl.zeros([BLOCK_R], ACC) + inv_tau  # a scalar temperature: broadcast to the rows

    m = tl.full([BLOCK_R], float("-inf"), ACC)
    s1 = tl.zeros([BLOCK_R], ACC)
    s2 = tl.zeros([BLOCK_R], ACC)
    t = tl.zeros([BLOCK_R], ACC)
    mx = tl.full([BLOCK_R], float("-inf"), ACC)
    am = tl.zeros([BLOCK_R], tl.int32)
    plane = n_chunks.to(tl.int64) * N
    chunk_off = tl.zeros([], tl.int64)  # k * N, in int64
    for _ in range(0, n_chunks):
        idx = chunk_off + rows
        chunk_off += N
        mx_k = tl.load(part_ptr + idx, mask=rmask, other=float("-inf"))
        s1_k = tl.load(part_ptr + plane + idx, mask=rmask, other=0.0)
        s2_k = tl.load(part_ptr + 2 * plane + idx, mask=rmask, other=0.0)
        t_k = tl.load(part_ptr + 3 * plane + idx, mask=rmask, other=0.0)
        am_k = tl.load(part_idx_ptr + idx, mask=rmask, other=0)
        # The chunk kernel's m was mx_k * inv_tau, rounded the same way: same reference max.
        m, s1, s2, t = merge_states(m, s1, s2, t, mx_k * inv_tau, s1_k, s2_k, t_k)
        # Strictly greater: among equal maxima the earliest chunk (the first index) wins.
        am = tl.where(mx_k > mx, am_k, am)
        mx = max_nan(mx, mx_k)

    ok = keep & (label >= 0) & (label < V) & valid_inv_temperature(inv_tau)
    x_row = x_ptr + row_offset(rows, n_inner, stride_outer, stride_inner)
    x_label = tl.load(x_row + tl.where(ok, label, 0), mask=ok & rmask, other=0.0).to(ACC)
    vals = _finalize(m, s1, s2, t, am, x_label * inv_tau, keep, ok)
    _store_outputs(
        rows, rmask, vals, logprob_ptr, entropy_ptr, collision_ptr, lgp_ptr, lse_ptr,
        max_prob_ptr, argmax_ptr,
    )  # fmt: skip


@triton.jit
def _bwd_step(x_row, g_row, cols, V, keep, inv_tau, lse, a, b, c, g_label, label_col,
              MASKED: tl.constexpr):  # fmt: skip
    """dz_j / tau for one block, with the coefficients a, b, c, g_label already divided by tau.

    d_j = z_j - L = log p_j, p_j = e^{d_j}:
      g_l (1[j=c] - p_j)          -> -g_l p_j in a, g_l 1[j=c] added below
      g_H (-p_j (d_j + H))        -> -g_H H p_j in a, -g_H p_j d_j = p_j (b d_j)
      g_C (2 p_j (p_j - C))       -> -2 g_C C p_j in a, 2 g_C p_j^2 = p_j (c p_j)
      g_L p_j                     -> g_L p_j in a
    """
    if MASKED:
        in_row = cols < V
        x = tl.load(x_row + cols, mask=in_row & keep, other=float("-inf"))
    else:
        # A uniform mask (one flag for the whole block) keeps the loads vectorized.
        x = tl.load(x_row + cols, mask=keep, other=float("-inf"))
    x = x.to(lse.dtype)
    d = tl.fma(x, inv_tau, -lse)
    p = exp_acc(d)
    # d clamped to a finite floor: a -inf logit has p = 0, and p * (b d) must be 0, not 0 * inf.
    dz = p * tl.fma(c, p, tl.fma(b, tl.maximum(d, D_MIN), a))
    dz = tl.where(cols == label_col, dz + g_label, dz)
    dz = round_to(dz, g_row.dtype.element_ty)
    if MASKED:
        tl.store(g_row + cols, dz, mask=in_row)
    else:
        tl.store(g_row + cols, dz)


@triton.jit(do_not_specialize=["inv_tau_bits", "ignore_index"])
def _bwd_kernel(
    x_ptr, labels_ptr, temp_ptr, inv_tau_bits, ignore_index, V,
    n_inner, stride_outer, stride_inner,
    g_logprob_ptr, g_entropy_ptr, g_collision_ptr, g_lse_ptr, lse_ptr, entropy_ptr, collision_ptr,
    grad_ptr,
    HAS_TEMP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Program (row, chunk): the gradient of one chunk of one row, written once (rounded once)."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    label = tl.load(labels_ptr + row).to(tl.int64)
    keep = label != ignore_index
    inv_tau = inv_temperature(temp_ptr, row, True, inv_tau_bits, HAS_TEMP, ACC)
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    collision = tl.load(collision_ptr + row)
    g_l = tl.load(g_logprob_ptr + row)
    g_h = tl.load(g_entropy_ptr + row)
    g_c = tl.load(g_collision_ptr + row)
    g_big_l = tl.load(g_lse_ptr + row)
    # token_stats_grad_coef: dz_j = p_j (a + b d_j + c p_j) + g_l 1[j=c].
    a = g_big_l - g_l - g_h * entropy - 2.0 * g_c * collision
    b = -g_h
    c = 2.0 * g_c
    # A NaN row (bad label, bad temperature, or a forward NaN: L not finite) gets NaN everywhere,
    # through L. Ignored rows read nothing (x = -inf gives p = 0) and get exactly 0: coefficients 0
    # and a finite L and 1 / tau whatever their saved values.
    ok = (label >= 0) & (label < V) & valid_inv_temperature(inv_tau)
    ok = ok & (lse > float("-inf")) & (lse < float("inf"))
    lse = tl.where(keep, tl.where(ok, lse, float("nan")), 0.0)
    scale = tl.where(keep, inv_tau, 0.0)
    inv_tau = tl.where(keep, inv_tau, 1.0)
    a = a * scale
    b = b * scale
    c = c * scale
    g_label = g_l * scale
    # The label's column as int32 (-1: none, also for an ignore_index inside [0, V)), so that the
    # per-element test is a 32-bit compare.
    label_col = tl.where(keep & ok, label, -1).to(tl.int32)

    x_row = x_ptr + row_offset(row, n_inner, stride_outer, stride_inner)
    g_row = grad_ptr + row.to(tl.int64) * V  # the gradient is a fresh contiguous tensor
    start = chunk * CHUNK
    n_valid = tl.minimum(V - start, CHUNK)
    n_full = n_valid // BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    for i in range(0, n_full):
        cols = start + i * BLOCK_V + lanes
        _bwd_step(x_row, g_row, cols, V, keep, inv_tau, lse, a, b, c, g_label, label_col, False)
    if n_full * BLOCK_V < n_valid:
        cols = start + n_full * BLOCK_V + lanes
        _bwd_step(x_row, g_row, cols, V, keep, inv_tau, lse, a, b, c, g_label, label_col, True)


# ------------------------------------------------------------------------------------------------
# Launchers: the interface of the C++ kernels (pg_kernels/_C token_stats_forward / _backward).


def _check_inputs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: torch.Tensor | None, ignore_index: int
) -> None:
    """Guards the invariants the kernels rely on (the public op validates user input first)."""
    if logits.dim() < 1 or logits.shape[-1] < 1 or (logits.stride(-1) != 1 and logits.numel() > 0):
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
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    has_temp = temperature is not None
    temp = temperature if has_temp else labels  # never read without HAS_TEMP
    inv_bits = 0 if has_temp else scalar_inv_temperature_bits(temperature_scalar, acc)
    single = blk.n_chunks == 1
    if single:
        part = outs[0]  # unused
        part_idx = argmax
    else:
        part = torch.empty((4, blk.n_chunks, N), dtype=acc, device=logits.device)
        part_idx = torch.empty((blk.n_chunks, N), dtype=torch.int32, device=logits.device)
    _fwd_chunk_kernel[(N, blk.n_chunks)](
        logits, labels, temp, inv_bits, ignore_index, V, N,
        n_inner, stride_outer, stride_inner,
        part, part_idx, *outs, argmax,
        HAS_TEMP=has_temp, FINALIZE=single, CHUNK=blk.chunk, BLOCK_V=blk.block_v,
        FOLD=blk.fold, num_warps=blk.num_warps,
    )  # fmt: skip
    if not single:
        _fwd_merge_kernel[(triton.cdiv(N, MERGE_BLOCK_R),)](
            logits, labels, temp, inv_bits, ignore_index, V, N, blk.n_chunks,
            n_inner, stride_outer, stride_inner,
            part, part_idx, *outs, argmax,
            HAS_TEMP=has_temp, BLOCK_R=MERGE_BLOCK_R, num_warps=4,
        )  # fmt: skip
    return [*outs, argmax]


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
    n_inner: int,
    stride_outer: int,
    stride_inner: int,
    *,
    _block_v: int | None = None,
    _chunk: int | None = None,
) -> torch.Tensor:
    """Gradient of sum(g_logprob logprob + g_entropy entropy + g_collision collision + g_lse lse)
    w.r.t. logits (SPEC section 3).

    Args:
        g_*: [N] upstream gradients, fp32 (fp64 for fp64 logits).
        logits, labels, temperature, ignore_index, layout: as in `token_stats_forward`.
        lse, entropy, collision: [N] as saved by the forward.

    Returns:
        A new contiguous tensor of logits' shape and dtype (computed in fp32/fp64, rounded once).
        Ignored rows are 0; NaN rows (L not finite, bad label or temperature) are NaN.
    """
    _check_inputs(logits, labels, temperature, ignore_index)
    N, V = labels.numel(), logits.shape[-1]
    acc = acc_dtype_of(logits.dtype)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if N == 0:
        return grad
    per_row = {"g_logprob": g_logprob, "g_entropy": g_entropy, "g_collision": g_collision}
    per_row |= {"g_lse": g_lse, "lse": lse, "entropy": entropy, "collision": collision}
    for name, t in per_row.items():
        if t.numel() != N:
            raise ValueError(f"{OP}_backward: {name} has {t.numel()} elements, expected {N}")
    # No-ops (no copy) for what the op layer passes: flat, contiguous, acc dtype.
    upstream = [t.reshape(-1).to(acc).contiguous() for t in (g_logprob, g_entropy, g_collision)]
    upstream.append(g_lse.reshape(-1).to(acc).contiguous())
    saved = [t.reshape(-1).to(acc).contiguous() for t in (lse, entropy, collision)]
    blk = row_blocking(V, logits.dtype, _block_v, _chunk)
    has_temp = temperature is not None
    temp = temperature if has_temp else labels
    inv_bits = 0 if has_temp else scalar_inv_temperature_bits(temperature_scalar, acc)
    _bwd_kernel[(N, blk.n_chunks)](
        logits, labels, temp, inv_bits, ignore_index, V,
        n_inner, stride_outer, stride_inner,
        *upstream, *saved, grad,
        HAS_TEMP=has_temp, CHUNK=blk.chunk, BLOCK_V=blk.block_v, num_warps=blk.num_warps,
    )  # fmt: skip
    return grad
