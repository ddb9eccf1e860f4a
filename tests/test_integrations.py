"""pg_kernels.integrations against the trainers' own functions (verl 0.9.1, TRL 1.16.0,
OpenRLHF 0.11.2), loaded from their pinned sources (tests/trainer_sources.py).

Each comparison runs the trainer's function on float64 logits (the truth), the trainer's
function at the input precision (the plain baseline) and ours, and requires ours to be within
2x the plain baseline's error of the truth plus pg_kernels.testing's floors, for values and
gradients: the project's rule for every kernel. A trainer that is not installed skips its
tests with the install command in the reason; slime is not installable from PyPI, so its
drop-in is checked against a float64 transcription of slime's contract.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
from collections import defaultdict

import numpy as np
import pytest
import torch
from trainer_sources import TrainerSources, missing_reason

from pg_kernels.integrations import openrlhf as pgk_openrlhf
from pg_kernels.integrations import slime as pgk_slime
from pg_kernels.integrations import trl as pgk_trl
from pg_kernels.integrations import verl as pgk_verl
from pg_kernels.testing import FORWARD_TOL, GRAD_TOL, assert_close_to_truth, near_one_hot

DTYPES = (torch.float32, torch.bfloat16)
V = 1000
# Third-party modules the loaded files import at their top, stubbed when missing.
STUBS = (
    "transformers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "pandas",
    "tensordict",
    "peft",
    "deepspeed",
    "ray",
    "prefix_grouper",
)


def _sources(
    package: str, *modules: str, stubs: tuple[str, ...] = STUBS
) -> tuple[TrainerSources, list[types.ModuleType]]:
    why = missing_reason(package)
    if why is not None:  # .ci/run requires them: a failed install must not pass as skips
        (pytest.fail if os.environ.get("PGK_REQUIRE_TRAINERS") == "1" else pytest.skip)(why)
    # flash-attn stays missing for the compared functions: they then take their torch path
    # (verl tries to import it at load time, so it is never stubbed for verl).
    src = TrainerSources(package, stubs=stubs, keep_missing=("flash_attn",))
    try:
        return src, src.load(*modules)
    except Exception:
        src.close()
        raise


@pytest.fixture(scope="module")
def verl():
    src, (tf, exp, consumer) = _sources(
        "verl",
        "verl.utils.torch_functional",
        "verl.utils.experimental.torch_functional",
        "verl.trainer.ppo.prefix_grouper_utils",
    )
    algos = src.functions(
        "trainer/ppo/core_algos.py",
        ("kl_penalty", "kl_penalty_forward", "compute_optimal_token_baseline_advantage"),
        {
            "torch": torch, "np": np, "defaultdict": defaultdict,
            # the estimator's registration decorator, a no-op here
            "register_adv_est": lambda name: (lambda fn: fn),
            "AdvantageEstimator": types.SimpleNamespace(OPTIMAL_TOKEN_BASELINE="otb"),
        },
    )  # fmt: skip
    yield types.SimpleNamespace(tf=tf, exp=exp, consumer=consumer, **algos)
    pgk_verl.unpatch()
    src.close()


@pytest.fixture(scope="module")
def trl():
    src, (utils, consumer, kernels) = _sources(
        "trl",
        "trl.trainer.utils",
        "trl.experimental.sdpo.loss_utils",
        "trl.kernels.logprob_entropy",
    )
    yield types.SimpleNamespace(utils=utils, consumer=consumer, kernels=kernels)
    pgk_trl.unpatch()
    src.close()


@pytest.fixture(scope="module")
def openrlhf():
    # openrlhf.models.actor imports flash-attn at its top: stubbed while it loads only.
    src, (utils, actor) = _sources(
        "openrlhf", "openrlhf.models.utils", "openrlhf.models.actor", stubs=(*STUBS, "flash_attn")
    )
    yield types.SimpleNamespace(utils=utils, actor=actor)
    pgk_openrlhf.unpatch()
    src.close()


def _logits(shape, dtype, seed):
    """Random logits with one near one-hot (peaked) row: the hardest case for fp32 sums."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    x += torch.randn(*shape, 1, generator=g, dtype=torch.float64) * 5
    near_one_hot(x.view(-1, V), [1], gap=12.0)
    return x.to(dtype)


