"""token_stats_from_hidden: `token_stats` of hidden @ weight.T + bias without ever holding the
[N, V] logits (docs/math.md §§1-3 per row; the chunking is in `_linear.py`).

Forward: per chunk of rows, the matmul into a reused buffer, then the token_stats kernel. Only
the per-row outputs survive, and each row's logit at its argmax (`max_logit`). Backward, in
the order `_linear.backward_order` picks: per chunk of rows, the matmul again, the token_stats
backward kernel (one pass, gradient of the chunk's logits), then grad_hidden = g @ W and
grad_weight += g.T @ h; or per block of vocabulary columns (where the weight's gradient is
wanted), every row's logits of the block, the same kernel, then
grad_weight[block] = g.T @ h and grad_hidden += g @ W[block]. The kernels read a row's frame
(the raw logit at the saved argmax; CUDA's 16-bit rows take the saved lse instead, and the
argmax's logit for the label's entry) from the row, so a block's buffer carries the forward's
`max_logit` in an extra column (and in the argmax's own column, where the block holds it): each
entry's gradient is the row kernel's, in the frame of the forward's statistics.
The logits are recomputed rather than kept: the upstream gradients of logprob / entropy /
collision / lse are unknown until the loss is built (the statistics feed arbitrary losses,
advantages and metrics), so the gradient cannot be formed in the forward the way a fused
cross-entropy does.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops import token_stats as _ts
from pg_kernels.ops._common import (
    acc_dtype,
    check_ignore_index,
    check_labels_arg,
    check_labels_on_cpu,
    make_temperature,
)
from pg_kernels.ops._linear import (
    EXTRA_COLUMNS,
    ChunkedProjection,
    VocabBlocks,
    backward_order,
    check_backward_order,
    check_chunk_size,
    check_projection,
    chunks,
    empty_gradients,
    rows,
)
from pg_kernels.outputs import TokenStats

OP = "token_stats_from_hidden"


def _forward(
    hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, chunk_size,
    backward_order, backend,
):  # fmt: skip
    proj = ChunkedProjection(hidden, weight, bias, chunk_size)
    outs = empty_stats(hidden, labels)
    max_logit = hidden.new_empty(labels.shape)
    for s, e in chunks(proj.n, chunk_size):
        logits = proj.logits(s, e)
        stats = _ts._token_stats(
            logits, labels[s:e], rows(temperature, s, e), temperature_scalar, ignore_index,
            backend,
        )  # fmt: skip
        for out, stat in zip(outs, stats):
            out[s:e] = stat
        # argmax is -1 on a NaN row (any column does: the backward writes NaN there anyway)
        max_logit[s:e] = logits.gather(1, stats[6].clamp_min(0).unsqueeze(1)).squeeze(1)
    return (*outs, max_logit)


def empty_stats(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The per-row outputs of the token_stats-from-hidden ops, uninitialized, for the kernels
    to fill chunk by chunk and for the fake to return: six [N] tensors in hidden's accumulation
    dtype (logprob, entropy, collision, lgp, lse, max_prob) and the int64 [N] argmax, N =
    labels' (flat) length, on labels' device."""
    stat = labels.new_empty(labels.shape, dtype=acc_dtype(hidden.dtype))
    return (
        *(torch.empty_like(stat) for _ in range(6)),
        labels.new_empty(labels.shape, dtype=torch.int64),
    )


def _forward_fake(
    hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, chunk_size,
    backward_order, backend,
):  # fmt: skip
    return (*empty_stats(hidden, labels), hidden.new_empty(labels.shape))


_library.register_kernel("token_stats_from_hidden")(_forward)
torch.library.register_fake("pg_kernels::token_stats_from_hidden", _forward_fake)


def _backward_impl(
    g_logprob, g_entropy, g_collision, g_lse, hidden, weight, bias, labels, temperature,
    temperature_scalar, ignore_index, chunk_size, order, lse, entropy, collision, max_prob,
    argmax, max_logit, output_mask, backend,
):  # fmt: skip
    wanted = tuple(output_mask)
    saved = (lse, entropy, collision, max_prob)
    if backward_order(order, labels.numel(), wanted) == "vocab":
        return _backward_in_vocab_blocks(
            (g_logprob, g_entropy, g_collision, g_lse), hidden, weight, bias, labels,
            temperature, temperature_scalar, ignore_index, saved, argmax, max_logit, wanted,
            backend,
        )  # fmt: skip
    proj = ChunkedProjection(hidden, weight, bias, chunk_size, wanted)
    for s, e in chunks(proj.n, chunk_size):
        grad_logits = _ts._token_stats_backward(
            g_logprob[s:e], g_entropy[s:e], g_collision[s:e], g_lse[s:e], proj.logits(s, e),
            labels[s:e], rows(temperature, s, e), temperature_scalar, ignore_index,
            *(t[s:e] for t in saved), argmax[s:e], backend, out=proj.grad_buffer(s, e),
        )  # fmt: skip
        proj.accumulate(grad_logits, s, e)
    return proj.gradients()


