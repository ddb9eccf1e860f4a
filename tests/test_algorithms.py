"""pg_kernels.algorithms: metrics, lr schedule, packing, the public namespace, torch.compile."""

import math

import pytest
import torch

import pg_kernels.algorithms as alg
from pg_kernels.algorithms import (
    ResponseLengthLRScheduler,
    mismatch_metrics,
    packed_to_padded,
    padded_to_packed,
)

f64 = torch.float64


def test_public_namespace():
    for name in alg.__all__:
        assert callable(getattr(alg, name)), name
    assert {"group_advantages", "otb_advantages", "policy_loss", "trm_mask"} <= set(alg.__all__)


# ----------------------------------------------------------------------------- metrics


def test_mismatch_metrics_vs_loop():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    lp = -torch.rand(B, T, generator=g, dtype=f64) * 3
    roll = lp + 0.2 * torch.randn(B, T, generator=g, dtype=f64)
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 0, 3])[:, None]
    kl = torch.rand(B, T, generator=g, dtype=f64)
    lp[2, 0] = float("nan")  # on a masked token: ignored
    got = mismatch_metrics(lp, roll, mask, token_kl=kl)
    toks = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    rows = [i for i in range(B) if mask[i].any()]

    def d(i, t):
        return float(lp[i, t] - roll[i, t])

    def rmean(f):
        return sum(f(i) for i in rows) / len(rows)

    def mean_t(x, i):
        return sum(float(x[i, t]) for t in range(T) if mask[i, t]) / int(mask[i].sum())

    want = {
        "kl": sum(-d(i, t) for i, t in toks) / len(toks),
        "k2_kl": sum(0.5 * d(i, t) ** 2 for i, t in toks) / len(toks),
        "k3_kl": sum(math.exp(d(i, t)) - 1 - d(i, t) for i, t in toks) / len(toks),
        "chi2_token": sum(math.exp(2 * d(i, t)) for i, t in toks) / len(toks) - 1,
        "chi2_seq": rmean(lambda i: math.exp(2 * sum(d(i, t) for t in range(T) if mask[i, t]))) - 1,
        "log_ppl_diff": rmean(lambda i: mean_t(roll, i) - mean_t(lp, i)),
        "log_ppl_abs_diff": rmean(lambda i: abs(mean_t(lp, i) - mean_t(roll, i))),
        "training_ppl": rmean(lambda i: math.exp(-mean_t(lp, i))),
        "rollout_ppl": rmean(lambda i: math.exp(-mean_t(roll, i))),
        "abs_log_ratio_mean": sum(abs(d(i, t)) for i, t in toks) / len(toks),
        "abs_log_ratio_max": max(abs(d(i, t)) for i, t in toks),
        "chi2_mean": sum((math.exp(d(i, t)) - 1) ** 2 for i, t in toks) / len(toks),
        "token_kl_mean": sum(float(kl[i, t]) for i, t in toks) / len(toks),
        "token_kl_max": max(float(kl[i, t]) for i, t in toks),
    }
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dim() == 0 and got[k].dtype == f64
        assert abs(float(got[k]) - v) < 1e-12, k
    assert "token_kl_mean" not in mismatch_metrics(lp, roll, mask)
    with pytest.raises(ValueError, match="rollout_logprob"):
        mismatch_metrics(lp, roll[:, :3], mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mismatch_metrics_low_precision_match_float64(dtype):
    # In bf16, k3 = rho - 1 - delta cancelled (k3_kl 6.0e-4 for a true 5.0e-5): computed in fp32
    # the metrics are the float64 ones of the same rounded inputs, to within fp32 rounding
    # (k3, chi2_token: a few ulp of 1 per token, so an absolute 1e-6), and come out fp32.
    g = torch.Generator().manual_seed(0)
    B, T = 4, 256
    lp = (-torch.rand(B, T, generator=g, dtype=f64) * 0.5).to(dtype)
    roll = (lp.double() + 0.01 * torch.randn(B, T, generator=g, dtype=f64)).to(dtype)
    kl = torch.rand(B, T, generator=g, dtype=f64).to(dtype) * 1e-3
    mask = torch.arange(T)[None, :] < torch.tensor([256, 100, 0, 7])[:, None]
    got = mismatch_metrics(lp, roll, mask, token_kl=kl)
    want = mismatch_metrics(lp.double(), roll.double(), mask, token_kl=kl.double())
    bad = {k: (float(got[k]), float(v)) for k, v in want.items()
           if not abs(float(got[k]) - float(v)) <= 1e-6 + 1e-6 * abs(float(v))}  # fmt: skip
    assert not bad, bad
    assert all(v.dtype == f64 and got[k].dtype == torch.float32 for k, v in want.items())


# ----------------------------------------------------------------------------- schedule


def _opt(lr=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [p], "lr": lr}, {"params": [], "lr": 0.5 * lr}])


