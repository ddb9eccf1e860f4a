"""kl_loss_from_hidden: a per-row loss of the KL between two projections of hidden states, its
gradients formed in the forward.

Its KL comes from the same chunked (or blocked) matmuls and kl_divergence kernels as
kl_divergence_from_hidden, and the gradient of each chunk's logits from the same backward
kernel with the same upstream gradient, so the KL and every gradient equal
kl_divergence_from_hidden's followed by the loss, bitwise for a unit upstream gradient, when
both take the same `backward_order` (that op is checked against float64 in test_from_hidden.py);
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

pytestmark = pytest.mark.op("kl_divergence")

NAMES = ("hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")


def _pair(n, v, dtype, seed, lead=None, device="cpu"):
    """A student (D = 24) and a teacher with its own D = 16: near one-hot rows, -inf bias
    entries (the same token on both sides, so no row is +inf)."""
    student = _projection(n, 24, v, dtype, seed=seed, lead=lead)
    teacher = _projection(n, 16, v, dtype, seed=seed + 1, lead=lead)
    return tuple(t.to(device) for t in (*student, *teacher))


def _distill_loss(n, seed, device="cpu"):
    """A masked token-mean of the KL plus a square term: separable over rows, non-linear."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, generator=g) < 0.8).to(device)

    def loss_fn(kl, rows):
        m = mask[rows].to(kl.dtype)
        return ((kl + 0.1 * kl**2) * m).sum() / mask.sum()

    return loss_fn


def _kl_then_loss(args, loss_fn, **kw):
    """kl_divergence_from_hidden, then loss_fn on all (flattened) rows at once."""
    h, w, b, rh, rw, rb = args
    kl = pg_kernels.kl_divergence_from_hidden(h, w, rh, rw, bias=b, ref_bias=rb, **kw)
    return loss_fn(kl.reshape(-1), slice(0, kl.numel())), kl


