"""kl_divergence_from_hidden: dense per-row KL between a policy and a teacher given by their hidden
states and lm_heads, without holding either [N, V] logits (docs/math.md §4 per row; the chunking
is in `_linear.py`).

In one of two orders (`backward_order`), for the forward and the backward alike:

- Row chunks: per chunk of rows, both projections into reused buffers, then the kl_divergence
  kernel (one pass over both). The backward recomputes both chunks' logits and runs the
  kl_divergence backward kernel for the sides that need a gradient, then the gradient matmuls
  of each side, adding each chunk's share of a weight's gradient into a [V, D] accumulator.
- Vocabulary blocks (the default): the blocks are vocab-parallel shards taken in turn on one
  device (pg_kernels/parallel/kl_divergence.py). The forward runs
  the kernel on every row's logits of each block of columns, keeps each block's partial state
  (6 numbers per row and block) and merges them as the ranks do; the backward recomputes each
  block and runs the backward kernel with that block's row state and the other blocks' terms of
  a dominant entry (`outside_terms`), then writes weight[block]'s gradient in one matmul over
  all rows and adds hidden's into an [N, D] accumulator. No [V, D] accumulator (module
  docstring of `_linear.py`); the merge, like a whole row's pass, rounds the KL once from fp64.

The teacher's lm_head may differ from the student's (its own D, weight and bias); only V must
agree. Both sides use the student's block width.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops import kl_divergence as _kl
from pg_kernels.ops._common import Temperature, acc_dtype
from pg_kernels.ops._linear import (
    ChunkedProjection,
    VocabBlocks,
    check_backward_order,
    check_chunk_size,
    check_projection,
    chunks,
    empty_gradients,
    num_rows,
    rows,
    vocab_block_size,
)
from pg_kernels.parallel.kl_divergence import (
    PARTIAL_STATE,
    SHARD_ROWS,
    Merged,
    merge_partials,
    partial_state,
    shard_backward_states,
    shard_rows,
)

OP = "kl_divergence_from_hidden"


def _forward(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, order, backend,
):  # fmt: skip
    kl, state = _forward_fake(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
        chunk_size, order, backend,
    )  # fmt: skip
    if order == "vocab":
        temp, ref_temp = _temperatures(
            temperature, temperature_scalar, ref_temperature, ref_temperature_scalar
        )
        blocks, ref_blocks = _blocks(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
        per_block = state.new_empty((*state.shape[:2], SHARD_ROWS))
        for i, (v0, v1) in enumerate(blocks.ranges()):
            per_block[i] = shard_rows(
                blocks.logits(v0, v1), ref_blocks.logits(v0, v1), labels, temp, ref_temp,
                ignore_index, direction, backend,
            )  # fmt: skip
        state.copy_(partial_state(per_block))
        kl.copy_(_merged(state.double(), temp, ref_temp, hidden.dtype, direction, backend).kl)
        if labels is not None:
            kl.masked_fill_(labels == ignore_index, 0.0)
        return kl, state
    proj = ChunkedProjection(hidden, weight, bias, chunk_size)
    ref_proj = ChunkedProjection(ref_hidden, ref_weight, ref_bias, chunk_size)
    for s, e in chunks(proj.n, chunk_size):
        kl[s:e], state[s:e] = _kl._kl_divergence(
            proj.logits(s, e), ref_proj.logits(s, e), rows(labels, s, e),
            rows(temperature, s, e), temperature_scalar, rows(ref_temperature, s, e),
            ref_temperature_scalar, ignore_index, direction, backend,
        )  # fmt: skip
    return kl, state


def _blocks(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, wanted=(False,) * 6):
    """Both sides' VocabBlocks, at the student's block width."""
    block = vocab_block_size(weight.shape[0], hidden.shape[-1], hidden.dtype)
    return (
        VocabBlocks(hidden, weight, bias, tuple(wanted[:3]), block),
        VocabBlocks(ref_hidden, ref_weight, ref_bias, tuple(wanted[3:]), block),
    )


def _temperatures(temperature, temperature_scalar, ref_temperature, ref_temperature_scalar):
    """Both sides' temperatures as `parallel.merge_partials` and `shard_rows` take them."""
    return Temperature(temperature, temperature_scalar), Temperature(
        ref_temperature, ref_temperature_scalar
    )


def _merged(gathered, temp, ref_temp, dtype, direction, backend) -> Merged:
    """The blocks' partial states [blocks, N, 6] (fp64) merged (`parallel.merge_partials`)."""
    return merge_partials(gathered, temp, ref_temp, dtype, backend, direction == "reverse")


