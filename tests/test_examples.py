"""The examples run end to end at their --quick size and write their outputs.

Marked slow: each takes 8-10 s of CPU, 20-30 s of wall time on a loaded 2-core machine.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, out_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--quick", "--out", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_grpo_toy_quick(tmp_path):
    proc = _run("grpo_toy.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "grpo_toy.md").read_text()
    assert "| OTB | 4 |" in md and "| mean baseline | 16 |" in md
    assert (tmp_path / "grpo_toy.png").stat().st_size > 10_000


@pytest.mark.slow
def test_radar_bandit_quick(tmp_path):
    proc = _run("radar_bandit.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "radar_bandit.md").read_text()
    assert "Exp3" in md and "max |proxy - measured| / measured" in md
    assert (tmp_path / "radar_bandit.png").stat().st_size > 10_000
    # the proxy equals the measured policy-gradient norm (float64 logits)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("max relative difference"))
    assert float(line.rsplit(" ", 1)[1]) < 1e-6
