"""Registration, option validation and the missing-NIXL error: none of these need NIXL itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtier.errors import ConfigError, PluginError
from lmtier.registry import BackendRegistry
from lmtier_backends.nixl import _nixl

POSIX = {"plugin": "posix", "posix": {"root": "/tmp/lmtier-nixl-unused"}}
OBJ = {"bucket": "kv-cache", "endpoint_override": "http://127.0.0.1:8333"}


def test_the_entry_point_registers_the_backend_with_its_install_hint() -> None:
    registry = BackendRegistry.discover()
    assert "nixl" in registry.names(), registry.load_errors
    assert registry.spec("nixl").install_hint == "pip install 'lmtier[nixl]'"


@pytest.mark.parametrize(("options", "message"), [
    ({"plugin": "posix"}, "plugin 'posix' needs its section"),
    ({**POSIX, "obj": OBJ}, "section 'obj' is set but plugin is 'posix'"),
    ({"plugin": "gds", "posix": {"root": "/x"}}, r"options\.plugin"),
    ({"plugin": "obj", "obj": {**OBJ, "access_key": "k"}}, "both access_key and secret_key"),
    ({"plugin": "obj", "obj": {**OBJ, "scheme": "https"}}, "contradicts endpoint_override"),
    ({"plugin": "obj", "obj": {**OBJ, "bucket": "Not_A_Bucket"}}, r"options\.obj\.bucket"),
    ({**POSIX, "staging_slab_bytes": "64MiB", "max_staging_bytes": "32MiB"}, "at least staging_slab_bytes"),
    ({**POSIX, "posix": {"root": "/x", "rooot": "/y"}}, r"options\.posix\.rooot: unknown key"),
])
def test_bad_options_are_config_errors_naming_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BackendRegistry.discover().validate_options("nixl", options)


def test_the_obj_scheme_defaults_to_the_endpoints() -> None:
    config = BackendRegistry.discover().validate_options("nixl", {"plugin": "obj", "obj": OBJ})
    assert config.obj.scheme == "http"  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_missing_nixl_is_a_plugin_error_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_nixl, "PACKAGES", ("lmtier_no_such_nixl",))
    with pytest.raises(PluginError, match=r"pip install 'lmtier\[nixl\]'"):
        await BackendRegistry.discover().create("nixl", {"plugin": "posix", "posix": {"root": str(tmp_path)}})