def _forward_fake(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, order, backend,
):  # fmt: skip
    """kl [N] and the state the backward takes: each row's (row chunks, [N, ROW_STATE]) or each
    block's partial state of each row (vocabulary blocks, [blocks, N, 6])."""
    n, acc = num_rows(hidden), acc_dtype(hidden.dtype)
    if order == "vocab":
        v = weight.shape[0]
        block = vocab_block_size(v, hidden.shape[-1], hidden.dtype)
        shape = (-(-v // block), n, PARTIAL_STATE)
    else:
        shape = (n, _kl.ROW_STATE)
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty(shape, dtype=acc)


_library.register_kernel("kl_divergence_from_hidden")(_forward)
torch.library.register_fake("pg_kernels::kl_divergence_from_hidden", _forward_fake)


def _backward_impl(
    grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, order, kl, state, output_mask, backend,
):  # fmt: skip
    wanted, ref_wanted = tuple(output_mask[:3]), tuple(output_mask[3:])
    if order == "vocab":
        return _backward_in_vocab_blocks(
            grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels,
            temperature, temperature_scalar, ref_temperature, ref_temperature_scalar,
            ignore_index, direction, kl, state, output_mask, backend,
        )  # fmt: skip
    proj = ChunkedProjection(hidden, weight, bias, chunk_size, wanted)
    ref_proj = ChunkedProjection(ref_hidden, ref_weight, ref_bias, chunk_size, ref_wanted)
    for s, e in chunks(proj.n, chunk_size):
        grad, ref_grad = _kl._kl_divergence_backward(
            grad_kl[s:e], proj.logits(s, e), ref_proj.logits(s, e), rows(labels, s, e),
            rows(temperature, s, e), temperature_scalar, rows(ref_temperature, s, e),
            ref_temperature_scalar, ignore_index, direction, kl[s:e], state[s:e],
            any(wanted), any(ref_wanted), backend,
        )  # fmt: skip
        if any(wanted):
            proj.accumulate(grad, s, e)
        if any(ref_wanted):
            ref_proj.accumulate(ref_grad, s, e)
    return (*proj.gradients(), *ref_proj.gradients())


def _backward_in_vocab_blocks(
    grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction, kl,
    state, output_mask, backend,
):  # fmt: skip
    """Each block as a vocab-parallel rank's shard (pg_kernels/parallel/kl_divergence.py, the
    backward): the kernel with the block's row state relative to its own frames, and, where
    the weight side's gradient is wanted, the other blocks' terms of its dominant entry."""
    wanted, ref_wanted = tuple(output_mask[:3]), tuple(output_mask[3:])
    blocks, ref_blocks = _blocks(hidden, weight, bias, ref_hidden, ref_weight, ref_bias,
                                 output_mask)  # fmt: skip
    temp, ref_temp = _temperatures(
        temperature, temperature_scalar, ref_temperature, ref_temperature_scalar
    )
    gathered = state.double()
    merged = _merged(gathered, temp, ref_temp, hidden.dtype, direction, backend)  # N-sized, redone
    reverse = direction == "reverse"
    acc = acc_dtype(hidden.dtype)
    row_states, outside = shard_backward_states(
        gathered, merged, acc, any(wanted if reverse else ref_wanted), reverse
    )
    for i, (v0, v1) in enumerate(blocks.ranges()):
        grad, ref_grad = _kl._kl_divergence_backward(
            grad_kl, blocks.logits(v0, v1), ref_blocks.logits(v0, v1), labels, temperature,
            temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index,
            direction, kl, row_states[i], any(wanted), any(ref_wanted), backend,
            None if outside is None else outside[i],
        )  # fmt: skip
        if any(wanted):
            blocks.accumulate(grad, v0, v1)
        if any(ref_wanted):
            ref_blocks.accumulate(ref_grad, v0, v1)
    return (*blocks.gradients(), *ref_blocks.gradients())


def _backward_fake(
    grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, order, kl, state, output_mask, backend,
):  # fmt: skip
    return (
        *empty_gradients(hidden, weight, bias, output_mask[:3]),
        *empty_gradients(ref_hidden, ref_weight, ref_bias, output_mask[3:]),
    )


_library.register_kernel("kl_divergence_from_hidden_backward")(_backward_impl)
torch.library.register_fake("pg_kernels::kl_divergence_from_hidden_backward", _backward_fake)


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
     temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
     chunk_size, order, backend) = inputs  # fmt: skip
    kl, state = output
    ctx.save_for_backward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        ref_temperature, kl, state,
    )  # fmt: skip
    ctx.scalars = (
        temperature_scalar, ref_temperature_scalar, ignore_index, direction, chunk_size, order,
        backend,
    )  # fmt: skip
    ctx.mark_non_differentiable(state)


def _backward(ctx, g_kl, g_state):
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
     ref_temperature, kl, state) = ctx.saved_tensors  # fmt: skip
    (temperature_scalar, ref_temperature_scalar, ignore_index, direction, chunk_size, order,
     backend) = ctx.scalars  # fmt: skip
    wanted = list(ctx.needs_input_grad[:6])
    if not any(wanted):
        return (None,) * 16
    grads = _library.call("kl_divergence_from_hidden_backward",
        g_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
        chunk_size, order, kl, state, wanted, backend,
    )  # fmt: skip
    return (*(g if w else None for g, w in zip(grads, wanted)), *(None,) * 10)


