"""Packed rows <-> padded [B, T] rows.

Packed layout (flash-attention's varlen convention): the valid tokens of all rows back to back,
`x [N, ...]`, with `cu_seqlens [B + 1]` (0, then the running total of row lengths).
"""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import check_int, check_mask, check_same_device


def packed_to_padded(
    x: torch.Tensor, cu_seqlens: torch.Tensor, *, max_seqlen: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter packed rows into a zero-padded, left-aligned [B, T, ...] tensor.

    out[i, t] = x[cu_seqlens[i] + t] for t < len_i = cu_seqlens[i+1] - cu_seqlens[i], else 0.

    Args:
        x: [N, ...] any dtype, N = cu_seqlens[-1].
        cu_seqlens: [B + 1] int32 / int64, nondecreasing, starting at 0.
        max_seqlen: T. None reads max(len_i) from the tensor: one host sync (pass it to avoid
            the sync and to compile with fullgraph=True). Rows longer than T raise on CPU.

    Returns:
        (padded [B, T, ...] in x's dtype, differentiable w.r.t. x; mask bool [B, T]).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor with at least 1 dim [N, ...]")
    check_int("cu_seqlens", cu_seqlens, 1)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens must hold at least one entry (0)")
    check_same_device(x=x, cu_seqlens=cu_seqlens)
    cu = cu_seqlens.to(torch.int64)
    B = cu.shape[0] - 1
    lens = cu[1:] - cu[:-1]
    if max_seqlen is None:
        max_seqlen = int(lens.max()) if B > 0 else 0
    N = x.shape[0]
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        # Value checks cost nothing on CPU tensors (no device sync); on GPU they are skipped.
        if B >= 0 and (int(cu[0]) != 0 or int(cu[-1]) != N or bool((lens < 0).any())):
            raise ValueError(
                f"cu_seqlens must start at 0, be nondecreasing and end at x.shape[0] = {N}"
            )
        if B > 0 and int(lens.max()) > max_seqlen:
            raise ValueError(f"a row is longer than max_seqlen = {max_seqlen}")
    tok = torch.arange(N, device=x.device)
    row = torch.searchsorted(cu[1:], tok, right=True)
    pos = tok - cu.gather(0, row.clamp(max=max(B - 1, 0)))
    out = x.new_zeros((B, max_seqlen, *x.shape[1:]))
    out = out.index_put((row, pos), x)
    mask = torch.zeros(B, max_seqlen, dtype=torch.bool, device=x.device)
    mask = mask.index_put((row, pos), torch.ones_like(tok, dtype=torch.bool))
    return out, mask


def padded_to_packed(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the valid tokens of padded rows back to back.

    packed = x[mask] (row-major: row 0's valid tokens in order, then row 1's, ...), and
    cu_seqlens = [0, cumsum(sum_t mask)]. With left-aligned masks `packed_to_padded` inverts
    it; with holes (multi-turn rows) it compacts each row's valid tokens, so position t of the
    repadded row is the t-th valid token (what OTB's multi-turn variant needs).

    The output size depends on the mask's values: on GPU this is one host sync, and
    torch.compile(fullgraph=True) cannot trace it (a data-dependent output shape) unless
    torch._dynamo.config.capture_dynamic_output_shape_ops is set.

    Args:
        x: [B, T, ...] any dtype.
        mask: [B, T] bool, int or float (nonzero = keep).

    Returns:
        (packed [N, ...] differentiable w.r.t. x; cu_seqlens int32 [B + 1]).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor with at least 2 dims [B, T, ...]")
    check_mask("mask", mask, x.shape[:2])
    check_same_device(x=x, mask=mask)
    keep = mask if mask.dtype == torch.bool else mask != 0
    lens = keep.sum(1)
    cu = torch.zeros(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
    return x[keep], cu
