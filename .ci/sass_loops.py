"""Static instruction counts of a kernel's hot loop, read from its sm_90 SASS (no GPU needed).

A bandwidth-bound kernel reaches the memory's rate only if the SM can issue its instructions
faster than the memory delivers elements: an H200 issues ~33 T thread-instructions/s (132 SMs x
128 lanes x 1.98 GHz) against ~2.1 T bf16 elements/s of reads, ~16 per element at perfect issue.
The budgets of `.ci/check_triton_sm90.py` and `.ci/check_cuda.sh` are set below that, leaving
headroom for stalls.

`hot_loop(sass)` finds the loops of one function (a backward branch closes each) and returns the
one that streams the logits in (the most exponentials, then the widest loads, then the most
bytes read per trip), with its instruction count. Everything inside the loop's address range
counts, including branches that are rarely taken: a budget that holds on the static count holds
on every input. `fast_path` also reports the count without the forward-branch skipped ranges,
for reading, never for checking.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")


@dataclass
class Insn:
    addr: int
    pred: str
    op: str
    args: str


@dataclass
class Loop:
    start: int  # address of the first instruction of the loop
    end: int  # address of the backward branch that closes it
    insns: list[Insn]

    @property
    def count(self) -> int:
        return len(self.insns)

    def ops(self, prefix: str) -> list[Insn]:
        return [i for i in self.insns if i.op.startswith(prefix)]

    def global_bytes(self, ops: tuple[str, ...] = ("LDG", "STG")) -> int:
        """Bytes per thread that the loop's global accesses (LDG and STG by default) move per
        trip."""
        return sum(_width(i) for i in self.insns if i.op.startswith(ops))

    def stream_bytes(self) -> int:
        """Bytes per thread per trip of the loop's widest global accesses only: the vector loads
        and stores of the streamed tensors. Narrower accesses in the same loop (a scalar id or
        label read per step) move no stream and must not count as extra unrolled trips."""
        widths = [_width(i) for i in self.insns if i.op.startswith(("LDG", "STG"))]
        return sum(w for w in widths if w == max(widths)) if widths else 0

    def fast_path(self) -> int:
        """Instructions left when every forward branch inside the loop is taken (skipped code)."""
        skipped: set[int] = set()
        for i in self.insns:
            if i.op == "BRA" and i.pred:
                target = _TARGET.search(i.args)
                if target and i.addr < int(target.group(1), 16) <= self.end:
                    skipped.update(range(i.addr + 16, int(target.group(1), 16), 16))
        return sum(1 for i in self.insns if i.addr not in skipped)


def _width(i: Insn) -> int:
    """Bytes per thread of one LDG/STG (vector width from the op; 32 bits when unmarked)."""
    width = re.search(r"\.(128|64|U16|S16|U8|S8|16|8)\b", i.op)
    bits = {"128": 128, "64": 64, "U16": 16, "S16": 16, "16": 16, "U8": 8, "S8": 8, "8": 8}
    return (bits.get(width.group(1), 32) if width else 32) // 8


def functions(sass: str) -> dict[str, list[Insn]]:
    """cuobjdump -sass output -> {function name: instructions}."""
    out: dict[str, list[Insn]] = {}
    current = None
    for line in sass.splitlines():
        head = re.match(r"\s*Function : (\S+)", line)
        if head:
            current = out.setdefault(head.group(1), [])
            continue
        m = _INSN.search(line)
        if m and current is not None:
            pred = (m.group(2) or "").strip()
            current.append(Insn(int(m.group(1), 16), pred, m.group(3), m.group(4)))
    return out


def loops(insns: list[Insn]) -> list[Loop]:
    """Every loop closed by a backward branch, innermost ones included."""
    found = []
    for i in insns:
        if i.op != "BRA":
            continue
        target = _TARGET.search(i.args)
        if target is None:
            continue
        start = int(target.group(1), 16)
        if start < i.addr:
            body = [j for j in insns if start <= j.addr <= i.addr]
            found.append(Loop(start, i.addr, body))
    return found


def hot_loop(insns: list[Insn]) -> Loop | None:
    """The loop that streams the logits in: the one with the most exponentials (MUFU) per
    trip, then the widest loads (vector loads beat a prologue's scalar loads), then
    the most bytes read per trip, then the most moved, then the larger one. Every budgeted
    kernel reads its logits in its hot loop: a loop that only stores (filling the gradient of an
    ignored row, which reads nothing) is not it, however much it writes per trip; and a rare
    pass that only reads a chunk's max again (the pair pass's far chunks) is not it, however
    far the compiler unrolled it (by bytes read, it won over the fp32 pair loop: 5.8-7.2
    instructions per pair and no MUFU, where that loop has 33). Exponentials come before the
    loads' width: rows that start at odd elements load the logits element by element, narrower
    than a prologue's fp32 or int64 loads (pruned_logprob's sum kernel: its chunk-max loop, 1.8
    per element and no MUFU, was taken for the 12.8 of the hot loop; topk_kl's backward: its
    ids loop, 1 MUFU, 6.2 for 11.8)."""
    candidates = [lp for lp in loops(insns) if lp.global_bytes() > 0]
    if not candidates:
        return None

    def key(lp: Loop) -> tuple[int, int, int, int, int]:
        widest_load = max((_width(i) for i in lp.ops("LDG")), default=0)
        exps = len(lp.ops("MUFU"))
        return (exps, widest_load, lp.global_bytes(("LDG",)), lp.global_bytes(), lp.count)

    return max(candidates, key=key)
