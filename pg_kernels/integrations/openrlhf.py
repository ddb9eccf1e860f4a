"""OpenRLHF (0.11.2) drop-ins for `openrlhf.models.utils`.

`log_probs_from_logits` and `compute_entropy` with OpenRLHF's signatures and output dtypes
(the logits' dtype; OpenRLHF's actor casts its logits to fp32 first), backed by
`pg_kernels.token_stats`. Unlike OpenRLHF's, `log_probs_from_logits` does not divide the
caller's logits in place by the temperature, and label -100 gives 0 (OpenRLHF raises). See
docs/integrations.md.

`patch()` swaps these into an installed OpenRLHF (the defining module and every OpenRLHF
module that already imported the names, e.g. `openrlhf.models.actor`); `unpatch()` restores
the originals.
"""

from __future__ import annotations

import torch

from pg_kernels.integrations._common import row_stats, stats
from pg_kernels.integrations._patching import Patcher

__all__ = ["compute_entropy", "log_probs_from_logits", "patch", "unpatch"]


def log_probs_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log softmax(logits / temperature)[labels], [...] in the logits' dtype.

    Args:
        logits: [..., V] float; not modified (OpenRLHF's divides it in place).
        labels: [...] int; -100 gives 0 with zero gradient.
        temperature: float or [...] tensor, > 0; a tensor of one element (OpenRLHF divides by
            it in place, broadcasting) is that temperature for every row.
    """
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = temperature.reshape(())
    return stats(logits, labels, temperature).logprob.to(logits.dtype)


def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) per row, [...] in the logits' dtype."""
    return row_stats(logits).entropy.to(logits.dtype)


_PATCHER = Patcher(
    "openrlhf",
    {
        "openrlhf.models.utils": {
            "log_probs_from_logits": log_probs_from_logits,
            "compute_entropy": compute_entropy,
        },
        "openrlhf.models.actor": {},
    },
)


def patch() -> list[str]:
    """Swap the functions above into the installed OpenRLHF; returns the names replaced."""
    return _PATCHER.patch()


def unpatch() -> None:
    """Restore every OpenRLHF attribute `patch` replaced."""
    _PATCHER.unpatch()
