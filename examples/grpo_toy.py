"""GRPO on a verifiable toy task, on CPU: mean baseline (N = 4, N = 16) vs the Optimal Token
Baseline (N = 4).

Task ("digit sum"): the prompt is one token naming a target s in [TARGET_LO, TARGET_HI]; the
policy writes up to MAX_LEN digits 0-9 and may stop early with EOS. Reward 1 if the digits sum
to s exactly, else 0 (checked by a program: verifiable). Responses have variable lengths.

Policy: a 2-layer causal transformer in plain torch (40k parameters). Each step samples N
responses for each of P prompts, computes log-prob / entropy / logit-gradient proxy of the
sampled tokens in one pass with `pg_kernels.token_stats` (the C++ kernel on CPU), the
advantages with `group_advantages` (mean baseline, "dr_grpo") or `otb_advantages`, and takes one
Adam step on `policy_loss` (on-policy: old log-probs = current ones, token-mean).

Logged per step: mean reward, and two gradient-size measures: the logit-gradient variance proxy
sum_t A_t^2 lgp_t per sequence (the quantity OTB's baseline minimises, up to the cumulative
weighting) and the measured parameter-gradient norm.

    python examples/grpo_toy.py              # default size (5 seeds x 3 configs)
    python examples/grpo_toy.py --quick      # seconds; CI
    python examples/grpo_toy.py --out DIR    # where grpo_toy.png / grpo_toy.md go
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

# Run from anywhere: the checkout's pg_kernels comes first (not an installed copy).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from _cli import command_args  # noqa: E402  (this folder, first on sys.path)
from tqdm import tqdm  # noqa: E402

import pg_kernels  # noqa: E402
from pg_kernels.algorithms import group_advantages, otb_advantages, policy_loss  # noqa: E402

DIGITS = 10
EOS = 10
TARGET_LO, TARGET_HI = 5, 20
N_TARGETS = TARGET_HI - TARGET_LO + 1
VOCAB = 11 + N_TARGETS  # digits, EOS, one token per target
OUT_VOCAB = 11  # the policy only ever emits digits or EOS
MAX_LEN = 5


class TinyPolicy(nn.Module):
    def __init__(self, d: int = 48, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(MAX_LEN + 1, d)
        layer = nn.TransformerEncoderLayer(
            d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, OUT_VOCAB)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] token ids -> logits [B, L, OUT_VOCAB] for the next token."""
        L = seq.shape[1]
        h = self.tok(seq) + self.pos(torch.arange(L))
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        return self.head(self.body(h, mask=causal, is_causal=True))


@torch.no_grad()
def sample(policy: TinyPolicy, prompts: torch.Tensor, greedy: bool = False):
    """Autoregressive sampling. Returns responses [B, MAX_LEN] (EOS-terminated, then -100)."""
    B = prompts.shape[0]
    seq = prompts[:, None]
    done = torch.zeros(B, dtype=torch.bool)
    out = torch.full((B, MAX_LEN), -100, dtype=torch.int64)
    for t in range(MAX_LEN):
        logits = policy(seq)[:, -1]
        nxt = logits.argmax(-1) if greedy else torch.multinomial(logits.softmax(-1), 1)[:, 0]
        out[:, t] = torch.where(done, -100, nxt)
        done = done | (nxt == EOS)
        seq = torch.cat([seq, torch.where(done & (nxt != EOS), EOS, nxt)[:, None]], 1)
    return out


