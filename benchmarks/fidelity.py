"""Numerical fidelity of every op against float64, beside plain PyTorch.

For each op (token_stats, kl_divergence, mismatch_stats, topk_kl, pruned_logprob), each of its
outputs and each gradient, with fp32 and bf16 logits at temperature 1 and 0.7, the max abs error
(and the max relative error of the per-row outputs, over rows where |truth| > 1e-3) against the
float64 reference
(pg_kernels.reference, upcast=True) of:
    pg_kernels    the op on `--backend` (default cpu)
    torch         plain PyTorch at the input precision (the reference's formulas in the logits'
                  dtype: bf16 math for bf16 logits)
    torch fp32    plain PyTorch upcast to fp32 (the reference with upcast=False)
mismatch_stats gets the rollout engine's logits (the reference logits), so its exact token_kl
and token_tv are measured too. Gradients are those of sum(w * output) for a fixed random w per
output, w.r.t. the logits (and the reference logits for kl_divergence), in the logits' dtype
(the truth's in float64), so bf16 rows include the bf16 rounding of the gradient itself (~2^-9
relative).

Inputs: realistic peaked logits, randn * 4 with a spike of +5..15 on half of the rows, labels
sampled from the float64 softmax at the temperature (as a rollout samples them).

    python benchmarks/fidelity.py [--rows 256] [--vocab 32000] [--backend cpu] [--save]

Prints a markdown table; writes benchmarks/out/fidelity.{json,md} (and with --save
benchmarks/results/<machine>/fidelity.{json,md}); another backend's files are named
fidelity_<backend>. Without a GPU, `--backend triton` runs the Triton kernels under the
interpreter (TRITON_INTERPRET=1) with a GPU's arithmetic (PGK_EMULATE_GPU=1, as the tests do):
    TRITON_INTERPRET=1 PGK_EMULATE_GPU=1 python benchmarks/fidelity.py --backend triton --rows 64
On a GPU: `--backend triton --device cuda`, and `--backend cuda --device cuda --ops token_stats`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the working tree's pg_kernels, not an installed one

import torch  # noqa: E402

import pg_kernels  # noqa: E402
from benchmarks.harness import device_name, git_state, versions  # noqa: E402
from pg_kernels import reference  # noqa: E402
from pg_kernels.testing import peaked_logits  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURES = (1.0, 0.7)
TOPK = 20
ALPHA = 1e-4
# Per-row outputs whose relative error is reported, over the rows where |truth| > REL_FLOOR
# (a KL of 1e-6 or a log-prob of -1e-5 on a peaked row has no meaningful relative error).
RELATIVE = {"logprob", "entropy", "collision", "lse", "max_prob", "kl", "ratio"}
REL_FLOOR = 1e-3


_REFERENCE_MODULES = ("token_stats", "kl_divergence", "mismatch_stats", "topk_kl", "pruned_logprob")


@contextlib.contextmanager
def input_precision():
    """The references' formulas computed in the logits' own dtype instead of fp32 when
    upcast=False: what a trainer's plain PyTorch does with bf16 logits."""
    modules = [sys.modules[f"pg_kernels.reference.{n}"] for n in _REFERENCE_MODULES]
    saved = [(m, m.compute_dtype) for m in modules]

    def compute_dtype(dtype, upcast):
        return torch.float64 if upcast or dtype == torch.float64 else dtype

    try:
        for m, _ in saved:
            m.compute_dtype = compute_dtype
        yield
    finally:
        for m, f in saved:
            m.compute_dtype = f


