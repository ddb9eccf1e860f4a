"""step_stats: every per-token statistic of a training step from one read of each logits tensor
(docs/math.md §9).

A step of the methods in docs/math.md §7 needs, per token, token_stats of the policy logits, the
training-vs-rollout mismatch (the sampled estimators, and the exact KL / TV when the rollout
engine's logits are kept) and, for hybrid imitation + RL, the dense KL to a teacher. Calling
token_stats, mismatch_stats and kl_divergence reads the policy's logits three times forward and
writes three [N, V] gradients backward; the op `pg_kernels::step_stats` reads each logits tensor
once (one pass over the rows of all of them together, sharing the logits' exp between the
statistics) and its backward writes the logits' gradient once for any combination of upstream
gradients: token_stats' and the KL's terms join per element (docs/math.md §9).

Gradients: logprob, entropy, collision and lse (as token_stats) and kl (as kl_divergence, also
to ref_logits when it requires grad). The mismatch fields other than logprob are no-grad
diagnostics (as mismatch_stats); rollout_logits gets no gradient. A KL whose upstream gradient
is 0 in a row (not in the loss) costs that row's backward nothing: the reference is not read.
"""

from __future__ import annotations

import torch

from pg_kernels import _backend, _library, reference
from pg_kernels.ops._common import (
    RowLayout,
    acc_dtype,
    check_flag,
    check_labels_arg,
    check_labels_on_cpu,
    check_logits,
    check_logits_pair,
    make_temperature,
    row_layout,
    view_rows,
)
from pg_kernels.ops.kl_divergence import DIRECTIONS, check_kl_args
from pg_kernels.ops.sampled_estimators import (
    check_rollout_logprobs,
    estimator_constants,
    sampled_estimators,
)
from pg_kernels.outputs import MismatchStats, StepStats, TokenStats

OP = "step_stats"
KERNELS = _backend.KERNELS[OP]  # backends with a kernel for this op; "reference" always serves
KL_STATE = 3  # per-row numbers of the KL part saved for the backward (see _library.py)
_ABSENT = RowLayout(1, 0, 0)  # the layout ints passed for a tensor that is not given


def _layout(name, x):
    return _ABSENT if x is None else row_layout(OP, name, x)


def _flat(t):
    # contiguous(): reshape(-1) of a strided 1-D view (labels[::2]) is still strided.
    return None if t is None else t.reshape(-1).contiguous()


def _outputs_like(labels, dtype, has_roll, has_ref, tv):
    """Empty outputs of the op: the fake's, in the shapes the kernel returns."""
    lead = labels.shape

    def rows(given):
        return labels.new_empty(lead if given else (0,), dtype=dtype)

    token = [rows(True) for _ in range(6)] + [labels.new_empty(lead, dtype=torch.int64)]
    kl_state = labels.new_empty((*lead, KL_STATE) if has_ref else (0, KL_STATE), dtype=dtype)
    return (*token, rows(has_roll), rows(has_roll and tv), rows(has_ref), kl_state)


@_library.register_kernel("step_stats")
def _step_stats(
    logits, rollout_logits, ref_logits, labels, temperature, temperature_scalar,
    rollout_temperature, rollout_temperature_scalar, ref_temperature, ref_temperature_scalar,
    direction, ignore_index, backend, tv=True,
):  # fmt: skip
    for name, other in (("rollout_logits", rollout_logits), ("ref_logits", ref_logits)):
        if other is not None:  # direct torch.ops calls too (step_stats() checks them first)
            check_logits_pair(OP, logits, other, name)
    forward, _ = _backend.launchers(OP, backend)
    outs = forward(
        logits, rollout_logits, ref_logits, _flat(labels), temperature, temperature_scalar,
        rollout_temperature, rollout_temperature_scalar, ref_temperature, ref_temperature_scalar,
        direction == "reverse", ignore_index, tv, *_layout("logits", logits),
        *_layout("rollout_logits", rollout_logits), *_layout("ref_logits", ref_logits),
    )  # fmt: skip
    # The shapes of `_outputs_like`, without building it (host time at small batches).
    *token, token_kl, token_tv, kl, kl_state = outs
    token = [o.view_as(labels) for o in token]
    if rollout_logits is not None:
        token_kl = token_kl.view_as(labels)
        token_tv = token_tv.view_as(labels) if tv else token_tv
    if ref_logits is not None:
        kl, kl_state = kl.view_as(labels), view_rows(kl_state, labels.shape, KL_STATE)
    return (*token, token_kl, token_tv, kl, kl_state)


@torch.library.register_fake("pg_kernels::step_stats")
def _step_stats_fake(
    logits, rollout_logits, ref_logits, labels, temperature, temperature_scalar,
    rollout_temperature, rollout_temperature_scalar, ref_temperature, ref_temperature_scalar,
    direction, ignore_index, backend, tv=True,
):  # fmt: skip
    return _outputs_like(labels, acc_dtype(logits.dtype), rollout_logits is not None,
                         ref_logits is not None, tv)  # fmt: skip


