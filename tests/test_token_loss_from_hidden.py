"""token_loss_from_hidden: a per-token loss whose gradients are formed in the forward.

Its statistics come from the same chunked matmuls and token_stats kernels as
token_stats_from_hidden, and the gradient of each chunk's logits from the same backward kernel
with the same upstream gradients, so outputs and gradients equal token_stats_from_hidden's
followed by the loss, bitwise for a unit upstream gradient (that op is checked against float64
in test_from_hidden.py) when both take the same `backward_order` (`_stats_then_loss`: in row
chunks or in vocabulary blocks; the two orders sum the same gradient entries otherwise);
the loss itself is checked against float64 here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_from_hidden import _labels, _projection

import pg_kernels
from pg_kernels import reference
from pg_kernels.ops import _linear
from pg_kernels.ops import token_loss_from_hidden as token_loss_module

pytestmark = pytest.mark.op("token_stats")


def _grpo_loss(n, seed, device="cpu"):
    """A PPO-clip loss with entropy, collision and lse terms, token-mean over a mask: separable
    over rows (the denominator is a constant)."""
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(device)
    old = (torch.randn(n, generator=g, dtype=torch.float64) - 6).to(device)
    mask = (torch.rand(n, generator=g) < 0.8).to(device)

    def loss_fn(s, rows):
        a, o, m = (t[rows].to(s.logprob.dtype) for t in (adv, old, mask))
        ratio = torch.exp(s.logprob - o)
        pg = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        token = pg - 0.01 * s.entropy + 0.1 * s.collision + 1e-3 * s.lse**2
        return (token * m).sum() / mask.sum()

    return loss_fn


def _stats_then_loss(h, w, b, y, loss_fn, backward_order="rows", **kw):
    """token_stats_from_hidden, then loss_fn on all (flattened) rows at once; its backward in
    `backward_order` (row chunks: the order in which token_loss_from_hidden forms its
    gradients by default on a CPU)."""
    stats = pg_kernels.token_stats_from_hidden(h, w, y, bias=b, backward_order=backward_order, **kw)
    flat = type(stats)(*(t.reshape(-1) for t in stats))
    return loss_fn(flat, slice(0, y.numel())), stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["T0.7", "per-row-T"])
@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_equals_token_stats_from_hidden_then_the_loss(
    backend_device, narrow_vocab_blocks, dtype, per_row, order
):
    """[2, 10] leading dims, chunks of 8 (a ragged last one), an ignored row, a -inf bias entry,
    a near one-hot row; in each order, vocabulary blocks of 64 columns (a ragged last one)."""
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(20, 24, 509, dtype, seed=3, lead=(2, 10)))
    y = _labels((2, 10), 509, seed=3).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(2, 10, generator=torch.Generator().manual_seed(4), dtype=acc) + 0.4
    kw = dict(temperature=t.to(device) if per_row else 0.7, chunk_size=8, backend=backend,
              backward_order=order)  # fmt: skip
    loss_fn = _grpo_loss(20, seed=3, device=device)
    grads = []
    for fused in (False, True):
        leaves = [x.clone().requires_grad_() for x in (h, w, b)]
        if fused:
            loss, stats = pg_kernels.token_loss_from_hidden(*leaves[:2], y, loss_fn,
                                                            bias=leaves[2], **kw)  # fmt: skip
        else:
            loss, stats = _stats_then_loss(*leaves, y, loss_fn, **kw)
        loss.backward()
        grads.append([loss.detach(), *(s.detach() for s in stats), *(x.grad for x in leaves)])
    unfused, fused = grads
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=0)  # summed in chunks
    for a, c in zip(fused[1:], unfused[1:]):
        assert torch.equal(a, c)
    assert not fused[1].requires_grad
    # The backward scales the saved gradients by the loss's upstream gradient (2: exact).
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    loss, _ = pg_kernels.token_loss_from_hidden(*leaves[:2], y, loss_fn, bias=leaves[2], **kw)
    (2 * loss).backward()
    for x, g in zip(leaves, fused[-3:]):
        assert torch.equal(x.grad, 2 * g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_matches_float64(dtype):
    """The loss against float64 end to end (the matmul included), within the ops' rule: at most
    twice the error of plain PyTorch (F.linear in the input dtype, then the statistics in fp32)
    plus a floor of 1e-7 (a few fp32 roundings of a loss of ~0.3, summed over chunks)."""
    h, w, b = _projection(41, 16, 777, dtype, seed=5)
    y = _labels((41,), 777, seed=5)
    loss_fn = _grpo_loss(41, seed=5)
    loss = pg_kernels.token_loss_from_hidden(h, w, y, loss_fn, bias=b, chunk_size=16).loss
    logits = F.linear(h.double(), w.double(), b.double())
    truth = float(loss_fn(reference.token_stats(logits, y), slice(0, 41)))
    logits = F.linear(h, w, b)
    plain = float(loss_fn(reference.token_stats(logits, y, upcast=False), slice(0, 41)))
    assert abs(float(loss) - truth) <= 2 * abs(plain - truth) + 1e-7


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_only_the_inputs_that_require_grad(narrow_vocab_blocks, order):
    h, w, b = _projection(20, 8, 300, torch.float32, seed=6)
    y = _labels((20,), 300, seed=6)
    loss_fn = _grpo_loss(20, seed=6)
    kw = dict(chunk_size=7, backward_order=order)
    for trained in (1, 0):  # a trained lm_head over frozen hidden states; the reverse
        fused, unfused = ([t.clone().requires_grad_(i == trained) for i, t in enumerate((h, w))]
                          for _ in range(2))  # fmt: skip
        loss, _ = pg_kernels.token_loss_from_hidden(*fused, y, loss_fn, bias=b, **kw)
        loss.backward()
        _stats_then_loss(*unfused, b, y, loss_fn, **kw)[0].backward()
        assert torch.equal(fused[trained].grad, unfused[trained].grad)
        assert fused[1 - trained].grad is None
    hh = h.clone().requires_grad_()
    with torch.no_grad():  # no gradient work: the loss and statistics only
        loss, stats = pg_kernels.token_loss_from_hidden(hh, w, y, loss_fn, chunk_size=7)
    assert not loss.requires_grad and stats.logprob.shape == (20,)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_second_derivative_raises(backend):
    """The saved gradients are constants: a gradient penalty built on them would silently miss
    their dependence on hidden and weight, so create_graph=True raises, as for the other ops
    (the reference path too: its loss_fn gradients are taken on detached statistics)."""
    h, w, b = _projection(9, 8, 100, torch.float32, seed=11)
    h.requires_grad_()
    y = _labels((9,), 100, seed=11)
    loss, _ = pg_kernels.token_loss_from_hidden(h, w, y, _grpo_loss(9, seed=11), bias=b,
                                                chunk_size=4, backend=backend)  # fmt: skip
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, h, create_graph=True)
    (grad,) = torch.autograd.grad(loss, h)  # a first-order gradient still works
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_batch_loss_is_zero(backend):
    """No rows, no chunk: loss_fn is not called and the loss is 0 on every backend (the
    reference path called it on an empty chunk: a token-mean's 0 / 0 gave NaN there)."""
    h, w, _ = _projection(4, 8, 30, torch.float32, seed=7, bias=False)
    hh = h[:0].clone().requires_grad_()
    calls = []

    def loss_fn(s, rows):
        calls.append(rows)
        return s.logprob.mean()

    loss, stats = pg_kernels.token_loss_from_hidden(
        hh, w, torch.zeros(0, dtype=torch.long), loss_fn, backend=backend
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and stats.entropy.shape == (0,) and hh.grad.shape == (0, 8)
    assert calls == []


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_constant_loss_is_returned_as_a_new_tensor(backend):
    """A loss_fn that returns a captured constant (a fully masked chunk's 0): the op's loss is
    a new tensor, and the constant stays one (on the kernels' path with one chunk it had been
    the very object, given a grad_fn that kept the saved gradients alive)."""
    h, w, _ = _projection(6, 8, 50, torch.float32, seed=12, bias=False)
    zero = torch.zeros(())
    hh = h.clone().requires_grad_()
    loss, _ = pg_kernels.token_loss_from_hidden(hh, w, _labels((6,), 50, seed=12),
                                                lambda s, rows: zero, backend=backend)  # fmt: skip
    assert loss is not zero and not zero.requires_grad and zero.grad_fn is None
    loss.backward()
    assert float(hh.grad.abs().max()) == 0.0


def test_reference_backend_and_compile_agree():
    h, w, b = _projection(13, 8, 301, torch.float32, seed=8)
    y = _labels((13,), 301, seed=8)
    loss_fn = _grpo_loss(13, seed=8)

    def step(h, w, backend):
        return pg_kernels.token_loss_from_hidden(h, w, y, loss_fn, bias=b, chunk_size=4,
                                                 backend=backend).loss  # fmt: skip

    results = []
    for fn, backend in ((step, "cpu"), (torch.compile(step), "cpu"), (step, "reference")):
        leaves = [t.clone().requires_grad_() for t in (h, w)]
        fn(*leaves, backend).backward()
        results.append([t.grad for t in leaves])
    assert all(torch.equal(a, c) for a, c in zip(results[0], results[1]))  # graph break: eager
    for a, c in zip(results[0], results[2]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_tensors_captured_by_loss_fn_are_constants(backend):
    """Only the statistics carry gradient out of loss_fn, on every backend: the reference path
    differentiated loss_fn's whole graph (a captured coefficient got a gradient there)."""
    h, w, _ = _projection(6, 8, 50, torch.float64, seed=11, bias=False)
    y = _labels((6,), 50, seed=11)
    coef = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    hh = h.clone().requires_grad_()
    loss, _ = pg_kernels.token_loss_from_hidden(
        hh, w, y, lambda s, rows: coef * s.entropy.sum() - s.logprob.sum(), backend=backend
    )
    loss.backward()
    assert coef.grad is None
    h2 = h.clone().requires_grad_()
    st = pg_kernels.token_stats_from_hidden(h2, w, y, backend="reference")
    (0.5 * st.entropy.sum() - st.logprob.sum()).backward()
    torch.testing.assert_close(hh.grad, h2.grad, rtol=1e-10, atol=1e-12)


def test_inputs_not_mutated():
    h, w, b = _projection(9, 8, 50, torch.float32, seed=9)
    y = _labels((9,), 50, seed=9)
    copies = [t.clone() for t in (h, w, b, y)]
    hh = h.requires_grad_()
    pg_kernels.token_loss_from_hidden(hh, w, y, lambda s, r: s.entropy.sum(), bias=b,
                                      chunk_size=4).loss.backward()  # fmt: skip
    for a, c in zip((h, w, b, y), copies):
        assert torch.equal(a.detach(), c)


def test_bad_loss_fn_is_named():
    h, w, _ = _projection(6, 8, 50, torch.float32, seed=10, bias=False)
    y = _labels((6,), 50, seed=10)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        pg_kernels.token_loss_from_hidden(h, w, y, "ppo")
    with pytest.raises(TypeError, match=r"loss_fn must return a 0-d floating tensor, got .*\(6,\)"):
        pg_kernels.token_loss_from_hidden(h, w, y, lambda s, rows: s.logprob)
    with pytest.raises(ValueError, match="weight must have shape"):
        pg_kernels.token_loss_from_hidden(h, w[:, :4], y, lambda s, rows: s.logprob.sum())


def test_auto_order_is_vocabulary_blocks_on_cuda_only_for_the_weight():
    """ "auto": token_stats_from_hidden's choice on CUDA (blocks where the weight's gradient is
    wanted), row chunks on a CPU (matmul-bound: 3 matmuls, not 4), and without any gradient or
    rows; an explicit order is kept wherever there is a gradient to form."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resolve = token_loss_module.resolve_order
    everything, no_weight, none = (True, True, True), (True, False, False), (False,) * 3
    assert resolve("auto", cuda, 10, everything) == "vocab"
    assert resolve("auto", cuda, 10, no_weight) == "rows"
    assert resolve("auto", cpu, 10, everything) == "rows"
    assert resolve("vocab", cpu, 10, no_weight) == "vocab"
    assert resolve("rows", cuda, 10, everything) == "rows"
    assert resolve("vocab", cuda, 10, none) == "rows"  # the outputs only
    assert resolve("vocab", cuda, 0, everything) == "rows"  # no rows
    h, w, _ = _projection(4, 8, 30, torch.float32, seed=6)
    with pytest.raises(ValueError, match="backward_order must be one of"):
        pg_kernels.token_loss_from_hidden(
            h, w, _labels((4,), 30, seed=6), lambda s, r: s.logprob.sum(), backward_order="cols"
        )


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_gradcheck_float64(backend_device, monkeypatch, order):
    """Finite differences against the gradients formed in the forward, w.r.t. hidden, weight
    and bias together: per-row temperatures, an ignored row (its statistics still get upstream
    gradients from loss_fn, which must not reach hidden), chunks of 2 over 5 rows (a ragged
    last one), a loss non-linear in logprob, entropy, collision and lse with per-row weights,
    and an upstream gradient other than 1 (the backward's scaling); vocabulary blocks of 3, 3
    and 1 columns."""
    monkeypatch.setattr(_linear, "MIN_VOCAB_BLOCK", 3)
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(5, 3, 7, torch.float64, seed=21))
    b[1] = 0.0  # finite everywhere: gradcheck perturbs every entry
    y = _labels((5,), 7, seed=21).to(device)
    g = torch.Generator().manual_seed(22)
    t = (torch.rand(5, generator=g, dtype=torch.float64) + 0.5).to(device)
    c = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device)

    def loss_fn(s, rows):
        lp, ent, col, lse = s.logprob, s.entropy, s.collision, s.lse
        terms = (lp.exp(), ent**2, col**2, torch.sin(lse))
        return sum((ci[rows] * x).sum() for ci, x in zip(c, terms))

    def f(h, w, b):
        loss = pg_kernels.token_loss_from_hidden(
            h, w, y, loss_fn, bias=b, temperature=t, chunk_size=2, backward_order=order,
            backend=backend,
        ).loss  # fmt: skip
        return 1.5 * loss

    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    # Interpreted Triton: the full Jacobian (two forwards per input entry) took ~18 s here; fast
    # mode checks a random projection of each input's gradient (~1.5 s).
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


def test_int32_labels_same_stats_as_token_stats_from_hidden():
    """Both ops allocate their outputs with one helper: the same dtypes (argmax int64) whatever
    the labels' integer dtype."""
    h, w, b = _projection(9, 8, 50, torch.float32, seed=11)
    y = _labels((9,), 50, seed=11).to(torch.int32)
    got = pg_kernels.token_loss_from_hidden(h, w, y, lambda s, r: s.entropy.sum(), bias=b,
                                            chunk_size=4).stats  # fmt: skip
    want = pg_kernels.token_stats_from_hidden(h, w, y, bias=b, chunk_size=4)
    for a, c in zip(got, want):
        assert a.dtype == c.dtype and torch.equal(a, c)
