"""Helpers shared by the float64-capable PyTorch references."""

from __future__ import annotations

import contextlib
import contextvars

import torch

# Set by `every_field_differentiable`: the fields the ops give no gradient (lgp, max_prob,
# tail_mass) keep their graph, for the tests' first-order sensitivities
# (pg_kernels.testing._sensitivities).
_KEEP_GRAPH = contextvars.ContextVar("pg_kernels_reference_keep_graph", default=False)


@contextlib.contextmanager
def every_field_differentiable():
    """Within: the references' no-gradient fields stay differentiable (`no_gradient`)."""
    token = _KEEP_GRAPH.set(True)
    try:
        yield
    finally:
        _KEEP_GRAPH.reset(token)


def no_gradient(value: torch.Tensor) -> torch.Tensor:
    """A field the ops return without a gradient: detached, as theirs, unless within
    `every_field_differentiable`."""
    return value if _KEEP_GRAPH.get() else value.detach()


def compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """float64 when upcasting (the truth), else the precision a plain PyTorch trainer uses."""
    if upcast or dtype == torch.float64:
        return torch.float64
    return torch.float32


def scaled(logits: torch.Tensor, temperature, dtype: torch.dtype) -> torch.Tensor:
    """z = logits / temperature in `dtype`; temperature is a float or a tensor of shape [...]."""
    z = logits.to(dtype)
    if isinstance(temperature, torch.Tensor):
        return z / temperature.to(dtype).unsqueeze(-1)
    return z / temperature


def scaled_from_max(logits: torch.Tensor, temperature, dtype: torch.dtype) -> torch.Tensor:
    """(x - x_max) / temperature in `dtype`, x_max the row's largest finite logit (0 if none):
    z shifted by its max, for outputs that depend on softmax(z) alone (KL, TV). Each entry is
    rounded relative to its distance from the max (one difference, one quotient), as the C++
    kernels form it, not to |z|: for float64 logits z = x / T itself carries ulp(z) / 2 per
    entry, which a difference of two near-tied entries keeps (fp64 [2, 5] at T = 0.137, |z| ~
    2500, a rollout 5e-4 apart at the two tied maxima: a TV of 1.0e-3 came out 9.3e-14 off,
    against 8e-20 from this form; 50-digit mpmath). -inf, +inf and NaN entries stay so. The
    shift is a constant to autograd: the gradient is that of x / T."""
    x = logits.to(dtype)
    return scaled(x - finite_row_max(x), temperature, dtype)


def finite_row_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's largest finite entry (keepdim; 0 if none), detached: `scaled_from_max`'s
    shift."""
    x_max = x.detach().masked_fill(~torch.isfinite(x), float("-inf")).amax(-1, keepdim=True)
    return torch.where(torch.isfinite(x_max), x_max, torch.zeros_like(x_max))


def invalid_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows whose outputs are NaN by contract: any NaN or +inf, or nothing but -inf."""
    return (torch.isnan(z) | (z == float("inf"))).any(-1) | torch.isneginf(z).all(-1)


def finish(value: torch.Tensor, invalid: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """NaN on invalid rows, then 0 on ignored rows (ignored beats invalid)."""
    value = torch.where(invalid, torch.full_like(value, float("nan")), value)
    if keep is not None:
        value = torch.where(keep, value, torch.zeros_like(value))
    return value


def without_ignored(z: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """z with ignored rows' entries set to 0 (a valid row): `finish` makes their outputs 0, and
    their gradient is then exactly 0. Computed on their own entries (padding rows of -inf, a
    NaN), logsumexp's backward gave 0 * NaN: a NaN gradient where the contract says 0."""
    if keep is None:
        return z
    return torch.where(keep.unsqueeze(-1), z, torch.zeros_like(z))


def label_mask(labels: torch.Tensor | None, ignore_index: int):
    """(keep, safe_labels): rows to keep, and labels with ignored ones replaced by 0."""
    if labels is None:
        return None, None
    keep = labels != ignore_index
    return keep, torch.where(keep, labels, torch.zeros_like(labels)).long()


def zero_where_neginf(z: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """z with 0 where `where` holds, so 0 * (-inf) terms vanish with finite gradients."""
    return torch.where(where, torch.zeros_like(z), z)


def relative_to_max(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, log s) with log softmax(z) = d - log s over the last dim: d = z - z_i, i the argmax,
    and log s = log1p(sum over j != i of e^{d_j}) (keepdim), the normalizer's s1 - 1 kept."""
    i = z.argmax(-1, keepdim=True)
    d = z - z.gather(-1, i)
    rest = d.exp().scatter(-1, i, 0.0).sum(-1, keepdim=True)
    return d, rest.log1p()


def log_softmax_keeping_rest(z: torch.Tensor) -> torch.Tensor:
    """log softmax(z) over the last dim, with the normalizer's s1 - 1 kept: (z - z_i) -
    log1p(sum over j != i of e^{z_j - z_i}), i the argmax. torch's log_softmax rounds s1 to
    1 + ulp, which drops s1 - 1 below 1.1e-16 in float64: a near one-hot fp32 row pair (rests
    3.22e-17 and 3.18e-17) had a KL of 2.7e-21 whose float64 truth came out 4.2e-19. The same
    function of z for any choice of i, so autograd's gradient is log_softmax's."""
    d, log_s = relative_to_max(z)
    return d - log_s