@_library.register_kernel("step_stats_backward")
def _step_stats_backward(
    g_logprob, g_entropy, g_collision, g_lse, g_kl, logits, ref_logits, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, direction, ignore_index, lse,
    entropy, collision, max_prob, argmax, kl, kl_state, logits_grad, ref_grad, backend,
):  # fmt: skip
    _, backward = _backend.launchers(OP, backend)
    acc = acc_dtype(logits.dtype)

    def rows(t):
        return None if t is None else t.reshape(-1).to(acc).contiguous()

    grads = backward(
        *(rows(t) for t in (g_logprob, g_entropy, g_collision, g_lse, g_kl)), logits, ref_logits,
        _flat(labels), temperature, temperature_scalar, ref_temperature, ref_temperature_scalar,
        direction == "reverse", ignore_index, *(t.reshape(-1) for t in (lse, entropy, collision,
        max_prob, argmax)), rows(kl), rows(kl_state), logits_grad, ref_grad,
        *_layout("logits", logits), *_layout("ref_logits", ref_logits),
    )  # fmt: skip
    return tuple(grads)


@torch.library.register_fake("pg_kernels::step_stats_backward")
def _step_stats_backward_fake(
    g_logprob, g_entropy, g_collision, g_lse, g_kl, logits, ref_logits, labels, temperature,
    temperature_scalar, ref_temperature, ref_temperature_scalar, direction, ignore_index, lse,
    entropy, collision, max_prob, argmax, kl, kl_state, logits_grad, ref_grad, backend,
):  # fmt: skip
    def grad_like(x, wanted):
        return torch.empty(x.shape if wanted else (0,), dtype=logits.dtype, device=logits.device)

    return grad_like(logits, logits_grad), grad_like(ref_logits, ref_grad)


def _setup_context(ctx, inputs, output):
    (logits, rollout_logits, ref_logits, labels, temperature, temperature_scalar,
     rollout_temperature, rollout_temperature_scalar, ref_temperature, ref_temperature_scalar,
     direction, ignore_index, backend, _) = inputs  # fmt: skip
    _, entropy, collision, lgp, lse, max_prob, argmax, token_kl, token_tv, kl, kl_state = output
    ctx.save_for_backward(
        logits, ref_logits, labels, temperature, ref_temperature, lse, entropy, collision,
        max_prob, argmax, kl, kl_state,
    )  # fmt: skip
    ctx.scalars = (temperature_scalar, ref_temperature_scalar, direction, ignore_index, backend)
    ctx.has_ref = ref_logits is not None
    ctx.mark_non_differentiable(lgp, max_prob, argmax, token_kl, token_tv, kl_state)


def _backward(ctx, g_logprob, g_entropy, g_collision, g_lgp, g_lse, g_max_prob, g_argmax,
              g_token_kl, g_token_tv, g_kl, g_kl_state):  # fmt: skip
    (logits, ref_logits, labels, temperature, ref_temperature, lse, entropy, collision, max_prob,
     argmax, kl, kl_state) = ctx.saved_tensors  # fmt: skip
    temperature_scalar, ref_temperature_scalar, direction, ignore_index, backend = ctx.scalars
    need_logits = ctx.needs_input_grad[0]
    need_ref = ctx.has_ref and ctx.needs_input_grad[2]
    if not (need_logits or need_ref):
        return (None,) * 14
    grad, grad_ref = _library.call("step_stats_backward",
        g_logprob, g_entropy, g_collision, g_lse, g_kl if ctx.has_ref else None, logits,
        ref_logits, labels, temperature, temperature_scalar, ref_temperature,
        ref_temperature_scalar, direction, ignore_index, lse, entropy, collision, max_prob,
        argmax, kl if ctx.has_ref else None, kl_state if ctx.has_ref else None, need_logits,
        need_ref, backend,
    )  # fmt: skip
    return grad if need_logits else None, None, grad_ref if need_ref else None, *(None,) * 11


torch.library.register_autograd("pg_kernels::step_stats", _backward, setup_context=_setup_context)
_library.differentiable_once("step_stats_backward")


