"""The lm_head projection done a chunk of rows at a time, for the `*_from_hidden` ops.

logits = hidden @ weight.T + bias is [N, V]: at N = 16384, V = 151936 that is 5 GB in bf16. The
`*_from_hidden` ops instead run, per chunk of `chunk_size` rows, the projection (the BLAS /
cuBLAS matmul, into one reused buffer), then the op's fused row kernel, and in the backward the
projection again (recomputed, never kept) followed by the gradient matmuls. Extra memory: one
chunk's logits, one chunk's logit gradient and, for 16-bit weights, an fp32 [V, D] accumulator
for the weight gradient plus at most PRODUCT_BYTES of a chunk's 16-bit product on its way into
it. Each chunk's product g.T @ h is rounded to 16 bits once (the BLAS has no fp32 output for
16-bit operands on every device) and the products are summed in fp32: one rounding per chunk's
contribution, where a 16-bit running sum would also round the sum once per chunk.

hidden is read in place, whatever its leading strides (`row_layout`: e.g. the shifted
`last_hidden_state[:, :-1]` of a [B, T, D] tensor): a chunk's rows are a view of it, or, where
they straddle the outer level, a copy of that chunk's rows only.

A backward that wants the weight gradient runs in vocabulary blocks instead (`VocabBlocks`,
`backward_order`): per block of columns the logits of every row, its gradient, then
weight[block]'s gradient in one matmul over all N rows (summed in the matmul's fp32 accumulator
and rounded once: no [V, D] accumulator at all) and hidden's gradient added into an [N, D] one.
Each row-chunk pass instead reads and writes the whole [V, D] accumulator (fp32 for 16-bit
weights), and with chunks of a few hundred rows that traffic is most of the backward on a GPU
(docs/performance.md, "The fused lm_head path on a GPU"). Neither the order nor the blocks
depend on N: a row's hidden gradient sums the same blocks' products at every batch size.
"""

from __future__ import annotations

import math

import torch

from pg_kernels.ops._common import FLOAT_DTYPES, row_layout

# Default chunk: this many bytes of logits (in the hidden states' dtype) per chunk, e.g. 512
# rows of V = 32000 fp32, 192 rows of V = 151936 bf16. The fused path runs 4 matmuls of N·V·D
# (the backward recomputes the logits) against the unfused path's 3, and each chunk's weight
# gradient update reads and writes all of [V, D]: short chunks pay that pass many times.
# Measured on 2 CPU cores (N = 4096, V = 32000, D = 1024 fp32, fwd + bwd): 128 rows 4.97 s,
# 512 rows 4.38 s, 1024 rows 4.26 s, unfused 3.20 s. 64 MiB keeps chunk logits + their
# gradient a few percent of [N, V] at the shapes that matter.
CHUNK_BYTES = 64 << 20


# The 16-bit weight-gradient product of one chunk is formed this many bytes at a time (a block
# of vocabulary rows) before its fp32 accumulation: 32768 rows of D = 4096 bf16, not all
# 151936 (1.2 GB).
PRODUCT_BYTES = 256 << 20


def default_chunk_size(vocab_size: int, dtype: torch.dtype) -> int:
    """Rows per chunk: CHUNK_BYTES of logits, rounded down to a multiple of 64 rows."""
    rows = CHUNK_BYTES // (vocab_size * dtype.itemsize)
    return max(1, rows - rows % 64 if rows >= 64 else rows)


def check_projection(op: str, prefix: str, hidden, weight, bias) -> None:
    """hidden [..., D], weight [V, D], bias [V] or None: same dtype and device."""
    names = (f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias")
    for name, t in zip(names, (hidden, weight, bias)):
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be bf16, fp16, fp32 or fp64, got {t.dtype}")
        if t.dtype != hidden.dtype:
            raise TypeError(
                f"{op}: {name} must have {names[0]}'s dtype {hidden.dtype}, got {t.dtype}"
            )
        if t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {names[0]} on {hidden.device}")
    if hidden.dim() < 1:
        raise ValueError(f"{op}: {names[0]} must have shape [..., D], got a 0-d tensor")
    row_layout(op, names[0], hidden)  # read without a copy (ChunkedProjection), or raise
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{op}: {names[1]} must have shape [V, D] with V > 0 and D = {names[0]}.shape[-1] = "
            f"{hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{op}: {names[2]} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}"
        )


