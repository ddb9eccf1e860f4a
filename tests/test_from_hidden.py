"""token_stats_from_hidden and kl_divergence_from_hidden: the fused lm_head path.

Truth: the float64 op on float64 logits from float64 hidden states and weights. Plain: what a
trainer computes today, F.linear in the input dtype then the reference op at that precision.
The rule is the ops' own (testing.check_against_reference): at most twice plain's error plus
the tables' floors, for every output and for the gradients of hidden, weight and bias.
Cases come from conftest: every backend with a token_stats / kl_divergence kernel.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import pg_kernels
from pg_kernels import reference
from pg_kernels.ops import _linear
from pg_kernels.ops._linear import default_chunk_size
from pg_kernels.outputs import TokenStats
from pg_kernels.reference._util import scaled
from pg_kernels.testing import (
    assert_dominant_entry,
    check_against_reference,
    dominant_entry_rows,
    interpreted,
    make_labels,
)

IGNORE = -100
# argmax is compared in the fp64 test below: from 16-bit logits it may pick the other of two
# tokens whose float64 logits differ by less than the rounding.
FLOAT_FIELDS = ("logprob", "entropy", "collision", "lgp", "lse", "max_prob")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _projection(n, d, v, dtype, seed, *, bias=True, lead=None):
    """hidden [*lead or n, D] ~ N(0, 1); weight scaled so logits have std ~3; a near one-hot row
    (row 0 aligned with one weight row, logit gap ~40); bias with a masked (-inf) token."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (3 / d**0.5)
    h[0] = w[v // 2] / w[v // 2].norm() ** 2 * 40  # logit of token v // 2 is 40 in row 0
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    if b is not None:
        b[1] = -float("inf")
    h = h.view(*lead, d) if lead is not None else h
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _labels(shape, v, seed):
    y = make_labels(shape, v, seed=seed).view(shape)
    flat = y.view(-1)
    flat[1] = IGNORE
    flat[0] = v // 2
    return y


def _ts_op(backend, chunk_size):
    def op(hidden, weight, bias, labels, **kw):
        return pg_kernels.token_stats_from_hidden(
            hidden, weight, labels, bias=bias, chunk_size=chunk_size, backend=backend, **kw
        )

    return op


def _ts_ref(hidden, weight, bias, labels, *, upcast, **kw):
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    logits = F.linear(hidden, weight, bias)
    return reference.token_stats(logits, labels, upcast=upcast, **kw)


@pytest.mark.op("token_stats")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["T0.7", "per-row-T"])
def test_token_stats_from_hidden_matches_float64(backend_device, dtype, per_row):
    backend, device = backend_device
    n, d, v = 37, 24, 1003
    h, w, b = (t.to(device) for t in _projection(n, d, v, dtype, seed=1))
    y = _labels((n,), v, seed=1).to(device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(n, generator=torch.Generator().manual_seed(2), dtype=acc) + 0.4
    temperature = t.to(device) if per_row else 0.7
    # chunk_size 8: four full chunks and a ragged one of 5 rows
    check_against_reference(
        _ts_op(backend, 8), _ts_ref, (h, w, b, y), {"temperature": temperature},
        diff_fields=("logprob", "entropy", "collision", "lse"), grad_args=(0, 1, 2),
        whole_args=(0, 1, 2),
        check_fields=FLOAT_FIELDS,
    )  # fmt: skip


@pytest.mark.op("token_stats")
def test_token_stats_from_hidden_leading_dims_strided_no_bias(backend_device):
    """[B, T, D] hidden read through a strided view (every other position), no bias."""
    backend, device = backend_device
    h, w, _ = _projection(2 * 2 * 9, 16, 257, torch.float32, seed=3, bias=False, lead=(2, 18))
    h, w = h.to(device)[:, ::2], w.to(device)
    assert not h.is_contiguous()
    y = _labels((2, 9), 257, seed=3).to(device)
    check_against_reference(
        _ts_op(backend, 4), _ts_ref, (h, w, None, y), {},
        diff_fields=("logprob", "entropy", "collision", "lse"), grad_args=(0, 1),
        whole_args=(0, 1),
        check_fields=FLOAT_FIELDS,
    )  # fmt: skip


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_shifted_hidden_is_read_in_place():
    """last_hidden_state[:, :-1] (two strided levels): no copy of it is saved for the backward
    (every saved tensor of its size lives in the caller's storage), and chunks that
    straddle two sequences give the values of the contiguous copy bitwise."""
    base, w, b = _projection(3 * 8, 16, 300, torch.float32, seed=9, lead=(3, 8))
    y, w_ref = _labels((3, 7), 300, seed=9), w * 0.5
    calls = {
        "token_stats": lambda h, w: pg_kernels.token_stats_from_hidden(
            h, w, y, bias=b, chunk_size=5).logprob,
        "kl_divergence": lambda h, w: pg_kernels.kl_divergence_from_hidden(
            h, w, h.detach(), w_ref, chunk_size=5),
        "token_loss": lambda h, w: pg_kernels.token_loss_from_hidden(
            h, w, y, lambda s, r: s.logprob.sum(), bias=b, chunk_size=5).loss,
    }  # fmt: skip
    for name, call in calls.items():
        leaf = base.clone().requires_grad_()
        h = leaf[:, :-1]
        assert not h.is_contiguous()
        saved: list[torch.Tensor] = []

        def pack(t, saved=saved):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call(h, w)
        if name != "token_loss":  # which saves its gradients, not its inputs
            big = [t for t in saved if t.numel() >= h.numel() and t.shape[-1] == h.shape[-1]]
            assert big and _storages(big) <= _storages([leaf, w, w_ref]), name
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        dense = leaf.detach()[:, :-1].contiguous().requires_grad_()
        expected = call(dense, w)
        assert torch.equal(out, expected), name
        (grad_dense,) = torch.autograd.grad(expected.sum(), dense)
        assert torch.equal(grad[:, :-1], grad_dense) and not grad[:, -1].any(), name


@pytest.mark.op("token_stats")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_features_gives_the_bias_logits(backend_device, dtype):
    """D == 0: logits = bias on every row (a [N, 0] @ [0, V] product is 0); the gradients are the
    bias's, and empty ones for hidden and weight (16-bit weights: their fp32 accumulator's
    vocabulary blocks once divided by D, found by the fuzzer)."""
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(5, 4, 40, dtype, seed=10))
    h, w = h[:, :0].requires_grad_(), w[:, :0].requires_grad_()
    b.requires_grad_()
    y = _labels((5,), 40, seed=10).to(device)
    fused = _ts_op(backend, 2)(h, w, b, y, temperature=0.7)
    plain = pg_kernels.token_stats(b.expand(5, 40), y, temperature=0.7, backend=backend)
    for name, a, c in zip(fused._fields, fused, plain):
        assert torch.equal(a, c), name
    grads = torch.autograd.grad((fused.logprob + fused.entropy).sum(), (h, w, b))
    expected = torch.autograd.grad((plain.logprob + plain.entropy).sum(), b)[0]
    assert grads[0].shape == (5, 0) and grads[1].shape == (40, 0)
    tol = 1e-6 if dtype == torch.float32 else 2**-7  # bf16: each side rounds its sum once
    torch.testing.assert_close(grads[2], expected, rtol=tol, atol=tol)
    if backend not in pg_kernels._backend.KERNELS["kl_divergence"]:
        return  # the CUDA backend has token_stats' kernel alone
    kl = pg_kernels.kl_divergence_from_hidden(h, w, h, w, bias=b, ref_bias=b.detach() * 0.5,
                                              chunk_size=2, backend=backend)  # fmt: skip
    plain_kl = pg_kernels.kl_divergence(b.expand(5, 40), b.detach().expand(5, 40) * 0.5,
                                        backend=backend)  # fmt: skip
    assert torch.equal(kl, plain_kl)


