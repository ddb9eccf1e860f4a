"""The op contract on every GPU kernel: each (op, backend) with a kernel, on CUDA tensors.

Per op and backend: torch.library.opcheck, gradcheck (fp64, tiny shapes), torch.compile
(fullgraph=True) equal to eager, determinism and batch invariance at a real vocabulary
(V = 151936 bf16: many chunk programs per row), a launch on a non-default stream, CUDA-graph
capture and replay of forward + backward, tensors on a GPU that is not the current one, and no
host sync inside forward + backward. Cases come from conftest (`op_backend_device`): the CUDA
ones carry the `gpu` mark and skip without a GPU ("no GPU") or without the CUDA extension; the
device-guard test skips with "needs 2 GPUs" on a one-GPU machine. Tests whose logic can run on
CPU tensors also run there at small shapes (the C++ kernels; opcheck and compile also the
interpreted Triton ones, through the same guarded launchers), so CPU CI exercises the adapters
and checks below.

Each op enters through a small adapter (`ADAPTERS`): inputs as a dict of tensors whose leading
dim is the row (so any subset of rows is a valid smaller call), the public call, the outputs
that carry gradients, and direct calls of its forward and backward custom ops for opcheck.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import pg_kernels

IGNORE = -100
REAL_V = 151936  # Qwen's vocabulary: ~10 chunk programs per bf16 row (Triton and CUDA)


# --- per-op adapters ----------------------------------------------------------------------


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _logits(n: int, v: int, dtype, device, g: torch.Generator) -> torch.Tensor:
    """N(0, 9) logits plus a per-row offset, drawn on the device (fast at real V)."""
    x = torch.randn(n, v, generator=g, device=device) * 3
    x += torch.randn(n, 1, generator=g, device=device) * 5
    return x.to(dtype)


def _common_inputs(n, v, dtype, device, seed, per_row, n_diff):
    """logits, labels (0, V - 1, one ignored row), temperature (per-row tensor or a float), and
    per-row upstream gradients `up` [n, n_diff] for the differentiable outputs."""
    g = _generator(device, seed)
    x = _logits(n, v, dtype, device, g)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    y[0] = v - 1
    if n > 2:
        y[1], y[2] = IGNORE, 0
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.rand(n, generator=g, device=device, dtype=acc) + 0.5 if per_row else 0.7
    up = torch.randn(n, n_diff, generator=g, device=device, dtype=acc)
    return g, {"logits": x, "labels": y, "temperature": t, "up": up}


def _temp_args(d: dict, dtype) -> tuple:
    """(per-row tensor or None, scalar) as the custom ops take a temperature."""
    t = d["temperature"]
    if isinstance(t, torch.Tensor):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return t.to(acc), 1.0
    return None, float(t)


@dataclass(frozen=True)
class Adapter:
    make: Callable  # (n, v, dtype, device, seed, per_row) -> dict of row-leading tensors
    call: Callable  # (backend, d) -> tuple of [n] outputs; the first `n_diff` differentiable
    n_diff: int
    grad_keys: tuple[str, ...]  # inputs that take gradients
    op_calls: Callable  # (backend, d) -> [(custom op, args)], forward and backward


def _token_stats_make(n, v, dtype, device, seed, per_row=True):
    return _common_inputs(n, v, dtype, device, seed, per_row, 4)[1]


def _token_stats_call(backend, d):
    out = pg_kernels.token_stats(
        d["logits"], d["labels"], temperature=d["temperature"], backend=backend
    )
    return out.logprob, out.entropy, out.collision, out.lse, out.lgp, out.max_prob, out.argmax


def _token_stats_op_calls(backend, d):
    x, y = d["logits"], d["labels"]
    tt, ts = _temp_args(d, x.dtype)
    fwd = torch.ops.pg_kernels.token_stats.default
    out = fwd(x.detach(), y, tt, ts, IGNORE, backend)
    g = [d["up"][:, j].contiguous() for j in range(4)]
    bwd_args = (*g, x.detach(), y, tt, ts, IGNORE, out[4], out[1], out[2], out[5], out[6], backend)
    return [
        (fwd, (x.detach().requires_grad_(), y, tt, ts, IGNORE, backend)),
        (torch.ops.pg_kernels.token_stats_backward.default, bwd_args),
    ]


def _kl_make(n, v, dtype, device, seed, per_row=True):
    g, d = _common_inputs(n, v, dtype, device, seed, per_row, 2)
    # The second half of the rows: a small perturbation of the logits (KL ~ 1e-3).
    xr = _logits(n, v, dtype, device, g)
    half = n // 2
    noise = torch.randn(n - half, v, generator=g, device=device) * 0.05
    xr[half:] = (d["logits"][half:].float() + noise + 3.0).to(dtype)
    d["ref_logits"] = xr
    return d


def _kl_call(backend, d):
    kw = dict(temperature=d["temperature"], labels=d["labels"], backend=backend)
    x, xr = d["logits"], d["ref_logits"]
    return (
        pg_kernels.kl_divergence(x, xr, direction="reverse", **kw),
        pg_kernels.kl_divergence(x, xr, direction="forward", ref_temperature=1.3, **kw),
    )


def _kl_op_calls(backend, d):
    x, xr, y = d["logits"].detach(), d["ref_logits"].detach(), d["labels"]
    tt, ts = _temp_args(d, x.dtype)
    fwd = torch.ops.pg_kernels.kl_divergence.default
    bwd = torch.ops.pg_kernels.kl_divergence_backward.default
    calls = []
    for direction in ("reverse", "forward"):
        args = (x, xr, y, tt, ts, None, 1.3, IGNORE, direction, backend)
        calls.append((fwd, (x.clone().requires_grad_(), xr.clone().requires_grad_(), *args[2:])))
        kl, row_state = fwd(*args)
        up = d["up"][:, 0].contiguous()
        for need in ((True, True), (True, False), (False, True)):
            calls.append((bwd, (up, *args[:9], kl, row_state, *need, backend)))
        # a vocab-parallel shard's: the row's terms on other ranks (pg_kernels.parallel)
        outside = torch.rand(kl.numel(), 2, dtype=kl.dtype, device=kl.device)
        calls.append((bwd, (up, *args[:9], kl, row_state, True, True, backend, outside)))
    return calls


def _mismatch_make(n, v, dtype, device, seed, per_row=True):
    g, d = _common_inputs(n, v, dtype, device, seed, per_row, 1)
    noise = torch.randn(n, v, generator=g, device=device) * 0.1
    d["rollout_logits"] = (d["logits"].float() + noise - 2.0).to(dtype)
    acc = d["up"].dtype
    d["rollout_logprobs"] = -5 * torch.rand(n, generator=g, device=device, dtype=acc)
    return d


def _mismatch_call(backend, d):
    out = pg_kernels.mismatch_stats(
        d["logits"], d["labels"], d["rollout_logprobs"], rollout_logits=d["rollout_logits"],
        temperature=d["temperature"], backend=backend,
    )  # fmt: skip
    # The op's own outputs (the sampled estimators are elementwise tails that compile may fuse).
    return out.logprob, out.token_kl, out.token_tv


def _mismatch_op_calls(backend, d):
    x, xr, y = d["logits"].detach(), d["rollout_logits"], d["labels"]
    tt, ts = _temp_args(d, x.dtype)
    fwd = torch.ops.pg_kernels.mismatch_stats.default
    args = (x, xr, y, tt, ts, None, 0.9, IGNORE, backend)
    *_, row_state = fwd(*args)
    bwd_args = (d["up"][:, 0].contiguous(), x, y, tt, ts, IGNORE, row_state, backend)
    return [
        (fwd, (x.clone().requires_grad_(), *args[1:])),
        (fwd, (x.clone().requires_grad_(), *args[1:], False)),  # token_tv=False
        (torch.ops.pg_kernels.mismatch_stats_backward.default, bwd_args),
    ]


ALPHA = 0.05


def _pruned_make(n, v, dtype, device, seed, per_row=True):
    return _common_inputs(n, v, dtype, device, seed, per_row, 1)[1]


def _pruned_call(backend, d):
    out = pg_kernels.pruned_logprob(
        d["logits"], d["labels"], alpha=ALPHA, temperature=d["temperature"], backend=backend
    )
    return out.logprob, out.in_safe, out.tail_mass


def _pruned_op_calls(backend, d):
    x, y = d["logits"].detach(), d["labels"]
    tt, ts = _temp_args(d, x.dtype)
    fwd = torch.ops.pg_kernels.pruned_logprob.default
    *_, lse_safe, threshold, row_max = fwd(x, y, tt, ts, ALPHA, IGNORE, backend)
    up = d["up"][:, 0].contiguous()
    bwd_args = (up, x, y, tt, ts, IGNORE, lse_safe, threshold, row_max, backend)
    return [
        (fwd, (x.clone().requires_grad_(), y, tt, ts, ALPHA, IGNORE, backend)),
        (torch.ops.pg_kernels.pruned_logprob_backward.default, bwd_args),
    ]


def _topk_make(n, v, dtype, device, seed, per_row=True):
    g, d = _common_inputs(n, v, dtype, device, seed, per_row, 1)
    # q: the logits plus noise; its top-k ids in random order and their log-probs.
    q = d["logits"].double() + torch.randn(n, v, generator=g, device=device).double()
    lp, ids = q.log_softmax(-1).topk(min(8, v), dim=-1)
    perm = torch.rand(ids.shape, generator=g, device=device).argsort(-1)
    d["topk_ids"] = ids.gather(-1, perm)
    d["topk_logprobs"] = lp.gather(-1, perm).to(d["up"].dtype)
    return d


def _topk_call(backend, d):
    kl = pg_kernels.topk_kl(
        d["logits"], d["topk_ids"], d["topk_logprobs"], temperature=d["temperature"],
        labels=d["labels"], backend=backend,
    )  # fmt: skip
    return (kl,)


def _topk_op_calls(backend, d):
    x, ids, lp, y = d["logits"].detach(), d["topk_ids"], d["topk_logprobs"], d["labels"]
    tt, ts = _temp_args(d, x.dtype)
    fwd = torch.ops.pg_kernels.topk_kl.default
    _, row_max, log_s, logp_tail = fwd(x, ids, lp, y, tt, ts, IGNORE, backend)
    bwd_args = (d["up"][:, 0].contiguous(), x, ids, lp, y, tt, ts, IGNORE, row_max, log_s,
                logp_tail, backend)  # fmt: skip
    return [
        (fwd, (x.clone().requires_grad_(), ids, lp, y, tt, ts, IGNORE, backend)),
        (torch.ops.pg_kernels.topk_kl_backward.default, bwd_args),
    ]


def _step_make(n, v, dtype, device, seed, per_row=True):
    d = _mismatch_make(n, v, dtype, device, seed, per_row)
    g = _generator(device, seed + 1)
    d["ref_logits"] = _logits(n, v, dtype, device, g)
    acc = d["up"].dtype
    d["up"] = torch.randn(n, 5, generator=g, device=device, dtype=acc)
    return d


def _step_call(backend, d):
    out = pg_kernels.step_stats(
        d["logits"], d["labels"], rollout_logprobs=d["rollout_logprobs"],
        rollout_logits=d["rollout_logits"], ref_logits=d["ref_logits"],
        temperature=d["temperature"], ref_temperature=1.3, backend=backend,
    )  # fmt: skip
    t, m = out.token, out.mismatch
    return (t.logprob, t.entropy, t.collision, t.lse, out.kl, m.token_kl, m.token_tv, t.lgp,
            t.max_prob, t.argmax)  # fmt: skip


def _step_op_calls(backend, d):
    x, xr, xq, y = d["logits"].detach(), d["rollout_logits"], d["ref_logits"].detach(), d["labels"]
    tt, ts = _temp_args(d, x.dtype)
    fwd = torch.ops.pg_kernels.step_stats.default
    bwd = torch.ops.pg_kernels.step_stats_backward.default
    g = [d["up"][:, j].contiguous() for j in range(5)]
    calls = []
    for direction, tv in (("reverse", True), ("forward", False)):
        args = (x, xr, xq, y, tt, ts, None, 0.9, None, 1.3, direction, IGNORE, backend)
        calls.append((fwd, (x.clone().requires_grad_(), xr, xq.clone().requires_grad_(),
                            *args[3:], tv)))  # fmt: skip
        _, entropy, collision, _, lse, max_prob, argmax, _, _, kl, kl_state = fwd(*args)
        for need in ((True, True), (True, False), (False, True)):
            saved = (lse, entropy, collision, max_prob, argmax, kl, kl_state)
            bwd_args = (*g, x, xq, y, tt, ts, None, 1.3, direction, IGNORE, *saved, *need, backend)
            calls.append((bwd, bwd_args))
    return calls


ADAPTERS = {
    "token_stats": Adapter(
        _token_stats_make, _token_stats_call, 4, ("logits",), _token_stats_op_calls
    ),
    "kl_divergence": Adapter(_kl_make, _kl_call, 2, ("logits", "ref_logits"), _kl_op_calls),
    "mismatch_stats": Adapter(_mismatch_make, _mismatch_call, 1, ("logits",), _mismatch_op_calls),
    "pruned_logprob": Adapter(_pruned_make, _pruned_call, 1, ("logits",), _pruned_op_calls),
    "topk_kl": Adapter(_topk_make, _topk_call, 1, ("logits",), _topk_op_calls),
    "step_stats": Adapter(_step_make, _step_call, 5, ("logits", "ref_logits"), _step_op_calls),
}


# --- shared steps -------------------------------------------------------------------------


def _rows(d: dict, rows: slice) -> dict:
    """The inputs of a subset of rows (every tensor is row-leading)."""
    return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in d.items()}


def _loss(ad: Adapter, outs, up: torch.Tensor) -> torch.Tensor:
    """sum_j <outs_j, up[:, j]>: the upstream gradient of output j is exactly up[:, j]."""
    return sum((outs[j] * up[:, j]).sum() for j in range(ad.n_diff))


def _leaves(ad: Adapter, d: dict) -> dict:
    """A copy of `d` whose gradient inputs are fresh leaves that require grad."""
    return {**d, **{k: d[k].detach().clone().requires_grad_() for k in ad.grad_keys}}


def _forward_backward(ad: Adapter, backend: str, d: dict):
    """(outputs, gradients of the grad_keys) of one forward + backward."""
    d = _leaves(ad, d)
    outs = ad.call(backend, d)
    _loss(ad, outs, d["up"]).backward()
    return [o.detach() for o in outs], [d[k].grad for k in ad.grad_keys]


def _assert_bitwise(got, want, what: str) -> None:
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{what} [{i}]")


def _small_v(device: str) -> int:
    """An odd vocab: unaligned rows on the GPU; small for the CPU variants."""
    return 32003 if device == "cuda" else 1000


# --- the op contract ----------------------------------------------------------------------


@pytest.mark.cpu_backends("cpu", "triton")
def test_opcheck(op_backend_device):
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    for per_row in (True, False):
        d = ad.make(4, 33, torch.float32, device, seed=1, per_row=per_row)
        for custom_op, args in ad.op_calls(backend, d):
            torch.library.opcheck(custom_op, args)


@pytest.mark.cpu_backends("cpu")  # interpreted Triton: ~2 min of CPU for little news
def test_gradcheck_float64(op_backend_device):
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    d = ad.make(3, 11, torch.float64, device, seed=2)

    def f(*leaves):
        return ad.call(backend, {**d, **dict(zip(ad.grad_keys, leaves))})[: ad.n_diff]

    leaves = [d[k].detach().clone().requires_grad_() for k in ad.grad_keys]
    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.cpu_backends("cpu", "triton")
def test_compile_fullgraph_matches_eager(op_backend_device):
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    d = ad.make(6, _small_v(device), torch.float32, device, seed=3)

    def step(d):
        outs = ad.call(backend, d)
        return outs, _loss(ad, outs, d["up"])

    # `step` is one code object for every case: without a reset each case adds a recompile of it
    # and fullgraph=True fails at dynamo's recompile limit (8).
    torch.compiler.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        leaves = _leaves(ad, d)
        outs, loss = fn(leaves)
        loss.backward()
        results.append(([o.detach() for o in outs], [leaves[k].grad for k in ad.grad_keys]))
    (outs_eager, grads_eager), (outs_compiled, grads_compiled) = results
    _assert_bitwise(outs_compiled, outs_eager, f"{op} compiled outputs")
    _assert_bitwise(grads_compiled, grads_eager, f"{op} compiled gradients")


@pytest.mark.cpu_backends("cpu", "triton")
def test_second_derivative_raises(op_backend_device):
    """The ops are differentiable once: a gradient taken with create_graph=True requires grad,
    and differentiating it raises (a constant there would silently drop a gradient penalty)."""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    d = _leaves(ad, ad.make(4, 33, torch.float64, device, seed=6))
    leaves = [d[k] for k in ad.grad_keys]
    grads = torch.autograd.grad(_loss(ad, ad.call(backend, d), d["up"]), leaves, create_graph=True)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)


@pytest.mark.cpu_backends("cpu", "triton")
def test_invalid_per_row_temperature_gives_nan_rows(op_backend_device):
    """A per-row temperature that is not finite and > 0 makes its row NaN (argmax -1, a NaN
    gradient row), other rows untouched. Python checks the tensor only on CPU outside
    torch.compile, so under compile (and on every GPU call) the kernels meet it."""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    d = ad.make(8, 33, torch.float32, device, seed=5)  # row 1 is ignored: 0 whatever tau
    bad = [3, 4, 5, 6]
    d["temperature"][bad] = torch.tensor([0.0, -1.0, float("inf"), float("nan")], device=device)
    fixed = {**d, "temperature": d["temperature"].clone()}
    fixed["temperature"][bad] = 1.0

    def step(d):
        outs = ad.call(backend, d)
        return outs, _loss(ad, outs, d["up"])

    torch.compiler.reset()  # one code object per case: see test_compile_fullgraph_matches_eager
    leaves = _leaves(ad, d)
    outs, loss = torch.compile(step, fullgraph=True, backend="aot_eager")(leaves)
    loss.backward()
    want_outs, want_grads = _forward_backward(ad, backend, fixed)
    good = [0, 1, 2, 7]
    for i, (o, w) in enumerate(zip(outs, want_outs, strict=True)):
        o = o.detach()
        torch.testing.assert_close(o[good], w[good], rtol=0, atol=0, msg=f"{op} output [{i}]")
        if o.dtype == torch.int64:
            assert (o[bad] == -1).all(), (op, i, o[bad])
        elif o.is_floating_point():
            assert o[bad].isnan().all(), (op, i, o[bad])
    for k, w in zip(ad.grad_keys, want_grads, strict=True):
        g = leaves[k].grad
        torch.testing.assert_close(g[good], w[good], rtol=0, atol=0, msg=f"{op} grad {k}")
        assert g[bad].isnan().all(1).all(), (op, k)


@pytest.mark.cpu_backends("cpu")
def test_deterministic(op_backend_device):
    """Two runs of forward + backward give the same bits (no atomics in any reduction)."""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    n, v = (64, REAL_V) if device == "cuda" else (16, 1000)
    d = ad.make(n, v, torch.bfloat16, device, seed=4)
    (outs_a, grads_a), (outs_b, grads_b) = (_forward_backward(ad, backend, d) for _ in "ab")
    _assert_bitwise(outs_b, outs_a, f"{op} outputs, second run")
    _assert_bitwise(grads_b, grads_a, f"{op} gradients, second run")


@pytest.mark.cpu_backends("cpu")
@pytest.mark.parametrize("per_row", [True, False], ids=["tensor_temp", "scalar_temp"])
def test_batch_invariant(op_backend_device, per_row):
    """A row's outputs and gradient are the same bits alone and inside batches of 64 and 512
    rows (real V on the GPU: every row spans many chunk programs). V is odd, so on the GPU the
    batches' rows start at odd elements and the Triton kernels load them element-wise
    (`row_align`), while a row alone, copied, is 16-byte aligned and loads vectors: both ways
    must add the same elements in the same order. (On CPU this runs the C++ kernels; the
    interpreted Triton ones are checked so by each op's odd-stride tests, at small blocks.)"""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    v, batches, rows = (REAL_V + 1, (64, 512), (0, 1, 37, 63)) if device == "cuda" else (
        1001, (8, 32), (0, 1, 5, 7)
    )  # fmt: skip
    d = ad.make(max(batches), v, torch.bfloat16, device, seed=5, per_row=per_row)
    in_batch = {b: _forward_backward(ad, backend, _rows(d, slice(0, b))) for b in batches}
    for r in rows:
        alone = {
            k: t.clone() if isinstance(t, torch.Tensor) else t
            for k, t in _rows(d, slice(r, r + 1)).items()
        }
        outs, grads = _forward_backward(ad, backend, alone)
        for b, (outs_b, grads_b) in in_batch.items():
            where = f"{op} row {r} alone vs in a batch of {b}"
            _assert_bitwise(outs, [o[r : r + 1] for o in outs_b], f"{where}: outputs")
            _assert_bitwise(grads, [g[r : r + 1] for g in grads_b], f"{where}: gradients")