def reward(prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    target = prompts - 11 + TARGET_LO
    digits = torch.where((responses >= 0) & (responses < DIGITS), responses, 0)
    return (digits.sum(1) == target).to(torch.float32)


@dataclass
class RunResult:
    rewards: list
    proxy: list
    grad_norm: list
    greedy_acc: float
    seconds: float
    cpu_seconds: float


def batch_loss(policy, method, n, prompts_per_step, entropy_coef):
    """Sample one batch and build its loss. Returns (loss, rewards [B], proxy per sequence)."""
    prompts = torch.randint(11, 11 + N_TARGETS, (prompts_per_step,)).repeat_interleave(n)
    group_ids = torch.arange(prompts_per_step).repeat_interleave(n)
    responses = sample(policy, prompts)
    R = reward(prompts, responses)
    inp = torch.cat([prompts[:, None], responses.clamp(min=0)[:, :-1]], 1)
    logits = policy(inp)  # [B, MAX_LEN, V]: position t predicts response token t
    stats = pg_kernels.token_stats(logits, responses)  # C++ kernel on CPU, one pass
    mask = responses != -100
    if method == "otb":
        adv = otb_advantages(R, stats.lgp, mask, group_ids)
    else:
        adv = group_advantages(R, group_ids, method="dr_grpo")
    loss, _ = policy_loss(
        stats.logprob, stats.logprob.detach(), adv, mask, agg="token-mean",
        entropy=stats.entropy, entropy_coef=entropy_coef,
    )  # fmt: skip
    adv_tok = adv if adv.dim() == 2 else adv[:, None].expand_as(stats.lgp)
    proxy = (adv_tok**2 * stats.lgp * mask).sum(1).mean()
    return loss, R, float(proxy)


def run(method, n, seed, steps, prompts_per_step, lr, entropy_coef, desc, keep_at=None):
    """Train one policy; `keep_at`: also return a copy of the policy after that many steps."""
    torch.manual_seed(seed)
    policy = TinyPolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    rewards, proxy, gnorm = [], [], []
    snapshot = None
    t0, c0 = time.perf_counter(), time.process_time()
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        if step == keep_at:
            snapshot = copy.deepcopy(policy)
        loss, R, prox = batch_loss(policy, method, n, prompts_per_step, entropy_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1e9)
        opt.step()
        proxy.append(prox)
        rewards.append(float(R.mean()))
        gnorm.append(float(norm))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    prompts = torch.arange(11, 11 + N_TARGETS)
    acc = float(reward(prompts, sample(policy, prompts, greedy=True)).mean())
    return RunResult(rewards, proxy, gnorm, acc, seconds, cpu_seconds), snapshot


def gradient_variance(policy, method, n, prompts_per_step, batches, seed):
    """Spread of the policy-gradient estimate at a fixed policy over independent batches:
    unbiased estimates of E||g - E g||^2 and ||E g||^2 (no entropy term: the plain estimator)."""
    torch.manual_seed(seed)
    grads = []
    for _ in range(batches):
        loss, _, _ = batch_loss(policy, method, n, prompts_per_step, 0.0)
        gs = torch.autograd.grad(loss, list(policy.parameters()))
        grads.append(torch.cat([g.reshape(-1) for g in gs]).double())
    G = torch.stack(grads)
    mean = G.mean(0)
    var = float(((G - mean) ** 2).sum(1).sum() / (batches - 1))  # unbiased, summed over params
    # ||mean||^2 overestimates ||E g||^2 by var / batches: subtract it (unbiased)
    return var, float(mean.pow(2).sum()) - var / batches


def smooth(xs: list, k: int) -> list:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def mean_sd(xs: list) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds (CI)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--entropy-coef", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--var-batches", type=int, default=None, help="batches per variance estimate")
    args = ap.parse_args(argv)
    args.cmd_args = command_args(argv)
    steps = args.steps or (15 if args.quick else 400)
    seeds = args.seeds or (1 if args.quick else 5)
    args.var_batches = args.var_batches or (4 if args.quick else 96)
    torch.set_num_threads(args.threads)
    configs = [("mean", 4), ("mean", 16), ("otb", 4)]
    results: dict[tuple[str, int], list[RunResult]] = {}
    snapshots = {}
    t_all, c_all = time.perf_counter(), time.process_time()
    for method, n in configs:
        for seed in range(seeds):
            desc = f"{method} N={n} seed={seed}"
            keep = steps // 4 if (method, n, seed) == ("mean", 16, 0) else None
            res, snap = run(
                method, n, seed, steps, args.prompts, args.lr, args.entropy_coef, desc, keep
            )
            if snap is not None:
                torch.manual_seed(0)
                snapshots = {"initial policy": TinyPolicy(), f"after {keep} steps": snap}
            results.setdefault((method, n), []).append(res)
            print(
                f"{method:>4} N={n:<2} seed={seed}: last-50 reward "
                f"{statistics.mean(res.rewards[-50:]):.3f}, greedy acc {res.greedy_acc:.3f}, "
                f"{res.seconds:.1f} s",
                flush=True,
            )
    variance = {}
    for where, policy in snapshots.items():
        for method, n in configs:
            variance[(where, method, n)] = gradient_variance(
                policy, method, n, args.prompts, args.var_batches, seed=1234
            )
    total = time.perf_counter() - t_all
    total_cpu = time.process_time() - c_all
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    os.makedirs(args.out, exist_ok=True)
    write_outputs(args, results, variance, steps, seeds, (total, total_cpu, load))
    return 0


