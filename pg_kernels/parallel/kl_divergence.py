"""Vocab-parallel kl_divergence: KL between p = softmax(logits / T) and q = softmax(ref_logits /
T_ref) of the full rows, from each rank's shard of both (docs/math.md §§1, 4, 8).

Forward: the single-device op runs on the local shards, giving the shard's KL_r, between the
shard-renormalized distributions (finished in double by the kernels, so accurate relative to
itself however small), and its row state: each side's shard max m_r and log s1_r, and
c_r = E_w[d_w - d_v] with d = z - a / tau, a the raw max logit the kernels rebuild from m_r
(`_frames`). One all-gather of these 6 numbers per row ([world, N, 6], fp32; fp64 for fp64
logits) carries them to every rank, which merges in fixed rank order, in fp64, by the chain
rule of the KL over the shards (w the weighting side: p for reverse KL(p || q), q for forward
KL(q || p); W_r and V_r the two sides' probability masses on shard r):

    KL = sum_r W_r (KL_r + delta_r),   delta_r = log W_r - log V_r

sum_r W_r delta_r is the KL between the two sides' shard masses. The masses come from each
side's (a_r / tau, log s1_r) relative to the maxes (merge_lse), never from a rounded L_r.
delta_r is formed from small numbers only: D_r = L_w,r - L_v,r = (a_w,r / tau_w - a_v,r /
tau_v) + (c_r - KL_r) (the kernels' l_w - l_v, not the difference of two rounded log s1;
each side's frames taken relative to their max over the shards, since only differences of
the D_r count: a side masked whole with -1e30 has frames whose fp64 ulp is 2e14),
and delta_r = D_r - D with D = L_w - L_v = D* - log sum_r W_r e^{-(D_r - D*)} (D* the D_r of
the shard with the largest term; the log as log1p of the sum of W_r expm1(-(D_r - D*)) when
that is small). No O(1) term
cancels: where the rows are near-equal every term is O(KL), and the fp32 roundings of the
gathered log s1 enter only through the masses W_r, relative to the KL (the old merge,
c - log S_w + log S_v, carried them absolutely: ~1e-7 on KLs of ~1e-4). A shard where w is
all -inf adds exactly 0; w's mass on a shard where the other side is all -inf, or a shard's
KL_r = +inf, gives +inf, as on one device. Rows with such shards take delta_r = log W_r -
log V_r from the merged masses. The kernels report a shard row that is all -inf on either
side as NaN, so each rank also reads its rows' max of both tensors (one extra read of each).

Backward: no collective. Each rank runs the single-device backward kernel on its shards with
the merged row state relative to its own frames: log s1' = log s1_r - log W_r (resp.
- log V_r), so that d - log s1' is the global log-probability, and c' = KL + l'_w - l'_v =
c_r + (KL - KL_r) - delta_r, again from small numbers only (the backward's KL - c' is the
global l'_v - l'_w of near-equal rows), rounded once from fp64. A row whose weight side has a
dominant entry (w_j > 1/2, rest below 2^-7; docs/fidelity.md, finding (9)) gets that entry's
gradient as minus the sum of the row's others, as on one device; the others on the other
ranks sum to sum_{s != r} W_s (KL_s + delta_s - KL) (shard s's terms w_j (log w_j - log v_j -
KL), with log w_j = log w_j|s + log W_s), which the forward forms from the gathered states
(`_outside_terms`) and the backward kernel adds to its own shard's.

`kl_divergence_from_hidden` runs its vocabulary blocks as such shards, one after another on one
device (`shard_rows`, `partial_state`, `merge_partials`, `shard_backward_states`), without the
collective. Every step after the kernels is N-sized and runs over all shards at once, except
the sums in rank order, one add per shard (`rank_order_sum`, `others_sum`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from pg_kernels import _backend, _library
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
    others_sum,
    rank_order_sum,
    resolve_shard,
)
from pg_kernels.reference.kl_divergence import _kl as reference_kl

OP = "parallel.kl_divergence"
KERNELS = _backend.KERNELS["kl_divergence"]
# Columns of the gathered [world, N, 6] tensor, then shard_rows' two row maxes.
M_P, LS_P, M_Q, LS_Q, C, KL, MAX_P, MAX_Q = range(8)
PARTIAL_STATE = 6  # numbers per row of a shard's partial state
SHARD_ROWS = PARTIAL_STATE + 2  # shard_rows' columns: the state, then both sides' max logit
INF = float("inf")


def _tau(temp):
    return temp.scalar if temp.tensor is None else temp.tensor.unsqueeze(-1)


def _reference_state(z: torch.Tensor, zr: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The kernels' row state [N, 5] in plain PyTorch, then the shard's KL: (max, log s1) of
    z, of zr, c = E_w[d_w - d_v] with d = z - max, and sum w (log w - log v) (0 where w = 0,
    +inf where w > 0 meets v = 0; w > 0 read off the logit, as the reference does)."""
    m, mr = z.amax(-1, keepdim=True), zr.amax(-1, keepdim=True)
    d, dr = z - m, zr - mr
    ls, lsr = torch.logsumexp(d, -1), torch.logsumexp(dr, -1)
    dw, dv = (d, dr) if reverse else (dr, d)
    lw, lv = (ls, lsr) if reverse else (lsr, ls)
    kl = reference_kl(dw - lw.unsqueeze(-1), dv - lv.unsqueeze(-1))
    c = kl + (lw - lv)  # E_w[(d_w - l_w) - (d_v - l_v)] + l_w - l_v
    return torch.stack([m.squeeze(-1), ls, mr.squeeze(-1), lsr, c, kl], dim=1)


