"""The wire protocol module on its own: frames, typed decoding, errors that name what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from lmtier.keys import ChunkKey, make_namespace
from lmtier.server import protocol as p

REPO = Path(__file__).resolve().parents[2]
SERVER_MODULES = ["lmtier.server", "lmtier.server.protocol", "lmtier.server.slab", "lmtier.server.holdings",
                  "lmtier.server.cache", "lmtier.server.client", "lmtier.server.daemon", "lmtier.server.http",
                  "lmtier.cli.serve"]


def test_a_request_round_trips_through_one_length_prefixed_frame() -> None:
    key = ChunkKey(make_namespace(t="p"), bytes(range(16)))
    raw = p.encode_key(key.namespace, key.digest)
    frame = p.encode(p.Fetch(id=7, keys=[raw], sizes=[4096]))
    (n,) = p.FRAME_HEADER.unpack_from(frame)
    assert n == len(frame) - 4
    req = p.decode_request(frame[4:])
    assert isinstance(req, p.Fetch) and req.id == 7 and req.sizes == [4096]
    assert ChunkKey(*p.decode_key(req.keys[0])) == key


@pytest.mark.parametrize(("body", "code", "request_id", "says"), [
    (b"\xc1", p.E_BAD_MESSAGE, 0, "not MessagePack"),
    (msgspec.msgpack.encode([1, 2]), p.E_BAD_MESSAGE, 0, "must be a map"),
    (msgspec.msgpack.encode({"op": "teleport", "id": 4}), p.E_UNKNOWN_OP, 4, "unknown op 'teleport'"),
    (msgspec.msgpack.encode({"op": "lookup", "id": 5, "keys": 3}), p.E_BAD_MESSAGE, 5, "$.keys"),
    (msgspec.msgpack.encode({"op": "lookup", "id": 6, "keys": [b"short"]}), p.E_BAD_MESSAGE, 6, "$.keys[0]"),
    (msgspec.msgpack.encode({"op": "reserve", "id": 8, "sizes": [0]}), p.E_BAD_MESSAGE, 8, ">= 1"),
    (msgspec.msgpack.encode({"op": "ping", "id": 0}), p.E_BAD_MESSAGE, 0, "$.id"),
])
def test_a_body_that_is_not_a_valid_request_is_a_typed_error_naming_what_is_wrong(
        body: bytes, code: str, request_id: int, says: str) -> None:
    with pytest.raises(p.ServerError) as err:
        p.decode_request(body)
    assert err.value.code == code and err.value.request_id == request_id
    assert says in str(err.value)


def test_the_namespace_op_carries_a_kv_namespace_and_its_reply_the_namespace_to_key_under() -> None:
    req = p.Namespace(id=9, model="m", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=2,
                      block_size=16, num_kv_heads=2, head_size=64, page_bytes=8192, chunk_tokens=256,
                      extra=[("salt", "tenant"), ("lora", "a")])
    got = p.decode_request(p.encode(req)[4:])
    assert got == req and isinstance(got, p.Namespace) and got.extra == [("salt", "tenant"), ("lora", "a")]
    body = msgspec.msgpack.encode({"op": "namespace", "id": 9, "namespace": "00" * 8, "lossy_codecs": "fp8/vector"})
    assert p.decode_reply(body) == p.NamespaceReply(id=9, namespace="00" * 8, lossy_codecs="fp8/vector")
    minimal = msgspec.msgpack.encode({"op": "namespace", "id": 3, "namespace": "ab" * 8})  # an exact server's
    assert p.decode_reply(minimal) == p.NamespaceReply(id=3, namespace="ab" * 8)


def test_unknown_fields_are_ignored_so_a_minor_revision_can_add_optional_ones() -> None:
    body = msgspec.msgpack.encode({"op": "ping", "id": 3, "priority": "high"})
    assert p.decode_request(body) == p.Ping(id=3)


def test_a_lookup_reply_carries_read_costs_and_the_client_keeps_only_sound_ones() -> None:
    from lmtier.server.client import _read_costs

    reply = p.LookupReply(id=4, hit_chunks=1, tiers=["local"], read_costs={"local": [0.001, 1e-9, 8.0]})
    got = p.decode_reply(p.encode(reply)[4:])
    assert got == reply
    costs = _read_costs(got.read_costs)  # type: ignore[union-attr]
    assert costs["local"].latency_s == 0.001 and costs["local"].bytes_per_s == pytest.approx(1e9)
    assert costs["local"].samples == 8
    # a server that predates the field: no costs (the client loads every hit, as before)
    old = p.decode_reply(msgspec.msgpack.encode({"op": "lookup", "id": 5, "hit_chunks": 0}))
    assert isinstance(old, p.LookupReply) and old.read_costs == {} and _read_costs(old.read_costs) == {}
    bad = {"nan": [float("nan"), 0.0, 1.0], "inf": [0.0, float("inf"), 1.0], "neg": [-1.0, 0.0, 1.0],
           "short": [0.0, 1.0], "ok": [0.0, 0.0, 2.0]}
    assert set(_read_costs(bad)) == {"ok"}


def test_the_version_of_a_hello_of_any_version_is_readable() -> None:
    body = msgspec.msgpack.encode({"op": "hello", "id": 1, "version": 99, "pid": 1, "future_field": [1]})
    assert p.decode_hello_version(body) == (1, 99)
    assert p.decode_hello_version(msgspec.msgpack.encode({"op": "ping", "id": 1})) is None


def test_every_request_and_reply_is_documented_and_every_op_has_a_request() -> None:
    requests = {cls.__struct_config__.tag: cls for cls in p.Request.__args__}  # type: ignore[attr-defined]
    assert set(requests) == p.OPS
    for cls in (*requests.values(), *p.Reply.__args__):  # type: ignore[attr-defined]
        assert cls.__name__ in p.__all__
    for cls in requests.values():
        assert cls.__doc__ and len(cls.__doc__) > 30, f"{cls.__name__} needs its semantics documented"


def test_the_server_modules_have_all_and_import_no_torch_and_do_no_io() -> None:
    code = (
        "import sys, json, builtins, os, socket\n"
        "import msgspec, aiohttp.web, numpy, pydantic, prometheus_client, yaml  # third parties first\n"
        "seen = []\n"
        "real_open = builtins.open\n"
        "builtins.open = lambda *a, **k: (seen.append(repr(a[:1])), real_open(*a, **k))[1]\n"
        f"mods = {SERVER_MODULES!r}\n"
        "import importlib\n"
        "missing = [m for m in mods if not hasattr(importlib.import_module(m), '__all__')]\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'missing_all': missing, 'opened': seen}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"torch": False, "missing_all": [], "opened": []}