@pytest.mark.op("token_stats")
def test_token_stats_from_hidden_equals_token_stats_of_the_logits(backend_device):
    """Same rows, same kernel: only the matmul's chunking differs (fp64: to the last bits)."""
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(19, 8, 300, torch.float64, seed=4))
    y = _labels((19,), 300, seed=4).to(device)
    fused = pg_kernels.token_stats_from_hidden(h, w, y, bias=b, chunk_size=5, backend=backend)
    plain = pg_kernels.token_stats(F.linear(h, w, b), y, backend=backend)
    for name, a, c in zip(fused._fields, fused, plain):
        if name == "argmax":
            assert torch.equal(a, c)
        else:
            torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-13, msg=name)


def _kl_op(backend, chunk_size):
    def op(hidden, weight, bias, ref_hidden, ref_weight, **kw):
        return pg_kernels.kl_divergence_from_hidden(
            hidden, weight, ref_hidden, ref_weight, bias=bias, chunk_size=chunk_size,
            backend=backend, **kw,
        )  # fmt: skip

    return op


def _kl_ref(hidden, weight, bias, ref_hidden, ref_weight, *, upcast, backward_order=None, **kw):
    if upcast:
        hidden, weight, ref_hidden, ref_weight = (
            t.double() for t in (hidden, weight, ref_hidden, ref_weight)
        )
        bias = None if bias is None else bias.double()
    return reference.kl_divergence(
        F.linear(hidden, weight, bias), F.linear(ref_hidden, ref_weight), upcast=upcast, **kw
    )


