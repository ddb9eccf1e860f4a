"""pg_kernels.parallel: vocab-parallel ops on real gloo process groups (1, 2 and 3 ranks).

Each world size is spawned once per test run (session fixture `worlds`); the workers run every
case of that world and save their forward outputs and gradients to a file. The tests then
check, per case: values and gradient shards against the single-device op on the concatenated
logits and against the float64 reference (the tolerance rule of pg_kernels.testing), bitwise
equality of the outputs across ranks and between two calls, and the errors of bad layouts and
labels.
"""

from __future__ import annotations

import importlib
import math
import os
import random
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from filelock import FileLock

import pg_kernels
from pg_kernels import _backend, parallel, reference
from pg_kernels.integrations import slime
from pg_kernels.ops._common import Temperature, make_temperature
from pg_kernels.parallel._shard import tiling_ok
from pg_kernels.reference._util import scaled
from pg_kernels.testing import (
    DOMINANT_COLUMN,
    FORWARD_TOL,
    GRAD_TOL,
    Tol,
    assert_close_to_truth,
    assert_dominant_entry,
    dominant_entry_rows,
    make_logits,
    near_one_hot,
)

IGNORE = -100
N = 12
TS_FIELDS = ("logprob", "entropy", "collision", "lgp", "lse", "max_prob", "argmax")
TS_DIFF = ("logprob", "entropy", "collision", "lse")

# Each rank's shard as (start, size); the shards tile [0, V). World 3 holds them out of rank
# order, with a one-column shard.
LAYOUTS = {
    "even2": [(0, 6), (6, 6)],
    "uneven2": [(0, 5), (5, 8)],
    "permuted3": [(8, 4), (12, 1), (0, 8)],
    "vocab32003": [(0, 16001), (16001, 16002)],  # an odd real-size vocabulary, C++ only
    # near-equal rows (_near_inputs) on one to three ranks
    "near1": [(0, 33)],
    "near2": [(0, 16), (16, 17)],
    "near3": [(20, 13), (0, 9), (9, 11)],
}
NEAR = ("near1", "near2", "near3")
NEAR_ROWS = 32
BACKENDS = ["cpu", "reference"]
if _backend.unavailable_reason("triton", torch.device("cpu")) is None:
    BACKENDS.append("triton")


def _cases() -> list[dict]:
    ops = ("token_stats", "kl_reverse", "kl_forward")
    combos = []  # (layout, backend, dtypes, the ops whose temperature is per row)
    for layout in LAYOUTS:
        if layout in NEAR:
            continue
        for backend in BACKENDS:
            if backend == "triton" and layout == "uneven2":
                continue  # interpreted Triton costs ~1 s per call: two layouts are enough
            if layout == "vocab32003" and backend != "cpu":
                continue
            dtypes = [torch.float32]
            if backend == "cpu" and layout not in ("even2", "vocab32003"):
                dtypes.append(torch.bfloat16)
            if backend == "cpu" and layout == "uneven2":
                dtypes.append(torch.float64)
            if layout == "vocab32003":
                dtypes = [torch.bfloat16]
            combos.append((layout, backend, dtypes, ops if layout != "uneven2" else ()))
    # Near-equal rows: the kernels' KL of them is accurate relative to itself, and so must the
    # merge be. Not the reference backend: its single-device KL is plain PyTorch's (~1.5e-7
    # absolute on KLs of ~1e-4), which the rule's "2x the plain error" cannot tell from another
    # plain computation of the same size.
    for layout in NEAR:
        for backend in ("cpu", "triton"):
            if backend not in BACKENDS or (backend == "triton" and layout != "near2"):
                continue
            dtypes = [torch.float32, torch.bfloat16] if backend == "cpu" else [torch.float32]
            combos.append((layout, backend, dtypes, ("kl_reverse", "kl_forward")))
    cases = [
        {
            "layout": layout,
            "backend": backend,
            "dtype": dtype,
            "op": op,
            "per_row_temperature": op in per_row,
        }  # fmt: skip
        for layout, backend, dtypes, per_row in combos
        for dtype in dtypes
        for op in ops
    ]
    for i, case in enumerate(cases):
        case["name"] = f"{case['op']}-{case['layout']}-{case['backend']}-{str(case['dtype'])[6:]}"
        case["seed"] = i
        case["shards"] = LAYOUTS[case["layout"]]
    # A peaked row whose label is its top token (_peaked_inputs), alone in its batch so that
    # the rule's absolute floor (atol x the largest |truth|) is its lgp's size, ~1e-7: the merge
    # must not form lgp = 1 - 2 p_c + C from fp32 numbers near 1 (a random layout found 7e-8).
    for shards in ([(0, 8)], [(3, 5), (0, 3)]):
        for dtype in (torch.float32, torch.bfloat16):
            sizes = "+".join(str(size) for _, size in shards)
            cases.append({
                "layout": "peaked", "backend": "cpu", "dtype": dtype, "op": "token_stats",
                "per_row_temperature": False, "shards": shards, "seed": len(cases),
                "name": f"token_stats-peaked{sizes}-cpu-{str(dtype)[6:]}",
            })  # fmt: skip
    return cases


CASES = _cases()

