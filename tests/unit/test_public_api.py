"""The public contract of DESIGN.md §3: exact names, the error tree, cheap imports, ``__all__``."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PUBLIC = ["BackendSpec", "Capabilities", "ChunkKey", "LmtierError", "StorageBackend", "StorageManager",
          "hookimpl", "load_config"]
HEAVY = ["torch", "numpy", "redis", "boto3", "botocore", "nixl", "nixl_cu12", "vllm", "transformers"]

#: Modules of the core framework and the built-in cpu/disk tiers (the other tiers and the
#: integrations are owned and checked elsewhere).
CORE_MODULES = [
    "lmtier", "lmtier.errors", "lmtier.protocol", "lmtier.keys", "lmtier.framing", "lmtier.buffers", "lmtier.memory",
    "lmtier.config", "lmtier.limits", "lmtier.hookspecs", "lmtier.registry", "lmtier.breaker", "lmtier.metrics",
    "lmtier.manager", "lmtier.cli", "lmtier.cli.doctor", "lmtier.cli.backends", "lmtier.cli.config",
    "lmtier.cli.check_backend", "lmtier.cli.bench", "lmtier.cli.demo", "lmtier.cli.serve", "lmtier.cli.serve_metrics",
    "lmtier.testing", "lmtier.testing.conformance", "lmtier.testing.plugin",
    "lmtier_backends", "lmtier_backends.cpu", "lmtier_backends.cpu.plugin", "lmtier_backends.cpu.config",
    "lmtier_backends.cpu.backend", "lmtier_backends.disk", "lmtier_backends.disk.plugin",
    "lmtier_backends.disk.config", "lmtier_backends.disk.backend",
]


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_public_names_import_from_lmtier_exactly_as_the_design_says() -> None:
    import lmtier
    import lmtier.testing
    from lmtier import (  # noqa: F401  (the import itself is the test)
        BackendSpec,
        Capabilities,
        ChunkKey,
        LmtierError,
        StorageBackend,
        StorageManager,
        hookimpl,
        load_config,
    )
    from lmtier.testing import BackendConformance

    assert sorted(lmtier.__all__) == sorted(PUBLIC)
    assert lmtier.testing.__all__ == ["BackendConformance"]
    homes = {"BackendSpec": "lmtier.registry", "hookimpl": "lmtier.registry", "Capabilities": "lmtier.protocol",
             "StorageBackend": "lmtier.protocol", "ChunkKey": "lmtier.keys", "LmtierError": "lmtier.errors",
             "StorageManager": "lmtier.manager", "load_config": "lmtier.config"}
    for name, module in homes.items():
        assert getattr(lmtier, name) is getattr(importlib.import_module(module), name)
    assert BackendConformance is importlib.import_module("lmtier.testing.conformance").BackendConformance
    assert not BackendConformance.__name__.startswith("Test"), "pytest must not collect the suite by itself"
    with pytest.raises(AttributeError):
        _ = lmtier.NoSuchName  # type: ignore[attr-defined]


def test_the_error_tree_is_the_one_in_the_design() -> None:
    from lmtier import errors as e

    parents = {
        e.ConfigError: (e.LmtierError, ValueError),
        e.InvalidArgumentError: (e.LmtierError, TypeError),
        e.PluginError: (e.LmtierError,),
        e.BackendError: (e.LmtierError,),
        e.BackendUnavailableError: (e.BackendError,),
        e.BackendTimeoutError: (e.BackendUnavailableError,),
        e.CapacityError: (e.BackendError,),
        e.CorruptDataError: (e.BackendError,),
        e.NotSupportedError: (e.LmtierError,),
        e.NativeUnavailableError: (e.LmtierError,),
    }
    for cls, bases in parents.items():
        assert all(issubclass(cls, b) for b in bases), cls
    assert not issubclass(e.CapacityError, e.BackendUnavailableError)  # full is not down: no breaker
    assert not issubclass(e.CorruptDataError, e.BackendUnavailableError)
    assert set(e.__all__) == {c.__name__ for c in parents} | {"LmtierError"}


def test_the_contract_protocols_hooks_and_entry_point_group_have_the_design_names() -> None:
    from lmtier import hookspecs, registry
    from lmtier.protocol import Capabilities, StorageBackend

    assert registry.ENTRY_POINT_GROUP == "lmtier"
    assert callable(hookspecs.lmtier_backend_specs)
    assert [f for f in ("name", "factory", "config", "install_hint")
            if f not in registry.BackendSpec.__dataclass_fields__] == []
    assert set(Capabilities.__dataclass_fields__) == {"persistent", "shared", "evicts", "max_item_bytes"}
    for method in ("contains", "get", "put", "delete", "aclose", "__aenter__", "__aexit__"):
        assert hasattr(StorageBackend, method)


def test_import_lmtier_loads_only_the_standard_library() -> None:
    out = run_python(
        "import sys, json; before = set(sys.modules); import lmtier; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    new = json.loads(out)
    foreign = [m for m in new if m.split(".")[0] not in sys.stdlib_module_names and m != "lmtier"]
    assert foreign == [], f"`import lmtier` imported {foreign}"


def test_the_public_names_the_testing_package_and_discovery_import_nothing_heavy() -> None:
    out = run_python(
        "import sys, json\n"
        "from lmtier import (StorageBackend, Capabilities, ChunkKey, BackendSpec, hookimpl,\n"
        "                    StorageManager, load_config, LmtierError)\n"
        "from lmtier.testing import BackendConformance\n"
        "from lmtier.registry import BackendRegistry\n"
        "reg = BackendRegistry.discover()\n"
        "for name in ('cpu', 'disk'): reg.config_model(name)\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
    )
    assert json.loads(out) == []


def test_importing_the_core_modules_does_no_io_and_imports_no_torch() -> None:
    # without torch in the process nothing can probe CUDA; the third-party libraries the modules use
    # are imported first, so only lmtier's own import-time behaviour is judged
    code = f"""
import builtins, io, json, os, socket, sys
import numpy, pydantic, pluggy, prometheus_client, xxhash, yaml, pytest, pytest_asyncio  # noqa
class Warm(pydantic.BaseModel):  # pydantic scans its plugins' entry points at the first model
    x: int = 0
seen = []
def spy(name, fn):
    def wrapper(*a, **k):
        seen.append(name + repr(a[:1]))
        return fn(*a, **k)
    return wrapper
for mod, attr in [(builtins, "open"), (io, "open"), (os, "open"), (os, "listdir"), (os, "scandir"),
                  (os, "makedirs"), (os, "mkdir"), (socket, "socket"), (socket, "create_connection")]:
    setattr(mod, attr, spy(attr, getattr(mod, attr)))
import importlib
for m in {CORE_MODULES!r}:
    importlib.import_module(m)
print(json.dumps({{"io": seen, "heavy": [m for m in {HEAVY!r} if m in sys.modules and m != "numpy"]}}))
"""
    assert json.loads(run_python(code)) == {"io": [], "heavy": []}


def _declared_all(path: Path) -> list[str] | None:
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            assert node.value is not None
            return list(ast.literal_eval(node.value))
    return None


@pytest.mark.parametrize("module", CORE_MODULES)
def test_every_public_core_module_declares_all_and_its_names_exist(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None
    names = _declared_all(Path(spec.origin))
    assert names is not None, f"{module} has no __all__"
    imported = importlib.import_module(module)
    assert [n for n in names if not hasattr(imported, n)] == []
    assert imported.__doc__, f"{module} has no docstring"
