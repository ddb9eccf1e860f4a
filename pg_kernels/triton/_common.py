"""Building blocks shared by the Triton kernels of pg_kernels.

Device helpers (`@triton.jit`, inlined into the kernels that call them):
  row_offset          where row r of a [..., V] tensor starts (pg_kernels.ops._common.RowLayout)
  exp_acc, div_acc    exp and IEEE division in the accumulation dtype (fp32 or fp64)
  expm1_acc           e^x - 1, accurate near 0
  max_nan             max that keeps a NaN (a NaN row must stay NaN)
  merge_states        the merge rule of docs/math.md §1 for (m, s1, s2, t) partial states
  inv_temperature     1 / tau per row (tensor) or from the launcher's scalar
  round_to            the one rounding of a result to the output dtype (nearest even)

Host helpers: `acc_dtype_of`, `scalar_inv_temperature_bits`, `per_row_inv_temperature` (1 / tau
per row, for kernels that multiply), `per_row_temperature` (tau per row, for those that divide)
and `RowBlocking` (how a row of V elements is cut into loop steps and per-program chunks, as a
function of V and dtype only).
Everything here mirrors csrc/include/pg_kernels/softmax_stats.h: the same formulas, the same
edge cases (an empty state has m = -inf and zero sums; it is the identity of the merge).
"""

from __future__ import annotations

import math
import os
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Floor for d = z - m in the products e * d and p * (b d) (exp_zero_below in softmax_stats.h),
# in natural or base-2 units alike: e^d is exactly 0 below -745 in fp64 (-104 in fp32) and 2^d
# below -1075 (-150), so a floor below that changes no nonzero term, while d = -inf (a -inf
# logit) would give 0 * -inf = NaN. (At -1024, 2^d is an fp64 subnormal: a -inf logit of an
# fp64 row had a gradient of 4e-306 and a one-entry row an entropy of 6e-305.) Not the lowest
# float: b * lowest overflows to inf when |b| > 1. One value serves fp32 and fp64.
D_MIN = tl.constexpr(-1100.0)


# The interpreter converts fp32 -> bf16 by truncation (triton 3.6, with or without
# fp_downcast_rounding="rtne"): 1 ulp errors a GPU (cvt.rn.bf16.f32) never makes. Under the
# interpreter only, `round_to` rounds to nearest even by hand so that CPU tests see GPU rounding.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


# Under the interpreter with PGK_EMULATE_GPU=1, the two GPU behaviours numpy does not have
# (CONTRIBUTING.md: a check of the suite's margins before a GPU runs it): `ex2` carries an error
# like ex2.approx.f32's, and `tl.fma` rounds once (the interpreter's x * y + z rounds twice, so
# that fma(x, c, -(x * c)) is 0 there where a GPU returns the product's rounding residual).
EMULATE_GPU = tl.constexpr(INTERPRETED and os.environ.get("PGK_EMULATE_GPU", "0") == "1")