# Random layouts: PGK_FUZZ=long (the fuzzer's profile, tests/test_fuzz.py) draws
# PGK_FUZZ_EXAMPLES of them from PGK_FUZZ_SEED (default: a fresh seed, printed in each case's
# name; under pytest-xdist the run's id, which every worker shares, so that all collect the
# same cases); the default draws RANDOM_CI from a fixed seed.
RANDOM_CI = 36
_LONG = os.environ.get("PGK_FUZZ") == "long"
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_FRESH = int(_RUN_ID, 16) % 2**31 if _RUN_ID else random.randrange(2**31)
RANDOM_SEED = int(os.environ.get("PGK_FUZZ_SEED", _FRESH if _LONG else 20261204))
RANDOM_COUNT = int(os.environ.get("PGK_FUZZ_EXAMPLES", "300")) if _LONG else RANDOM_CI
RANDOM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _random_cases(seed: int, count: int, backend: str = "cpu") -> list[dict]:
    """`count` cases of random shard layouts: 1-3 ranks in a random order, shards of 1 to ~130
    columns (V up to 400, odd and prime sizes alike), every op and dtype, scalar or per-row
    temperatures; their inputs are _random_inputs'. The merge is the same Python on every
    backend; what differs is each rank's partial state, which the C++ kernels give in most cases
    and the Triton ones in a few (interpreted Triton costs ~0.5 s per call). Not the reference
    backend: its single-device op is plain PyTorch, whose error the rule's "2x" cannot tell
    from another plain computation's (its tiny KLs came out 2-3x apart either way)."""
    g = random.Random(seed)
    cases = []
    for i in range(count):
        world = g.randint(1, 3)
        v = g.randint(world, 400 if g.random() < 0.7 else 16)
        cuts = sorted(g.sample(range(1, v), world - 1))
        bounds = [0, *cuts, v]
        shards = [(a, b - a) for a, b in zip(bounds, bounds[1:])]
        g.shuffle(shards)  # ranks hold them out of vocab order
        case = {
            "op": g.choice(("token_stats", "kl_reverse", "kl_forward")),
            "backend": backend,
            "dtype": g.choice(RANDOM_DTYPES),
            "per_row_temperature": g.random() < 0.5,
            "layout": "random",
            "shards": shards,
            "seed": g.randrange(2**31),
        }
        case["name"] = (
            f"random{seed}.{i}-{case['op']}-{backend}-{str(case['dtype'])[6:]}-"
            + "+".join(str(size) for _, size in shards)
        )
        cases.append(case)
    return cases


