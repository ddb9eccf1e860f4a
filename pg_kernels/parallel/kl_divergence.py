"""Vocab-parallel kl_divergence: KL between p = softmax(logits / T) and q = softmax(ref_logits /
T_ref) of the full rows, from each rank's shard of both (docs/math.md §§1, 4, 8).

Forward: the single-device op runs on the local shards, giving its row state: each side's
shard max m_r and log s1_r, and c_r = E_w[d_w - d_v] over the shard-renormalized weighting
distribution w (p for reverse KL(p || q), q for forward KL(q || p); d = z - m_r). One
all-gather of these 5 numbers per row ([world, N, 5], fp32; fp64 for fp64 logits) carries
them to every rank, which merges in fixed rank order, in fp64, as the kernels finish a row:

    M = max_r m_r,  S = sum_r s1_r e^{m_r - M},  log W_r = (m_r - M) + log s1_r - log S
    c  = sum_r W_r (c_r - (M_w - m_w,r) + (M_v - m_v,r))      (W_r: w's shard masses)
    KL = c - log S_w + log S_v

Everything stays relative to the maxes (L_r - L would lose ulp(L)) and c_r, not the shard's
KL, enters the sum, so the backward's c' below matches (d_w - d_v) as on one device. A shard
where w is all -inf adds exactly 0; w's mass on a shard where the other side is all -inf
gives +inf, as on one device. The kernels report a shard row that is all -inf on either side
as NaN, so each rank also reads its rows' max of both tensors (one extra read of each).

Backward: no collective. Each rank runs the single-device backward kernel on its shards with
the merged row state relative to its shard's maxes: log s1' = (M - m_r) + log S per side, so
that (z - m_r) - log s1' is the global log-probability, and c' = c + (M_w - m_w,r) -
(M_v - m_v,r), rounded once from fp64.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from pg_kernels import _backend
from pg_kernels.ops._common import (
    acc_dtype,
    check_logits,
    check_logits_pair,
)
from pg_kernels.ops.kl_divergence import check_kl_args
from pg_kernels.parallel._shard import (
    gather_rows,
    merge_lse,
    neg_inf_rows,
    resolve_shard,
)

OP = "parallel.kl_divergence"
KERNELS = _backend.KERNELS["kl_divergence"]
M_P, LS_P, M_Q, LS_Q, C = range(5)  # columns of the gathered [world, N, 5] tensor


def _tau(temp):
    return temp.scalar if temp.tensor is None else temp.tensor.unsqueeze(-1)


def _reference_state(z: torch.Tensor, zr: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The kernels' row state [N, 5] in plain PyTorch: (max, log s1) of z, of zr, then
    c = E_w[d_w - d_v] with d = z - max (0 where w = 0, +inf where w > 0 meets v = 0)."""
    m, mr = z.amax(-1, keepdim=True), zr.amax(-1, keepdim=True)
    d, dr = z - m, zr - mr
    dw, dv = (d, dr) if reverse else (dr, d)
    w = dw.softmax(-1)
    c = torch.where(w > 0, w * (dw - dv), torch.zeros_like(w)).sum(-1)
    ls, lsr = torch.logsumexp(d, -1), torch.logsumexp(dr, -1)
    return torch.stack([m.squeeze(-1), ls, mr.squeeze(-1), lsr, c], dim=1)


def _local_forward(logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, backend):
    """The shards' KL_r [N] (+inf marks weight on a token of zero probability on the other
    side) and row state [N, 5]: (max, log s1) of each side, then c = E_w[d_w - d_v]."""
    if backend == "reference":
        acc = acc_dtype(logits.dtype)
        v = logits.shape[-1]
        z = logits.reshape(-1, v).to(acc) / _tau(temp)
        zr = ref_logits.reshape(-1, v).to(acc) / _tau(ref_temp)
        state = _reference_state(z, zr, direction == "reverse")
        return state[:, 4], state
    kl, state = torch.ops.pg_kernels.kl_divergence(
        logits, ref_logits, labels, temp.tensor, temp.scalar, ref_temp.tensor, ref_temp.scalar,
        ignore_index, direction, backend,
    )  # fmt: skip
    return kl.reshape(-1), state.reshape(-1, 5)


