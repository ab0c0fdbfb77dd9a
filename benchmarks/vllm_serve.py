"""`vllm bench serve` against vLLM's OpenAI server (CPU): lmtier vs vLLM's own prefix cache, TTFT.

Three servers of the tiny Llama (preset ``demo``), one at a time, each started with ``vllm serve``
exactly as docs/vllm.md writes it, the same ``VLLM_CPU_OMP_THREADS_BIND`` for all (see "CPU thread
binding" there), ``--enforce-eager``:

* ``baseline``: no connector, vLLM's prefix cache off (every prompt prefilled);
* ``vllm-prefix-cache``: no connector, vLLM's prefix cache on — the ceiling for any external
  cache (it copies nothing);
* ``lmtier``: the lmtier connector (cpu -> disk tiers), vLLM's prefix cache off; its scheduler
  answers lookups within the scheduling pass (through the workers' lookup sockets) and makes a
  request wait for a prefix another running request is computing (defaults);

and, with ``--servers``, variants of it that turn one mechanism off, to measure what each does:
``lmtier-no-defer`` (``defer_max_s: 0``), ``lmtier-round-trip`` (``scheduler_lookups: false``: each
lookup rides one engine step, and no request waits for another's prefix), ``lmtier+prefix-cache``
(vLLM's prefix cache on as well), ``lmtier+prefix-cache-reset`` (the same, with vLLM's prefix
cache emptied after the warm-up through ``POST /reset_prefix_cache``, as an engine restart or
eviction leaves it: every prefix is served by lmtier, and vLLM's cache shares the blocks lmtier
loads among the requests of one prefix; with ``--warm-up same`` this is lmtier restoring vLLM's
warm cache) and ``lmtier-ram`` (the RAM tier only: no disk writes behind the stores, which on a
2-core host share the cores the forward computes on).

Each server gets ``vllm bench serve --dataset-name prefix_repetition`` (``--num-prompts`` prompts
over ``--prefixes`` shared prefixes of ``--prefix`` tokens, a ``--suffix``-token suffix each,
``--max-concurrency`` at a time) twice: a warm-up run with other prefixes (untimed: kernels,
files, the first stores), then the measured run (``--request-rate R``: Poisson arrivals at R
requests per second instead of every prompt at once; with ``--logs``, vLLM's per-request results
are kept there). ``--warm-up same`` runs the warm-up with the measured run's seed: the same
prefixes (vLLM 0.32 draws most suffixes anew), so every measured request finds its prefix in
either cache, no request waits for another's, and what is timed is the hit: vLLM's blocks, shared
by the requests of one prefix, against lmtier's copy loaded per request (``--prefixes`` equal to
``--num-prompts`` leaves vLLM nothing to share). Rounds alternate the servers; the table gives
medians over rounds of vLLM's own TTFT statistics, the speedup of each against the baseline, and
lmtier's share of the prefix cache's speedup (the issue's goal: >= 95%). Nothing is asserted.

    python benchmarks/vllm_serve.py [--rounds 3] [--num-prompts 64] [--max-concurrency 16]
        [--request-rate R] [--warm-up other|same] [--dtype bfloat16] [--servers baseline,vllm-prefix-cache,lmtier,lmtier-ram,...] [--logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from _common import fmt_ratio, machine_line, median, print_table


class ServerKind(NamedTuple):
    """How one of the compared servers is started and prepared."""

    prefix_cache: bool  # vLLM's own prefix cache on
    connector: dict[str, Any] | None  # the connector's options over the tiers below; None: no connector
    reset_after_warm_up: bool = False  # vLLM's prefix cache emptied between the warm-up and the measured run


SERVERS: dict[str, ServerKind] = {
    "baseline": ServerKind(False, None),
    "vllm-prefix-cache": ServerKind(True, None),
    "lmtier": ServerKind(False, {}),
    "lmtier-no-defer": ServerKind(False, {"defer_max_s": 0}),
    "lmtier-round-trip": ServerKind(False, {"scheduler_lookups": False}),
    "lmtier+prefix-cache": ServerKind(True, {}),
    "lmtier+prefix-cache-reset": ServerKind(True, {}, reset_after_warm_up=True),
    "lmtier-ram": ServerKind(False, {"tiers": [{"name": "hot", "backend": "cpu",
                                               "options": {"max_bytes": "2GiB"}}]}),
}
_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _vllm() -> str:
    return str(Path(sys.executable).parent / "vllm")


class Server:
    """``vllm serve`` in its own process group, stopped by that group's id."""

    def __init__(self, model: str, log: Path, env: dict[str, str], extra_args: list[str],
                 dtype: str = "bfloat16") -> None:
        self.port = _free_port()
        cmd = [_vllm(), "serve", model, "--served-model-name", "tiny", "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", dtype, "--enforce-eager", "--seed", "0", *extra_args]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **env}, start_new_session=True)
        self.log = log
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vllm serve not ready: {log.read_text()[-3000:]}")
            time.sleep(0.5)  # readiness poll interval

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _bench(port: int, model: str, args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    cmd = [_vllm(), "bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "tiny",
           "--tokenizer", model, "--dataset-name", "prefix_repetition",
           "--prefix-repetition-prefix-len", str(args.prefix), "--prefix-repetition-suffix-len", str(args.suffix),
           "--prefix-repetition-num-prefixes", str(args.prefixes), "--prefix-repetition-output-len", str(args.output),
           "--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.max_concurrency),
           "--seed", str(seed), "--ignore-eos", "--disable-tqdm", "--percentile-metrics", "ttft,tpot,e2el",
           "--metric-percentiles", "50,99", "--request-rate", str(args.request_rate),
           "--save-result", "--save-detailed", "--result-dir", str(out.parent),
           "--result-filename", out.name]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _reset_prefix_cache(port: int) -> None:
    """Empty vLLM's own prefix cache, not the connector's (the server runs with
    ``VLLM_SERVER_DEV_MODE=1``, which adds the endpoint); raises if vLLM refused (blocks held)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/reset_prefix_cache", method="POST")
    with urllib.request.urlopen(req, timeout=60) as answer:
        if not json.loads(answer.read()).get("success"):
            raise RuntimeError("vLLM refused to reset its prefix cache after the warm-up")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--prefix", type=int, default=1536, help="shared prefix tokens (default 1536)")
    p.add_argument("--suffix", type=int, default=128, help="unique suffix tokens per prompt (default 128)")
    p.add_argument("--prefixes", type=int, default=4, help="distinct prefixes (default 4)")
    p.add_argument("--output", type=int, default=8, help="tokens generated per request (default 8)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: every prompt at once, "
                        "--max-concurrency in flight)")
    p.add_argument("--warm-up", choices=("other", "same"), default="other",
                   help="the untimed first run: other prefixes (default) or the measured run's own")
    p.add_argument("--dtype", default="bfloat16",
                   help="the model's dtype for every server (default bfloat16; on an AVX2-only host "
                        "float32 prefilled ~5x faster than bfloat16)")
    p.add_argument("--bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND for every server (default 0-1)")
    p.add_argument("--preset", default="demo")
    p.add_argument("--servers", default="baseline,vllm-prefix-cache,lmtier",
                   help=f"comma-separated, from {', '.join(SERVERS)} (baseline and vllm-prefix-cache are always run)")
    p.add_argument("--logs", type=Path, default=None,
                   help="keep every server's log (INFO level: lmtier's per-request lines) in this directory")
    args = p.parse_args(argv)
    names = ["baseline", "vllm-prefix-cache", *(n for n in args.servers.split(",")
                                                 if n not in ("baseline", "vllm-prefix-cache"))]
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        p.error(f"unknown server(s) {unknown}; choose from {list(SERVERS)}")
    from lmtier.demo import TINY_PRESETS, build_tiny_llama

    model = str(build_tiny_llama(TINY_PRESETS[args.preset]))
    max_len = str(args.prefix + args.suffix + args.output + 256)
    env = {**_ENV, "VLLM_CPU_OMP_THREADS_BIND": args.bind,
           "VLLM_LOGGING_LEVEL": "INFO" if args.logs else "WARNING"}
    import vllm

    print(f"# vllm serve {vllm.__version__} (CPU) + vllm bench serve; {machine_line()}")
    print(f"# tiny Llama preset {args.preset!r}; prefix_repetition: {args.num_prompts} prompts, {args.prefixes} "
          f"prefixes of {args.prefix} tokens + {args.suffix}-token suffixes, {args.output} tokens out, "
          f"max concurrency {args.max_concurrency}, request rate {args.request_rate}/s, warm-up {args.warm_up}, {args.dtype}; VLLM_CPU_OMP_THREADS_BIND={args.bind}; {args.rounds} rounds")
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="lmtier-vllm-serve-") as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            for name in results:
                extra = ["--max-model-len", max_len]
                kind = SERVERS[name]
                extra.append("--enable-prefix-caching" if kind.prefix_cache else "--no-enable-prefix-caching")
                if kind.connector is not None:
                    tiers = {"chunk_tokens": 256, "tiers": [
                        {"name": "hot", "backend": "cpu", "options": {"max_bytes": "2GiB"}},
                        {"name": "local", "backend": "disk", "options": {"root": str(root / f"disk-{name}-{r}")}}],
                        **kind.connector}
                    extra += ["--kv-transfer-config", json.dumps({
                        "kv_connector": "LMTierConnector", "kv_connector_module_path": "lmtier.integrations.vllm",
                        "kv_role": "kv_both", "kv_connector_extra_config": tiers})]
                t0 = time.perf_counter()
                logs = args.logs or root
                logs.mkdir(parents=True, exist_ok=True)
                dev = {"VLLM_SERVER_DEV_MODE": "1"} if kind.reset_after_warm_up else {}
                server = Server(model, logs / f"{name}-{r}.log", {**env, **dev}, extra, args.dtype)
                try:
                    warm_seed = r if args.warm_up == "same" else 1000 + r
                    _bench(server.port, model, args, warm_seed, root / f"warm-{name}-{r}.json")
                    if kind.reset_after_warm_up:
                        _reset_prefix_cache(server.port)
                    results[name].append(_bench(server.port, model, args, r, logs / f"{name}-{r}.json"))
                finally:
                    server.stop()
                res = results[name][-1]
                print(f"-- round {r + 1} {name}: TTFT mean {res['mean_ttft_ms']:.1f} ms, p50 "
                      f"{res['median_ttft_ms']:.1f} ms ({time.perf_counter() - t0:.0f} s)", flush=True)
    # ratios within a round only (the three servers ran minutes apart; the machine's load moves
    # between rounds): speedups against that round's baseline, lmtier's share of the prefix cache's
    rows = []
    for name, runs in results.items():
        rows.append([name, f"{median([run['mean_ttft_ms'] for run in runs]):.1f}",
                     f"{median([run['median_ttft_ms'] for run in runs]):.1f}",
                     f"{median([run['p99_ttft_ms'] for run in runs]):.1f}",
                     fmt_ratio(median([b["mean_ttft_ms"] / run["mean_ttft_ms"]
                                       for b, run in zip(results["baseline"], runs, strict=True)])),
                     fmt_ratio(median([b["median_ttft_ms"] / run["median_ttft_ms"]
                                       for b, run in zip(results["baseline"], runs, strict=True)]))])
    print()
    print_table(["server", "TTFT mean ms", "TTFT p50 ms", "TTFT p99 ms", "speedup (mean)", "speedup (p50)"], rows,
                title="vllm bench serve: TTFT medians over rounds; speedups: medians of per-round ratios")
    for name in results:
        if SERVERS[name].connector is None:
            continue
        for key, label in (("mean_ttft_ms", "mean"), ("median_ttft_ms", "p50"), ("p99_ttft_ms", "p99")):
            shares = [pc[key] / lm[key] for pc, lm in zip(results["vllm-prefix-cache"], results[name], strict=True)]
            print(f"{name}: share of vLLM's prefix-cache speedup ({label}), per round: "
                  f"{', '.join(f'{s:.1%}' for s in shares)}; median {median(shares):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
