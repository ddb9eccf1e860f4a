"""Input checks and layout helpers shared by every op over [..., V] logits.

User errors raise ValueError/TypeError naming the argument and the problem. Checks that read
tensor values run only on CPU tensors (free there) and never while torch.compile traces; on
CUDA, bad labels or temperatures give NaN for that row, and `check_labels` is the explicit,
host-syncing validation step a caller may choose to run.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a check of t's values is free: a CPU tensor (no device sync), outside
    torch.compile (a data-dependent branch would break the graph). On a GPU it is skipped."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation and per-token output dtype for logits of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_logits(op: str, name: str, logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be bf16, fp16, fp32 or fp64, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{op}: {name} must have shape [..., V], got a 0-d tensor")
    if logits.shape[-1] == 0:
        raise ValueError(f"{op}: {name} has an empty vocabulary (V == 0)")
    if logits.stride(-1) != 1 and logits.shape[-1] > 1 and logits.numel() > 0:
        raise ValueError(
            f"{op}: {name} must be contiguous in its last (vocab) dim, "
            f"got stride {logits.stride(-1)}"
        )


def check_logits_pair(op: str, logits: torch.Tensor, other: torch.Tensor, name: str) -> None:
    """A second [..., V] logits tensor (reference, teacher, rollout) that pairs with `logits`.

    Same shape (the two distributions are compared row by row) and dtype (the kernels read both
    in one pass with one accumulation type; cast one side rather than mixing).
    """
    check_logits(op, name, other)
    if tuple(other.shape) != tuple(logits.shape):
        raise ValueError(
            f"{op}: {name} must have the logits' shape {tuple(logits.shape)}, "
            f"got {tuple(other.shape)}"
        )
    if other.dtype != logits.dtype:
        raise TypeError(
            f"{op}: {name} must have the logits' dtype {logits.dtype}, got {other.dtype} "
            "(cast one of them)"
        )
    if other.device != logits.device:
        raise ValueError(f"{op}: {name} is on {other.device} but logits on {logits.device}")


def check_gradient_out(op: str, logits: torch.Tensor, out: torch.Tensor) -> None:
    """A buffer a backward writes the logits' gradient into: a contiguous tensor of the logits'
    shape, dtype and device, sharing no memory with them (a row's label entry is read after the
    row is written). Checked before any backend runs, each of which checks it again."""
    if (out.shape != logits.shape or out.dtype != logits.dtype or out.device != logits.device
            or not out.is_contiguous()):  # fmt: skip
        raise ValueError(
            f"{op}: out must be a contiguous tensor of logits' shape {tuple(logits.shape)}, "
            f"dtype {logits.dtype} and device {logits.device}, got {tuple(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    if out.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        raise ValueError(f"{op}: out must not share memory with logits")


def as_real(value) -> float | None:
    """A real Python or NumPy scalar as a float (+-inf past the float range: an int of 10**400),
    None for anything else (a bool, a tensor, a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return float("inf") if value > 0 else float("-inf")


def check_float_arg(op: str, name: str, value, *, low: float | None = None) -> float:
    """A finite float hyper-parameter (optionally > low)."""
    v = as_real(value)
    if v is None:
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not (abs(v) < float("inf")) or (low is not None and not v > low):
        bound = "" if low is None else f" and > {low:g}"
        raise ValueError(f"{op}: {name} must be finite{bound}, got {value}")
    return v


def check_flag(op: str, name: str, value) -> bool:
    """A bool switch (an int or a tensor in its place is a mistake: `token_tv=0` or a mask)."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_labels(
    labels: torch.Tensor, vocab_size: int, ignore_index: int = -100, *, name: str = "labels"
) -> None:
    """Raise if any label is outside [0, vocab_size) and not ignore_index.

    Reads the labels' values: on a GPU this syncs the host. The ops themselves never call it on
    CUDA tensors (out-of-range labels give NaN rows there); call it when you want the error.
    """
    check_ignore_index("check_labels", ignore_index, labels)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        pos = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name}[{', '.join(map(str, pos))}] = {int(labels[pos])} is outside "
            f"[0, {vocab_size}) and is not ignore_index ({ignore_index})"
        )


def check_labels_arg(
    op: str, logits: torch.Tensor, labels: torch.Tensor, name: str = "labels", of: str = "logits"
):
    """labels [...] int64/int32 on the device of `logits` [..., V] (named `of` in errors)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{op}: {name} must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{op}: {name} must have the leading shape {tuple(logits.shape[:-1])} of {of}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"{op}: {name} is on {labels.device} but {of} on {logits.device}")


class Temperature(NamedTuple):
    """A temperature as the ops take it: a per-row tensor, or None and a scalar."""

    tensor: torch.Tensor | None  # flat [N], acc dtype, contiguous
    scalar: float