def _merge(gathered: torch.Tensor, reverse: bool):
    """Merge [world, N, 5] partial rows in rank order.

    Returns the KL [N], c = E_w[d_w - d_v] relative to the global maxes [N], and each side's
    global (M, log S) [N]. As in the kernels, KL = c - log S_w + log S_v, with
    c = sum_r W_r (c_r - (M_w - m_w,r) + (M_v - m_v,r)) (W_r the weighting side's shard mass).
    """
    m_p, ls_p, log_wp = merge_lse(gathered[..., M_P], gathered[..., LS_P])
    m_q, ls_q, log_wq = merge_lse(gathered[..., M_Q], gathered[..., LS_Q])
    mw, lw, log_w, mw_col = (m_p, ls_p, log_wp, M_P) if reverse else (m_q, ls_q, log_wq, M_Q)
    mv, lv, mv_col = (m_q, ls_q, M_Q) if reverse else (m_p, ls_p, M_P)
    weight = torch.exp(log_w)
    c = torch.zeros_like(m_p)
    for r in range(gathered.shape[0]):
        g = gathered[r]
        # (M_v - m_v,r) = +inf where the other side is all -inf on this shard: KL = +inf
        term = weight[r] * (g[:, C] - (mw - g[:, mw_col]) + (mv - g[:, mv_col]))
        c = c + torch.where(weight[r] > 0, term, torch.zeros_like(term))
    kl = (c - lw + lv).clamp_min(0)
    invalid = torch.isnan(m_p) | torch.isnan(m_q)
    kl = torch.where(invalid, torch.full_like(kl, float("nan")), kl)
    return kl, c, (m_p, ls_p, m_q, ls_q)


class _KLFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, shard, backend
    ):
        reverse = direction == "reverse"
        acc = acc_dtype(logits.dtype)
        kl_r, state = _local_forward(
            logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, backend
        )
        empty_p = neg_inf_rows(logits, acc) == float("-inf")
        empty_q = neg_inf_rows(ref_logits, acc) == float("-inf")
        neg_inf = torch.full_like(kl_r, float("-inf"))
        zero = torch.zeros_like(kl_r)
        # c_r of a shard whose KL_r is +inf (weight meets a -inf logit of the other side)
        c_r = torch.where(kl_r == float("inf"), kl_r, state[:, 4])
        rows = torch.stack(
            [
                torch.where(empty_p, neg_inf, state[:, 0]),
                torch.where(empty_p, zero, state[:, 1]),
                torch.where(empty_q, neg_inf, state[:, 2]),
                torch.where(empty_q, zero, state[:, 3]),
                torch.where(empty_p | empty_q, zero, c_r),
            ],
            dim=1,
        )
        gathered, layout = gather_rows(OP, shard, rows)
        # In fp64, rounded once: the merge adds and cancels terms of size |log W_r| (up to
        # ~100); N x 5 numbers, free next to the kernels.
        kl64, c64, merged = _merge(gathered.double(), reverse)
        kl = kl64.to(acc)
        if layout.ok is not None:
            kl = torch.where(layout.ok, kl, torch.full_like(kl, float("nan")))
        keep = None if labels is None else labels.reshape(-1) != ignore_index
        if keep is not None:
            kl = torch.where(keep, kl, zero)
        if backend == "reference":  # both sides' global (max M, log S)
            row_state = torch.stack(merged, dim=1).to(acc)
        else:  # this rank's row state for the backward kernel (module docstring)
            m_p, ls_p, m_q, ls_q = merged
            st = state.double()
            # relative to this shard's maxes: log s1' = (M - m_r) + log S and
            # c' = c + (M_w - m_w,r) - (M_v - m_v,r)
            shift_p, shift_q = m_p - st[:, 0], m_q - st[:, 2]
            shift_w, shift_v = (shift_p, shift_q) if reverse else (shift_q, shift_p)
            shifted = [
                state[:, 0], (shift_p + ls_p).to(acc), state[:, 2], (shift_q + ls_q).to(acc),
                (c64 + shift_w - shift_v).to(acc),
            ]  # fmt: skip
            empty = [empty_p, empty_p, empty_q, empty_q, empty_p | empty_q]
            # An all -inf side: any finite (m, log s1) gives its zero probabilities.
            row_state = torch.stack(
                [torch.where(e | ~torch.isfinite(t), zero, t) for t, e in zip(shifted, empty)],
                dim=1,
            )
        ctx.save_for_backward(
            logits, ref_logits, labels, temp.tensor, ref_temp.tensor, kl, row_state
        )
        ctx.scalars = (temp.scalar, ref_temp.scalar, ignore_index, direction, backend)
        return kl.view(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl):
        logits, ref_logits, labels, tau_t, ref_tau_t, kl, row_state = ctx.saved_tensors
        tau_s, ref_tau_s, ignore_index, direction, backend = ctx.scalars
        need_logits, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_logits or need_ref):
            return (None,) * 9
        g = g_kl.reshape(-1).to(kl.dtype).contiguous()
        if backend == "reference":
            grad, grad_ref = _reference_grad(
                logits, ref_logits, labels, tau_s if tau_t is None else tau_t.unsqueeze(-1),
                ref_tau_s if ref_tau_t is None else ref_tau_t.unsqueeze(-1), ignore_index,
                direction, kl, row_state, g,
            )  # fmt: skip
        else:
            grad, grad_ref = torch.ops.pg_kernels.kl_divergence_backward(
                g, logits, ref_logits, labels, tau_t, tau_s, ref_tau_t, ref_tau_s, ignore_index,
                direction, kl, row_state.contiguous(), need_logits, need_ref, backend,
            )  # fmt: skip
        return (
            grad if need_logits else None,
            grad_ref if need_ref else None,
            *(None,) * 7,
        )