@pytest.mark.op("kl_divergence")
@pytest.mark.parametrize("order", ["rows", "vocab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_divergence_from_hidden_matches_float64(
    backend_device, dtype, direction, order, request, monkeypatch
):
    """A teacher with its own width (D_ref = 40 vs D = 24) and no bias; gradients to all five;
    in row chunks of 6 and in 16 vocabulary blocks of 64 columns (4 of 256 under the Triton
    interpreter, whose cost grows with the blocks' launches: the blocks' merge is the same
    Python on every backend)."""
    backend, device = backend_device
    if order == "vocab":
        request.getfixturevalue("narrow_vocab_blocks")
        if interpreted(backend, device):
            monkeypatch.setattr(_linear, "MIN_VOCAB_BLOCK", 256)
    n, v = 29, 1001
    h, w, b = (t.to(device) for t in _projection(n, 24, v, dtype, seed=5))
    b[1] = 0.0  # a -inf student logit under a finite teacher one makes KL infinite
    rh, rw, _ = (t.to(device) if t is not None else t for t in
                 _projection(n, 40, v, dtype, seed=6, bias=False))  # fmt: skip
    y = _labels((n,), v, seed=5).to(device)
    t = (torch.rand(n, generator=torch.Generator().manual_seed(7)) + 0.5).to(device)
    kw = {"direction": direction, "labels": y, "temperature": 0.8, "ref_temperature": t}
    if dtype == torch.float64:
        kw["ref_temperature"] = t.double()
    kw["backward_order"] = order
    check_against_reference(
        _kl_op(backend, 6), _kl_ref, (h, w, b, rh, rw), kw, diff_fields=("out",),
        grad_args=(0, 1, 2, 3, 4), whole_args=(0, 1, 2, 3, 4),
    )  # fmt: skip


@pytest.mark.op("kl_divergence")
def test_kl_divergence_from_hidden_student_only_gradients(backend_device):
    """A frozen teacher (no grad) gets no gradient work; the student's grads match both-sided."""
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(11, 8, 97, torch.float64, seed=8))
    rh, rw, rb = (t.to(device) for t in _projection(11, 8, 97, torch.float64, seed=9))
    b[1] = rb[1] = 0.0
    hs = [h.clone().requires_grad_(), h.clone().requires_grad_()]
    rws = [rw.clone(), rw.clone().requires_grad_()]
    grads = []
    for hh, rww in zip(hs, rws):
        kl = pg_kernels.kl_divergence_from_hidden(
            hh, w, rh, rww, bias=b, ref_bias=rb, chunk_size=4, backend=backend
        )
        kl.sum().backward()
        grads.append(hh.grad)
    assert rws[0].grad is None and rws[1].grad is not None
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _kl_leaves_grads(args, order, backend, **kw):
    """kl_divergence_from_hidden of fresh leaves (hidden, weight, bias, ref_hidden, ref_weight,
    ref_bias) in `order`, a random weighting of its rows backpropagated: [kl, *their grads]."""
    leaves = [t.clone().requires_grad_() for t in args]
    h, w, b, rh, rw, rb = leaves
    kl = pg_kernels.kl_divergence_from_hidden(
        h, w, rh, rw, bias=b, ref_bias=rb, backward_order=order, backend=backend, **kw
    )
    up = torch.rand(kl.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (up.to(kl) * kl).sum().backward()  # drawn in fp64: the same weights in every dtype
    return [kl.detach(), *(t.grad for t in leaves)]


@pytest.mark.op("kl_divergence")
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_vocab_blocks_equal_row_chunks(backend_device, narrow_vocab_blocks, direction):
    """fp64: the KL and all six gradients agree between the orders to the last bits of their
    sums (vocabulary blocks merged as vocab-parallel shards, against whole rows), with ignore
    rows, per-row temperatures on both sides, a token masked in both biases, a near one-hot row
    on both sides whose top entry lies in a middle block, and a ragged last block (V = 333:
    five blocks of 64 and one of 13)."""
    backend, device = backend_device
    n, v = 17, 333
    student = _projection(n, 12, v, torch.float64, seed=61)
    teacher = _projection(n, 7, v, torch.float64, seed=62)
    args = tuple(t.to(device) for t in (*student, *teacher))
    g = torch.Generator().manual_seed(63)
    kw = {
        "direction": direction, "labels": _labels((n,), v, seed=61).to(device), "chunk_size": 5,
        "temperature": (torch.rand(n, generator=g, dtype=torch.float64) + 0.4).to(device),
        "ref_temperature": (torch.rand(n, generator=g, dtype=torch.float64) + 0.6).to(device),
    }  # fmt: skip
    rows = _kl_leaves_grads(args, "rows", backend, **kw)
    vocab = _kl_leaves_grads(args, "vocab", backend, **kw)
    names = ("kl", "hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias")
    for name, a, c in zip(names, rows, vocab):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-13, msg=name)
    ignored = kw["labels"] == IGNORE
    assert ignored.sum() >= 1 and torch.equal(rows[0] > 0, ~ignored)  # 0 on ignored rows only


