"""topk_kl: KL(q || p) against a distribution q known only on its top-k ids (what inference
engines return: ids [..., K] and log-probs [..., K]), coarse-grained to those ids plus one tail
bucket (docs/math.md §4), in one pass over the logits:

    KL_k = sum_{v in K} q_v (log q_v - log p_v) + q_tail (log q_tail - log p_tail)
    q_tail = 1 - sum_K q_v (clamped >= 0; 0 when k = V),  p_tail = 1 - sum_K p_v

By the data processing inequality KL_k <= KL(q || p) for any q that matches the given top-k
log-probs, with equality at k = V. Gradient w.r.t. z = logits / temperature, with
Q = sum_K q_v + q_tail (1 unless the given q_v sum past 1):

    dKL_k/dz_j = Q p_j - q_j                     (j in K)
    dKL_k/dz_j = p_j (Q - q_tail / p_tail)       (j not in K: p minus q_tail spread over the
                                                  tail in proportion to p)

Layers: public function `topk_kl` -> op `pg_kernels::topk_kl` (schema in _library.py) -> kernel
chosen by `backend`: C++ (`pg_kernels._C`) or Triton (`pg_kernels.triton`); "cuda" has no kernel
yet ("auto" takes Triton on GPUs). Autograd
saves only per-row scalars, the row max m, log s = L - m and log p_tail (plus the inputs); the
backward op recomputes p_j = exp((z_j - m) - log s) in one pass (docs/math.md §3: not z_j - L,
whose rounding of L is the relative error of every p_j, 4.9e-4 at |z| ~ 1e4).
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    LABEL_DTYPES,
    acc_dtype,
    check_ignore_index,
    check_labels_arg,
    check_logits,
    make_temperature,
    row_layout,
    values_checkable,
    view_rows,
)

OP = "topk_kl"
KERNELS = _backend.KERNELS[OP]  # backends with a kernel; the reference serves the others


def _flat(topk_ids, topk_logprobs, labels):
    k = topk_ids.shape[-1]
    return (
        topk_ids.reshape(-1, k).contiguous(),
        topk_logprobs.reshape(-1, k).contiguous(),
        None if labels is None else labels.reshape(-1).contiguous(),
    )


@_library.register_kernel("topk_kl")
def _topk_kl(
    logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar, ignore_index, backend
):
    forward, _ = _backend.launchers(OP, backend)
    layout = row_layout(OP, "logits", logits)
    outs = forward(
        logits,
        *_flat(topk_ids, topk_logprobs, labels),
        temperature,
        temperature_scalar,
        ignore_index,
        *layout,
    )
    lead = logits.shape[:-1]
    return tuple(view_rows(o, lead) for o in outs)


@torch.library.register_fake("pg_kernels::topk_kl")
def _topk_kl_fake(
    logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar, ignore_index, backend
):
    torch._check(
        topk_ids.shape[:-1] == logits.shape[:-1],
        lambda: f"{OP}: topk_ids must have the logits' leading shape",
    )
    stat = logits.new_empty(logits.shape[:-1], dtype=acc_dtype(logits.dtype))
    return stat, torch.empty_like(stat), torch.empty_like(stat), torch.empty_like(stat)


@_library.register_kernel("topk_kl_backward")
def _topk_kl_backward(
    grad_kl, logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar,
    ignore_index, row_max, log_s, logp_tail, backend,
):  # fmt: skip
    _, backward = _backend.launchers(OP, backend)
    layout = row_layout(OP, "logits", logits)
    return backward(
        grad_kl.reshape(-1).contiguous(),
        logits,
        *_flat(topk_ids, topk_logprobs, labels),
        temperature,
        temperature_scalar,
        ignore_index,
        row_max.reshape(-1).contiguous(),
        log_s.reshape(-1).contiguous(),
        logp_tail.reshape(-1).contiguous(),
        *layout,
    )


@torch.library.register_fake("pg_kernels::topk_kl_backward")
def _topk_kl_backward_fake(
    grad_kl, logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar,
    ignore_index, row_max, log_s, logp_tail, backend,
):  # fmt: skip
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    (logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar, ignore_index,
     backend) = inputs  # fmt: skip
    _, row_max, log_s, logp_tail = output
    ctx.save_for_backward(
        logits, topk_ids, topk_logprobs, labels, temperature, row_max, log_s, logp_tail
    )
    ctx.scalars = (temperature_scalar, ignore_index, backend)
    ctx.mark_non_differentiable(row_max, log_s, logp_tail)


def _backward(ctx, g_kl, g_row_max, g_log_s, g_logp_tail):
    (logits, topk_ids, topk_logprobs, labels, temperature, row_max, log_s,
     logp_tail) = ctx.saved_tensors  # fmt: skip
    temperature_scalar, ignore_index, backend = ctx.scalars
    grad = _library.call("topk_kl_backward",
        g_kl, logits, topk_ids, topk_logprobs, labels, temperature, temperature_scalar,
        ignore_index, row_max, log_s, logp_tail, backend,
    )  # fmt: skip
    return grad, None, None, None, None, None, None, None


torch.library.register_autograd("pg_kernels::topk_kl", _backward, setup_context=_setup_context)
_library.differentiable_once("topk_kl_backward")


def _check_topk_args(logits: torch.Tensor, topk_ids, topk_logprobs) -> None:
    lead = tuple(logits.shape[:-1])
    for name, t in (("topk_ids", topk_ids), ("topk_logprobs", topk_logprobs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != logits.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but logits on {logits.device}")
        if t.dim() != logits.dim() or tuple(t.shape[:-1]) != lead:
            raise ValueError(
                f"{OP}: {name} must have shape [..., K] with the logits' leading shape {lead}, "
                f"got {tuple(t.shape)}"
            )
    if topk_ids.dtype not in LABEL_DTYPES:
        raise TypeError(f"{OP}: topk_ids must be int64 or int32, got {topk_ids.dtype}")
    if not topk_logprobs.is_floating_point():
        raise TypeError(f"{OP}: topk_logprobs must be a floating tensor, got {topk_logprobs.dtype}")
    if topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"{OP}: topk_logprobs must have the shape of topk_ids {tuple(topk_ids.shape)}, "
            f"got {tuple(topk_logprobs.shape)}"
        )
    k, vocab = topk_ids.shape[-1], logits.shape[-1]
    if k < 1:
        raise ValueError(f"{OP}: topk_ids must hold at least one id per row (K >= 1), got K = 0")
    if k > vocab:
        raise ValueError(f"{OP}: K = {k} distinct ids cannot exist in a vocabulary of V = {vocab}")
    if topk_logprobs.requires_grad:
        raise ValueError(f"{OP}: topk_logprobs is not differentiable; pass topk_logprobs.detach()")


def _check_topk_ids_on_cpu(topk_ids: torch.Tensor, vocab: int, keep: torch.Tensor | None):
    """Range and distinctness of the ids of kept rows, where it costs no host sync (CPU tensors,
    outside torch.compile). Ids of ignored rows are never read (padding may hold anything)."""
    if not values_checkable(topk_ids):
        return
    rows = topk_ids.reshape(-1, topk_ids.shape[-1]).long()
    kept = torch.ones(rows.shape[0], dtype=torch.bool) if keep is None else keep.reshape(-1)
    lead = tuple(topk_ids.shape[:-1])

    def where(flat_row: int, k: int) -> str:
        pos = [*(int(i) for i in torch.unravel_index(torch.tensor(flat_row), lead)), k]
        return ", ".join(map(str, pos))

    bad = ((rows < 0) | (rows >= vocab)) & kept.unsqueeze(-1)
    if bool(bad.any()):
        r, k = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{OP}: topk_ids[{where(r, k)}] = {int(rows[r, k])} is outside [0, {vocab})"
        )
    if rows.shape[-1] > 1:
        ordered, order = rows.sort(-1)
        dup = (ordered[:, 1:] == ordered[:, :-1]) & kept.unsqueeze(-1)
        if bool(dup.any()):
            r, j = (int(i) for i in dup.nonzero()[0])
            a, b = sorted((int(order[r, j]), int(order[r, j + 1])))
            raise ValueError(
                f"{OP}: topk_ids[{where(r, a)}] and topk_ids[{where(r, b)}] are both "
                f"{int(ordered[r, j])}; the top-k ids of a row must be distinct"
            )


def topk_kl(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Forward KL(q || p) per row, with q known on its top-k ids plus one tail bucket.

    Args:
        logits: [..., V] bf16, fp16, fp32 or fp64; p = softmax(logits / temperature). Only the
            last dim must be contiguous.
        topk_ids: [..., K] int64 or int32, 1 <= K <= V, ids in [0, V), distinct within a row
            (duplicates are a user error: checked on CPU, undefined on GPU).
        topk_logprobs: [..., K] floating, log q_v of those ids (as the engine returned them; the
            temperature does not apply to q). Not differentiable.
        temperature: a float or a [...] tensor (per row), finite and > 0. Not differentiable.
        labels: optional [...] int64 or int32; only `labels == ignore_index` is read: those rows
            give 0 and zero gradient (their ids are not checked).
        ignore_index: label value of rows to skip.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (no CUDA C++ kernel yet).

    Returns:
        [...] fp32 (fp64 for fp64 logits) KL_k, differentiable w.r.t. `logits` (gradient in the
        logits' dtype). Never above the full KL(q || p), equal to it at k = V. q_tail is
        1 - sum q_v clamped at 0 (engines round log-probs), and 0 when k = V. Against a tail of
        -inf logits only whether q_tail > 0 matters: there 1 - sum q_v <= 2 K eps (fp32's;
        fp64's for fp64 logits) is the log-probs' rounding and no tail (top-k ids covering the
        policy's whole support give a finite KL). A positive q_v on a
        -inf logit (or a positive q_tail against a tail of -inf logits) gives +inf; its gradient
        is the finite limit (Q p_j - q_j on the ids, 0 on -inf logits). Rows whose logits hold a
        NaN or +inf, or only -inf, give NaN.
    """
    check_logits(OP, "logits", logits)
    _check_topk_args(logits, topk_ids, topk_logprobs)
    if labels is not None:
        check_labels_arg(OP, logits, labels)
    ignore_index = check_ignore_index(OP, ignore_index, labels)
    temp = make_temperature(OP, temperature, logits)
    backend = _backend.resolve(OP, backend, logits.device, kernels=KERNELS)
    keep = None if labels is None else labels != ignore_index
    _check_topk_ids_on_cpu(topk_ids, logits.shape[-1], keep)
    if backend == "reference":
        return reference.topk_kl(
            logits,
            topk_ids,
            topk_logprobs,
            temperature=temperature,
            labels=labels,
            ignore_index=ignore_index,
            upcast=False,
        )
    kl, _, _, _ = _library.call(
        "topk_kl",
        logits,
        topk_ids,
        topk_logprobs.to(acc_dtype(logits.dtype)),
        labels,
        temp.tensor,
        temp.scalar,
        ignore_index,
        backend,
    )
    return kl
