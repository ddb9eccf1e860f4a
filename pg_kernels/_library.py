"""Schemas of the pg_kernels ops, and `call`, the one way the ops layer invokes them.

Every op is a `torch.library` op with an explicit schema, so `torch.compile(fullgraph=True)`
sees one opaque node per op. Hyper-parameters are plain schema arguments (never compile-time
constants of a kernel), and `backend` names the kernel that runs: one op, several kernels.
Implementations (`register_kernel`), fakes and autograd formulas are registered in
`pg_kernels/ops/<op>.py`; plain eager calls skip the dispatcher (`call`).
"""

import os

import torch

LIB = torch.library.Library("pg_kernels", "DEF")

# name -> (the op, its CPU and CUDA kernel), for `call`.
_KERNELS: dict[str, tuple] = {}


def register_kernel(name: str):
    """Decorator: `fn` is the CPU and CUDA kernel of pg_kernels::<name> (it picks the backend
    from its `backend` argument), registered with the dispatcher and kept for `call`."""

    def register(fn):
        torch.library.register_kernel(f"pg_kernels::{name}", ("cpu", "cuda"), fn)
        _KERNELS[name] = (getattr(torch.ops.pg_kernels, name), fn)
        return fn

    return register


def call(name: str, *args):
    """torch.ops.pg_kernels.<name>(*args), in the schema's argument order.

    Where the dispatcher has nothing to add, its kernel is called straight: eager (no
    torch.compile, tracing or functorch transform), no autocast, no mode or profiler that
    should see the op, every tensor a plain CPU or CUDA tensor with nothing for the dispatcher
    to resolve (no negative bit, no zero tensor), and none that autograd must track. The
    Python dispatch of a `torch.library` op costs ~12 us of host time per call (2-core AMD EPYC
    VM), six times the whole `amax` of a row: at small batches on a GPU, host time is the op's
    time. What the direct call cannot see: a kernel or autocast rule registered for these ops
    after import, a profiler started on another thread (all-threads profiling) and an
    ExecutionTraceObserver; PGK_ALWAYS_DISPATCH=1 in the environment sends every call through
    the dispatcher.
    """
    op, kernel = _KERNELS[name]
    return kernel(*args) if _nothing_to_dispatch(args) else op(*args)


_ALWAYS_DISPATCH = os.environ.get("PGK_ALWAYS_DISPATCH", "0") == "1"


def _nothing_to_dispatch(args) -> bool:
    if (
        _ALWAYS_DISPATCH
        or torch.compiler.is_compiling()
        or torch._C._get_tracing_state() is not None
        or torch._C._are_functorch_transforms_active()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_any_autocast_enabled()
        or torch.autograd._profiler_enabled()
    ):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        if type(a) is not torch.Tensor or not (a.is_cpu or a.is_cuda) or (grad and a.requires_grad):
            return False
        if a.is_neg() or a._is_zerotensor():
            return False
    return True


def not_twice(op: str) -> RuntimeError:
    """The error of differentiating a pg_kernels gradient again."""
    return RuntimeError(
        f"pg_kernels::{op}: the pg_kernels ops are differentiable once; a gradient taken with "
        "create_graph=True cannot be differentiated again"
    )


def differentiable_once(backward_op: str) -> None:
    """Make the gradient that the backward op `backward_op` writes non-differentiable, loudly.

    Its output requires grad under `create_graph=True`, and differentiating it (a gradient
    penalty, a Hessian-vector product) raises here; with no autograd kernel it would come
    back as a constant, and a loss built on it would silently miss that term.
    """

    def backward(ctx, *grads):
        raise not_twice(backward_op)

    torch.library.register_autograd(
        f"pg_kernels::{backward_op}", backward, setup_context=lambda ctx, inputs, output: None
    )