@pytest.mark.op("kl_divergence")
@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_kl_dominant_entry_across_vocab_blocks(backend_device, narrow_vocab_blocks, direction):
    """Finding (9) across vocabulary blocks: rows whose weight side has a dominant entry (rests
    of 1e-17 .. 1e-7) in the second of five blocks, where the kernels write that entry's
    gradient as minus the sum of the row's others (docs/fidelity.md); the others in the other
    blocks come in from their partial states (`outside_terms`), as across vocab-parallel ranks.
    Logits = hidden @ I, so hidden's gradient is the logits'. Held to `assert_dominant_entry`'s
    rule (2x plain fp32 PyTorch's error there, and the others' rounding); with the other
    blocks' terms left out, fp32 at tau 1 read 1.5e-4 .. 2.7e-4 off on the rows of rest ~1e-7,
    where the rule allows 8.7e-8 .. 2.0e-7."""
    backend, device = backend_device
    v = 300
    w, other = dominant_entry_rows(v)
    x, xr = (w, other) if direction == "reverse" else (other, w)
    side = 1 if direction == "reverse" else 4  # the weight side's hidden: its logits' gradient
    eye, zero = torch.eye(v, dtype=torch.float64), torch.zeros(v, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        args = tuple(t.to(dtype) for t in (x, eye, zero, xr, eye, zero))
        for tau in (1.0, 0.7):
            kw = {"direction": direction, "temperature": tau}
            truth = _kl_leaves_grads(tuple(t.double() for t in args), "rows", "reference", **kw)
            plain = _kl_leaves_grads(tuple(t.float() for t in args), "rows", "reference", **kw)
            ours = _kl_leaves_grads(tuple(t.to(device) for t in args), "vocab", backend, **kw)
            lp, lq = (scaled(t, tau, torch.float64).log_softmax(-1) for t in args[::3])
            lw, lv = (lp, lq) if direction == "reverse" else (lq, lp)
            assert_dominant_entry(ours[side], truth[side], plain[side], lw, lv, dtype, (dtype, tau))


# --- the contract: chunking, memory, compile, opcheck, inputs ----------------------------


def test_default_chunk_size():
    assert default_chunk_size(32000, torch.float32) == 512
    assert default_chunk_size(151936, torch.bfloat16) == 192
    assert default_chunk_size(262144, torch.float32) == 64
    assert default_chunk_size(1 << 20, torch.float64) == 8  # huge vocab: a few rows
    assert default_chunk_size(1 << 30, torch.float64) == 1  # never 0


def test_results_do_not_depend_on_chunk_size():
    """Each row's statistics come from its own logits whatever the chunking (fp64: exact up to
    the matmul's summation order); weight gradients sum the same rows in another grouping."""
    h, w, b = _projection(23, 8, 211, torch.float64, seed=10)
    y = _labels((23,), 211, seed=10)
    results = []
    for chunk in (1, 5, 23, None):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = pg_kernels.token_stats_from_hidden(hh, ww, y, bias=b, chunk_size=chunk)
        (out.logprob + out.entropy).sum().backward()
        results.append((out.logprob, out.entropy, hh.grad, ww.grad))
    for other in results[1:]:
        for a, c in zip(results[0], other):
            torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-14)


def test_peak_memory_is_one_chunk_not_n_by_v():
    """The forward allocates one chunk of logits, not [N, V] (profiler allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    n, v, d, chunk = 512, 4096, 16, 32
    h, w, _ = _projection(n, d, v, torch.float32, seed=11, bias=False)
    y = _labels((n,), v, seed=11)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        pg_kernels.token_stats_from_hidden(h, w, y, chunk_size=chunk, backend="cpu")
    sizes = [
        e.nbytes()
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.nbytes() > 0
    ]
    assert sizes, "the profiler recorded no allocation"
    assert max(sizes) <= chunk * v * 4, f"largest allocation {max(sizes)} B > one chunk"


def _backward_allocations(dtype, d, order):
    """Sizes of the allocations of one backward at N = 512, V = 4096, chunk_size 32 (profiler
    allocation events), and the vocabulary block size."""
    from torch.profiler import ProfilerActivity, profile

    n, v, chunk = 512, 4096, 32
    h, w, _ = _projection(n, d, v, dtype, seed=11, bias=False)
    y = _labels((n,), v, seed=11)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = pg_kernels.token_stats_from_hidden(
        hh, ww, y, chunk_size=chunk, backward_order=order, backend="cpu"
    )
    loss = (out.logprob + out.entropy).sum()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    sizes = [
        e.nbytes()
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.nbytes() > 0
    ]
    assert sizes, "the profiler recorded no allocation"
    return sizes, _linear.vocab_block_size(v, d, dtype)


def test_backward_peak_memory_is_one_block_not_n_by_v():
    """A backward in vocabulary blocks allocates one block of every row's logits with its
    extra columns (and its gradient), not [N, V]: fp32, where the CPU matmuls make no fp32
    copies of their operands (for bf16 they do, of the block too)."""
    sizes, block = _backward_allocations(torch.float32, 16, "auto")
    assert block == _linear.MIN_VOCAB_BLOCK == 1024  # V / 4: four blocks
    tile = 512 * (block + 16) * 4
    assert max(sizes) <= tile, f"largest allocation {max(sizes)} B > one block {tile} B"


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_16bit_weight_gradient_accumulator_only_in_row_chunks(order):
    """The fp32 [V, D] accumulator of a 16-bit weight gradient exists in row-chunk order only:
    in vocabulary blocks each block's weight gradient is one matmul, written once."""
    sizes, _ = _backward_allocations(torch.bfloat16, 24, order)
    assert ((4096 * 24 * 4) in sizes) == (order == "rows")


