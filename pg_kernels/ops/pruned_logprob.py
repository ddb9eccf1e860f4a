"""pruned_logprob: the label's log-prob on a "safe" vocabulary that drops the extreme tail
(docs/math.md §6), for RL objectives that ignore tokens whose rollout/training mismatch is
large and biased:

    S = {v : z_v >= m + log alpha} plus the label c       (m = max_j z_j, z = logits / tau)
    logprob   = z_c - logsumexp_{v in S} z_v               differentiable: 1[j=c] - p~_j on S,
                                                           0 off S (p~ = softmax restricted to S)
    in_safe   = z_c >= m + log alpha                       (c met the threshold on its own)
    tail_mass = 1 - exp(LSE_S - L) = p(V \\ S)              in [0, 1)

The set depends on the row max, so the CPU kernel reads each row twice: a max-only sweep, then
one sweep with one exp per element (the second read comes from cache). See
csrc/cpu/pruned_logprob.cpp for why an online (one-sweep) version cannot drop elements exactly.
The threshold is treated as a constant for the gradient (it moves with m only on a null set).

Layers: public function `pruned_logprob` -> op `pg_kernels::pruned_logprob` (schema in
_library.py) -> kernel chosen by `backend`: C++ (`pg_kernels._C`) or Triton
(`pg_kernels.triton`); "cuda" has no kernel yet ("auto" takes Triton on GPUs). Autograd saves
only three numbers per row: the raw max logit, LSE_S relative to it (C++) or to the row's frame
(Triton `_frame`), so that it keeps its digits whatever |max / tau|, and the bound of the
kernel's membership test (C++: the threshold in z units; Triton: log alpha, its test being on
d = z - max z). The backward op recomputes p~_j in one pass. `alpha` is a plain float argument
of the op: any value, no recompilation.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    acc_dtype,
    as_real,
    check_ignore_index,
    check_labels_arg,
    check_labels_on_cpu,
    check_logits,
    make_temperature,
    row_layout,
)
from pg_kernels.outputs import PrunedLogprob

OP = "pruned_logprob"
KERNELS = _backend.KERNELS[OP]  # backends with a kernel; the reference serves the others


@_library.register_kernel("pruned_logprob")
def _pruned_logprob(logits, labels, temperature, temperature_scalar, alpha, ignore_index, backend):
    forward, _ = _backend.launchers(OP, backend)
    layout = row_layout(OP, "logits", logits)
    outs = forward(
        logits,
        labels.reshape(-1).contiguous(),
        temperature,
        temperature_scalar,
        alpha,
        ignore_index,
        *layout,
    )
    return tuple(o.view_as(labels) for o in outs)


@torch.library.register_fake("pg_kernels::pruned_logprob")
def _pruned_logprob_fake(
    logits, labels, temperature, temperature_scalar, alpha, ignore_index, backend
):
    stat = labels.new_empty(labels.shape, dtype=acc_dtype(logits.dtype))
    return (
        torch.empty_like(stat),
        labels.new_empty(labels.shape, dtype=torch.bool),
        *(torch.empty_like(stat) for _ in range(4)),
    )


@_library.register_kernel("pruned_logprob_backward")
def _pruned_logprob_backward(
    g_logprob, logits, labels, temperature, temperature_scalar, ignore_index, lse_safe,
    threshold, row_max, backend,
):  # fmt: skip
    _, backward = _backend.launchers(OP, backend)
    layout = row_layout(OP, "logits", logits)
    return backward(
        g_logprob.reshape(-1).contiguous(),
        logits,
        labels.reshape(-1).contiguous(),
        temperature,
        temperature_scalar,
        ignore_index,
        lse_safe.reshape(-1).contiguous(),
        threshold.reshape(-1).contiguous(),
        row_max.reshape(-1).contiguous(),
        *layout,
    )


@torch.library.register_fake("pg_kernels::pruned_logprob_backward")
def _pruned_logprob_backward_fake(
    g_logprob, logits, labels, temperature, temperature_scalar, ignore_index, lse_safe,
    threshold, row_max, backend,
):  # fmt: skip
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, temperature_scalar, alpha, ignore_index, backend = inputs
    _, in_safe, tail_mass, *row_state = output
    ctx.save_for_backward(logits, labels, temperature, *row_state)
    ctx.scalars = (temperature_scalar, ignore_index, backend)
    ctx.mark_non_differentiable(in_safe, tail_mass, *row_state)


def _backward(ctx, g_logprob, g_in_safe, g_tail_mass, g_lse_safe, g_threshold, g_row_max):
    logits, labels, temperature, lse_safe, threshold, row_max = ctx.saved_tensors
    temperature_scalar, ignore_index, backend = ctx.scalars
    grad = _library.call("pruned_logprob_backward",
        g_logprob, logits, labels, temperature, temperature_scalar, ignore_index, lse_safe,
        threshold, row_max, backend,
    )  # fmt: skip
    return grad, None, None, None, None, None, None


torch.library.register_autograd(
    "pg_kernels::pruned_logprob", _backward, setup_context=_setup_context
)
_library.differentiable_once("pruned_logprob_backward")


def _check_alpha(alpha) -> float:
    a = as_real(alpha)
    if a is None:
        raise TypeError(f"{OP}: alpha must be a float in (0, 1), got {type(alpha).__name__}")
    if not (0 < a < 1):
        raise ValueError(f"{OP}: alpha must be in (0, 1), got {alpha}")
    return a


def pruned_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> PrunedLogprob:
    """Log-prob of the label on the safe vocabulary S = {v: p_v >= alpha max p} plus the label.

    Args:
        logits: [..., V] bf16, fp16, fp32 or fp64; only the last dim must be contiguous.
        labels: [...] int64 or int32, the chosen tokens; ignore_index rows give 0 / False.
        alpha: float in (0, 1): tokens at least alpha times as likely as the top one are safe.
        temperature: a float or a [...] tensor (per row), finite and > 0. Not differentiable.
        ignore_index: label value of rows to skip.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (no CUDA C++ kernel yet).

    Returns:
        PrunedLogprob of [...] tensors: logprob (fp32, fp64 for fp64 logits; differentiable,
        gradient 1[j=c] - p~_j on S and 0 off S, in the logits' dtype), in_safe (bool),
        tail_mass (1 - p(S) in [0, 1), not differentiable). logprob >= the full log p_c, and
        equals it as alpha -> 0. A label on a -inf logit gives logprob -inf (in_safe False).
        Rows whose logits hold a NaN or +inf, or only -inf, give NaN (in_safe False).

    Labels outside [0, V) raise on CPU.
    """
    check_logits(OP, "logits", logits)
    check_labels_arg(OP, logits, labels)
    alpha = _check_alpha(alpha)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    temp = make_temperature(OP, temperature, logits)
    backend = _backend.resolve(OP, backend, logits.device, kernels=KERNELS)
    check_labels_on_cpu(OP, labels, logits.shape[-1], ignore_index)
    if backend == "reference":
        return reference.pruned_logprob(
            logits,
            labels,
            alpha=alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            upcast=False,
        )
    logprob, in_safe, tail_mass, *_ = _library.call(
        "pruned_logprob", logits, labels, temp.tensor, temp.scalar, alpha, ignore_index, backend
    )
    return PrunedLogprob(logprob, in_safe, tail_mass)
