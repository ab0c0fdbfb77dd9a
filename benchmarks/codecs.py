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


async def tier_table(chunks: list[bytes], kinds: list[str], codecs: list[str], repeats: int) -> None:
    from prometheus_client import CollectorRegistry

    from lmtier.keys import KVNamespace, chunk_keys
    from lmtier.manager import StorageManager
    from tests.support.remote_tiers import RemoteTier, remote_available

    rows = []
    for kind in kinds:
        why = remote_available(kind)
        if why is not None:
            print(f"skipped {kind}: {why}")
            continue
        with tempfile.TemporaryDirectory() as tmp, RemoteTier(kind, tmp) as remote:
            base: dict[str, tuple[float, float]] = {}
            for codec in ["none", *codecs]:
                name, _, scales = codec.partition("/")
                spec: Any = {"name": name, **({"scales": scales} if scales else {})}
                cfg = {"chunk_tokens": 256, "tiers": [remote.tier(codec=spec, timeout_s=60.0)]}
                async with await StorageManager.from_config(cfg, metrics_registry=CollectorRegistry()) as m:
                    kv = KVNamespace(model=f"bench-{codec}", kv_layout="hf_vllm_kv_first", dtype="bfloat16",
                                     num_layers=GEO.num_layers, block_size=BLOCK, num_kv_heads=GEO.num_kv_heads,
                                     head_size=GEO.head_size, page_bytes=GEO.page_bytes, chunk_tokens=256)
                    kv = m.declare_lossy(kv)
                    m.register_namespace(kv)
                    raw = sum(map(len, chunks))
                    puts, gets = [], []
                    for r in range(repeats + 1):
                        keys = chunk_keys(list(range(256 * len(chunks))), kv.namespace, 256)
                        keys = [k.__class__(k.namespace, bytes([r]) + k.digest[1:]) for k in keys]
                        t0 = time.perf_counter()
                        await m.put(list(zip(keys, chunks, strict=True)))
                        t1 = time.perf_counter()
                        outs = [bytearray(len(c)) for c in chunks]
                        ok = await m.get_into(keys, outs)
                        t2 = time.perf_counter()
                        if r and all(ok):
                            puts.append(t1 - t0)
                            gets.append(t2 - t1)
                        await m.delete(keys)
                    put_rate, get_rate = raw / median(puts) / GB, raw / median(gets) / GB
                    if codec == "none":
                        base[kind] = (put_rate, get_rate)
                    bp, bg = base[kind]
                    rows.append([kind, codec, f"{put_rate:.2f}", fmt_ratio(put_rate / bp), f"{get_rate:.2f}",
                                 fmt_ratio(get_rate / bg)])
    print_table(["tier", "codec", "put GB/s (raw KV)", "vs none", "get_into GB/s", "vs none"], rows,
                title=f"remote tiers through a StorageManager, {len(chunks)} chunks per batch, median of {repeats}")


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


def gpu_onload(kv: Any, chunk_tokens: int, repeats: int) -> None:
    """H2D of raw chunks vs H2D of fp8 chunks + dequantize on the GPU (pinned host memory)."""
    import torch

    from lmtier.codecs.quant import _grouped_as  # the codec's own grouping
    from lmtier.registry import BackendRegistry

    geo = geometry(kv)
    chunks = chunks_of(kv, chunk_tokens)
    codec = BackendRegistry.discover().create_codec("fp8", {"scales": "vector"})
    raw = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).pin_memory()
    enc = []
    for c in chunks:
        buf = bytearray(codec.max_encoded_bytes(len(c), geo))
        enc.append(bytes(memoryview(buf)[: codec.encode(memoryview(c), memoryview(buf), geo)]))
    coded = torch.frombuffer(bytearray(b"".join(enc)), dtype=torch.uint8).pin_memory()
    dev_raw = torch.empty(raw.numel(), dtype=torch.uint8, device="cuda")
    dev_coded = torch.empty(coded.numel(), dtype=torch.uint8, device="cuda")
    out = torch.empty(raw.numel() // 2, dtype=torch.bfloat16, device="cuda")
    per = len(enc[0])
    elems = len(chunks[0]) // 2
    groups = elems // geo.head_size

    def onload_raw() -> None:
        dev_raw.copy_(raw, non_blocking=True)

    def onload_fp8() -> None:
        dev_coded.copy_(coded, non_blocking=True)
        for i in range(len(enc)):
            base = i * per + 32
            s = dev_coded[base: base + 4 * groups].view(torch.float32)
            q = dev_coded[base + 4 * groups: base + 4 * groups + elems]
            y = out[i * elems: (i + 1) * elems]
            qg, sg, yg = _grouped_as("vector", q, s, y, geo.num_layers, 0, geo)
            torch.mul(qg.view(torch.float8_e4m3fn).float(), sg, out=yg)

    rows = []
    for name, fn, nbytes in (("raw", onload_raw, raw.numel()), ("fp8 vector", onload_fp8, coded.numel())):
        times = []
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append([name, f"{nbytes / 1e6:.1f}", f"{raw.numel() / median(times[1:]) / GB:.2f}"])
    print_table(["chunks", "PCIe MB", "onload GB/s of raw KV"], rows,
                title=f"onload on {torch.cuda.get_device_name()}: {len(chunks)} chunks, median of {repeats}")


GEO: Any = None


def main(argv: list[str] | None = None) -> None:
    global GEO
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a transformers model directory (default: the tiny demo Llama)")
    p.add_argument("--tokens", type=int, default=1536, help="prompt tokens whose KV is measured")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunks", type=int, default=32, help="chunks per batch in the tier section")
    p.add_argument("--tiers", default="redis,s3", help="remote tiers to measure ('' for none)")
    p.add_argument("--tier-codecs", default="lz4,zstd,fp8,int8")
    p.add_argument("--quality", action="store_true", help="measure lossy codecs' effect on the model")
    p.add_argument("--quality-codecs", default="fp8/vector,fp8/block_head,fp8/layer,int8/vector,int8/block_head,int8/layer")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    import torch

    from lmtier.demo import build_tiny_llama

    print(machine_line())
    model_dir = args.model or str(build_tiny_llama("demo"))
    model, ids, kv = model_kv(model_dir, args.tokens, args.device)
    chunk = 256
    chunks = chunks_of(kv, chunk)
    GEO = geometry(kv)
    print(f"model {model_dir}: {kv.shape[0]} layers, {kv.shape[3]} KV heads x {kv.shape[4]}, "
          f"{len(chunks)} chunks of {chunk} tokens ({len(chunks[0]) / 1e6:.2f} MB each)")
    codec_table(chunks, GEO, args.repeats)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    kinds = [k for k in args.tiers.split(",") if k]
    if kinds:
        asyncio.run(tier_table((chunks * math.ceil(args.chunks / len(chunks)))[: args.chunks],
                               kinds, args.tier_codecs.split(","), args.repeats))
    if args.quality:
        quality(model, ids, kv, args.quality_codecs.split(","), args.gen_tokens)
    if args.device.startswith("cuda"):
        gpu_onload(kv, chunk, args.repeats)


if __name__ == "__main__":
    main()