def test_response_length_scheduler_tensor_lr_in_place():
    """A tensor lr (torch.compile'd or capturable optimizer steps read it) is decayed in place,
    as torch's own schedulers do: it had been replaced by a new tensor, then by a float at the
    floor."""
    p = torch.nn.Parameter(torch.zeros(1))
    lr = torch.tensor(1.0)
    opt = torch.optim.Adam([p], lr=lr)
    s = ResponseLengthLRScheduler(opt, ema=0.5, trigger_ratio=0.1, gamma=0.5, cooldown=0,
                                  min_lr=0.4)  # fmt: skip
    held = opt.param_groups[0]["lr"]
    assert s.step(100.0) is False and s.step(200.0) is True
    assert opt.param_groups[0]["lr"] is held and float(held) == 0.5
    assert s.step(10_000.0) is True  # floored
    assert opt.param_groups[0]["lr"] is held and float(held) == pytest.approx(0.4)


def test_response_length_scheduler_rules():
    opt = _opt()
    s = ResponseLengthLRScheduler(
        opt, ema=0.5, trigger_ratio=0.1, gamma=0.5, cooldown=2, min_lr=0.2
    )
    # step 1 sets ema = 100; step 2: 111 > 110 triggers; ema <- 105.5
    assert s.step(100.0) is False and s.ema == 100.0
    assert s.step(torch.tensor(111.0)) is True
    assert s.get_last_lr() == [0.5, 0.25]
    assert s.ema == pytest.approx(105.5)
    # steps 3 and 4 are in the cooldown, step 5 may trigger again
    assert s.step(1000.0) is False
    assert s.step(1000.0) is False
    assert s.step(10_000.0) is True
    assert s.get_last_lr() == [0.25, 0.2]  # floored at min_lr
    assert s.step(1.0) is False  # below the ema: nothing
    # every group at min_lr: a trigger decays nothing, counts no decay, starts no cooldown
    s.optimizer.param_groups[0]["lr"] = 0.2
    assert s.step(1.0) is False  # past the cooldown
    n = s.num_decays
    assert s.step(1e6) is False and s.get_last_lr() == [0.2, 0.2] and s.num_decays == n
    # state_dict round trip
    state = s.state_dict()
    assert "optimizer" not in state
    s2 = ResponseLengthLRScheduler(_opt())
    s2.load_state_dict(state)
    assert (s2.ema, s2.step_count, s2.last_decay_step, s2.gamma) == (
        s.ema,
        s.step_count,
        s.last_decay_step,
        0.5,
    )
    # A NaN length is refused and leaves the state as it was (a NaN average never triggers)
    before = s.state_dict()
    for bad in (float("nan"), float("inf"), -1.0, torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="mean_response_length"):
            s.step(bad)
    assert s.state_dict() == before
    with pytest.raises(ValueError, match="gamma"):
        ResponseLengthLRScheduler(_opt(), gamma=1.5)
    # NaN passed `x < 0` and turned the floor or the cooldown off
    for name in ("min_lr", "cooldown"):
        with pytest.raises(ValueError, match=name):
            ResponseLengthLRScheduler(_opt(), **{name: float("nan")})
    with pytest.raises(TypeError, match="optimizer"):
        ResponseLengthLRScheduler(None)


# ----------------------------------------------------------------------------- packing


