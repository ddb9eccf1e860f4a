"""pg_kernels.algorithms advantages: against loop references in float64, hand cases, properties."""

import math
import unittest.mock

import pytest
import torch

from pg_kernels.algorithms import (
    empg_advantages,
    group_advantages,
    otb_advantages,
    trloo_advantages,
    turns_to_tokens,
)

f64 = torch.float64


def _groups(ids):
    out = {}
    for i, g in enumerate(ids.tolist()):
        out.setdefault(g, []).append(i)
    return out


def ref_group(r, ids, method, eps=1e-6):
    r = r.tolist()
    out = [0.0] * len(r)
    for members in _groups(ids).values():
        n = len(members)
        mean = sum(r[i] for i in members) / n
        std = math.sqrt(sum((r[i] - mean) ** 2 for i in members) / (n - 1)) if n > 1 else 0.0
        for i in members:
            if method == "grpo":
                out[i] = (r[i] - mean) / (std + eps)
            elif method == "dr_grpo":
                out[i] = r[i] - mean
            else:
                others = [r[j] for j in members if j != i]
                out[i] = r[i] - sum(others) / len(others) if others else r[i]
    return torch.tensor(out, dtype=f64)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_vs_loop(method):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([7, -3, 7, 100, -3, 7, 5, 100, 7])  # arbitrary values, one singleton
    r = torch.randn(9, generator=g, dtype=f64)
    got = group_advantages(r, ids, method=method)
    assert got.dtype == f64
    torch.testing.assert_close(got, ref_group(r, ids, method), rtol=1e-12, atol=1e-12)


def test_group_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=f64)
    ids = torch.tensor([0, 0, 0, 0])
    # mean 0.5, unbiased std sqrt(1/3)
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(
        group_advantages(r, ids, eps=0.0), torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=f64) / s
    )
    # rloo: 1 - 1/3 = 2/3, 0 - 2/3
    torch.testing.assert_close(
        group_advantages(r, ids, method="rloo"),
        torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3], dtype=f64),
    )


def test_group_advantages_properties():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 5, (40,), generator=g)
    ids[0], ids[1] = 11, 12  # two singletons
    r = torch.randn(40, generator=g, dtype=f64)
    rloo = group_advantages(r, ids, method="rloo")
    for members in _groups(ids).values():
        if len(members) > 1:
            assert abs(float(rloo[members].sum())) < 1e-12
    assert rloo[0] == r[0] and rloo[1] == r[1]
    grpo = group_advantages(r, ids, eps=0.0)
    torch.testing.assert_close(group_advantages(3.0 * r - 7.0, ids, eps=0.0), grpo)
    assert grpo[0] == 0 and grpo[1] == 0  # singleton: 0, not NaN


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_equal_rewards_are_exactly_zero(method):
    # 16 fp32 rewards of 0.7: the fp32 mean is not 0.7, and grpo divided that rounding by a
    # std of the same size (|A| = 0.106); all-correct / all-wrong groups carry no signal.
    for dtype in (torch.float32, torch.bfloat16, f64):
        r = torch.tensor([0.7] * 16 + [0.3] * 5 + [1.0, 0.0], dtype=dtype)
        ids = torch.tensor([0] * 16 + [1] * 5 + [2, 2])
        got = group_advantages(r, ids, method=method)
        out = f64 if dtype == f64 else torch.float32  # docs/math.md §0: bf16 in, fp32 out
        assert got.dtype == out
        assert torch.equal(got[:21], torch.zeros(21, dtype=out)), (dtype, got)
        assert torch.all(got[21:] != 0)


