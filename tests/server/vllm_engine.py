"""One vLLM-CPU engine process driven over stdin/stdout (for the server's two-engine tests).

    python -m tests.server.vllm_engine MODEL LMTIER_JSON|none

Reads one JSON command per line (answers are the stdout lines starting with ``@@``): ``{"prompts": [[ids...], ...]}`` generates them (greedy, with
logprobs) and prints ``{"results": [...], "seconds": s}``; EOF shuts the engine down. Prints
``{"ready": true}`` first.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from tests.integration import vllm_runner as runner

__all__: list[str] = []


def main() -> int:
    import os

    os.environ.update(runner.ENGINE_ENV)
    model, extra = sys.argv[1], sys.argv[2]
    llm = runner.make_llm(model, None if extra == "none" else json.loads(extra))
    try:
        print("@@" + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            t0 = time.perf_counter()
            results = runner.generate(llm, cmd["prompts"])
            print("@@" + json.dumps({"results": [asdict(r) for r in results], "seconds": time.perf_counter() - t0}),
                  flush=True)
    finally:
        runner.shutdown(llm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
