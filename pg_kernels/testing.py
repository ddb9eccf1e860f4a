"""Shared test machinery: tolerance tables, input generators and the reference check.

The tolerance rule (from flash-attention's tests): a kernel's error against the float64 truth may
be at most 2x the error of plain PyTorch at the input precision (the reference with
upcast=False), plus a small floor from the tables below. Each floor carries its reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pg_kernels.reference._util import every_field_differentiable


@dataclass(frozen=True)
class Tol:
    rtol: float  # elementwise, relative to |truth|
    atol: float  # relative to the largest |truth| of the tensor (absolute for per-token outputs)
    why: str
    floor: float = 0.0  # absolute: fp64's (the plain baseline is the truth itself), fp16's spacing


def interpreted(backend: str, device) -> bool:
    """Whether a kernel case runs under the Triton interpreter (Triton on a CPU tensor), where
    each program costs ~10-40 ms: tests keep their shapes small there and may run a covering
    subset of their cases (every value of each axis at least once); a GPU runs them all."""
    return backend == "triton" and str(device) == "cpu"


def cases_of(*axes: Sequence, cover: bool = False) -> list[tuple]:
    """Every combination of the axes' values (itertools.product), or with `cover` only as many
    as the longest axis has values, which together take every value of each axis: case i takes
    value i mod len(axis) of each (the interpreter's subset, `interpreted`)."""
    if not cover:
        return list(itertools.product(*axes))
    return [tuple(a[i % len(a)] for a in axes) for i in range(max(len(a) for a in axes))]


# Per-token outputs are fp32 sums over the row for bf16/fp16/fp32 logits alike (the truth is
# computed from the same rounded logits), so they share the fp32 floor.
FORWARD_TOL = {
    torch.float32: Tol(
        2e-5,
        1e-6,
        "fp32 accumulation; 2e-5 relative is the project target, "
        "1e-6 absolute covers outputs near 0 (entropy of one-hot rows)",
    ),
    torch.bfloat16: Tol(2e-5, 1e-6, "outputs are fp32 sums of the same rounded logits"),
    torch.float16: Tol(2e-5, 1e-6, "outputs are fp32 sums of the same rounded logits"),
    torch.float64: Tol(
        1e-12,
        1e-13,
        "fp64 accumulation over <= 2^18 terms; the 5e-14 absolute floor: one-pass outputs that "
        "cancel O(1..40) terms (KL or TV of near-equal rows, a log-prob near 0 from a "
        "log-sum-exp of ~10) carry a few ulps of those terms whatever the output's own size, "
        "where the fp64 baseline is the truth itself (fuzzer: <= 3e-14 seen)",
        floor=5e-14,
    ),
}

# Gradients are rounded once to the logits' dtype: elementwise rtol is that rounding (2 ulp of
# the dtype), atol is the project target of 1e-5 of the largest gradient entry. fp16's 2 ulp
# below its smallest normal (6.1e-5) are 2 of its fixed subnormal spacing, 2^-24: an entry of
# 4.5e-7 rounds to 7 or 8 x 2^-24 (C++ kl_divergence, fp16 [5, 1649], a gradient whose largest
# entry is 1.3e-4: one spacing, 6.0e-8, off where rtol and atol allowed 2.2e-9).
GRAD_TOL = {
    torch.float32: Tol(0.0, 1e-5, "target: within 1e-5 of the float64 gradient's largest entry"),
    torch.bfloat16: Tol(2**-7, 1e-5, "one rounding to bf16 (8 mantissa bits), 2 ulp"),
    torch.float16: Tol(2**-9, 1e-5, "one rounding to fp16 (11 mantissa bits), 2 ulp", 2**-23),
    torch.float64: Tol(
        0.0,
        1e-12,
        "fp64 throughout; the 1e-13 absolute floor: a gradient entry p_j (log p_j - log q_j - KL) "
        "cancels terms of size |log q_j| ~ 40, a few fp64 ulps of which is ~1e-14 whatever the "
        "row's gradient scale (kl_divergence, near one-hot row, V=151936, max |grad| 9e-4: "
        "errors vs a 40-digit mpmath truth: kernel 1.7e-15, the fp64 reference 4.1e-15)",
        floor=1e-13,
    ),
}


# Triton's 16-bit pair passes (kl_divergence, mismatch_stats, step_stats) sum fp32 lanes whose
# terms carry ~ulp(1) each whatever the KL's size: a small KL is u / s_w - log s_w + log s_v
# with both normalizers rounded (open class (1), README Testing; bf16 V = 7, KLs of 1.7e-3 and
# 8.2e-3: 6.6e-8 and 1.2e-7 off, plain fp32 PyTorch 6e-9 and 2.3e-8). Bound: 2 fp32 ulps of 1,
# per value, for their KLs only.
TRITON_16BIT_PAIR_FLOOR = 2.0**-22

# (name, truth, error) -> {class: the elements it covers}: see assert_close_to_truth.
Known = Callable[[str, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def make_logits(
    n: int | Sequence[int],
    vocab: int,
    dtype: torch.dtype = torch.float32,
    *,
    scale: float = 3.0,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> torch.Tensor:
    """Random logits [*n, vocab] ~ N(0, scale^2) plus a random per-row offset (never zeros)."""
    shape = (n,) if isinstance(n, int) else tuple(n)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * scale
    x += torch.randn(*shape, 1, generator=g, dtype=torch.float64) * 5
    return x.to(dtype=dtype, device=device)


def peaked_logits(n: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Realistic peaked float64 logits [n, vocab]: randn * 4 with a spike of +5..15 at a random
    column of about half of the rows (benchmarks/fidelity.py's inputs, the fidelity tests')."""
    x = torch.randn(n, vocab, generator=generator, dtype=torch.float64) * 4
    rows = torch.arange(n)[torch.rand(n, generator=generator) < 0.5]
    cols = torch.randint(0, vocab, (rows.numel(),), generator=generator)
    x[rows, cols] += torch.rand(rows.numel(), generator=generator, dtype=torch.float64) * 10 + 5
    return x


def near_equal_rows(dtype: torch.dtype, seed: int = 0) -> list[tuple]:
    """Near-equal row pairs (x, other, temperature) of `dtype`, the KLs of 1e-7 .. 1e-4 whose
    16-bit Triton pair passes open class (1) of the fidelity notes is about (README, Testing):
    the fuzzer's bf16 [1, 2] pair at tau 16.7 (KL 9.5e-8), then [4, V] logits (randn * 3)
    against a copy + 1 + noise of 1e-2 .. 1e-3 (V = 2, 5, 300, 5003) or none (a shifted copy,
    KL 0), each at temperature 1, 0.7 and per row (0.3, 1, 2.5, 16.7)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([[16.625, 3.953125]], dtype=dtype)
    other = torch.tensor([[19.625, 6.96875]], dtype=dtype)
    rows = [(x, other, torch.tensor([16.714989565055827]))]
    for v, noise in ((2, 1e-2), (5, 1e-2), (300, 3e-3), (5003, 1e-3), (5003, 0.0)):
        x = (torch.randn(4, v, generator=g, dtype=torch.float64) * 3).to(dtype)
        eps = torch.randn(4, v, generator=g, dtype=torch.float64) * noise
        other = (x.double() + eps + 1.0).to(dtype)
        for t in (1.0, 0.7, torch.tensor([0.3, 1.0, 2.5, 16.7])):
            rows.append((x, other, t))
    return rows


def make_labels(
    shape: Sequence[int], vocab: int, *, device="cpu", seed: int | None = None, ignore_index=-100
) -> torch.Tensor:
    """Random labels covering 0 and vocab - 1, with ~10% ignore_index rows."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    y = torch.randint(0, vocab, tuple(shape), generator=g)
    flat = y.view(-1)
    if flat.numel() >= 2:
        flat[0], flat[-1] = 0, vocab - 1
    if flat.numel() >= 4:
        drop = torch.rand(flat.shape, generator=g) < 0.1
        drop[0] = drop[-1] = False
        flat[drop] = ignore_index
    return y.to(device)


def near_one_hot(logits: torch.Tensor, rows: slice | Sequence[int], gap: float = 40.0) -> None:
    """Make `rows` nearly one-hot in place: one logit `gap` above the rest."""
    sub = logits[rows]
    sub[..., sub.shape[-1] // 3] = sub.amax(-1) + gap
    logits[rows] = sub


def masked_with_a_huge_finite_fill(
    dtype: torch.dtype, fill: float | str, noise: Sequence[float], *, whole: bool, seed: int
) -> list[torch.Tensor]:
    """[4, 100] logits (randn * 2) and, per noise scale, a copy plus noise * randn, all masked
    alike with a huge finite fill ("finfo.min": the dtype's, as Hugging Face masks; or a number
    such as -1e30) instead of -inf: row 0 a tail, row 1 all but two entries, row 2 all but
    both ends (whole lanes and chunks of it under small Triton blocks), row 3 whole if `whole`.
    Built in float64 on the CPU, then cast to `dtype`."""
    lo = torch.finfo(dtype).min if fill == "finfo.min" else fill
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 100, generator=g, dtype=torch.float64) * 2
    sides = [x] + [x + s * torch.randn(4, 100, generator=g, dtype=torch.float64) for s in noise]
    mask = torch.zeros(4, 100, dtype=torch.bool)
    mask[0, 40:] = mask[1, :50] = mask[1, 52:] = mask[2, 5:95] = True
    mask[3] = whole
    return [t.masked_fill(mask, lo).to(dtype) for t in sides]


def filled_against_no_mass(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """[4, 100] logits (randn * 2) masked with -1e4 (an older Hugging Face mask value) where
    `masked_with_a_huge_finite_fill` masks its rows (row 3: the first half), and another side
    (randn * 2) masked there with finfo.min: finite logits of no mass, in float64 too, against
    a fill whose x / tau leaves the float range at tau < 1 (and whose x - m is near it at
    tau = 1). The float64 truth is finite, the fill's terms 0."""
    g = torch.Generator().manual_seed(seed)
    x, other = (torch.randn(4, 100, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    mask = torch.zeros(4, 100, dtype=torch.bool)
    mask[0, 40:] = mask[1, :50] = mask[1, 52:] = mask[2, 5:95] = mask[3, :50] = True
    fill = torch.finfo(dtype).min
    return [x.masked_fill(mask, -1e4).to(dtype), other.masked_fill(mask, fill).to(dtype)]


# The dominant entry's column in `dominant_entry_rows`, and the rows whose argmax the other side
# does not share (the finding's rows).
DOMINANT_COLUMN = 123
DOMINANT_ROWS = slice(0, 9)


def dominant_entry_rows(v: int, seed: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, other) [12, v] float64: w a spike of 40, 24, 16 over randn * 0.5 at DOMINANT_COLUMN
    (rests of ~1e-17, ~1e-10, ~1e-7 at tau 1), four times; the other side randn * 4 against
    the first nine rows (DOMINANT_ROWS: whether the direct form rounds at the top entry
    depends on the draw) and w + 1e-3 randn against the last three (a shared argmax, where
    a KL gradient's direct form is exact to ~eps c)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, v, generator=g, dtype=torch.float64) * 0.5
    w[:, DOMINANT_COLUMN] += torch.tensor([40.0, 24.0, 16.0] * 4, dtype=torch.float64)
    other = torch.randn(12, v, generator=g, dtype=torch.float64) * 4
    other[9:] = w[9:] + 1e-3 * torch.randn(3, v, generator=g, dtype=torch.float64)
    return w, other


def assert_dominant_entry(
    ours: torch.Tensor, truth: torch.Tensor, plain: torch.Tensor, log_w: torch.Tensor,
    log_v: torch.Tensor, dtype: torch.dtype, context=None,
) -> None:  # fmt: skip
    """Finding (9) on `dominant_entry_rows`: the KL gradient of the side the expectation is over
    (w: ours, the float64 truth and plain fp32 PyTorch's, [12, v]) at the dominant entry of
    DOMINANT_ROWS, held to 2x plain's error there plus: 64 fp32 eps of the others' summed size
    (the kernels write it as minus their sum, in fp32 lanes), half an ulp of the gradient's
    dtype, and the float64 truth's own rounding of its direct form, ulp((d_w - d_v) - KL) (4e-15
    at a spike of 40, where plain fp32 reads ~0). log_w, log_v: the float64 log-softmaxes."""
    col, rows = DOMINANT_COLUMN, DOMINANT_ROWS
    err, err_plain = ((g.double().cpu() - truth)[rows, col].abs() for g in (ours, plain))
    others = truth[rows].abs().sum(-1) - truth[rows, col].abs()
    kl = (log_w.exp() * (log_w - log_v)).sum(-1)[rows]
    truth_rounding = 8 * 2.0**-52 * ((log_w - log_v)[rows, col].abs() + kl.abs())
    allowed = (2 * err_plain + 64 * 2.0**-23 * others
               + torch.finfo(dtype).eps / 2 * truth[rows, col].abs() + truth_rounding)  # fmt: skip
    assert (err <= allowed).all(), (context, err, err_plain, allowed)


def assert_close_to_truth(
    name: str,
    out: torch.Tensor,
    truth: torch.Tensor,
    plain: torch.Tensor,
    tol: Tol,
    floor: torch.Tensor | None = None,
    *,
    per_row: bool = False,
    sensitivity: torch.Tensor | None = None,
    flushed_terms: int = 1,
    known: Known | None = None,
    excused: set[str] | None = None,
) -> float:
    """Check |out - truth| <= 2 max|plain - truth| + rtol |truth| + atol max|truth| elementwise
    (+ `floor`, an elementwise bound the caller derives and justifies, if given).

    The maxima are over the whole tensor, or with `per_row` over each row (the last dim) of a
    tensor of two or more dims: a gradient's rows differ in scale by orders of magnitude (a
    confident row's entries are ~1e-7 of a flat row's), and a bound from the largest row lets
    the small rows be wrong (plain's error in a row counts as at least one fp32 ulp of the
    tensor's largest entry, so entries below ~2.4e-7 of it stay checked only as a whole). NaN
    and infinities must sit at the same places with the same values; an infinity is the truth
    rounded to the output's dtype (-4.9e38 is -inf in fp32). A 16-bit output is also held to
    no bias (`_assert_unbiased`). With `sensitivity` (per element, `_sensitivities`) the bound
    is also taken per value and the smaller one kept, plus `flushed_terms` times the output
    dtype's smallest normal (each term of a sum below it may be flushed to 0). Returns the max
    error.

    `known(name, truth, err)`, if given, names the classes of error that are the rule's or the
    reference's, each with the elements it covers ({class: bool mask}); an element outside the
    bound that a class covers passes, and the class is added to `excused`.
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out_nan, truth_nan = torch.isnan(out), torch.isnan(truth)
    assert torch.equal(out_nan.cpu(), truth_nan.cpu()), (
        f"{name}: NaN at {out_nan.nonzero()[:5].tolist()}, "
        f"in the truth at {truth_nan.nonzero()[:5].tolist()}"
    )
    rounded = truth.to(out.dtype) if out.dtype.is_floating_point else truth
    out_inf, truth_inf = torch.isinf(out), torch.isinf(rounded)
    assert torch.equal(out_inf.cpu(), truth_inf.cpu()), f"{name}: infinities differ"
    assert torch.equal(out[out_inf].double().cpu(), rounded[truth_inf].double().cpu()), (
        f"{name}: infinities have different signs"
    )
    finite = torch.isfinite(rounded).to(out.device)
    if not bool(finite.any()):
        return 0.0
    o, t, p = (a.detach().double().to(out.device) for a in (out, truth, plain))
    t = torch.where(finite, t, 0.0)
    err = torch.where(finite, (o - t).abs(), 0.0)
    # plain's error where plain is finite: a NaN / inf of plain's (an fp16 overflow) would make
    # the bound NaN / inf and let any output pass.
    plain_errs = torch.where(finite & torch.isfinite(p), (p - t).abs(), 0.0)
    per_row = per_row and t.dim() >= 2
    if per_row:
        # A row's plain error, but at least one ulp of the tensor's largest entry: a row whose
        # gradient cancels to ~0 (near-equal distributions) may come out of plain PyTorch
        # exact by luck, and a kernel's rounding of the terms is then ~eps of their size
        # (topk_kl, fp32 V = 2: an entry of 1.5e-9 off by 4.4e-9, plain exact). The ulp of the
        # computation (fp32 at least): a 16-bit output's own rounding is rtol's, and its eps
        # would let a confident row's entries be wrong by 2^-6 of the largest.
        eps = torch.finfo(torch.promote_types(out.dtype, torch.float32)).eps
        plain_err = plain_errs.amax(-1, keepdim=True).clamp_min(eps * float(t.abs().max()))
        scale = t.abs().amax(-1, keepdim=True)
    else:
        plain_err, scale = plain_errs.max(), t.abs().max()
    allowed = 2 * plain_err + tol.rtol * t.abs() + tol.atol * scale.clamp_min(1e-30) + tol.floor
    if sensitivity is not None:
        # Tightened per value: each output's own scale is its size plus what a relative rounding
        # of its inputs moves it by (`_sensitivities`), and plain's error at that value counts
        # as at least one fp32 ulp of that scale (a lucky exact plain must not fail a kernel).
        # The bound is the smaller of the two: per value alone, atol times a large sensitivity
        # (a TV of near-equal rows: ~4) would allow more than the whole tensor's rule does.
        # Below the output dtype's smallest normal a value, or each term of a sum, may be
        # flushed to 0: the kernels' exps flush their subnormal results (the GPU's
        # ex2.approx.ftz, the C++ vector exp), where plain PyTorch on a CPU keeps them (a TV of
        # 6.2e-40 read 1.3e-40; a tail mass of 4.4e-35, V = 151936 terms of ~2.6e-40, read 0).
        eps = torch.finfo(torch.promote_types(out.dtype, torch.float32)).eps
        own = torch.where(finite, sensitivity.double().to(out.device), 0.0) + t.abs()
        plain_own = torch.maximum(plain_errs, eps * own)
        per_value = (2 * plain_own + tol.rtol * t.abs() + tol.atol * own + tol.floor
                     + flushed_terms * torch.finfo(out.dtype).tiny)  # fmt: skip
        allowed = torch.minimum(allowed, per_value)
        plain_err = torch.minimum(plain_err.expand(t.shape), plain_own)
    if floor is not None:
        floor = floor.double().to(out.device).expand(truth.shape)
        allowed = allowed + floor
    bad = finite & (err > allowed)
    if known is not None and bool(bad.any()):
        for key, covered in known(name, t, err).items():
            if bool((bad & covered).any()):
                bad &= ~covered
                if excused is not None:
                    excused.add(key)
    if bool(bad.any()):
        excess = torch.where(bad, (err - allowed) / allowed.clamp_min(1e-300), -1.0)
        i = int(excess.argmax())
        at = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), t.shape))
        plain_at = float(plain_err.expand(t.shape).flatten()[i])
        raise AssertionError(
            f"{name}: max error {float(err.max()):.3e} (plain PyTorch {float(plain_errs.max()):.3e}"
            f"{f', {plain_at:.3e} for its row' if per_row else ''}"
            f"{f', {plain_at:.3e} for this value' if sensitivity is not None else ''}); worst at "
            f"{at}: got "
            f"{float(o.flatten()[i])!r}, truth {float(t.flatten()[i])!r}, allowed "
            f"{float(allowed.expand(t.shape).flatten()[i]):.3e} [{tol.why}]"
        )
    if out.dtype in (torch.bfloat16, torch.float16):
        _assert_unbiased(name, o, t, p, finite & torch.isfinite(p), out.dtype, floor)
    return float(err.max())


def _assert_unbiased(name, o, t, p, finite, dtype, floor=None) -> None:
    """A 16-bit output's signed error, summed as sum (o - t) sign(t) / sum |t| (a tensor scaled
    by 1 + e gives e), within twice plain's own, 2^-12, the caller's floor (summed alike) and
    4 sigma of the roundings' noise.

    One rounding to nearest adds a noise of mean 0: its relative error may reach 2^-8 (bf16)
    per entry, which the elementwise rule must allow, so a gradient scaled by 1.004 passed it.
    Summed over the tensor, the noise shrinks as 1 / sqrt(n) while a bias does not. 2^-12 covers
    an fp32 computation's own systematic error (~1e-6 relative) with a wide margin. sigma takes
    every entry as rounded once (half an ulp, uniform): in check_against_reference the truth is
    itself the float64 gradient rounded to the leaf's dtype, and plain mostly equals it, so
    sigma is an overestimate there (the check errs toward passing). Entries below the dtype's
    normal range (whose spacing is fixed) are left out, and tensors of fewer than 32 others."""
    keep = finite & (t.abs() >= torch.finfo(dtype).tiny)
    if int(keep.sum()) < 32:
        return
    o, t, p = o[keep], t[keep], p[keep]
    mass = float(t.abs().sum())
    floor_term = 0.0 if floor is None else float(floor[keep].sum()) / mass
    bias = float(((o - t) * t.sign()).sum()) / mass
    plain = float(((p - t) * t.sign()).sum()) / mass
    half_ulp = torch.finfo(dtype).eps / 2 * 2.0 ** torch.floor(torch.log2(t.abs()))
    sigma = float((half_ulp.square() / 3).sum().sqrt()) / mass
    allowed = 2 * abs(plain) + 2.0**-12 + floor_term + 4 * sigma
    assert abs(bias) <= allowed, (
        f"{name}: biased: the signed error sums to {bias:.3e} of the tensor's mass (plain "
        f"PyTorch {plain:.3e}), allowed {allowed:.3e}"
    )


def _leaf_like(a: torch.Tensor) -> torch.Tensor:
    """A leaf copy of `a` that requires grad, with a's strides: clone() makes a non-dense view
    (rows with gaps, the shifted [:, :-1] of [B, T+1, V]) contiguous, and the op would never
    see the layout under test. The gaps hold whatever the allocation held."""
    if 0 in a.stride():  # an expanded view: its copy cannot keep overlapping strides
        return a.detach().clone().requires_grad_()
    leaf = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
    return leaf.copy_(a.detach()).requires_grad_()


def _sensitivities(
    ref: Callable, args: Sequence, kwargs: dict, names, whole_args: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """sum_j |d t_i / d a_j| (|a_j| + |a_j - max a|) for each per-token output t_i of the float64
    reference: how far a relative rounding of each input entry, or of its distance to its row's
    largest (the softmax's exponents), moves it, to first order. The inputs summed over are
    the float tensors, positional or keyword, whose rows are the output's tokens (shape [..., V]
    for an output [...]): a token's output depends on its own rows only, so one backward of the
    summed output gives every token's terms. `whole_args` (the fused lm_head path's hidden
    states, weight and bias: a weight [V, D] has the shape of N tokens' rows when N = V, and
    every token's output depends on it) are left out, and an output with no input left is
    checked per tensor."""
    given = {**dict(enumerate(args)), **kwargs}
    rows = [k for k, a in given.items() if k not in whole_args and isinstance(a, torch.Tensor)
            and a.is_floating_point() and a.dim() >= 1]  # fmt: skip
    if not rows:
        return {}
    leaves = {k: _leaf_like(a) if k in rows else a for k, a in given.items()}
    # every_field_differentiable: the fields the ops give no gradient (lgp, max_prob,
    # tail_mass) have a sensitivity too.
    with torch.enable_grad(), every_field_differentiable():
        out = ref(*[leaves[i] for i in range(len(args))],
                  **{k: leaves[k] for k in kwargs}, upcast=True)  # fmt: skip
    fields = out._asdict() if hasattr(out, "_asdict") else {"out": out}
    result = {}
    for name in names:
        t = fields.get(name)
        if not isinstance(t, torch.Tensor) or not t.requires_grad or t.dim() == 0:
            continue
        mine = [k for k in rows if given[k].shape[:-1] == t.shape]
        if not mine:
            continue
        finite = torch.isfinite(t.detach())
        loss = torch.where(finite, t, 0.0).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in mine], retain_graph=True,
                                    allow_unused=True)  # fmt: skip
        s = torch.zeros(t.shape, dtype=torch.float64, device=t.device)
        for k, g in zip(mine, grads):
            if g is not None and g.shape[-1] > 0:  # rows of width 0: no terms
                a = given[k].detach().double()
                a_max = a.masked_fill(~torch.isfinite(a), float("-inf")).amax(-1, keepdim=True)
                a_max = torch.where(torch.isfinite(a_max), a_max, 0.0)
                term = g.double().abs() * (a.abs() + (a - a_max).abs())
                s = s + torch.where(torch.isfinite(term), term, 0.0).sum(-1)
        result[name] = s
    return result


def check_against_reference(
    op: Callable,
    ref: Callable,
    args: Sequence,
    kwargs: dict,
    *,
    diff_fields: Sequence[str],
    grad_args: Sequence[int] = (0,),
    whole_args: Sequence[int] = (),
    check_fields: Sequence[str] | None = None,
    seed: int = 0,
    grad_floor: Callable[[int, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    forward_floor: dict[str, float] | None = None,
    known: Known | None = None,
    excused: set[str] | None = None,
) -> dict[str, float]:
    """Run op, ref in float64 (truth) and ref at input precision (plain); check outputs + grads.

    `op` and `ref` return NamedTuples (or a tensor, then diff_fields=("out",)). Upstream grads are
    random on every differentiable field. Gradients are checked per row (a token's own scale),
    except those of `whole_args`: a gradient that a matmul makes of the logits' gradient (hidden
    states', an lm_head weight's, a bias') is checked whole, as one row's 1e-5 of its largest
    entry does not carry through the matmul (an error common to a row's entries, such as its
    KL's rounding in p_j (log p_j - log q_j - KL), adds up over the vocabulary).

    `grad_floor(i, upstream)`, if given, is an elementwise error bound added to argument i's
    gradient tolerance (an op's own rounding analysis, from the upstream gradients keyed by
    field). `forward_floor[field]`, if given, is an absolute error bound added to that output's
    tolerance (the op's own rounding analysis): a float, or a tensor that broadcasts to the
    output (per row). `known` and `excused`: as assert_close_to_truth's, for every output and
    gradient (a gradient's name is "grad of argument i"). Returns the max errors, keyed by
    field / grad name.
    """

    def run(fn, upcast):
        leaves = [_leaf_like(a) if isinstance(a, torch.Tensor) and i in grad_args else a
                  for i, a in enumerate(args)]  # fmt: skip
        extra = {} if upcast is None else {"upcast": upcast}
        out = fn(*leaves, **kwargs, **extra)
        fields = out._asdict() if hasattr(out, "_asdict") else {"out": out}
        return leaves, fields

    leaves_k, out_k = run(op, None)
    leaves_t, out_t = run(ref, True)
    leaves_p, out_p = run(ref, False)
    dtype = args[0].dtype
    errors: dict[str, float] = {}
    # The truth's fields: one the kernel left out (None) fails rather than going unchecked.
    names = check_fields or [f for f, v in out_t.items() if isinstance(v, torch.Tensor)]
    sensitivities = _sensitivities(ref, args, kwargs, names, whole_args)
    for name in names:
        k, t, p = out_k[name], out_t[name], out_p[name]
        assert isinstance(k, torch.Tensor), f"{name}: {k!r} where the truth has a tensor"
        if not k.is_floating_point():
            assert torch.equal(k.cpu(), t.cpu()), f"{name}: {k} != {t}"
            continue
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert k.dtype == expected, f"{name}: dtype {k.dtype}, expected {expected}"
        floor = (forward_floor or {}).get(name)
        floor = None if floor is None else torch.as_tensor(floor, dtype=torch.float64)
        errors[name] = assert_close_to_truth(
            name, k, t, p, FORWARD_TOL[dtype], floor, sensitivity=sensitivities.get(name),
            # the logits' V (the from-hidden ops' D, whose values have no per-value bound)
            flushed_terms=max(1, args[0].shape[-1]), known=known, excused=excused,
        )  # fmt: skip
    if not diff_fields:
        return errors
    g = torch.Generator().manual_seed(seed)
    ups = {f: torch.randn(out_k[f].shape, generator=g, dtype=torch.float64) for f in diff_fields}
    # The loss takes the entries whose truth, rounded to the output's dtype, is finite (NaN
    # rows, and an lse of -4.9e38, -inf in fp32, carry no gradient), the same on every side.
    finite = {f: torch.isfinite(out_t[f].detach().to(out_k[f].dtype)) for f in diff_fields}

    def grads(leaves, out):
        loss = sum(
            torch.where(finite[f].to(out[f].device), out[f].double(), 0.0).mul(
                ups[f].to(out[f].device)).sum() for f in diff_fields
        )  # fmt: skip
        want = [leaves[i] for i in grad_args]
        return torch.autograd.grad(loss, want, allow_unused=True)

    for i, gk, gt, gp in zip(grad_args, grads(leaves_k, out_k), grads(leaves_t, out_t),
                             grads(leaves_p, out_p)):  # fmt: skip
        assert gk is not None, f"no gradient for argument {i}"
        assert gk.dtype == args[i].dtype, f"grad {i}: dtype {gk.dtype} != {args[i].dtype}"
        assert gk.is_contiguous() and gk.shape == args[i].shape
        floor = grad_floor(i, ups) if grad_floor is not None else None
        errors[f"grad{i}"] = assert_close_to_truth(
            f"grad of argument {i}", gk, gt, gp, GRAD_TOL[dtype], floor,
            per_row=i not in whole_args, known=known, excused=excused,
        )  # fmt: skip
    return errors
