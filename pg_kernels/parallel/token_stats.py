"""Vocab-parallel token_stats: the statistics of the full row from each rank's logit shard
(docs/math.md §§1, 2, 3, 8).

Forward: the single-device op runs on the local shard (labels off the shard become a dummy
local id), giving the shard's lse_r, entropy H_r, collision C_r, max_prob_r, argmax, and on
the rank that owns the label its logit x_c, its shard-local log-prob logprob_r and the shard's
lgp_r; each rank also reads its rows' max logit.
One all-gather of 11 numbers per row ([world, N, 11], fp32; fp64 for fp64 logits) carries them
to every rank, which merges in fixed rank order. The shard masses w_r come from each shard's
max z_r and log s1_r = -log max_prob_r relative to the maxes (merge_lse), not from the rounded
lse_r, whose ulp(L) / 2 the single-device kernels avoid, and in fp64, each output rounded
once (the label's log-prob from its raw logit, as the kernels form it, not the shard's rounded
log-prob plus log w_r: that rounded twice, 1.9e-6 at log-probs of -16):

    L = logsumexp_r (z_r + log s1_r)   H = sum_r w_r (H_r - log w_r)   C = sum_r w_r^2 C_r
    logprob = (x_c - max_r x_r) / T - log S    (S = sum_r e^{(x_r - max x) / T + log s1_r})
              or, where the label's shard has |logprob_r| < 1, logprob_r + log w_r
    max_prob, argmax from the rank with the largest max logit (ties: the smallest global id)
    lgp = w^2 lgp_r + (1 - w)((1 - w) + 2 w (1 - q_c)) + sum_(r' != r) w_r'^2 C_r'
          (r the label's shard, w = w_r, q_c = e^{logprob_r} its shard-local probability)

log S carries the roundings of the fp32 log s1_r, ~2^-24 absolute, which a log-prob near 0 (a
confident token) would keep: -3.5e-4 came out 2.7e-8 off where the single-device op is 4e-11
off. logprob_r carries ulp(logprob_r) / 2 instead, and log w_r the roundings relative to the
other shards' mass (log s1_r is in both terms of (z_r + log s1_r) - L; for one shard it is 0).
lgp = 1 - 2 p_c + C in the form above has no term that cancels: each part is >= 0 and carries the
roundings of the fp32 partial states relative to itself (1 - w = -expm1(log w); 1 - q_c =
-expm1(logprob_r); lgp_r the kernel's). As (1 - p_c)^2 + (C - p_c^2) from the merged C and p_c,
C - p_c^2 cancelled two fp32-rounded numbers near 1 where p_c is: an lgp of 4.2e-5 came out
7e-8 off (plain fp32 PyTorch 1e-8, the single-device op 3e-12).

A shard whose row is all -inf is an empty partial (w_r = 0); the kernels report it as NaN, and
the row max tells the two apart (it also settles argmax ties between shards exactly).

Backward: no collective. Each rank runs the single-device backward kernel on its shard with the
shard's own saved state (its softmax q_j) and coefficients that turn q into the global
p_j = w_r q_j (see `backward`): the global H, C and this shard's log w_r are enough. A label
owned by another rank contributes only -g_logprob p_j here.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    acc_dtype,
    check_ignore_index,
    check_labels,
    check_labels_arg,
    check_logits,
    make_temperature,
)
from pg_kernels.outputs import TokenStats
from pg_kernels.parallel._shard import (
    DIGIT,
    gather_rows,
    merge_lse,
    neg_inf_rows,
    resolve_shard,
)

OP = "parallel.token_stats"
KERNELS = _backend.KERNELS["token_stats"]
LOCAL_IGNORE = -1  # ignore_index of the local calls: local labels are >= 0 otherwise
# Columns of the gathered [world, N, COLUMNS] tensor. LOGPROB: the label's raw logit;
# LOCAL_LOGPROB, LGP: the shard's own log-prob of the label and lgp (on the label's shard).
COLUMNS = 11
LSE, ENTROPY, COLLISION, LOGPROB, OWNS, MAX, ARG_HI, ARG_LO, MAX_PROB, LOCAL_LOGPROB, LGP = range(
    COLUMNS
)


LOCAL_FIELDS = ("logprob", "entropy", "collision", "lse", "max_prob", "argmax", "lgp")


def _local_forward(logits, local_labels, temp, temperature, backend):
    """(logprob, entropy, collision, lse, max_prob, argmax, lgp) of the shard, flat [N]."""
    if backend == "reference":
        out = reference.token_stats(
            logits, local_labels, temperature=temperature, ignore_index=LOCAL_IGNORE,
            upcast=False,
        )  # fmt: skip
    else:
        out = TokenStats(
            *_library.call(
                "token_stats",
                logits,
                local_labels,
                temp.tensor,
                temp.scalar,
                LOCAL_IGNORE,
                backend,
            )
        )
    return tuple(getattr(out, f).reshape(-1) for f in LOCAL_FIELDS)


def _merge(gathered: torch.Tensor, tau):
    """Merge [world, N, COLUMNS] partial rows in rank order -> per-row global statistics and
    the log of each shard's probability mass [world, N].

    The masses come from each shard's (max z_r, log s1_r = -log max_prob_r), relative to the
    maxes (merge_lse): from the rounded lse_r they would carry ulp(L) / 2, the error the
    single-device kernels avoid; likewise z_r - max z_r is formed from the raw maxes. tau: a
    float or [N] per-row temperatures.
    """
    # Each shard's max relative to the row's, (x_r - max_r x_r) / tau: the raw maxes'
    # difference divided once, as the kernels form d = (x - x_max) / tau. z_r = x_r / tau
    # rounded first carried ulp(z) / 2 into every shard's mass (logits ~30, tau 0.7: log-prob
    # error 3.5e-6, single-device 7.7e-7). All -inf, +inf or NaN maxes give NaN (merge_lse).
    x_max = gathered[..., MAX]
    top = x_max.amax(0)
    mp = gathered[..., MAX_PROB]
    log_s1 = torch.where(mp > 0, -torch.log(mp), torch.zeros_like(mp))  # 0 on empty shards
    big, log_total, log_w = merge_lse((x_max - top) / tau, log_s1)
    lse = (top / tau + big) + log_total  # big: 0 (NaN on an invalid row)
    w = torch.exp(log_w)
    zero = torch.zeros_like(lse)
    entropy, collision, logprob, owners, lgp = zero, zero, zero, zero, zero
    near_lp, near = zero, torch.zeros_like(zero, dtype=torch.bool)
    best_max = torch.full_like(lse, float("-inf"))
    # Global ids in int64: a float holds every integer only up to 2^24 (fp32), below the
    # largest vocabularies' ids; the two digits are exact in any float.
    best_idx = torch.full(lse.shape, torch.iinfo(torch.int64).max, device=lse.device)
    max_prob = zero
    for r in range(gathered.shape[0]):
        g = gathered[r]
        # w_r = 0 (an empty shard): its terms are exactly 0, never 0 * inf.
        entropy = entropy + torch.where(w[r] > 0, w[r] * (g[:, ENTROPY] - log_w[r]), zero)
        collision = collision + w[r] * w[r] * g[:, COLLISION]
        owns = g[:, OWNS] > 0
        logprob = logprob + torch.where(owns, (g[:, LOGPROB] - top) / tau, zero)
        # A log-prob near 0 (module docstring): the shard's own plus its log mass.
        local_near = owns & (g[:, LOCAL_LOGPROB].abs() < 1)
        near = near | local_near
        near_lp = near_lp + torch.where(local_near, g[:, LOCAL_LOGPROB] + log_w[r], zero)
        # lgp (module docstring): the label's shard w^2 lgp_r + (1 - w)((1 - w) + 2 w (1 - q_c)),
        # the others w^2 C_r (an empty label shard: w = 0, 1 - w = 1, lgp 1 + C)
        one_minus_w = -torch.expm1(log_w[r])
        one_minus_q = -torch.expm1(g[:, LOCAL_LOGPROB])
        own = w[r] * w[r] * g[:, LGP] + one_minus_w * (one_minus_w + 2 * w[r] * one_minus_q)
        lgp = lgp + torch.where(owns, own, w[r] * w[r] * g[:, COLLISION])
        owners = owners + g[:, OWNS]
        idx = g[:, ARG_HI].to(torch.int64) * DIGIT + g[:, ARG_LO].to(torch.int64)
        take = (g[:, MAX] > best_max) | ((g[:, MAX] == best_max) & (idx < best_idx))
        best_max = torch.where(take, g[:, MAX], best_max)
        best_idx = torch.where(take, idx, best_idx)
        max_prob = torch.where(take, g[:, MAX_PROB] * w[r], max_prob)
    # No owner: the label is outside the global vocabulary (possible only on CUDA, unchecked).
    logprob = torch.where(near, near_lp, logprob - (big + log_total))
    logprob = torch.where(owners == 1, logprob, torch.nan)
    return lse, entropy, collision, logprob, max_prob, best_idx, log_w, lgp.clamp_min(0)


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temp, temperature, ignore_index, shard, backend):
        acc = acc_dtype(logits.dtype)
        flat_labels = labels.reshape(-1)
        keep = flat_labels != ignore_index
        local = flat_labels.to(torch.int64) - shard.start
        owns = keep & (local >= 0) & (local < shard.size)
        # Off-shard labels read local id 0 (any valid id: their logprob is not used).
        local_labels = torch.where(owns, local, torch.zeros_like(local))
        local_labels = torch.where(keep, local_labels, torch.full_like(local, LOCAL_IGNORE))
        logprob_r, entropy_r, collision_r, lse_r, max_prob_r, argmax_r, lgp_r = _local_forward(
            logits, local_labels.view(labels.shape), temp, temperature, backend
        )
        row_max = neg_inf_rows(logits, acc)
        empty = row_max == float("-inf")
        zero = torch.zeros_like(lse_r)
        neg_inf = torch.full_like(lse_r, float("-inf"))
        # The label's raw logit on its owner (N numbers read in place, any strides)
        label_logit = logits.gather(-1, local_labels.clamp_min(0).view(*labels.shape, 1))
        label_logit = label_logit.reshape(-1).to(acc)
        arg = (argmax_r + shard.start).clamp_min(0)
        rows = torch.stack(
            [
                torch.where(empty, neg_inf, lse_r),
                torch.where(empty, zero, entropy_r),
                torch.where(empty, zero, collision_r),
                torch.where(owns, label_logit, zero),
                owns.to(acc),
                row_max,
                torch.div(arg, DIGIT, rounding_mode="floor").to(acc),
                torch.remainder(arg, DIGIT).to(acc),
                torch.where(empty, zero, max_prob_r),
                # an empty label shard: q_c = 0 (log-prob -inf), w = 0
                torch.where(owns & ~empty, logprob_r, neg_inf),
                torch.where(owns & ~empty, lgp_r, zero),
            ],
            dim=1,
        )
        gathered, layout = gather_rows(OP, shard, rows)
        if layout.vocab_size is not None:  # CPU: checked here, on every rank alike
            try:
                check_labels(labels, layout.vocab_size, ignore_index)
            except ValueError as e:
                raise ValueError(f"{OP}: {e}") from None
        # In fp64, each output rounded once (N x COLUMNS numbers); tau as the kernels use it
        tau = torch.full_like(zero, temp.scalar) if temp.tensor is None else temp.tensor
        merged = _merge(gathered.double(), tau.double())
        lse, entropy, collision, logprob, max_prob = (t.to(acc) for t in merged[:5])
        argmax, log_w, lgp = merged[5], merged[6].to(acc), merged[7].to(acc)
        nan = torch.full_like(lse, float("nan"))
        invalid = ~torch.isfinite(lse)
        if layout.ok is not None:
            invalid = invalid | ~layout.ok
        floats = [torch.where(invalid, nan, t) for t in (logprob, entropy, collision, lgp)]
        floats += [torch.where(invalid, nan, t) for t in (lse, max_prob)]
        floats = [torch.where(keep, t, zero) for t in floats]
        argmax = torch.where(invalid, torch.full_like(argmax, -1), argmax)
        argmax = torch.where(keep, argmax, torch.zeros_like(argmax))
        logprob, entropy, collision, lgp, lse, max_prob = floats
        # The backward runs the local kernel on the shard's own state (its softmax q) and turns
        # q into the global p = w q through its coefficients (see backward).
        local_state = (lse_r, max_prob_r, argmax_r, log_w[shard.rank], empty)
        ctx.save_for_backward(
            logits, local_labels, owns, temp.tensor, lse, entropy, collision, *local_state
        )
        ctx.scalars = (temp.scalar, backend, labels.shape)
        outs = tuple(t.view(labels.shape) for t in (*floats, argmax))
        ctx.mark_non_differentiable(*outs[3:4], *outs[5:])  # lgp, max_prob, argmax
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logprob, g_entropy, g_collision, g_lgp, g_lse, g_max_prob, g_argmax):
        (logits, local_labels, owns, temp_tensor, lse, entropy, collision, lse_r, max_prob_r,
         argmax_r, log_w, empty) = ctx.saved_tensors  # fmt: skip
        temp_scalar, backend, shape = ctx.scalars
        acc = lse.dtype
        g_lp, g_h, g_c, g_l = (
            t.reshape(-1).to(acc).contiguous() for t in (g_logprob, g_entropy, g_collision, g_lse)
        )
        zero = torch.zeros_like(g_lp)
        if backend == "reference":
            tau = temp_scalar if temp_tensor is None else temp_tensor.unsqueeze(-1)
            # An off-shard label: d logprob / dz_j = -p_j here, the d lse / dz_j term.
            g_l = torch.where(owns, g_l, g_l - g_lp)
            g_lp = torch.where(owns, g_lp, zero)
            grad = _reference_grad(
                logits, local_labels, owns, tau, lse, entropy, collision, g_lp, g_h, g_c, g_l
            )
            return grad, None, None, None, None, None, None
        # docs/math.md §3: dz_j = p_j (a + b log p_j + c p_j) + g_lp [j = label], with
        # a = g_l - g_lp - g_h H - 2 g_c C, b = -g_h, c = 2 g_c (global H, C). The kernel
        # computes q_j from the shard's own state, and p_j = w q_j (w = e^{log_w}, this shard's
        # mass) gives q_j (a' + b' log q_j + c' q_j) with a' = w (a + b log w), b' = w b,
        # c' = w^2 c: the kernel's coefficients for g_h' = w g_h, g_c' = w^2 g_c, saved H = C =
        # 0 and g_l' = a' + g_lp'. w -> 0 sends the shard's gradient to 0, the label term aside.
        w = torch.exp(log_w)
        w_log_w = torch.where(w > 0, w * log_w, zero)
        a = g_l - g_lp - g_h * entropy - 2 * g_c * collision
        g_lp_local = torch.where(owns, g_lp, zero)
        g_l_local = w * a - g_h * w_log_w + g_lp_local
        # A row that is NaN globally (a NaN or +inf on some shard) is NaN here too.
        g_l_local = torch.where(torch.isfinite(lse), g_l_local, torch.full_like(zero, torch.nan))
        # An all -inf shard of a valid row has no state of its own: skipped (0), its label term
        # added below. Of a NaN row (all -inf on every shard too) it is not skipped: its saved
        # state is the kernel's NaN row, so its gradient is NaN as the single-device op's.
        skip = empty & torch.isfinite(lse)
        labels = torch.where(skip, torch.full_like(local_labels, LOCAL_IGNORE), local_labels)
        grad = _library.call("token_stats_backward",
            g_lp_local.contiguous(), (w * g_h).contiguous(), (w * w * g_c).contiguous(),
            g_l_local.contiguous(), logits, labels.view(shape), temp_tensor, temp_scalar,
            LOCAL_IGNORE, lse_r, zero, zero, max_prob_r, argmax_r, backend,
        )  # fmt: skip
        # The label on an all -inf shard: dz_c = g_lp (p_c = 0), as the single-device op gives.
        tau = temp_scalar if temp_tensor is None else temp_tensor
        label_term = torch.where(empty & owns, g_lp / tau, zero).to(grad.dtype)
        flat = grad.view(-1, grad.shape[-1])
        rows = torch.arange(flat.shape[0], device=flat.device)
        flat.index_put_((rows, local_labels.clamp_min(0)), label_term, accumulate=True)
        return grad, None, None, None, None, None, None


def _reference_grad(logits, local_labels, owns, tau, lse, entropy, collision, *g):
    """docs/math.md §3 in plain PyTorch over the shard, with the global L, H, C.

    tau: a float or [N, 1] per-row temperatures."""
    g_lp, g_h, g_c, g_l = (t.unsqueeze(-1) for t in g)
    z = logits.reshape(-1, logits.shape[-1]).to(lse.dtype) / tau
    logp = z - lse.unsqueeze(-1)
    p = torch.exp(logp)
    ent_term = torch.where(p > 0, -p * (logp + entropy.unsqueeze(-1)), torch.zeros_like(p))
    grad = -g_lp * p + g_h * ent_term + g_c * 2 * p * (p - collision.unsqueeze(-1)) + g_l * p
    onehot = torch.zeros_like(grad)
    onehot.scatter_(1, local_labels.clamp_min(0).unsqueeze(-1), 1.0)
    grad = grad + g_lp * onehot * owns.unsqueeze(-1)
    grad = grad / tau
    keep = (local_labels != LOCAL_IGNORE).unsqueeze(-1)
    grad = torch.where(torch.isfinite(lse).unsqueeze(-1), grad, torch.full_like(grad, float("nan")))
    grad = torch.where(keep, grad, torch.zeros_like(grad))
    return grad.to(logits.dtype).view(logits.shape)


def token_stats(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start_index: int | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> TokenStats:
    """`pg_kernels.token_stats` of the full row, from this rank's shard of the vocabulary.

    Call it on every rank of `group` with the same labels and temperature and each rank's own
    shard. Values equal the single-device op on the concatenated logits, bitwise the same on
    every rank; gradients flow to each rank's `local_logits` shard.

    Args:
        local_logits: [..., V_local] bf16, fp16, fp32 or fp64, global ids
            [vocab_start_index, vocab_start_index + V_local); only the last dim must be
            contiguous. The same leading shape on every rank.
        labels: [...] int64 or int32 GLOBAL ids (or ignore_index), the same on every rank.
        group: the torch.distributed process group (default: the world); gloo for CPU
            tensors, nccl for CUDA tensors.
        vocab_start_index: this shard's first global id; default rank x V_local (equal
            shards). Uneven shards: each rank passes its own. The shards must tile [0, V).
        temperature: a float or a [...] tensor (per row), finite and > 0, the same on every
            rank. Not differentiable.
        ignore_index: label value of rows to skip (0 outputs, 0 gradient).
        backend: the local kernels: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        TokenStats of [...] tensors (fp32; fp64 for fp64 logits), as `pg_kernels.token_stats`;
        argmax is a global id.

    One all-gather of 11 numbers per row (44 bytes in fp32) per call; the backward needs no
    collective. Argument errors found before the all-gather (types, shapes,
    vocab_start_index < 0) raise on the calling rank alone: a rank that calls with different
    arguments (a different number of rows or dtype) breaks the collective: NCCL leaves the
    others waiting, gloo aborts the processes. Bad shard layouts and
    out-of-range labels raise on CPU (on every rank); on CUDA they give NaN rows (reading them
    would sync the host). Not supported under torch.compile (the collective and the layout
    check run in an autograd.Function).
    """
    check_logits(OP, "local_logits", local_logits)
    check_labels_arg(OP, local_logits, labels)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    temp = make_temperature(OP, temperature, local_logits)
    backend = _backend.resolve(OP, backend, local_logits.device, kernels=KERNELS)
    shard = resolve_shard(OP, group, vocab_start_index, local_logits)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.detach()
    return TokenStats(
        *_TokenStatsFn.apply(local_logits, labels, temp, temperature, ignore_index, shard, backend)
    )
