"""``lmtier demo --server`` end to end: the command a user types, in its own process.

It starts a real ``lmtier serve``, a baseline vLLM-CPU engine and two engine processes on the
server; engine B's first run must load what engine A stored, every output must equal the
baseline's, and the server must drain on SIGTERM and exit 0 with no lease left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def test_demo_server_shows_engine_b_hitting_what_engine_a_stored_with_identical_outputs(tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="needs vLLM: pip install 'lmtier[vllm]'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "lmtier", "demo", "--server", "--preset", "test", "--prompts", "2",
         "--tokens", "700", "--max-tokens", "4", "--dir", str(tmp_path / "demo")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=540)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "lmtier demo --server: OK" in out
    # 2 prompts x (2 chunks of 256 + a 128-token block) stored by A, loaded by B on its first run
    hit = re.search(r"cross-engine hit: engine B loaded (\d+) of (\d+) prompt tokens .*"
                    r"\(2 engine processes connected at once; .*leases now 0\)", out)
    assert hit is not None, out[-4000:]
    assert int(hit.group(1)) == 1280 and int(hit.group(2)) == 1400
    assert re.search(r"engine A, first run .* 0 +identical", out)
    assert re.search(r"engine B, first run .* 1280 +identical", out)
    assert "lmtier serve stopped (SIGTERM: drained, exit status 0)" in out
    assert not (tmp_path / "demo" / "lmtier.sock").exists(), "the server left its socket behind"
