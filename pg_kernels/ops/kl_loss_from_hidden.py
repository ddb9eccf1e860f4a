"""kl_loss_from_hidden: a per-row loss of `kl_divergence_from_hidden`'s KL whose gradients are
formed in the forward, chunk by chunk, so each lm_head matmul runs once (4, not 6).

`kl_divergence_from_hidden` cannot know its KL's upstream gradient in the forward, so its
backward recomputes both sides' logits: 6 N·V·D matmuls (with a frozen teacher) against the
unfused path's 4. Given the loss itself, as a function of each chunk's KL (a distillation loss,
the KL term of hybrid imitation + RL), the gradient is known while a chunk's logits are still in
the buffers: per chunk of rows, both matmuls, the kl_divergence kernel, `loss_fn` on the chunk's
KL and its gradient w.r.t. it (autograd on per-row numbers), the kl_divergence backward kernel
for the sides that need a gradient, then their gradient matmuls. The backward only scales the
saved gradients by the loss's upstream gradient (token_loss_from_hidden does the same for
token_stats).

As there, the row-chunk order keeps a weight gradient's [V, D] accumulator, passed over once per
chunk, which bounds a GPU; `backward_order="vocab"` (the default on CUDA where a weight's
gradient is wanted) takes `kl_divergence_from_hidden`'s vocabulary blocks instead, still inside
the forward: the blocks' merged KL, loss_fn on each chunk of it, then the blocks' backward.
"""

from __future__ import annotations

import torch

from pg_kernels import reference
from pg_kernels.ops import kl_divergence as _kl
from pg_kernels.ops import kl_divergence_from_hidden as _klh
from pg_kernels.ops._common import acc_dtype
from pg_kernels.ops._linear import ChunkedProjection, chunks, num_rows, rows
from pg_kernels.ops.token_loss_from_hidden import (
    ThroughStats,
    chunk_loss,
    formed_in_forward,
    losses_by_chunk,
    resolve_order,
)
from pg_kernels.outputs import KLLoss

OP = "kl_loss_from_hidden"


def _kl_loss(loss_fn, kl: torch.Tensor, start: int, stop: int):
    """loss_fn on one chunk's KL; returns (loss, [its gradient w.r.t. the KL])."""
    return chunk_loss(OP, loss_fn, [kl], lambda leaf: leaf, start, stop)


def _in_row_chunks(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, backend, loss_fn, wanted,
):  # fmt: skip
    """Per chunk: both projections, the KL, loss_fn, the backward kernel, the gradients' shares.
    Returns (loss, (kl,), the six inputs' gradients)."""
    proj = ChunkedProjection(hidden, weight, bias, chunk_size, wanted[:3])
    ref_proj = ChunkedProjection(ref_hidden, ref_weight, ref_bias, chunk_size, wanted[3:])
    student, teacher = any(wanted[:3]), any(wanted[3:])
    kl = hidden.new_empty((proj.n,), dtype=acc_dtype(hidden.dtype))
    loss = None
    for s, e in chunks(proj.n, chunk_size):
        logits, ref_logits = proj.logits(s, e), ref_proj.logits(s, e)
        kw = dict(
            labels=rows(labels, s, e), temperature=rows(temperature, s, e),
            temperature_scalar=temperature_scalar, ref_temperature=rows(ref_temperature, s, e),
            ref_temperature_scalar=ref_temperature_scalar, ignore_index=ignore_index,
            direction=direction, backend=backend,
        )  # fmt: skip
        kl[s:e], state = _kl._kl_divergence(logits, ref_logits, **kw)
        part, (grad_kl,) = _kl_loss(loss_fn, kl[s:e], s, e)
        loss = part if loss is None else loss + part
        if student or teacher:
            grad, ref_grad = _kl._kl_divergence_backward(
                grad_kl, logits, ref_logits, kl=kl[s:e], row_state=state, logits_grad=student,
                ref_grad=teacher, **kw,
            )  # fmt: skip
            if student:
                proj.accumulate(grad, s, e)
            if teacher:
                ref_proj.accumulate(ref_grad, s, e)
    if loss is None:  # no rows: the sum over no chunks
        loss = kl.new_zeros(())
    return loss, (kl,), (*proj.gradients(), *ref_proj.gradients())


def _in_vocab_blocks(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, backend, loss_fn, wanted,
):  # fmt: skip
    """kl_divergence_from_hidden's forward and backward in vocabulary blocks, with loss_fn on
    each chunk of the merged KL between them (the same calls as in row chunks). Returns (loss,
    (kl,), the six inputs' gradients)."""
    pair = (
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    )  # fmt: skip
    kl, state = _klh._forward(*pair, chunk_size, "vocab", backend)
    loss, (grad_kl,) = losses_by_chunk(
        kl.numel(), chunk_size, lambda s, e: _kl_loss(loss_fn, kl[s:e], s, e)
    )
    gradients = _klh._backward_in_vocab_blocks(grad_kl, *pair, kl, state, list(wanted), backend)
    return loss, (kl,), gradients


