"""``lmtier demo --server``: the demo's workload through one ``lmtier serve`` and two engine processes.

1. build the tiny model (as ``lmtier demo`` does) and start ``lmtier serve`` (cpu slab + disk in
   the demo directory);
2. baseline: a vLLM engine process without lmtier (the reference outputs);
3. engine A: a vLLM engine process whose connector uses the server: prefills and stores;
4. engine B: another, fresh engine process (A still connected): its first run loads what A
   stored — the cross-engine hit;
5. a table of times, TTFT, hit tokens, whether outputs equal the baseline, and the server's
   status (clients, tier hits); the server is stopped with SIGTERM (it drains and exits 0).

Returns 0 when B loaded A's KV and every output equals the baseline, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_server_demo"]

_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
_LOGPROB_ATOL = 0.02  # bf16 noise between a full prefill and one over loaded KV
_READY = re.compile(r"lmtier serve ready: pid=(\d+) socket=(\S+) \(mode \d+\) http=(\S+)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtier demo --server", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, default=4, help="number of prompts (default 4)")
    p.add_argument("--tokens", type=int, default=3000, help="tokens per prompt (default 3000)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per prompt (default 8)")
    p.add_argument("--preset", default="demo", help="tiny model preset (default demo; test is faster)")
    p.add_argument("--dir", metavar="PATH", help="server socket and disk tier here (default: a temporary directory)")
    p.add_argument("--model-dir", metavar="PATH", help="where the tiny model is built and cached")
    p.add_argument("--engine", nargs=2, metavar=("MODEL", "LMTIER"), help=argparse.SUPPRESS)  # a child
    return p


def run_server_demo(argv: Sequence[str] | None = None) -> int:
    """Run the demo (see the module doc); ``argv`` as on the command line after ``lmtier demo``."""
    opts = _parser().parse_args(list(argv or []))
    if opts.engine:
        return _engine_process(*opts.engine)
    if opts.prompts < 1 or opts.tokens < 2 or opts.max_tokens < 1:
        _say("lmtier demo --server: --prompts, --max-tokens must be >= 1 and --tokens >= 2")
        return 2
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        _say(f"lmtier demo --server needs vLLM ({exc}): `make setup`, or `pip install 'lmtier[vllm,server]'`")
        return 2
    from lmtier.cli import demo_dir
    from lmtier.demo import TINY_PRESETS, build_tiny_llama

    _step(1, 5, f"building the tiny model (preset {opts.preset!r}) and starting lmtier serve")
    model = str(build_tiny_llama(TINY_PRESETS[opts.preset], opts.model_dir))
    rng = random.Random(2024)
    prompts = [[1] + [rng.randrange(3, 2000) for _ in range(opts.tokens - 1)] for _ in range(opts.prompts)]
    with demo_dir(opts.dir) as root, _server(root) as (server, http):
        lmtier = {"chunk_tokens": 256, "server": f"unix://{root / 'lmtier.sock'}"}
        _say(f"      lmtier serve pid {server.pid}, {http}; engines use {lmtier}")
        _step(2, 5, "baseline: a vLLM engine process without lmtier")
        with _engine(model, None, root / "baseline.log") as base_engine:
            base = base_engine.run("baseline (no lmtier)", prompts, opts.max_tokens)
        _step(3, 5, "engine A (its own process): prefill everything, store the KV in the server")
        with _engine(model, lmtier, root / "engine-a.log") as a:
            first = a.run("engine A, first run", prompts, opts.max_tokens)
            _wait_stored(http, opts.prompts * (opts.tokens // 256))
            _step(4, 5, "engine B (another process, A still connected): its first run loads what A stored")
            with _engine(model, lmtier, root / "engine-b.log") as b:
                second = b.run("engine B, first run", prompts, opts.max_tokens)
                clients = _status(http)["clients"]  # A and B, both still up
        status = _status(http)
    _step(5, 5, "results")
    return _report(base, [first, second], clients, status)


# -- engine processes ---------------------------------------------------------------------------
def _engine_process(model: str, lmtier_json: str) -> int:
    """The child: one vLLM engine, one JSON request on stdin, one JSON answer (a ``@@`` line)."""
    os.environ.update(_ENV)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    request = json.loads(sys.stdin.readline())
    prompts, max_tokens = request["prompts"], request["max_tokens"]
    kwargs: dict[str, Any] = {}
    if lmtier_json != "none":
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=json.loads(lmtier_json))
    llm = LLM(model=model, dtype="bfloat16", max_model_len=max(len(p) for p in prompts) + max_tokens + 16, seed=0,
              enforce_eager=True, disable_log_stats=False, enable_prefix_caching=False, **kwargs)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1)
        llm.generate([TokensPrompt(prompt_token_ids=[1, 5, 6, 7])], params, use_tqdm=False)  # warm-up, untimed
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        print("@@" + json.dumps({"ready": True}), flush=True)
        sys.stdin.readline()  # stay up (connected) until the parent says so
    finally:
        llm.llm_engine.engine_core.shutdown()
    ids = [list(o.outputs[0].token_ids) for o in outs]
    answer = {
        "seconds": seconds,
        "ids": ids,
        "logprobs": [[float(step[t].logprob) if step else float("nan")
                      for step, t in zip(o.outputs[0].logprobs or [], i, strict=True)]
                     for o, i in zip(outs, ids, strict=True)],
        "cached": sum(int(o.num_cached_tokens or 0) for o in outs),
        "ttft": statistics.median([float(o.metrics.first_token_latency) for o in outs if o.metrics is not None]
                                  or [float("nan")]),
        "prompt_tokens": sum(len(p) for p in prompts),
    }
    print("@@" + json.dumps(answer), flush=True)
    return 0


class _Engine:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.result: dict[str, Any] = {}

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                answer: dict[str, Any] = json.loads(line[2:])
                return answer
        raise RuntimeError(f"the engine process exited with {self.proc.wait()}; see its log")

    def run(self, label: str, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        self._answer()  # generated; still connected
        self.result = {"label": label}
        return self.result

    def finish(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None and self.result:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
            self.result.update(self._answer())
            _say(f"      {self.result['label']}: {self.result['seconds']:.2f} s (TTFT median "
                 f"{self.result['ttft']:.2f} s), {self.result['cached']} prompt tokens loaded from lmtier")


@contextlib.contextmanager
def _engine(model: str, lmtier: dict[str, Any] | None, log: Path) -> Iterator[_Engine]:
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lmtier", "demo", "--server", "--engine", model,
                                 json.dumps(lmtier) if lmtier is not None else "none"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        engine = _Engine(proc)
        try:
            yield engine
            engine.finish()
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()


# -- the server ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _server(root: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    config = root / "tiers.yaml"
    config.write_text("chunk_tokens: 256\ntiers:\n"
                      "  - {name: hot, backend: cpu, options: {max_bytes: 1GiB}}\n"
                      f"  - {{name: local, backend: disk, options: {{root: '{root / 'disk'}', max_bytes: 4GiB}}}}\n")
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmtier", "serve", "--config", str(config), "--socket",
                                 str(root / "lmtier.sock"), "--http", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (m := _READY.search(log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmtier serve did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield proc, m.group(3)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
                _say(f"      lmtier serve stopped (SIGTERM: drained, exit status {code})")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_stored(http: str, chunks: int, timeout_s: float = 60.0) -> None:
    """Until the server's hot tier holds ``chunks`` chunks (A's stores complete behind its requests)."""
    deadline = time.monotonic() + timeout_s
    while _status(http)["tiers"][0]["objects"] < chunks and time.monotonic() < deadline:
        time.sleep(0.1)


def _status(http: str) -> dict[str, Any]:
    with urllib.request.urlopen(http + "/v1/status", timeout=10) as r:
        status: dict[str, Any] = json.loads(r.read())
        return status


# -- report -------------------------------------------------------------------------------------
def _report(base: dict[str, Any], runs: list[dict[str, Any]], clients: int, status: dict[str, Any]) -> int:
    rows = [("run", "time", "speedup", "TTFT p50", "TTFT speedup", "hit tokens", "outputs vs baseline")]
    rows.append((base["label"], f"{base['seconds']:.2f} s", "1.00x", f"{base['ttft']:.2f} s", "1.00x", "-",
                 "reference"))
    ok = True
    for run in runs:
        same = run["ids"] == base["ids"]
        worst = max((abs(a - b) for x, y in zip(run["logprobs"], base["logprobs"], strict=True)
                     for a, b in zip(x, y, strict=True)), default=0.0) if same else float("inf")
        good = same and worst <= _LOGPROB_ATOL
        ok = ok and good
        rows.append((run["label"], f"{run['seconds']:.2f} s", f"{base['seconds'] / run['seconds']:.2f}x",
                     f"{run['ttft']:.2f} s", f"{base['ttft'] / run['ttft']:.2f}x", str(run["cached"]),
                     f"identical (max |dlogprob| {worst:.4f})" if good else "DIFFERENT"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        _say("  ".join(c.ljust(w) if i in (0, len(row) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if j == 0:
            _say("  ".join("-" * w for w in widths))
    b = runs[-1]
    tiers = ", ".join(f"{t['name']}: {t['objects']} chunks, {t['hits']} hits" for t in status["tiers"])
    _say(f"cross-engine hit: engine B loaded {b['cached']} of {b['prompt_tokens']} prompt tokens "
         f"({b['cached'] / b['prompt_tokens']:.1%}) that engine A stored, through one lmtier serve "
         f"({clients} engine processes connected at once; {tiers}; leases now {status['leases']})")
    if b["cached"] == 0:
        _say("lmtier demo --server: FAILED: engine B loaded nothing from the server")
        return 1
    _say("lmtier demo --server: OK" if ok else "lmtier demo --server: FAILED: outputs differ from vLLM without lmtier")
    return 0 if ok else 1


def _say(text: str) -> None:
    print(text, flush=True)


def _step(i: int, n: int, text: str) -> None:
    _say(f"[{i}/{n}] {text}")
