"""Compile every Triton kernel of pg_kernels for sm_90 (H100) without a GPU, and fail on spills.

CI has no GPU, so the test suite runs the Triton kernels under TRITON_INTERPRET=1, which never
compiles them: a kernel that the interpreter accepts can still fail to compile for a GPU (an
unsupported op, a type error the interpreter lets through) or spill registers. This script runs
each public op with backend="triton" on CPU tensors, forward and backward, for every dtype and
the launch variants that change a kernel's constexprs, with two patches:
  * Triton's active driver is replaced by one that reports an sm_90 target (Triton's own
    compiler and ptxas do the rest; no CUDA driver is needed);
  * every launch becomes a warmup: the kernel is compiled, never run (outputs are garbage, which
    nothing here reads).
Each compiled kernel's cubin is then read with cuobjdump (from the Triton wheel): registers,
spills (LOCAL) and the call stack. Any local memory fails the check.

Run: .venv/bin/python .ci/check_triton_sm90.py   (~1-2 min; prints one line per kernel)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class OfflineDriver:
    """Just enough of a Triton driver to compile for TARGET on a machine without a GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


COMPILED: dict[tuple, tuple[str, object]] = {}
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    key = (self.fn.__name__, self.fn.__module__, kernel.hash)
    COMPILED.setdefault(key, (f"{self.fn.__module__.split('.')[-1]}.{self.fn.__name__}", kernel))
    return kernel


def exercise() -> None:
    """Every op, forward and backward, in the variants that change a kernel's constexprs."""
    import pg_kernels
    from pg_kernels import _backend

    _backend._TRITON_INTERPRETED = True  # lets backend="triton" take CPU tensors
    V = 151936  # blocking depends on V: a real vocabulary, several chunks per row
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(2, V, generator=gen).to(dtype).requires_grad_()
        xr = torch.randn(2, V, generator=gen).to(dtype).requires_grad_()
        y = torch.tensor([3, V - 1])
        per_row = torch.tensor([0.7, 1.3], dtype=acc)
        lp = torch.tensor([-3.0, -4.0])
        ids = torch.tensor([[3, 5, 7, 11], [0, 1, 2, 3]])
        id_lp = torch.log_softmax(torch.randn(2, 4, generator=gen), -1) - 1.0
        for temperature in (1.0, per_row):
            t = dict(temperature=temperature, backend="triton")
            s = pg_kernels.token_stats(x, y, **t)
            (s.logprob + s.entropy + s.collision + s.lse).sum().backward()
            for direction in ("reverse", "forward"):
                pg_kernels.kl_divergence(x, xr, direction=direction, labels=y, **t).sum().backward()
            pg_kernels.kl_divergence(x, xr.detach(), **t).sum().backward()  # one side only
            m = pg_kernels.mismatch_stats(x, y, lp, rollout_logits=xr.detach(), **t)
            m.logprob.sum().backward()
            pg_kernels.topk_kl(x, ids, id_lp, labels=y, **t).sum().backward()
            pg_kernels.pruned_logprob(x, y, alpha=1e-3, **t).logprob.sum().backward()


def resources(kernel) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, found.groups())))


def main() -> int:
    driver.set_active(OfflineDriver())
    JITFunction.run = _compile_only
    exercise()
    JITFunction.run = _run
    failed = []
    for name, kernel in sorted(COMPILED.values(), key=lambda item: item[0]):
        use = resources(kernel)
        widest = max(
            (int(w) for w in re.findall(r"ld\.global(?:\.\w+)*\.v(\d)", kernel.asm["ptx"])),
            default=1,
        )
        # LOCAL is spill memory. STACK alone is an ABI call frame (an fp64 libdevice call that
        # ptxas did not inline, 16 bytes in topk_kl's fp64 backward): reported, not failed.
        spills = use["local"] > 0
        pointers = [t for t in kernel.src.signature.values() if str(t).startswith("*")]
        print(
            f"{name:38s} {pointers[0] if pointers else '':6s} "
            f"warps={kernel.metadata.num_warps} regs={use['regs']:3d} "
            f"local={use['local']} stack={use['stack']} widest-load=v{widest}"
            + ("  SPILLS" if spills else "")
        )
        if spills:
            failed.append(name)
    print(f"check_triton_sm90: {len(COMPILED)} kernel variants compiled for sm_90")
    if failed:
        print(f"check_triton_sm90: FAIL: local memory (spills) in {sorted(set(failed))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