def test_group_advantages_sum_in_float64():
    # bf16 rewards of a group of 300: summed in bf16 the advantages were off by up to 0.43
    # (bias -0.26); now the float64 computation rounded once (to fp32), for every method.
    g = torch.Generator().manual_seed(3)
    r = torch.rand(300, generator=g).to(torch.bfloat16)
    ids = torch.zeros(300, dtype=torch.int64)
    for method in ("grpo", "dr_grpo", "rloo"):
        want = ref_group(r.double(), ids, method).to(torch.float32)
        assert torch.equal(group_advantages(r, ids, method=method), want), method


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_group_advantages_gradient_is_finite(method):
    # One-member and equal-reward groups: sqrt's derivative at a zero variance was inf, and the
    # gradient NaN; their advantages are constants (0, or r under rloo's singleton).
    r = torch.tensor([1.0, 2.0, 0.5, 0.5, 3.0], dtype=f64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 2])
    w = torch.tensor([0.3, -1.2, 0.5, 0.7, 2.0], dtype=f64)
    (w * group_advantages(r, ids, method=method)).sum().backward()
    assert torch.isfinite(r.grad).all(), r.grad
    assert r.grad[4] == (2.0 if method == "rloo" else 0.0)
    # the two-member groups from the formula by autograd; grpo's equal pair has none (std 0)
    r2 = r.detach()[:4].clone().view(2, 2).requires_grad_(True)
    if method == "grpo":
        a = (r2 - r2.mean(1, keepdim=True)) / (r2.std(1, keepdim=True) + 1e-6)
    elif method == "dr_grpo":
        a = r2 - r2.mean(1, keepdim=True)
    else:
        a = r2 - r2.flip(1)
    (w[:4].view(2, 2) * a).sum().backward()
    want = r2.grad.flatten()
    if method == "grpo":
        want[2:] = 0
    torch.testing.assert_close(r.grad[:4], want, rtol=1e-12, atol=1e-12)


def test_group_advantages_errors():
    r = torch.zeros(4)
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(r, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(r, torch.zeros(4))
    with pytest.raises(TypeError, match="rewards"):
        group_advantages(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="method"):
        group_advantages(r, torch.zeros(4, dtype=torch.int64), method="ppo")
    with pytest.raises(ValueError, match="eps"):  # a negative eps: A = -inf / +inf at std = -eps
        group_advantages(r, torch.zeros(4, dtype=torch.int64), eps=-0.5)


def ref_otb(G, lgp, mask, ids, isw=None, zero_tail=False, eps=1e-8):
    B, T = lgp.shape
    if G.dim() == 1:
        G = G[:, None].expand(B, T)
    w = lgp * mask * (isw**2 if isw is not None else 1)
    W = torch.zeros(B, T, dtype=f64)
    for i in range(B):
        acc = 0.0
        for t in range(T):
            acc += float(w[i, t])
            W[i, t] = acc
    adv = torch.zeros(B, T, dtype=f64)
    for members in _groups(ids).values():
        lens = {i: float(mask[i].sum()) for i in members}
        n = sum(1 for i in members if bool((mask[i] != 0).any()))  # rows masked whole: none
        for t in range(T):
            num = sum(float(G[i, t] * W[i, t] * mask[i, t]) for i in members)
            den = sum(float(W[i, t] * mask[i, t]) for i in members)
            b = num / (den + eps) if n > 1 else 0.0
            for i in members:
                bi = b
                if zero_tail and n > 1:
                    srt = sorted(lens.values())
                    if lens[i] == srt[-1] and srt[-1] > srt[-2] and t >= srt[-2]:
                        bi = 0.0
                adv[i, t] = (G[i, t] - bi) * mask[i, t]
    return adv


@pytest.mark.parametrize("zero_tail", [False, True])
@pytest.mark.parametrize("token_returns", [False, True])
def test_otb_vs_loop(zero_tail, token_returns):
    g = torch.Generator().manual_seed(2)
    B, T = 9, 7
    ids = torch.tensor([3, 3, 3, 9, 9, 4, 4, 4, 8])
    lens = torch.tensor([7, 4, 2, 5, 5, 3, 6, 1, 4])
    mask = torch.arange(T)[None, :] < lens[:, None]
    lgp = torch.rand(B, T, generator=g, dtype=f64)
    G = torch.randn(B, T, generator=g, dtype=f64) if token_returns else torch.randn(B, dtype=f64)
    isw = torch.rand(B, T, generator=g, dtype=f64) + 0.5
    got = otb_advantages(G, lgp, mask, ids, is_weights=isw, handle_zero_tail=zero_tail)
    want = ref_otb(G, lgp, mask.to(f64), ids, isw, zero_tail)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_otb_constant_lgp_is_mean_baseline_per_position():
    # Equal lengths and constant lgp: W_t equal within the group, so B_t = mean_g G_t.
    g = torch.Generator().manual_seed(3)
    B, T = 8, 5
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    R = torch.randn(B, generator=g, dtype=f64)
    mask = torch.ones(B, T, dtype=torch.bool)
    got = otb_advantages(R, torch.full((B, T), 0.3, dtype=f64), mask, ids, eps=0.0)
    want = group_advantages(R, ids, method="dr_grpo")[:, None].expand(B, T)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_otb_singleton_and_hand_zero_tail():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=f64)
    lgp = torch.ones(3, 4, dtype=f64)
    R = torch.tensor([1.0, 0.0, 5.0], dtype=f64)
    ids = torch.tensor([0, 0, 1])
    # group 0: W = t+1 for both while valid; at t = 0,1 B = (1*W + 0*W) / 2W = 0.5; t >= 2
    # only row 0 left: B = 1 (no tail handling) or 0 (zero tail: second-longest length is 2).
    a = otb_advantages(R, lgp, mask, ids, eps=0.0)
    torch.testing.assert_close(a[0], torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=f64))
    torch.testing.assert_close(a[1], torch.tensor([-0.5, -0.5, 0.0, 0.0], dtype=f64))
    torch.testing.assert_close(a[2], torch.tensor([5.0, 5.0, 5.0, 0.0], dtype=f64))  # singleton
    z = otb_advantages(R, lgp, mask, ids, eps=0.0, handle_zero_tail=True)
    torch.testing.assert_close(z[0], torch.tensor([0.5, 0.5, 1.0, 1.0], dtype=f64))