def _backward_in_vocab_blocks(
    grads, hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, saved,
    argmax, max_logit, wanted, backend,
):  # fmt: skip
    """The backward a block of vocabulary columns at a time (module docstring). A block of vb
    columns is handed to the row kernel as rows of its own: the block's logits, then
    max_logit at column vb (the argmax's stand-in where the block does not hold it) and at
    vb + 1 (the label's, where the block does not hold the label: that entry's gradient, the
    label's term included, is dropped), then -inf. Where the block holds the argmax, its own
    column takes max_logit too: the row's frame and that entry are the forward's logit, not the
    recomputed one, which a matmul of another shape may round apart."""
    blocks = VocabBlocks(hidden, weight, bias, wanted)
    grads = tuple(g.reshape(-1).contiguous() for g in grads)  # once, not per block (expanded)
    keep = labels != ignore_index
    # A block's labels are its own column indices (>= 0); ignored rows take -1, which the kernel
    # is told to ignore: the caller's ignore_index may be a column index of the block.
    block_ignore = -1
    for v0, v1 in blocks.ranges():
        vb = v1 - v0
        logits = blocks.logits(v0, v1, max_logit)
        # The argmax's column in the block, else the stand-in column vb: max_logit written there
        # (again, at vb) is the row's frame.
        holds_argmax = (argmax >= v0) & (argmax < v1)
        frame_col = torch.where(holds_argmax, argmax - v0, vb)
        logits.scatter_(1, frame_col.unsqueeze(1), max_logit.unsqueeze(1))
        # argmax -1 marks a NaN row: kept, so the kernel writes the row NaN as a full row's would
        block_argmax = torch.where(argmax < 0, argmax, frame_col)
        holds_label = (labels >= v0) & (labels < v1)
        outside = torch.where(keep, vb + EXTRA_COLUMNS - 1, block_ignore)  # the dropped column
        block_labels = torch.where(keep & holds_label, labels - v0, outside.to(labels.dtype))
        grad = _ts._token_stats_backward(
            *grads, logits, block_labels, temperature, temperature_scalar, block_ignore, *saved,
            block_argmax, backend, out=blocks.grad_buffer(v0, v1),
        )  # fmt: skip
        blocks.accumulate(grad[:, :vb], v0, v1)
    return blocks.gradients()


def _backward_fake(
    g_logprob, g_entropy, g_collision, g_lse, hidden, weight, bias, labels, temperature,
    temperature_scalar, ignore_index, chunk_size, order, lse, entropy, collision, max_prob,
    argmax, max_logit, output_mask, backend,
):  # fmt: skip
    return empty_gradients(hidden, weight, bias, output_mask)


_library.register_kernel("token_stats_from_hidden_backward")(_backward_impl)
torch.library.register_fake("pg_kernels::token_stats_from_hidden_backward", _backward_fake)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, temperature, temperature_scalar, ignore_index, chunk_size,
     order, backend) = inputs  # fmt: skip
    _, entropy, collision, lgp, lse, max_prob, argmax, max_logit = output
    ctx.save_for_backward(
        hidden, weight, bias, labels, temperature, lse, entropy, collision, max_prob, argmax,
        max_logit,
    )  # fmt: skip
    ctx.scalars = (temperature_scalar, ignore_index, chunk_size, order, backend)
    ctx.mark_non_differentiable(lgp, max_prob, argmax, max_logit)


def _backward(
    ctx, g_logprob, g_entropy, g_collision, g_lgp, g_lse, g_max_prob, g_argmax, g_max_logit
):
    (hidden, weight, bias, labels, temperature, lse, entropy, collision, max_prob, argmax,
     max_logit) = ctx.saved_tensors  # fmt: skip
    temperature_scalar, ignore_index, chunk_size, order, backend = ctx.scalars
    wanted = list(ctx.needs_input_grad[:3])
    if not any(wanted):
        return (None,) * 10  # one per input of the op
    grads = _library.call("token_stats_from_hidden_backward",
        g_logprob, g_entropy, g_collision, g_lse, hidden, weight, bias, labels, temperature,
        temperature_scalar, ignore_index, chunk_size, order, lse, entropy, collision, max_prob,
        argmax, max_logit, wanted, backend,
    )  # fmt: skip
    return (*(g if w else None for g, w in zip(grads, wanted)), *(None,) * 7)