def step_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    rollout_logits: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
    kl_direction: str = "reverse",
    temperature: float | torch.Tensor = 1.0,
    rollout_temperature: float | torch.Tensor | None = None,
    ref_temperature: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    tis_cap: float = 2.0,
    icepop_low: float = 0.5,
    icepop_high: float = 2.0,
    token_tv: bool = True,
    backend: str = "auto",
) -> StepStats:
    """token_stats, mismatch_stats and the KL to a reference in one read of each logits tensor.

    Equals (token_stats(logits, labels, ...), mismatch_stats(logits, labels, rollout_logprobs,
    rollout_logits=..., ...), kl_divergence(logits, ref_logits, direction=kl_direction, ...)),
    up to rounding, with one forward pass over the rows of every logits tensor given and one
    backward pass that writes the logits' gradient once.

    Args:
        logits: [..., V] policy logits, bf16, fp16, fp32 or fp64; last dim contiguous.
        labels: [...] int64/int32, the sampled tokens; ignore_index rows give 0 everywhere.
        rollout_logprobs: optional [...] log pi_roll(c) as the rollout engine reported it: gives
            `mismatch` (the sampled estimators of mismatch_stats).
        rollout_logits: optional [..., V] rollout-engine logits (same shape and dtype as
            logits): adds the exact token_kl = KL(pi_roll || pi_theta) and token_tv to
            `mismatch`; needs rollout_logprobs. Not differentiable.
        ref_logits: optional [..., V] reference / teacher logits: gives `kl`, differentiable
            w.r.t. logits and, when it requires grad, ref_logits.
        kl_direction: "reverse" for KL(p || q), "forward" for KL(q || p) (as kl_divergence).
        temperature: float or [...] tensor for the logits; rollout_temperature and
            ref_temperature (default: temperature) for the other two.
        ignore_index, tis_cap, icepop_low, icepop_high, token_tv: as in token_stats /
            mismatch_stats (token_tv=False: no TV, and on a GPU no second read of the logits
            and the rollout logits for it).
        backend: "auto", "reference", "cpu" or "triton".

    Returns:
        StepStats(token: TokenStats, mismatch: MismatchStats | None, kl: Tensor | None), every
        field as the single op computes it (fp32 for 16-bit and fp32 logits, fp64 for fp64).
    """
    check_logits(OP, "logits", logits)
    check_labels_arg(OP, logits, labels)  # required here (kl_divergence's are optional)
    if not isinstance(kl_direction, str) or kl_direction not in DIRECTIONS:
        raise ValueError(f"{OP}: kl_direction must be one of {DIRECTIONS}, got {kl_direction!r}")
    ignore_index, temp, ref_temp = check_kl_args(
        OP, logits, kl_direction, labels, ignore_index, temperature, ref_temperature
    )
    # Checked without rollout_logprobs too, as rollout_temperature is: a bad constant raises
    # whichever inputs come with it.
    bands = estimator_constants(OP, tis_cap, icepop_low, icepop_high)
    if rollout_logprobs is not None:
        check_rollout_logprobs(OP, logits, labels, rollout_logprobs)
    if rollout_logits is not None:
        if rollout_logprobs is None:
            raise ValueError(f"{OP}: rollout_logits needs rollout_logprobs (the estimators' input)")
        check_logits_pair(OP, logits, rollout_logits, "rollout_logits")
    roll_temp = (
        temp
        if rollout_temperature is None
        else make_temperature(OP, rollout_temperature, logits, "rollout_temperature")
    )
    if ref_logits is not None:
        check_logits_pair(OP, logits, ref_logits, "ref_logits")
    backend = _backend.resolve(OP, backend, logits.device, kernels=KERNELS)
    check_labels_on_cpu(OP, labels, logits.shape[-1], ignore_index)
    tv = check_flag(OP, "token_tv", token_tv)
    if backend == "reference":
        out = reference.step_stats(
            logits, labels, rollout_logprobs=rollout_logprobs, rollout_logits=rollout_logits,
            ref_logits=ref_logits, kl_direction=kl_direction, temperature=temperature,
            rollout_temperature=rollout_temperature, ref_temperature=ref_temperature,
            ignore_index=ignore_index, token_tv=tv, upcast=False,
        )  # fmt: skip
        token, kl, token_kl, token_tv = out.token, out.kl, None, None
        if rollout_logits is not None:  # not differentiable, as the kernels' outputs
            token_kl = out.mismatch.token_kl.detach()
            token_tv = out.mismatch.token_tv.detach() if tv else None
    else:
        *fields, token_kl, token_tv, kl, _ = _library.call("step_stats",
            logits, rollout_logits, ref_logits, labels, temp.tensor, temp.scalar,
            roll_temp.tensor, roll_temp.scalar, ref_temp.tensor, ref_temp.scalar, kl_direction,
            ignore_index, backend, tv,
        )  # fmt: skip
        token = TokenStats(*fields)
        if rollout_logits is None:
            token_kl = token_tv = None
        elif not tv:
            token_tv = None
        kl = None if ref_logits is None else kl
    mismatch = None
    if rollout_logprobs is not None:
        sampled = sampled_estimators(
            token.logprob, rollout_logprobs, labels, ignore_index, **bands, backend=backend
        )
        mismatch = MismatchStats(
            logprob=token.logprob, **sampled, token_kl=token_kl, token_tv=token_tv
        )
    return StepStats(token=token, mismatch=mismatch, kl=kl)