@pytest.mark.parametrize("zero_tail", [False, True])
def test_otb_rows_masked_whole_are_no_members(zero_tail):
    """A row masked whole (batch padding) in a group changes no other row: with it, the group
    of one real row kept B = own return (A = 0) where alone it is a singleton (A = G m)."""
    g = torch.Generator().manual_seed(5)
    lgp, R = torch.rand(4, 5, generator=g, dtype=f64), torch.randn(4, generator=g, dtype=f64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    ids = torch.tensor([0, 0, 1, 1])
    got = otb_advantages(R, lgp, mask, ids, handle_zero_tail=zero_tail)
    keep = [0, 2, 3]
    alone = otb_advantages(R[keep], lgp[keep], mask[keep], ids[keep], handle_zero_tail=zero_tail)
    torch.testing.assert_close(got[keep], alone, rtol=0, atol=0)
    assert not got[1].any()
    torch.testing.assert_close(got[0], R[0] * mask[0].to(f64))  # a singleton: A = G m


def test_otb_ignores_padding_is_weights_and_counts_float_mask_lengths():
    """IS weights exp(old - rollout) are NaN / inf on padding whose log-probs are -inf: they
    must not reach the other rows of the group (NaN * 0 is NaN in the cumsum and group sums).
    A float mask weighs tokens but the zero-tail lengths count them."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    lgp, R, ids = (
        torch.ones(2, 3, dtype=f64),
        torch.tensor([1.0, 0.0], dtype=f64),
        torch.tensor([0, 0]),
    )
    clean = otb_advantages(R, lgp, mask, ids, is_weights=torch.ones(2, 3, dtype=f64))
    for junk in (float("nan"), float("inf")):
        isw = torch.ones(2, 3, dtype=f64)
        isw[1, 1:] = junk
        torch.testing.assert_close(otb_advantages(R, lgp, mask, ids, is_weights=isw), clean)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=f64)
    R3, ids3 = torch.tensor([1.0, 0.0, 5.0], dtype=f64), torch.tensor([0, 0, 1])
    lgp3 = torch.ones(3, 4, dtype=f64)
    hard = otb_advantages(R3, lgp3, mask, ids3, handle_zero_tail=True)
    soft = otb_advantages(R3, lgp3, mask * 0.5, ids3, handle_zero_tail=True)
    # the rows' baselines are alike (each group's weights scale together): zero at t >= 2 both
    torch.testing.assert_close(soft, hard * 0.5)


def test_otb_errors():
    m = torch.ones(2, 3, dtype=torch.bool)
    ids = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="returns"):
        otb_advantages(torch.zeros(3), torch.zeros(2, 3), m, ids)
    with pytest.raises(ValueError, match="mask"):
        otb_advantages(torch.zeros(2), torch.zeros(2, 3), m[:, :2], ids)
    with pytest.raises(TypeError, match="mask"):
        otb_advantages(torch.zeros(2), torch.zeros(2, 3), m.to(torch.complex64), ids)
    # an int64 mask (as HF attention masks) is accepted and equals the bool one
    lgp = torch.rand(2, 3)
    torch.testing.assert_close(
        otb_advantages(torch.ones(2), lgp, m.long(), ids),
        otb_advantages(torch.ones(2), lgp, m, ids),
    )
    with pytest.raises(ValueError, match="is_weights"):
        otb_advantages(torch.zeros(2), torch.zeros(2, 3), m, ids, is_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="eps"):
        otb_advantages(torch.zeros(2), torch.zeros(2, 3), m, ids, eps=float("nan"))


def ref_trloo(r, tm, ids, gamma):
    B, K = r.shape
    G = torch.zeros(B, K, dtype=f64)
    for i in range(B):
        acc = 0.0
        for t in reversed(range(K)):
            if tm[i, t]:
                acc = float(r[i, t]) + gamma * acc
                G[i, t] = acc
    A = torch.zeros(B, K, dtype=f64)
    for members in _groups(ids).values():
        for t in range(K):
            for i in members:
                if not tm[i, t]:
                    continue
                others = [float(G[j, t]) for j in members if j != i and tm[j, t]]
                A[i, t] = G[i, t] - (sum(others) / len(others) if others else 0.0)
    return A


def test_trloo_vs_loop_and_hand():
    g = torch.Generator().manual_seed(4)
    B, K = 7, 4
    ids = torch.tensor([1, 1, 1, 2, 2, 3, 1])
    tm = torch.rand(B, K, generator=g) > 0.3  # holes included
    r = torch.randn(B, K, generator=g, dtype=f64)
    for gamma in (1.0, 0.7):
        got = trloo_advantages(r, tm, ids, gamma=gamma)
        torch.testing.assert_close(got, ref_trloo(r, tm, ids, gamma), rtol=1e-12, atol=1e-12)
    # hand case, gamma 0.5: G = [1 + 0.5 * 2, 2] = [2, 2] and [0 + 0.5 * 4, 4] = [2, 4]
    r2 = torch.tensor([[1.0, 2.0], [0.0, 4.0]], dtype=f64)
    a = trloo_advantages(r2, torch.ones(2, 2), torch.tensor([0, 0]), gamma=0.5)
    torch.testing.assert_close(a, torch.tensor([[0.0, -2.0], [0.0, 2.0]], dtype=f64))
    # a hole: row 0's turn 1 invalid, so turn 0 discounts turn 2 by one step; at turn 1 row 1
    # has no other member: A = its own return
    r3 = torch.tensor([[1.0, 9.0, 2.0], [1.0, 3.0, 0.0]], dtype=f64)
    tm3 = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    a3 = trloo_advantages(r3, tm3, torch.tensor([5, 5]), gamma=0.5)
    # G0 = [1 + 0.5 * 2, -, 2] = [2, -, 2]; G1 = [1 + 0.5 * 3, 3, 0] = [2.5, 3, 0]
    torch.testing.assert_close(a3, torch.tensor([[-0.5, 0.0, 2.0], [0.5, 3.0, -2.0]], dtype=f64))


def test_turns_to_tokens():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=f64)
    ids = torch.tensor([[-1, 0, 0, 1, -1, 2], [2, 2, -1, -1, 0, 1]])
    want = torch.tensor([[0, 1, 1, 2, 0, 3], [6, 6, 0, 0, 4, 5]], dtype=f64)
    torch.testing.assert_close(turns_to_tokens(v, ids), want)
    with pytest.raises(ValueError, match="turn_ids"):
        turns_to_tokens(v, ids[:1])
    # No turns at all (K = 0): zeros, still in turn_values' graph; an id >= 0 then is refused
    v0 = torch.zeros(2, 0, dtype=f64, requires_grad=True)
    none = torch.full((2, 4), -1)
    out = turns_to_tokens(v0, none)
    assert torch.equal(out, torch.zeros(2, 4, dtype=f64))
    assert torch.autograd.grad(out.sum(), v0)[0].shape == (2, 0)
    with pytest.raises(ValueError, match="turn_ids"):
        turns_to_tokens(v0, torch.zeros(2, 4, dtype=torch.int64))
    # An id below -1 is refused (it read as -1: a token silently outside every turn)
    with pytest.raises(ValueError, match="turn_ids"):
        turns_to_tokens(v, torch.where(ids == -1, -2, ids))


def ref_empg(A, H, mask, sid, k, kf, zeta):
    B, T = H.shape
    steps = {}  # (i, s) -> list of token entropies
    for i in range(B):
        for t in range(T):
            if mask[i, t] and sid[i, t] >= 0:
                steps.setdefault((i, int(sid[i, t])), []).append(float(H[i, t]))
    Hs = {key: sum(v) / len(v) for key, v in steps.items()}
    lo, hi = min(Hs.values()), max(Hs.values())
    Hn = {key: (h - lo) / (hi - lo + 1e-8) for key, h in Hs.items()}
    mean_e = sum(math.exp(-k * h) for h in Hn.values()) / len(Hn)
    a = {}
    for (i, s), h in Hn.items():
        # the row's next step that exists (a step whose tokens are all masked is skipped)
        later = [r for (j, r) in Hn if j == i and r > s]
        bonus = zeta * math.exp(-kf * Hn[(i, min(later))]) if later else 0.0
        a[(i, s)] = math.exp(-k * h) / mean_e * float(A[i]) + bonus
    mean_a = sum(a.values()) / len(a)
    out = torch.zeros(B, T, dtype=f64)
    for i in range(B):
        for t in range(T):
            if mask[i, t] and sid[i, t] >= 0:
                out[i, t] = a[(i, int(sid[i, t]))] - mean_a
    return out


def test_empg_vs_loop():
    g = torch.Generator().manual_seed(5)
    B, T = 4, 9
    sid = torch.tensor(
        [
            [0, 0, 1, 1, 1, 2, -1, -1, -1],
            [-1, 0, 0, -1, 1, 1, 1, 2, 3],
            [0, 1, 2, 3, 4, 5, 6, 7, 8],
            [0, 0, 0, 0, 0, -1, -1, -1, -1],
        ]
    )
    mask = torch.rand(B, T, generator=g) > 0.15
    H = torch.rand(B, T, generator=g, dtype=f64) * 3
    A = torch.randn(B, generator=g, dtype=f64)
    got = empg_advantages(A, H, mask, sid, k=1.3, k_f=0.7, zeta=0.2)
    torch.testing.assert_close(
        got, ref_empg(A, H, mask, sid, 1.3, 0.7, 0.2), rtol=1e-10, atol=1e-12
    )
    # the step advantages (one per existing step) are centred
    steps = {
        (i, int(sid[i, t])): float(got[i, t])
        for i in range(B)
        for t in range(T)
        if mask[i, t] and sid[i, t] >= 0
    }
    assert abs(sum(steps.values())) < 1e-10


def test_empg_bonus_skips_a_step_without_tokens():
    """The bonus is f of the row's next step that exists: step ids that count a masked tool
    message (a step with no valid token) give what the ids without it give. It was f of slot
    s + 1, 0 there: step 0's bonus lost (0.4621 instead of 0.4805)."""
    A = torch.tensor([1.0, -0.5], dtype=f64)
    H = torch.tensor([[0.2, 0.2, 9.9, 9.9, 1.0, 1.0], [0.5, 2.0, 2.0, 0.1, 0.1, 0.1]], dtype=f64)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1]])
    sid = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 2]])
    renumbered = torch.tensor([[0, 0, -1, -1, 1, 1], [0, 1, 1, 2, 2, 2]])
    got = empg_advantages(A, H, mask, sid)
    torch.testing.assert_close(got, empg_advantages(A, H, mask, renumbered), rtol=0, atol=1e-15)
    torch.testing.assert_close(got, ref_empg(A, H, mask, sid, 1.0, 1.0, 0.1), rtol=0, atol=1e-15)
    one = empg_advantages(A[:1], H[:1], mask[:1], sid[:1])  # the single row of the report
    assert abs(float(one[0, 0]) - 0.48051112463320833) < 1e-12


