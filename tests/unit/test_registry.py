"""Backend registry: entry points, lazy imports, install hints, duplicates, programmatic plugins."""

from __future__ import annotations

import sys
import types

import pytest

from lmtier import BackendSpec, hookimpl
from lmtier.errors import ConfigError, PluginError
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


@pytest.mark.parametrize(("value", "disabled"), [
    ("1", True), ("true", True), ("YES", True), (" on ", True), ("anything", True),
    ("", False), ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False),
])
def test_the_autoload_switch_reads_like_a_boolean(monkeypatch: pytest.MonkeyPatch, value: str,
                                                   disabled: bool) -> None:
    monkeypatch.setenv("LMTIER_DISABLE_PLUGIN_AUTOLOAD", value)
    reg = BackendRegistry.discover()
    assert reg.autoloaded is not disabled
    assert ("cpu" in reg.names()) is not disabled


def test_with_autoload_off_plugins_registered_by_hand_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmtier_backends.cpu.plugin

    monkeypatch.setenv("LMTIER_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = BackendRegistry.discover()
    with pytest.raises(ConfigError, match=r"unknown backend 'cpu'; known backends: none\. Entry-point "
                                          r"discovery is off \(LMTIER_DISABLE_PLUGIN_AUTOLOAD is set"):
        reg.spec("cpu")
    reg.register_plugin(lmtier_backends.cpu.plugin)
    assert reg.names() == ["cpu"] and reg.validate_options("cpu", {"pinned": False}).pinned is False


def test_an_unknown_backend_lists_the_known_ones_a_close_match_and_how_to_add_one() -> None:
    reg = BackendRegistry.discover()
    with pytest.raises(ConfigError) as info:
        reg.spec("dsik")
    msg = str(info.value)
    assert msg.startswith("unknown backend 'dsik' (did you mean 'disk'?); known backends: cpu, disk")
    assert "pip-install the package that provides it" in msg and "'lmtier' group" in msg
    with pytest.raises(ConfigError, match=r"^unknown backend 'zzz'; known"):  # no close match, no guess
        reg.spec("zzz")


def test_a_plugin_is_registered_all_or_nothing() -> None:
    reg = BackendRegistry.discover()
    before = reg.names()
    two = _plugin_module("two", [BackendSpec("fresh", "x:y", "x:z"), BackendSpec("cpu", "x:y", "x:z")])
    with pytest.raises(PluginError, match="'cpu' is provided twice"):
        reg.register_plugin(two)
    assert reg.names() == before, "the plugin's other backend must not be half-registered"
    fixed = _plugin_module("two", [BackendSpec("fresh", "x:y", "x:z")])
    reg.register_plugin(fixed)  # the failed registration left nothing behind under its name
    assert "fresh" in reg.names()


def test_a_hook_that_raises_or_returns_a_non_list_is_a_plugin_error() -> None:
    reg = BackendRegistry.discover(autoload=False)
    raising = types.ModuleType("raising")

    @hookimpl
    def lmtier_backend_specs() -> list[BackendSpec]:
        raise RuntimeError("boom")

    raising.lmtier_backend_specs = lmtier_backend_specs  # type: ignore[attr-defined]
    with pytest.raises(PluginError, match=r"raising: lmtier_backend_specs\(\) raised RuntimeError: boom"):
        reg.register_plugin(raising)
    single = _plugin_module("single", BackendSpec("one", "x:y", "x:z"))  # type: ignore[arg-type]
    with pytest.raises(PluginError, match="must return a list of BackendSpec objects"):
        reg.register_plugin(single)
    assert reg.names() == []


# -- real entry points of installed distributions ------------------------------------------------
PLUGINS = {
    "good": "from lmtier import BackendSpec, hookimpl\n"
            "@hookimpl\n"
            "def lmtier_backend_specs():\n"
            "    return [BackendSpec('ep-good', 'lmtier_backends.cpu.backend:CpuBackend',\n"
            "                        'lmtier_backends.cpu.config:CpuConfig', install_hint='pip install ep-good')]\n",
    "broken_import": "import a_module_that_does_not_exist_anywhere\n",
    "broken_hook": "from lmtier import hookimpl\n"
                   "@hookimpl\n"
                   "def lmtier_backend_specs():\n"
                   "    return {}['missing']\n",
    "dup": "from lmtier import BackendSpec, hookimpl\n"
           "@hookimpl\n"
           "def lmtier_backend_specs():\n"
           "    return [BackendSpec('cpu', 'x:y', 'x:z')]\n",
}


@pytest.fixture
def install_plugins(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Install plugin modules as a distribution would: a dist-info whose entry points name them."""
    prefix = f"lmtier_test_ep_{tmp_path.name.replace('-', '_')}"

    def install(*names: str) -> None:
        site = tmp_path / "site"
        dist = site / "lmtier_test_plugins-1.0.dist-info"
        dist.mkdir(parents=True, exist_ok=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lmtier-test-plugins\nVersion: 1.0\n")
        lines = ["[lmtier]"]
        for name in names:
            (site / f"{prefix}_{name}.py").write_text(PLUGINS[name])
            lines.append(f"{name} = {prefix}_{name}")
        (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(site))

    yield install
    for mod in [m for m in sys.modules if m.startswith(prefix)]:
        del sys.modules[mod]


def test_a_broken_plugin_is_recorded_and_the_others_still_load(install_plugins, caplog) -> None:
    install_plugins("good", "broken_import", "broken_hook")
    reg = BackendRegistry.discover()
    assert {"cpu", "disk", "ep-good"} <= set(reg.names())
    assert reg.origin("ep-good") == "entrypoint:good"
    assert set(reg.load_errors) == {"broken_import", "broken_hook"}
    assert "ModuleNotFoundError" in reg.load_errors["broken_import"]
    assert "lmtier_backend_specs() raised KeyError" in reg.load_errors["broken_hook"]
    assert "failed to load" in caplog.text
    with pytest.raises(ConfigError, match=r"Plugins that failed to load .*broken_hook .*broken_import"):
        reg.spec("nosuch")


def test_two_installed_plugins_with_one_backend_name_are_refused(install_plugins) -> None:
    install_plugins("dup")
    with pytest.raises(PluginError, match=r"'cpu' is provided twice: by entrypoint:cpu and by entrypoint:dup"):
        BackendRegistry.discover()
