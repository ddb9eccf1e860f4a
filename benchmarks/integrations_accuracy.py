"""Max error against float64 of pg_kernels.integrations and of the trainers' own functions.

Prints one line per (function, dtype): the value error and the gradient error (of a random
weighted sum of the outputs) of ours and of the trainer's function at the input precision, both
against the trainer's function on float64 logits. The table in docs/integrations.md comes from
this script. Needs the trainers installed as for tests/test_integrations.py
(`pip install --no-deps --target .venv/trainers -r requirements-trainers.txt`).

    python benchmarks/integrations_accuracy.py
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # TRL's Triton kernel on CPU tensors
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_integrations as T  # noqa: E402

from pg_kernels.integrations import openrlhf as po  # noqa: E402
from pg_kernels.integrations import trl as pt  # noqa: E402
from pg_kernels.integrations import verl as pv  # noqa: E402


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def report(name, theirs, ours, x, *args, truth_fn=None, **kwargs) -> None:
    truth, truth_grad = T._run(truth_fn or theirs, x.double(), *args, **kwargs)
    plain, plain_grad = T._run(theirs, x, *args, **kwargs)
    got, grad = T._run(ours, x, *args, **kwargs)
    values = ", ".join(
        f"ours {_max_err(o, t):.1e} theirs {_max_err(p, t):.1e}"
        for o, t, p in zip(got, truth, plain, strict=True)
    )
    grads = f"ours {_max_err(grad, truth_grad):.1e} theirs {_max_err(plain_grad, truth_grad):.1e}"
    print(f"{name:38s} {str(x.dtype)[6:]:9s} value: {values} | grad: {grads}")


def main() -> None:
    for package in ("verl", "trl", "openrlhf"):
        why = T.missing_reason(package)
        if why is not None:
            raise SystemExit(why)
    _, (tf,) = T._sources("verl", "verl.utils.torch_functional")
    _, (tu, tk) = T._sources("trl", "trl.trainer.utils", "trl.kernels.logprob_entropy")
    _, (ou,) = T._sources("openrlhf", "openrlhf.models.utils", stubs=(*T.STUBS, "flash_attn"))
    trl_truth = T._trl_fallback(types.SimpleNamespace(utils=tu))
    for dtype in T.DTYPES:
        x = T._logits((4, 64), dtype, seed=1)
        lab = T._labels((4, 64), seed=1)
        report(
            "verl logprobs_from_logits", tf.logprobs_from_logits, pv.logprobs_from_logits, x, lab
        )
        report("verl entropy_from_logits", tf.entropy_from_logits, pv.entropy_from_logits, x)
        report(
            "verl entropy_from_logits_with_chunking",
            tf.entropy_from_logits_with_chunking,
            pv.entropy_from_logits_with_chunking,
            x.view(-1, T.V),
            chunk_size=64,
            # verl's chunked form upcasts with .float(): its float64 run would be fp32
            truth_fn=lambda z, chunk_size: tf.entropy_from_logits(z),
        )
        report(
            "verl calculate_sum_pi_squared",
            tf.calculate_sum_pi_squared_from_logits,
            pv.calculate_sum_pi_squared_from_logits,
            x,
        )
        report(
            "trl selective_log_softmax T=0.7",
            tu.selective_log_softmax,
            pt.selective_log_softmax,
            x,
            lab,
            temperature=0.7,
        )
        report("trl entropy_from_logits", tu.entropy_from_logits, pt.entropy_from_logits, x)
        report(
            "trl.kernels (Triton, interp.) T=0.7",
            tk.selective_log_softmax_and_entropy,
            pt.fused_selective_log_softmax_and_entropy,
            x,
            lab,
            0.7,
            None,
            truth_fn=trl_truth,
        )
        report(
            "openrlhf log_probs_from_logits T=0.7",
            lambda logits, labels, t: ou.log_probs_from_logits(logits.clone(), labels, t),
            po.log_probs_from_logits,
            x,
            lab,
            0.7,
        )
        report("openrlhf compute_entropy", T._eager(ou.compute_entropy), po.compute_entropy, x)


if __name__ == "__main__":
    main()
