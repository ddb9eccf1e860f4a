"""Read pytest junit XML files: fail on unexpected skips, failures, errors, or nothing run.

    python benchmarks/gpu_test_skips.py OUT.txt RESULTS.xml [RESULTS.xml ...]

On a GPU machine with the extensions built, every (op, backend) kernel case that exists must
run. A skip is unexpected when its reason says a GPU, an extension or Triton is missing
(PGK_BAD_SKIPS, a regex), or when it is a CUDA-device case (its id names the device "cuda")
whose reason is not allowed (PGK_ALLOWED_SKIPS: a second GPU missing, an op without a kernel
for that backend). Writes the counts and every distinct skip reason (with its count) to OUT.txt,
prints the unexpected ones, and exits 1 when there is any unexpected skip, failure or error, or
when no test ran; else 3 when tests were left unrun at the run's deadline (tests/conftest.py,
PGK_TEST_DEADLINE), else 0.
"""

from __future__ import annotations

import collections
import os
import re
import sys
import xml.etree.ElementTree as ET

BAD = os.environ.get(
    "PGK_BAD_SKIPS",
    r"no GPU|CUDA extension|_C_cuda|not built or not importable|Triton unavailable|"
    r"C\+\+ extension unavailable|cannot run here",
)
ALLOWED = os.environ.get("PGK_ALLOWED_SKIPS", r"needs 2 GPUs|has no \w+ kernel")
CUDA_CASE = re.compile(r"[\[-]cuda[\]-]")
DEADLINE = "deadline: "  # tests/conftest.py SKIP_DEADLINE: not run, not a skip of the code's


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_path, files = argv[0], argv[1:]
    counts = collections.Counter()
    reasons = collections.Counter()
    unexpected, broken = [], []
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as e:
            broken.append(f"{path}: {e}")
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            if "skipped" in kinds:
                msg = case.find("skipped").get("message", "")
                if msg.startswith(DEADLINE):
                    counts["not run"] += 1
                    continue
                counts["skipped"] += 1
                reasons[msg] += 1
                bad = re.search(BAD, msg) or (
                    CUDA_CASE.search(name) and not re.search(ALLOWED, msg)
                )
                if bad:
                    unexpected.append(f"{name}: {msg}")
            elif "failure" in kinds or "error" in kinds:
                counts["failed"] += 1
                broken.append(name)
            else:
                counts["passed"] += 1
    lines = [
        f"passed {counts['passed']}, failed or error {counts['failed']}, "
        f"skipped {counts['skipped']} (unexpected {len(unexpected)}), "
        f"{counts['not run']} not run (the deadline)",
        "",
        "skip reasons (count, reason):",
        *(f"  {n:5d}  {msg}" for msg, n in reasons.most_common()),
        "",
        "unexpected skips:",
        *(f"  {u}" for u in unexpected),
        "",
        "failed, errors, unreadable results:",
        *(f"  {b}" for b in broken),
    ]
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[0])
    for u in unexpected[:30]:
        print(f"UNEXPECTED SKIP {u}")
    if len(unexpected) > 30:
        print(f"... and {len(unexpected) - 30} more (see {out_path})")
    ok = not unexpected and not broken and counts["passed"] > 0
    return 1 if not ok else 3 if counts["not run"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