def test_inputs_not_mutated():
    h, w, b = _projection(9, 8, 50, torch.float32, seed=12)
    y = _labels((9,), 50, seed=12)
    copies = [t.clone() for t in (h, w, b, y)]
    hh = h.requires_grad_()
    out = pg_kernels.token_stats_from_hidden(hh, w, y, bias=b, chunk_size=4)
    out.entropy.sum().backward()
    for a, c in zip((h, w, b, y), copies):
        assert torch.equal(a.detach(), c)


def test_compile_fullgraph_matches_eager():
    h, w, b = _projection(13, 8, 301, torch.float32, seed=13)
    rh, rw, _ = _projection(13, 12, 301, torch.float32, seed=14, bias=False)
    b[1] = 0.0
    y = _labels((13,), 301, seed=13)

    def step(h, w, b):
        s = pg_kernels.token_stats_from_hidden(h, w, y, bias=b, temperature=0.9, chunk_size=4)
        kl = pg_kernels.kl_divergence_from_hidden(h, w, rh, rw, bias=b, chunk_size=4)
        return (s.logprob + s.entropy - s.collision + kl).sum(), (s.logprob, s.entropy, s.lgp, kl)

    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        loss, outs = fn(*leaves)
        loss.backward()  # (the sum itself may be fused in another order: not compared)
        results.append([*(o.detach() for o in outs), *(t.grad for t in leaves)])
    for a, c in zip(*results):
        assert torch.equal(a, c)


@pytest.mark.op("token_stats")
@pytest.mark.cpu_backends("cpu", "triton")
def test_opcheck(backend_device, narrow_vocab_blocks):
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(7, 8, 33, torch.float32, seed=15))
    rh, rw, _ = (t.to(device) if t is not None else t for t in
                 _projection(7, 8, 33, torch.float32, seed=16, bias=False))  # fmt: skip
    b[1] = 0.0
    y = _labels((7,), 33, seed=15).to(device)
    t = torch.rand(7, device=device) + 0.5
    ops = torch.ops.pg_kernels
    # V = 150: three vocabulary blocks (64, 64, 22 columns) for "vocab"
    hv, wv, bv = (x.to(device) for x in _projection(7, 8, 150, torch.float32, seed=15))
    yv = _labels((7,), 150, seed=15).to(device)
    for order, (hh, ww, bb, yy) in (("rows", (h, w, b, y)), ("vocab", (hv, wv, bv, yv))):
        bb[1] = 0.0
        torch.library.opcheck(
            ops.token_stats_from_hidden.default,
            (hh.requires_grad_(), ww.requires_grad_(), bb.requires_grad_(), yy, t, 1.0, IGNORE,
             3, order, backend),
        )  # fmt: skip
    kl_backend = backend if backend in pg_kernels.ops.kl_divergence.KERNELS else "cpu"
    if device == "cpu" or kl_backend != "cpu":
        for order, (hh, ww, bb, yy) in (("rows", (h, w, b, y)), ("vocab", (hv, wv, bv, yv))):
            teacher = _projection(7, 5, ww.shape[0], torch.float32, seed=16, bias=False)
            rhh, rww = (x.to(device) for x in teacher[:2])
            torch.library.opcheck(
                ops.kl_divergence_from_hidden.default,
                (hh, ww, bb, rhh.requires_grad_(), rww, None, yy, None, 0.9, t, 1.0, IGNORE,
                 "forward", 3, order, kl_backend),
            )  # fmt: skip