def _fused_multiply_add(self, x, y, z):
    """The interpreter's `create_fma` rounded once: fp32 (and 16-bit) through the exact fp64
    product (one fp64 rounding of the sum, then fp32's: a double rounding only on near-ties),
    fp64 through Dekker's exact product and an exact sum (rounded once but for the last
    addition's rare ties)."""
    import numpy as np
    from triton.runtime.interpreter import TensorHandle

    a, b, c = x.data, y.data, z.data
    with np.errstate(all="ignore"):  # inf / NaN operands as the plain expression gives them
        if c.dtype != np.float64:  # fp32 (and 16-bit): the fp64 product is exact
            out = (a.astype(np.float64) * b + c).astype(c.dtype)
        else:
            # An fp64 product past the float range whose sum is not (m tau - x at a max of
            # finfo(float64).min / tau, tau 1.3: a GPU's exact product gives the residual) is
            # formed at 2^-200 of its size, and the sum scaled back (powers of two: exact).
            back = np.where(np.isfinite(a) & np.isfinite(b) & ~np.isfinite(a * b), 2.0**200, 1.0)
            a, c = a / back, c / back
            p = a * b
            # Operands beyond 2^900 (a mask of finfo(float64).min) are scaled into range first:
            # Veltkamp's a * split overflowed there, and its inf - inf made the fma NaN.
            sa = np.where(np.abs(a) > 2.0**900, 2.0**-200, 1.0)
            sb = np.where(np.abs(b) > 2.0**900, 2.0**-200, 1.0)
            a_s, b_s = a * sa, b * sb
            split = 134217729.0  # 2^27 + 1: Veltkamp's split into two 26-bit halves
            ah = a_s * split - (a_s * split - a_s)
            bh = b_s * split - (b_s * split - b_s)
            p_err = ((ah * bh - a_s * b_s) + ah * (b_s - bh) + (a_s - ah) * bh) + (a_s - ah) * (
                b_s - bh
            )
            p_err = p_err / (sa * sb)
            s = p + c
            bv = s - p
            s_err = (p - (s - bv)) + (c - bv)
            out = np.where(np.isfinite(s), s + (s_err + p_err), s) * back
    return TensorHandle(np.asarray(out, dtype=c.dtype), z.dtype.scalar)


def _patch_lang_once(fn):
    """The interpreter's `_patch_lang`, skipped where it would find nothing to patch. A launch
    patches triton.language (its builtins, tensor and math) for the interpreter; the interpreter
    then patches again at every @triton.jit call inside it, scanning those modules with
    inspect.getmembers only to find the builtins already replaced (and dropping that scope
    unrestored). The scan was 40 % of an interpreted kl_divergence forward (10884 calls, 2.4 of
    6.1 s; triton 3.6). A function is patched as before unless each language module it sees
    (triton.language, and triton.language.core for triton's own functions, tl.sum and the like)
    already has its replacements, told by `where`."""
    from triton.runtime import interpreter

    langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
    if not langs or any(tl.core.is_builtin(lang.where) for lang in langs):
        return _INTERPRETER_PATCH_LANG(fn)
    return interpreter._LangPatchScope()


if INTERPRETED:
    from triton.runtime import interpreter as _interpreter
    from triton.runtime.interpreter import InterpreterBuilder

    _INTERPRETER_PATCH_LANG = _interpreter._patch_lang
    _interpreter._patch_lang = _patch_lang_once
    NUMPY_FMA = InterpreterBuilder.create_fma  # tests/conftest.py's numpy_arithmetic
    if EMULATE_GPU:
        import numpy as np

        InterpreterBuilder.create_fma = _fused_multiply_add
        # tl.maximum / tl.minimum (propagate_nan NONE) lower to PTX max.f32 / min.f32, which
        # return the other operand for a NaN (np.fmax); the interpreter's np.maximum keeps the
        # NaN, which hid NaN rows lost on a GPU. PropagateNan.ALL (np.maximum) is unchanged.
        InterpreterBuilder.create_maxnumf = lambda self, a, b: self.binary_op(a, b, np.fmax)
        InterpreterBuilder.create_minnumf = lambda self, a, b: self.binary_op(a, b, np.fmin)


