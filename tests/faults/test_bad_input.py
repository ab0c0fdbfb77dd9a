"""Hostile input (issue 14, items 5 and 6): every case is a typed error that names what to fix, and
``lmtier config validate`` answers each bad config with one line and exit code 2, never a
traceback. Nothing stored is lost along the way."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmtier.cli import main
from lmtier.errors import ConfigError, InvalidArgumentError
from lmtier.keys import ChunkKey, chunk_keys, make_namespace
from lmtier.limits import memory_limit
from tests.faults.ledger import FaultRecord

pytestmark = pytest.mark.faults
NS = make_namespace(test="bad-input")
HOT = {"name": "hot", "backend": "cpu", "options": {"max_bytes": "64MiB", "pinned": False}}


def _too_much_memory() -> int:
    return memory_limit().bytes + (1 << 40)


#: (case, the config's tiers or None for a good one, environment, what the one error line says)
CONFIG_CASES = [
    ("env not YAML: {", None, {"LMTIER_CHUNK_TOKENS": "{"}, "LMTIER_CHUNK_TOKENS='{' is not a YAML scalar"),
    ("env not YAML: [1", None, {"LMTIER_CHUNK_TOKENS": "[1"}, "is not a YAML scalar"),
    ("env not YAML: a: b: c", None, {"LMTIER_CHUNK_TOKENS": "a: b: c"}, "is not a YAML scalar"),
    ("env YAML tag", None, {"LMTIER_CHUNK_TOKENS": "!!python/name:os.system"}, "is not a YAML scalar"),
    ("env YAML alias", None, {"LMTIER_CHUNK_TOKENS": "*x"}, "is not a YAML scalar"),
    ("env NUL byte", None, {"LMTIER_TIERS__HOT__WRITE": "as\x01ync"}, "LMTIER_TIERS__HOT__WRITE="),
    ("env tier without key", None, {"LMTIER_TIERS__HOT": "x"}, "LMTIER_TIERS__HOT: name a tier and a key"),
    ("chunk_tokens: true", {"chunk_tokens": True}, {}, "chunk_tokens: Value error, must be a number, not the boolean"),
    ("env chunk_tokens true", None, {"LMTIER_CHUNK_TOKENS": "true"}, "(set by LMTIER_CHUNK_TOKENS)"),
    ("infinite timeout_s", {"tiers": [{**HOT, "timeout_s": float("inf")}]}, {},
     "tiers[0].timeout_s: Value error, a deadline must be a finite number of seconds > 0 (got inf)"),
    ("env .inf timeout_s", None, {"LMTIER_TIERS__HOT__TIMEOUT_S": ".inf"}, "(set by LMTIER_TIERS__HOT__TIMEOUT_S)"),
    ("infinite cooldown_s", {"tiers": [{**HOT, "breaker": {"cooldown_s": float("inf")}}]}, {},
     "tiers[0].breaker.cooldown_s: Value error, must be at most 3600 seconds"),
    ("env .inf max_cooldown_s", None, {"LMTIER_TIERS__HOT__BREAKER__MAX_COOLDOWN_S": ".inf"},
     "(set by LMTIER_TIERS__HOT__BREAKER__MAX_COOLDOWN_S)"),
    ("absurd queue_depth", {"tiers": [{**HOT, "queue_depth": 10**12}]}, {}, "tiers[0].queue_depth: Value error, must be at most"),
    ("absurd host_pool_bytes", {"host_pool_bytes": "1EiB"}, {}, "host_pool_bytes: Value error, 1.0 EiB"),
    ("cpu max_bytes 1TiB beyond RAM", {"tiers": [{**HOT, "options": {"max_bytes": "__too_much__"}}]}, {},
     "tiers[0].options.max_bytes: Value error,"),
    ("cpu max_bytes 10**30", {"tiers": [{**HOT, "options": {"max_bytes": 10**30}}]}, {},
     "1e+30 bytes is more memory than there is"),
    ("disk root empty", {"tiers": [HOT, {"name": "nvme", "backend": "disk", "options": {"root": ""}}]}, {},
     "tiers[1].options.root: Value error, root is empty"),
]


def _write_case(tmp_path: Path, overrides: dict | None) -> Path:
    config = {"chunk_tokens": 256, "tiers": [HOT]}
    for key, value in (overrides or {}).items():
        config[key] = value
    text = yaml.safe_dump(config).replace("__too_much__", str(_too_much_memory()))
    path = tmp_path / "lmtier.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("case", "overrides", "env", "says"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_validate_answers_a_bad_config_in_one_line_with_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str, overrides: dict | None, env: dict[str, str], says: str,
) -> None:
    path = _write_case(tmp_path, overrides)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert main(["config", "validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmtier: error: "), err
    assert says in lines[0], lines[0]


def test_config_validate_answers_a_file_that_is_not_utf8_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"tiers: [{name: hot, backend: cpu}]\n# caf\xe9\n")
    assert main(["config", "validate", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    offset = path.read_bytes().index(b"\xe9")
    assert line == f"lmtier: error: {path} is not UTF-8 text (byte 0xe9 at offset {offset}); save the config as UTF-8"


@pytest.mark.parametrize(("tokens", "says"), [
    ([1.5, 2.7], "float is refused"),
    (np.array([1.5, 2.7]), "integers, got an array of float64"),
    ([2**70], "below 2**63"),
    (np.array([2**64 - 1], dtype=np.uint64), "below 2**63"),
])
def test_token_ids_that_would_key_other_tokens_are_refused(tokens: object, says: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        chunk_keys(tokens, NS, 1)
    assert says in str(info.value)


@pytest.mark.parametrize("text", [lambda k: f"{k}\n", lambda k: f"{k} ", lambda k: f"{k}.tmp-aa", lambda k: str(k).upper()])
def test_a_key_string_must_be_exactly_a_key(text) -> None:
    key = ChunkKey(NS, os.urandom(16))
    with pytest.raises(InvalidArgumentError, match="not a chunk key string"):
        ChunkKey.parse(text(key))


def test_every_config_case_is_a_config_error_from_load_config_too(
    tmp_path: Path, ledger: Callable[[str], FaultRecord]
) -> None:
    from lmtier.config import load_config
    from lmtier.registry import BackendRegistry

    rec = ledger(f"bad config: {len(CONFIG_CASES) + 1} classes (env YAML, booleans, infinities, sizes, encoding)")
    registry = BackendRegistry.discover()
    for case, overrides, env, says in CONFIG_CASES:
        with pytest.raises(ConfigError) as info:
            load_config(_write_case(tmp_path, overrides), env=env).validate_backends(registry)
        rec.typed_error()
        assert says in " ".join(str(info.value).split()), case
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"tiers: [{name: hot, backend: cpu}]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1, env={})
    rec.typed_error()


def test_bad_token_ids_and_key_strings_are_typed_errors(ledger: Callable[[str], FaultRecord]) -> None:
    rec = ledger("bad keys: float / huge / boolean token ids, near-key strings")
    for tokens in ([1.5, 2.7], np.array([0.5]), [2**70], np.array([2**64 - 1], dtype=np.uint64), [True, None]):
        with pytest.raises(InvalidArgumentError):
            chunk_keys(tokens, NS, 1)
        rec.typed_error()
    key = ChunkKey(NS, os.urandom(16))
    for text in (f"{key}\n", f"{key} ", str(key).upper(), f"{key}.tmp-0a"):
        with pytest.raises(InvalidArgumentError):
            ChunkKey.parse(text)
        rec.typed_error()


@pytest.mark.asyncio
async def test_an_empty_value_is_refused_by_put_before_anything_is_written(
    tmp_path: Path, ledger: Callable[[str], FaultRecord]
) -> None:
    from prometheus_client import CollectorRegistry

    from lmtier.manager import StorageManager

    rec = ledger("bad put: an empty (0-byte) value in a batch")
    config = {"tiers": [HOT, {"name": "nvme", "backend": "disk", "options": {"root": str(tmp_path / "tier")}}]}
    async with await StorageManager.from_config(config, metrics_registry=CollectorRegistry()) as mgr:
        kept, fresh, empty = (ChunkKey(NS, os.urandom(16)) for _ in range(3))
        await mgr.put([(kept, b"stored before")])
        for value in (b"", bytearray(), np.empty(0, dtype=np.uint8), memoryview(b"")):
            with pytest.raises(InvalidArgumentError, match="empty values are refused"):
                await mgr.put([(fresh, b"x" * 100), (empty, value)])
            rec.typed_error()
        assert await mgr.contains([kept, fresh, empty]) == [True, False, False]  # the batch wrote nothing
        (got,) = await mgr.get([kept])
        rec.lost += got is None or bytes(got) != b"stored before"
        assert got is not None and bytes(got) == b"stored before"