def check_chunk_size(op: str, chunk_size, vocab_size: int, hidden: torch.Tensor) -> int:
    if chunk_size is None:
        return default_chunk_size(vocab_size, hidden.dtype)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def chunks(n: int, chunk_size: int):
    """(start, stop) of each chunk of rows, in order; the last may be ragged."""
    return ((s, min(s + chunk_size, n)) for s in range(0, n, chunk_size))


def rows(t: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows start:stop of an optional per-row tensor (labels, a per-row temperature)."""
    return None if t is None else t[start:stop]


def num_rows(hidden: torch.Tensor) -> int:
    """N of hidden [..., D]: the product of its leading dims (also when D == 0)."""
    return math.prod(hidden.shape[:-1])


def _row_levels(hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., D] as a [n_outer, n_inner, D] view of its storage (row_layout's two levels;
    check_projection has ruled out layouts that need more)."""
    n, d = num_rows(hidden), hidden.shape[-1]
    layout = row_layout("", "hidden", hidden)
    n_inner = max(1, min(layout.n_inner, n))
    return hidden.as_strided(
        (n // n_inner, n_inner, d), (layout.stride_outer, layout.stride_inner, hidden.stride(-1))
    )


class ChunkedProjection:
    """hidden [..., D] @ weight.T + bias a chunk of rows at a time, and its inputs' gradients.

    `logits(s, e)` returns rows s:e of the logits in a buffer reused by every chunk (valid until
    the next call), `grad_buffer(s, e)` the same for their gradient; `accumulate(grad_logits, s,
    e)` adds that chunk's contribution to the gradients asked for by `wanted` = (hidden, weight,
    bias); `gradients()` returns them in the inputs' dtypes, an empty tensor for each one not
    asked for.
    """

    def __init__(self, hidden, weight, bias, chunk_size: int, wanted=(False, False, False)):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.n, v, d = num_rows(hidden), weight.shape[0], hidden.shape[-1]
        self._levels = _row_levels(hidden)
        self._last_rows = (0, 0, None)  # (start, stop, rows): the chunk hidden_rows gave last
        self.buffer = hidden.new_empty((min(chunk_size, self.n), v))
        self._grad_buffer = None
        self.wanted = wanted
        # fp32 accumulators for 16-bit weights (see the module docstring); fp32/fp64 add in place.
        acc = torch.float32 if weight.dtype.itemsize < 4 else weight.dtype
        self.grad_hidden = hidden.new_empty((self.n, d)) if wanted[0] else None
        self.grad_weight = weight.new_zeros(weight.shape, dtype=acc) if wanted[1] else None
        self.grad_bias = weight.new_zeros((v,), dtype=acc) if wanted[2] else None

    def hidden_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of hidden as [stop - start, D]: a view within one outer index, else a
        copy of these rows only (kept for the chunk's next call, the weight gradient's)."""
        if self._last_rows[:2] == (start, stop):
            return self._last_rows[2]
        levels = self._levels
        n_inner = levels.shape[1]
        (o0, i0), (o1, i1) = divmod(start, n_inner), divmod(stop - 1, n_inner)
        if o0 == o1:
            h = levels[o0, i0 : i1 + 1]
        else:
            h = torch.cat([levels[o0, i0:], *levels[o0 + 1 : o1].unbind(0), levels[o1, : i1 + 1]])
        self._last_rows = (start, stop, h)
        return h

    def logits(self, start: int, stop: int) -> torch.Tensor:
        out = self.buffer[: stop - start]
        h = self.hidden_rows(start, stop)
        if self.bias is None:
            return torch.mm(h, self.weight.t(), out=out)
        return torch.addmm(self.bias, h, self.weight.t(), out=out)

    def grad_buffer(self, start: int, stop: int) -> torch.Tensor:
        """A second reused buffer for rows start:stop of the logits' gradient: a fresh tensor per
        chunk would fault its pages in on every chunk on a CPU (64 MiB: ~30-45 ms, measured on
        2 cores, against ~10 ms to write it)."""
        if self._grad_buffer is None:
            self._grad_buffer = torch.empty_like(self.buffer)
        return self._grad_buffer[: stop - start]

    def accumulate(self, grad_logits: torch.Tensor, start: int, stop: int) -> None:
        if self.grad_hidden is not None:
            torch.mm(grad_logits, self.weight, out=self.grad_hidden[start:stop])
        if self.grad_weight is not None:
            add_product(self.grad_weight, grad_logits.t(), self.hidden_rows(start, stop))
        if self.grad_bias is not None:
            self.grad_bias.add_(grad_logits.sum(0, dtype=self.grad_bias.dtype))

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return finished_gradients(
            (self.grad_hidden, self.grad_weight, self.grad_bias), self.hidden, self.weight,
            self.bias,
        )  # fmt: skip


def add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b. Into a wider accumulator (fp32 for 16-bit operands) the product is rounded
    to the operands' dtype once (the BLAS has no fp32 output for 16-bit operands on every
    device) and added in acc's, PRODUCT_BYTES of it (rows of a) at a time."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    step = max(1, PRODUCT_BYTES // (max(b.shape[1], 1) * a.dtype.itemsize))  # D = 0 too
    for i in range(0, acc.shape[0], step):
        acc[i : i + step].add_(a[i : i + step] @ b)


def finished_gradients(grads, hidden, weight, bias) -> tuple[torch.Tensor, ...]:
    """(hidden's, weight's, bias') gradients from their accumulators (None: not asked for, an
    empty tensor in its place), in the inputs' dtypes, hidden's in its shape."""
    grad_hidden, grad_weight, grad_bias = grads
    if grad_hidden is not None:
        grad_hidden = grad_hidden.view(hidden.shape)
    bias_like = weight if bias is None else bias
    return tuple(
        like.new_empty((0,)) if grad is None else grad.to(like.dtype)
        for grad, like in ((grad_hidden, hidden), (grad_weight, weight), (grad_bias, bias_like))
    )


def empty_gradients(hidden, weight, bias, wanted) -> tuple[torch.Tensor, ...]:
    """What the fake (meta) backward returns: gradients' shapes, empty where not asked for."""
    bias_like = weight.new_empty((weight.shape[0],)) if bias is None else bias
    return tuple(
        torch.empty(t.shape if w else (0,), dtype=t.dtype, device=t.device)
        for t, w in zip((hidden, weight, bias_like), wanted)
    )


# The backward orders of `token_stats_from_hidden` (its `backward_order` argument).
BACKWARD_ORDERS = ("auto", "rows", "vocab")


def backward_order(order: str, n_rows: int, wanted) -> str:
    """The order to take, "vocab" or "rows": `order` itself, or for "auto" vocabulary blocks
    where the weight's gradient is wanted, else row chunks (which then need no accumulator).
    Vocabulary blocks pay an [N, D] accumulator for hidden's gradient (fp32 for 16-bit inputs)
    where row chunks pay a [V, D] one for the weight's, but row chunks read and write theirs
    N / chunk_size times and blocks theirs V / block_width times: block_width / chunk_size
    times less traffic (21x at 16384 x 151936 x 4096 bf16; module docstring). "auto" never
    looks at N: the order, and with it how a row's hidden gradient is summed, is the same at
    every batch size."""
    check_backward_order("token_stats_from_hidden", order)  # direct torch.ops calls too
    if n_rows == 0:  # nothing to compute: row chunks handle the empty batch
        return "rows"
    if order == "auto":
        return "vocab" if wanted[1] else "rows"
    return order


def check_backward_order(op: str, order) -> str:
    if order not in BACKWARD_ORDERS:
        raise ValueError(f"{op}: backward_order must be one of {BACKWARD_ORDERS}, got {order!r}")
    return order


# Columns a block's buffer carries beyond its logits (VocabBlocks.logits): the row's max logit
# as the forward saw it (the backward kernels' frame), then a column for labels outside the
# block, whose gradient is dropped. Rows are padded with -inf to a multiple of 16 elements, so
# that they stay 16-byte aligned for the kernels' vector loads.
EXTRA_COLUMNS = 2
ROW_ALIGN = 16


# The narrowest vocabulary block (columns): each block costs a few kernel launches and a pass over
# the [N, D] accumulator of hidden's gradient, so V = 262144 takes at most 256 of them.
MIN_VOCAB_BLOCK = 1024


def vocab_block_size(vocab_size: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Columns per vocabulary block, a function of V, D and the dtype, never of N: a block's two
    buffers (logits and their gradient) take 4 D bytes per row, what a row of hidden's fp32
    gradient accumulator takes (4096 columns at D = 4096 bf16), and at least MIN_VOCAB_BLOCK
    columns; a multiple of 64, at most V."""
    cols = 4 * hidden_size // (2 * dtype.itemsize)
    return min(vocab_size, max(MIN_VOCAB_BLOCK, cols - cols % 64))


class VocabBlocks:
    """The projection in vocabulary blocks of `block` columns (default `vocab_block_size`):
    `logits(v0, v1, frame)` gives every row's logits of columns v0:v1 in a reused [N, width]
    buffer (valid until the next call) followed by EXTRA_COLUMNS copies of `frame` and -inf
    padding (without a frame: the [N, v1 - v0] logits alone, a view of that buffer);
    `grad_buffer(v0, v1)` a second buffer of that shape; `accumulate(grad, v0, v1)` adds a
    block's logit gradient [N, v1 - v0] to the gradients `wanted` = (hidden, weight, bias) asks
    for; `gradients()` returns them as ChunkedProjection.gradients does.

    weight[v0:v1]'s gradient is grad.T @ hidden, one matmul over every row, written once in the
    weight's dtype (cuBLAS may reduce split-K partial sums in bf16, torch's default
    `allow_bf16_reduced_precision_reduction`); hidden's is the sum over blocks of
    grad @ weight[v0:v1], in fp32 for 16-bit inputs (each block's product rounded to 16 bits
    once, as ChunkedProjection sums the weight's).
    hidden is taken as an [N, D] matrix: a view of its storage where its layout allows, else a
    copy (the shifted [:, :-1] rows of a [B, T, D] tensor).
    """

    def __init__(self, hidden, weight, bias, wanted, block: int | None = None):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.n, v, d = num_rows(hidden), weight.shape[0], hidden.shape[-1]
        self.vocab_size = v
        self.block = vocab_block_size(v, d, hidden.dtype) if block is None else block
        self.h = _row_levels(hidden).reshape(self.n, d)
        self._logits_buffer = hidden.new_empty(self.n * _padded_width(self.block))
        self._grad_buffer = None
        acc = torch.float32 if weight.dtype.itemsize < 4 else weight.dtype
        self.grad_hidden = hidden.new_zeros((self.n, d), dtype=acc) if wanted[0] else None
        self.grad_weight = torch.empty_like(weight) if wanted[1] else None
        self.grad_bias = weight.new_empty((v,), dtype=acc) if wanted[2] else None

    def ranges(self):
        """(v0, v1) of each vocabulary block, in order; the last may be narrower."""
        return chunks(self.vocab_size, self.block)

    def _rows(self, storage: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """storage's start as [N, width] rows of the block v0:v1."""
        width = _padded_width(v1 - v0)
        return storage[: self.n * width].view(self.n, width)

    def logits(self, v0: int, v1: int, frame: torch.Tensor | None = None) -> torch.Tensor:
        buf = self._rows(self._logits_buffer, v0, v1)
        vb = v1 - v0
        out = buf[:, :vb]
        # Straight into the buffer's first vb columns (a matmul output of leading dimension width).
        if self.bias is None:
            torch.mm(self.h, self.weight[v0:v1].t(), out=out)
        else:
            torch.addmm(self.bias[v0:v1], self.h, self.weight[v0:v1].t(), out=out)
        if frame is None:
            return out
        buf[:, vb : vb + EXTRA_COLUMNS] = frame.to(buf.dtype).unsqueeze(1)
        buf[:, vb + EXTRA_COLUMNS :] = float("-inf")
        return buf

    def grad_buffer(self, v0: int, v1: int) -> torch.Tensor:
        if self._grad_buffer is None:
            self._grad_buffer = torch.empty_like(self._logits_buffer)
        return self._rows(self._grad_buffer, v0, v1)

    def accumulate(self, grad: torch.Tensor, v0: int, v1: int) -> None:
        if self.grad_weight is not None:
            torch.mm(grad.t(), self.h, out=self.grad_weight[v0:v1])
        if self.grad_bias is not None:
            torch.sum(grad, 0, dtype=self.grad_bias.dtype, out=self.grad_bias[v0:v1])
        if self.grad_hidden is not None:
            add_product(self.grad_hidden, grad, self.weight[v0:v1])

    def gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return finished_gradients(
            (self.grad_hidden, self.grad_weight, self.grad_bias), self.hidden, self.weight,
            self.bias,
        )  # fmt: skip


def _padded_width(cols: int) -> int:
    """A block's buffer width: its columns and EXTRA_COLUMNS, padded to a multiple of ROW_ALIGN."""
    return -(-(cols + EXTRA_COLUMNS) // ROW_ALIGN) * ROW_ALIGN