@triton.jit
def ex2(x):
    """2^x of fp32 x: one MUFU.EX2 on a GPU (ex2.approx.f32, within ~2 ulp), numpy's exp2 under
    the interpreter. With EMULATE_GPU the interpreter's result is moved by up to 2^-22 of itself,
    a function of x's bits alone (equal exponents keep equal exps, as MUFU's do) that leaves
    integer exponents exact (2^0 is exactly 1, which the kernels rely on)."""
    y = tl.exp2(x)
    if EMULATE_GPU:
        bits = x.to(tl.uint32, bitcast=True)
        h = ((bits * tl.full(x.shape, 0x9E3779B1, tl.uint32)) >> 8).to(tl.float32)  # 24 bits
        e = (h * (1.0 / 8388608.0) - 1.0) * 2.384185791015625e-07  # uniform in +-2^-22
        y = tl.where(x == tl.floor(x), y, tl.fma(y, e, y))
    return y


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32/fp64) rounded once to `dtype`, to nearest even."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # a NaN payload must not carry into inf
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def widen(x, ACC: tl.constexpr):
    """Logits x in the accumulation dtype ACC. bf16 -> fp32 on a GPU is a bit move: each 32-bit
    register holds two bf16 (the lower element in its low half), whose fp32 values are the
    register shifted left 16 and the register with its low half cleared: one instruction each
    (the compiler's conversion extracted the high half with a PRMT and shifted it back: three
    instructions per two elements, ~1 more per element pair in the two-tensor loops)."""
    if (not INTERPRETED) and x.dtype == tl.bfloat16 and ACC == tl.float32:
        return tl.inline_asm_elementwise(
            "shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000;",
            "=r,=r,r", [x], dtype=tl.float32, is_pure=True, pack=2,
        )  # fmt: skip
    else:
        return x.to(ACC)


