"""Advantage estimators on per-sequence / per-token tensors (docs/math.md §7).

Prompt groups are given by `group_ids [B]` (any integer values; rows with equal ids share a
prompt). Group statistics are segment sums over dense group ids (`_common.dense_group_ids`: a
sort and a cumsum, no torch.unique), so nothing here syncs the host or loops over rows, groups,
steps or turns in Python, and every function traces under `torch.compile(fullgraph=True)`.
Arithmetic runs in, and outputs have, the compute dtype (`_common.compute_dtype`: the inputs'
promoted float dtype, at least float32): bf16 / fp16 in, float32 out; float64 in, float64 out.
"""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import (
    check_choice,
    check_float,
    check_int,
    check_mask,
    check_number,
    check_same_device,
    check_shape,
    compute_dtype,
    dense_group_ids,
    masked_amax,
    masked_amin,
    segment_sum,
    valid,
    weights,
)
from pg_kernels.ops._common import values_checkable

GROUP_METHODS = ("grpo", "dr_grpo", "rloo")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    method: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantages from per-prompt group statistics.

    With `n_g` members in the group of row i, `mean_g` their mean reward and
    `std_g = sqrt(sum_{j in g} (r_j - mean_g)^2 / (n_g - 1))` (unbiased, as torch.std):

        grpo     A_i = (r_i - mean_g) / (std_g + eps)
        dr_grpo  A_i = r_i - mean_g
        rloo     A_i = r_i - (sum_{j in g, j != i} r_j) / (n_g - 1)  = n_g/(n_g-1) (r_i - mean_g)
                 A_i = r_i when n_g = 1

    A one-member group gets 0 under grpo and dr_grpo (r_i - mean_g = 0; its std is taken as 0,
    not torch.std's NaN; verl instead returns r_i there) and r_i under rloo. A group of n_g > 1
    equal rewards gets exactly 0 under all three (under grpo with no gradient: its std has
    none). rloo advantages of a group with n_g > 1 sum to 0. The group sums run in float64 and
    the result is rounded once to the compute dtype.

    Args:
        rewards: [B] float (any float dtype).
        group_ids: [B] int64 / int32, any values.
        method: "grpo", "dr_grpo" or "rloo".
        eps: added to std_g under grpo.

    Returns:
        [B] advantages, float32 (float64 for float64 rewards); differentiable w.r.t. rewards.
    """
    check_float("rewards", rewards, 1)
    check_int("group_ids", group_ids, 1)
    check_shape("group_ids", group_ids, rewards.shape)
    check_same_device(rewards=rewards, group_ids=group_ids)
    check_choice("method", method, GROUP_METHODS)
    check_number("eps", eps, at_least=0.0)
    B = rewards.shape[0]
    out_dtype = compute_dtype(rewards)
    gid = dense_group_ids(group_ids)
    # Group sums in float64 whatever the rewards' dtype ([B] numbers), the result rounded once:
    # bf16 sums rounded at every add (a bf16 group of 300 was off by up to 0.43).
    r = rewards.to(torch.float64)
    count = segment_sum(torch.ones_like(r), gid, B)[gid]
    total = segment_sum(r, gid, B)[gid]
    mean = total / count
    # A group whose rewards are all equal (all correct, all wrong) carries no signal: exactly 0,
    # not its mean's rounding over std + eps (16 fp32 rewards of 0.7: |A| = 0.106 under grpo).
    with torch.no_grad():
        lo = r.new_zeros(B).scatter_reduce(0, gid, r, "amin", include_self=False)[gid]
        hi = r.new_zeros(B).scatter_reduce(0, gid, r, "amax", include_self=False)[gid]
        flat = (count > 1) & (lo == hi)
    if method == "grpo":
        centred = r - mean
        var = segment_sum(centred * centred, gid, B)[gid] / torch.where(count > 1, count - 1, 1)
        # sqrt's derivative at 0 is inf, and inf * 0 a NaN gradient: no 0 under the root. A
        # group without spread has no gradient either (its std has none at 0).
        std = torch.sqrt(torch.where(var > 0, var, 1))
        ok = (count > 1) & ~flat
        return torch.where(ok, centred / (torch.where(var > 0, std, 0) + eps), 0).to(out_dtype)
    if method == "dr_grpo":
        adv = r - mean
    else:
        others = (total - r) / torch.where(count > 1, count - 1, 1)
        adv = torch.where(count > 1, r - others, r)
    # Linear in r: a flat group's value is exactly 0 (x - x), its gradient kept.
    return torch.where(flat, adv - adv.detach(), adv).to(out_dtype)


def otb_advantages(
    returns: torch.Tensor,
    lgp: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    is_weights: torch.Tensor | None = None,
    handle_zero_tail: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Optimal Token Baseline (OTB) advantages, per token.

    With `G_t^i` the return of row i at position t (`returns [B]` broadcast: G_t = R for every
    t; or `returns [B, T]`: reward-to-go), `m` the mask, `w` the logit-gradient proxy
    `lgp = 1 - 2 p_c + sum p^2` (`token_stats(...).lgp`) and `rho` the optional IS weights:

        W_t^i = sum_{j <= t} w_j^i m_j^i (rho_j^i)^2                      (cumsum over dim 1)
        B_t^g = sum_{i in g} G_t^i W_t^i m_t^i / (sum_{i in g} W_t^i m_t^i + eps)
        A_t^i = (G_t^i - B_t^g) m_t^i

    per prompt group g and position t. A one-member group has baseline 0 (A = G m); members
    are the rows with a valid token (a row masked whole, batch padding, changes nothing).
    `handle_zero_tail`: in a group whose longest row (length = its count of mask != 0 tokens,
    as verl counts a 0/1 mask) is unique, that row's baseline is 0 at positions t >= the
    second-longest length, where it is the only member left and B_t would equal its own return.

    Args:
        returns: [B] or [B, T] float.
        lgp: [B, T] float, the per-token logit-gradient proxy.
        mask: [B, T] bool, int or float (1 = a model token that counts).
        group_ids: [B] int64 / int32.
        is_weights: optional [B, T] float, truncated IS weights (default 1).
        handle_zero_tail: see above.
        eps: added to the denominator.

    Returns:
        [B, T] advantages in the inputs' promoted float dtype, at least float32; 0 where mask
        is 0.
        Multi-turn rows: compact the model tokens first (`compact_rows`, then
        `uncompact_rows` on the result) so that position t is the t-th model token.
    """
    check_float("lgp", lgp, 2)
    B, T = lgp.shape
    check_float("returns", returns, (1, 2))
    check_shape("returns", returns, (B,) if returns.dim() == 1 else (B, T))
    check_mask("mask", mask, (B, T))
    check_int("group_ids", group_ids, 1)
    check_shape("group_ids", group_ids, (B,))
    if is_weights is not None:
        check_float("is_weights", is_weights, 2)
        check_shape("is_weights", is_weights, (B, T))
    check_same_device(
        returns=returns, lgp=lgp, mask=mask, group_ids=group_ids, is_weights=is_weights
    )
    check_number("eps", eps, at_least=0.0)
    dtype = compute_dtype(lgp, returns, is_weights)
    m = weights(mask, dtype)
    ok = valid(mask)
    G = (returns[:, None] if returns.dim() == 1 else returns).to(dtype).expand(B, T)
    w = torch.where(ok, lgp.to(dtype), 0) * m
    if is_weights is not None:  # masked: exp(old - rollout) is NaN on -inf padding log-probs
        w = w * torch.where(ok, is_weights.to(dtype), 0) ** 2
    W = torch.cumsum(w, dim=1)
    gid = dense_group_ids(group_ids)
    Wm = W * m
    num = segment_sum(torch.where(ok, G, 0) * Wm, gid, B)[gid]
    den = segment_sum(Wm, gid, B)[gid]
    baseline = num / (den + eps)
    count = segment_sum(ok.any(1).to(torch.int64), gid, B)[gid]
    zero = (count == 1)[:, None].expand(B, T)
    if handle_zero_tail:
        length = ok.sum(1).to(dtype)  # tokens, whatever a float mask weighs them
        longest = length.new_full((B,), -1.0).scatter_reduce(0, gid, length, "amax")[gid]
        is_longest = length == longest
        n_longest = segment_sum(is_longest.to(torch.int64), gid, B)[gid]
        second = (
            length.new_full((B,), -1.0)
            .scatter_reduce(0, gid, torch.where(is_longest, -1.0, length), "amax")
            .gather(0, gid)
        )
        unique_longest = is_longest & (n_longest == 1) & (count > 1)
        pos = torch.arange(T, device=lgp.device, dtype=dtype)
        zero = zero | (unique_longest[:, None] & (pos[None, :] >= second[:, None]))
    baseline = torch.where(zero, 0, baseline)
    return torch.where(ok, (G - baseline) * m, 0)


def trloo_advantages(
    turn_rewards: torch.Tensor,
    turn_mask: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Turn-level leave-one-out (TRLOO) advantages for multi-turn rollouts.

    Turn returns over the valid turns of each row (invalid turns carry no reward and take no
    discount step): `G_t = r_t + gamma G_{t'}` with t' the next valid turn, i.e.

        G_{i,t} = sum_{s >= t, s valid} gamma^(c_s - c_t) r_{i,s},   c = cumsum(turn_mask, 1)

    Then, per prompt group g and turn t, over the members j with a valid turn t
    (n_t of them, S_t = sum_j G_{j,t}):

        A_{i,t} = G_{i,t} - (S_t - G_{i,t}) / (n_t - 1)    (n_t > 1: the OTHER members only)
        A_{i,t} = G_{i,t}                                   (no other member has turn t)
        A_{i,t} = 0                                         (turn t invalid for row i)

    Args:
        turn_rewards: [B, K] float, the reward of each turn.
        turn_mask: [B, K] bool, int or float (nonzero = a valid turn).
        group_ids: [B] int64 / int32.
        gamma: discount per valid turn.

    Returns:
        [B, K] advantages, float32 (float64 for float64 turn_rewards). `turns_to_tokens`
        spreads them to tokens.
    """
    check_float("turn_rewards", turn_rewards, 2)
    B, K = turn_rewards.shape
    check_mask("turn_mask", turn_mask, (B, K))
    check_int("group_ids", group_ids, 1)
    check_shape("group_ids", group_ids, (B,))
    check_same_device(turn_rewards=turn_rewards, turn_mask=turn_mask, group_ids=group_ids)
    check_number("gamma", gamma, at_least=0.0)
    dtype = compute_dtype(turn_rewards)
    ok = valid(turn_mask)
    r = torch.where(ok, turn_rewards.to(dtype), 0)
    c = torch.cumsum(ok.to(dtype), dim=1)
    # [B, K, K] discount matrix D[t, s] = gamma^(c_s - c_t) for s >= t; K (turns) is small.
    upper = torch.ones(K, K, dtype=torch.bool, device=r.device).triu()
    expo = torch.where(upper, c[:, None, :] - c[:, :, None], 0)
    disc = torch.where(upper, torch.pow(torch.full_like(expo, gamma), expo), 0)
    G = torch.where(ok, (disc * r[:, None, :]).sum(-1), 0)
    gid = dense_group_ids(group_ids)
    n = segment_sum(ok.to(dtype), gid, B)[gid]
    S = segment_sum(G, gid, B)[gid]
    others = (S - G) / torch.where(n > 1, n - 1, 1)
    adv = torch.where(n > 1, G - others, G)
    return torch.where(ok, adv, 0)


def turns_to_tokens(turn_values: torch.Tensor, turn_ids: torch.Tensor) -> torch.Tensor:
    """Broadcast per-turn values to tokens: out[i, t] = turn_values[i, turn_ids[i, t]].

    Args:
        turn_values: [B, K] float.
        turn_ids: [B, T] int64 / int32, the turn of each token in [0, K), -1 for tokens
            outside any turn (they get 0). Ids >= K and below -1 are not checked on a GPU
            (that would sync the host; there the gather fails on the first, the second read as
            -1); on CPU both raise. K = 0: every id is -1.

    Returns:
        [B, T], dtype of turn_values; differentiable w.r.t. turn_values.
    """
    check_float("turn_values", turn_values, 2)
    check_int("turn_ids", turn_ids, 2)
    if turn_ids.shape[0] != turn_values.shape[0]:
        raise ValueError(
            f"turn_ids must have {turn_values.shape[0]} rows (turn_values' B), "
            f"got shape {tuple(turn_ids.shape)}"
        )
    check_same_device(turn_values=turn_values, turn_ids=turn_ids)
    ids = turn_ids.to(torch.int64)
    if values_checkable(ids) and bool((ids < -1).any()):
        raise ValueError(f"turn_ids must be -1 or a turn in [0, K), got {int(ids.min())}")
    if turn_values.shape[1] == 0:  # no turn to gather from (the gather of id 0 would raise)
        if values_checkable(ids) and bool((ids >= 0).any()):
            raise ValueError("turn_ids must all be -1 when turn_values has no turn (K = 0)")
        # zeros that stay in turn_values' graph (an empty gradient, not an unused input)
        return turn_values.sum(1, keepdim=True).expand(ids.shape).clone()
    out = turn_values.gather(1, ids.clamp(min=0))
    return torch.where(ids >= 0, out, 0)


def empg_advantages(
    advantages: torch.Tensor,
    token_entropy: torch.Tensor,
    mask: torch.Tensor,
    step_ids: torch.Tensor,
    *,
    k: float = 1.0,
    k_f: float = 1.0,
    zeta: float = 0.1,
) -> torch.Tensor:
    """Entropy-modulated policy-gradient (EMPG) advantages, per token.

    A step s of row i is the set of its tokens with step_ids == s (0, 1, ... in order within a
    row; -1 outside any step); it exists when it holds at least one valid token. Over the
    existing steps of the whole batch:

        H_{i,s} = mean of token_entropy over the step's valid tokens
        H_n     = (H - min H) / (max H - min H + 1e-8)
        g       = exp(-k H_n) / mean_steps(exp(-k H_n))
        f       = exp(-k_f H_n)
        a_{i,s} = g(H_{i,s}) A_i + zeta f(H_{i,s+1})    (no bonus when s is row i's last step)
        A'_{i,s} = a_{i,s} - mean_steps(a)

    and every valid token of step s of row i gets A'_{i,s} (0 elsewhere).

    Args:
        advantages: [B] float, the outcome advantage of each row.
        token_entropy: [B, T] float (`token_stats(...).entropy`).
        mask: [B, T] bool, int or float.
        step_ids: [B, T] int64 / int32, values in [-1, T). A value >= T or below -1 raises on
            CPU; on a GPU (where checking would sync the host) a value >= T gets NaN instead of
            joining another row's step, and one below -1 is read as -1.
        k, k_f, zeta: the EMPG constants.

    Returns:
        [B, T], in the inputs' promoted float dtype, at least float32; token_entropy is taken
        detached (no gradient flows back through the modulation).
    """
    check_float("token_entropy", token_entropy, 2)
    B, T = token_entropy.shape
    check_float("advantages", advantages, 1)
    check_shape("advantages", advantages, (B,))
    check_mask("mask", mask, (B, T))
    check_int("step_ids", step_ids, 2)
    check_shape("step_ids", step_ids, (B, T))
    check_same_device(
        advantages=advantages, token_entropy=token_entropy, mask=mask, step_ids=step_ids
    )
    for name, value in (("k", k), ("k_f", k_f), ("zeta", zeta)):
        check_number(name, value)
    dtype = compute_dtype(token_entropy, advantages)
    ids = step_ids.to(torch.int64)
    beyond = ids >= T  # slot i * T + id would be the next row's
    if values_checkable(ids) and bool(beyond.any() | (ids < -1).any()):
        bad = int(ids.max()) if bool(beyond.any()) else int(ids.min())
        raise ValueError(f"step_ids must lie in [-1, T) = [-1, {T}), got {bad}")
    tok = valid(mask) & (ids >= 0) & ~beyond
    # Steps live in a [B, T] buffer (a row has at most T steps): slot (i, s) = step s of row i.
    slot = torch.where(beyond, 0, ids.clamp(min=0))
    flat = (torch.arange(B, device=ids.device)[:, None] * T + slot).reshape(-1)
    # The entropy weighs the advantage; no gradient flows back through it (an advantage is a
    # constant of the policy loss, and `token_stats(...).entropy` is differentiable).
    ent = torch.where(tok, token_entropy.detach().to(dtype), 0).reshape(-1)
    cnt = tok.to(dtype).reshape(-1)
    ent_sum = ent.new_zeros(B * T).index_add(0, flat, ent).view(B, T)
    n_tok = cnt.new_zeros(B * T).index_add(0, flat, cnt).view(B, T)
    exists = n_tok > 0
    H = ent_sum / torch.where(exists, n_tok, 1)
    h_min, h_max = masked_amin(H, exists), masked_amax(H, exists)
    Hn = (H - h_min) / (h_max - h_min + 1e-8)
    n_steps = exists.to(dtype).sum().clamp(min=1)
    e = torch.where(exists, torch.exp(-k * Hn), 0)
    # No step at all: e.sum() = 0, and 0/0 = NaN in g reached the advantages' gradient through
    # g * A (the where() below hides it in the value only). With a step, e.sum() >= 1: the
    # lowest-entropy step has H_n = 0, e = 1.
    e_mean = e.sum() / n_steps
    g = e / torch.where(e_mean != 0, e_mean, 1)
    f = torch.where(exists, torch.exp(-k_f * Hn), 0)
    # The bonus is f of the row's next step that exists (ids may skip a step whose tokens are all
    # masked, a tool output between two model steps), 0 after its last step: the smallest
    # existing slot after s, from a reverse running min over [B, T] (T: none).
    slots = torch.arange(T, device=ids.device).expand(B, T)
    first_from = torch.where(exists, slots, T).flip(1).cummin(1).values.flip(1)
    next_slot = torch.cat([first_from[:, 1:], first_from.new_full((B, 1), T)], dim=1)
    f_next = torch.cat([f, f.new_zeros(B, 1)], dim=1).gather(1, next_slot)
    a = torch.where(exists, g * advantages.to(dtype)[:, None] + zeta * f_next, 0)
    a = torch.where(exists, a - a.sum() / n_steps, 0)
    out = a.reshape(-1).gather(0, flat).view(B, T)
    return torch.where(tok, out, torch.where(beyond & valid(mask), float("nan"), 0))