torch.library.register_autograd(
    "pg_kernels::token_stats_from_hidden", _backward, setup_context=_setup_context
)
_library.differentiable_once("token_stats_from_hidden_backward")


def check_args(op, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, backend):
    """The shared argument checks of the token_stats-from-hidden ops: (ignore_index, chunk_size,
    temperature, backend), each validated and resolved."""
    check_projection(op, "", hidden, weight, bias)
    check_labels_arg(op, hidden, labels, of="hidden")
    ignore_index = check_ignore_index(op, ignore_index, labels)
    vocab = weight.shape[0]
    chunk_size = check_chunk_size(op, chunk_size, vocab, hidden)
    # The temperature's shape check wants [..., V]-shaped logits; a [..., 1] view stands in.
    temp = make_temperature(op, temperature, hidden[..., :1], of="hidden")
    backend = _backend.resolve(op, backend, hidden.device, kernels=_ts.KERNELS)
    check_labels_on_cpu(op, labels, vocab, ignore_index)
    return ignore_index, chunk_size, temp, backend


def token_stats_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backward_order: str = "auto",
    backend: str = "auto",
) -> TokenStats:
    """`token_stats(hidden @ weight.T + bias, labels, ...)` without materializing the logits.

    Args:
        hidden: [..., D] last hidden states, bf16, fp16, fp32 or fp64.
        weight: [V, D] lm_head weight, hidden's dtype and device.
        labels: [...] int64 or int32, the chosen tokens; ignore_index rows give 0 everywhere.
        bias: optional [V] lm_head bias.
        temperature: a float or a [...] tensor (per row), finite and > 0. Not differentiable.
        ignore_index: label value of rows to skip.
        chunk_size: rows per chunk of the forward and of a backward in row chunks; default:
            64 MiB of logits in hidden's dtype, rounded down to a multiple of 64 rows (512 rows
            at V = 32000 fp32, 192 at V = 151936 bf16); see ops/_linear.py for why. Extra
            memory there is about 2 x chunk_size x V elements (the chunk's logits and their
            gradient), plus the backward's accumulator (below).
        backward_order: "rows": the backward in chunks of rows, each adding its share of the
            weight's gradient into a [V, D] accumulator (fp32 for 16-bit weights); "vocab": in
            blocks of vocabulary columns holding every row, each block's weight gradient one
            matmul over all rows written once, hidden's gradient added into an [N, D]
            accumulator (fp32 for 16-bit inputs); a block's logits and their gradient take
            about as much memory as that accumulator (`_linear.vocab_block_size`: 4096
            columns at D = 4096 bf16, at least 1024). "auto" (default): "vocab" when the
            weight's gradient is wanted, else "rows" (no accumulator then). Neither depends
            on N, so a row's gradients are summed alike at every batch size. The orders give
            the same gradient entries summed in another order (equal to rounding); where N
            exceeds V, "rows" takes less memory.
        backend: the token_stats kernel: "auto", "reference", "cpu", "triton" or "cuda".
            "reference" materializes the logits and runs the float reference (for testing).

    Returns:
        TokenStats of [...] tensors, as `token_stats`. Gradients flow to hidden, weight and bias
        through logprob, entropy, collision and lse, and come back in their dtypes. Each row's
        logits come from a matmul over its chunk, so they can differ from one [N, V] matmul in
        the last bits (as a different batch size would).
    """
    ignore_index, chunk_size, temp, backend = check_args(
        OP, hidden, weight, bias, labels, temperature, ignore_index, chunk_size, backend
    )
    check_backward_order(OP, backward_order)
    if backend == "reference":
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return reference.token_stats(
            logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=False
        )
    lead = labels.shape
    outs = _library.call("token_stats_from_hidden",
        hidden, weight, bias, labels.reshape(-1), temp.tensor, temp.scalar, ignore_index,
        chunk_size, backward_order, backend,
    )  # fmt: skip
    return TokenStats(*(o.view(lead) for o in outs[:7]))  # max_logit is the backward's
