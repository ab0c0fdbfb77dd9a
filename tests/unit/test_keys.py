"""Chunk keys: chaining, namespaces, storage-safe strings, cross-process stability."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmtier.errors import InvalidArgumentError
from lmtier.keys import ChunkKey, KVNamespace, chunk_keys, chunk_spans, make_namespace, partial_keys

NS = make_namespace(model="m", layout="l")


def test_a_key_names_its_whole_prefix() -> None:
    a = chunk_keys(list(range(512)), NS, 256)
    b = chunk_keys([7, *range(1, 512)], NS, 256)
    assert len(a) == 2 and a[1] != b[1], "a change in chunk 0 must change chunk 1's key"
    c = chunk_keys(list(range(256)) + [9] * 256, NS, 256)
    assert a[0] == c[0] and a[1] != c[1]


def test_token_container_types_give_the_same_keys() -> None:
    tokens = list(range(1000))
    ref = chunk_keys(tokens, NS, 100)
    assert chunk_keys(np.array(tokens, dtype=np.int32), NS, 100) == ref
    assert chunk_keys(torch.tensor(tokens), NS, 100) == ref
    assert chunk_keys(tuple(tokens), NS, 100) == ref


def test_a_partial_last_chunk_gets_a_key_only_on_request_and_never_aliases_a_full_one() -> None:
    full = chunk_keys(list(range(600)), NS, 256)
    with_partial = chunk_keys(list(range(600)), NS, 256, include_partial=True)
    assert len(full) == 2 and len(with_partial) == 3 and with_partial[:2] == full
    grown = chunk_keys(list(range(768)), NS, 256)
    assert with_partial[2] != grown[2]
    assert chunk_spans(600, 256) == [(0, 256), (256, 512), (512, 600)]


def test_partial_keys_are_the_keys_chunk_keys_gives_each_partial_last_chunk() -> None:
    toks = np.random.default_rng(4).integers(0, 50_000, 700)
    ends = [700, 699, 600, 513, 255, 1]
    assert partial_keys(toks, NS, 256, ends) == [chunk_keys(toks[:e], NS, 256, include_partial=True)[-1] for e in ends]
    assert partial_keys(toks, NS, 256, []) == []
    for bad in (512, 0, 701, -3):  # a whole chunk's end, nothing, past the tokens
        with pytest.raises(InvalidArgumentError, match="partial chunk's end"):
            partial_keys(toks, NS, 256, [bad])


def test_namespaces_separate_models_and_layouts() -> None:
    tokens = list(range(256))
    other = make_namespace(model="m", layout="other")
    assert chunk_keys(tokens, NS, 256)[0].digest != chunk_keys(tokens, other, 256)[0].digest
    base = dict(model="q", kv_layout="vllm_blocks_first", dtype="bfloat16", num_layers=36, block_size=16,
                num_kv_heads=8, head_size=128, page_bytes=65536, chunk_tokens=256)
    assert KVNamespace(**base).namespace != KVNamespace(**{**base, "tp_rank": 1}).namespace
    assert KVNamespace(**base).namespace == KVNamespace(**base).namespace
    assert make_namespace(a=1, b=2) == make_namespace(b=2, a=1)


def test_str_of_a_key_is_storage_safe_and_parses_back() -> None:
    (key,) = chunk_keys(list(range(10)), NS, 10)
    text = str(key)
    assert set(text) <= set("0123456789abcdef-")
    assert ChunkKey.parse(text) == key
    for near in ("../../etc/passwd", f"{text}\n", f"{text}\r", f" {text}", f"{text}.tmp-0a"):
        with pytest.raises(InvalidArgumentError):  # the whole string, or it is not a key
            ChunkKey.parse(near)
    with pytest.raises(InvalidArgumentError):
        ChunkKey(NS + "\n", key.digest)


def test_malformed_keys_and_tokens_are_typed_errors() -> None:
    with pytest.raises(InvalidArgumentError):
        ChunkKey("UPPER", b"\x00" * 16)
    with pytest.raises(InvalidArgumentError):
        ChunkKey(NS, b"short")
    with pytest.raises(InvalidArgumentError):
        chunk_keys([[1, 2], [3, 4]], NS, 2)
    with pytest.raises(InvalidArgumentError):
        chunk_keys([1, 2], "not-a-namespace", 2)
    with pytest.raises(InvalidArgumentError):
        chunk_keys([1, 2], NS, 0)


@pytest.mark.parametrize(("tokens", "message"), [
    ([1.5, 2.7], "float is refused"),  # numpy would truncate to [1, 2]: the key of other tokens
    ([1, 2.0], "float is refused"),
    (np.array([1.0, 2.0]), "integers, got an array of float64"),
    (np.array([True, False]), "integers, got an array of bool"),
    ([2**70, 1], "below 2"),
    ([-(2**63) - 1], "below 2"),
    (np.array([2**63], dtype=np.uint64), "below 2"),
    (["1", "2"], "sequence of ints"),
    ([None], "sequence of ints"),
    (np.array([[1, 2]]), "1-D"),
])
def test_token_ids_that_are_not_int64_integers_are_refused_not_converted(tokens: object, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        chunk_keys(tokens, NS, 1)


def test_every_integer_form_of_the_same_tokens_makes_the_same_keys() -> None:
    import torch

    want = chunk_keys(np.array([5, 6, 7, 8], dtype=np.int64), NS, 2)
    for same in ([5, 6, 7, 8], (5, 6, 7, 8), iter([5, 6, 7, 8]), [np.int32(5), 6, np.int64(7), 8],
                 np.array([5, 6, 7, 8], dtype=np.uint16), torch.tensor([5, 6, 7, 8], dtype=torch.int32)):
        assert chunk_keys(same, NS, 2) == want
    assert chunk_keys([], NS, 2) == [] and chunk_keys(np.array([], dtype=np.float32), NS, 2) == []
    for bad in (True, 2.0, "2"):
        with pytest.raises(InvalidArgumentError, match="chunk_tokens must be an integer"):
            chunk_keys([1, 2], NS, bad)  # type: ignore[arg-type]


def test_two_interpreters_with_different_hash_seeds_make_the_same_keys() -> None:
    script = (
        "from lmtier.keys import chunk_keys, make_namespace;"
        "ns = make_namespace(model='m', dtype='bf16');"
        "print(','.join(str(k) for k in chunk_keys(list(range(3000)), ns, 256)))"
    )
    outputs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.append(subprocess.run([sys.executable, "-c", script], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    assert outputs[0] == outputs[1] and outputs[0].count(",") == 10