def write_outputs(args, results, variance, steps: int, seeds: int, times: tuple) -> None:
    total, total_cpu, load = times
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(1, steps // 20)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {("mean", 4): "tab:blue", ("mean", 16): "tab:green", ("otb", 4): "tab:red"}
    for (method, n), runs in results.items():
        label = f"{'OTB' if method == 'otb' else 'mean baseline'} N={n}"
        c = colors[(method, n)]
        for key, ax in (("rewards", axes[0]), ("proxy", axes[2])):
            curves = [smooth(getattr(r, key), k) for r in runs]
            avg = [statistics.mean(v) for v in zip(*curves)]
            ax.plot(avg, color=c, label=label)
            for cur in curves:
                ax.plot(cur, color=c, alpha=0.2, lw=0.8)
        samples = [args.prompts * n * (i + 1) for i in range(steps)]
        avg = [statistics.mean(v) for v in zip(*[smooth(r.rewards, k) for r in runs])]
        axes[1].plot(samples, avg, color=c, label=label)
    axes[0].set(xlabel="step", ylabel=f"mean reward (moving avg {k})", title="reward vs step")
    axes[1].set(xlabel="sampled responses", ylabel="mean reward", title="reward vs samples")
    axes[1].set_xscale("log")
    axes[2].set(xlabel="step", ylabel="sum_t A_t^2 lgp_t per sequence", title="grad-variance proxy")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"GRPO toy (digit sum), {args.prompts} prompts/step, {seeds} seeds")
    fig.tight_layout()
    png = os.path.join(args.out, "grpo_toy.png")
    fig.savefig(png, dpi=110)

    cmd = " ".join(["python examples/grpo_toy.py", *args.cmd_args])
    rows = [
        "| config | N | seeds | reward, first 50 steps | reward, last 50 steps | "
        "greedy accuracy (all targets) | grad-variance proxy (mean) | grad norm (mean) | "
        "responses sampled | wall s / run | CPU s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, n), runs in results.items():
        name = "OTB" if method == "otb" else "mean baseline"
        rows.append(
            f"| {name} | {n} | {len(runs)} "
            f"| {mean_sd([statistics.mean(r.rewards[:50]) for r in runs])} "
            f"| {mean_sd([statistics.mean(r.rewards[-50:]) for r in runs])} "
            f"| {mean_sd([r.greedy_acc for r in runs])} "
            f"| {mean_sd([statistics.mean(r.proxy) for r in runs])} "
            f"| {mean_sd([statistics.mean(r.grad_norm) for r in runs])} "
            f"| {args.prompts * n * steps} "
            f"| {statistics.mean(r.seconds for r in runs):.1f} "
            f"| {statistics.mean(r.cpu_seconds for r in runs):.1f} |"
        )
    md = "\n".join(
        [
            "# GRPO toy: mean baseline vs Optimal Token Baseline",
            "",
            f"Command: `{cmd}` ({steps} steps, {args.prompts} prompts per step, lr {args.lr}, "
            f"{args.threads} thread(s)); total {total:.0f} s wall, {total_cpu:.0f} s CPU "
            f"(1-minute load average at the end: {load:.1f}).",
            f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}.",
            "Values: mean ± sd over seeds. Reward: fraction of sampled responses whose digits "
            f"sum to the target ({TARGET_LO}-{TARGET_HI}, at most {MAX_LEN} digits).",
            "",
            *rows,
            "",
            "Gradient spread at a fixed policy (the same number of prompts per batch; "
            f"{args.var_batches} independent batches per cell; plain estimator, no entropy "
            "term): unbiased estimates of E‖g − Eg‖² and ‖Eg‖² of the parameter gradient "
            "from the batch gradients g_k; ratio = E‖g − Eg‖² / ‖Eg‖² (noise-to-signal of one "
            "batch; lower is better, and it is what Adam's update direction feels).",
            "",
            "| policy | config | N | E‖g − Eg‖² | ‖Eg‖² | ratio |",
            "|---|---|---|---|---|---|",
            *[
                f"| {w} | {'OTB' if m == 'otb' else 'mean baseline'} | {n} | {v:.3e} | "
                f"{g2:.3e} | {v / g2 if g2 > 0 else float('nan'):.1f} |"
                for (w, m, n), (v, g2) in variance.items()
            ],
            "",
            "![curves](grpo_toy.png)",
            "",
        ]
    )
    with open(os.path.join(args.out, "grpo_toy.md"), "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
