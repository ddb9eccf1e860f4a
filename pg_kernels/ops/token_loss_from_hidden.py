"""token_loss_from_hidden: a per-token loss of `token_stats(hidden @ weight.T + bias)` whose
gradients are formed in the forward, chunk by chunk, so the lm_head matmul runs 3 times, not 4.

`token_stats_from_hidden` cannot know the upstream gradients of its statistics in the forward,
so its backward recomputes each chunk's logits: 4 matmuls of 2·N·V·D flops against the unfused
path's 3, a floor of 4/3 of the unfused time wherever the matmuls dominate (a CPU). Given the
loss itself, as a function of each chunk's statistics, the gradients are known while a chunk's
logits are still in the buffer: per chunk, the matmul, the token_stats kernel, `loss_fn` on the
chunk's statistics and its gradients w.r.t. them (autograd on per-row numbers), the token_stats
backward kernel, then grad_hidden = g @ W and grad_weight += g.T @ h. The backward only scales
the saved gradients by the loss's upstream gradient.

That row-chunk order reads and writes the weight gradient's [V, D] accumulator (fp32 for 16-bit
weights) once per chunk, which on a GPU costs more than a matmul (docs/performance.md, "The
fused lm_head path on a GPU": ~170 ms of traffic at 16384 x 151936 x 4096 bf16 against ~30 ms
per N·V·D matmul, predicted). `backward_order="vocab"` (the default on CUDA where the weight's
gradient is wanted) takes token_stats_from_hidden's order instead, still inside the forward:
the statistics in row chunks, loss_fn on each chunk's as above, then every gradient in
vocabulary blocks from those per-row gradients (`_backward_in_vocab_blocks`): 4 matmuls, no
[V, D] accumulator. On a CPU the matmuls are the time, and the 3 of row chunks win (README).
"""

from __future__ import annotations

import torch

from pg_kernels import _library, reference
from pg_kernels.ops import token_stats as _ts
from pg_kernels.ops import token_stats_from_hidden as _tsh
from pg_kernels.ops._linear import (
    ChunkedProjection,
    backward_order,
    check_backward_order,
    chunks,
    rows,
)
from pg_kernels.ops.token_stats_from_hidden import check_args, empty_stats
from pg_kernels.outputs import TokenLoss, TokenStats

OP = "token_loss_from_hidden"
DIFFERENTIABLE = ("logprob", "entropy", "collision", "lse")  # token_stats' backward inputs


def chunk_loss(op: str, loss_fn, values, build, start: int, stop: int):
    """loss_fn(build(*leaves), slice(start, stop)) on detached leaves of `values` (one chunk's
    per-row outputs); returns (loss, its gradients w.r.t. each of `values`, zeros where unused).
    Shared by the *_loss_from_hidden ops, whose `op` names the error."""
    leaves = [v.detach().requires_grad_() for v in values]
    with torch.enable_grad():
        loss = loss_fn(build(*leaves), slice(start, stop))
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            got = type(loss).__name__ if not isinstance(loss, torch.Tensor) else (
                f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
            )  # fmt: skip
            raise TypeError(f"{op}: loss_fn must return a 0-d floating tensor, got {got}")
        if not loss.requires_grad:  # a loss that ignores the statistics: zero gradients
            # A copy: the caller's tensor (a captured constant) must not become the op's
            # output, on which autograd would hang its graph.
            return loss.detach().clone(), [torch.zeros_like(leaf) for leaf in leaves]
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def losses_by_chunk(n_rows: int, chunk_size: int, loss_at):
    """The vocabulary-block forwards' losses, with every row computed first: `loss_at(s, e)`
    (chunk_loss on rows s:e) on the same chunks as the row-chunk order, so the same calls and
    sums. Returns (the loss, each per-row gradient over all rows)."""
    loss, grads = None, []  # resolve_order: at least one row
    for s, e in chunks(n_rows, chunk_size):
        part, chunk_grads = loss_at(s, e)
        loss = part if loss is None else loss + part
        grads.append(chunk_grads)
    return loss, [torch.cat(column) for column in zip(*grads)]


def _stats_loss(loss_fn, stats: TokenStats, start: int, stop: int):
    """chunk_loss on one chunk's statistics, w.r.t. DIFFERENTIABLE."""
    fields = stats._asdict()

    def build(*leaves):
        return TokenStats(**{**fields, **dict(zip(DIFFERENTIABLE, leaves))})

    return chunk_loss(OP, loss_fn, [fields[f] for f in DIFFERENTIABLE], build, start, stop)


