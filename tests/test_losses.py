"""pg_kernels.algorithms masks and losses: loop references in float64, gradients, properties."""

import math

import pytest
import torch

from pg_kernels.algorithms import (
    geometric_rejection,
    hybrid_il_rl_loss,
    policy_loss,
    trm_mask,
)

f64 = torch.float64


# ----------------------------------------------------------------------------- masks


def test_trm_exact_and_sampled_modes():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    kl = torch.tensor(
        [
            [0.0, 0.001, 0.0005, 9.0],  # under both thresholds (9.0 is masked)
            [0.06, 0.0, 0.0, 0.0],  # max 0.06 > 0.05
            [0.002, 0.002, 0.0, 0.0],  # mean 0.001 == avg threshold: kept (<=)
            [1.0, 1.0, 1.0, 1.0],  # no valid token: kept
            [0.0, float("nan"), 0.0, 0.0],  # NaN on a valid token: rejected
        ],
        dtype=f64,
    )
    got = trm_mask(mask, token_kl=kl)
    assert got.dtype == torch.bool
    assert got.tolist() == [True, False, True, True, False]
    # sampled mode: k2 drives the max rule, k3 the mean rule
    k2 = torch.zeros(2, 3, dtype=f64)
    k3 = torch.zeros(2, 3, dtype=f64)
    k2[0, 1] = 0.051
    k3[1, 2] = 0.0031  # mean over 3 tokens 0.00103 > 0.001
    assert trm_mask(torch.ones(2, 3), k2=k2, k3=k3).tolist() == [False, False]
    assert trm_mask(torch.ones(2, 3), k2=k3, k3=k2 * 0).tolist() == [True, True]
    nan_masked = torch.tensor([[0.0, float("nan")]], dtype=f64)
    assert trm_mask(torch.tensor([[True, False]]), token_kl=nan_masked).tolist() == [True]


def test_trm_errors():
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="token_kl"):
        trm_mask(m)
    with pytest.raises(ValueError, match="token_kl"):
        trm_mask(m, token_kl=torch.zeros(2, 3), k2=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="k2 and k3"):
        trm_mask(m, k2=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="k3"):
        trm_mask(m, k2=torch.zeros(2, 3), k3=torch.zeros(2, 4))
    for name in ("max_threshold", "avg_threshold"):
        with pytest.raises(ValueError, match=name):
            trm_mask(m, token_kl=torch.zeros(2, 3), **{name: -0.01})
    with pytest.raises(TypeError, match="mask"):  # not an AttributeError on .dim()
        trm_mask([[1.0, 0.0]], token_kl=torch.zeros(1, 2))


