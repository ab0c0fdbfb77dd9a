"""Configuration: YAML, env overrides, both validation phases, error messages naming key paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtier.config import LmtierConfig, load_config
from lmtier.errors import ConfigError
from lmtier.registry import BackendRegistry

GOOD = """\
chunk_tokens: 256
tiers:
  - {name: hot,  backend: cpu,  options: {max_bytes: 8GiB}}
  - {name: nvme, backend: disk, options: {root: /var/cache/lmtier, max_bytes: 200GiB}}
  - {name: shared, backend: redis, options: {url: "redis://127.0.0.1:6379/0"}, write: async}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lmtier.yaml"
    path.write_text(text)
    return path


def test_the_design_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD), env={})
    assert [t.name for t in cfg.tiers] == ["hot", "nvme", "shared"]
    assert cfg.tiers[2].write == "async" and cfg.tiers[0].options["max_bytes"] == "8GiB"


def test_no_source_uses_lmtier_config_then_the_embedded_default(tmp_path: Path) -> None:
    assert [t.backend for t in load_config(env={}).tiers] == ["cpu", "disk"]
    path = write(tmp_path, "tiers: [{name: only, backend: cpu}]\n")
    assert [t.name for t in load_config(env={"LMTIER_CONFIG": str(path)}).tiers] == ["only"]


def test_env_overrides_scalar_keys_top_level_and_per_tier(tmp_path: Path) -> None:
    env = {"LMTIER_CHUNK_TOKENS": "512", "LMTIER_TIERS__SHARED__WRITE": "through",
           "LMTIER_TIERS__NVME__OPTIONS__ROOT": "/data/kv", "LMTIER_REQUIRE_NATIVE": "1"}
    cfg = load_config(write(tmp_path, GOOD), env=env)
    assert cfg.chunk_tokens == 512
    assert cfg.tiers[2].write == "through"
    assert cfg.tiers[1].options["root"] == "/data/kv"
    with pytest.raises(ConfigError, match="no tier named 'ghost'"):
        load_config(write(tmp_path, GOOD), env={"LMTIER_TIERS__GHOST__WRITE": "async"})


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("tiers: [{name: a, backend: cpu, colour: red}]", r"tiers\[0\]\.colour: unknown key; allowed keys: backend"),
        ("tiers: [{name: a, backend: cpu}, {name: b, backend: cpu, write: maybe}]", r"tiers\[1\]\.write"),
        ("tiers: [{name: a, backend: cpu}, {name: a, backend: disk}]", "used twice"),
        ("tiers: [{name: a, backend: cpu, write: async}]", "hottest"),
        ("tiers: []", "tiers"),
        ("chunk_tokens: -1\ntiers: [{name: a, backend: cpu}]", "chunk_tokens"),
        ("tiers: [{name: 'Bad Name', backend: cpu}]", r"tiers\[0\]\.name"),
        ("just a string", "top level must be a mapping"),
        ("tiers: [", "not valid YAML"),
    ],
)
def test_phase_one_errors_name_the_key_path(tmp_path: Path, yaml_text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, yaml_text), env={})


def test_a_missing_file_says_where_it_looked() -> None:
    with pytest.raises(ConfigError, match=r"cannot read lmtier config /nonexistent\.yaml"):
        load_config("/nonexistent.yaml", env={})


def test_phase_two_validates_options_against_the_backend_model() -> None:
    reg = BackendRegistry.discover()
    cfg = load_config({"tiers": [{"name": "hot", "backend": "cpu", "options": {"max_bytes": "1GiB"}},
                                 {"name": "two", "backend": "cpu", "options": {"max_bytez": 1}}]}, env={})
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.options\.max_bytez: unknown key; allowed keys: max_bytes, pinned"):
        cfg.validate_backends(reg)
    cfg = load_config({"tiers": [{"name": "x", "backend": "warp-drive"}]}, env={})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.backend: unknown backend 'warp-drive'; known backends: .*cpu"):
        cfg.validate_backends(reg)


def test_a_ready_config_object_passes_through() -> None:
    cfg = LmtierConfig.model_validate({"tiers": [{"name": "a", "backend": "cpu"}]})
    assert load_config(cfg) is cfg


def test_only_variables_that_name_config_keys_count_as_overrides(tmp_path: Path) -> None:
    from lmtier.config import env_overrides

    env = {"LMTIER_LOG_LEVEL": "DEBUG", "LMTIER_TIERS__NVME__OPTIONS__ROOT": "/data/kv",
           "LMTIER_DISABLE_NATIVE": "1", "LMTIER_REQUIRE_NATIVE": "1", "LMTIER_CONFIG": "x.yaml",
           "LMTIER_DISABLE_PLUGIN_AUTOLOAD": "0", "LMTIER_NOT_A_KEY": "1", "PATH": "/bin"}
    assert env_overrides(env) == ["LMTIER_LOG_LEVEL", "LMTIER_TIERS__NVME__OPTIONS__ROOT"]
    cfg = load_config(write(tmp_path, GOOD), env=env)
    assert cfg.log_level == "DEBUG" and cfg.tiers[1].options["root"] == "/data/kv"


