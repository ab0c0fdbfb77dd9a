"""The redis tier's options: URL forms, where credentials come from, and that they never show.

No server is needed: these validate ``RedisConfig`` directly and through the registry (whose
ConfigError prints every offending input, so a leak would show there first).
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from lmtier.errors import ConfigError
from lmtier.registry import BackendRegistry
from lmtier_backends.redis.config import RedisConfig

SECRET = "pw-Zq81-secret"


def _validate(**options: Any) -> RedisConfig:
    """Options as a YAML file gives them, validated by the registry (errors become ConfigError)."""
    config = BackendRegistry.discover().validate_options("redis", options, path="tiers[0].options")
    assert isinstance(config, RedisConfig)
    return config


def _config_error(**options: Any) -> str:
    with pytest.raises(ConfigError) as info:
        _validate(**options)
    text = str(info.value)
    assert SECRET not in text, f"the password leaked into the error: {text}"
    return text


@pytest.mark.parametrize(("url", "db", "tls"), [
    ("redis://127.0.0.1:6379/0", 0, False),
    ("redis://cache.internal/3", 3, False),
    ("rediss://cache.internal:6380", 0, True),
    ("redis://[::1]:7000/1", 1, False),
    ("unix:///run/redis/redis.sock?db=2", 2, False),
    ("unix:///run/redis/redis.sock", 0, False),
])
def test_the_supported_url_forms_and_what_they_select(url: str, db: int, tls: bool) -> None:
    config = _validate(url=url)
    assert (config.url, config.db, config.tls) == (url, db, tls)


@pytest.mark.parametrize(("url", "complaint"), [
    ("http://127.0.0.1:6379/0", "must start with redis://"),
    ("127.0.0.1:6379", "must start with redis://"),
    ("redis:///0", "names no host"),
    ("unix://", "needs a socket path"),
    ("redis://h:notaport/0", "invalid port"),
    (f"redis://:{SECRET}@h:notaport/0", "invalid port"),  # not silently dropped with the password
    ("redis://h/cache", "database number"),
])
def test_a_bad_url_is_a_config_error_saying_what_is_wrong(url: str, complaint: str) -> None:
    assert complaint in _config_error(url=url)


@pytest.mark.parametrize(("url", "username", "host_part"), [
    (f"redis://:{SECRET}@10.0.0.5:6379/0", None, "10.0.0.5:6379"),
    (f"redis://kv:{SECRET}@10.0.0.5:6379/0", "kv", "10.0.0.5:6379"),
    (f"rediss://kv:{SECRET}@[::1]:6380/0", "kv", "[::1]:6380"),
])
def test_credentials_in_the_url_move_out_of_it_and_never_show(url: str, username: str | None,
                                                              host_part: str) -> None:
    config = _validate(url=url)
    assert config.password is not None and config.password.get_secret_value() == SECRET
    assert config.username == username
    assert config.url == url.replace(f"{username or ''}:{SECRET}@", "")
    assert host_part in config.url
    for shown in (config.url, repr(config), str(config), config.display_url(), config.model_dump_json()):
        assert SECRET not in shown
    assert config.display_url() == url.replace(f":{SECRET}@", "@" if username else "")  # the user only


def test_escaped_characters_in_url_credentials_are_decoded() -> None:
    config = _validate(url="redis://a%40b:p%3Aw%40rd@h:1/0")
    assert config.username == "a@b"
    assert config.password is not None and config.password.get_secret_value() == "p:w@rd"
    assert config.url == "redis://h:1/0"


def test_a_password_in_a_unix_socket_url_keeps_the_url_usable() -> None:
    config = _validate(url=f"unix://:{SECRET}@/run/redis.sock?db=4")
    assert config.url == "unix:///run/redis.sock?db=4" and config.db == 4
    assert config.password is not None and config.password.get_secret_value() == SECRET


@pytest.mark.parametrize(("options", "complaint"), [
    ({"url": f"redis://:{SECRET}@h/0", "password": SECRET}, "url carries a password and password"),
    ({"url": f"redis://:{SECRET}@h/0", "password_env": "REDIS_PW"}, "url carries a password and password_env"),
    ({"url": f"redis://kv:{SECRET}@h/0", "username": "other"}, "url carries a username"),
    ({"password": SECRET, "password_env": "REDIS_PW"}, "either password or password_env"),
    ({"password_env": "not a name"}, "password_env"),
    ({"password": 12345678}, "must be a string"),  # an unquoted YAML number
])
def test_a_password_given_twice_or_badly_is_refused_without_showing_it(options: dict[str, Any],
                                                                        complaint: str) -> None:
    assert complaint in _config_error(**options)
    if options.get("password") == 12345678:
        assert "12345678" not in _config_error(**options)


def test_the_same_username_in_the_url_and_the_options_is_fine() -> None:
    assert _validate(url="redis://kv:x@h/0", username="kv").username == "kv"


def test_password_env_is_read_when_the_tier_opens_and_an_unset_one_says_which() -> None:
    config = _validate(url="redis://h/0", password_env="LMTIER_T_PW")
    assert config.resolve_password({"LMTIER_T_PW": SECRET}) == SECRET
    with pytest.raises(ConfigError, match=r"LMTIER_T_PW.*not set"):
        config.resolve_password({})
    assert _validate(url="redis://h/0").resolve_password({}) is None


@pytest.mark.parametrize(("options", "complaint"), [
    ({"url": "unix:///run/redis.sock", "cluster": True}, "not unix://"),
    ({"url": "redis://h:7000/2", "cluster": True}, "only database 0"),
    ({"key_prefix": "kv:{tag}:"}, "hash tag"),
    ({"key_prefix": "kv prefix"}, "whitespace"),
    ({"ttl_s": 0}, "ttl_s"),
    ({"max_connections": 0}, "max_connections"),
    ({"read_timeout_s": 0}, "read_timeout_s"),
    ({"connect_timeout_s": -1}, "connect_timeout_s"),
    ({"recv_pool_bytes": -1}, "recv_pool_bytes"),
    ({"pool_size": 8}, "unknown key"),
])
def test_bad_options_are_config_errors_naming_the_option(options: dict[str, Any], complaint: str) -> None:
    assert complaint in _config_error(**options)


def test_defaults_and_human_sizes() -> None:
    config = _validate(recv_pool_bytes="64MiB", ttl_s=3600, cluster=True, url="redis://h:7000")
    assert config.recv_pool_bytes == 64 << 20 and config.ttl_s == 3600 and config.cluster
    default = RedisConfig()
    assert (default.url, default.key_prefix, default.max_connections) == ("redis://127.0.0.1:6379/0", "lmtier:", 8)
    assert default.ttl_s is None and default.connect_at_open and default.tls_verify


def test_pydantic_errors_from_direct_construction_mask_url_credentials_too() -> None:
    with pytest.raises(ValidationError) as info:
        RedisConfig(url=f"redis://:{SECRET}@h/0", password_env="REDIS_PW")
    assert SECRET not in str(info.value) and SECRET not in repr(info.value.errors())