@triton.jit
def row_offset(row, n_inner, stride_outer, stride_inner, ALIGN: tl.constexpr = 1):
    """Element offset of row `row` (RowLayout): in int64, since N * V overflows int32.

    (row // n_inner) * stride_outer + (row % n_inner) * stride_inner

    ALIGN (`row_align`): a multiple of which every row's offset is, as the launcher checked.
    Triton knows a stride's divisibility only by 16 elements; told this, it loads 16-byte
    vectors from rows whose stride is a multiple of 16 bytes but not of 16 elements.
    """
    r = row.to(tl.int64)
    offset = (r // n_inner) * stride_outer + (r % n_inner) * stride_inner
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return offset


@triton.jit
def dense_row_offset(row, V, ALIGN: tl.constexpr = 1):
    """Element offset of row `row` of a fresh contiguous [N, V] tensor (a gradient), in int64;
    ALIGN as `row_offset`'s."""
    offset = row.to(tl.int64) * V
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return offset


@triton.jit
def _interleave(a, b):
    """[U, LANES, n] a and b -> [U, LANES, 2n]: a at the even positions, b at the odd ones
    (within each thread's registers: no data moves)."""
    return tl.reshape(tl.join(a, b), [a.shape[0], a.shape[1], 2 * a.shape[2]])


@triton.jit
def _load_lane_elements(ptrs, cols, end, MASKED: tl.constexpr):
    """*ptrs for [U, LANES] pointers one element apart from no other (where cols < end with
    MASKED, else -inf), loaded as [LANES, U]: Triton lays out an access whose dims are all
    non-contiguous with its threads along the first dim, and the lanes must lie across the
    threads (a thread's U elements in its registers) as in the lanes' layout, or every reduction
    over U and every use in the lanes' layout shuffles."""
    if MASKED:
        x = tl.load(tl.trans(ptrs), mask=tl.trans(cols) < end, other=float("-inf"))
    else:
        x = tl.load(tl.trans(ptrs))
    return tl.trans(x)


@triton.jit
def load_lanes(ptrs, N: tl.constexpr, STRIDE: tl.constexpr, cols, end, MASKED: tl.constexpr):
    """[U, LANES, N] with [u, l, j] = *(ptrs[u, l] + j * STRIDE): N scalar loads, each of ptrs'
    shape and the lanes' layout (one element per thread and lane, the U in registers). With
    MASKED, elements at columns cols + j * STRIDE >= end read -inf.

    For rows that are not 16-byte aligned (`row_align` 1): a block loaded whole as
    [U, LANES * VEC] got a layout of one element per thread (the load cannot be vectorized)
    and moving it into the lanes' [U, LANES, VEC] cost ~25 SASS per element in shuffles
    (sm_90). With STRIDE 1 the element order is that of one contiguous load reshaped."""
    if N == 2:
        return tl.join(
            _load_lane_elements(ptrs, cols, end, MASKED),
            _load_lane_elements(ptrs + STRIDE, cols + STRIDE, end, MASKED),
        )
    elif N == 4:
        return _interleave(
            load_lanes(ptrs, 2, 2 * STRIDE, cols, end, MASKED),
            load_lanes(ptrs + STRIDE, 2, 2 * STRIDE, cols + STRIDE, end, MASKED),
        )
    else:
        tl.static_assert(N == 8, "load_lanes: N must be 2, 4 or 8")
        return _interleave(
            load_lanes(ptrs, 4, 2 * STRIDE, cols, end, MASKED),
            load_lanes(ptrs + STRIDE, 4, 2 * STRIDE, cols + STRIDE, end, MASKED),
        )


@triton.jit
def exp_acc(x):
    """e^x in x's dtype. fp32: one ex2 with a pre-multiplied log2(e) (what tl.exp does anyway, made
    explicit); fp64: the full-precision exp (Triton's fp32 fast path does not apply)."""
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return ex2(x * LOG2E)


@triton.jit
def div_acc(a, b):
    """a / b correctly rounded: a plain fp32 `/` compiles to the approximate div.full.f32."""
    if b.dtype == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def expm1_acc(x):
    """e^x - 1 without the cancellation of exp(x) - 1 near 0 (the interpreter has no libdevice
    expm1): for |x| < 0.35, x (1 + x/2 (1 + x/3 (...))) to 17 terms (truncation ~1e-22
    relative, below an fp64 ulp); outside it exp(x) - 1 loses nothing (|e^x - 1| > 0.29)."""
    small = tl.abs(x) < 0.35
    xs = tl.where(small, x, 0.0)
    series = xs * 0.0 + 1.0
    for k in tl.static_range(17, 1, -1):
        series = 1.0 + xs * series * (1.0 / k)
    return tl.where(small, xs * series, exp_acc(x) - 1.0)


@triton.jit
def floor_log_ratio(d):
    """A log-ratio term floored to a finite value: where its weight is 0 (a -inf logit) the
    difference is -inf or NaN and the product must be 0. On a GPU tl.maximum (one FMNMX,
    which returns the other operand for a NaN); the interpreter's maximum keeps NaN, so a
    select there. (A select compiled to a compare whose predicates the register allocator
    packed into integers and unpacked again: ~4 instructions per element instead of 1.)"""
    if INTERPRETED:
        return tl.where(d > D_MIN, d, D_MIN)
    else:
        return tl.maximum(d, D_MIN)


@triton.jit
def log_ratio_cap(f):
    """The cap of a log-ratio r whose product fma(r, f, b) a weight multiplies (f a row
    factor): (1 - 2^-20) of the float range over max(|f|, 1), below which r f cannot overflow,
    so that a weight of 0 gives 0. The backward's r is +inf, or near the range, where a
    finfo.min fill meets a weight that underflowed to 0 (the fill's x k overflowed at k > 1:
    finding (10), or a quotient of ~3.4e38 at k = 1), and 0 * inf was a NaN gradient. Only an
    r whose r f overflowed before (+-inf where the weight is not 0) is capped: a finite
    gradient keeps its value (an eighth of the range capped w_j > 0 entries of a fill at
    tau 2, KL ~1e37, to gradients of the wrong sign). With b of the range's order and the
    product's sign (|c| ~1e31 in kl_divergence's f_wc) the weight's 0 still meets inf. No cap
    for an infinite f (an infinite upstream gradient: r f stays +-inf); a NaN f leaves r
    uncapped on a GPU (FMNMX returns the other operand): the product is NaN either way."""
    cap = (lowest_finite(f.dtype) * -0.999999) / tl.maximum(tl.abs(f), 1.0)
    return tl.where(tl.abs(f) < float("inf"), cap, float("inf"))


@triton.jit
def bounded_log_ratio(d, cap):
    """`floor_log_ratio` and at most `cap` (`log_ratio_cap`): one FMNMX more per element."""
    return tl.minimum(floor_log_ratio(d), cap)


@triton.jit
def log1p_acc(x):
    """log(1 + x) without losing x below ulp(1) (the interpreter has no libdevice log1p): with
    u = 1 + x rounded, log(u) x / (u - 1) (Goldberg), whose error is a few ulps of the result
    wherever log is faithful; x itself where u rounds to 1."""
    u = 1.0 + x
    d = u - 1.0
    return tl.where(d == 0, x, tl.log(u) * (x / tl.where(d == 0, 1.0, d)))


@triton.jit
def max_nan(a, b):
    """max(a, b), NaN if a is NaN or b is NaN (tl.maximum drops NaN on the GPU)."""
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def merge_states(m_a, s1_a, s2_a, t_a, m_b, s1_b, s2_b, t_b):
    """docs/math.md §1 merge of two (m, s1, s2, t) states, elementwise over rows.

        m = max(m_a, m_b);  a = e^{m_a - m};  b = e^{m_b - m}
        s1 = a s1_a + b s1_b;  s2 = a^2 s2_a + b^2 s2_b
        t  = a (t_a + (m_a - m) s1_a) + b (t_b + (m_b - m) s1_b)

    An empty side (m = -inf, sums 0) contributes exactly 0 and the other side comes back
    unchanged (factor exactly 1), as in softmax_stats.h; a NaN max makes the result NaN.
    """
    m = max_nan(m_a, m_b)
    a_empty = m_a == float("-inf")
    b_empty = m_b == float("-inf")
    # An empty side is moved to the reference max before subtracting: -inf - -inf would be NaN
    # and -inf * 0 too. The operands stay finite even where the result is thrown away, so the
    # interpreter (numpy) raises no warnings either.
    m_ref = tl.where(a_empty & b_empty, 0.0, m)
    da = tl.where(a_empty, m_ref, m_a) - m_ref
    db = tl.where(b_empty, m_ref, m_b) - m_ref
    fa = tl.where(a_empty, 0.0, tl.where(da == 0.0, 1.0, exp_acc(da)))
    fb = tl.where(b_empty, 0.0, tl.where(db == 0.0, 1.0, exp_acc(db)))
    s1 = fa * s1_a + fb * s1_b
    s2 = (fa * fa) * s2_a + (fb * fb) * s2_b
    t = fa * (t_a + da * s1_a) + fb * (t_b + db * s1_b)
    return m, s1, s2, t


@triton.jit
def inv_temperature(temp_ptr, rows, mask, inv_tau_bits, HAS_TEMP: tl.constexpr, ACC: tl.constexpr):
    """1 / tau in ACC for `rows`: from the per-row tensor, or the launcher's scalar 1 / tau.

    The scalar travels as the int64 bit pattern of a float64 (Triton passes Python floats as
    fp32, which would round an fp64 temperature). A tau <= 0, inf or NaN gives 1 / tau <= 0, 0 or
    NaN: callers treat anything but a finite positive 1 / tau as a NaN row.
    """
    if HAS_TEMP:
        tau = tl.load(temp_ptr + rows, mask=mask, other=1.0).to(ACC)
        return div_acc(tl.full(tau.shape, 1.0, ACC), tau)
    else:
        return inv_tau_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)