def test_packing_round_trip_and_grad():
    lens = [3, 0, 1, 4]
    cu = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)
    x = torch.arange(8 * 2, dtype=f64).view(8, 2).requires_grad_(True)
    padded, mask = packed_to_padded(x, cu)
    assert padded.shape == (4, 4, 2) and mask.sum(1).tolist() == lens
    assert padded[0, 2].tolist() == [4.0, 5.0] and padded[3, 0].tolist() == [8.0, 9.0]
    assert float(padded[1].detach().abs().sum()) == 0.0
    packed, cu2 = padded_to_packed(padded, mask)
    assert cu2.tolist() == cu.tolist() and cu2.dtype == torch.int32
    torch.testing.assert_close(packed, x)
    (packed * torch.arange(16, dtype=f64).view(8, 2)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(16, dtype=f64).view(8, 2))
    p2, m2 = packed_to_padded(x.detach(), cu, max_seqlen=6)
    assert p2.shape == (4, 6, 2) and m2.sum().item() == 8
    # holes compact: the t-th valid token lands at position t
    hole = torch.tensor([[True, False, True], [False, True, True]])
    vals = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    packed, cu3 = padded_to_packed(vals, hole)
    assert packed.tolist() == [1.0, 3.0, 5.0, 6.0] and cu3.tolist() == [0, 2, 4]
    assert packed_to_padded(packed, cu3)[0].tolist() == [[1.0, 3.0], [5.0, 6.0]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_to_padded(x.detach(), torch.tensor([0, 3, 9]))
    with pytest.raises(ValueError, match="max_seqlen"):
        packed_to_padded(x.detach(), cu, max_seqlen=2)
    with pytest.raises(ValueError, match="mask"):
        padded_to_packed(padded, mask[:, :2])


def test_compact_rows_hand_case_and_round_trip():
    m = torch.tensor([[True, False, True, False], [False, False, False, False], [1, 1, 0, 1]])
    m = m.to(torch.bool)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [9.0, 10.0, 11.0, 12.0]])
    xc, mc = alg.compact_rows(x.requires_grad_(True), m)
    assert xc.tolist() == [[1.0, 3.0, 0.0, 0.0], [0.0] * 4, [9.0, 10.0, 12.0, 0.0]]
    assert mc.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]]
    back = alg.uncompact_rows(xc, m)
    torch.testing.assert_close(back, torch.where(m, x, 0))
    back.sum().backward()
    torch.testing.assert_close(x.grad, m.to(x.dtype))
    # trailing dims ride along; a float mask works as its nonzero pattern
    y = torch.arange(24.0).view(3, 4, 2)
    yc, _ = alg.compact_rows(y, m.to(torch.float32))
    assert yc[2, 2].tolist() == [22.0, 23.0] and yc[0, 1].tolist() == [4.0, 5.0]
    torch.testing.assert_close(alg.uncompact_rows(yc, m), torch.where(m[..., None], y, 0))


def test_multi_turn_otb_via_compact_rows():
    # the t-th model token of each row shares one baseline position, whatever tool tokens sit
    # between: OTB on the compacted rows equals OTB on rows that never had the holes
    g = torch.Generator().manual_seed(3)
    dense_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    lgp_dense = torch.rand(3, 4, generator=g, dtype=f64)
    R = torch.tensor([1.0, 0.0, 0.5], dtype=f64)
    ids = torch.tensor([0, 0, 0])
    want = alg.otb_advantages(R, lgp_dense, dense_mask, ids)
    # spread the same tokens out with tool-token holes (mask 0) in between
    holes = torch.tensor(
        [[1, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 0], [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool
    )
    lgp = torch.zeros(3, 7, dtype=f64)
    lgp[holes] = lgp_dense[dense_mask]
    lgp[~holes] = 5.0  # tool tokens: ignored
    lc, mc = alg.compact_rows(lgp, holes)
    got = alg.uncompact_rows(alg.otb_advantages(R, lc, mc, ids), holes)
    torch.testing.assert_close(got[holes], want[dense_mask], rtol=1e-12, atol=1e-12)
    assert float(got[~holes].abs().sum()) == 0.0


# ----------------------------------------------------------------------------- compile


def _compile_cases():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    ids = torch.tensor([4, 4, 9, 9, 9, 1])
    mask = torch.arange(T)[None, :] < torch.tensor([5, 3, 4, 1, 5, 2])[:, None]
    lp = -torch.rand(B, T, generator=g)
    old = lp + 0.1 * torch.randn(B, T, generator=g)
    r = torch.randn(B, generator=g)
    lgp = torch.rand(B, T, generator=g)
    steps = torch.tensor([[0, 0, 1, 1, 2]] * B)
    return {
        "group_advantages": (lambda: alg.group_advantages(r, ids, method="grpo")),
        "otb_advantages": (lambda: alg.otb_advantages(r, lgp, mask, ids, handle_zero_tail=True)),
        "trloo_advantages": (lambda: alg.trloo_advantages(old, mask, ids, gamma=0.9)),
        "empg_advantages": (lambda: alg.empg_advantages(r, lgp, mask, steps)),
        "trm_mask": (lambda: alg.trm_mask(mask, k2=lgp * 0.01, k3=lgp * 1e-4)),
        "geometric_rejection": (lambda: alg.geometric_rejection(lp - old, mask)),
        "policy_loss": (
            lambda: alg.policy_loss(
                lp, old, r, mask, loss_type="gspo", agg="seq-mean-token-mean", dual_clip=3.0
            )
        ),
        "mismatch_metrics": (lambda: alg.mismatch_metrics(lp, old, mask)),
        "compact_rows": (lambda: alg.uncompact_rows(alg.compact_rows(lp, mask)[0] * 2, mask)),
        "packed_to_padded": (
            lambda: alg.packed_to_padded(lp.reshape(-1), torch.arange(0, 31, 5), max_seqlen=5)
        ),
    }


@pytest.mark.parametrize("name", list(_compile_cases()))
def test_fullgraph_compile_matches_eager(name):
    torch._dynamo.reset()
    fn = _compile_cases()[name]
    eager = fn()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "backend",
    ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)],  # inductor: C++ codegen
)
def test_policy_loss_compiled_backward(backend):
    torch._dynamo.reset()
    B, T = 4, 6
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(B, T, generator=g)
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3

    def f(x):
        loss, _ = alg.policy_loss(x, old, adv, mask, agg="token-mean")
        return loss

    x1 = lp.clone().requires_grad_(True)
    x2 = lp.clone().requires_grad_(True)
    f(x1).backward()
    torch.compile(f, fullgraph=True, backend=backend)(x2).backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- no host reads