# --- GPU only: streams, graphs, devices, syncs --------------------------------------------

SPIN_CYCLES = 50_000_000  # torch.cuda._sleep: ~25 ms of a busy stream at ~2 GHz


@pytest.mark.gpu
def test_non_default_stream(op_backend_device):
    """Inputs written on a side stream behind a long spin, the op run there: the kernels must
    launch on the current (side) stream, or they read the inputs before they are written."""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    d = ad.make(8, _small_v(device), torch.bfloat16, device, seed=6)
    want_outs, want_grads = _forward_backward(ad, backend, d)
    # The inputs hold NaN (ids and labels 0: in bounds, but other rows) until the side stream
    # overwrites them after its spin.
    late = {
        k: torch.full_like(v, float("nan") if v.is_floating_point() else 0)
        for k, v in d.items()
        if isinstance(v, torch.Tensor)
    }
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        torch.cuda._sleep(SPIN_CYCLES)
        for k, v in late.items():
            v.copy_(d[k])
        inputs = {**d, **late}
        for k in ad.grad_keys:
            inputs[k].requires_grad_()
        outs = ad.call(backend, inputs)
        _loss(ad, outs, inputs["up"]).backward()  # autograd runs it on the forward's stream
    torch.cuda.current_stream(device).wait_stream(side)
    grads = [inputs[k].grad for k in ad.grad_keys]
    _assert_bitwise([o.detach() for o in outs], want_outs, f"{op} on a side stream: outputs")
    _assert_bitwise(grads, want_grads, f"{op} on a side stream: gradients")