@triton.jit
def valid_inv_temperature(inv_tau):
    return (inv_tau > 0.0) & (inv_tau < float("inf"))


# ------------------------------------------------------------------------------------------------
# Host side


def row_align(x: torch.Tensor, n_inner: int, stride_outer: int, stride_inner: int) -> int:
    """`row_offset`'s ALIGN for rows of x (RowLayout): 16 // itemsize where every row starts
    16-byte aligned (a kernel can load 16-byte vectors), else 1."""
    a = 16 // x.dtype.itemsize
    aligned = x.data_ptr() % 16 == 0 and stride_outer % a == 0 and stride_inner % a == 0
    return a if aligned else 1


def rows_align(*rows) -> int:
    """The ALIGN of a kernel that applies one to the rows of several tensors: the least
    `row_align`. A row is (tensor, n_inner, stride_outer, stride_inner), or a tensor alone for
    a fresh contiguous one (a gradient, `dense_row_offset`); a row whose tensor is None (an
    input not given, never read) does not count."""
    return min(
        row_align(r, 1, r.shape[-1], 0) if isinstance(r, torch.Tensor) else row_align(*r)
        for r in rows
        if r is not None and not (isinstance(r, tuple) and r[0] is None)
    )


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and per-token output) dtype: fp64 for fp64 logits, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@triton.constexpr_function
def acc_of(XDT):
    """`acc_dtype_of` inside a kernel, from the logits' element type."""
    return tl.float64 if XDT == tl.float64 else tl.float32


