"""Schemas of the pg_kernels ops, then the compiled kernels.

Every op is a `torch.library` op with an explicit schema, so `torch.compile(fullgraph=True)`
sees one opaque node per op. Hyper-parameters are plain schema arguments (never compile-time
constants of a kernel), and `backend` names the kernel that runs: one op, several kernels.
Implementations, fakes and autograd formulas are registered in `pg_kernels/ops/<op>.py`.
"""

import torch

LIB = torch.library.Library("pg_kernels", "DEF")

LIB.define(
    "token_stats(Tensor logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
    "int ignore_index, str backend) -> (Tensor logprob, Tensor entropy, Tensor collision, "
    "Tensor lgp, Tensor lse, Tensor max_prob, Tensor argmax)"
)
LIB.define(
    "token_stats_backward(Tensor grad_logprob, Tensor grad_entropy, Tensor grad_collision, "
    "Tensor grad_lse, Tensor logits, Tensor labels, Tensor? temperature, "
    "float temperature_scalar, int ignore_index, Tensor lse, Tensor entropy, Tensor collision, "
    "str backend) -> Tensor"
)
LIB.define(
    "topk_kl(Tensor logits, Tensor topk_ids, Tensor topk_logprobs, Tensor? labels, "
    "Tensor? temperature, float temperature_scalar, int ignore_index, str backend) "
    "-> (Tensor kl, Tensor lse, Tensor logp_tail)"
)
LIB.define(
    "topk_kl_backward(Tensor grad_kl, Tensor logits, Tensor topk_ids, Tensor topk_logprobs, "
    "Tensor? labels, Tensor? temperature, float temperature_scalar, int ignore_index, "
    "Tensor lse, Tensor logp_tail, str backend) -> Tensor"
)
LIB.define(
    "pruned_logprob(Tensor logits, Tensor labels, Tensor? temperature, float temperature_scalar, "
    "float alpha, int ignore_index, str backend) -> (Tensor logprob, Tensor in_safe, "
    "Tensor tail_mass, Tensor lse_safe, Tensor threshold)"
)
LIB.define(
    "pruned_logprob_backward(Tensor grad_logprob, Tensor logits, Tensor labels, "
    "Tensor? temperature, float temperature_scalar, int ignore_index, Tensor lse_safe, "
    "Tensor threshold, str backend) -> Tensor"
)
