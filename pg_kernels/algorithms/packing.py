"""Packed rows <-> padded [B, T] rows.

Packed layout (flash-attention's varlen convention): the valid tokens of all rows back to back,
`x [N, ...]`, with `cu_seqlens [B + 1]` (0, then the running total of row lengths).
"""

from __future__ import annotations

import torch

from pg_kernels.algorithms._common import check_int, check_mask, check_same_device
from pg_kernels.ops._common import values_checkable


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
    if values_checkable(x):
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


def compact_rows(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's valid tokens to the front, in order, without leaving [B, T] and without
    a host sync (unlike `padded_to_packed`).

        out[i, k] = x[i, t_k]   with t_k the k-th valid position of row i, k < n_i = sum_t m
        out[i, k] = 0           for k >= n_i

    Multi-turn rows interleave model tokens with tool / user tokens: compacting them makes
    position t the t-th model token, which is what OTB's multi-turn variant indexes by
    (`otb_advantages(R, compact_rows(lgp, m)[0], compact_mask, ids)`, then `uncompact_rows`).

    Args:
        x: [B, T] or [B, T, ...] any dtype.
        mask: [B, T] bool, int or float (nonzero = keep).

    Returns:
        (compacted [B, T, ...] like x, differentiable w.r.t. x; its mask, bool [B, T], True on
        the first n_i positions of each row).
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor with at least 2 dims [B, T, ...]")
    check_mask("mask", mask, x.shape[:2])
    check_same_device(x=x, mask=mask)
    keep = mask if mask.dtype == torch.bool else mask != 0
    B, T = keep.shape
    # target column of each token: its rank among the row's valid tokens; others go to a spare
    # column T that is dropped at the end
    dest = torch.where(keep, torch.cumsum(keep.to(torch.int64), 1) - 1, T)
    dest = dest.view(B, T, *([1] * (x.dim() - 2))).expand(x.shape)
    out = x.new_zeros((B, T + 1, *x.shape[2:])).scatter(1, dest, x)[:, :T]
    n = keep.sum(1, keepdim=True)
    return out, torch.arange(T, device=x.device)[None, :] < n


def uncompact_rows(x_compact: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Inverse of `compact_rows`: out[i, t_k] = x_compact[i, k] on the valid positions of `mask`
    (the original mask), 0 elsewhere. No host sync.

    Args:
        x_compact: [B, T] or [B, T, ...], e.g. advantages computed on compacted rows.
        mask: [B, T], the mask given to `compact_rows`.

    Returns:
        [B, T, ...] like x_compact, differentiable w.r.t. it.
    """
    if not isinstance(x_compact, torch.Tensor) or x_compact.dim() < 2:
        raise ValueError("x_compact must be a tensor with at least 2 dims [B, T, ...]")
    check_mask("mask", mask, x_compact.shape[:2])
    check_same_device(x_compact=x_compact, mask=mask)
    keep = mask if mask.dtype == torch.bool else mask != 0
    B, T = keep.shape
    src = (torch.cumsum(keep.to(torch.int64), 1) - 1).clamp(min=0)
    shape = (B, T, *([1] * (x_compact.dim() - 2)))
    out = x_compact.gather(1, src.view(shape).expand(x_compact.shape))
    return torch.where(keep.view(shape), out, 0)
