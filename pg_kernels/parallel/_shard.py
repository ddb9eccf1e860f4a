"""The vocab shard a rank holds, and the one collective of a vocab-parallel op (docs/math.md §8).

Each rank holds logits [..., V_local] covering global vocab ids [start, start + V_local). An op
packs a few numbers per row into [N, k] (acc dtype), appends the shard layout (start, V_local)
as ceil(4 / k) extra rows, and all-gathers [world, N + extra, k] in one call. Every rank then
merges the same gathered tensor in the same fixed rank order, so every rank gets bitwise the
same result, run after run.

Integers travel exactly as floats: each is split into base-4096 digits (exact in fp32 below
2^36), so vocabularies beyond 2^24 ids need no fp64 payload.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist

DIGIT = 4096  # base of the exact split of an int into two floats
# One tensor in, [world * rows, ...] out; torch 2.13 renamed all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Shard(NamedTuple):
    """This rank's place in the vocab-parallel group."""

    group: dist.ProcessGroup
    rank: int
    world: int
    start: int  # global id of local column 0
    size: int  # V_local


class Layout(NamedTuple):
    """Every rank's shard, read from the gathered tensor ([world] int64 on the logits' device)."""

    starts: torch.Tensor
    sizes: torch.Tensor
    vocab_size: int | None  # sum of V_local; None on CUDA (reading it would sync the host)
    ok: torch.Tensor | None  # on CUDA: whether the shards tile [0, V) exactly (else NaN rows)


def resolve_shard(
    op: str, group, vocab_start_index, logits: torch.Tensor, name: str = "local_logits"
) -> Shard:
    """Validate the group and this rank's vocab_start_index (default rank x V_local)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{op}: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group (gloo for CPU tensors, nccl for CUDA) first"
        )
    if group is None:
        group = dist.group.WORLD
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        # new_group's handle on the ranks outside it (an int)
        raise ValueError(f"{op}: this process is not a member of group")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{op}: group must be a torch.distributed.ProcessGroup or None, "
            f"got {type(group).__name__}"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(f"{op}: this process is not a member of group")
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl" and logits.device.type != "cuda":
        raise ValueError(
            f"{op}: group uses nccl, which takes CUDA tensors, but {name} is on {logits.device} "
            "(use a gloo group for CPU tensors)"
        )
    size = logits.shape[-1]
    if vocab_start_index is None:
        start = rank * size
    elif isinstance(vocab_start_index, bool) or not isinstance(
        vocab_start_index, numbers.Integral
    ):
        raise TypeError(
            f"{op}: vocab_start_index must be an int or None, "
            f"got {type(vocab_start_index).__name__}"
        )
    elif vocab_start_index < 0:
        raise ValueError(f"{op}: vocab_start_index must be >= 0, got {vocab_start_index}")
    else:
        start = int(vocab_start_index)
    return Shard(group, rank, world, start, size)


def _split_int(v: int) -> list[int]:
    return [v // DIGIT, v % DIGIT]


def gather_rows(op: str, shard: Shard, rows: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """All-gather rows [N, k] of every rank as [world, N, k], plus every rank's shard layout.

    The one collective of the op. On CPU tensors a layout that does not tile [0, V) raises
    (every rank sees the same gathered layout, so every rank raises); on CUDA reading it would
    sync the host, so `Layout.ok` carries the verdict and the op writes NaN instead.
    """
    n, k = rows.shape
    extra = -(-4 // k)
    meta = rows.new_zeros(extra * k)
    for i, v in enumerate(_split_int(shard.start) + _split_int(shard.size)):
        meta[i] = v  # a fill on the device: no host-to-device copy that could sync
    payload = torch.cat([rows, meta.view(extra, k)]).contiguous()
    out = payload.new_empty((shard.world * (n + extra), k))
    _all_gather(out, payload, group=shard.group)
    out = out.view(shard.world, n + extra, k)
    meta_all = out[:, n:].reshape(shard.world, -1)[:, :4].to(torch.int64)
    starts = meta_all[:, 0] * DIGIT + meta_all[:, 1]
    sizes = meta_all[:, 2] * DIGIT + meta_all[:, 3]
    gathered = out[:, :n]
    if rows.device.type == "cpu":
        return gathered, Layout(starts, sizes, _check_tiling(op, starts, sizes), None)
    return gathered, Layout(starts, sizes, None, tiling_ok(starts, sizes))


def tiling_ok(starts: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: the shards tile [0, V) without gap or overlap (read on the device)."""
    order = torch.argsort(starts, stable=True)
    s, e = starts[order], (starts + sizes)[order]
    return (s[0] == 0) & (s[1:] == e[:-1]).all()