def _reference_grad(
    logits, ref_logits, labels, tau, ref_tau, ignore_index, direction, kl, state, g
):
    """docs/math.md §4's gradients in plain PyTorch over the shards, from both sides' global
    max and log S, state [N, 4]."""
    v = logits.shape[-1]
    logp = (logits.reshape(-1, v).to(kl.dtype) / tau - state[:, :1]) - state[:, 1:2]
    logq = (ref_logits.reshape(-1, v).to(kl.dtype) / ref_tau - state[:, 2:3]) - state[:, 3:]
    p, q = torch.exp(logp), torch.exp(logq)
    k = kl.unsqueeze(-1)

    def weighted(w, logw, logv):  # w (log w - log v - KL), 0 where w = 0
        return torch.where(w > 0, w * (logw - logv - k), torch.zeros_like(w))

    if direction == "reverse":
        dz, dzr = weighted(p, logp, logq), q - p
        inf_side = "p"
    else:
        dz, dzr = p - q, weighted(q, logq, logp)
        inf_side = "q"
    gg = g.unsqueeze(-1)
    nan_row = torch.isnan(k)
    inf_row = k == float("inf")
    out = []
    for grad, t, side in ((dz, tau, "p"), (dzr, ref_tau, "q")):
        grad = torch.where(gg == 0, torch.zeros_like(grad), grad * gg / t)
        bad = nan_row | (inf_row & (gg != 0)) if side == inf_side else nan_row
        grad = torch.where(bad, torch.full_like(grad, float("nan")), grad)
        if labels is not None:
            keep = (labels.reshape(-1) != ignore_index).unsqueeze(-1)
            grad = torch.where(keep, grad, torch.zeros_like(grad))
        out.append(grad)
    return out[0].to(logits.dtype).view(logits.shape), out[1].to(ref_logits.dtype).view(
        ref_logits.shape
    )


def kl_divergence(
    local_logits: torch.Tensor,
    local_ref_logits: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    direction: str = "reverse",
    temperature: float | torch.Tensor = 1.0,
    ref_temperature: float | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """`pg_kernels.kl_divergence` of the full rows, from this rank's shard of both tensors.

    Call it on every rank of `group` with each rank's own shards (the same vocab columns of
    both tensors) and the same other arguments. Values equal the single-device op on the
    concatenated logits, bitwise the same on every rank; gradients flow to each rank's
    `local_logits` (and `local_ref_logits` when it requires grad).

    Args:
        local_logits: [..., V_local] bf16, fp16, fp32 or fp64, global ids
            [vocab_start_index, vocab_start_index + V_local); only the last dim must be
            contiguous. The same leading shape on every rank.
        local_ref_logits: [..., V_local] the reference / teacher shard, same shape and dtype.
        group: the torch.distributed process group (default: the world); gloo for CPU
            tensors, nccl for CUDA tensors.
        vocab_start_index: this shard's first global id; default rank x V_local (equal
            shards). Uneven shards: each rank passes its own. The shards must tile [0, V).
        direction: "reverse" for KL(p || q), "forward" for KL(q || p).
        temperature, ref_temperature: floats or [...] tensors (per row), as
            `pg_kernels.kl_divergence`; the same on every rank.
        labels: optional [...] int64/int32; only rows equal to ignore_index are read.
        ignore_index: label value of rows to skip.
        backend: the local kernels: "auto", "reference", "cpu" or "triton".

    Returns:
        [...] fp32 (fp64 for fp64 logits) KL per row, as `pg_kernels.kl_divergence`.

    One all-gather of 5 numbers per row (20 bytes in fp32) per call; the backward needs no
    collective. Argument errors found before the all-gather (types, shapes,
    vocab_start_index < 0) raise on the calling rank alone: a rank that calls with different
    arguments (a different number of rows or dtype) breaks the collective: NCCL leaves the
    others waiting, gloo aborts the processes. A bad shard layout raises on CPU
    (on every rank) and gives NaN rows on CUDA. Not supported under torch.compile (the
    collective runs in an autograd.Function).
    """
    check_logits(OP, "local_logits", local_logits)
    check_logits_pair(OP, local_logits, local_ref_logits, "local_ref_logits")
    ignore_index, temp, ref_temp = check_kl_args(
        OP, local_logits, direction, labels, ignore_index, temperature, ref_temperature
    )
    backend = _backend.resolve(OP, backend, local_logits.device, kernels=KERNELS)
    shard = resolve_shard(OP, group, vocab_start_index, local_logits)
    return _KLFn.apply(
        local_logits, local_ref_logits, labels, temp, ref_temp, ignore_index, direction, shard,
        backend,
    )  # fmt: skip
