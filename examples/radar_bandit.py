"""A softmax-policy bandit beyond LLMs: a frequency-agile radar against a repeater jammer.

Each round the radar transmits on one of K bands, drawn from x_t = softmax(-eta L_t) where L_t
sums loss estimates of past rounds (Hedge / exponential weights: mirror descent on the simplex).
A DRFM repeater jammer jams the band it intercepted in the previous round with power J. The
radar's loss on band a in round t is

    l_t(a) = c_a + e_t(a) + J 1[a = a_{t-1}]         (in [0, 1])

with c_a an unknown per-band interference level and e_t(a) uniform noise. The radar only sees
the loss of the band it used (bandit feedback). Compared:

  - Hedge, full information: sees the whole vector l_t (a reference, not available in practice).
  - Hedge + importance-weighted estimator (Exp3): l^(a) = l_t(a_t) 1[a = a_t] / x_t(a_t).
  - Hedge + jammer-aware unbiased estimator: the jamming term is known for every band (the
    radar knows which band it used last round), only the interference is estimated:
    l^(a) = J 1[a = a_{t-1}] + (l_t(a_t) - J 1[a_t = a_{t-1}]) 1[a = a_t] / x_t(a_t).
    Still unbiased, with less variance: the structure of the jammer is used.
  - Softmax policy gradient (REINFORCE on the logits theta, x_t = softmax(theta)):
    theta <- theta - lr g with g = l_t(a_t) (e_{a_t} - x_t), the score-function estimate of
    grad_theta E[l].

Regret: sum_t <x_t, l_t> - min_a sum_t l_t(a) (against the best fixed band in hindsight on
the realised loss sequence), averaged over seeds.

The policy-gradient estimate has norm |l(a)| sqrt(1 - 2 x_a + sum x^2): the logit-gradient
proxy of `pg_kernels.token_stats` (docs/math.md §§2 and 7). The script checks it against the
gradient norm autograd measures, every round of the policy-gradient run.

    python examples/radar_bandit.py            # default size
    python examples/radar_bandit.py --quick    # seconds; CI
    python examples/radar_bandit.py --out DIR  # where radar_bandit.png / radar_bandit.md go
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from _cli import command_args  # noqa: E402  (this folder, first on sys.path)
from tqdm import tqdm  # noqa: E402

import pg_kernels  # noqa: E402

METHODS = ("hedge_full", "exp3", "hedge_jammer_aware", "softmax_pg")
LABELS = {
    "hedge_full": "Hedge, full information (reference)",
    "exp3": "Hedge + IS estimator (Exp3)",
    "hedge_jammer_aware": "Hedge + jammer-aware unbiased estimator",
    "softmax_pg": "softmax policy gradient (REINFORCE)",
}


def simulate(method: str, K: int, T: int, seeds: int, J: float, noise: float, lr_pg: float):
    """Run `seeds` independent radars in parallel (rows). Returns regret curve [T] per seed
    [seeds, T] and, for softmax_pg, the (proxy, measured) gradient norms of every round."""
    g = torch.Generator().manual_seed(0)
    c = 0.05 + 0.4 * torch.rand(seeds, K, generator=g, dtype=torch.float64)  # interference
    eta_full = math.sqrt(8 * math.log(K) / T)
    eta_bandit = math.sqrt(2 * math.log(K) / (T * K))
    L = torch.zeros(seeds, K, dtype=torch.float64)  # Hedge: cumulative loss estimates
    theta = torch.zeros(seeds, K, dtype=torch.float64)  # softmax PG: the logits
    prev = torch.randint(0, K, (seeds,), generator=g)  # the band the jammer heard last
    rows = torch.arange(seeds)
    exp_loss = torch.zeros(seeds, dtype=torch.float64)
    cum = torch.zeros(seeds, K, dtype=torch.float64)
    regret = torch.zeros(seeds, T, dtype=torch.float64)
    proxy_err = []
    for t in tqdm(range(T), desc=method, leave=False, mininterval=1.0):
        jam = torch.zeros(seeds, K, dtype=torch.float64)
        jam[rows, prev] = J
        eps = noise * (2 * torch.rand(seeds, K, generator=g, dtype=torch.float64) - 1)
        loss = (c + eps + jam).clamp(0, 1)  # [seeds, K]
        eta = eta_full if method == "hedge_full" else eta_bandit
        logits = theta if method == "softmax_pg" else -eta * L
        x = torch.softmax(logits, -1)
        a = torch.multinomial(x, 1, generator=g)[:, 0]
        la = loss[rows, a]
        if method == "hedge_full":
            L += loss
        elif method == "exp3":
            L[rows, a] += la / x[rows, a]
        elif method == "hedge_jammer_aware":
            known = jam[rows, a]
            L += jam
            L[rows, a] += (la - known) / x[rows, a]
        else:
            # g = l(a) grad_theta log x_a, the score-function estimate of grad E[l]
            z = logits.clone().requires_grad_(True)
            logp = torch.log_softmax(z, -1)[rows, a]
            (grad,) = torch.autograd.grad((la * logp).sum(), z)
            measured = grad.norm(dim=-1)
            stats = pg_kernels.token_stats(logits, a)  # lgp = 1 - 2 x_a + sum x^2
            proxy = la.abs() * stats.lgp_norm
            proxy_err.append((proxy, measured, x[rows, a]))
            theta -= lr_pg * grad  # descent on E[l]
        exp_loss += (x * loss).sum(-1)
        cum += loss
        regret[:, t] = exp_loss - cum.min(-1).values
        prev = a
    return regret, proxy_err


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--bands", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--jam", type=float, default=0.5, help="jamming loss J")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--lr-pg", type=float, default=None)
    args = ap.parse_args(argv)
    T = args.rounds or (1000 if args.quick else 20000)
    seeds = args.seeds or (4 if args.quick else 32)
    K = args.bands
    lr_pg = args.lr_pg or math.sqrt(2 * math.log(K) / T) * 4
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    curves, proxy = {}, None
    for m in METHODS:
        regret, pe = simulate(m, K, T, seeds, args.jam, args.noise, lr_pg)
        curves[m] = regret
        if pe:
            proxy = pe
        print(f"{LABELS[m]:<42} regret at T={T}: {float(regret[:, -1].mean()):9.2f}", flush=True)
    total = time.perf_counter() - t0

    p = torch.stack([q[0] for q in proxy])  # [T, seeds]
    meas = torch.stack([q[1] for q in proxy])
    xa = torch.stack([q[2] for q in proxy])
    rel = ((p - meas).abs() / meas.clamp(min=1e-300)).max()
    print("\nsoftmax PG: |l(a)| sqrt(1 - 2 x_a + sum x^2) (token_stats lgp_norm) vs autograd norm")
    print(f"{'round':>7} {'x_a':>8} {'proxy':>12} {'measured':>12}")
    show = [0, 1, 10, 100, T // 2, T - 1]
    for r in show:
        print(f"{r:>7} {float(xa[r, 0]):8.4f} {float(p[r, 0]):12.6e} {float(meas[r, 0]):12.6e}")
    print(f"max relative difference over {T} rounds x {seeds} seeds: {float(rel):.2e}")

    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    steps = torch.arange(1, T + 1, dtype=torch.float64)
    for m in METHODS:
        mean = curves[m].mean(0)
        sd = curves[m].std(0)
        axes[0].plot(steps, mean, label=LABELS[m])
        axes[0].fill_between(steps, mean - sd, mean + sd, alpha=0.15)
    axes[0].plot(
        steps,
        torch.sqrt(2 * steps * K * math.log(K)),
        "k--",
        lw=0.8,
        label="Exp3 bound sqrt(2 t K ln K)",
    )
    axes[0].set(xlabel="round t", ylabel="regret", title=f"regret, K={K} bands, {seeds} seeds")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].loglog(meas.reshape(-1)[::7], p.reshape(-1)[::7], ".", ms=2, alpha=0.4)
    lo, hi = float(meas[meas > 0].min()), float(meas.max())
    axes[1].loglog([lo, hi], [lo, hi], "k--", lw=0.8)
    axes[1].set(
        xlabel="measured gradient norm (autograd)",
        ylabel="|l(a)| sqrt(1 - 2 x_a + sum x^2) (token_stats)",
        title="policy-gradient norm: proxy vs measured",
    )
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    png = os.path.join(args.out, "radar_bandit.png")
    fig.savefig(png, dpi=110)

    cmd = " ".join(["python examples/radar_bandit.py", *command_args(argv)])

    def row(m: str) -> str:
        final = curves[m][:, -1]
        mean, sd = float(final.mean()), float(final.std())
        return f"| {LABELS[m]} | {mean:.1f} ± {sd:.1f} | {mean / math.sqrt(T):.2f} |"

    bound = math.sqrt(2 * T * K * math.log(K))
    lines = [
        "# Radar vs repeater jammer: softmax-policy bandit",
        "",
        f"Command: `{cmd}` (K = {K} bands, T = {T} rounds, {seeds} seeds, J = {args.jam}, "
        f"noise ±{args.noise}, policy-gradient lr {lr_pg:.4f}); total {total:.0f} s.",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        "| method | regret at T (mean ± sd over seeds) | regret / sqrt(T) |",
        "|---|---|---|",
        *[row(m) for m in METHODS],
        f"| (Exp3 upper bound sqrt(2 T K ln K)) | {bound:.1f} | {bound / math.sqrt(T):.2f} |",
        "",
        "Policy-gradient norm check (softmax PG run, every round and seed): "
        f"max |proxy - measured| / measured = {float(rel):.2e}, with proxy = "
        "|l(a)| · token_stats(logits, a).lgp_norm and measured = ||autograd grad||.",
        "",
        "![regret](radar_bandit.png)",
        "",
    ]
    md = "\n".join(lines)
    with open(os.path.join(args.out, "radar_bandit.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