@pytest.mark.gpu
def test_cuda_graph_forward_backward(op_backend_device):
    """Forward + backward captured in one CUDA graph, replayed on new inputs copied into the
    static ones: the same bits as eager on those inputs."""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    v = _small_v(device)
    first = ad.make(8, v, torch.bfloat16, device, seed=7)
    second = ad.make(8, v, torch.bfloat16, device, seed=8)
    want_outs, want_grads = _forward_backward(ad, backend, second)

    static = _leaves(ad, first)
    leaves = [static[k] for k in ad.grad_keys]

    def step():
        outs = ad.call(backend, static)
        _loss(ad, outs, static["up"]).backward()
        return outs

    # Warm up on a side stream (Triton compiles, the allocator settles), as torch's docs ask.
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            for leaf in leaves:
                leaf.grad = None
            step()
    torch.cuda.current_stream(device).wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    for leaf in leaves:
        leaf.grad = None
    with torch.cuda.graph(graph):
        static_outs = step()
    with torch.no_grad():
        for k, value in second.items():
            if isinstance(value, torch.Tensor):
                static[k].copy_(value)
    graph.replay()
    torch.cuda.synchronize(device)
    _assert_bitwise([o.detach() for o in static_outs], want_outs, f"{op} graph replay: outputs")
    _assert_bitwise([leaf.grad for leaf in leaves], want_grads, f"{op} graph replay: gradients")