def test_empg_takes_the_entropy_detached():
    # token_stats' entropy is differentiable; the advantage it modulates is a constant of the
    # policy loss, so no gradient reaches the entropy (it bent a PPO gradient by ~6 %).
    g = torch.Generator().manual_seed(6)
    H = (torch.rand(2, 5, generator=g, dtype=f64) * 3).requires_grad_(True)
    A = torch.randn(2, generator=g, dtype=f64, requires_grad=True)
    sid = torch.tensor([[0, 0, 1, 1, 2], [0, 1, 1, 2, 2]])
    got = empg_advantages(A, H, torch.ones(2, 5, dtype=torch.bool), sid)
    assert got.requires_grad  # through A: advantages stay differentiable w.r.t. their input
    got.sum().backward()
    assert H.grad is None
    assert torch.isfinite(A.grad).all()


@pytest.mark.parametrize("case", ["all masked", "no step ids"])
def test_empg_without_a_step_has_zero_gradient(case):
    # No step in the batch: g = e / (sum e / n_steps) was 0/0; the value was hidden by a where(),
    # but NaN reached the advantages' gradient through g * A.
    A = torch.tensor([1.0, -1.0], dtype=f64, requires_grad=True)
    H = torch.rand(2, 4, dtype=f64)
    if case == "all masked":
        mask, sid = torch.zeros(2, 4, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.int64)
    else:
        mask, sid = torch.ones(2, 4, dtype=torch.bool), torch.full((2, 4), -1)
    out = empg_advantages(A, H, mask, sid)
    (3.0 * out).sum().backward()
    assert out.tolist() == [[0.0] * 4] * 2
    assert A.grad.tolist() == [0.0, 0.0]