def test_geometric_rejection_hand_cases():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    lr = torch.tensor(
        [
            [0.0005, -0.0005, 50.0],  # geo mean 1, the 50 is masked: keep
            [0.003, 0.0, 0.0],  # exp(0.001) = 1.0010005 > 1.001: reject
            [10.0, -10.0, 0.0],  # mean 0 but exp(-10) < 1e-4: vetoed
            [5.0, 5.0, 5.0],  # no valid token: keep
            [float("nan"), 0.0, 0.0],  # NaN: reject
        ],
        dtype=f64,
    )
    assert geometric_rejection(lr, mask).tolist() == [True, False, False, True, False]
    # +-30 average to 0; with veto off the row is kept
    lr2 = torch.tensor([[30.0, -30.0]], dtype=f64)
    assert geometric_rejection(lr2, torch.ones(1, 2), veto=0.0).tolist() == [True]
    assert geometric_rejection(lr2, torch.ones(1, 2), veto=0.0, clamp=40.0).tolist() == [True]
    assert geometric_rejection(lr2, torch.ones(1, 2)).tolist() == [False]
    # A reversed band (every row rejected), a negative veto or a clamp of 0 are refused
    for bad in (dict(low=1.001, high=0.999), dict(veto=-1.0), dict(clamp=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            geometric_rejection(lr2, torch.ones(1, 2), **bad)
    # The clamp bounds the mean, not each token: one delta of +45 among 24999 tiny ones is a
    # mean of 1.8e-3 (exp 1.0018 > 1.001: reject); clamped to 20 first it was 8e-4 (kept).
    lr3 = torch.zeros(1, 25000, dtype=f64)
    lr3[0, 0] = 45.0
    assert 1.001 < math.exp(float(lr3.mean())) and math.exp(20.0 / 25000) < 1.001
    assert geometric_rejection(lr3, torch.ones(1, 25000)).tolist() == [False]
    # A mean beyond the clamp stays finite: rejected, not NaN
    lr4 = torch.tensor([[1e6, float("inf")]], dtype=f64)
    assert geometric_rejection(lr4, torch.ones(1, 2), veto=0.0).tolist() == [False]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masks_low_precision_decide_as_float64(dtype):
    # Computed in the input dtype, bf16 rounded exp(mean 0.003) (and any mean in about
    # [-0.0019, 0.0039]) to exactly 1.0 and kept the row; fp16 did so for 0.0012. TRM compared
    # bf16(0.05) = 0.05005 with a threshold rounded to bf16 too: kept. Truth: the float64
    # decision on the same rounded inputs.
    ok8 = torch.ones(1, 8, dtype=torch.bool)
    for v in (0.0012, 0.0014, 0.003, -0.0015, 0.0005, -0.0005):
        x = torch.full((1, 8), v, dtype=dtype)
        want = 0.999 <= math.exp(float(x.double().mean())) <= 1.001
        assert geometric_rejection(x, ok8).tolist() == [want], (v, want)
    # k2 / k3 at the thresholds' own roundings: above 0.05 / 0.001 in float64, so rejected
    for k2, k3 in ((0.05, 0.0), (0.0, 0.001)):
        d2, d3 = torch.full((1, 8), k2, dtype=dtype), torch.full((1, 8), k3, dtype=dtype)
        want = float(d2[0, 0]) <= 0.05 and float(d3[0, 0]) <= 0.001
        assert trm_mask(ok8, k2=d2, k3=d3).tolist() == [want], (k2, k3, want)
        want = float(d3[0, 0]) <= 0.001  # exact mode: token_kl drives both rules
        assert trm_mask(ok8, token_kl=d3).tolist() == [want], (k3, want)


# ----------------------------------------------------------------------------- policy_loss


def _inputs(B=5, T=6, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=dtype) * 2
    old = lp + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    roll = old + 0.4 * torch.randn(B, T, generator=g, dtype=dtype)
    old[:, 0] = lp[:, 0] - 1.5  # ratio 4.5: rows with A < 0 reach the dual clip
    adv = torch.randn(B, generator=g, dtype=dtype)
    lens = torch.tensor([6, 3, 1, 0, 5])[:B]
    mask = torch.arange(T)[None, :] < lens[:, None]
    return lp, old, roll, adv, mask


def ref_policy_loss(lp, old, adv, mask, *, loss_type="ppo", clip_low=0.2, clip_high=0.28,
                    dual_clip=None, agg="token-mean", seq_mask=None, roll=None,
                    correction=None, tis_cap=2.0, ic_lo=0.5, ic_hi=2.0):  # fmt: skip
    """Straightforward per-token loops (autograd flows through lp)."""
    B, T = lp.shape
    if adv.dim() == 1:
        adv = adv[:, None].expand(B, T)
    rows = []
    for i in range(B):
        n = int(mask[i].sum())
        seq_log = sum(lp[i, t] - old[i, t] for t in range(T) if mask[i, t]) / max(n, 1)
        toks = []
        for t in range(T):
            if not mask[i, t]:
                toks.append(None)
                continue
            a = adv[i, t]
            if loss_type == "gspo":
                r = torch.exp(seq_log.detach() + lp[i, t] - lp[i, t].detach())
            else:
                r = torch.exp(lp[i, t] - old[i, t])
            rc = torch.clamp(r, 1 - clip_low, 1 + clip_high)
            if loss_type == "cispo":
                loss_t = -rc.detach() * a * lp[i, t]
            else:
                loss_t = torch.maximum(-a * r, -a * rc)
                if dual_clip is not None and a < 0:
                    loss_t = torch.minimum(loss_t, -dual_clip * a)
            if correction is not None:
                rho = math.exp(float(old[i, t] - roll[i, t]))
                wt = (
                    min(rho, tis_cap)
                    if correction == "tis"
                    else (rho if ic_lo <= rho <= ic_hi else 0.0)
                )
                loss_t = loss_t * wt
            if seq_mask is not None and not seq_mask[i]:
                loss_t = loss_t * 0.0
            toks.append(loss_t)
        rows.append(toks)
    flat = [x for row in rows for x in row if x is not None]
    zero = lp.sum() * 0
    if agg == "token-mean":
        return sum(flat, zero) / max(len(flat), 1)
    if agg == "seq-mean-token-sum":
        return sum((sum([x for x in row if x is not None], zero) for row in rows), zero) / B
    if agg == "seq-mean-token-mean":
        per = []
        for row in rows:
            toks = [x for x in row if x is not None]
            per.append(sum(toks, zero) / len(toks) if toks else zero)
        return sum(per, zero) / B
    return sum(flat, zero) / (B * T)


CASES = [
    dict(loss_type="ppo"),
    dict(loss_type="ppo", dual_clip=3.0),
    dict(loss_type="ppo", agg="seq-mean-token-sum"),
    dict(loss_type="ppo", agg="seq-mean-token-mean", correction="tis"),
    dict(loss_type="ppo", agg="seq-mean-token-sum-norm", correction="icepop"),
    dict(loss_type="gspo", agg="seq-mean-token-mean", clip_low=0.05, clip_high=0.05),
    dict(loss_type="gspo", dual_clip=2.0),
    dict(loss_type="cispo", clip_low=0.1, clip_high=0.1),
    dict(loss_type="cispo", agg="seq-mean-token-mean", correction="tis"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("token_adv", [False, True])
def test_policy_loss_value_and_grad_vs_loop(case, token_adv):
    lp, old, roll, adv, mask = _inputs()
    if token_adv:
        adv = adv[:, None] + 0.5 * torch.randn(
            lp.shape, dtype=f64, generator=torch.Generator().manual_seed(9)
        )
    seq_mask = torch.tensor([True, False, True, True, True])
    kw = {k: v for k, v in case.items() if k != "correction"}
    lp1 = lp.clone().requires_grad_(True)
    got, metrics = policy_loss(
        lp1, old, adv, mask, seq_mask=seq_mask, rollout_logprob=roll,
        rollout_correction=case.get("correction"), **kw,
    )  # fmt: skip
    got.backward()
    lp2 = lp.clone().requires_grad_(True)
    want = ref_policy_loss(
        lp2, old, adv, mask, seq_mask=seq_mask, roll=roll, correction=case.get("correction"),
        **{k: v for k, v in kw.items()},
    )  # fmt: skip
    want.backward()
    assert got.dtype == f64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-14)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert float(metrics["kept_fraction"]) == 0.8
    if case.get("dual_clip") and case["loss_type"] == "ppo" and not token_adv:
        assert float(metrics["dual_clip_fraction"]) > 0  # the dual clip was exercised


def test_policy_loss_ppo_hand_case():
    # one token, A = 1, ratio 1.5 > 1 + 0.28: clipped, loss -1.28, zero gradient
    lp = torch.tensor([[math.log(1.5)]], dtype=f64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=f64)
    loss, m = policy_loss(lp, old, torch.ones(1, dtype=f64), torch.ones(1, 1))
    loss.backward()
    assert abs(float(loss.detach()) + 1.28) < 1e-12 and float(lp.grad) == 0.0
    assert float(m["clip_fraction"]) == 1.0 and abs(float(m["ratio_max"]) - 1.5) < 1e-12
    # A = -1, ratio 5: ppo loss max(5, 1.28) = 5; dual clip c = 3 caps it at 3 (zero grad)
    lp = torch.tensor([[math.log(5.0)]], dtype=f64, requires_grad=True)
    loss, _ = policy_loss(lp, old, -torch.ones(1, dtype=f64), torch.ones(1, 1))
    assert abs(float(loss.detach()) - 5.0) < 1e-12
    loss, m = policy_loss(lp, old, -torch.ones(1, dtype=f64), torch.ones(1, 1), dual_clip=3.0)
    loss.backward()
    assert abs(float(loss.detach()) - 3.0) < 1e-12 and float(lp.grad) == 0.0
    assert float(m["dual_clip_fraction"]) == 1.0


def test_gspo_gradient_formula():
    # unclipped GSPO with seq-mean-token-mean: grad of l_{i,t} = -A_i s_i / (|y_i| B)
    lp, old, _, adv, mask = _inputs(seed=3)
    old = lp + 0.01 * torch.randn(lp.shape, dtype=f64, generator=torch.Generator().manual_seed(1))
    lp = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(
        lp,
        old,
        adv,
        mask,
        loss_type="gspo",
        clip_low=10.0,
        clip_high=10.0,
        agg="seq-mean-token-mean",
    )
    loss.backward()
    B = lp.shape[0]
    n = mask.sum(1).clamp(min=1).to(f64)
    s = torch.exp(((lp.detach() - old) * mask).sum(1) / n)
    want = torch.where(mask, (-adv * s / (n * B))[:, None].expand_as(lp), 0)
    torch.testing.assert_close(lp.grad, want, rtol=1e-12, atol=1e-15)
    # the loss value is -mean_i s_i A_i (rows without tokens add 0)
    torch.testing.assert_close(loss, -(torch.where(mask.any(1), s * adv, 0)).sum() / B)


def test_seq_mask_normalisers_count_rejected_rows():
    lp, old, _, adv, mask = _inputs(seed=4)
    keep = torch.tensor([True, False, True, True, True])
    for agg in (
        "token-mean",
        "seq-mean-token-sum",
        "seq-mean-token-mean",
        "seq-mean-token-sum-norm",
    ):
        full, _ = policy_loss(lp, old, adv, mask, agg=agg)
        # zero the rejected row's advantage instead: the same tokens contribute nothing, and
        # every normaliser is unchanged, so the two losses must agree
        adv0 = torch.where(keep, adv, 0)
        want, _ = policy_loss(lp, old, adv0, mask, agg=agg)
        got, _ = policy_loss(lp, old, adv, mask, agg=agg, seq_mask=keep)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
        assert not torch.allclose(got, full)
    # token-mean divides by all valid tokens (15), not by the kept ones (12)
    ones = torch.zeros_like(lp)
    got, _ = policy_loss(
        ones, ones, torch.ones(5, dtype=f64), mask, seq_mask=keep, clip_low=0.0, clip_high=0.0
    )
    assert abs(float(got) - (-(6 + 1 + 0 + 5) / 15)) < 1e-12


def test_rollout_correction_weights_are_detached():
    lp, old, roll, adv, mask = _inputs(seed=5)
    old = old.clone().requires_grad_(True)
    roll = roll.clone().requires_grad_(True)
    lp = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(
        lp, old, adv, mask, loss_type="cispo", rollout_logprob=roll, rollout_correction="tis"
    )
    loss.backward()
    assert roll.grad is None or torch.count_nonzero(roll.grad) == 0
    assert old.grad is None or torch.count_nonzero(old.grad) == 0  # cispo's IS weight is sg too
    assert torch.count_nonzero(lp.grad) > 0


@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo"])
def test_policy_loss_takes_advantages_and_old_logprob_as_constants(loss_type):
    # An advantage built from a differentiable statistic (empg_advantages of token_stats'
    # entropy) and old_logprob passed without .detach() sent gradient back through them.
    lp, old, _, adv, mask = _inputs(seed=8)
    lp1 = lp.clone().requires_grad_(True)
    src = adv.clone().requires_grad_(True)
    old1 = old.clone().requires_grad_(True)
    loss, _ = policy_loss(lp1, old1, src * 1.0, mask, loss_type=loss_type, dual_clip=None)
    loss.backward()
    assert src.grad is None and old1.grad is None
    lp2 = lp.clone().requires_grad_(True)
    want, _ = policy_loss(lp2, old, adv, mask, loss_type=loss_type)
    want.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=0, atol=0)
    # old_logprob = logprob itself (on-policy, not detached): the ratio's gradient is lp's
    lp3 = lp.clone().requires_grad_(True)
    on, _ = policy_loss(lp3, lp3, adv, mask, loss_type=loss_type)
    on.backward()
    lp4 = lp.clone().requires_grad_(True)
    on_ref, _ = policy_loss(lp4, lp.clone(), adv, mask, loss_type=loss_type)
    on_ref.backward()
    torch.testing.assert_close(lp3.grad, lp4.grad, rtol=0, atol=0)
    assert torch.count_nonzero(lp3.grad) > 0


@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo", "hybrid"])
def test_masked_garbage_stays_out_of_the_gradient(loss_type):
    # NaN advantages and -inf log-probs on masked tokens (padding): 0 * NaN was a NaN gradient
    # for gspo, cispo and the hybrid loss. The gradient equals that of clean inputs.
    lp, old, _, _, mask = _inputs(seed=9)
    g = torch.Generator().manual_seed(9)
    adv = torch.randn(lp.shape, generator=g, dtype=f64)
    dirty_adv = torch.where(mask, adv, torch.nan)
    dirty_lp = torch.where(mask, lp, -torch.inf)
    kl = torch.rand(lp.shape, generator=g, dtype=f64)

    def grad(x, a):
        x = x.clone().requires_grad_(True)
        if loss_type == "hybrid":
            loss = hybrid_il_rl_loss(x, a, kl, mask, beta=0.2)
        else:
            loss, _ = policy_loss(x, old, a, mask, loss_type=loss_type)
        loss.backward()
        return loss.detach(), x.grad

    loss_d, g_d = grad(dirty_lp, dirty_adv)
    loss_c, g_c = grad(lp, adv)
    assert torch.isfinite(g_d).all(), g_d
    assert torch.equal(g_d, g_c) and torch.equal(loss_d, loss_c)
    assert torch.equal(g_d[~mask], torch.zeros_like(g_d[~mask]))


@pytest.mark.parametrize("junk", ["rollout", "advantage", "old"])
def test_rejected_rows_take_no_gradient_whatever_their_values(junk):
    # trm_mask rejects a row whose valid token holds a NaN; its NaN then met a zero upstream
    # gradient through the TIS weight (or the advantage, the ratio) and made lp.grad NaN.
    lp, old, roll, adv, _ = _inputs(seed=10)
    mask = torch.ones_like(lp, dtype=torch.bool)
    keep = torch.tensor([True, False, True, True, True])
    dirty = {"rollout": roll.clone(), "advantage": adv.clone(), "old": old.clone()}
    if junk == "advantage":
        dirty[junk][1] = torch.nan
    else:
        dirty[junk][1, 2] = torch.nan

    def grad(r, a, o):
        x = lp.clone().requires_grad_(True)
        loss, metrics = policy_loss(
            x, o, a, mask, seq_mask=keep, rollout_logprob=r, rollout_correction="tis"
        )
        loss.backward()
        return loss.detach(), x.grad

    loss_d, g_d = grad(dirty["rollout"], dirty["advantage"], dirty["old"])
    loss_c, g_c = grad(roll, adv, old)
    assert torch.equal(g_d, g_c) and torch.equal(loss_d, loss_c), g_d
    assert torch.equal(g_d[1], torch.zeros_like(g_d[1]))


def test_seq_mask_is_a_flag_not_a_weight():
    lp, old, _, adv, mask = _inputs(seed=11)
    flag = torch.tensor([True, False, True, True, True])
    soft = torch.tensor([0.5, 0.0, 2.0, 1.0, 1.0], dtype=f64)
    for agg in ("token-mean", "seq-mean-token-mean"):
        want, mw = policy_loss(lp, old, adv, mask, agg=agg, seq_mask=flag)
        got, mg = policy_loss(lp, old, adv, mask, agg=agg, seq_mask=soft)
        assert torch.equal(got, want) and torch.equal(mg["kept_fraction"], mw["kept_fraction"])


def test_gspo_clamps_the_sequence_mean_not_each_token():
    # s_i = exp(clamp(mean_t(l - l_old), +-20)): a token at -30 and one at 0 give exp(-15);
    # clamping each token first gave exp(-10).
    lp = torch.tensor([[-31.0, -1.0]], dtype=f64)
    old = torch.tensor([[-1.0, -1.0]], dtype=f64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, m = policy_loss(lp, old, torch.ones(1, dtype=f64), mask, loss_type="gspo")
    torch.testing.assert_close(m["ratio_min"], torch.tensor(math.exp(-15.0), dtype=f64))


def test_dr_grpo_norm_length_is_a_constant_normaliser():
    lp, old, _, adv, mask = _inputs(seed=12)
    T = lp.shape[1]
    base, _ = policy_loss(lp, old, adv, mask, agg="seq-mean-token-sum-norm")
    got, _ = policy_loss(lp, old, adv, mask, agg="seq-mean-token-sum-norm", norm_length=4 * T)
    torch.testing.assert_close(got, base / 4, rtol=1e-14, atol=0)
    # padding the batch further does not change it with a fixed norm_length
    pad = (0, 3)
    padded, _ = policy_loss(
        torch.nn.functional.pad(lp, pad), torch.nn.functional.pad(old, pad), adv,
        torch.nn.functional.pad(mask, pad), agg="seq-mean-token-sum-norm", norm_length=4 * T,
    )  # fmt: skip
    torch.testing.assert_close(padded, got, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="norm_length"):
        policy_loss(lp, old, adv, mask, norm_length=0)


@pytest.mark.parametrize("shape", [(3, 0), (0, 4)], ids=["T=0", "B=0"])
def test_empty_batches_give_zero_loss(shape):
    z = torch.zeros(shape, dtype=f64, requires_grad=True)
    mask = torch.ones(shape, dtype=torch.bool)
    adv = torch.zeros(shape[0], dtype=f64)
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                "seq-mean-token-sum-norm"):  # fmt: skip
        loss, metrics = policy_loss(z, z.detach(), adv, mask, agg=agg)
        assert float(loss.detach()) == 0.0, agg
        assert float(metrics["ratio_min"]) == math.inf and float(metrics["ratio_max"]) == -math.inf
        loss.backward()
        assert float(hybrid_il_rl_loss(z, adv, z, mask, beta=0.1, agg=agg).detach()) == 0.0, agg
    assert trm_mask(mask, token_kl=z.detach()).shape == (shape[0],)


def test_policy_loss_entropy_kl_terms_and_metrics():
    lp, old, _, adv, mask = _inputs(seed=6)
    ent = torch.rand(lp.shape, dtype=f64)
    kl = torch.rand(lp.shape, dtype=f64)
    base, m = policy_loss(lp, old, adv, mask)
    got, _ = policy_loss(lp, old, adv, mask, entropy=ent, entropy_coef=0.1, kl=kl, kl_coef=0.2)
    n = mask.sum()
    want = base - 0.1 * (ent * mask).sum() / n + 0.2 * (kl * mask).sum() / n
    torch.testing.assert_close(got, want)
    r = torch.exp(lp - old)[mask]
    torch.testing.assert_close(m["ppo_kl"], (old - lp)[mask].mean())
    torch.testing.assert_close(m["ratio_mean"], r.mean())
    torch.testing.assert_close(m["ratio_min"], r.min())
    torch.testing.assert_close(m["ratio_max"], r.max())


def test_policy_loss_errors():
    lp, old, roll, adv, mask = _inputs()
    with pytest.raises(ValueError, match="old_logprob"):
        policy_loss(lp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(lp, old, adv[:2], mask)
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(lp, old, adv, mask, loss_type="dpo")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(lp, old, adv, mask, agg="sum")
    with pytest.raises(ValueError, match="rollout_logprob"):
        policy_loss(lp, old, adv, mask, rollout_correction="tis")
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(lp, old, adv, mask, entropy_coef=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(lp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="seq_mask"):
        policy_loss(lp, old, adv, mask, seq_mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="logprob"):
        policy_loss(lp.long(), old, adv, mask)
    # Constants that flip or stop the update silently (tis_cap -1: the loss's sign flipped;
    # clip_high -0.5: every token clipped, no gradient).
    for bad in (dict(clip_low=-0.1), dict(clip_high=-0.5), dict(clip_high=float("nan")),
                dict(tis_cap=0.0), dict(tis_cap=-1.0), dict(icepop_low=-1.0),
                dict(icepop_low=2.0, icepop_high=0.5)):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            policy_loss(lp, old, adv, mask, rollout_logprob=roll, rollout_correction="tis", **bad)
    with pytest.raises(TypeError, match="clip_low"):
        policy_loss(lp, old, adv, mask, clip_low=torch.tensor(0.2))
    # +inf is a bound that never binds: no cap, no upper band
    policy_loss(lp, old, adv, mask, rollout_logprob=roll, rollout_correction="tis",
                tis_cap=float("inf"), icepop_high=float("inf"))  # fmt: skip


def test_policy_loss_float32():
    lp, old, _, adv, mask = _inputs()
    got, _ = policy_loss(lp.float(), old.float(), adv.float(), mask)
    want, _ = policy_loss(lp, old, adv, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_policy_loss_low_precision_computes_in_float32(dtype):
    # In the input dtype: fp16 exp(12) = inf, and with A = 0 (a flat GRPO group) 0 * inf gave a
    # NaN loss and gradient; bf16 losses were off by ~1e-3. Truth: the float64 loss of the same
    # (rounded) inputs; the loss and metrics come out fp32, the gradient in logprob's dtype.
    x = torch.tensor([[-1.0, -2.0]], dtype=dtype, requires_grad=True)
    old = torch.tensor([[-13.0, -2.1]], dtype=dtype)
    loss, metrics = policy_loss(x, old, torch.zeros(1, dtype=dtype), torch.ones(1, 2))
    loss.backward()
    assert float(loss.detach()) == 0.0 and x.grad.abs().sum().item() == 0.0
    assert math.isfinite(float(metrics["ratio_max"]))
    dtypes = (loss.dtype, x.grad.dtype)
    g = torch.Generator().manual_seed(5)
    B, T = 8, 256
    lp = (-torch.rand(B, T, generator=g, dtype=f64) * 3).to(dtype)
    old = (lp.double() + 0.05 * torch.randn(B, T, generator=g, dtype=f64)).to(dtype)
    roll = (old.double() + 0.05 * torch.randn(B, T, generator=g, dtype=f64)).to(dtype)
    adv = torch.randn(B, generator=g, dtype=f64).to(dtype)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (B, 1), generator=g)
    for loss_type in ("ppo", "gspo", "cispo"):
        kw = dict(loss_type=loss_type, rollout_correction="tis", agg="seq-mean-token-mean")
        x64 = lp.double().requires_grad_(True)
        want, want_m = policy_loss(
            x64, old.double(), adv.double(), mask, rollout_logprob=roll.double(), **kw
        )
        want.backward()
        x = lp.clone().requires_grad_(True)
        got, got_m = policy_loss(x, old, adv, mask, rollout_logprob=roll, **kw)
        got.backward()
        want_m["loss"], got_m["loss"] = want.detach(), got.detach()
        # fp32 roundings of ~10 operations per token, summed: far below bf16's 2^-8.
        bad = {k: (float(got_m[k]), float(v)) for k, v in want_m.items()
               if not abs(float(got_m[k]) - float(v)) <= 1e-5 * abs(float(v)) + 1e-7}  # fmt: skip
        assert not bad, (loss_type, bad)
        assert all(v.dtype == f64 and got_m[k].dtype == torch.float32 for k, v in want_m.items())
        # the gradient is rounded once to the input dtype (fp16: subnormal below 6e-5)
        fi = torch.finfo(dtype)
        err = (x.grad.double() - x64.grad).abs()
        assert bool((err <= fi.eps * (x64.grad.abs() + fi.tiny)).all()), loss_type
        assert x.grad.dtype == dtype
    assert dtypes == (torch.float32, dtype)


# ----------------------------------------------------------------------------- hybrid IL + RL


def test_hybrid_il_rl_loss_vs_loop():
    lp, _, _, adv, mask = _inputs(seed=7)
    kl = torch.rand(lp.shape, dtype=f64)
    beta = 0.3
    lp1, kl1 = lp.clone().requires_grad_(True), kl.clone().requires_grad_(True)
    got = hybrid_il_rl_loss(lp1, adv, kl1, mask, beta=beta)
    got.backward()
    lp2, kl2 = lp.clone().requires_grad_(True), kl.clone().requires_grad_(True)
    B, T = lp.shape
    total, n = 0.0, 0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            suffix = sum(float(kl[i, s]) for s in range(t + 1, T) if mask[i, s])
            total = total - (float(adv[i]) - beta * suffix) * lp2[i, t] + beta * kl2[i, t]
            n += 1
    want = total / n
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kl1.grad, kl2.grad, rtol=1e-12, atol=1e-14)
    # both terms present: the score term reacts to beta through the suffix sums
    g0 = torch.autograd.grad(hybrid_il_rl_loss(lp1, adv, kl, mask, beta=0.0), lp1)[0]
    assert not torch.allclose(g0, lp1.grad)
    with pytest.raises(ValueError, match="token_kl"):
        hybrid_il_rl_loss(lp, adv, kl[:, :2], mask, beta=0.1)


def _row_with_a_neg_inf_logprob():
    """Two rows of three tokens; row 0's second token has log-prob -inf (a token the policy
    cannot produce), row 1 sits on its old log-probs (ratio 1)."""
    lp = torch.tensor([[-1.0, -math.inf, -0.5], [-0.3, -0.2, -0.1]], dtype=f64,
                      requires_grad=True)  # fmt: skip
    old = torch.tensor([[-1.1, -2.0, -0.5], [-0.3, -0.2, -0.1]], dtype=f64)
    return lp, old, torch.ones(2, 3, dtype=torch.bool)


def test_gspo_neg_inf_logprob_stays_in_its_row():
    """GSPO's straight-through ratio sg(s_i) exp(l - sg(l)) read -inf - -inf = NaN at a -inf
    log-prob: a NaN loss and a NaN gradient for the whole batch, where ppo on the same input
    is finite. Its row's sequence mean is clamped to -20: s_0 = e^-20."""
    lp, old, mask = _row_with_a_neg_inf_logprob()
    adv = torch.tensor([1.0, 0.5], dtype=f64)
    loss, _ = policy_loss(lp, old, adv, mask, loss_type="gspo", agg="seq-mean-token-mean")
    loss.backward()
    s0 = math.exp(-20.0)
    want = (max(-s0, -0.8) + -0.5 * 1.0) / 2  # each row's tokens share L = max(-A s, -A clip(s))
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert lp.grad.isfinite().all()
    assert lp.grad[0, 1] == 0  # the -inf token takes no gradient (ppo's clamp gives it none)


@pytest.mark.parametrize("loss_type", ["ppo", "gspo", "cispo"])
def test_neg_inf_logprob_under_a_zero_advantage_adds_nothing(loss_type):
    """A -inf log-prob in a row whose advantage is 0 (every row of a group whose rewards are
    equal): cispo's -sg(clip(r)) A l read 0 * -inf = NaN; the loss is row 1's alone."""
    lp, old, mask = _row_with_a_neg_inf_logprob()
    adv = torch.tensor([0.0, 0.5], dtype=f64)
    loss, _ = policy_loss(lp, old, adv, mask, loss_type=loss_type, agg="seq-mean-token-mean")
    loss.backward()
    lp1 = lp.detach()[1:].clone().requires_grad_(True)
    alone, _ = policy_loss(lp1, old[1:], adv[1:], mask[1:], loss_type=loss_type,
                           agg="seq-mean-token-mean")  # fmt: skip
    alone.backward()
    assert loss.item() == pytest.approx(alone.item() / 2, rel=1e-12)
    torch.testing.assert_close(lp.grad[1], lp1.grad[0] / 2, rtol=1e-12, atol=0)
    assert (lp.grad[0] == 0).all()


def test_hybrid_neg_inf_logprob_under_a_zero_shaped_advantage_adds_nothing():
    lp, _, mask = _row_with_a_neg_inf_logprob()
    kl = torch.zeros(2, 3, dtype=f64)
    loss = hybrid_il_rl_loss(lp, torch.tensor([0.0, 0.5], dtype=f64), kl, mask, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 0.6 / 6, rel=1e-12)  # -(0.5)(-0.6) over 6 tokens
    assert lp.grad.isfinite().all()


def test_hybrid_suffix_sums_do_not_cancel():
    """sum_{t' > t} KL_t' as the inclusive reverse cumsum minus KL_t cancelled in float32 where a
    large KL_t sits beside small later ones: KL 5e3 at t = 0 and 1e-4 at the other 1999 tokens
    gave token 0's suffix 0.19971 for 0.1999 (1e-3 relative). Now the float32 gradient agrees
    with float64's to float32's rounding."""
    T = 2000
    kl = torch.full((1, T), 1e-4, dtype=f64)
    kl[0, 0] = 5e3
    lp = torch.full((1, T), -1.0, dtype=f64)
    mask = torch.ones(1, T, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=f64)
    grads = []
    for dtype in (torch.float32, f64):
        x = lp.to(dtype).requires_grad_(True)
        hybrid_il_rl_loss(x, adv.to(dtype), kl.to(dtype), mask, beta=1.0).backward()
        grads.append(x.grad.double())
    # d loss / d l_0 = -(A - suffix_0) / T; suffix_0 = 1999e-4
    assert grads[1][0, 0].item() == pytest.approx(-(1.0 - 0.1999) / T, rel=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=0)


def test_hybrid_infinite_kl_keeps_its_own_and_later_gradients_finite():
    """An infinite KL at token t: the suffix after t is finite (inf - inf read NaN at t)."""
    kl = torch.tensor([[0.1, math.inf, 0.2]], dtype=f64)
    lp = torch.full((1, 3), -1.0, dtype=f64, requires_grad=True)
    hybrid_il_rl_loss(lp, torch.tensor([1.0], dtype=f64), kl, torch.ones(1, 3, dtype=torch.bool),
                      beta=0.5).backward()  # fmt: skip
    assert lp.grad[0, 1].item() == pytest.approx(-(1.0 - 0.5 * 0.2) / 3, rel=1e-12)
    assert lp.grad[0, 2].item() == pytest.approx(-1.0 / 3, rel=1e-12)


def test_loss_coefficients_are_checked():
    lp, old, _, adv, mask = _inputs()
    kl = torch.rand(lp.shape, dtype=f64)
    for name, bad, err in (("beta", float("nan"), ValueError), ("beta", "a", TypeError)):
        with pytest.raises(err, match=name):
            hybrid_il_rl_loss(lp, adv, kl, mask, **{name: bad})
    bad_kwargs = (
        (dict(entropy_coef=float("nan"), entropy=kl), ValueError),
        (dict(kl_coef="0.1", kl=kl), TypeError),
        (dict(dual_clip="3"), TypeError),
        (dict(dual_clip=1.0), ValueError),
    )
    for kw, err in bad_kwargs:
        with pytest.raises(err, match=next(iter(kw))):
            policy_loss(lp, old, adv, mask, **kw)