def _check_tiling(op: str, starts: torch.Tensor, sizes: torch.Tensor) -> int:
    """The global vocab size; raises unless the shards tile [0, V) without gap or overlap."""
    shards = sorted(zip(starts.tolist(), sizes.tolist()))
    rank_of = {(s, v): r for r, (s, v) in enumerate(zip(starts.tolist(), sizes.tolist()))}
    end = 0
    for s, v in shards:
        if s != end:
            what = "a gap" if s > end else "an overlap"
            listing = ", ".join(
                f"rank {r}: [{a}, {a + b})"
                for r, (a, b) in enumerate(zip(starts.tolist(), sizes.tolist()))
            )
            raise ValueError(
                f"{op}: the vocab shards leave {what} at global id {min(s, end)} "
                f"(rank {rank_of[(s, v)]} starts at {s}); each rank's vocab_start_index must "
                f"be the sum of the V_local of the shards before it ({listing})"
            )
        end = s + v
    return end


def rank_order_sum(terms: torch.Tensor) -> torch.Tensor:
    """terms [world, ...] summed over the ranks left to right, ((0 + t_0) + t_1) + ..., with
    elementwise adds: the same bits on every device and for every N. (A reduction or scan
    kernel picks its own order, which may follow the shape: CUDA's cumsum over [world, 1]
    runs a parallel scan.) One add per rank, whatever the rest of the shape."""
    total = torch.zeros_like(terms[0])
    for t in terms:
        total = total + t
    return total


def others_sum(terms: torch.Tensor) -> torch.Tensor:
    """[world, ...] -> [world, ...]: each rank's sum of the other ranks' terms, as the sum of
    those before it (left to right) and those after it (right to left); never the total less
    its own term, which cancels where one rank's term is most of the row's."""
    zero = torch.zeros_like(terms[0])
    before, after = [zero], [zero]
    for r in range(terms.shape[0] - 1):
        before.append(before[-1] + terms[r])
        after.append(after[-1] + terms[-1 - r])
    return torch.stack(before) + torch.stack(after[::-1])


def merge_lse(m: torch.Tensor, log_s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank (max m_r, log s1_r) rows [world, N] in fixed rank order (docs/math.md §1).

    Returns (M, log S) [N], the global max and log sum_r s1_r e^{m_r - M} (logsumexp M + log S),
    and log_mass [world, N] = (m_r - M) + log s1_r - log S, the log of each shard's share of
    the probability. Kept relative to the maxes, as the kernels do: L_r - L would lose ulp(L).
    Empty shards (m_r = -inf) add nothing and get log_mass -inf; all empty, or a NaN, gives NaN.
    """
    big = m.amax(0)
    rel = (m - big) + log_s1
    log_total = torch.log(rank_order_sum(torch.exp(rel)))
    bad = ~torch.isfinite(big)
    nan = torch.full_like(big, float("nan"))
    big, log_total = torch.where(bad, nan, big), torch.where(bad, nan, log_total)
    return big, log_total, rel - log_total


def neg_inf_rows(logits: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Each row's max logit [N] in `acc` (-inf: the shard's row is all -inf, an empty partial).

    The kernels give NaN for both an all -inf row and a NaN row; this max tells them apart
    (a NaN row's max is NaN) and decides argmax ties between shards exactly.
    """
    return logits.amax(-1).reshape(-1).to(acc)