def _low_precision_case(name, dtype):
    """(function, inputs rounded to dtype): float inputs are rounded once, ints and masks kept."""
    g = torch.Generator().manual_seed(11)

    def rnd(t):
        return t.to(dtype)

    if name == "group":
        ids = torch.tensor([0] * 300 + [1] * 7 + [2] * 2)
        return (lambda r: group_advantages(r, ids)), (rnd(torch.rand(309, generator=g)),)
    if name == "otb":
        B, T = 4, 2048
        lgp = rnd(torch.rand(B, T, generator=g, dtype=f64) * 0.9 + 0.05)
        isw = rnd(torch.rand(B, T, generator=g, dtype=f64) + 0.5)
        R = rnd(torch.tensor([1.0, 0.0, 0.0, 1.0]))
        mask = torch.arange(T)[None] < torch.tensor([2048, 1500, 700, 1800])[:, None]
        ids = torch.zeros(B, dtype=torch.int64)

        def otb(R, lgp, isw):
            return otb_advantages(R, lgp, mask, ids, is_weights=isw)

        return otb, (R, lgp, isw)
    if name == "trloo":
        tm = torch.rand(6, 5, generator=g) > 0.2
        ids = torch.tensor([0, 0, 0, 1, 1, 1])
        r = rnd(torch.rand(6, 5, generator=g, dtype=f64) * 3)
        return (lambda r: trloo_advantages(r, tm, ids, gamma=0.9)), (r,)
    # empg: a step of 2048 tokens (bf16 index_add of its token count stalled at 256) and short ones
    T = 2048
    H = rnd(torch.rand(3, T, generator=g, dtype=f64) * 3)
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[0], mask[1:, :6] = True, True
    sid = torch.zeros(3, T, dtype=torch.int64)
    sid[1:, 3:] = 1
    A = rnd(torch.tensor([1.0, -1.0, 0.5]))
    return (lambda A, H: empg_advantages(A, H, mask, sid)), (A, H)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["group", "otb", "trloo", "empg"])