def _labels(shape, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, V, shape, generator=g)


def _run(fn, x, *args, **kwargs):
    """fn's outputs (a tuple) and the gradient of a random weighted sum of them w.r.t. x."""
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(7)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum()
        for o in outs
        if o.requires_grad
    )
    (grad,) = torch.autograd.grad(loss, x)
    return tuple(o.detach() for o in outs), grad


def _compare(name, theirs, ours, x, *args, truth_fn=None, **kwargs):
    """ours vs theirs: values and gradients against `truth_fn` (default: theirs) in float64.

    Returns ours, theirs and the max errors of each output and of the gradient."""
    truth, truth_grad = _run(truth_fn or theirs, x.double(), *args, **kwargs)
    plain, plain_grad = _run(theirs, x, *args, **kwargs)
    got, grad = _run(ours, x, *args, **kwargs)
    errs = []
    for i, (o, t, p) in enumerate(zip(got, truth, plain, strict=True)):
        errs.append(assert_close_to_truth(f"{name}[{i}]", o, t, p, FORWARD_TOL[x.dtype]))
    assert grad.dtype == x.dtype
    errs.append(
        assert_close_to_truth(
            f"{name} grad", grad, truth_grad, plain_grad, GRAD_TOL[x.dtype], per_row=True
        )
    )
    return got, plain, errs


def _same_signature(theirs, ours):
    t, o = inspect.signature(theirs), inspect.signature(ours)
    assert [(p.name, p.default) for p in t.parameters.values()] == [
        (p.name, p.default) for p in o.parameters.values()
    ], f"{theirs.__qualname__}: {t} vs ours {o}"


# --- verl ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_logprobs_entropy_sum_pi_squared(verl, dtype):
    x = _logits((2, 6), dtype, seed=1)
    labels = _labels((2, 6), seed=1)
    got, plain, _ = _compare(
        "logprobs", verl.tf.logprobs_from_logits, pgk_verl.logprobs_from_logits, x, labels
    )
    assert got[0].dtype == torch.float32  # verl's flash-attn path; its torch path: logits dtype
    for name in ("entropy_from_logits", "calculate_sum_pi_squared_from_logits"):
        got, plain, _ = _compare(name, getattr(verl.tf, name), getattr(pgk_verl, name), x)
        assert got[0].dtype == plain[0].dtype == dtype
    x2 = x.view(-1, V)
    got, plain, _ = _compare(
        "chunked entropy",
        verl.tf.entropy_from_logits_with_chunking,
        pgk_verl.entropy_from_logits_with_chunking,
        x2,
        chunk_size=5,
        # verl's chunked entropy upcasts to fp32 whatever the input (.float()): its float64
        # run would be fp32 too; the unchunked formula keeps float64.
        truth_fn=lambda x, chunk_size: verl.tf.entropy_from_logits(x),
    )
    assert got[0].dtype == plain[0].dtype == torch.float32
    for name in (
        "logprobs_from_logits",
        "entropy_from_logits",
        "entropy_from_logits_with_chunking",
        "calculate_sum_pi_squared_from_logits",
    ):
        _same_signature(getattr(verl.tf, name), getattr(pgk_verl, name))


def test_verl_ignore_rows_give_zero(verl):
    x = _logits((4,), torch.float32, seed=2).requires_grad_()
    labels = torch.tensor([3, -100, 999, -100])
    out = pgk_verl.logprobs_from_logits(x, labels)
    assert out[1] == 0 and out[3] == 0
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad[1].abs().max() == 0 and grad[3].abs().max() == 0 and grad[0].abs().max() > 0
    with pytest.raises((RuntimeError, IndexError)):  # verl's torch path: an index error
        verl.tf.logprobs_from_logits(x.detach(), labels)