def kl_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    loss_fn,
    *,
    direction: str = "reverse",
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ref_temperature: float | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backward_order: str = "auto",
    backend: str = "auto",
) -> KLLoss:
    """`loss_fn` of `kl_divergence_from_hidden(hidden, weight, ref_hidden, ref_weight, ...)`,
    with the gradients formed in the forward: 4 lm_head matmuls with a frozen teacher (6 with
    the teacher's gradients), never either [N, V].

    Args:
        hidden, weight, ref_hidden, ref_weight, direction, bias, ref_bias, temperature,
            ref_temperature, labels, ignore_index, chunk_size, backend: as
            `kl_divergence_from_hidden`.
        loss_fn: `loss_fn(kl: Tensor, rows: slice) -> 0-d tensor`, called once per chunk with
            that chunk's KL ([rows] fp32, fp64 for fp64 inputs; 0 on ignored rows) for rows
            `rows` of the flattened [N] tokens; the loss is the sum of its values. It must be
            separable over rows, as `token_loss_from_hidden`'s; gradients flow through the KL
            only, every other tensor it uses is a constant.
        backward_order: the order in which the forward forms the gradients, as
            `token_loss_from_hidden`'s: "rows" (each chunk's gradients right after its KL, a
            weight gradient added into a [V, D] accumulator once per chunk); "vocab"
            (`kl_divergence_from_hidden`'s vocabulary blocks: the KL merged over blocks, then
            loss_fn, then the blocks' backward, the logits recomputed); "auto" (default):
            "vocab" on CUDA where a weight's gradient is wanted, else "rows". Never a function
            of N.

    Returns:
        KLLoss(loss, kl): the 0-d loss, differentiable w.r.t. hidden, weight and bias, and the
        teacher's tensors where they require grad (the saved gradients, rounded to the inputs'
        dtypes, are scaled by the loss's upstream gradient: scale inside loss_fn; not
        differentiable twice), and the [...] KL of every row, detached. Under torch.compile
        it runs eagerly (a graph break: loss_fn is differentiated inside the forward), so
        fullgraph=True rejects it.

    Example, on-policy distillation (a frozen teacher; mask of [B, T]):
        m = mask.reshape(-1).float()
        loss, kl = pg_kernels.kl_loss_from_hidden(
            h, lm_head.weight, teacher_h, teacher.lm_head.weight,
            lambda kl, rows: (kl * m[rows]).sum() / m.sum().clamp(min=1))
        loss.backward()
    """
    if not callable(loss_fn):
        raise TypeError(f"{OP}: loss_fn must be callable, got {type(loss_fn).__name__}")
    chunk_size, order, ignore_index, temp, ref_temp, backend = _klh.check_args(
        OP, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, direction, labels,
        ignore_index, temperature, ref_temperature, chunk_size, backward_order, backend,
    )  # fmt: skip
    lead = tuple(hidden.shape[:-1])
    n = num_rows(hidden)
    if backend == "reference":
        kl = reference.kl_divergence(
            torch.nn.functional.linear(hidden, weight, bias),
            torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias),
            direction=direction, temperature=temperature, ref_temperature=ref_temperature,
            labels=labels, ignore_index=ignore_index, upcast=False,
        ).reshape(-1)  # fmt: skip
        # loss_fn as the kernels' path calls it (one chunk; none on an empty batch, loss 0)
        value, grads = _kl_loss(loss_fn, kl, 0, n) if n else (kl.new_zeros(()), [kl.detach()])
        loss = ThroughStats.apply(value, grads, kl)
        return KLLoss(loss, kl.detach().view(lead))
    tensors = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    wanted = tuple(t is not None and t.requires_grad for t in tensors)
    if not torch.is_grad_enabled():
        wanted = (False,) * 6
    # Either side's weight gradient is an accumulator in row chunks.
    either_side = tuple(a or b for a, b in zip(wanted[:3], wanted[3:]))
    order = resolve_order(order, hidden.device, n, either_side)
    args = (
        *tensors, None if labels is None else labels.reshape(-1), temp.tensor, temp.scalar,
        ref_temp.tensor, ref_temp.scalar, ignore_index, direction, chunk_size, backend, loss_fn,
        wanted,
    )  # fmt: skip
    forward = _in_vocab_blocks if order == "vocab" else _in_row_chunks
    loss, kl = formed_in_forward(OP, lambda: forward(*args), wanted, *tensors)
    return KLLoss(loss, kl.view(lead))