BAD = [
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w.t(), y), ValueError,
     "weight must have shape [V, D]"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w.double(), y), TypeError,
     "weight must have hidden's dtype"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y, bias=w[:, 0][:-1]), ValueError,
     "bias must have shape [V]"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y[:-1]), ValueError,
     "labels must have the leading shape (6,) of hidden"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y.float()), TypeError,
     "labels must be int64 or int32"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y, chunk_size=0), ValueError,
     "chunk_size must be a positive int"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y + 1000), ValueError,
     "is outside [0, 50)"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y, temperature=0.0), ValueError,
     "temperature must be finite and > 0"),
    (lambda h, w, y: pg_kernels.kl_divergence_from_hidden(h, w, h, w[:-1]), ValueError,
     "ref_weight must have weight's vocabulary size"),
    (lambda h, w, y: pg_kernels.kl_divergence_from_hidden(h, w, h[:-1], w), ValueError,
     "ref_hidden must have hidden's leading shape"),
    (lambda h, w, y: pg_kernels.kl_divergence_from_hidden(h, w, h.double(), w.double()),
     TypeError, "ref_hidden must have hidden's dtype"),
    (lambda h, w, y: pg_kernels.kl_divergence_from_hidden(h, w, h, w, direction="up"),
     ValueError, "direction must be one of"),
    # rows in three strided levels: reading them without a copy is not possible
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(
        h.repeat(3, 1).view(2, 3, 3, 8)[:, :2, :2], w, y.repeat(2)[:8].view(2, 2, 2)), ValueError,
     "hidden with shape (2, 2, 2, 8) and strides (72, 24, 8, 1) cannot be read as rows"),
    (lambda h, w, y: pg_kernels.kl_divergence_from_hidden(
        h.repeat(2, 1)[:8].view(2, 2, 2, 8), w, h.repeat(3, 1).view(2, 3, 3, 8)[:, :2, :2], w),
     ValueError, "ref_hidden with shape (2, 2, 2, 8)"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y, temperature=torch.ones(5)),
     ValueError, "(the leading shape of hidden)"),
    (lambda h, w, y: pg_kernels.token_stats_from_hidden(h, w, y, backend="tpu"), ValueError,
     "token_stats_from_hidden: backend must be one of"),
    (lambda h, w, y: pg_kernels.token_loss_from_hidden(h, w, y, lambda s, r: s.lse.sum(),
                                                       backend="tpu"), ValueError,
     "token_loss_from_hidden: backend must be one of"),
    (lambda h, w, y: pg_kernels.kl_divergence_from_hidden(h, w, h, w, backend="tpu"), ValueError,
     "kl_divergence_from_hidden: backend must be one of"),
]  # fmt: skip


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_input_names_the_argument(call, exc, match):
    h, w, _ = _projection(6, 8, 50, torch.float32, seed=17, bias=False)
    y = _labels((6,), 50, seed=17)
    with pytest.raises(exc, match=re.escape(match)):
        call(h, w, y)


@pytest.mark.parametrize("order", ["rows", "vocab"])
def test_16bit_product_in_blocks(monkeypatch, narrow_vocab_blocks, order):
    """The 16-bit gradient product summed in fp32 (the weight's in row-chunk order, hidden's in
    vocabulary-block order) formed PRODUCT_BYTES at a time sums to the same bits as in one
    piece: each entry is the same dot product, rounded once, added once."""
    h, w, b = _projection(21, 16, 300, torch.bfloat16, seed=18)
    y = _labels((21,), 300, seed=18)

    def grads():
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = pg_kernels.token_stats_from_hidden(
            hh, ww, y, bias=b, chunk_size=8, backward_order=order
        )
        (out.logprob + out.entropy).sum().backward()
        return hh.grad, ww.grad

    whole = grads()
    monkeypatch.setattr(_linear, "PRODUCT_BYTES", 5 * 16 * 2)  # 5-row pieces, a ragged last
    for a, c in zip(grads(), whole):
        assert torch.equal(a, c)


def test_backward_order():
    """Order "auto": vocabulary blocks where the weight gradient is wanted, at any N, row chunks
    otherwise; "rows" and "vocab" are taken as given; an empty batch takes row chunks."""
    from pg_kernels.ops._linear import backward_order

    everything, no_weight = (True, True, True), (True, False, True)
    for n in (1, 100, 10**6):
        assert backward_order("auto", n, everything) == "vocab"
        assert backward_order("auto", n, no_weight) == "rows"
        assert backward_order("rows", n, everything) == "rows"
        assert backward_order("vocab", n, no_weight) == "vocab"
    assert backward_order("auto", 0, everything) == "rows"
    h, w, _ = _projection(4, 3, 10, torch.float32, seed=1)
    with pytest.raises(ValueError, match="backward_order must be one of"):
        pg_kernels.token_stats_from_hidden(h, w, _labels((4,), 10, 1), backward_order="cols")
    with pytest.raises(ValueError, match="kl_divergence_from_hidden: backward_order must be"):
        pg_kernels.kl_divergence_from_hidden(h, w, h, w, backward_order="cols")


def _ordered_grads(order, args, chunk_size, backend, **kw):
    h, w, b, y = args
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    out = pg_kernels.token_stats_from_hidden(
        leaves[0], leaves[1], y, bias=leaves[2], chunk_size=chunk_size, backward_order=order,
        backend=backend, **kw,
    )  # fmt: skip
    g = torch.Generator().manual_seed(5)
    up = [torch.randn(out.logprob.shape, generator=g, dtype=out.logprob.dtype) for _ in range(4)]
    loss = sum((u.to(h.device) * f).nansum() for u, f in
               zip(up, (out.logprob, out.entropy, out.collision, out.lse)))  # fmt: skip
    loss.backward()
    return [t.grad for t in leaves]


