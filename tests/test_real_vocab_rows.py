"""Every op on rows built to stress its sums, at a real vocabulary, under the per-value rule.

The fuzzer draws small vocabularies (the Triton interpreter's cost), so the error a lane sum
gathers over a real row's length is out of its reach: a lane holding a row's top entry (~1)
rounds every later term at ulp(1) / 2. (C++'s TV sweep left 1.5e-6 of a one-hot row against a
flat one, within the rule's 2e-5 relative: test_mismatch_stats.py holds that row to 2x plain.)
Its first run found the float64 truth's k3, chi2 and lgp cancelling, subnormal terms the
kernels flush (the rule's `flushed_terms`) and finding (9), the KL gradient at a one-hot row's
top entry (fixed on both backends: minus the sum of the row's others).

Rows: flat; a spike of 10, 20 and 64 over randn * 0.5 (one-hot: rests of 1e-4 .. 1e-28 at tau
0.7); randn * 4; randn * 0.01. Pairs: each row against itself plus 1e-3 of noise,
the flat row and the spike of 64. V = 151936 (Qwen's vocabulary), 4000 for the Triton
interpreter; fp32 and bf16 at temperatures 1 and 0.7. step_stats' fields are these ops' own
(bitwise or to rounding, tests/test_step_stats.py). docs/fidelity.md, "Adversarial rows at a
real vocabulary".
"""

from __future__ import annotations

import pytest
import torch

import pg_kernels
from pg_kernels import reference
from pg_kernels.testing import TRITON_16BIT_PAIR_FLOOR, check_against_reference, interpreted

DTYPES = [torch.float32, torch.bfloat16]
TEMPERATURES = [1.0, 0.7]
SPIKE = 123  # the spikes' column, and the label of every row


def _vocab(backend: str, device: str) -> int:
    return 4000 if interpreted(backend, device) else 151936


def _rows(v: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = [torch.zeros(v, dtype=torch.float64)]
    for spike in (64.0, 20.0, 10.0):
        x = torch.randn(v, generator=g, dtype=torch.float64) * 0.5
        x[SPIKE] += spike
        rows.append(x)
    rows.append(torch.randn(v, generator=g, dtype=torch.float64) * 4)
    rows.append(torch.randn(v, generator=g, dtype=torch.float64) * 0.01)
    return torch.stack(rows)


def _pairs(v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, q) [18, v]: each row against itself plus noise, the flat row and the spike of 64."""
    x = _rows(v)
    g = torch.Generator().manual_seed(1)
    p, q = [], []
    for row in x:
        for other in (row + 1e-3 * torch.randn(v, generator=g, dtype=torch.float64), x[0], x[1]):
            p.append(row)
            q.append(other)
    return torch.stack(p), torch.stack(q)


def _labelled_rows(backend: str, device: str, dtype: torch.dtype):
    """The rows in `dtype` and their labels: the spike, but a flat row's and a broad row's label
    away from it."""
    x = _rows(_vocab(backend, device)).to(dtype)
    y = torch.full((x.shape[0],), SPIKE)
    y[0], y[4] = 5, 7
    return x, y


def _kernel(fn, backend):
    def op(*args, **kwargs):
        return fn(*args, backend=backend, **kwargs)

    return op


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


@pytest.mark.op("token_stats")
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_stats(backend_device, dtype, tau):
    backend, device = backend_device
    x, y = _labelled_rows(backend, device, dtype)
    check_against_reference(
        _kernel(pg_kernels.token_stats, backend), reference.token_stats, _on(device, x, y),
        {"temperature": tau}, diff_fields=("logprob", "entropy", "collision", "lse"),
    )  # fmt: skip


@pytest.mark.op("kl_divergence")
@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_divergence(backend_device, dtype, tau, direction):
    backend, device = backend_device
    p, q = (t.to(dtype) for t in _pairs(_vocab(backend, device)))
    floor = {"out": TRITON_16BIT_PAIR_FLOOR} if backend == "triton" and dtype != torch.float32 \
        else None  # fmt: skip
    check_against_reference(
        _kernel(pg_kernels.kl_divergence, backend), reference.kl_divergence, _on(device, p, q),
        {"temperature": tau, "direction": direction}, diff_fields=("out",), grad_args=(0, 1),
        forward_floor=floor,
    )  # fmt: skip


def _rollout_logprobs(q: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (the spike) and the rollout's log-probs of them, from the q rows."""
    y = torch.full((q.shape[0],), SPIKE)
    return y, reference.token_stats(q, y, temperature=tau).logprob.float()


@pytest.mark.op("mismatch_stats")
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mismatch_stats(backend_device, dtype, tau):
    backend, device = backend_device
    p, q = (t.to(dtype) for t in _pairs(_vocab(backend, device)))
    y, lp = _rollout_logprobs(q, tau)
    floor = {"token_kl": TRITON_16BIT_PAIR_FLOOR} if backend == "triton" and \
        dtype != torch.float32 else None  # fmt: skip
    check_against_reference(
        _kernel(pg_kernels.mismatch_stats, backend), reference.mismatch_stats,
        _on(device, p, y, lp), {"rollout_logits": q.to(device), "temperature": tau},
        diff_fields=("logprob",), check_fields=("logprob", "token_kl", "token_tv"),
        forward_floor=floor,
    )  # fmt: skip
    # The sampled estimators are elementwise functions of the log-prob (tests/test_fuzz.py,
    # _check_estimators): k2, k3 and chi2 ~ delta^2 of a tiny delta move by delta ulp(log p),
    # below first order.


@pytest.mark.op("topk_kl")
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_kl(backend_device, dtype, tau):
    backend, device = backend_device
    p, q = (t.to(dtype) for t in _pairs(_vocab(backend, device)))
    ids = q.double().topk(20, -1).indices
    teacher = torch.log_softmax(q.double() / tau, -1).gather(-1, ids).float()
    check_against_reference(
        _kernel(pg_kernels.topk_kl, backend), reference.topk_kl, _on(device, p, ids, teacher),
        {"temperature": tau}, diff_fields=("out",),
    )  # fmt: skip


@pytest.mark.op("pruned_logprob")
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pruned_logprob(backend_device, dtype, tau):
    backend, device = backend_device
    x, y = _labelled_rows(backend, device, dtype)
    check_against_reference(
        _kernel(pg_kernels.pruned_logprob, backend), reference.pruned_logprob, _on(device, x, y),
        {"alpha": 1e-4, "temperature": tau}, diff_fields=("logprob",),
    )  # fmt: skip
