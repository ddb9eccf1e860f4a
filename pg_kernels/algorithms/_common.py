"""Shared argument checks and segment helpers of the algorithms layer (private).

Every check reads only metadata (shape, dtype, device): none of them syncs the host, and all of
them trace under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch

from pg_kernels.ops._common import as_real


def check_float(name: str, t: torch.Tensor, ndim: int | tuple[int, ...]) -> None:
    """`t` must be a floating tensor with `ndim` dims (an int or a tuple of allowed ints)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        want = " or ".join(f"{d}-d" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def check_int(name: str, t: torch.Tensor, ndim: int) -> None:
    """`t` must be an int32 / int64 tensor with `ndim` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-d, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {t.dtype}")


def check_mask(name: str, mask: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    """`mask` must be bool, integer (e.g. an int64 attention mask) or floating, of `shape`."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating, got {mask.dtype}")
    check_shape(name, mask, shape)


def check_shape(name: str, t: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors on different devices: {devices}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(
    name: str, value, *, at_least: float | None = None, above: float | None = None
) -> float:
    """A real constant (a Python number, +inf included), not NaN, >= `at_least` and > `above`
    where given. Returns it as a float."""
    v = as_real(value)
    if v is None:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    low_ok = at_least is None or v >= at_least
    if v != v or not low_ok or (above is not None and not v > above):
        bound = f" >= {at_least:g}" if at_least is not None else ""
        bound += f" > {above:g}" if above is not None else ""
        raise ValueError(f"{name} must be a number{bound}, got {value}")
    return v


def check_band(low_name: str, low, high_name: str, high, *, at_least: float = 0.0) -> None:
    """Two constants of a band: each >= at_least and low <= high."""
    lo, hi = check_number(low_name, low, at_least=at_least), check_number(high_name, high)
    if not lo <= hi:
        raise ValueError(f"{low_name} must be <= {high_name}, got {low} > {high}")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the algorithms compute in and return (docs/math.md §0): the promoted dtype of
    the floating `tensors`, at least float32, so bf16 / fp16 / fp32 -> fp32 and fp64 -> fp64.
    None and non-floating tensors (masks, ids) are skipped. Reads dtypes only (no sync).

    bf16 arithmetic rounds away what these methods measure: exp(mean log-ratio) within 1e-3
    of 1 (geometric rejection), exp(12) (fp16 overflow), a running count past 256, rho - 1 - delta.
    """
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as float weights in `dtype` (bool -> 0/1; a float mask is taken as given)."""
    return mask.to(dtype)


def valid(mask: torch.Tensor) -> torch.Tensor:
    """The mask as bool: a token counts where mask != 0."""
    return mask if mask.dtype == torch.bool else mask != 0


def masked_amax(x: torch.Tensor, ok: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max of x where ok (over `dim`, or all of x), -inf where nothing is: also over an empty x
    or dim, where torch's amax raises."""
    x = torch.where(ok, x, -torch.inf)
    if dim is None:
        x, dim = x.reshape(-1), 0
    pad = x.new_full((*x.shape[:dim], 1, *x.shape[dim + 1 :]), -torch.inf)
    return torch.cat([x, pad], dim).amax(dim)


def masked_amin(x: torch.Tensor, ok: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """min of x where ok, +inf where nothing is (as masked_amax)."""
    return -masked_amax(-x, ok, dim)


def dense_group_ids(group_ids: torch.Tensor) -> torch.Tensor:
    """Map arbitrary group ids [B] to dense ids in [0, B) without a host sync.

    Sort (stable), flag where the sorted value changes, cumsum the flags, scatter back: rows
    with equal ids get equal dense ids. Unlike torch.unique this needs no data-dependent output
    size, so segment buffers can be sized B (an upper bound on the number of groups).
    """
    sorted_ids, perm = torch.sort(group_ids.to(torch.int64), stable=True)
    changed = torch.ones_like(sorted_ids)
    changed[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
    dense_sorted = torch.cumsum(changed, 0) - 1
    return torch.empty_like(dense_sorted).scatter_(0, perm, dense_sorted)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum `values` [B, ...] into `num_segments` rows by segment id `seg` [B] (int64)."""
    out = values.new_zeros((num_segments, *values.shape[1:]))
    return out.index_add(0, seg, values)


def masked_row_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_t x w / sum_t w per row; 0 for a row whose weights sum to 0."""
    den = w.sum(-1)
    num = (torch.where(w != 0, x, 0) * w).sum(-1)  # a NaN on a masked token stays out
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)