def _local_forward(logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, backend):
    """The shards' row state [N, 6]: (max, log s1) of each side, c = E_w[d_w - d_v] and the
    shard's KL_r (+inf marks weight on a token of zero probability on the other side)."""
    if backend == "reference":
        acc = acc_dtype(logits.dtype)
        v = logits.shape[-1]
        z = logits.reshape(-1, v).to(acc) / _tau(temp)
        zr = ref_logits.reshape(-1, v).to(acc) / _tau(ref_temp)
        return _reference_state(z, zr, direction == "reverse")
    kl, state = _library.call("kl_divergence",
        logits, ref_logits, labels, temp.tensor, temp.scalar, ref_temp.tensor, ref_temp.scalar,
        ignore_index, direction, backend,
    )  # fmt: skip
    return torch.cat([state.reshape(-1, 5), kl.reshape(-1, 1)], dim=1)


def _frames(m: torch.Tensor, temp, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The points a / tau, in fp64, that the gathered maxes' log s1 and c are relative to
    (m [world, N] fp64 from the acc dtype; -inf and NaN pass through).

    The kernels keep m = x_max / tau rounded but sum relative to a / tau, a = m tau rounded
    to fp32 (and to the logits' dtype when that is 16-bit: then the max logit itself; fp32:
    the max logit or an ulp from it); csrc/cpu/pair_rows.h rebuilt_max, triton/_pair.py
    max_logit. a / tau differs from m by up to ulp(m) / 2 (1.9e-6 at m = 43), which would
    land in every shard's mass and in the backward's log s1' and c'. fp64 rows (the C++
    kernels divide first, tau 1) and the reference's plain PyTorch are relative to m itself.
    """
    if backend == "reference" or dtype == torch.float64:
        return m
    if temp.tensor is None:
        tau = torch.full(m.shape[1:], temp.scalar, dtype=torch.float32, device=m.device)
    else:
        tau = temp.tensor
    tau = tau.double()
    a = (m * tau).float()  # the fp32 product of two fp32 numbers, rounded once (fma(m, tau, 0))
    if dtype.itemsize == 2:
        a = a.to(dtype).float()
    return a.double() / tau


def _outside_terms(
    gathered: torch.Tensor, delta: torch.Tensor, log_w: torch.Tensor, kl: torch.Tensor
) -> torch.Tensor:
    """[world, N, 2] fp64: per shard and row, the sum and summed size over the other shards of
    the weight side's gradient terms w_j ((d_w,j - d_v,j) - KL) (before g / tau_w), for the
    backward kernel's dominant entry (module docstring): shard s's sum is W_s (KL_s + delta_s -
    KL), its size bounded by W_s (|KL_s| + |delta_s| + |KL|), the scale of that sum's
    rounding. A shard without w mass adds 0; a non-finite sum leaves the kernel's direct form."""
    weight = torch.exp(log_w)
    kl_r = gathered[..., KL]
    keep = weight > 0
    terms = torch.where(keep, weight * (kl_r + delta - kl), 0.0)
    size = torch.where(keep, weight * (kl_r.abs() + delta.abs() + kl.abs()), 0.0)
    return torch.stack([others_sum(terms), others_sum(size)], dim=-1)


def _merge(gathered: torch.Tensor, ref_p: torch.Tensor, ref_q: torch.Tensor, reverse: bool):
    """Merge [world, N, 6] fp64 partial rows in rank order (module docstring); ref_p, ref_q
    [world, N]: each shard's frame a / tau of each side (`_frames`).

    Returns the KL [N], delta_r = log W_r - log V_r [world, N], the log masses of p and q on
    each shard [world, N] (log_mass of merge_lse), and each side's global (M, log S) [N]
    relative to the frames.
    """
    m_p, ls_p, log_mp = merge_lse(ref_p, gathered[..., LS_P])
    m_q, ls_q, log_mq = merge_lse(ref_q, gathered[..., LS_Q])
    ref_w, ref_v = (ref_p, ref_q) if reverse else (ref_q, ref_p)
    log_w, log_v = (log_mp, log_mq) if reverse else (log_mq, log_mp)
    kl_r = gathered[..., KL]
    has_w, has_v = ref_w > -INF, ref_v > -INF  # False for an all -inf shard (and NaN)
    # D_r = L_w,r - L_v,r from the kernels' l_w - l_v = c_r - KL_r, both small where the rows
    # are near-equal; only where both sides have mass and KL_r is finite. Each side's frames are
    # taken relative to their max over the shards first: delta_r depends on the D_r only
    # through their differences, and a side masked whole with a huge finite fill (frames
    # ~-1e30 / tau, an fp64 ulp of 2e14) would otherwise swallow every small term.
    d = ((ref_w - ref_w.amax(0)) - (ref_v - ref_v.amax(0))) + (gathered[..., C] - kl_r)
    # Only a shard where w has mass in fp64 takes part: one whose w side is masked whole with a
    # huge finite fill adds nothing to the KL, and there log W_r and D_r are both ~fill / tau,
    # so log W_r - D_r and log W_r + x_r below cancel numbers whose fp64 ulp exceeds the row's
    # KL (0.125 at -1e15, 1.4e14 at -1e30: a KL of 0.33 read 0.71, or 0). A shard without mass
    # on either side is as one of neither.
    weight = torch.exp(log_w)
    has_mass_w, has_mass_v = weight > 0, torch.exp(log_v) > 0
    both = has_w & has_v & torch.isfinite(d) & has_mass_w
    near = (both | ~(has_mass_w | has_mass_v)).all(0)  # every shard: both sides or neither
    # D* = D_r of the shard whose term W_r e^{-D_r} dominates the row's (max of log W_r - D_r):
    # every term is then at most W_r* e^{-D*}, and one shard's own D_r cannot push the others'
    # out of range. (The least D_r did: a shard masked whole with -1e30 on both sides under two
    # temperatures has D_r ~ -8e29 and no mass, and rows with one shard of mass e^-6553 summed
    # terms that all underflowed: a KL of 0 or NaN.)
    score = torch.where(both, log_w - d, -INF)
    d_ref = torch.where(both.any(0), d.gather(0, score.argmax(0, keepdim=True))[0], INF)
    # log (V / W over the near shards) relative to D*: log sum_r W_r e^{x_r}, x_r = D* - D_r,
    # as log1p of sum_r W_r expm1(x_r) where that is small (sum_r W_r = 1 there: exactly 0 for
    # equal rows), else as a logsumexp of log W_r + x_r. W_r expm1(x_r) is formed as e^{log W_r
    # + x_r} - W_r where x_r > 1: W_r can underflow where e^{x_r} overflows.
    x = torch.where(both, d_ref - d, 0.0)
    term = torch.where(x > 1, torch.exp(log_w + x) - weight, weight * torch.expm1(x))
    small = rank_order_sum(torch.where(both, term, 0.0))
    log_total = torch.logsumexp(torch.where(both, log_w + x, -INF), 0)
    log_ratio = torch.where(small.abs() < 0.5, torch.log1p(small), log_total)
    d_row = d_ref - log_ratio  # L_w - L_v of the whole row
    delta = torch.where(near, d - d_row, log_w - log_v)
    term = weight * (kl_r + delta)
    # a finite logit has mass, however far its weight underflows: never 0 * inf
    term = torch.where((kl_r == INF) | (delta == INF), INF, term)
    kl = rank_order_sum(torch.where(has_w, term, 0.0)).clamp_min(0)
    invalid = torch.isnan(m_p) | torch.isnan(m_q)
    kl = torch.where(invalid, float("nan"), kl)
    return kl, delta, (log_mp, log_mq), (m_p, ls_p, m_q, ls_q)


def shard_rows(logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, backend):
    """One shard's rows [N, 8] in the acc dtype: `_local_forward`'s state (columns M_P .. KL),
    then each side's max logit (`neg_inf_rows`), which `partial_state` reads to tell a side
    whose row is all -inf on the shard (the kernels report it as NaN) from a NaN row."""
    acc = acc_dtype(logits.dtype)
    state = _local_forward(
        logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, backend
    )
    maxes = [neg_inf_rows(t, acc).unsqueeze(1) for t in (logits, ref_logits)]
    return torch.cat([state, *maxes], dim=1)


def _emptied_columns(empty_p: torch.Tensor, empty_q: torch.Tensor) -> torch.Tensor:
    """[..., N, 6]: which of a partial state's columns (M_P .. KL) a side whose row is all -inf
    on the shard voids: its own (m, log s1), and c and KL_r where either side is (the kernels
    report NaN there; not used)."""
    either = empty_p | empty_q
    return torch.stack([empty_p, empty_p, empty_q, empty_q, either, either], dim=-1)


def partial_state(rows: torch.Tensor) -> torch.Tensor:
    """[..., N, 6] partial states, as the ranks gather them, from `shard_rows`' [..., N, 8]
    (of one shard or stacked): a side whose row is all -inf on the shard marked empty (max
    -inf, log s1 0; c and KL_r 0 where either side is). So is a side of finite logits whose
    frame the kernel could not give (NaN or -inf): its x / tau left the float range (finfo.min
    under tau < 1), no mass beside the row's other shards, as fp32 PyTorch reads it; the state
    holds frames in the acc dtype. (It read NaN, where the single-device op is finite.)"""

    def empty(max_col: int, m_col: int) -> torch.Tensor:
        raw_max, m = rows[..., max_col], rows[..., m_col]
        return (raw_max == -INF) | (torch.isfinite(raw_max) & ~(m > -INF))

    empty_p, empty_q = empty(MAX_P, M_P), empty(MAX_Q, M_Q)
    state = torch.where(_emptied_columns(empty_p, empty_q), 0.0, rows[..., :MAX_P])
    state[..., M_P].masked_fill_(empty_p, -INF)
    state[..., M_Q].masked_fill_(empty_q, -INF)
    return state


class Merged(NamedTuple):
    """The shards' partial states merged (`merge_partials`), in fp64."""

    kl: torch.Tensor  # [N]
    delta: torch.Tensor  # [world, N]: log W_r - log V_r
    log_mass: tuple[torch.Tensor, torch.Tensor]  # ([world, N], [world, N]): p's and q's
    sides: tuple[torch.Tensor, ...]  # [N] each: p's (M, log S), then q's


def merge_partials(gathered: torch.Tensor, temp, ref_temp, dtype, backend, reverse) -> Merged:
    """The KL of the whole rows from every shard's `partial_state` ([world, N, 6] fp64, in rank
    order; temp, ref_temp: `make_temperature`'s; dtype: the logits')."""
    ref_p = _frames(gathered[..., M_P], temp, dtype, backend)
    ref_q = _frames(gathered[..., M_Q], ref_temp, dtype, backend)
    return Merged(*_merge(gathered, ref_p, ref_q, reverse))


def shard_backward_states(gathered, merged: Merged, acc, outside_wanted: bool, reverse: bool):
    """Every shard's row state [world, N, 5] for the single-device backward kernel, relative to
    its own frames (module docstring): log s1' = log s1_r - log (shard mass), c' = c_r + (KL -
    KL_r) - delta_r (small terms only); an empty side's entries 0 (any finite (m, log s1) gives
    its zero probabilities), and c' 0 on a +inf row (the kernel reads the +inf off the KL).
    With `outside_wanted` (the weight side's gradient is asked for: its dominant entry), also
    each shard's other shards' terms [world, N, 2] (`_outside_terms`), else None. N-sized
    operations over all shards at once: a vocabulary-block caller has dozens of shards."""
    m_p, ls_p, m_q, ls_q, c, kl = gathered.unbind(-1)
    log_mp, log_mq = merged.log_mass
    shifted = torch.stack(
        [m_p, ls_p - log_mp, m_q, ls_q - log_mq, c + (merged.kl - kl) - merged.delta], dim=-1
    ).to(acc)
    empty = _emptied_columns(m_p == -INF, m_q == -INF)[..., :KL]
    row_states = torch.where(empty | ~torch.isfinite(shifted), 0.0, shifted)
    outside = None
    if outside_wanted:
        outside = _outside_terms(
            gathered, merged.delta, log_mp if reverse else log_mq, merged.kl
        ).to(acc)
    return row_states, outside


class _KLFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, shard, backend
    ):
        reverse = direction == "reverse"
        acc = acc_dtype(logits.dtype)
        rows = partial_state(
            shard_rows(logits, ref_logits, labels, temp, ref_temp, ignore_index, direction, backend)
        )
        gathered, layout = gather_rows(OP, shard, rows)
        # In fp64, rounded once: N x 6 numbers, free next to the kernels.
        gathered = gathered.double()
        merged = merge_partials(gathered, temp, ref_temp, logits.dtype, backend, reverse)
        kl = merged.kl.to(acc)
        if layout.ok is not None:
            kl = torch.where(layout.ok, kl, torch.full_like(kl, float("nan")))
        keep = None if labels is None else labels.reshape(-1) != ignore_index
        if keep is not None:
            kl = torch.where(keep, kl, torch.zeros_like(kl))
        if backend == "reference":  # both sides' global (max M, log S)
            row_state = torch.stack(merged.sides, dim=1).to(acc)
            outside = None
        else:  # this rank's row state for the backward kernel
            row_states, outside = shard_backward_states(
                gathered, merged, acc, ctx.needs_input_grad[0 if reverse else 1], reverse
            )
            row_state = row_states[shard.rank]
            outside = None if outside is None else outside[shard.rank]
        ctx.save_for_backward(
            logits, ref_logits, labels, temp.tensor, ref_temp.tensor, kl, row_state, outside
        )
        ctx.scalars = (temp.scalar, ref_temp.scalar, ignore_index, direction, backend)
        return kl.view(logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl):
        logits, ref_logits, labels, tau_t, ref_tau_t, kl, row_state, outside = ctx.saved_tensors
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
            grad, grad_ref = _library.call("kl_divergence_backward",
                g, logits, ref_logits, labels, tau_t, tau_s, ref_tau_t, ref_tau_s, ignore_index,
                direction, kl, row_state.contiguous(), need_logits, need_ref, backend, outside,
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

    One all-gather of 6 numbers per row (24 bytes in fp32) per call; the backward needs no
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