@pytest.mark.op("token_stats")
@pytest.mark.parametrize("chunk_size", [1, 7, 64])
def test_vocab_block_backward_equals_row_chunks(backend_device, narrow_vocab_blocks, chunk_size):
    """fp64: the two backward orders agree to the last bits of their sums (the same gradient
    entries, summed over vocabulary blocks or row chunks), on rows whose argmax and label fall
    in every block, a masked (-inf) bias entry (one row's label), ignore rows, a NaN row,
    per-row temperatures and a ragged last block (V = 333: five blocks of 64 and one of 13)."""
    backend, device = backend_device
    n, d, v = 29, 12, 333
    h, w, b = (t.to(device) for t in _projection(n, d, v, torch.float64, seed=31))
    h[3] = float("nan")  # a NaN row: NaN gradient rows in hidden, NaN weight and bias gradients
    y = _labels((n,), v, seed=31).to(device)
    y[7] = y[8] = IGNORE
    y[9] = 1  # the masked token: a log-prob of -inf, a finite gradient row
    t = torch.rand(n, generator=torch.Generator().manual_seed(32), dtype=torch.float64) + 0.3
    args = (h, w, b, y)
    kw = {"temperature": t.to(device)}
    rows = _ordered_grads("rows", args, chunk_size, backend, **kw)
    vocab = _ordered_grads("vocab", args, chunk_size, backend, **kw)
    for name, a, c in zip(("hidden", "weight", "bias"), rows, vocab):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-13, equal_nan=True, msg=name)
    nan_rows = rows[0].isnan().any(1)
    assert nan_rows[3] and nan_rows.sum() == 1


@pytest.mark.op("token_stats")
@pytest.mark.parametrize("ignore_index", [5, 65, 0])
def test_vocab_blocks_with_a_column_index_as_ignore_index(
    backend_device, narrow_vocab_blocks, ignore_index
):
    """A non-negative ignore_index that is a column index inside a block (5: label 69 is
    column 5 of the second 64-wide block), the blocks' dropped-label column (65), or a label
    (0): the kernel sees the blocks' own labels, so ignored rows are marked apart from them
    (a kept row read as ignored lost its block's gradient: 2.69 -> 0.016 of weight[64:])."""
    backend, device = backend_device
    h, w, b = (t.to(device) for t in _projection(6, 8, 200, torch.float64, seed=41))
    y = torch.tensor([69, 3, 65, ignore_index, 130, 5], device=device)
    args = (h, w, b, y)
    kw = {"ignore_index": ignore_index, "temperature": 0.9}
    rows = _ordered_grads("rows", args, 1, backend, **kw)
    vocab = _ordered_grads("vocab", args, 1, backend, **kw)
    for name, a, c in zip(("hidden", "weight", "bias"), rows, vocab):
        torch.testing.assert_close(c, a, rtol=1e-12, atol=1e-13, msg=name)
    ignored = (y == ignore_index).cpu()
    grad_rows = rows[0].cpu().abs().amax(1)
    assert not grad_rows[ignored].any() and (grad_rows[~ignored] > 0).all()


def test_empty_batch_backward():
    """N = 0 (e.g. the shifted rows of T = 1 sequences) with the weight's gradient wanted: empty
    gradients in either order (the blocks' empty buffers made the kernel's aliasing check fail)."""
    for order in ("auto", "vocab", "rows"):
        h = torch.randn(2, 1, 8)[:, :-1].requires_grad_()
        w = torch.randn(100, 8, requires_grad=True)
        y = torch.zeros(2, 0, dtype=torch.long)
        out = pg_kernels.token_stats_from_hidden(h, w, y, backward_order=order)
        (out.logprob.sum() + out.entropy.sum()).backward()
        assert h.grad.shape == (2, 0, 8) and not w.grad.any()