def test_no_host_reads_meta_tensors():
    """Every function runs on meta tensors (shapes only, no data): a .item(), bool() or
    data-dependent branch would raise here, so none of them can sync a GPU with the host."""
    d = "meta"
    B, T = 6, 5
    ids = torch.zeros(B, dtype=torch.int64, device=d)
    mask = torch.ones(B, T, dtype=torch.bool, device=d)
    x = torch.zeros(B, T, device=d)
    r = torch.zeros(B, device=d)
    steps = torch.zeros(B, T, dtype=torch.int64, device=d)
    for m in ("grpo", "dr_grpo", "rloo"):
        assert alg.group_advantages(r, ids, method=m).shape == (B,)
    assert alg.otb_advantages(r, x, mask, ids, is_weights=x, handle_zero_tail=True).shape == (B, T)
    assert alg.trloo_advantages(x, mask, ids).shape == (B, T)
    assert alg.turns_to_tokens(x, steps).shape == (B, T)
    assert alg.empg_advantages(r, x, mask, steps).shape == (B, T)
    assert alg.trm_mask(mask, k2=x, k3=x).shape == (B,)
    assert alg.trm_mask(mask, token_kl=x).shape == (B,)
    assert alg.geometric_rejection(x, mask).shape == (B,)
    combos = (
        ("ppo", "token-mean"),
        ("gspo", "seq-mean-token-mean"),
        ("cispo", "seq-mean-token-sum"),
    )
    for loss_type, agg in combos:
        loss, metrics = alg.policy_loss(
            x, x, r, mask, loss_type=loss_type, agg=agg, seq_mask=mask[:, 0],
            rollout_logprob=x, rollout_correction="icepop", entropy=x, entropy_coef=0.1,
            kl=x, kl_coef=0.1, dual_clip=None if loss_type == "cispo" else 3.0,
        )  # fmt: skip
        assert loss.shape == () and all(v.shape == () for v in metrics.values())
    assert alg.hybrid_il_rl_loss(x, r, x, mask, beta=0.1).shape == ()
    assert all(v.shape == () for v in alg.mismatch_metrics(x, x, mask, token_kl=x).values())
    cu = torch.zeros(B + 1, dtype=torch.int64, device=d)
    assert alg.uncompact_rows(alg.compact_rows(x, mask)[0], mask).shape == (B, T)
    padded, pmask = alg.packed_to_padded(torch.zeros(30, device=d), cu, max_seqlen=T)
    assert padded.shape == (B, T) and pmask.shape == (B, T)
