"""The reliability table: run the fault suite (``tests/faults``) and tabulate what each fault did.

    flock /tmp/lmtier-bench.lock python benchmarks/reliability.py           # print the table
    flock /tmp/lmtier-bench.lock python benchmarks/reliability.py --write   # and docs/reliability.md

Each fault test records, through its ``ledger`` fixture (``tests/faults/ledger.py``), the calls it
made while the fault was in effect: how many, how many returned a wrong value, how many raised to
the caller, how many stored values were gone after the fault, and the slowest call. This script
runs the suite with ``LMTIER_RELIABILITY_OUT`` pointing at a scratch file, then prints one row per
fault. It fails (exit 1) if any fault test failed: the table describes a green suite only.

Real servers (redis-server, SeaweedFS) and real filesystems (a tmpfs, mounted only as root) are
used; cases that cannot run here are listed as skipped with pytest's reason. Latencies are of one
run on a shared machine: read them as "milliseconds or seconds", not as benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "reliability.md"
OUT_ENV = "LMTIER_RELIABILITY_OUT"  # tests/faults/ledger.py reads the same name

INTRO = """\
# Reliability: what each fault does to a caller

lmtier's rule: a fault is a miss or a skipped write, returned within the call's deadline, with a
metric and a log line; never a wrong value, never an exception for the caller, never the loss of a
value that was stored and intact. Bad input is a typed error (`ConfigError`,
`InvalidArgumentError`) that names what to fix. The fault suite (`tests/faults`, marker `faults`)
reproduces each fault against real parts: redis-server, SeaweedFS and `lmtier serve` on
127.0.0.1 frozen with SIGSTOP and killed with SIGKILL, a tmpfs the test mounts and fills or
remounts read-only, bytes damaged behind a tier's back, hostile configuration and keys.

Columns: **cases** are the calls made while the fault was in effect (for bad input: the inputs
tried); **wrong** are values returned that differ from what was stored; **raised** are those calls
that raised to the caller; **typed errors** are bad inputs answered with an error naming the fix;
**lost** are values stored and intact before the fault that could not be read after it (a disk
that fills evicts its least recently used values, as at `max_bytes`: that is not counted as lost);
**worst** is the slowest caller-facing call during the fault (a server stalled for one second costs
at most the call's deadline). The remote tiers run under a `StorageManager` with default deadlines,
as a RAM tier over a shared tier written in the background. The `lmtier serve` rows drive the
engine's client (`ServerStore`: lookup, contains, fetch, reserve) with deadlines of 0.5 s (lookup,
reserve) and 1 s (fetch) against a server whose slab sits over a disk tier written through.

To drill your own tiers the same way, in a scratch namespace (a value corrupted behind the tier, its
connections cut, a stall past its deadline), run `lmtier doctor --faults tiers.yaml`: one line per
check and tier, `ok`, `skipped` (with why) or `PROBLEM` (with what the caller saw), exit 1 on a
problem.
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"also write {DOC.relative_to(REPO)}")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. -k redis)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmtier-reliability-") as tmp:
        out = Path(tmp) / "ledger.jsonl"
        report = Path(tmp) / "report.txt"
        env = {**os.environ, OUT_ENV: str(out), "PYTHONPATH": str(REPO)}
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "tests/faults", "-m", "faults", "-q", "-p", "no:cacheprovider",
             "-rs", *args.pytest_args],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        report.write_text(done.stdout)
        tail = [line for line in done.stdout.splitlines() if line.strip()][-1:]
        skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
        if done.returncode != 0:
            print(done.stdout[-6000:], file=sys.stderr)
            print("reliability: the fault suite failed; no table", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    table = render(records, skipped, tail[0] if tail else "", time.time() - started)
    print(table)
    if args.write:
        DOC.write_text(table)
        print(f"wrote {DOC.relative_to(REPO)}", file=sys.stderr)
    return 0


def render(records: list[dict], skipped: list[str], summary: str, seconds: float) -> str:
    rows = ["| fault | cases | wrong | raised | typed errors | lost | worst call |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    totals = {"cases": 0, "wrong": 0, "raised": 0, "typed_errors": 0, "lost": 0}
    for r in sorted(records, key=lambda r: r["fault"]):
        for k in totals:
            totals[k] += r[k]
        note = f" ({'; '.join(r['notes'])})" if r["notes"] else ""
        worst = f"{r['worst_s'] * 1e3:.0f} ms" if r["cases"] and r["worst_s"] else "-"
        rows.append(f"| {r['fault']}{note} | {r['cases']} | {r['wrong']} | {r['raised']} | {r['typed_errors']} "
                    f"| {r['lost']} | {worst} |")
    rows.append(f"| **all faults** | {totals['cases']} | {totals['wrong']} | {totals['raised']} | "
                f"{totals['typed_errors']} | {totals['lost']} | |")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "?"
    lines = [INTRO, "## Measured", "",
             f"`flock /tmp/lmtier-bench.lock python benchmarks/reliability.py --write` at commit {commit}, "
             f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python "
             f"{platform.python_version()}, uid {os.geteuid()}; pytest: {summary} ({seconds:.0f} s).", "",
             *rows, ""]
    if skipped:
        lines += ["Not run here:", "", *[f"- {s}" for s in skipped], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