LIB.define(
    "token_stats(Tensor logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
    "int ignore_index, str backend) -> (Tensor logprob, Tensor entropy, Tensor collision, "
    "Tensor lgp, Tensor lse, Tensor max_prob, Tensor argmax)"
)
LIB.define(
    "token_stats_backward(Tensor grad_logprob, Tensor grad_entropy, Tensor grad_collision, "
    "Tensor grad_lse, Tensor logits, Tensor labels, Tensor? temperature, "
    "float temperature_scalar, int ignore_index, Tensor lse, Tensor entropy, Tensor collision, "
    "Tensor max_prob, Tensor argmax, str backend) -> Tensor"
)
LIB.define(
    "topk_kl(Tensor logits, Tensor topk_ids, Tensor topk_logprobs, Tensor? labels, "
    "Tensor? temperature, float temperature_scalar, int ignore_index, str backend) "
    "-> (Tensor kl, Tensor row_max, Tensor log_s, Tensor logp_tail)"
)
LIB.define(
    "topk_kl_backward(Tensor grad_kl, Tensor logits, Tensor topk_ids, Tensor topk_logprobs, "
    "Tensor? labels, Tensor? temperature, float temperature_scalar, int ignore_index, "
    "Tensor row_max, Tensor log_s, Tensor logp_tail, str backend) -> Tensor"
)
LIB.define(
    "pruned_logprob(Tensor logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
    "float alpha, int ignore_index, str backend) -> (Tensor logprob, Tensor in_safe, "
    "Tensor tail_mass, Tensor lse_safe, Tensor threshold, Tensor row_max)"
)
LIB.define(
    "pruned_logprob_backward(Tensor grad_logprob, Tensor logits, Tensor labels, "
    "Tensor? temperature, float temperature_scalar, int ignore_index, Tensor lse_safe, "
    "Tensor threshold, Tensor row_max, str backend) -> Tensor"
)
# kl_divergence: `direction` is "reverse" (KL(p || q)) or "forward" (KL(q || p)); `labels` only
# masks ignore_index rows. row_state [..., 5] = (max, log sum exp(z - max)) of the logits, then of
# ref_logits, then E_w[(z_w - max_w) - (z_v - max_v)] over the weighting distribution w: saved
# for the backward, not differentiable.
LIB.define(
    "kl_divergence(Tensor logits, Tensor ref_logits, Tensor? labels, Tensor? temperature, "
    "float temperature_scalar, Tensor? ref_temperature, float ref_temperature_scalar, "
    "int ignore_index, str direction, str backend) -> (Tensor kl, Tensor row_state)"
)
# Returns an empty tensor in place of a gradient that was not asked for.
LIB.define(
    "kl_divergence_backward(Tensor grad_kl, Tensor logits, Tensor ref_logits, Tensor? labels, "
    "Tensor? temperature, float temperature_scalar, Tensor? ref_temperature, "
    "float ref_temperature_scalar, int ignore_index, str direction, Tensor kl, "
    "Tensor row_state, bool logits_grad, bool ref_grad, str backend, "
    "Tensor? outside_terms=None) "
    "-> (Tensor grad_logits, Tensor grad_ref_logits)"
)
# mismatch_stats with rollout logits: the row reductions (the sampled-token estimators are
# elementwise functions of logprob, computed by the public function). row_state [..., 2] =
# (max, log sum exp(z - max)) of the logits, saved for the backward of logprob. tv=False skips
# the total variation (its second read of both tensors on a GPU): token_tv is then [0].
LIB.define(
    "mismatch_stats(Tensor logits, Tensor rollout_logits, Tensor labels, Tensor? temperature, "
    "float temperature_scalar, Tensor? rollout_temperature, float rollout_temperature_scalar, "
    "int ignore_index, str backend, bool tv=True) -> (Tensor logprob, Tensor token_kl, "
    "Tensor token_tv, Tensor row_state)"
)
LIB.define(
    "mismatch_stats_backward(Tensor grad_logprob, Tensor logits, Tensor labels, "
    "Tensor? temperature, float temperature_scalar, int ignore_index, Tensor row_state, "
    "str backend) -> Tensor"
)
# The sampled-token estimators of mismatch_stats and step_stats: nine fields of the labels'
# shape (ops/sampled_estimators.py's SAMPLED_FIELDS) in the log-prob's dtype; the three inputs
# share that shape.
LIB.define(
    "sampled_estimators(Tensor logprob, Tensor rollout_logprobs, Tensor labels, int ignore_index, "
    "float tis_cap, float icepop_low, float icepop_high, str backend) -> Tensor[]"
)
# step_stats: token_stats of the logits, plus the exact mismatch against rollout_logits and the
# KL to ref_logits when given (an absent tensor's outputs are empty: token_kl and token_tv [0],
# kl [0], kl_state [0, 3]; token_tv [0] also with tv=False, as mismatch_stats). kl_state
# [..., 3] = the reference's (max, log sum exp(z - max)) and E_w[(z_w - max_w) - (z_v - max_v)]
# (as kl_divergence's row_state), saved for the backward.
LIB.define(
    "step_stats(Tensor logits, Tensor? rollout_logits, Tensor? ref_logits, Tensor labels, "
    "Tensor? temperature, float temperature_scalar, Tensor? rollout_temperature, "
    "float rollout_temperature_scalar, Tensor? ref_temperature, float ref_temperature_scalar, "
    "str direction, int ignore_index, str backend, bool tv=True) -> (Tensor logprob, "
    "Tensor entropy, Tensor collision, Tensor lgp, Tensor lse, Tensor max_prob, Tensor argmax, "
    "Tensor token_kl, Tensor token_tv, Tensor kl, Tensor kl_state)"
)
LIB.define(
    "step_stats_backward(Tensor grad_logprob, Tensor grad_entropy, Tensor grad_collision, "
    "Tensor grad_lse, Tensor? grad_kl, Tensor logits, Tensor? ref_logits, Tensor labels, "
    "Tensor? temperature, float temperature_scalar, Tensor? ref_temperature, "
    "float ref_temperature_scalar, str direction, int ignore_index, Tensor lse, Tensor entropy, "
    "Tensor collision, Tensor max_prob, Tensor argmax, Tensor? kl, Tensor? kl_state, "
    "bool logits_grad, bool ref_grad, str backend) -> (Tensor grad_logits, "
    "Tensor grad_ref_logits)"
)
# From hidden states: the op of the same name on logits = hidden @ weight.T + bias ([N, D] and
# [V, D]), computed `chunk_size` rows at a time so [N, V] never exists; max_logit is each row's
# logit at argmax as the forward's matmul formed it (the frame a backward in vocabulary blocks
# hands its kernel). The backward recomputes the logits and returns an empty tensor in place of
# a gradient that was not asked for. kl_divergence_from_hidden's `state` is its rows' state
# ([N, 5], row chunks) or every vocabulary block's partial state of every row ([blocks, N, 6]).
LIB.define(
    "token_stats_from_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
    "Tensor? temperature, float temperature_scalar, int ignore_index, int chunk_size, "
    "str backward_order, str backend) -> (Tensor logprob, Tensor entropy, Tensor collision, "
    "Tensor lgp, Tensor lse, Tensor max_prob, Tensor argmax, Tensor max_logit)"
)
LIB.define(
    "token_stats_from_hidden_backward(Tensor grad_logprob, Tensor grad_entropy, "
    "Tensor grad_collision, Tensor grad_lse, Tensor hidden, Tensor weight, Tensor? bias, "
    "Tensor labels, Tensor? temperature, float temperature_scalar, int ignore_index, "
    "int chunk_size, str backward_order, Tensor lse, Tensor entropy, Tensor collision, "
    "Tensor max_prob, Tensor argmax, Tensor max_logit, bool[3] output_mask, str backend) "
    "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)"
)
LIB.define(
    "kl_divergence_from_hidden(Tensor hidden, Tensor weight, Tensor? bias, Tensor ref_hidden, "
    "Tensor ref_weight, Tensor? ref_bias, Tensor? labels, Tensor? temperature, "
    "float temperature_scalar, Tensor? ref_temperature, float ref_temperature_scalar, "
    "int ignore_index, str direction, int chunk_size, str backward_order, str backend) "
    "-> (Tensor kl, Tensor state)"
)
LIB.define(
    "kl_divergence_from_hidden_backward(Tensor grad_kl, Tensor hidden, Tensor weight, "
    "Tensor? bias, Tensor ref_hidden, Tensor ref_weight, Tensor? ref_bias, Tensor? labels, "
    "Tensor? temperature, float temperature_scalar, Tensor? ref_temperature, "
    "float ref_temperature_scalar, int ignore_index, str direction, int chunk_size, "
    "str backward_order, Tensor kl, Tensor state, bool[6] output_mask, str backend) "
    "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias, Tensor grad_ref_hidden, "
    "Tensor grad_ref_weight, Tensor grad_ref_bias)"
)