@pytest.mark.parametrize("raw", ["{", "[1", "a: b: c", "!!python/name:os.system", "*x", "1\x002"])
def test_an_environment_value_that_is_not_a_yaml_scalar_is_a_config_error_naming_the_variable(
    tmp_path: Path, raw: str
) -> None:
    with pytest.raises(ConfigError, match=r"^LMTIER_CHUNK_TOKENS=.* is not a YAML scalar .*; the value must be"):
        load_config(write(tmp_path, GOOD), env={"LMTIER_CHUNK_TOKENS": raw})


def test_a_validation_error_names_the_variable_that_set_the_key(tmp_path: Path) -> None:
    env = {"LMTIER_TIERS__NVME__QUEUE_DEPTH": "0", "LMTIER_TIERS__HOT__OPTIONS__MAX_BYTES": "lots"}
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.queue_depth: .* \(set by LMTIER_TIERS__NVME__QUEUE_DEPTH\)"):
        load_config(write(tmp_path, GOOD), env=env)
    cfg = load_config(write(tmp_path, GOOD), env={"LMTIER_TIERS__HOT__OPTIONS__MAX_BYTES": "lots"})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.options\.max_bytes: .* \(set by LMTIER_TIERS__HOT__OPTIONS__MAX_BYTES\)"):
        cfg.validate_backends(BackendRegistry.discover())


@pytest.mark.parametrize("var", ["LMTIER_TIERS__HOT", "LMTIER_TIERS", "LMTIER_TIERS__HOT__"])
def test_a_tier_variable_without_a_key_is_refused_not_ignored(tmp_path: Path, var: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}: .*LMTIER_TIERS__HOT__WRITE=async"):
        load_config(write(tmp_path, GOOD), env={var: "x"})


def test_a_config_file_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.encode() + "# café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text \(byte 0xe9 at offset \d+\); save"):
        load_config(path, env={})


def test_sizes_beyond_the_machines_memory_are_refused_saying_how_much_there_is() -> None:
    from lmtier.limits import memory_limit

    limit = memory_limit()
    too_big = limit.bytes + (1 << 30)
    with pytest.raises(ConfigError, match=r"host_pool_bytes: .*more memory than there is: .*of RAM"):
        load_config({"host_pool_bytes": too_big, "tiers": [{"name": "a", "backend": "cpu"}]}, env={})
    cfg = load_config({"tiers": [{"name": "a", "backend": "cpu", "options": {"max_bytes": too_big}}]}, env={})
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.options\.max_bytes: .*more memory than there is"):
        cfg.validate_backends(BackendRegistry.discover())
    assert "RAM" in limit.described and limit.bytes > 0


def test_a_cpu_tier_larger_than_the_memory_free_now_is_a_capacity_error_naming_the_tier_before_allocating() -> None:
    import asyncio

    from lmtier.errors import CapacityError
    from lmtier.limits import memory_available, memory_limit

    free = memory_available()
    if free is None or free.bytes + (1 << 30) > memory_limit().bytes:
        pytest.skip("needs a machine with at least 1 GiB more RAM than is free now (the config check is "
                    "for sizes beyond the whole machine)")
    asked = free.bytes + (512 << 20)  # fits the machine, not what is free: refused before torch allocates it
    config = {"tiers": [{"name": "ram", "backend": "cpu", "options": {"max_bytes": asked, "pinned": False}}]}
    with pytest.raises(CapacityError, match=r"^tier 'ram' \(tiers\[0\]\): cpu tier: max_bytes=[\d.]+ GiB is more "
                                            r"memory than is free: [\d.]+ GiB available now \(of [\d.]+ GiB\); lower"):
        asyncio.run(_open(config))


async def _open(config: dict[str, object]) -> object:
    from prometheus_client import CollectorRegistry

    from lmtier.manager import StorageManager

    return await StorageManager.from_config(config, metrics_registry=CollectorRegistry())


