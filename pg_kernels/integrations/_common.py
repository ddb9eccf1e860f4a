"""Helpers shared by the trainer integrations (private)."""

from __future__ import annotations

import torch

from pg_kernels import token_stats
from pg_kernels.outputs import TokenStats

IGNORE_INDEX = -100


def any_layout(logits: torch.Tensor) -> torch.Tensor:
    """Logits of any layout, as the trainers' functions take them: a vocab dim that is not
    contiguous (e.g. a transposed view) is copied; the ops read the vocab dim in place and
    refuse it."""
    if logits.dim() > 0 and logits.shape[-1] > 1 and logits.stride(-1) != 1:
        return logits.contiguous()
    return logits


def stats(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> TokenStats:
    """token_stats for a drop-in, on logits of any layout (`any_layout`)."""
    return token_stats(any_layout(logits), labels, temperature=temperature)


def row_stats(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> TokenStats:
    """`stats` of every row when no label is wanted (entropy, collision, lse).

    Label 0 is a valid index of every row (V >= 1); the logprob field is then meaningless.
    """
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    return stats(logits, labels, temperature)


def masked_labels(labels: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    """Labels with rows where `row_mask == 0` set to the ignore index (they then give 0)."""
    if row_mask is None:
        return labels
    if tuple(row_mask.shape) != tuple(labels.shape):
        raise ValueError(
            f"row_mask must have the index's shape {tuple(labels.shape)}, "
            f"got {tuple(row_mask.shape)}"
        )
    return torch.where(row_mask != 0, labels, torch.full_like(labels, IGNORE_INDEX))


def check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
