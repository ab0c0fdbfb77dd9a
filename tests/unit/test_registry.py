"""Backend registry: entry points, lazy imports, install hints, duplicates, programmatic plugins."""

from __future__ import annotations

import sys
import types

import pytest

from lmtier import BackendSpec, hookimpl
from lmtier.errors import PluginError
from lmtier.registry import BackendRegistry


def test_built_in_backends_register_through_entry_points() -> None:
    reg = BackendRegistry.discover()
    assert {"cpu", "disk"} <= set(reg.names())
    assert reg.origin("cpu") == "entrypoint:cpu"


def test_autoload_can_be_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert BackendRegistry.discover().names() == []


def _plugin_module(name: str, specs: list[BackendSpec]) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def lmtier_backend_specs() -> list[BackendSpec]:
        return specs

    module.lmtier_backend_specs = lmtier_backend_specs  # type: ignore[attr-defined]
    return module


def test_a_plugin_object_can_be_registered_programmatically() -> None:
    reg = BackendRegistry.discover(autoload=False)
    reg.register_plugin(_plugin_module("my_plugin", [
        BackendSpec("mine", "lmtier_backends.cpu.backend:CpuBackend", "lmtier_backends.cpu.config:CpuConfig")]))
    assert reg.names() == ["mine"]
    assert reg.config_model("mine").__name__ == "CpuConfig"


def test_a_duplicate_backend_name_is_refused_naming_both_origins() -> None:
    reg = BackendRegistry.discover()
    with pytest.raises(PluginError, match="'cpu' is provided twice: by entrypoint:cpu and by dup"):
        reg.register_plugin(_plugin_module("dup", [BackendSpec("cpu", "x:y", "x:z")]), name="dup")


@pytest.mark.asyncio
async def test_a_missing_extra_surfaces_the_install_hint() -> None:
    reg = BackendRegistry.discover(autoload=False)
    reg.register(BackendSpec("ghost", "lmtier_ghost_client.backend:Ghost",
                             "lmtier_backends.cpu.config:CpuConfig", install_hint="pip install 'lmtier[ghost]'"))
    with pytest.raises(PluginError, match=r"install it with: pip install 'lmtier\[ghost\]'"):
        await reg.create("ghost", {})


def test_plugin_modules_stay_cheap_to_import() -> None:
    heavy = {"torch", "redis", "boto3", "nixl", "vllm"}
    code = ("import sys; from lmtier.registry import BackendRegistry; BackendRegistry.discover(); "
            f"print(sorted(m for m in {sorted(heavy)!r} if m in sys.modules))")
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"discovering backends imported heavy modules: {out}"


def test_specs_must_be_backend_spec_objects() -> None:
    reg = BackendRegistry.discover(autoload=False)
    with pytest.raises(PluginError, match="must return BackendSpec"):
        reg.register_plugin(_plugin_module("bad", [("cpu", "x:y")]))  # type: ignore[list-item]