@pytest.mark.parametrize("order", ["auto", "rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rows_do_not_depend_on_the_batch_size(narrow_vocab_blocks, dtype, order):
    """A row's statistics and hidden gradient are the same bits in batches of 1, 37 and 300 rows
    (C++; "auto" takes vocabulary blocks, here 47 of them). The blocks' width and the order do
    not follow N: with a width of chunk_size x V / N (before) 40 % of these hidden-gradient
    entries moved between 37 and 300 rows, by up to 86 bf16 ulps of the entry. 16-bit, where
    this CPU's matmul gives a row the same bits at any number of rows; an fp32 or fp64 matmul
    of a single row takes another BLAS path (gemv), its last bits apart."""
    h, w, b = _projection(300, 16, 3000, dtype, seed=51)
    y = _labels((300,), 3000, seed=51)
    up = torch.randn(4, 300, generator=torch.Generator().manual_seed(52))

    def run(n):
        hh, ww = h[:n].clone().requires_grad_(), w.clone().requires_grad_()
        out = pg_kernels.token_stats_from_hidden(
            hh, ww, y[:n], bias=b, chunk_size=16, backward_order=order, backend="cpu"
        )
        fields = (out.logprob, out.entropy, out.collision, out.lse)
        sum((u[:n] * f).sum() for u, f in zip(up, fields)).backward()
        return [*out, hh.grad]

    whole = run(300)
    for n in (1, 37):
        for name, a, c in zip((*TokenStats._fields, "grad hidden"), run(n), whole):
            assert torch.equal(a, c[:n]), (n, name)


@pytest.mark.parametrize("order", ["auto", "rows"])
def test_kl_rows_do_not_depend_on_the_batch_size(narrow_vocab_blocks, order):
    """kl_divergence_from_hidden, bf16 on C++: a row's KL and both sides' hidden gradients are
    the same bits in batches of 1, 37 and 300 rows ("auto": 47 vocabulary blocks, merged per
    row)."""
    student = _projection(300, 16, 3000, torch.bfloat16, seed=53)
    teacher = _projection(300, 12, 3000, torch.bfloat16, seed=54)
    y = _labels((300,), 3000, seed=53)

    def run(n):
        h, w, b, rh, rw, rb = (t[:n] if i in (0, 3) else t for i, t in
                               enumerate((*student, *teacher)))  # fmt: skip
        h, rh = h.clone().requires_grad_(), rh.clone().requires_grad_()
        kl = pg_kernels.kl_divergence_from_hidden(
            h, w, rh, rw, bias=b, ref_bias=rb, labels=y[:n], temperature=0.9, chunk_size=16,
            backward_order=order, backend="cpu",
        )  # fmt: skip
        up = torch.linspace(0.5, 1.5, 300, dtype=torch.float32)[:n]
        (up * kl).sum().backward()
        return kl.detach(), h.grad, rh.grad

    whole = run(300)
    for n in (1, 37):
        for name, a, c in zip(("kl", "grad hidden", "grad ref_hidden"), run(n), whole):
            assert torch.equal(a, c[:n]), (n, name)


def _plain_projection(n, d, v, seed):
    """float64 hidden [n, d] ~ N(0, 1), weight [v, d] ~ N(0, 1/4) and labels, no bias."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5
    return h, w, torch.randint(0, v, (n,), generator=g)


def test_16bit_hidden_gradient_sums_blocks_in_fp32(narrow_vocab_blocks):
    """Vocabulary blocks of 64 columns (64 of them) give a bf16 hidden gradient about as
    accurate as row chunks, whose hidden gradient is one matmul over the whole vocabulary, and
    a bf16 weight gradient at least as accurate (one matmul over every row, rounded once).
    Measured max errors against float64 (largest entries 2.8 and 4.9): hidden 0.0223 in
    blocks, 0.0243 in row chunks; weight 0.0536 both (the logits' own bf16 rounding)."""
    h, w, y = _plain_projection(64, 16, 4096, seed=33)

    def grads(dtype, order):
        hh, ww = (t.to(dtype).clone().requires_grad_() for t in (h, w))
        out = pg_kernels.token_stats_from_hidden(hh, ww, y, chunk_size=1, backward_order=order)
        (out.logprob + out.entropy).sum().backward()
        return hh.grad.double(), ww.grad.double()

    truth = grads(torch.float64, "rows")
    rows = [(a - t).abs().max() for a, t in zip(grads(torch.bfloat16, "rows"), truth)]
    vocab = [(a - t).abs().max() for a, t in zip(grads(torch.bfloat16, "vocab"), truth)]
    assert vocab[0] <= 2 * rows[0], (float(vocab[0]), float(rows[0]))
    assert vocab[1] <= rows[1], (float(vocab[1]), float(rows[1]))


def test_16bit_weight_gradient_sums_chunks_in_fp32():
    """One-row chunks (512 of them) give a bf16 weight gradient as accurate as one chunk of all
    rows: the chunks' products are summed in fp32, not in a bf16 running sum (measured max
    errors against the float64 gradient, largest entry 29: 0.092 either way; a bf16 running
    sum, 1.21)."""
    h, w, y = _plain_projection(512, 8, 64, seed=21)

    def weight_grad(dtype, chunk):
        ww = w.to(dtype).clone().requires_grad_()
        out = pg_kernels.token_stats_from_hidden(
            h.to(dtype), ww, y, chunk_size=chunk, backward_order="rows"
        )
        out.logprob.sum().backward()
        return ww.grad.double()

    truth = weight_grad(torch.float64, None)
    one_chunk = (weight_grad(torch.bfloat16, 512) - truth).abs().max()
    row_chunks = (weight_grad(torch.bfloat16, 1) - truth).abs().max()
    assert row_chunks <= 2 * one_chunk, (float(row_chunks), float(one_chunk))


def test_gradcheck_float64():
    """Finite differences against autograd through both fused ops: hidden, weight and bias of
    the policy, and the teacher's hidden (tiny fp64 shapes, ragged chunks)."""
    h, w, b = _projection(5, 3, 7, torch.float64, seed=19)
    rh, rw, _ = _projection(5, 4, 7, torch.float64, seed=20, bias=False)
    b[1] = 0.0  # finite everywhere: gradcheck perturbs every entry
    y = _labels((5,), 7, seed=19)

    def f(h, w, b, rh):
        s = pg_kernels.token_stats_from_hidden(h, w, y, bias=b, temperature=0.8, chunk_size=2)
        kl = pg_kernels.kl_divergence_from_hidden(h, w, rh, rw, bias=b, chunk_size=2)
        return s.logprob, s.entropy, s.collision, s.lse, kl

    leaves = [t.clone().requires_grad_() for t in (h, w, b, rh)]
    assert torch.autograd.gradcheck(f, leaves)