RANDOM_CASES = _random_cases(RANDOM_SEED, RANDOM_COUNT)
if "triton" in BACKENDS:  # a quarter as many, from the next seed, and the ones found before
    RANDOM_CASES += _random_cases(RANDOM_SEED + 1, max(1, RANDOM_COUNT // 4), "triton")
    # Triton's kl_divergence backward gave NaN gradient rows on the shards that hold almost
    # none of a row's mass (a near one-hot row at tau 0.068: log s1 - log W_r ~ 600 there).
    RANDOM_CASES.append({
        "op": "kl_forward", "backend": "triton", "dtype": torch.float32,
        "per_row_temperature": False, "layout": "random",
        "shards": [(124, 74), (0, 24), (24, 100)], "seed": 1397459190,
        "name": "found1-kl_forward-triton-float32-74+24+100",
    })  # fmt: skip


def _vocab(case: dict) -> int:
    return sum(size for _, size in case["shards"])


def _near_inputs(case: dict) -> dict:
    """Near-equal rows, a student near its teacher: logits ~ N(30, 2^2), the reference the
    logits plus N(0, 0.02^2) noise (KL ~1e-4); row 0 exactly equal (KL 0), row 1 shifted by 3.
    token_stats at tau 0.7 (z ~ 43: a z rounded before a difference carries ulp(z) / 2 = 1.9e-6),
    the KL at per-row temperatures, the same for both sides."""
    v, n = _vocab(case), NEAR_ROWS
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * 2 + 30
    xr = x + torch.randn(n, v, generator=g, dtype=torch.float64) * 0.02
    xr[0] = x[0]
    xr[1] = x[1] + 3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[2], labels[3], labels[4] = IGNORE, 0, v - 1
    acc = torch.float64 if case["dtype"] == torch.float64 else torch.float32
    temperature = (
        (torch.rand(n, generator=g, dtype=torch.float64) * 1.2 + 0.4).to(acc)
        if case["per_row_temperature"]
        else 0.7
    )
    return {
        "logits": x.to(case["dtype"]),
        "ref_logits": xr.to(case["dtype"]),
        "labels": labels,
        "temperature": temperature,
        "ref_temperature": None,
        "weights": torch.randn(4, n, generator=g, dtype=torch.float64).to(acc),
    }


def _inputs(case: dict) -> dict:
    """Full-vocabulary inputs of a case; rows cover every special case of docs/math.md §8."""
    if case["layout"] in NEAR:
        return _near_inputs(case)
    if case["layout"] == "random":
        return _random_inputs(case)
    if case["layout"] == "peaked":
        return _peaked_inputs(case)
    layout, seed = case["shards"], case["seed"]
    v = _vocab(case)
    g = torch.Generator().manual_seed(seed)
    x = make_logits(N, v, torch.float64, seed=seed)
    xr = x + make_logits(N, v, torch.float64, scale=1.0, seed=seed + 1000)
    first = layout[0]  # rank 0's columns
    # labels on every rank: each rank's first column in rows 0..world-1
    labels = torch.randint(0, v, (N,), generator=g)
    for r, (start, _) in enumerate(layout):
        labels[r] = start
    labels[3] = v - 1
    labels[4] = IGNORE
    inf = float("-inf")
    # row 5: rank 0's shard all -inf in both tensors (an empty partial), the label on it
    # (logprob -inf)
    x[5, first[0] : first[0] + first[1]] = inf
    xr[5, first[0] : first[0] + first[1]] = inf
    labels[5] = first[0]
    # row 1: the max tied between the first and the last rank's shards: argmax is the
    # smaller global id, whichever rank holds it
    x[1, [first[0], layout[-1][0]]] = x[1].amax() + 5
    # row 6: rank 0's shard all -inf in the logits only (forward KL +inf, reverse finite);
    # row 7: in the reference only (reverse KL +inf). token_stats sees an empty shard in row 6.
    x[6, first[0] : first[0] + first[1]] = inf
    xr[7, first[0] : first[0] + first[1]] = inf
    labels[6] = layout[1][0]
    # row 8: a NaN on the last rank's shard: NaN outputs on every rank
    x[8, layout[-1][0]] = float("nan")
    xr[8, layout[-1][0]] = float("nan")
    # row 9: all -inf on every shard in both tensors: NaN outputs and gradient rows
    x[9], xr[9] = inf, inf
    labels[9] = layout[-1][0]
    # row 2: near one-hot on the middle of the vocabulary
    x[2, v // 2] = x[2].amax() + 30
    # row 10: masked whole with a huge finite fill on every shard in both tensors (uniform: KLs
    # 0); row 11: so in the logits only (a uniform p against a real q)
    x[10], xr[10], x[11] = -1e30, -1e30, -1e30
    # row 3 (its label on another rank): the logits masked with -1e30 on rank 0's shard only,
    # the reference not (the reverse KL's weight side without mass there: log W_r and D_r both
    # ~-1e30 / tau cancelled in the merge, a KL of 0.71 for 0.33); row 0 (its label on rank
    # 0): the reference so on the last rank's shard (the forward KL's weight side)
    x[3, first[0] : first[0] + first[1]] = -1e30
    xr[0, layout[-1][0] : layout[-1][0] + layout[-1][1]] = -1e30
    temperature = (
        torch.rand(N, generator=g, dtype=torch.float64) * 1.2 + 0.4
        if case["per_row_temperature"]
        else 0.7
    )
    ref_temperature = temperature * 1.3 if case["per_row_temperature"] else None
    dtype = case["dtype"]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(acc)
        ref_temperature = ref_temperature.to(acc)
    return {
        "logits": x.to(dtype),
        "ref_logits": xr.to(dtype),
        "labels": labels,
        "temperature": temperature,
        "ref_temperature": ref_temperature,
        "weights": torch.randn(4, N, generator=g, dtype=torch.float64).to(acc),
    }


def _peaked_inputs(case: dict) -> dict:
    """One row of 8 logits ~ N(0, 0.5^2), the label's (id 4) raised to 10: p_c ~ 1 - 3e-4,
    lgp ~ 1e-7."""
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(1, 8, generator=g, dtype=torch.float64) * 0.5
    x[0, 4] = 10.0
    acc = torch.float32
    return {
        "logits": x.to(case["dtype"]),
        "ref_logits": x.to(case["dtype"]),
        "labels": torch.tensor([4]),
        "temperature": 1.0,
        "ref_temperature": None,
        "weights": torch.randn(4, 1, generator=g, dtype=torch.float64).to(acc),
    }


def _random_inputs(case: dict) -> dict:
    """A random case's inputs (_random_cases): 1-12 rows of logits ~ N(0, s^2), s log-uniform in
    [1e-3, 1e3]; on some draws a near one-hot row, a max tied across two shards, a run of -inf
    (or of a finite mask: -1e30, fp16's finfo.min; not fp64) that never covers a whole row, one
    row's shard masked whole (an empty partial), an ignore row. The reference: the logits plus
    noise of a drawn size (0: equal rows) and a shift of 3, masked alike, on some draws with one
    more -inf entry (a KL of +inf). Temperatures log-uniform in [0.05, 20], per row or scalar;
    the reference's the same or its own."""
    g = random.Random(case["seed"])
    gen = torch.Generator().manual_seed(case["seed"])
    shards, v, dtype = case["shards"], _vocab(case), case["dtype"]
    n = g.randint(1, 12)
    scale = math.exp(g.uniform(math.log(1e-3), math.log(1e3)))
    x = make_logits(n, v, torch.float64, scale=scale, seed=case["seed"])
    if g.random() < 0.5:
        near_one_hot(x, [g.randrange(n)], gap=g.uniform(5.0, 80.0))
    if len(shards) >= 2 and g.random() < 0.5:  # the max tied across two shards
        r, (a, b) = g.randrange(n), g.sample(shards, 2)
        x[r, [a[0], b[0] + b[1] - 1]] = x[r].amax() + g.uniform(0.0, 3.0)
    masked = torch.zeros(n, v, dtype=torch.bool)
    if v >= 2 and g.random() < 0.5:  # a run, never the whole row
        r, a = g.randrange(n), g.randrange(v - 1)
        masked[r, a : g.randint(a + 1, v if a > 0 else v - 1)] = True
    if len(shards) >= 2 and g.random() < 0.3:  # one row's shard masked whole
        r, (start, size) = g.randrange(n), g.choice(shards)
        masked[r, start : start + size] = True
        masked[r, (start + size) % v] = False  # another shard's column: the row keeps one
    fill = float("-inf")
    if dtype != torch.float64 and g.random() < 0.5:
        fill = torch.finfo(dtype).min if dtype == torch.float16 else -1e30
    x[masked] = fill
    labels = torch.randint(0, v, (n,), generator=gen)
    on_mask = masked.gather(1, labels[:, None])[:, 0]
    labels[on_mask] = x[on_mask].argmax(-1)  # labels on unmasked logits
    if n >= 2 and g.random() < 0.5:
        labels[g.randrange(n)] = IGNORE
    noise = g.choice((0.0, 1e-3, 0.1, 1.0, 5.0))
    xr = x + torch.randn(n, v, generator=gen, dtype=torch.float64) * noise + 3.0
    xr[masked] = fill
    if v >= 2 and g.random() < 0.25:  # one more -inf entry in the reference, not a whole row
        r = g.randrange(n)
        free = (~masked[r]).nonzero().flatten().tolist()
        if len(free) >= 2:
            xr[r, g.choice(free)] = float("-inf")
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def temperature():
        log_t = (math.log(0.05), math.log(20.0))
        if not case["per_row_temperature"]:
            return math.exp(g.uniform(*log_t))
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        return (u * (log_t[1] - log_t[0]) + log_t[0]).exp().to(acc)

    return {
        "logits": x.to(dtype),
        "ref_logits": xr.to(dtype),
        "labels": labels,
        "temperature": temperature(),
        "ref_temperature": temperature() if g.random() < 0.5 else None,
        "weights": torch.randn(4, n, generator=gen, dtype=torch.float64).to(acc),
    }


def _shard(t: torch.Tensor, layout: list, rank: int) -> torch.Tensor:
    start, size = layout[rank]
    return t[..., start : start + size]


def _run(op: str, logits, ref_logits, inputs: dict, **kw):
    """Forward + backward of one case on (local or full) logits: (outputs, grads)."""
    logits = logits.detach().clone().requires_grad_()
    ref_logits = ref_logits.detach().clone().requires_grad_()
    w = inputs["weights"]
    if op == "token_stats":
        fn = kw.pop("fn")
        out = fn(logits, inputs["labels"], temperature=inputs["temperature"], **kw)
        loss = sum((w[i] * getattr(out, f)).nansum() for i, f in enumerate(TS_DIFF))
        (grad,) = torch.autograd.grad(loss, [logits])
        return {f: getattr(out, f) for f in TS_FIELDS}, {"logits": grad}
    fn = kw.pop("fn")
    kl = fn(
        logits, ref_logits, direction=op[3:], temperature=inputs["temperature"],
        ref_temperature=inputs["ref_temperature"], labels=inputs["labels"], **kw,
    )  # fmt: skip
    loss = (w[0] * kl).nansum()
    grad, grad_ref = torch.autograd.grad(loss, [logits, ref_logits])
    return {"kl": kl}, {"logits": grad, "ref_logits": grad_ref}


def _errors(rank: int, world: int) -> dict[str, str]:
    """The messages of bad calls, on every rank (each must raise, none may hang)."""
    x = torch.randn(2, 4 + rank)  # uneven shards: 4 and 5 columns
    labels = torch.tensor([0, 3])
    got = {}
    calls = {
        "overlap": lambda: parallel.token_stats(x, labels, vocab_start_index=0),
        # default start rank * V_local = 5 for rank 1 leaves a gap at 4
        "gap": lambda: parallel.token_stats(x, labels),
        "label": lambda: parallel.token_stats(x, torch.tensor([0, 9]), vocab_start_index=4 * rank),
        # the position in the labels' own shape, as the single-device op names it (was flat)
        "label_2d": lambda: parallel.token_stats(
            x.view(2, 1, -1), torch.tensor([[0], [9]]), vocab_start_index=4 * rank
        ),
        "start_type": lambda: parallel.token_stats(x, labels, vocab_start_index=1.0),
        "start_negative": lambda: parallel.kl_divergence(x, x, vocab_start_index=-1),
    }
    for name, call in calls.items():
        try:
            call()
            got[name] = "no error"
        except (ValueError, TypeError) as e:
            got[name] = f"{type(e).__name__}: {e}"
    return got


SUBGROUP = {0: (0, 4), 2: (4, 5)}  # world rank -> (start, size) in a group of ranks 0 and 2


def _subgroup_inputs():
    x = make_logits(4, 9, seed=7)
    xr = make_logits(4, 9, seed=8)
    return x, xr, torch.tensor([0, 8, 4, IGNORE])


def _subgroup(rank: int):
    """token_stats and kl_divergence over a group that leaves out rank 1."""
    group = dist.new_group([0, 2])  # every rank of the world takes part in creating it
    if rank not in SUBGROUP:  # its handle is an int: the error says so, not "got int"
        try:
            parallel.token_stats(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long), group=group)
        except ValueError as e:
            return str(e)
        return "no error"
    x, xr, labels = _subgroup_inputs()
    start, size = SUBGROUP[rank]
    cols = slice(start, start + size)
    # leading dims [2, 2]; the column slice is a strided view, read in place
    x, xr, labels = x.view(2, 2, 9)[..., cols], xr.view(2, 2, 9)[..., cols], labels.view(2, 2)
    stats = parallel.token_stats(x, labels, group=group, vocab_start_index=start)
    kl = parallel.kl_divergence(x, xr, group=group, vocab_start_index=start, labels=labels)
    return {"lse": stats.lse, "logprob": stats.logprob, "argmax": stats.argmax, "kl": kl}


def _slime_inputs():
    g = torch.Generator().manual_seed(9)
    x = make_logits(5, 12, seed=9)
    tokens = torch.tensor([0, 11, 5, 6, 3])
    return x, tokens, torch.rand(5, 12, generator=g) < 0.4


def _slime(rank: int):
    """slime's drop-in with a 2-rank tensor-parallel group: equal shards of 6 columns."""
    x, tokens, keep = _slime_inputs()
    cols = slice(6 * rank, 6 * rank + 6)
    out = {}
    for name, mask in (("plain", None), ("masked", keep[:, cols])):
        local = x[:, cols].clone().requires_grad_()
        lp, ent = slime.calculate_log_probs_and_entropy(
            local, tokens, dist.group.WORLD, with_entropy=True, log_prob_keep_mask=mask
        )
        (lp.sum() + 0.5 * ent.sum()).backward()
        out[name] = {"logprob": lp.detach(), "entropy": ent.detach(), "grad": local.grad}
    return out


# Finding (9) on shards: rows with a dominant weight entry (`dominant_entry_rows`, V = 4000),
# that entry on rank 0 of two and on the last of three shards held out of vocab order.
DOMINANT_V = 4000
DOMINANT_SHARDS = {2: [(0, 2000), (2000, 2000)], 3: [(2000, 2000), (0, 100), (100, 1900)]}
assert DOMINANT_SHARDS[3][2][0] <= DOMINANT_COLUMN < sum(DOMINANT_SHARDS[3][2])


def _dominant_cases():
    """(backend, direction, dtype, tau): interpreted Triton in fp32 only (~1 s per call)."""
    for backend in BACKENDS:
        if backend == "reference":
            continue
        dtypes = (torch.float32, torch.bfloat16) if backend == "cpu" else (torch.float32,)
        for direction in ("reverse", "forward"):
            for dtype in dtypes:
                for tau in (1.0, 0.7):
                    yield backend, direction, dtype, tau


def _dominant_inputs(direction, dtype):
    """(logits, ref_logits) of `dominant_entry_rows`, its w side the KL's weighting side."""
    w, other = dominant_entry_rows(DOMINANT_V)
    x, xr = (w, other) if direction == "reverse" else (other, w)
    return x.to(dtype), xr.to(dtype)


def _dominant(rank: int, world: int) -> dict:
    """Each case's weighting-side gradient shard on this rank."""
    start, size = DOMINANT_SHARDS[world][rank]
    out = {}
    for backend, direction, dtype, tau in _dominant_cases():
        x, xr = (t[:, start : start + size].clone().requires_grad_() for t in
                 _dominant_inputs(direction, dtype))  # fmt: skip
        kl = parallel.kl_divergence(
            x, xr, direction=direction, temperature=tau, vocab_start_index=start, backend=backend
        )
        grads = torch.autograd.grad(kl.sum(), (x, xr))
        out[backend, direction, dtype, tau] = grads[0 if direction == "reverse" else 1]
    return out


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous, not a TCP port: a port probed free can be taken by another process
    # before rank 0 listens on it (EADDRINUSE under a parallel test run).
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        results = {}
        for case in torch.load(Path(folder) / "cases.pt", weights_only=False):
            inputs, layout = case["inputs"], case["shards"]
            fn = parallel.token_stats if case["op"] == "token_stats" else parallel.kl_divergence
            local = _shard(inputs["logits"], layout, rank)
            local_ref = _shard(inputs["ref_logits"], layout, rank)
            kw = {"fn": fn, "backend": case["backend"], "vocab_start_index": layout[rank][0]}
            out, grads = _run(case["op"], local, local_ref, inputs, **kw)
            again, _ = _run(case["op"], local, local_ref, inputs, **kw)
            results[case["name"]] = {"out": out, "grads": grads, "again": again}
        if world == 2:
            results["errors"] = _errors(rank, world)
            results["slime"] = _slime(rank)
        if world == 3:
            results["subgroup"] = _subgroup(rank)
        if world in DOMINANT_SHARDS:
            results["dominant"] = _dominant(rank, world)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_worlds() -> dict:
    """{world size: [rank 0 results, rank 1 results, ...]} from one spawn per world size."""
    out = {}
    for world in (1, 2, 3):
        with tempfile.TemporaryDirectory(prefix="pgk-parallel-") as folder:
            cases = [
                {**c, "inputs": _inputs(c)}
                for c in CASES + RANDOM_CASES
                if len(c["shards"]) == world
            ]
            torch.save(cases, Path(folder) / "cases.pt")
            mp.spawn(_worker, args=(world, folder), nprocs=world, join=True)
            out[world] = [
                torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world)
            ]
    return out


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    """`_spawn_worlds`, once per test run. Session-scoped: a module fixture is set up again
    whenever a pytest-xdist worker comes back to this module after another's tests (worksteal),
    ~60 s each time. Under xdist the first worker to need it spawns the worlds under a file
    lock in the run's shared temporary folder and the others load its file (every worker
    spawning its own cost ~60 s of one core each; the workers draw the same cases,
    `RANDOM_SEED`)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _spawn_worlds()
    shared = tmp_path_factory.getbasetemp().parent / "pgk-parallel-worlds.pt"
    with FileLock(f"{shared}.lock"):
        if not shared.is_file():
            torch.save(_spawn_worlds(), shared)
        return torch.load(shared, weights_only=False)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _single_and_truth(case: dict, inputs: dict):
    """(single-device op, plain reference at input precision, float64 reference): each
    (outputs, grads) on the full logits."""
    op, backend = case["op"], case["backend"]
    if op == "token_stats":
        fns = (
            lambda *a, **k: pg_kernels.token_stats(*a, backend=backend, **k),
            lambda *a, **k: reference.token_stats(*a, upcast=False, **k),
            lambda *a, **k: reference.token_stats(*a, upcast=True, **k),
        )
    else:
        fns = (
            lambda *a, **k: pg_kernels.kl_divergence(*a, backend=backend, **k),
            lambda *a, **k: reference.kl_divergence(*a, upcast=False, **k),
            lambda *a, **k: reference.kl_divergence(*a, upcast=True, **k),
        )
    return [_run(op, inputs["logits"], inputs["ref_logits"], inputs, fn=fn) for fn in fns]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_single_device_and_reference(worlds, case):
    _check_against_single_device(worlds, case, against_plain=True)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=[c["name"] for c in RANDOM_CASES])
def test_random_layouts(worlds, case):
    """Random shard layouts and inputs (_random_cases, _random_inputs): the outputs bitwise
    equal on every rank and between two calls, argmax the single-device op's, every other
    output and gradient within the project's rule against float64, with the larger error of
    the single-device op and of plain PyTorch at the input precision as "plain": the merge
    adds the roundings of its fp32 partial states (2^-24 of each: a log-prob of -2.3e-4 off by
    2.4e-8, an lgp of 4.2e-5 by 7e-8, where the single-device op's error is ~1e-11), above the
    kernels' error on outputs near 0 but below plain PyTorch's. At these temperatures and
    scales plain PyTorch alone needs tests/test_fuzz.py's floors, which fuzz the kernels."""
    _check_against_single_device(worlds, case, against_plain=False)


def _worse(a: torch.Tensor, b: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Whichever of a and b has the larger error against the truth (finite entries)."""

    def err(t):
        e = (t.detach().double() - truth.detach().double()).abs()
        e = e[torch.isfinite(e)]
        return float(e.max()) if e.numel() else 0.0

    return a if err(a) >= err(b) else b


def _f64_resolution(inputs: dict) -> torch.Tensor:
    """Per row, how far the float64 reference resolves a KL near 0: its log-probs each carry
    ~2^-53 (|z_j| + |lse|) (log_softmax of numbers of size |z|), and a KL of (near-)equal rows
    is a sum of such terms, weighted by the probabilities, that cancel. A merge of equal rows
    at V = 3 gave 7e-33 where the truth read 0.0 (it clamps its own rounding at 0)."""
    tau, tau_ref = inputs["temperature"], inputs["ref_temperature"]
    z = scaled(inputs["logits"], tau, torch.float64)
    zr = scaled(inputs["ref_logits"], tau if tau_ref is None else tau_ref, torch.float64)
    size = torch.logsumexp(z, -1).abs() + torch.logsumexp(zr, -1).abs()
    both = (z.abs() + zr.abs()) * (z.softmax(-1) + zr.softmax(-1))  # masked entries: 0 * inf
    size = size + both.nan_to_num(nan=0.0, posinf=0.0).sum(-1)
    return 8 * torch.finfo(torch.float64).eps * (1 + size.nan_to_num(nan=0.0, posinf=0.0))


def _unshard(layout, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full rows from each rank's shard (`parts` in rank order, `layout` their (start,
    size))."""
    got = torch.cat(parts, dim=-1)
    full = torch.empty_like(got)
    full[:, [c for start, size in layout for c in range(start, start + size)]] = got
    return full


def _check_against_single_device(worlds, case: dict, against_plain: bool) -> None:
    """Every rank's outputs bitwise equal (and between two calls), argmax exact. With
    against_plain, the outputs and the gathered gradient shards as close to the single-device
    op as it is to the float64 truth, and to the truth within the rule against plain PyTorch;
    else to the truth within the rule against the worse of plain PyTorch and the single-device
    op (test_random_layouts)."""
    layout = case["shards"]
    world = len(layout)
    results = [worlds[world][r][case["name"]] for r in range(world)]
    inputs = _inputs(case)
    (single_out, single_grads), (plain_out, plain_grads), (truth_out, truth_grads) = (
        _single_and_truth(case, inputs)
    )
    tol = FORWARD_TOL[case["dtype"]]
    # Forward: every rank's outputs, bitwise equal across ranks and between two calls.
    for name, value in results[0]["out"].items():
        for r in range(world):
            assert torch.equal(_bits(results[r]["out"][name]), _bits(value)), (name, r)
            assert torch.equal(_bits(results[r]["again"][name]), _bits(value)), (name, r)
        assert value.requires_grad == single_out[name].requires_grad, name
        if value.dtype == torch.int64:  # argmax, a global id
            assert torch.equal(value, single_out[name]), (name, value, single_out[name])
            continue
        truth, single, plain = truth_out[name], single_out[name], plain_out[name]
        if against_plain:
            # as close to the single-device op as that op is to the float64 truth
            assert_close_to_truth(f"{name} vs single device", value, single, truth, tol)
            assert_close_to_truth(f"{name} vs float64", value, truth, plain, tol)
        else:
            floor = _f64_resolution(inputs) if name == "kl" else None
            worse = _worse(single, plain, truth)
            assert_close_to_truth(f"{name} vs float64", value, truth, worse, tol, floor=floor)
    # Backward: each rank's gradient is its shard of the single-device gradient.
    finite_rows = torch.isfinite(single_out["kl" if "kl" in single_out else "lse"])
    gtol = GRAD_TOL[case["dtype"]]
    for side, single_grad in single_grads.items():
        full = _unshard(layout, [results[r]["grads"][side] for r in range(world)])
        floor = _kl_grad_floor(case, inputs, side)
        truth, plain = truth_grads[side][finite_rows], plain_grads[side][finite_rows]
        floor_f = None if floor is None else floor[finite_rows]
        if not against_plain:
            worse = _worse(single_grad[finite_rows], plain, truth)
            assert_close_to_truth(
                f"grad {side} vs float64", full[finite_rows], truth, worse, gtol, floor=floor_f,
                per_row=True,
            )
            continue
        # The reference backend's single-device gradient is autograd's, which on +inf KL rows
        # gives NaN where the op's contract keeps the non-weighting side finite: finite rows
        # only there, and against the float64 truth (also autograd) everywhere.
        rows = finite_rows if case["backend"] == "reference" else slice(None)
        assert_close_to_truth(
            f"grad {side} vs single device", full[rows], single_grad[rows],
            truth_grads[side][rows], gtol, floor=None if floor is None else floor[rows],
            per_row=True,
        )  # fmt: skip
        assert_close_to_truth(
            f"grad {side} vs float64", full[finite_rows], truth, plain, gtol, floor=floor_f,
            per_row=True,
        )


NEAR_CASES = [c for c in CASES if c["layout"] in NEAR]
# FORWARD_TOL's 2e-5 relative lets a merge 5x less accurate than the kernels pass (log-probs of
# -16 at tau 0.7 carrying 3.5e-6 where the single-device op's error is 7.7e-7).
AS_SINGLE = Tol(
    2.0**-24, 0.0, "2x the single-device op's largest error vs float64, + the output's ulp / 2"
)


@pytest.mark.parametrize("case", NEAR_CASES, ids=[c["name"] for c in NEAR_CASES])
def test_near_equal_rows_as_accurate_as_single_device(worlds, case):
    """Near-equal rows (_near_inputs): the merge adds no error of its own to the kernels'.
    The KL within 2x of the single-device op's error (the old merge, c - log S_w + log S_v from
    fp32 log s1, carried ~1e-7 absolutely on KLs of ~1e-4), exactly 0 on the equal row;
    token_stats' log-prob and entropy likewise (the old merge rounded x_max / tau before
    differences, and added log w_r to the shard's rounded log-prob)."""
    world = len(case["shards"])
    results = [worlds[world][r][case["name"]]["out"] for r in range(world)]
    inputs = _inputs(case)
    (single_out, _), _, (truth_out, _) = _single_and_truth(case, inputs)
    if case["op"] == "token_stats":
        for name in ("logprob", "entropy"):
            assert_close_to_truth(
                f"{name} vs float64 ('plain': the single-device op)", results[0][name],
                truth_out[name], single_out[name], AS_SINGLE,
            )  # fmt: skip
        return
    assert float(single_out["kl"][0].detach()) == 0.0
    for r in range(world):
        got = float(results[r]["kl"][0].detach())
        assert got == 0.0, f"rank {r}: KL {got!r} of an exactly equal row"
    assert_close_to_truth(
        "kl vs float64 ('plain': the single-device op)",
        results[0]["kl"],
        truth_out["kl"],
        single_out["kl"],
        AS_SINGLE,
    )


def _kl_grad_floor(case: dict, inputs: dict, side: str) -> torch.Tensor | None:
    """The rounding bound of the weighting side's gradient g w_j ((d_w,j - d_v,j) - c'), the
    single-device op's (tests/test_kl_divergence.py::_kl_grad_floor): ~ulp(|log w_j - log v_j|
    + KL) per unit weight, as c' and (d_w,j - d_v,j) are rounded apart and cancel to
    log w_j - log v_j - KL. The shard merge forms c' in fp64 from shard-relative states and
    rounds it once, so it keeps to the same bound: 4 epsilons of the accumulation dtype times
    that size, per entry. None off the weighting side.
    """
    op = case["op"]
    if op == "token_stats" or (side == "logits") != (op == "kl_reverse"):
        return None
    tau = inputs["temperature"]
    tau_ref = inputs["ref_temperature"] if inputs["ref_temperature"] is not None else tau

    zp = scaled(inputs["logits"], tau, torch.float64)
    zq = scaled(inputs["ref_logits"], tau_ref, torch.float64)
    zw, zv = (zp, zq) if op == "kl_reverse" else (zq, zp)
    lw, lv = zw.log_softmax(-1), zv.log_softmax(-1)
    # clamped: the float64 sum of equal rows can be -1e-17, and a negative floor fails exact
    # zeros
    kl = (lw.exp() * (lw - lv)).nan_to_num().sum(-1, keepdim=True).clamp_min(0)
    size = (lw - lv).abs() + kl
    g = inputs["weights"][0].double().abs().unsqueeze(-1)
    eps = torch.finfo(torch.float64 if case["dtype"] == torch.float64 else torch.float32).eps
    return (4 * eps * g * lw.exp() * size.nan_to_num(posinf=0.0)).nan_to_num()


def _weight_grad(x, xr, arg, **kw):
    x, xr = x.clone().requires_grad_(), xr.clone().requires_grad_()
    return torch.autograd.grad(reference.kl_divergence(x, xr, **kw).sum(), (x, xr))[arg]


@pytest.mark.parametrize("world", sorted(DOMINANT_SHARDS))
def test_dominant_entry_gradient_across_shards(worlds, world):
    """Finding (9) on vocab-parallel shards: the weighting side's gradient at the dominant
    entry of a row whose rest is below fp32's ulp(1) / 2 (truth ~rest x |log-ratio|). A shard
    does not sum to 0 alone; the entry is minus the sum of the row's others, those on the other
    ranks from the gathered states (`_outside_terms`). With the direct form it was 2.7e-6 off at
    tau 0.7 (fp32, every world size), where plain fp32 PyTorch is 3.0e-6 off and the rule's
    bound (`assert_dominant_entry`) 1e-10; now 1e-11 (C++) and 1e-11 (Triton)."""
    layout = DOMINANT_SHARDS[world]
    for key in _dominant_cases():
        backend, direction, dtype, tau = key
        ours = _unshard(layout, [worlds[world][r]["dominant"][key] for r in range(world)])
        x, xr = _dominant_inputs(direction, dtype)
        arg = 0 if direction == "reverse" else 1
        kw = {"direction": direction, "temperature": tau}
        truth = _weight_grad(x.double(), xr.double(), arg, **kw)
        plain = _weight_grad(x.float(), xr.float(), arg, upcast=False, **kw)
        lp, lq = (scaled(t, tau, torch.float64).log_softmax(-1) for t in (x, xr))
        lw, lv = (lp, lq) if direction == "reverse" else (lq, lp)
        assert_dominant_entry(ours, truth, plain, lw, lv, dtype, key)


def test_subgroup(worlds):
    x, xr, labels = _subgroup_inputs()
    stats = pg_kernels.token_stats(x, labels)
    kl = pg_kernels.kl_divergence(x, xr, labels=labels)
    assert worlds[3][1]["subgroup"] == "parallel.token_stats: this process is not a member of group"
    for rank in SUBGROUP:
        got = worlds[3][rank]["subgroup"]
        for name in ("lse", "logprob"):
            want = getattr(stats, name).view(2, 2)
            torch.testing.assert_close(got[name], want, rtol=2e-6, atol=1e-6)
        assert torch.equal(got["argmax"], stats.argmax.view(2, 2))
        torch.testing.assert_close(got["kl"], kl.view(2, 2), rtol=2e-6, atol=1e-6)


def test_slime_tensor_parallel(worlds):
    """slime's call with a tp group: each rank's log-prob, entropy and gradient shard equal the
    single-device drop-in's, with and without a top-p keep-mask (its shard per rank)."""
    x, tokens, keep = _slime_inputs()
    for name, mask in (("plain", None), ("masked", keep)):
        full = x.clone().requires_grad_()
        lp, ent = slime.calculate_log_probs_and_entropy(
            full, tokens, None, with_entropy=True, log_prob_keep_mask=mask
        )
        (lp.sum() + 0.5 * ent.sum()).backward()
        for rank in (0, 1):
            got = worlds[2][rank]["slime"][name]
            torch.testing.assert_close(got["logprob"], lp.detach(), rtol=2e-6, atol=2e-6)
            torch.testing.assert_close(got["entropy"], ent.detach(), rtol=2e-6, atol=2e-6)
            cols = slice(6 * rank, 6 * rank + 6)
            torch.testing.assert_close(got["grad"], full.grad[:, cols], rtol=2e-6, atol=2e-6)


def test_errors_name_the_argument(worlds):
    for got in (worlds[2][0]["errors"], worlds[2][1]["errors"]):
        assert got["overlap"].startswith("ValueError") and "vocab_start_index" in got["overlap"]
        assert "an overlap" in got["overlap"], got["overlap"]
        assert got["gap"].startswith("ValueError") and "a gap at global id 4" in got["gap"]
        assert got["label"].startswith("ValueError") and "labels[1] = 9" in got["label"]
        assert "labels[1, 0] = 9" in got["label_2d"], got["label_2d"]
        assert (
            got["start_type"].startswith("TypeError") and "vocab_start_index" in got["start_type"]
        )
        assert got["start_negative"].startswith("ValueError")
        assert "vocab_start_index" in got["start_negative"]


def test_argmax_beyond_2_24_ids_is_exact():
    """The merge rebuilds a global id from its two fp32 digits in int64: in fp32, 2^24 + 1
    rounded to 2^24 (the tie-break compared the rounded ids too)."""
    # the module, not the function of the same name that pg_kernels.parallel exports
    pts = importlib.import_module("pg_kernels.parallel.token_stats")
    big = 2**24 + 1
    gathered = torch.zeros(2, 1, pts.COLUMNS)
    gathered[..., pts.MAX_PROB] = 0.5
    gathered[0, 0, pts.MAX] = 1.0  # rank 0: id 7
    gathered[0, 0, pts.ARG_LO] = 7
    gathered[1, 0, pts.MAX] = 5.0  # rank 1: the max, at id 2^24 + 1
    gathered[1, 0, pts.ARG_HI], gathered[1, 0, pts.ARG_LO] = divmod(big, pts.DIGIT)
    argmax = pts._merge(gathered, 1.0)[5]
    assert argmax.dtype == torch.int64 and argmax.tolist() == [big]
    gathered[0, 0, pts.MAX] = 5.0  # a tie: the smaller id wins, rank order aside
    gathered[0, 0, pts.ARG_HI], gathered[0, 0, pts.ARG_LO] = divmod(big + 2, pts.DIGIT)
    assert pts._merge(gathered, 1.0)[5].tolist() == [big]


def test_kl_merge_of_shards_far_apart():
    """The merge's log sum_r W_r e^{-(D_r - D*)} where the shards' D_r lie far apart, from rows
    random layouts found (bf16, gathered states as the kernels gave them). Referred to the
    least D_r, the sum's terms underflowed: a KL of NaN or 0. D* is now the dominant term's."""
    pkl = importlib.import_module("pg_kernels.parallel.kl_divergence")

    def merge(reverse, **columns):
        gathered = torch.zeros(2, 1, 6, dtype=torch.float64)
        for name, values in columns.items():
            gathered[:, 0, getattr(pkl, name)] = torch.tensor(values, dtype=torch.float64)
        ref_p, ref_q = gathered[..., pkl.M_P], gathered[..., pkl.M_Q]
        kl, delta, _, _ = pkl._merge(gathered, ref_p, ref_q, reverse=reverse)
        assert torch.isfinite(delta).all(), delta
        return float(kl[0]), delta[:, 0].tolist()

    # Forward KL, the reference at tau 0.061 (shard masses e^-6553 and 1), the logits at tau
    # 4.69 (e^-83.5 and 1); each shard's own KL 0. KL = W_1 delta_1 = log1p(e^-83.5) ~ 5e-37.
    kl, delta = merge(False, M_P=[121.00991821289062, 204.5238037109375],
                      M_Q=[9304.7861328125, 15857.4521484375])  # fmt: skip
    assert 0.0 <= kl < 1e-30, kl
    assert abs(delta[0] - (-6552.666 + 83.514)) < 1e-2, delta
    # Reverse KL, shard 1 masked whole with -1e30 on both sides (maxes -1e30 / tau, no mass):
    # the KL is shard 0's own, exactly (its delta 0).
    kl0 = 4.97098517e-05
    kl, delta = merge(True, M_P=[-2.94718575, -1.47396951e30], LS_P=[5.1908288, 4.96981335],
                      M_Q=[0.663442194, -6.66214161e29], LS_Q=[5.21562481, 4.96981335],
                      C=[-0.0247464925, 0.0], KL=[kl0, 0.0])  # fmt: skip
    assert delta[0] == 0.0 and kl == kl0, (kl, delta)


def test_kl_merge_runs_over_all_shards_at_once():
    """The merge and the backward's row states take N-sized operations over all shards at once,
    plus one add per shard for each sum in rank order: 4 in the merge, 2 x 2 for the backward's
    other shards' terms. kl_divergence_from_hidden runs each of its ~40 vocabulary blocks as a
    shard, and per shard they took ~135 operations, ~5000 launches per fwd+bwd on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    pkl = importlib.import_module("pg_kernels.parallel.kl_divergence")
    temp = Temperature(None, 0.7)

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view
            return func(*args, **(kwargs or {}))

    def ops(world):
        g = torch.Generator().manual_seed(world)
        gathered = torch.rand(world, 5, 6, generator=g, dtype=torch.float64)
        with Count() as count:
            merged = pkl.merge_partials(gathered, temp, temp, torch.bfloat16, "cpu", True)
            pkl.shard_backward_states(gathered, merged, torch.float32, True, True)
        return count.ops

    per_shard = (ops(36) - ops(4)) / 32
    assert per_shard <= 8, per_shard


def test_tiling_verdict():
    """The device-side layout check of CUDA tensors (CPU tensors raise instead)."""

    def ok(layout):
        starts, sizes = (torch.tensor(t) for t in zip(*layout))
        return bool(tiling_ok(starts, sizes))

    assert ok([(0, 6), (6, 6)]) and ok([(8, 4), (12, 1), (0, 8)]) and ok([(0, 3)])
    assert not ok([(0, 6), (7, 6)])  # gap
    assert not ok([(0, 6), (5, 6)])  # overlap
    assert not ok([(1, 6), (7, 6)])  # does not start at 0
    assert not ok([(0, 6), (0, 6)])  # two ranks on the same shard


def test_needs_an_initialized_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.token_stats(torch.randn(2, 3), torch.tensor([0, 1]))


def test_kl_merge_of_a_shard_whose_fill_overflows():
    """A side masked with finfo.min on a whole shard under tau < 1: the fill's x / tau leaves
    fp32's range, and the shard kernel reports that side's frame as NaN. Its partial state
    read NaN into the merge (a NaN KL and gradients where the single-device op is finite); it
    is now a side without mass there. Two shards merged in-process, against the single-device
    op on the whole rows, both directions (row 0: the logits masked on the second shard, row 1:
    the reference on the first)."""
    pkl = importlib.import_module("pg_kernels.parallel.kl_divergence")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=g) * 2
    xr = x + torch.randn(2, 8, generator=g) * 0.5
    x[0, 4:] = xr[1, :4] = torch.finfo(torch.float32).min
    for direction in ("reverse", "forward"):
        for tau in (1.0, 0.7):
            temp = make_temperature("kl_divergence", tau, x)
            rows = [
                pkl.shard_rows(x[:, cols], xr[:, cols], None, temp, temp, IGNORE, direction, "cpu")
                for cols in (slice(0, 4), slice(4, 8))
            ]
            gathered = pkl.partial_state(torch.stack(rows)).double()
            merged = pkl.merge_partials(
                gathered, temp, temp, torch.float32, "cpu", direction == "reverse"
            )
            want = pg_kernels.kl_divergence(x, xr, temperature=tau, direction=direction)
            torch.testing.assert_close(merged.kl.float(), want, rtol=2e-7, atol=0)
