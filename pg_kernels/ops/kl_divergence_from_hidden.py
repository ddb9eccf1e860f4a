"""kl_divergence_from_hidden: dense per-row KL between a policy and a teacher given by their hidden
states and lm_heads, without holding either [N, V] logits (docs/math.md §4 per row; the chunking
is in `_linear.py`).

Per chunk of rows: both projections into reused buffers, then the kl_divergence kernel (one pass
over both). The backward recomputes both chunks' logits and runs the kl_divergence backward
kernel for the sides that need a gradient, then the gradient matmuls of each side. The teacher's
lm_head may differ from the student's (its own D, weight and bias); only V must agree.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops import kl_divergence as _kl
from pg_kernels.ops._common import (
    acc_dtype,
)
from pg_kernels.ops._linear import (
    ChunkedProjection,
    check_chunk_size,
    check_projection,
    chunks,
    empty_gradients,
    num_rows,
    rows,
)

OP = "kl_divergence_from_hidden"


def _forward(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, backend,
):  # fmt: skip
    proj = ChunkedProjection(hidden, weight, bias, chunk_size)
    ref_proj = ChunkedProjection(ref_hidden, ref_weight, ref_bias, chunk_size)
    kl, row_state = _forward_fake(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
        chunk_size, backend,
    )  # fmt: skip
    for s, e in chunks(proj.n, chunk_size):
        kl[s:e], row_state[s:e] = _kl._kl_divergence(
            proj.logits(s, e), ref_proj.logits(s, e), rows(labels, s, e),
            rows(temperature, s, e), temperature_scalar, rows(ref_temperature, s, e),
            ref_temperature_scalar, ignore_index, direction, backend,
        )  # fmt: skip
    return kl, row_state


def _forward_fake(
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, backend,
):  # fmt: skip
    n, acc = num_rows(hidden), acc_dtype(hidden.dtype)
    return hidden.new_empty((n,), dtype=acc), hidden.new_empty((n, _kl.ROW_STATE), dtype=acc)


_library.register_kernel("kl_divergence_from_hidden")(_forward)
torch.library.register_fake("pg_kernels::kl_divergence_from_hidden", _forward_fake)


def _backward_impl(
    grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, kl, row_state, output_mask, backend,
):  # fmt: skip
    wanted, ref_wanted = tuple(output_mask[:3]), tuple(output_mask[3:])
    proj = ChunkedProjection(hidden, weight, bias, chunk_size, wanted)
    ref_proj = ChunkedProjection(ref_hidden, ref_weight, ref_bias, chunk_size, ref_wanted)
    for s, e in chunks(proj.n, chunk_size):
        grad, ref_grad = _kl._kl_divergence_backward(
            grad_kl[s:e], proj.logits(s, e), ref_proj.logits(s, e), rows(labels, s, e),
            rows(temperature, s, e), temperature_scalar, rows(ref_temperature, s, e),
            ref_temperature_scalar, ignore_index, direction, kl[s:e], row_state[s:e],
            any(wanted), any(ref_wanted), backend,
        )  # fmt: skip
        if any(wanted):
            proj.accumulate(grad, s, e)
        if any(ref_wanted):
            ref_proj.accumulate(ref_grad, s, e)
    return (*proj.gradients(), *ref_proj.gradients())


def _backward_fake(
    grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
    chunk_size, kl, row_state, output_mask, backend,
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
     chunk_size, backend) = inputs  # fmt: skip
    kl, row_state = output
    ctx.save_for_backward(
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        ref_temperature, kl, row_state,
    )  # fmt: skip
    ctx.scalars = (
        temperature_scalar, ref_temperature_scalar, ignore_index, direction, chunk_size, backend
    )  # fmt: skip
    ctx.mark_non_differentiable(row_state)


def _backward(ctx, g_kl, g_row_state):
    (hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
     ref_temperature, kl, row_state) = ctx.saved_tensors  # fmt: skip
    temperature_scalar, ref_temperature_scalar, ignore_index, direction, chunk_size, backend = (
        ctx.scalars
    )
    wanted = list(ctx.needs_input_grad[:6])
    if not any(wanted):
        return (None,) * 15
    grads = _library.call("kl_divergence_from_hidden_backward",
        g_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, labels, temperature,
        temperature_scalar, ref_temperature, ref_temperature_scalar, ignore_index, direction,
        chunk_size, kl, row_state, wanted, backend,
    )  # fmt: skip
    return (*(g if w else None for g, w in zip(grads, wanted)), *(None,) * 9)


torch.library.register_autograd(
    "pg_kernels::kl_divergence_from_hidden", _backward, setup_context=_setup_context
)
_library.differentiable_once("kl_divergence_from_hidden_backward")


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
        chunk_size: rows per chunk, as `token_stats_from_hidden` (both sides use it; the extra
            memory is that of two chunks' logits and gradients).
        backend: the kl_divergence kernel: "auto", "reference", "cpu" or "triton".

    Returns:
        [...] fp32 (fp64 for fp64 inputs) KL per row, as `kl_divergence`. Differentiable with
        respect to hidden, weight, bias and, when they require grad, the teacher's tensors;
        gradients come back in the inputs' dtypes.
    """
    check_projection(OP, "", hidden, weight, bias)
    check_projection(OP, "ref_", ref_hidden, ref_weight, ref_bias)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{OP}: ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(ref_hidden.shape[:-1])}"
        )
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{OP}: ref_weight must have weight's vocabulary size V = {weight.shape[0]}, "
            f"got {ref_weight.shape[0]}"
        )
    if ref_hidden.dtype != hidden.dtype:
        raise TypeError(
            f"{OP}: ref_hidden must have hidden's dtype {hidden.dtype}, got {ref_hidden.dtype} "
            "(cast one side)"
        )
    if ref_hidden.device != hidden.device:
        raise ValueError(
            f"{OP}: ref_hidden is on {ref_hidden.device} but hidden on {hidden.device}"
        )
    lead = tuple(hidden.shape[:-1])
    chunk_size = check_chunk_size(OP, chunk_size, weight.shape[0], hidden)
    # hidden[..., :1] stands in for the logits: the checks read only their leading shape
    ignore_index, temp, ref_temp = _kl.check_kl_args(
        OP, hidden[..., :1], direction, labels, ignore_index, temperature, ref_temperature,
        of="hidden",
    )  # fmt: skip
    backend = _backend.resolve(OP, backend, hidden.device, kernels=_kl.KERNELS)
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
        ref_temp.tensor, ref_temp.scalar, ignore_index, direction, chunk_size, backend,
    )  # fmt: skip
    return kl.view(lead)