def _fused_linear_truth(h, w, ids, temperature):
    z = (h.double() @ w.double().t()) / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_verl_fused_linear_for_ppo(verl, dtype):
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(2, 5, 16, generator=g) * 2).to(dtype)
    w = torch.randn(V, 16, generator=g).to(dtype)
    ids = torch.randint(0, V, (2, 5), generator=g)
    _same_signature(verl.exp.FusedLinearForPPO.forward, pgk_verl.FusedLinearForPPO.forward)
    _same_signature(verl.exp.FusedLinearForPPO.__init__, pgk_verl.FusedLinearForPPO.__init__)

    def run(fn, h, w):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        lp, ent = fn(h, w)
        gl = torch.randn(lp.shape, generator=torch.Generator().manual_seed(4), dtype=lp.dtype)
        ge = torch.randn(ent.shape, generator=torch.Generator().manual_seed(5))
        dh, dw = torch.autograd.grad((lp * gl).sum() + (ent.float() * ge).sum(), (h, w))
        return (lp.detach(), ent.detach()), (dh, dw)

    def chunked(cls):
        return lambda h, w: cls(chunk_size=4).forward(h, w, ids, temperature=0.7)

    theirs, theirs_grads = run(chunked(verl.exp.FusedLinearForPPO), h, w)
    ours, our_grads = run(chunked(pgk_verl.FusedLinearForPPO), h, w)
    # The truth, gradients included: autograd through the float64 formula.
    truth, truth_grads = run(lambda h, w: _fused_linear_truth(h, w, ids, 0.7), h, w)
    assert ours[0].dtype == theirs[0].dtype == torch.float32
    assert ours[1].dtype == theirs[1].dtype == dtype
    for name, o, t, p in zip(("log_probs", "entropy"), ours, truth, theirs, strict=True):
        assert_close_to_truth(name, o, t, p, FORWARD_TOL[dtype])
    for name, o, t, p in zip(("d hidden", "d weight"), our_grads, truth_grads, theirs_grads):
        assert_close_to_truth(name, o, t, p, GRAD_TOL[dtype])


@pytest.mark.parametrize("mode", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "k1+"])
def test_verl_kl_penalty(verl, mode):
    g = torch.Generator().manual_seed(6)
    logprob = -torch.rand(64, generator=g) * 5
    ref = logprob + torch.randn(64, generator=g) * 0.3
    ref[:4] = logprob[:4] + torch.tensor([30.0, -30.0, 15.0, -25.0])  # verl's clamps engage
    _same_signature(verl.kl_penalty, pgk_verl.kl_penalty)

    def run(fn, lp, rf):
        lp = lp.detach().clone().requires_grad_()
        out = fn(lp, rf, mode)
        (grad,) = torch.autograd.grad(out.sum(), lp)
        return out.detach(), grad

    half = logprob.bfloat16(), ref.bfloat16()  # verl returns the inputs' dtype
    assert pgk_verl.kl_penalty(*half, mode).dtype == verl.kl_penalty(*half, mode).dtype
    truth, truth_grad = run(verl.kl_penalty, logprob.double(), ref.double())
    plain, plain_grad = run(verl.kl_penalty, logprob, ref)
    ours, grad = run(pgk_verl.kl_penalty, logprob, ref)
    assert_close_to_truth(mode, ours, truth, plain, FORWARD_TOL[torch.float32])
    assert_close_to_truth(mode + " grad", grad, truth_grad, plain_grad, GRAD_TOL[torch.float32])
    # The two tensors broadcast, as in verl (every mode but "abs" refused it: sampled_kl's shapes)
    rows, col = logprob.view(8, 8), ref.view(8, 8)[:, :1]
    broadcast = pgk_verl.kl_penalty(rows, col, mode)
    assert broadcast.shape == verl.kl_penalty(rows, col, mode).shape
    assert torch.equal(broadcast, pgk_verl.kl_penalty(rows, col.expand(8, 8), mode))