def make_inputs(n: int, v: int, dtype: torch.dtype, tau: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = peaked_logits(n, v, g)
    logits = x.to(dtype)
    z = logits.double() / tau
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    # A second policy near the first (reference / rollout engine): small logit noise.
    ref = (logits.double() + torch.randn(n, v, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    ref_logp = torch.log_softmax(ref.double() / tau, -1)
    rollout_logprobs = ref_logp.gather(1, labels[:, None]).squeeze(1).float()
    topk_logprobs, topk_ids = ref_logp.topk(TOPK, -1)
    return {
        "logits": logits,
        "ref_logits": ref,
        "labels": labels,
        "rollout_logprobs": rollout_logprobs,
        "topk_ids": topk_ids,
        "topk_logprobs": topk_logprobs.float(),
    }


# op -> (call(impl, inputs, tau) -> dict of outputs, differentiable outputs, grad leaves)
def _token_stats(fn, d, tau, **kw):
    out = fn(d["logits"], d["labels"], temperature=tau, **kw)
    names = ("logprob", "entropy", "collision", "lse", "lgp", "max_prob")
    return {k: getattr(out, k) for k in names}


def _kl(fn, d, tau, **kw):
    return {"kl": fn(d["logits"], d["ref_logits"], temperature=tau, **kw)}


def _mismatch(fn, d, tau, **kw):
    # With the rollout engine's logits (the second policy): the exact token KL and TV too.
    out = fn(d["logits"], d["labels"], d["rollout_logprobs"], rollout_logits=d["ref_logits"],
             temperature=tau, **kw)  # fmt: skip
    names = ("logprob", "log_ratio", "ratio", "k3", "token_kl", "token_tv")
    return {k: getattr(out, k) for k in names}


def _topk(fn, d, tau, **kw):
    return {"kl": fn(d["logits"], d["topk_ids"], d["topk_logprobs"], temperature=tau, **kw)}


def _pruned(fn, d, tau, **kw):
    out = fn(d["logits"], d["labels"], alpha=ALPHA, temperature=tau, **kw)
    return {"logprob": out.logprob, "tail_mass": out.tail_mass}


OPS = {
    "token_stats": (_token_stats, ("logprob", "entropy", "collision", "lse"), ("logits",)),
    "kl_divergence": (_kl, ("kl",), ("logits", "ref_logits")),
    "mismatch_stats": (_mismatch, ("logprob",), ("logits",)),
    "topk_kl": (_topk, ("kl",), ("logits",)),
    "pruned_logprob": (_pruned, ("logprob",), ("logits",)),
}


def run_impl(op: str, impl: str, d: dict, tau: float, backend: str, weights: dict) -> dict:
    """Outputs (float64) and gradients (float64) of one implementation."""
    call, diff, leaves = OPS[op]
    d = dict(d)
    for name in leaves:
        # The truth differentiates float64 copies (the same values), so that its gradient is not
        # rounded to the logits' dtype; the others get gradients in the logits' dtype.
        leaf = d[name].detach().clone()
        d[name] = (leaf.double() if impl == "float64" else leaf).requires_grad_()
    if impl == "pg_kernels":
        outs = call(getattr(pg_kernels, op), d, tau, backend=backend)
    else:
        ref = getattr(reference, op)
        ctx = input_precision() if impl == "torch" else contextlib.nullcontext()
        with ctx:
            outs = call(ref, d, tau, upcast=impl == "float64")
    result = {k: v.detach().double() for k, v in outs.items()}
    for k in diff:
        w = weights[k]
        grads = torch.autograd.grad(
            (outs[k].double() * w).sum(), [d[n] for n in leaves], retain_graph=True
        )
        for n, gr in zip(leaves, grads):
            result[f"d{k}/d{n}"] = gr.double()
    return result


def errors(out: torch.Tensor, truth: torch.Tensor, relative: bool) -> tuple[float, float | None]:
    finite = torch.isfinite(truth)
    err = (out - truth).abs()[finite]
    abs_err = err.max().item() if err.numel() else 0.0
    if not relative:
        return abs_err, None
    t = truth.abs()[finite]
    big = t > REL_FLOOR
    rel = (err[big] / t[big]).max().item() if big.any() else None
    return abs_err, rel


def measure(n: int, v: int, backend: str, ops=tuple(OPS), device: str = "cpu") -> list[dict]:
    """Every record of `ops`; the inputs drawn on the CPU (the same on every device), then moved
    to `device`, where all three implementations and the float64 truth run."""
    records = []
    seed = 0
    for op in OPS:
        for dname, dtype in DTYPES.items():
            for tau in TEMPERATURES:
                seed += 1  # per (op, dtype, T) whatever `ops` holds: the same inputs
                if op not in ops:
                    continue
                d = {k: t.to(device) for k, t in make_inputs(n, v, dtype, tau, seed=seed).items()}
                g = torch.Generator().manual_seed(7)
                weights = {
                    k: torch.randn(n, generator=g, dtype=torch.float64).to(device)
                    for k in OPS[op][1]
                }
                res = {
                    impl: run_impl(op, impl, d, tau, backend, weights)
                    for impl in ("float64", "pg_kernels", "torch fp32")
                }
                # fp32 logits: PyTorch at the input precision is the fp32 upcast itself.
                same = dtype == torch.float32
                res["torch"] = (
                    res["torch fp32"] if same else run_impl(op, "torch", d, tau, "", weights)
                )
                truth = res["float64"]
                for key in truth:
                    rec = {"op": op, "dtype": dname, "temperature": tau, "quantity": key}
                    rel = key in RELATIVE
                    for impl in ("pg_kernels", "torch", "torch fp32"):
                        a, r = errors(res[impl][key], truth[key], rel)
                        rec[impl] = {"abs": a, "rel": r}
                    records.append(rec)
    return records


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def markdown(records: list[dict], backend: str) -> str:
    lines = [
        f"| op | dtype | T | quantity | pg_kernels ({backend}) abs | torch abs | torch fp32 abs "
        "| pg_kernels rel | torch rel | torch fp32 rel |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        cells = [r["op"], r["dtype"], f"{r['temperature']:g}", r["quantity"]]
        cells += [_fmt(r[i]["abs"]) for i in ("pg_kernels", "torch", "torch fp32")]
        cells += [_fmt(r[i]["rel"]) for i in ("pg_kernels", "torch", "torch fp32")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU backend's tensors)")
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS),
                    help="the ops to measure (CUDA has token_stats only)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--save", action="store_true", help="also write benchmarks/results/<machine>/")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="the output folder")
    ap.add_argument("--machine", default=None, help="results folder name (default: from the CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    records = measure(args.rows, args.vocab, args.backend, tuple(args.ops), args.device)
    seconds = time.perf_counter() - t0
    commit, dirty = git_state()
    meta = {
        "command": "python benchmarks/fidelity.py " + " ".join(argv or sys.argv[1:]),
        "rows": args.rows,
        "vocab": args.vocab,
        "backend": args.backend,
        "environment": {
            k: os.environ[k] for k in ("TRITON_INTERPRET", "PGK_EMULATE_GPU") if k in os.environ
        },
        "device": device_name(torch.device(args.device)),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(seconds, 1),
        "commit": commit,
        "dirty": dirty,
        "versions": versions(),
    }
    header = (
        f"Max error against float64 ({args.rows} x {args.vocab} peaked logits; relative error "
        f"over rows with |truth| > {REL_FLOOR:g}; {meta['device']}; "
        f"{meta['date']}; commit {commit}{' (dirty)' if dirty else ''}; {seconds:.0f} s"
        + "".join(f"; {k}={v}" for k, v in meta["environment"].items())
        + ").\n\n"
    )
    md = header + markdown(records, args.backend)
    print(md)
    dirs = [Path(args.out)]
    if args.save:
        dirs.append(ROOT / "benchmarks" / "results" / (args.machine or _machine_tag(args.device)))
    for out in dirs:
        out.mkdir(parents=True, exist_ok=True)
        name = "fidelity" if args.backend == "cpu" else f"fidelity_{args.backend}"
        (out / f"{name}.md").write_text(md)
        (out / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        print(f"wrote {out / name}.md and {name}.json")


def _machine_tag(device: str) -> str:
    """A results folder name: from the CPU model and core count, e.g. cpu-intel-xeon-2core, or
    the GPU's name, e.g. nvidia-h200."""
    if device != "cpu":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    model = device_name(torch.device("cpu")).rsplit(",", 1)[0].lower()
    words = re.sub(r"\(r\)|\(tm\)|processor|cpu|@.*", " ", model).split()
    slug = "-".join(re.sub(r"[^a-z0-9]+", "", w) for w in words[:3])
    return f"cpu-{slug}-{os.cpu_count()}core"


if __name__ == "__main__":
    main()