def resolve_order(order: str, device: torch.device, n_rows: int, wanted) -> str:
    """The order in which a *_loss_from_hidden op's forward forms its gradients, "rows" or
    "vocab" (`backward_order`), given `wanted`, the (hidden, weight, bias) gradients asked for
    (of either side): "auto" is `_linear.backward_order`'s choice on CUDA (vocabulary blocks
    where a weight's gradient is wanted) and row chunks elsewhere; without any gradient, row
    chunks (the outputs only)."""
    if not any(wanted) or (order == "auto" and device.type != "cuda"):
        return "rows"
    return backward_order(order, n_rows, wanted)


# torch.compile runs it eagerly (a graph break): loss_fn is differentiated inside the forward.
@torch.compiler.disable
def formed_in_forward(op: str, forward, wanted, *inputs):
    """The loss of the *_loss_from_hidden ops: `forward()` returns (loss, outputs, the gradients
    of `inputs` as the chunked projections give them), run without autograd; the loss's
    backward only scales those gradients (where `wanted`) by its upstream gradient. Returns
    (loss, *outputs), the outputs not differentiable."""
    return _FormedInForward.apply(op, forward, wanted, *inputs)


class _FormedInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, forward, wanted, *inputs):
        loss, outs, gradients = forward()
        ctx.op, ctx.wanted = op, wanted
        ctx.save_for_backward(*gradients)
        ctx.mark_non_differentiable(*outs)
        return loss, *outs

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants
            raise _library.not_twice(ctx.op)
        grads = [g * grad_loss if w else None for g, w in zip(ctx.saved_tensors, ctx.wanted)]
        return None, None, None, *grads


def _in_row_chunks(
    hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, chunk_size,
    backend, loss_fn, wanted,
):  # fmt: skip
    """Per chunk: the statistics, loss_fn, the backward kernel, the gradients' shares (module
    docstring). Returns (loss, the statistics, the inputs' gradients)."""
    proj = ChunkedProjection(hidden, weight, bias, chunk_size, wanted)
    outs = empty_stats(hidden, labels)
    loss = None
    for s, e in chunks(proj.n, chunk_size):
        logits, t = proj.logits(s, e), rows(temperature, s, e)
        stats = TokenStats(*_ts._token_stats(
            logits, labels[s:e], t, temperature_scalar, ignore_index, backend
        ))  # fmt: skip
        for out, value in zip(outs, stats):
            out[s:e] = value
        part, grads = _stats_loss(loss_fn, stats, s, e)
        loss = part if loss is None else loss + part
        if any(wanted):
            grad_logits = _ts._token_stats_backward(
                *grads, logits, labels[s:e], t, temperature_scalar, ignore_index, stats.lse,
                stats.entropy, stats.collision, stats.max_prob, stats.argmax, backend,
                out=proj.grad_buffer(s, e),
            )  # fmt: skip
            proj.accumulate(grad_logits, s, e)
    if loss is None:  # no rows: the sum over no chunks
        loss = outs[0].new_zeros(())
    return loss, outs, proj.gradients()


def _in_vocab_blocks(
    hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, chunk_size,
    backend, loss_fn, wanted,
):  # fmt: skip
    """The forward of `backward_order="vocab"` (module docstring): token_stats_from_hidden's
    forward (the same row chunks, matmuls and kernel, so the same statistics), loss_fn on each
    chunk's statistics (the same calls, so the same loss and per-row gradients as row chunks),
    then token_stats_from_hidden's backward in vocabulary blocks from those per-row gradients.
    Returns (loss, the statistics, the inputs' gradients)."""
    *outs, max_logit = _tsh._forward(
        hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, chunk_size,
        "vocab", backend,
    )  # fmt: skip
    stats = TokenStats(*outs)
    loss, row_grads = losses_by_chunk(
        labels.numel(), chunk_size,
        lambda s, e: _stats_loss(loss_fn, TokenStats(*(t[s:e] for t in stats)), s, e),
    )  # fmt: skip
    saved = (stats.lse, stats.entropy, stats.collision, stats.max_prob)
    gradients = _tsh._backward_in_vocab_blocks(
        row_grads, hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index,
        saved, stats.argmax, max_logit, wanted, backend,
    )  # fmt: skip
    return loss, outs, gradients


class ThroughStats(torch.autograd.Function):
    """The reference path's loss: `value`, whose gradient w.r.t. the live statistics is
    `grads` (loss_fn's, taken on detached leaves by `chunk_loss`)."""

    @staticmethod
    def forward(ctx, value, grads, *stats):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():  # create_graph=True: the saved gradients are constants
            raise _library.not_twice(OP)
        return None, None, *(g * grad_loss for g in ctx.grads)