def make_temperature(
    op: str, temperature, logits: torch.Tensor, name: str = "temperature", *, of: str = "logits"
) -> Temperature:
    """Validate a float or per-row tensor temperature ([...] = logits' leading shape; `of`:
    the argument errors call logits, e.g. hidden for the from-hidden ops)."""
    if isinstance(temperature, torch.Tensor):
        if not temperature.is_floating_point():
            raise TypeError(
                f"{op}: {name} must be a float or floating tensor, got {temperature.dtype}"
            )
        if temperature.device != logits.device:
            raise ValueError(
                f"{op}: {name} is on {temperature.device} but {of} on {logits.device}"
            )
        lead = tuple(logits.shape[:-1])
        if temperature.dim() == 0:
            temperature = temperature.expand(lead)
        if tuple(temperature.shape) != lead:
            raise ValueError(
                f"{op}: per-row {name} must have shape {lead} (the leading shape of {of}), "
                f"got {tuple(temperature.shape)}"
            )
        if temperature.requires_grad:
            raise ValueError(f"{op}: {name} is not differentiable; pass {name}.detach()")
        flat = temperature.detach().reshape(-1).to(acc_dtype(logits.dtype)).contiguous()
        if values_checkable(flat):
            bad = ~(torch.isfinite(flat) & (flat >= _least_temperature(flat.dtype)))
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                given = float(temperature.detach().reshape(-1)[i])  # as passed, not rounded
                raise ValueError(
                    f"{op}: {name}.flatten()[{i}] = {given} must be finite and > 0 "
                    f"{_in_range(flat.dtype)}"
                )
        return Temperature(flat, 1.0)
    t = as_real(temperature)
    if t is None:
        raise TypeError(
            f"{op}: {name} must be a float or a tensor, got {type(temperature).__name__}"
        )
    # As the kernels take it, rounded to the accumulation dtype (as a per-row tensor is checked):
    # 4e38 rounds to inf in fp32 and gave NaN rows.
    dtype = acc_dtype(logits.dtype)
    info = torch.finfo(dtype)
    if not (t >= _least_temperature(dtype) and t < info.max * (1 + info.eps / 2)):
        raise ValueError(f"{op}: {name} must be finite and > 0 {_in_range(dtype)}, got {t}")
    return Temperature(None, t)


def _least_temperature(dtype: torch.dtype) -> float:
    """The least temperature the kernels take: the dtype's smallest normal. Below it 1 / tau
    overflows or nearly does (fp32 from ~2.9e-39), and subnormal temperatures gave NaN rows
    (token_stats, kl_divergence, topk_kl) and a top token outside pruned_logprob's safe set."""
    return torch.finfo(dtype).smallest_normal


def _in_range(dtype: torch.dtype) -> str:
    info = torch.finfo(dtype)
    return f"in {info.dtype} (at least its smallest normal, {info.smallest_normal:g})"


def check_ignore_index(op: str, ignore_index, labels: torch.Tensor | None = None) -> int:
    """An int that the labels' dtype can hold: torch compares `labels != 2**32` on int32 labels
    with the scalar wrapped to 0, where the kernels compare in int64."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    dtype = torch.int64 if labels is None else labels.dtype  # the ops' schemas take an int64
    info = torch.iinfo(dtype)
    if not info.min <= ignore_index <= info.max:
        raise ValueError(f"{op}: ignore_index = {ignore_index} does not fit the labels' {dtype}")
    return ignore_index


def check_labels_on_cpu(op: str, labels: torch.Tensor, vocab_size: int, ignore_index: int):
    """Label range check where it costs no host sync: CPU tensors, outside torch.compile."""
    if values_checkable(labels):
        try:
            check_labels(labels, vocab_size, ignore_index)
        except ValueError as e:
            raise ValueError(f"{op}: {e}") from None


def view_rows(t: torch.Tensor, lead: torch.Size, *trailing: int) -> torch.Tensor:
    """A kernel's per-row output t ([N] or [N, *trailing]) viewed as [*lead, *trailing]. The
    sizes go in as ints: a torch.Size argument costs ~2.5 us of host time, ints ~1 us."""
    return t.view(*lead, *trailing) if lead or trailing else t.view(())


class RowLayout(NamedTuple):
    """Row r of [..., V] starts at (r // n_inner) * stride_outer + (r % n_inner) * stride_inner."""

    n_inner: int
    stride_outer: int
    stride_inner: int


def row_layout(op: str, name: str, x: torch.Tensor) -> RowLayout:
    """Collapse x's leading dims into at most two strided levels, without copying.

    Covers contiguous tensors, row slices and the shifted view logits[:, :-1] of a [B, T, V]
    tensor. Layouts that need three or more levels raise: copying would silently double memory.
    """
    groups: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == size * stride:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if not groups:
        return RowLayout(1, 0, 0)
    if len(groups) == 1:
        return RowLayout(groups[0][0], 0, groups[0][1])
    if len(groups) == 2:
        return RowLayout(groups[1][0], groups[0][1], groups[1][1])
    raise ValueError(
        f"{op}: {name} with shape {tuple(x.shape)} and strides {x.stride()} cannot be read as rows "
        "without a copy; pass a tensor whose leading dims collapse into at most two strided levels "
        f"(e.g. {name}.contiguous())"
    )
