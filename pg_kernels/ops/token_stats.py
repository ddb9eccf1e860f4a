"""token_stats: per-token log-prob, entropy, collision probability, logit-gradient proxy and
logsumexp of softmax(logits / temperature), in one pass over the logits (docs/math.md §§1-3).

Layers: public function `token_stats` -> op `pg_kernels::token_stats` (schema in _library.py)
-> kernel chosen by `backend`: C++ (`pg_kernels._C`), Triton (`pg_kernels.triton`) or CUDA C++
(`pg_kernels._C_cuda`). Autograd saves only per-row numbers the forward already writes (L, H, C,
max_prob = 1 / s1 and argmax); the backward op recomputes log p_j = (z_j - m) - log s1 relative
to the row max (m = z at argmax, log s1 = -log max_prob) in one pass and writes the gradient
once. Not z_j - L: the saved fp32 L is rounded (ulp(L) / 2 = 1.9e-6 at L ~ 40), which would be
the relative error of every p_j, 1.9e-6 absolute on p ~ 1 (plain PyTorch: ~1e-7).
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    acc_dtype,
    check_gradient_out,
    check_ignore_index,
    check_labels_arg,
    check_labels_on_cpu,
    check_logits,
    make_temperature,
    row_layout,
)
from pg_kernels.outputs import TokenStats

OP = "token_stats"
KERNELS = _backend.KERNELS[OP]  # backends with a kernel for this op; "reference" always serves


def _token_stats(logits, labels, temperature, temperature_scalar, ignore_index, backend):
    forward, _ = _backend.launchers(OP, backend)
    layout = row_layout(OP, "logits", logits)
    outs = forward(
        logits,
        labels.reshape(-1).contiguous(),
        temperature,
        temperature_scalar,
        ignore_index,
        *layout,
    )
    return tuple(o.view_as(labels) for o in outs)  # view_as: ~1 us; view(labels.shape) ~2.5 us


_library.register_kernel("token_stats")(_token_stats)


@torch.library.register_fake("pg_kernels::token_stats")
def _token_stats_fake(logits, labels, temperature, temperature_scalar, ignore_index, backend):
    stat = labels.new_empty(labels.shape, dtype=acc_dtype(logits.dtype))
    return (
        *(torch.empty_like(stat) for _ in range(6)),
        labels.new_empty(labels.shape, dtype=torch.int64),
    )


def _token_stats_backward(
    g_logprob, g_entropy, g_collision, g_lse, logits, labels, temperature, temperature_scalar,
    ignore_index, lse, entropy, collision, max_prob, argmax, backend, out=None,
):  # fmt: skip
    """The backward launcher; `out` (not in the op's schema: for callers looping over chunks,
    e.g. token_stats_from_hidden) is a reused buffer to write the gradient into."""
    _, backward = _backend.launchers(OP, backend)
    if out is not None:
        check_gradient_out(f"{OP}_backward", logits, out)
    layout = row_layout(OP, "logits", logits)
    flat = [t.reshape(-1).contiguous() for t in (g_logprob, g_entropy, g_collision, g_lse)]
    saved = [t.reshape(-1) for t in (lse, entropy, collision, max_prob, argmax)]
    return backward(
        *flat,
        logits,
        labels.reshape(-1).contiguous(),
        temperature,
        temperature_scalar,
        ignore_index,
        *saved,
        *layout,
        out,
    )


_library.register_kernel("token_stats_backward")(_token_stats_backward)


@torch.library.register_fake("pg_kernels::token_stats_backward")
def _token_stats_backward_fake(
    g_logprob, g_entropy, g_collision, g_lse, logits, labels, temperature, temperature_scalar,
    ignore_index, lse, entropy, collision, max_prob, argmax, backend,
):  # fmt: skip
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, temperature_scalar, ignore_index, backend = inputs
    _, entropy, collision, lgp, lse, max_prob, argmax = output
    ctx.save_for_backward(logits, labels, temperature, lse, entropy, collision, max_prob, argmax)
    ctx.scalars = (temperature_scalar, ignore_index, backend)
    ctx.mark_non_differentiable(lgp, max_prob, argmax)


def _backward(ctx, g_logprob, g_entropy, g_collision, g_lgp, g_lse, g_max_prob, g_argmax):
    logits, labels, temperature, lse, entropy, collision, max_prob, argmax = ctx.saved_tensors
    temperature_scalar, ignore_index, backend = ctx.scalars
    grad = _library.call("token_stats_backward",
        g_logprob, g_entropy, g_collision, g_lse, logits, labels, temperature,
        temperature_scalar, ignore_index, lse, entropy, collision, max_prob, argmax, backend,
    )  # fmt: skip
    return grad, None, None, None, None, None


torch.library.register_autograd("pg_kernels::token_stats", _backward, setup_context=_setup_context)
_library.differentiable_once("token_stats_backward")


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> TokenStats:
    """Per-token statistics of p = softmax(logits / temperature), in one pass over the logits.

    Args:
        logits: [..., V] bf16, fp16, fp32 or fp64; only the last dim must be contiguous.
        labels: [...] int64 or int32, the chosen tokens; ignore_index rows give 0 everywhere.
        temperature: a float or a [...] tensor (per row), finite and > 0. Not differentiable.
        ignore_index: label value of rows to skip.
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        TokenStats of [...] tensors (fp32; fp64 for fp64 logits): logprob, entropy, collision,
        lgp, lse, max_prob, argmax (int64), plus the properties lgp_norm and renyi2.
        Gradients flow to `logits` through logprob, entropy, collision and lse, and come back in
        the logits' dtype.

    Labels outside [0, V) raise on CPU; on CUDA they give NaN rows (see `check_labels`).
    """
    check_logits(OP, "logits", logits)
    check_labels_arg(OP, logits, labels)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    temp = make_temperature(OP, temperature, logits)
    backend = _backend.resolve(OP, backend, logits.device, kernels=KERNELS)
    check_labels_on_cpu(OP, labels, logits.shape[-1], ignore_index)
    if backend == "reference":
        out = reference.token_stats(
            logits, labels, temperature=temperature, ignore_index=ignore_index, upcast=False
        )
        return out
    return TokenStats(
        *_library.call(
            "token_stats", logits, labels, temp.tensor, temp.scalar, ignore_index, backend
        )
    )