@pytest.mark.gpu
def test_auto_takes_the_cuda_kernel_first(op_backend_device):
    """On CUDA tensors "auto" serves an op with its CUDA kernel where it has one (token_stats':
    the faster at every shape an H200 timed, benchmarks/results/cuda-h200), else Triton; and
    Triton while the CUDA extension is not built (benchmarks/gpu_check.sh starts the Triton
    tests beside the build: their processes import pg_kernels before it exists). The cases of
    the "cuda" backend run only with the extension, so they check the first."""
    from pg_kernels import _backend

    op, _, device = op_backend_device
    has_cuda = "cuda" in _backend.KERNELS[op] and _backend.cuda_extension() is not None
    want = "cuda" if has_cuda else "triton"
    assert _backend.resolve(op, "auto", torch.device(device)) == want


@pytest.mark.gpu
def test_tensors_on_a_device_that_is_not_current(op_backend_device):
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (a launch on cuda:0
    would fault on cuda:1's memory or give other bits) and cuda:0 stays current."""
    op, backend, _ = op_backend_device
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    ad = ADAPTERS[op]
    d = ad.make(8, 32003, torch.bfloat16, "cuda:1", seed=9)
    with torch.cuda.device(1):
        want_outs, want_grads = _forward_backward(ad, backend, d)
    with torch.cuda.device(0):
        outs, grads = _forward_backward(ad, backend, d)
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert all(t.device == torch.device("cuda:1") for t in (*outs, *grads))
    _assert_bitwise(outs, want_outs, f"{op} on cuda:1 from cuda:0: outputs")
    _assert_bitwise(grads, want_grads, f"{op} on cuda:1 from cuda:0: gradients")


@pytest.mark.gpu
def test_no_host_sync(op_backend_device):
    """Forward + backward never synchronize with the host (after a first call that compiles)."""
    op, backend, device = op_backend_device
    ad = ADAPTERS[op]
    d = ad.make(8, _small_v(device), torch.bfloat16, device, seed=10)
    _forward_backward(ad, backend, d)  # compile and load the kernels
    leaves = _leaves(ad, d)
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = ad.call(backend, leaves)
        _loss(ad, outs, leaves["up"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    assert all(leaves[k].grad is not None for k in ad.grad_keys)