def _fused(args, loss_fn, **kw):
    h, w, b, rh, rw, rb = args
    return pg_kernels.kl_loss_from_hidden(h, w, rh, rw, loss_fn, bias=b, ref_bias=rb, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("order", ["rows", "vocab"])
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_equals_kl_divergence_from_hidden_then_the_loss(
    backend_device, narrow_vocab_blocks, dtype, order, direction
):
    """[2, 6] leading dims, chunks of 5 (a ragged last one), labels with an ignored row,
    per-row temperatures on both sides, near one-hot rows, a token masked in both biases,
    vocabulary blocks of 64 columns (a ragged last one); the teacher's gradients too."""
    backend, device = backend_device
    args = _pair(12, 150, dtype, seed=3, lead=(2, 6), device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(4)
    kw = dict(
        direction=direction, labels=_labels((2, 6), 150, seed=3).to(device), chunk_size=5,
        temperature=(torch.rand(2, 6, generator=g, dtype=acc) + 0.4).to(device),
        ref_temperature=(torch.rand(2, 6, generator=g, dtype=acc) + 0.6).to(device),
        backward_order=order, backend=backend,
    )  # fmt: skip
    loss_fn = _distill_loss(12, seed=3, device=device)
    results = []
    for fused in (False, True):
        leaves = [x.clone().requires_grad_() for x in args]
        loss, kl = (_fused if fused else _kl_then_loss)(leaves, loss_fn, **kw)
        loss.backward()
        results.append([loss.detach(), kl.detach(), *(x.grad for x in leaves)])
    unfused, fused = results
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-6, atol=0)  # summed in chunks
    for name, a, c in zip(("kl", *NAMES), fused[1:], unfused[1:]):
        assert torch.equal(a, c), name
    assert not fused[1].requires_grad and fused[1].shape == (2, 6)
    assert float(fused[1].view(-1)[1]) == 0.0  # the ignored row
    if dtype != torch.float32:
        return
    # The backward scales the saved gradients by the loss's upstream gradient (2: exact).
    leaves = [x.clone().requires_grad_() for x in args]
    (2 * _fused(leaves, loss_fn, **kw).loss).backward()
    for name, x, grad in zip(NAMES, leaves, fused[2:]):
        assert torch.equal(x.grad, 2 * grad), name


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_a_frozen_teacher_gets_no_gradient(narrow_vocab_blocks, order):
    """The common case: the teacher's tensors do not require grad (no backward work for that
    side); the student's hidden alone, then its weight alone."""
    args = _pair(20, 300, torch.float32, seed=6)
    loss_fn = _distill_loss(20, seed=6)
    kw = dict(chunk_size=7, backward_order=order, direction="forward")
    for trained in (0, 1):
        fused, unfused = ([t.clone().requires_grad_(i == trained) for i, t in enumerate(args)]
                          for _ in range(2))  # fmt: skip
        _fused(fused, loss_fn, **kw).loss.backward()
        _kl_then_loss(unfused, loss_fn, **kw)[0].backward()
        assert torch.equal(fused[trained].grad, unfused[trained].grad)
        assert all(t.grad is None for i, t in enumerate(fused) if i != trained)
    leaves = [t.clone().requires_grad_() for t in args]
    with torch.no_grad():  # no gradient work: the loss and the KL only
        loss, kl = _fused(leaves, loss_fn, **kw)
    assert not loss.requires_grad and kl.shape == (20,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_loss_matches_float64(dtype, direction):
    """The loss against float64 end to end (the matmuls included), within the ops' rule: at
    most twice the error of plain PyTorch (F.linear in the input dtype, then the KL in fp32)
    plus a floor of 4 fp32 roundings of the loss (each row's KL rounded to fp32, then the
    loss's own fp32 arithmetic over chunks; a loss of ~16 here, seen 1.2e-6 off, 0.65 ulp)."""
    args = _pair(41, 777, dtype, seed=5)
    loss_fn = _distill_loss(41, seed=5)
    loss = _fused(args, loss_fn, chunk_size=16, direction=direction).loss
    h, w, b, rh, rw, rb = args

    def kl(upcast):
        cast = (lambda t: t.double()) if upcast else (lambda t: t)
        logits = F.linear(cast(h), cast(w), cast(b))
        ref_logits = F.linear(cast(rh), cast(rw), cast(rb))
        out = reference.kl_divergence(logits, ref_logits, direction=direction, upcast=upcast)
        return float(loss_fn(out, slice(0, 41)))

    truth, plain = kl(True), kl(False)
    assert abs(float(loss) - truth) <= 2 * abs(plain - truth) + 4 * 2.0**-24 * abs(truth)


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_gradcheck_float64(backend_device, monkeypatch, order):
    """Finite differences against the gradients formed in the forward, w.r.t. all six inputs
    together: per-row temperatures, an ignored row (its KL is 0, and loss_fn's gradient there
    must not reach hidden), chunks of 2 over 5 rows (a ragged last one), a loss non-linear in
    the KL with per-row weights, an upstream gradient other than 1, and vocabulary blocks of 3,
    3 and 1 columns."""
    monkeypatch.setattr(_linear, "MIN_VOCAB_BLOCK", 3)
    backend, device = backend_device
    student = _projection(5, 3, 7, torch.float64, seed=21)
    teacher = _projection(5, 2, 7, torch.float64, seed=23)
    args = [t.to(device) for t in (*student, *teacher)]
    args[2][1] = args[5][1] = 0.0  # finite everywhere: gradcheck perturbs every entry
    y = _labels((5,), 7, seed=21).to(device)
    g = torch.Generator().manual_seed(22)
    t, t_ref = ((torch.rand(5, generator=g, dtype=torch.float64) + 0.5).to(device) for _ in "ab")
    c = torch.randn(5, generator=g, dtype=torch.float64).to(device)

    def loss_fn(kl, rows):
        return (c[rows] * kl + torch.sin(kl)).sum()

    def f(*leaves):
        loss = _fused(leaves, loss_fn, labels=y, temperature=t, ref_temperature=t_ref,
                      chunk_size=2, backward_order=order, backend=backend).loss  # fmt: skip
        return 1.5 * loss

    leaves = [x.clone().requires_grad_() for x in args]
    # Interpreted Triton: fast mode checks a random projection of each input's gradient.
    assert torch.autograd.gradcheck(f, leaves, fast_mode=backend == "triton")


def test_reference_backend_and_compile_agree_and_raise_on_a_second_derivative():
    """The reference path (materialized logits, loss_fn on all rows) against the kernels', the
    kernels' under torch.compile (a graph break: the same eager call, bitwise), and
    create_graph=True raising on both paths (the saved gradients are constants)."""
    args = _pair(13, 301, torch.float32, seed=8)
    loss_fn = _distill_loss(13, seed=8)

    def step(*leaves, backend):
        return _fused(leaves, loss_fn, chunk_size=4, backend=backend)

    results = []
    for fn, backend in ((step, "cpu"), (torch.compile(step), "cpu"), (step, "reference")):
        leaves = [t.clone().requires_grad_() for t in args]
        loss, kl = fn(*leaves, backend=backend)
        if fn is step:
            with pytest.raises(RuntimeError, match="differentiable once"):
                torch.autograd.grad(loss, leaves[0], create_graph=True)
        loss.backward()
        results.append([loss.detach(), kl, *(t.grad for t in leaves)])
    assert all(torch.equal(a, c) for a, c in zip(results[0], results[1]))
    for name, a, c in zip(("loss", "kl", *NAMES), results[0], results[2]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_empty_batch_loss_is_zero(backend):
    """No rows, no chunk: loss_fn is not called and the loss is 0."""
    args = [t[:0] if i in (0, 3) else t for i, t in enumerate(_pair(4, 30, torch.float32, 7))]
    leaves = [t.clone().requires_grad_() for t in args]
    calls = []

    def loss_fn(kl, rows):
        calls.append(rows)
        return kl.mean()

    loss, kl = _fused(leaves, loss_fn, backend=backend)
    loss.backward()
    assert float(loss.detach()) == 0.0 and kl.shape == (0,) and leaves[0].grad.shape == (0, 24)
    assert calls == []


def test_bad_arguments_are_named():
    args = _pair(4, 30, torch.float32, seed=9)
    with pytest.raises(TypeError, match="kl_loss_from_hidden: loss_fn must be callable"):
        _fused(args, None)
    with pytest.raises(TypeError, match="kl_loss_from_hidden: loss_fn must return a 0-d"):
        _fused(args, lambda kl, rows: kl)
    with pytest.raises(ValueError, match="kl_loss_from_hidden: backward_order must be one of"):
        _fused(args, lambda kl, rows: kl.sum(), backward_order="cols")
    with pytest.raises(ValueError, match="kl_loss_from_hidden: ref_weight must have weight's"):
        h, w, b, rh, rw, rb = args
        pg_kernels.kl_loss_from_hidden(h, w, rh, rw[:5], lambda kl, rows: kl.sum())


def test_inputs_not_mutated():
    args = _pair(9, 40, torch.bfloat16, seed=10)
    before = [t.clone() for t in args]
    leaves = [t.clone().requires_grad_() for t in args]
    for order in ("rows", "vocab"):
        _fused(
            leaves, _distill_loss(9, seed=10), chunk_size=4, backward_order=order
        ).loss.backward()
    for name, a, c in zip(NAMES, leaves, before):
        assert torch.equal(a.detach(), c), name