torch.library.register_autograd(
    "pg_kernels::kl_divergence_from_hidden", _backward, setup_context=_setup_context
)
_library.differentiable_once("kl_divergence_from_hidden_backward")


def check_args(
    op, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, direction, labels, ignore_index,
    temperature, ref_temperature, chunk_size, backward_order, backend,
):  # fmt: skip
    """The shared argument checks of the KL-from-hidden ops: (chunk_size, backward_order,
    ignore_index, temperature, ref_temperature, backend), each validated and resolved but the
    order ("auto" stays for the op to resolve)."""
    check_projection(op, "", hidden, weight, bias)
    check_projection(op, "ref_", ref_hidden, ref_weight, ref_bias)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{op}: ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(ref_hidden.shape[:-1])}"
        )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{op}: ref_weight must have weight's vocabulary size V = {weight.shape[0]}, "
            f"got {ref_weight.shape[0]}"
        )
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(
            f"{op}: ref_hidden must have hidden's dtype {hidden.dtype}, got {ref_hidden.dtype} "
            "(cast one side)"
        )
    if ref_hidden.device != hidden.device:
        raise ValueError(
            f"{op}: ref_hidden is on {ref_hidden.device} but hidden on {hidden.device}"
        )
    chunk_size = check_chunk_size(op, chunk_size, weight.shape[0], hidden)
    order = check_backward_order(op, backward_order)
    # hidden[..., :1] stands in for the logits: the checks read only their leading shape
    ignore_index, temp, ref_temp = _kl.check_kl_args(
        op, hidden[..., :1], direction, labels, ignore_index, temperature, ref_temperature,
        of="hidden",
    )  # fmt: skip
    backend = _backend.resolve(op, backend, hidden.device, kernels=_kl.KERNELS)
    return chunk_size, order, ignore_index, temp, ref_temp, backend


def kl_divergence_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
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
) -> torch.Tensor:
    """`kl_divergence(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias, ...)`
    without materializing either logits tensor.

    Args:
        hidden: [..., D] the policy's last hidden states, bf16, fp16, fp32 or fp64.
        weight: [V, D] the policy's lm_head weight; bias: optional [V].
        ref_hidden: [..., D_ref] the teacher's (reference's) hidden states, same leading shape
            and dtype as hidden; ref_weight: [V, D_ref]; ref_bias: optional [V].
        direction: "reverse" for KL(p || q) (on-policy imitation), "forward" for KL(q || p)
            (distillation); p is the policy, q the teacher.
        temperature, ref_temperature, labels, ignore_index: as `kl_divergence`.
        chunk_size: rows per chunk in row-chunk order, as `token_stats_from_hidden` (both sides
            use it; the extra memory is that of two chunks' logits and gradients).
        backward_order: the order of the forward and the backward (module docstring): "rows",
            chunks of rows, a weight's gradient added into a [V, D] accumulator (fp32 for
            16-bit weights); "vocab", blocks of vocabulary columns holding every row (the
            student's `token_stats_from_hidden` width for both sides; each block's partial
            state kept, 6 numbers per row), a weight's gradient written once per block and
            hidden's added into an [N, D] accumulator (fp32 for 16-bit inputs); "auto"
            (default): "vocab" (an empty batch: "rows"), whether or not a gradient is wanted,
            so that the KL's value does not depend on it. The two orders' KLs and gradients
            agree to rounding; neither order depends on N. Without an lm_head weight's
            gradient, "rows" needs no accumulator.
        backend: the kl_divergence kernel: "auto", "reference", "cpu" or "triton".

    Returns:
        [...] fp32 (fp64 for fp64 inputs) KL per row, as `kl_divergence`. Differentiable with
        respect to hidden, weight, bias and, when they require grad, the teacher's tensors;
        gradients come back in the inputs' dtypes.
    """
    chunk_size, order, ignore_index, temp, ref_temp, backend = check_args(
        OP, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, direction, labels,
        ignore_index, temperature, ref_temperature, chunk_size, backward_order, backend,
    )  # fmt: skip
    lead = tuple(hidden.shape[:-1])
    if num_rows(hidden) == 0:  # nothing to compute: row chunks handle the empty batch
        order = "rows"
    elif order == "auto":
        order = "vocab"
    if backend == "reference":
        return reference.kl_divergence(
            torch.nn.functional.linear(hidden, weight, bias),
            torch.nn.functional.linear(ref_hidden, ref_weight, ref_bias),
            direction=direction, temperature=temperature, ref_temperature=ref_temperature,
            labels=labels, ignore_index=ignore_index, upcast=False,
        )  # fmt: skip
    kl, _ = _library.call("kl_divergence_from_hidden",
        hidden, weight, bias,
        ref_hidden, ref_weight, ref_bias,
        None if labels is None else labels.reshape(-1), temp.tensor, temp.scalar,
        ref_temp.tensor, ref_temp.scalar, ignore_index, direction, chunk_size, order, backend,
    )  # fmt: skip
    return kl.view(lead)