@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("with_is", [False, True])
def test_verl_optimal_token_baseline(verl, zero_tail, with_is):
    """verl's OTB estimator and ours on the same batch: 4 prompts (string ids, one with a single
    response, one whose longest response is unique), ragged lengths, dense token rewards."""
    g = torch.Generator().manual_seed(12)
    B, T = 11, 9
    index = np.array(["a", "b", "a", "c", "b", "a", "d", "c", "b", "a", "c"], dtype=object)
    lengths = torch.tensor([9, 4, 6, 7, 4, 2, 5, 7, 3, 6, 1])
    mask = (torch.arange(T) < lengths[:, None]).float()
    rewards = torch.randn(B, T, generator=g) * mask
    old_lp = -torch.rand(B, T, generator=g) * 3
    sum_pi2 = torch.exp(old_lp) ** 2 + torch.rand(B, T, generator=g) * 0.2
    is_w = torch.rand(B, T, generator=g) + 0.5 if with_is else None
    _same_signature(
        verl.compute_optimal_token_baseline_advantage,
        pgk_verl.compute_optimal_token_baseline_advantage,
    )
    args = (rewards, mask, index, old_lp, sum_pi2, is_w, zero_tail)
    theirs = verl.compute_optimal_token_baseline_advantage(*args)
    ours = pgk_verl.compute_optimal_token_baseline_advantage(*args, config=None)
    for name, a, b in zip(("advantages", "returns"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert bool(theirs[0].abs().sum() > 0)


def test_patch_swaps_registry_entries():
    """A trainer module's dict of functions (verl's estimator registry) gets our function for
    the original's entries, and unpatch puts them back."""
    from pg_kernels.integrations._patching import Patcher

    def original():
        return "theirs"

    def replacement():
        return "ours"

    pkg, mod = types.ModuleType("pgk_fake_trainer"), types.ModuleType("pgk_fake_trainer.algos")
    mod.estimate, mod.REGISTRY = original, {"est": original, "other": len}
    sys.modules.update({pkg.__name__: pkg, mod.__name__: mod})
    try:
        patcher = Patcher(pkg.__name__, {mod.__name__: {"estimate": replacement}})
        patcher.patch()
        assert mod.estimate is replacement and mod.REGISTRY == {"est": replacement, "other": len}
        patcher.unpatch()
        assert mod.estimate is original and mod.REGISTRY == {"est": original, "other": len}
    finally:
        del sys.modules[pkg.__name__], sys.modules[mod.__name__]


def test_unpatch_reaches_modules_imported_while_patched():
    """A trainer module imported after patch() binds ours through `from <defining module>
    import name` (TRL's grpo_trainer, verl's engines do); unpatch restores it too, and its
    registries."""
    from pg_kernels.integrations._patching import Patcher

    def original():
        return "theirs"

    def replacement():
        return "ours"

    pkg, utils = types.ModuleType("pgk_fake_trainer2"), types.ModuleType("pgk_fake_trainer2.utils")
    utils.f = original
    sys.modules.update({pkg.__name__: pkg, utils.__name__: utils})
    late = types.ModuleType("pgk_fake_trainer2.late")
    try:
        patcher = Patcher(pkg.__name__, {utils.__name__: {"f": replacement}})
        patcher.patch()
        late.f, late.TABLE = utils.f, {"k": utils.f}  # what `from .utils import f` does
        sys.modules[late.__name__] = late
        patcher.unpatch()
        assert utils.f is original and late.f is original and late.TABLE["k"] is original
        patcher.patch()  # and again: the late module is swapped like any other now
        assert late.f is replacement
        patcher.unpatch()
        assert late.f is original
    finally:
        for m in (pkg, utils, late):
            sys.modules.pop(m.__name__, None)


def test_verl_patch_unpatch(verl):
    originals = {
        name: getattr(verl.tf, name)
        for name in (
            "logprobs_from_logits",
            "entropy_from_logits",
            "entropy_from_logits_with_chunking",
        )
    }
    consumer_original = verl.consumer.logprobs_from_logits
    assert consumer_original is originals["logprobs_from_logits"]
    fused_original = verl.exp.FusedLinearForPPO
    replaced = pgk_verl.patch()
    try:
        assert verl.tf.logprobs_from_logits is pgk_verl.logprobs_from_logits
        assert verl.tf.entropy_from_logits is pgk_verl.entropy_from_logits
        assert verl.exp.FusedLinearForPPO is pgk_verl.FusedLinearForPPO
        # the name prefix_grouper_utils imported before the patch
        assert verl.consumer.logprobs_from_logits is pgk_verl.logprobs_from_logits
        assert "verl.trainer.ppo.prefix_grouper_utils.logprobs_from_logits" in replaced
        assert pgk_verl.patch() == replaced  # idempotent
    finally:
        pgk_verl.unpatch()
    for name, fn in originals.items():
        assert getattr(verl.tf, name) is fn
    assert verl.consumer.logprobs_from_logits is consumer_original
    assert verl.exp.FusedLinearForPPO is fused_original


# --- TRL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trl_selective_log_softmax(trl, dtype, temperature):
    x = _logits((3, 4), dtype, seed=8)
    index = _labels((3, 4), seed=8)
    row_mask = torch.ones(3, 4, dtype=torch.bool)
    row_mask[0, 1] = row_mask[2, 3] = False
    for mask in (None, row_mask):
        got, _, _ = _compare(
            "selective_log_softmax",
            trl.utils.selective_log_softmax,
            pgk_trl.selective_log_softmax,
            x,
            index,
            temperature=temperature,
            row_mask=mask,
        )
        assert got[0].dtype == torch.float32
        if mask is not None:
            assert got[0][0, 1] == 0 and got[0][2, 3] == 0
    topk = torch.stack([index, (index + 1) % V, (index + 7) % V], -1)  # [..., K] gather
    topk_mask = torch.ones_like(topk, dtype=torch.bool)
    topk_mask[0, 1, 2] = topk_mask[2, 0, 0] = False
    got, _, _ = _compare(
        "selective_log_softmax top-k",
        trl.utils.selective_log_softmax,
        pgk_trl.selective_log_softmax,
        x,
        topk,
        temperature=temperature,
        row_mask=topk_mask,
    )
    assert got[0][0, 1, 2] == 0 and got[0][2, 0, 0] == 0 and (got[0][topk_mask] != 0).all()
    # TRL's kernel takes one token per row: every [..., K] call is its torch path's, whose
    # output keeps the logits' dtype (ours was fp32 for bf16)
    assert got[0].dtype == dtype
    _compare(
        "selective_log_softmax_and_entropy",
        trl.utils.selective_log_softmax_and_entropy,
        pgk_trl.selective_log_softmax_and_entropy,
        x,
        index,
        temperature=temperature,
        row_mask=row_mask,
    )
    if temperature == 1.0:
        _compare("entropy", trl.utils.entropy_from_logits, pgk_trl.entropy_from_logits, x)


def _trl_fallback(trl):
    """TRL's torch path with the kernel's positional signature (the float64 truth)."""

    def fn(logits, index, temperature, row_mask):
        return trl.utils.selective_log_softmax_and_entropy(
            logits, index, temperature=temperature, row_mask=row_mask
        )

    return fn


@pytest.mark.parametrize("dtype", DTYPES)
def test_trl_triton_kernel(trl, dtype):
    """TRL's CUDA path (`trl.kernels`, a Triton kernel; interpreted on CPU here)."""
    kernel = trl.kernels.selective_log_softmax_and_entropy
    _same_signature(kernel, pgk_trl.fused_selective_log_softmax_and_entropy)
    x = _logits((3, 4), dtype, seed=13)
    index = _labels((3, 4), seed=13)
    row_mask = torch.ones(3, 4, dtype=torch.bool)
    row_mask[1, 2] = False
    got, plain, _ = _compare(
        "trl.kernels",
        kernel,
        pgk_trl.fused_selective_log_softmax_and_entropy,
        x,
        index,
        0.7,
        row_mask,
        truth_fn=_trl_fallback(trl),
    )
    assert got[0].dtype == plain[0].dtype == torch.float32
    assert got[1].dtype == plain[1].dtype == torch.float32
    assert got[0][1, 2] == got[1][1, 2] == 0


def test_trl_signatures_and_no_grad_entropy(trl):
    for name in (
        "selective_log_softmax",
        "entropy_from_logits",
        "selective_log_softmax_and_entropy",
    ):
        _same_signature(getattr(trl.utils, name), getattr(pgk_trl, name))
    x = _logits((5,), torch.float32, seed=9).requires_grad_()
    _, ent = pgk_trl.selective_log_softmax_and_entropy(x, _labels((5,), 9), False)
    assert not ent.requires_grad
    with pytest.raises(ValueError, match="temperature"):
        pgk_trl.selective_log_softmax(x, _labels((5,), 9), temperature=0.0)


def test_trl_patch_unpatch(trl):
    original = trl.utils.selective_log_softmax
    assert trl.consumer.selective_log_softmax is original
    replaced = pgk_trl.patch()
    try:
        assert trl.utils.selective_log_softmax is pgk_trl.selective_log_softmax
        assert trl.utils.entropy_from_logits is pgk_trl.entropy_from_logits
        assert trl.consumer.selective_log_softmax is pgk_trl.selective_log_softmax
        assert "trl.experimental.sdpo.loss_utils.selective_log_softmax" in replaced
    finally:
        pgk_trl.unpatch()
    assert trl.utils.selective_log_softmax is original
    assert trl.consumer.selective_log_softmax is original


# --- OpenRLHF -----------------------------------------------------------------------------


def _eager(fn):
    """The Python function behind OpenRLHF's @torch.compile (compiling on CPU takes minutes)."""
    return getattr(fn, "_torchdynamo_orig_callable", fn)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_openrlhf(openrlhf, dtype, temperature):
    x = _logits((2, 6), dtype, seed=10)
    labels = _labels((2, 6), seed=10)

    def theirs(logits, labels, temperature):  # it divides its argument in place
        return openrlhf.utils.log_probs_from_logits(logits.clone(), labels, temperature)

    got, plain, _ = _compare(
        "log_probs", theirs, pgk_openrlhf.log_probs_from_logits, x, labels, temperature
    )
    assert got[0].dtype == plain[0].dtype == dtype
    kept = x.clone()
    pgk_openrlhf.log_probs_from_logits(kept, labels, temperature)
    assert torch.equal(kept, x)  # not modified
    got, plain, _ = _compare(
        "entropy", _eager(openrlhf.utils.compute_entropy), pgk_openrlhf.compute_entropy, x
    )
    assert got[0].dtype == plain[0].dtype == dtype
    _same_signature(openrlhf.utils.log_probs_from_logits, pgk_openrlhf.log_probs_from_logits)
    # A temperature tensor of one element, which OpenRLHF broadcasts, is every row's
    for t in (torch.tensor([temperature]), torch.full((1, 1), temperature)):
        assert torch.equal(pgk_openrlhf.log_probs_from_logits(x, labels, t),
                           pgk_openrlhf.log_probs_from_logits(x, labels, temperature))  # fmt: skip


def test_openrlhf_patch_unpatch(openrlhf):
    originals = (openrlhf.utils.log_probs_from_logits, openrlhf.utils.compute_entropy)
    assert openrlhf.actor.log_probs_from_logits is originals[0]
    pgk_openrlhf.patch()
    try:
        assert openrlhf.utils.log_probs_from_logits is pgk_openrlhf.log_probs_from_logits
        assert openrlhf.actor.log_probs_from_logits is pgk_openrlhf.log_probs_from_logits
        assert openrlhf.actor.compute_entropy is pgk_openrlhf.compute_entropy
    finally:
        pgk_openrlhf.unpatch()
    assert (openrlhf.utils.log_probs_from_logits, openrlhf.utils.compute_entropy) == originals
    assert openrlhf.actor.log_probs_from_logits is originals[0]
    assert openrlhf.actor.compute_entropy is originals[1]


# --- slime --------------------------------------------------------------------------------


def _slime_reference(logits, tokens, keep):
    """slime's contract in float64: the log-prob over keep | {target}, the entropy unmasked."""
    z = logits.double()
    if keep is not None:
        keep = keep.scatter(-1, tokens.unsqueeze(-1), True)
        masked = z.masked_fill(~keep, -torch.inf)
    else:
        masked = z
    logp = torch.log_softmax(masked, -1).gather(-1, tokens.unsqueeze(-1))
    full = torch.log_softmax(z, -1)
    return logp, -(full.exp() * full).sum(-1)


@pytest.mark.parametrize("with_mask", [False, True])
def test_slime(with_mask):
    g = torch.Generator().manual_seed(11)
    x = _logits((7,), torch.float32, seed=11)
    tokens = torch.randint(0, V, (7,), generator=g)
    keep = torch.rand(7, V, generator=g) < 0.3 if with_mask else None

    def ours(x):
        return pgk_slime.calculate_log_probs_and_entropy(
            x, tokens, None, with_entropy=True, log_prob_keep_mask=keep
        )

    def reference(x):
        return _slime_reference(x, tokens, keep)

    got, plain, _ = _compare("slime", reference, ours, x)
    assert got[0].shape == (7, 1) and got[1].shape == (7,)
    assert got[0].dtype == got[1].dtype == torch.float32


def test_slime_options():
    x = _logits((3,), torch.float32, seed=12).requires_grad_()
    tokens = torch.tensor([0, 5, 999])
    lp, ent = pgk_slime.calculate_log_probs_and_entropy(x, tokens, None)
    assert ent is None and lp.shape == (3, 1)
    _, ent = pgk_slime.calculate_log_probs_and_entropy(
        x, tokens, None, with_entropy=True, with_entropy_grad=False
    )
    assert not ent.requires_grad
    lp, _ = pgk_slime.calculate_log_probs_and_entropy(x[:0], tokens[:0], None)
    assert lp.shape == (0,)
    # a tensor-parallel group: tests/test_parallel.py::test_slime_tensor_parallel


# --- torch.compile ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        pgk_verl.entropy_from_logits,  # verl's engine compiles it with dynamic=True
        pgk_verl.logprobs_from_logits,
        pgk_trl.selective_log_softmax,
        pgk_openrlhf.compute_entropy,
    ],
    ids=lambda f: f"{f.__module__.rsplit('.', 1)[-1]}.{f.__name__}",
)
def test_drop_ins_compile(fn):
    """The drop-ins trace under torch.compile(fullgraph=True), values and gradients as eager."""
    torch._dynamo.reset()
    x = _logits((2, 3), torch.float32, seed=14)
    args = () if "entropy" in fn.__name__ else (_labels((2, 3), seed=14),)
    eager, eager_grad = _run(fn, x, *args)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    got, grad = _run(compiled, x, *args)
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize(
    "fn",
    [
        pgk_verl.logprobs_from_logits,
        pgk_verl.entropy_from_logits,
        pgk_verl.calculate_sum_pi_squared_from_logits,
        pgk_trl.selective_log_softmax,
        pgk_trl.selective_log_softmax_and_entropy,
        pgk_openrlhf.log_probs_from_logits,
        pgk_openrlhf.compute_entropy,
        pgk_slime.calculate_log_probs_and_entropy,
    ],
    ids=lambda f: f"{f.__module__.rsplit('.', 1)[-1]}.{f.__name__}",
)
def test_drop_ins_take_any_layout(fn):
    """Logits whose vocab dim is not contiguous (a transposed view), which the trainers'
    functions take: the drop-ins give what they give on a contiguous copy (they raised, the ops
    refusing a strided vocab dim)."""
    x = _logits((6,), torch.float32, seed=15).t().contiguous().t()  # [6, V], stride (1, 6)
    assert x.stride(-1) != 1
    takes_labels = "prob" in fn.__name__ or "selective" in fn.__name__  # a log-prob's
    args = (_labels((6,), seed=15),) if takes_labels else ()
    got, want = fn(x, *args), fn(x.contiguous(), *args)
    for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (got, want))):
        assert a is None and b is None or torch.equal(a, b)


def test_fused_linear_for_ppo_saves_no_logits():
    """Like verl's, the forward keeps no [chunk, V] logits for the backward (recomputed)."""
    h = torch.randn(64, 16, requires_grad=True)
    w = torch.randn(V, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = pgk_verl.FusedLinearForPPO(chunk_size=8)(h, w, torch.randint(0, V, (64,)))
    assert saved and all(s[-1] != V for s in saved), saved
    (lp.sum() + ent.sum()).backward()
    assert h.grad is not None and w.grad is not None