def test_lmtier_serve_refuses_a_slab_larger_than_the_memory_free_now_naming_the_tier(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry

    from lmtier import limits
    from lmtier.errors import CapacityError
    from lmtier.metrics import Metrics
    from lmtier.server.cache import SlabCache

    # the fault: a machine with 64 MiB available (MemAvailable as the kernel reports it)
    monkeypatch.setattr(limits, "_meminfo_bytes", lambda field: 64 << 20 if field == "MemAvailable" else None)
    monkeypatch.setattr(limits, "_cgroup_headroom", lambda: None)
    config = {"tiers": [{"name": "slab", "backend": "cpu", "options": {"max_bytes": "128MiB", "pinned": False}}]}
    with pytest.raises(CapacityError, match=r"^tier 'slab' \(tiers\[0\], the server's shared slab\): "
                                            r"max_bytes=128.0 MiB is more memory than is free: 64.0 MiB available now"):
        asyncio.run(SlabCache.open(config, metrics=Metrics(CollectorRegistry())))


SERVER = "chunk_tokens: 256\nserver: unix:///run/lmtier/lmtier.sock\n"


def test_server_deadlines_come_from_the_yaml_as_one_number_or_per_kind(tmp_path: Path) -> None:
    defaults = load_config(write(tmp_path, SERVER), env={}).server_timeout_s
    assert (defaults.lookup, defaults.fetch, defaults.reserve, defaults.commit, defaults.flush,
            defaults.connect) == (0.5, 5.0, 0.5, 30.0, 60.0, 2.0)
    every = load_config(write(tmp_path, SERVER + "server_timeout_s: 0.25\n"), env={}).server_timeout_s
    assert set(every.model_dump().values()) == {0.25}
    some = load_config(write(tmp_path, SERVER + "server_timeout_s: {lookup: 0.1, fetch: 2}\n"), env={})
    assert (some.server_timeout_s.lookup, some.server_timeout_s.fetch, some.server_timeout_s.commit) == (0.1, 2.0, 30.0)


def test_server_deadlines_can_be_overridden_from_the_environment_one_kind_at_a_time(tmp_path: Path) -> None:
    path = write(tmp_path, SERVER + "server_timeout_s: 0.25\n")
    env = {"LMTIER_SERVER_TIMEOUT_S__LOOKUP": "0.1", "LMTIER_SERVER_TIMEOUT_S": "3"}
    d = load_config(path, env=env).server_timeout_s
    assert (d.lookup, d.fetch, d.connect) == (0.1, 3.0, 3.0), "the one number first, then the kind"
    from lmtier.config import env_overrides

    assert env_overrides(env) == ["LMTIER_SERVER_TIMEOUT_S", "LMTIER_SERVER_TIMEOUT_S__LOOKUP"]
    with pytest.raises(ConfigError, match=r"server_timeout_s\.fetch: .*greater than 0.* \(set by LMTIER_SERVER_TIMEOUT_S__FETCH\)"):
        load_config(path, env={"LMTIER_SERVER_TIMEOUT_S__FETCH": "0"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", r"server_timeout_s: .*finite number of seconds > 0"),
        ("-1", r"server_timeout_s: .*finite number of seconds > 0"),
        (".inf", r"server_timeout_s: .*finite number of seconds > 0"),
        ("true", r"server_timeout_s: .*number of seconds or a mapping of \{lookup, fetch, reserve, commit, flush, connect\}"),
        ("soon", r"server_timeout_s: .*number of seconds or a mapping of"),
        ("{lookups: 1}", r"server_timeout_s\.lookups: unknown key; allowed keys: commit, connect, fetch, flush, lookup, reserve"),
        ("{fetch: .nan}", r"server_timeout_s\.fetch"),
        ("{commit: 0}", r"server_timeout_s\.commit: .*greater than 0"),
        ("{flush: yes}", r"server_timeout_s\.flush: .*boolean"),
    ],
)
def test_a_bad_server_deadline_is_a_config_error_naming_the_key(tmp_path: Path, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, SERVER + f"server_timeout_s: {value}\n"), env={})


def test_per_process_gives_each_disk_tier_its_own_root_subdirectory(tmp_path: Path) -> None:
    from lmtier.errors import InvalidArgumentError

    cfg = load_config(write(tmp_path, GOOD), env={"LMTIER_TIERS__NVME__OPTIONS__ROOT": "/data/kv"})
    rank = cfg.per_process("tp1-pp0")
    assert [t.options.get("root") for t in rank.tiers] == [None, "/data/kv/tp1-pp0", None]
    assert rank.tiers[0] == cfg.tiers[0] and rank.tiers[2] == cfg.tiers[2]
    assert cfg.tiers[1].options["root"] == "/data/kv", "the shared config is left as it was"
    assert cfg.per_process("") is cfg
    server = load_config({"server": "unix:///run/lmtier.sock"}, env={})
    assert server.per_process("tp0").tiers == []
    for bad in ("a/b", "..", "."):
        with pytest.raises(InvalidArgumentError, match="one directory name"):
            cfg.per_process(bad)
    # errors about keys an override set still name the variable in the per-process copy
    bad_root = load_config(write(tmp_path, GOOD), env={"LMTIER_TIERS__NVME__OPTIONS__MAX_BYTES": "lots"})
    with pytest.raises(ConfigError, match=r"\(set by LMTIER_TIERS__NVME__OPTIONS__MAX_BYTES\)"):
        bad_root.per_process("tp1").validate_backends(BackendRegistry.discover())