def test_advantages_low_precision_match_float64(name, dtype):
    # bf16 / fp16 inputs are computed in fp32 (docs/math.md §0): the float64 answer for the same
    # rounded inputs, to within fp32 rounding (sums of up to 2048 terms: 64 ulp of the largest
    # value), and returned in fp32. In the input dtype, bf16 OTB was off by 6e-3 and EMPG by 0.5.
    fn, args = _low_precision_case(name, dtype)
    got = fn(*args)
    want = fn(*(a.double() for a in args))
    err = float((got.double() - want).abs().max())
    assert err <= 64 * 2**-24 * float(want.abs().max()), err
    assert want.dtype == f64 and got.dtype == torch.float32


def test_empg_step_ids_beyond_T():
    """slot i * T + id: a step id >= T would join row i + 1's step. CPU refuses it; the same
    kernel, as a GPU runs it (the check skipped), gives its token NaN and leaves row i + 1 as
    without it."""
    A = torch.tensor([1.0, -1.0], dtype=f64)
    H = torch.rand(2, 4, generator=torch.Generator().manual_seed(3), dtype=f64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    sid = torch.tensor([[0, 0, 1, 4], [0, 1, 1, 2]])
    with pytest.raises(ValueError, match=r"step_ids must lie in \[-1, T\)"):
        empg_advantages(A, H, mask, sid)
    with unittest.mock.patch.object(torch.compiler, "is_compiling", return_value=True):
        got = empg_advantages(A, H, mask, sid)
    mask_without = mask.clone()
    mask_without[0, 3] = False
    want = empg_advantages(A, H, mask_without, sid.clamp(max=3))
    assert torch.isnan(got[0, 3]) and torch.equal(got[1], want[1])
    assert torch.equal(got[0, :3], want[0, :3])


def test_empg_errors():
    ids = torch.zeros(2, 3, dtype=torch.long)
    args = (torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), ids)
    for name in ("k", "k_f", "zeta"):
        with pytest.raises(ValueError, match=name):
            empg_advantages(*args, **{name: float("nan")})
        with pytest.raises(TypeError, match=name):
            empg_advantages(*args, **{name: "1"})
    with pytest.raises(ValueError, match="step_ids"):
        empg_advantages(
            torch.zeros(2),
            torch.zeros(2, 3),
            torch.ones(2, 3),
            torch.zeros(2, 2, dtype=torch.int64),
        )
    for bad in (-2, 3):  # outside [-1, T): below -1 read as -1 before, >= T another row's step
        with pytest.raises(ValueError, match=f"step_ids.*got {bad}"):
            empg_advantages(*args[:3], torch.full((2, 3), bad, dtype=torch.int64))
    with pytest.raises(ValueError, match="advantages"):
        empg_advantages(
            torch.zeros(3),
            torch.zeros(2, 3),
            torch.ones(2, 3),
            torch.zeros(2, 3, dtype=torch.int64),
        )