def token_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_fn,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backward_order: str = "auto",
    backend: str = "auto",
) -> TokenLoss:
    """`loss_fn` of `token_stats(hidden @ weight.T + bias, labels, ...)`, with the gradients
    w.r.t. hidden, weight and bias formed in the forward: 3 lm_head matmuls in row chunks (4
    in vocabulary blocks), never [N, V].

    Args:
        hidden, weight, labels, bias, temperature, ignore_index, chunk_size, backend: as
            `token_stats_from_hidden`.
        backward_order: the order in which the forward forms the gradients. "rows": each
            chunk's right after its statistics, 3 lm_head matmuls, the weight's gradient added
            into a [V, D] accumulator (fp32 for 16-bit weights) once per chunk; "vocab": all
            the statistics and losses first, then every gradient in vocabulary blocks as
            `token_stats_from_hidden`'s backward (the logits recomputed: 4 matmuls, no [V, D]
            accumulator, an [N, D] one for hidden's gradient). "auto" (default): "vocab" on
            CUDA where the weight's gradient is wanted (a GPU is bound by the accumulator's
            traffic, not the matmul it saves), else "rows" (a CPU is bound by the matmuls).
            Never a function of N. The loss and statistics are the same either way.
        loss_fn: `loss_fn(stats: TokenStats, rows: slice) -> 0-d tensor`, called once per chunk
            with that chunk's statistics (rows `rows` of the flattened [N] tokens, i.e. of
            `labels.reshape(-1)`); the loss is the sum of its values. It must be separable over
            rows: a chunk's value depends on that chunk's statistics only (global constants such
            as a token-mean's denominator are fine). Gradients flow through logprob, entropy,
            collision and lse; every other tensor it uses is a constant (no gradient reaches
            it).

    Returns:
        TokenLoss(loss, stats): the 0-d loss, differentiable w.r.t. hidden, weight and bias
        (its backward only scales the gradients the forward saved, rounded to the inputs'
        dtypes: they cost memory the size of hidden, weight and bias from the forward on; an
        upstream gradient other than 1 rounds them again, so scale inside loss_fn; not
        differentiable twice: create_graph=True raises), and the TokenStats of every row,
        detached.

    Example, a GRPO step with an entropy bonus (adv, old_lp, mask of [B, T]):
        adv, old, m = adv.reshape(-1), old_lp.reshape(-1), mask.reshape(-1).float()
        def loss_fn(s, rows):
            ratio = torch.exp(s.logprob - old[rows])
            pg = -torch.min(ratio * adv[rows], ratio.clamp(0.8, 1.28) * adv[rows])
            return ((pg - 0.001 * s.entropy) * m[rows]).sum() / m.sum().clamp(min=1)
        loss, stats = pg_kernels.token_loss_from_hidden(hidden, lm_head.weight, labels, loss_fn)
        loss.backward()
    """
    if not callable(loss_fn):
        raise TypeError(f"{OP}: loss_fn must be callable, got {type(loss_fn).__name__}")
    ignore_index, chunk_size, temp, backend = check_args(
        OP, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, backend
    )
    check_backward_order(OP, backward_order)
    if backend == "reference":
        logits = torch.nn.functional.linear(hidden, weight, bias).reshape(-1, weight.shape[0])
        flat_temp = temp.scalar if temp.tensor is None else temp.tensor
        stats = reference.token_stats(logits, labels.reshape(-1), temperature=flat_temp,
                                      ignore_index=ignore_index, upcast=False)  # fmt: skip
        # loss_fn as the kernels' path calls it (one chunk): its gradient reaches hidden,
        # weight and bias through the statistics only, every other tensor a constant.
        if labels.numel() == 0:  # no chunk, no call: the loss is 0, as on the kernels' path
            value = stats.logprob.new_zeros(())
            grads = [torch.zeros_like(getattr(stats, f)) for f in DIFFERENTIABLE]
        else:
            value, grads = _stats_loss(loss_fn, stats, 0, labels.numel())
        loss = ThroughStats.apply(value, grads, *(getattr(stats, f) for f in DIFFERENTIABLE))
        detached = TokenStats(*(t.detach().view(labels.shape) for t in stats))
        return TokenLoss(loss, detached)
    wanted = tuple(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not torch.is_grad_enabled():
        wanted = (False, False, False)
    order = resolve_order(backward_order, hidden.device, labels.numel(), wanted)
    args = (hidden, weight, bias, labels.reshape(-1), temp.tensor, temp.scalar, ignore_index,
            chunk_size, backend, loss_fn, wanted)  # fmt: skip
    forward = _in_vocab_blocks if order == "vocab" else _in_row_chunks
    loss, *outs = formed_in_forward(OP, lambda: forward(*args), wanted, hidden, weight, bias)
    return TokenLoss(loss, TokenStats(*(o.view(labels.shape) for o in outs)))