@triton.constexpr_function
def ulp_of_one(DT):
    """ulp(1) of fp32 or fp64: 2^-23 or 2^-52."""
    return 2.220446049250313e-16 if DT == tl.float64 else 1.1920928955078125e-07


def _round_to_f32(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def float64_bits(x: float) -> int:
    """The int64 bit pattern of x as a float64: a kernel argument that keeps every bit (Triton
    passes a Python float as fp32); the kernel reads it back with
    `bits.to(tl.int64).to(tl.float64, bitcast=True)`."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def scalar_inv_temperature_bits(temperature: float, acc: torch.dtype) -> int:
    """The int64 bit pattern of the float64 holding 1 / temperature as the CPU kernel computes it:
    acc(1) / acc(temperature) (fp32: exact, since a double quotient of two floats rounds to the
    correctly rounded float). An invalid temperature (<= 0, inf, NaN) maps to NaN: a NaN row."""
    t = float(temperature)
    if not (t > 0.0 and t < math.inf):
        inv = math.nan
    elif acc == torch.float32:
        t32 = _round_to_f32(t)
        inv = _round_to_f32(1.0 / t32) if t32 > 0.0 else math.inf
    else:
        inv = 1.0 / t
    return float64_bits(inv)


class RowBlocking(NamedTuple):
    """How each row is cut: BLOCK_V elements per loop step, CHUNK (a multiple of BLOCK_V)
    elements per program, n_chunks programs per row. A function of V and the dtype only, so a
    row's arithmetic (hence its bits) never depends on N: batch invariance."""

    block_v: int
    chunk: int
    n_chunks: int
    num_warps: int
    fold: int  # neighbours that share an accumulator lane: within one 16-byte vector load


# One loop step loads 8 KiB per program (4096 bf16 / 2048 fp32 / 1024 fp64): with 8 warps that
# is 32 bytes (two or more 16-byte vector loads) per thread per step, and the three fp32 lane
# accumulators of the forward stay at ~48 registers per thread, so ~3 programs fit per SM.
STEP_BYTES = 8192
# Four steps (32 KiB) per program: long enough to amortize the per-program prologue (label,
# temperature, row offset) and epilogue (lane reduction, partial-state store), short enough that
# V = 151936 bf16 is cut into 10 programs per row, so a handful of rows already fills a GPU.
STEPS_PER_CHUNK = 4
BYTES_PER_THREAD_STEP = 32


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints. triton.cdiv and triton.next_power_of_2 are constexpr functions,
    ~2 us per call from host code: four of them per launcher were ~8 us of host time."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, for host ints n >= 1 (triton.next_power_of_2's value)."""
    return 1 << (n - 1).bit_length()


def row_blocking(
    V: int, dtype: torch.dtype, block_v: int | None = None, chunk: int | None = None
) -> RowBlocking:
    """Blocking of rows of V elements of `dtype`; block_v / chunk override it (tests, tuning)."""
    itemsize = dtype.itemsize
    bv = block_v if block_v is not None else STEP_BYTES // itemsize
    if chunk is not None:
        bv = min(bv, chunk)
    bv = min(next_power_of_2(bv), max(16, next_power_of_2(V)))
    ck = chunk if chunk is not None else STEPS_PER_CHUNK * bv
    if ck % bv != 0:
        raise ValueError(f"chunk ({ck}) must be a multiple of the block ({bv})")
    ck = min(ck, cdiv(V, bv) * bv)
    num_warps = max(1, min(8, bv * itemsize // (32 * BYTES_PER_THREAD_STEP)))
    fold = max(1, min(4, 16 // itemsize, bv // 2))
    return RowBlocking(bv, ck, cdiv(V, ck), num_warps, fold)


def per_row_inv_temperature(
    temperature: torch.Tensor | None, temperature_scalar: float, n: int, acc: torch.dtype, device
) -> torch.Tensor:
    """Per-row 1 / tau in acc as the C++ kernels compute it (acc(1) / acc(tau)): a fill kernel for
    a scalar (no host-to-device copy), an elementwise reciprocal for a per-row tensor."""
    if temperature is not None:
        return torch.reciprocal(temperature.to(acc))
    t = float(temperature_scalar)
    if acc == torch.float32:
        t = _round_to_f32(t)
        # A double quotient of two floats rounded once to float: the correctly rounded 1 / t.
        inv = _round_to_f32(1.0 / t) if t > 0.0 else math.inf
    else:
        inv = 1.0 / t
    return torch.full((n,), inv, dtype=acc, device=device)


def per_row_temperature(
    t: torch.Tensor | None, scalar: float, n: int, acc: torch.dtype, device
) -> torch.Tensor:
    """A per-row temperature tensor: the given one, or N copies of the scalar (one code path)."""
    if t is not None:
        return t.contiguous()
    return torch.full((n,), scalar, dtype=acc, device=device)


# ------------------------------------------------------------------------------------------------
# Base-2 accumulation: exponents in log2 units, so that log2(e) / tau folds into the one fma that
# forms each exponent (x * c - reference) and the exp is a bare MUFU.EX2.

LN2 = tl.constexpr(0.6931471805599453)
LOG2E_F64 = tl.constexpr(1.4426950408889634)


@triton.jit
def exp2_acc(x):
    """2^x in x's dtype: one MUFU.EX2 in fp32; fp64 goes through the full-precision exp."""
    if x.dtype == tl.float64:
        return tl.exp(x * LN2)
    else:
        return ex2(x)


def scalar_log2_scale_bits(temperature: float, acc: torch.dtype) -> int:
    """The int64 bit pattern of the float64 log2(e) / temperature, the temperature first rounded
    to acc as the per-row path would hold it; the kernel rounds it to acc once. An invalid
    temperature (<= 0, inf, NaN) maps to NaN: a NaN row."""
    t = float(temperature)
    if acc == torch.float32:
        t = _round_to_f32(t)
    scale = 1.4426950408889634 / t if 0.0 < t < math.inf else math.nan
    return float64_bits(scale)


@triton.jit
def lowest_finite(dtype: tl.constexpr):
    """The lowest finite value of fp32 or fp64, as a scalar of that dtype: a reference max that
    keeps z - m finite (-inf - m = -inf, never -inf - -inf = NaN)."""
    if dtype == tl.float64:
        return tl.full([], -1.7976931348623157e308, tl.float64)
    else:
        return tl.full([], -3.4028234663852886e38, tl.float32)


@triton.jit
def push_far(ref, far, push):
    """A lane's reference ref (the exponent offset its logits are summed against) moved up by
    |ref| push where |ref| >= far: its own rounding there (ulp(ref) / 2) would be the exponent
    of the lane's max, 2^eps or e^eps overflowing from ~2^31 on (masks of -1e30, finfo.min),
    while every entry of a lane that far out lies |ref| push or more below the moved
    reference, so its exps are exactly 0: such a lane has no mass. far push >= 2^9 keeps
    that true; the product is exact (a power of two)."""
    return tl.where(tl.abs(ref) >= far, ref + tl.abs(ref) * push, ref)
