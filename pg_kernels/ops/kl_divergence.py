"""kl_divergence: per-row KL between p = softmax(logits / T) and q = softmax(ref_logits / T_ref),
in one pass over both tensors (docs/math.md §4).

direction "reverse" is KL(p || q), the dense per-token gradient of on-policy imitation (the
student samples, the teacher q scores); "forward" is KL(q || p), distillation.

Layers: public function `kl_divergence` -> op `pg_kernels::kl_divergence` (schema in
_library.py) -> kernel chosen by `backend`: C++ (`pg_kernels._C`) or Triton
(`pg_kernels.triton`; checked under its interpreter, compiled for sm_90 and timed on an H200:
benchmarks/results/cuda-h200). Autograd saves only per-row scalars: KL, each side's max m and
log s1 = log sum exp(z - m) (log-probs as (z - m) - log s1 are exact at the top token; z - L
would lose ulp(L)), and c = E_w[d_w - d_v] with d = z - m, so that the backward's
(log w_j - log v_j) - KL = (d_w,j - d_v,j) - c exactly, without the O(log V) terms that cancel.
The backward op recomputes p_j and q_j in one pass and writes each requested gradient once:
    reverse  d/dz = p ((log p - log q) - KL)      d/dz_ref = q - p
    forward  d/dz = p - q                          d/dz_ref = q ((log q - log p) - KL)
each divided by its own temperature.

Infinities: a term with zero weight is exactly 0. Where the weighting distribution has mass
and the other has none (a -inf logit on the other side only), the KL is +inf; the gradient
with respect to the weighting side's logits is then NaN for that row (0 if the row's upstream
gradient is 0, e.g. after masking it out), while the other side's gradient stays finite and
exact. Rows holding NaN or +inf, or only -inf, in either tensor give NaN.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    acc_dtype,
    check_ignore_index,
    check_labels_arg,
    check_logits,
    check_logits_pair,
    make_temperature,
    row_layout,
    view_rows,
)

OP = "kl_divergence"
KERNELS = _backend.KERNELS[OP]  # backends with a kernel for this op; "reference" always serves
DIRECTIONS = ("reverse", "forward")
ROW_STATE = 5  # per-row numbers saved for the backward (see _library.py)


def _layouts(logits, ref_logits):
    return (*row_layout(OP, "logits", logits), *row_layout(OP, "ref_logits", ref_logits))


def _flat(labels):
    # contiguous(): reshape(-1) of a strided 1-D view (labels[::2]) is still strided.
    return None if labels is None else labels.reshape(-1).contiguous()


def _kl_divergence(
    logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, direction, backend,
):  # fmt: skip
    # Also here: a direct torch.ops call skips kl_divergence()'s checks, and the Triton kernels
    # would read one side in the other's dtype.
    check_logits_pair(OP, logits, ref_logits, "ref_logits")
    forward, _ = _backend.launchers(OP, backend)
    outs = forward(
        logits, ref_logits, _flat(labels), temperature, temperature_scalar, ref_temperature,
        ref_temperature_scalar, ignore_index, direction == "reverse", *_layouts(logits, ref_logits),
    )  # fmt: skip
    kl, row_state = outs
    lead = logits.shape[:-1]
    return view_rows(kl, lead), view_rows(row_state, lead, ROW_STATE)


_library.register_kernel("kl_divergence")(_kl_divergence)


@torch.library.register_fake("pg_kernels::kl_divergence")
def _kl_divergence_fake(
    logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, direction, backend,
):  # fmt: skip
    torch._check(
        ref_logits.shape == logits.shape, lambda: f"{OP}: ref_logits must have the logits' shape"
    )
    lead = logits.shape[:-1]
    acc = acc_dtype(logits.dtype)
    return logits.new_empty(lead, dtype=acc), logits.new_empty((*lead, ROW_STATE), dtype=acc)


def _kl_divergence_backward(
    grad_kl, logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, direction, kl, row_state, logits_grad, ref_grad,
    backend, outside_terms=None,
):  # fmt: skip
    """outside_terms [N, 2], given where the rows are shards of wider rows (pg_kernels.parallel):
    per row, the sum and summed size of the weight side's terms w_j ((d_w,j - d_v,j) - KL) on
    the other shards, which the gradient of a dominant entry, minus the sum of the row's others,
    takes in (C++ DominantEntry, Triton `_dominant_row`). None: the rows are whole."""
    _, backward = _backend.launchers(OP, backend)
    acc = acc_dtype(logits.dtype)
    grad_kl, kl, row_state = (t.reshape(-1).to(acc).contiguous() for t in (grad_kl, kl, row_state))
    if outside_terms is not None:
        if outside_terms.shape != (kl.numel(), 2) or outside_terms.dtype != acc:
            raise ValueError(
                f"kl_divergence_backward: outside_terms must be [{kl.numel()}, 2] {acc}, got "
                f"{list(outside_terms.shape)} {outside_terms.dtype}"
            )
        outside_terms = outside_terms.contiguous()
    grads = backward(
        grad_kl, logits, ref_logits, _flat(labels), temperature, temperature_scalar,
        ref_temperature, ref_temperature_scalar, ignore_index, direction == "reverse", kl,
        row_state, logits_grad, ref_grad, outside_terms, *_layouts(logits, ref_logits),
    )  # fmt: skip
    return tuple(grads)


_library.register_kernel("kl_divergence_backward")(_kl_divergence_backward)


@torch.library.register_fake("pg_kernels::kl_divergence_backward")
def _kl_divergence_backward_fake(
    grad_kl, logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
    ref_temperature_scalar, ignore_index, direction, kl, row_state, logits_grad, ref_grad,
    backend, outside_terms=None,
):  # fmt: skip
    def grad_like(x, wanted):
        shape = x.shape if wanted else (0,)
        return torch.empty(shape, dtype=x.dtype, device=x.device)

    return grad_like(logits, logits_grad), grad_like(ref_logits, ref_grad)


def _setup_context(ctx, inputs, output):
    (logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
     ref_temperature_scalar, ignore_index, direction, backend) = inputs  # fmt: skip
    kl, row_state = output
    ctx.save_for_backward(logits, ref_logits, labels, temperature, ref_temperature, kl, row_state)
    ctx.scalars = (temperature_scalar, ref_temperature_scalar, ignore_index, direction, backend)
    ctx.mark_non_differentiable(row_state)


def _backward(ctx, g_kl, g_row_state):
    logits, ref_logits, labels, temperature, ref_temperature, kl, row_state = ctx.saved_tensors
    temperature_scalar, ref_temperature_scalar, ignore_index, direction, backend = ctx.scalars
    need_logits, need_ref = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_logits or need_ref):
        return (None,) * 10
    grad, grad_ref = _library.call("kl_divergence_backward",
        g_kl, logits, ref_logits, labels, temperature, temperature_scalar, ref_temperature,
        ref_temperature_scalar, ignore_index, direction, kl, row_state, need_logits, need_ref,
        backend,
    )  # fmt: skip
    return (
        grad if need_logits else None,
        grad_ref if need_ref else None,
        *(None,) * 8,
    )


torch.library.register_autograd(
    "pg_kernels::kl_divergence", _backward, setup_context=_setup_context
)
_library.differentiable_once("kl_divergence_backward")


def check_kl_args(
    op, logits, direction, labels, ignore_index, temperature, ref_temperature, of="logits"
):
    """The checks every kl_divergence entry point shares, past the logits' own: direction,
    labels against the rows of `logits` (named `of` in errors), ignore_index and both
    temperatures (ref defaults to temperature). Returns (ignore_index, temperature,
    ref_temperature) as the op takes them."""
    if not isinstance(direction, str) or direction not in DIRECTIONS:
        raise ValueError(f"{op}: direction must be one of {DIRECTIONS}, got {direction!r}")
    if labels is not None:
        check_labels_arg(op, logits, labels, of=of)
    ignore_index = check_ignore_index(op, ignore_index, labels)
    temp = make_temperature(op, temperature, logits, of=of)
    ref_temp = (
        temp
        if ref_temperature is None
        else make_temperature(op, ref_temperature, logits, "ref_temperature", of=of)
    )
    return ignore_index, temp, ref_temp


def kl_divergence(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    direction: str = "reverse",
    temperature: float | torch.Tensor = 1.0,
    ref_temperature: float | torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row KL divergence between p = softmax(logits / T) and q = softmax(ref_logits / T_ref).

    One pass over both tensors forward, one backward; no [N, V] temporary.

    Args:
        logits: [..., V] bf16, fp16, fp32 or fp64; only the last dim must be contiguous.
        ref_logits: [..., V] reference / teacher logits, same shape and dtype as `logits`
            (leading dims may be strided differently). Differentiable when it requires grad.
        direction: "reverse" for KL(p || q) = sum p (log p - log q) (on-policy imitation),
            "forward" for KL(q || p) (distillation).
        temperature: a float or a [...] tensor (per row), finite and > 0. Not differentiable.
        ref_temperature: the same for ref_logits; defaults to `temperature`.
        labels: optional [...] int64/int32; only rows equal to ignore_index are read (their
            KL is 0 and their gradient 0). Other values are not used.
        ignore_index: label value of rows to skip.
        backend: "auto", "reference", "cpu" or "triton" ("cuda" has no kernel yet; "auto" takes
            Triton on CUDA tensors).

    Returns:
        [...] fp32 (fp64 for fp64 logits) KL per row, >= 0. +inf where the weighting
        distribution (p for reverse, q for forward) has mass on a token the other gives
        probability 0 (a -inf logit); a term with zero weight is exactly 0, never NaN. NaN on
        rows holding NaN or +inf, or only -inf, in either tensor; 0 on ignored rows.
        Gradients come back in the logits' dtype. On a +inf row the weighting side's gradient
        is NaN (0 when that row's upstream gradient is 0); the other side's is finite.
    """
    check_logits(OP, "logits", logits)
    check_logits_pair(OP, logits, ref_logits, "ref_logits")
    ignore_index, temp, ref_temp = check_kl_args(
        OP, logits, direction, labels, ignore_index, temperature, ref_temperature
    )
    backend = _backend.resolve(OP, backend, logits.device, kernels=KERNELS)
    if backend == "reference":
        return reference.kl_divergence(
            logits, ref_logits, direction=direction, temperature=temperature,
            ref_temperature=ref_temperature, labels=labels, ignore_index=ignore_index,
            upcast=False,
        )  # fmt: skip
    kl, _ = _library.call("kl_divergence",
        logits, ref_logits, labels, temp.tensor, temp.scalar, ref_temp.tensor, ref_temp.scalar,
        ignore_index, direction, backend,
    )  # fmt: skip
    return kl
