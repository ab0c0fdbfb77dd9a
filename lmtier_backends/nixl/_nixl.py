"""Finding, importing and starting NIXL: the only module that knows NIXL's package names.

NIXL ships as ``nixl-cu12`` / ``nixl-cu13`` (modules ``nixl_cu12`` / ``nixl_cu13``) plus a
``nixl`` meta package that picks one; all expose the same ``_api`` module. A tier's agent is
created with no backend (so no UCX worker and nothing listening), no listener thread and no
progress thread, then gets exactly the storage plugin the tier needs.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from lmtier.errors import ConfigError, PluginError
from lmtier_backends.nixl.plugin import INSTALL_HINT

__all__ = ["PACKAGES", "create_agent", "find_nixl", "load_api", "scoped_env", "usable_plugins"]

#: Importable NIXL packages, preferred first.
PACKAGES = ("nixl", "nixl_cu12", "nixl_cu13")


def find_nixl() -> str | None:
    """The name of an installed NIXL package, without importing it (for test skips)."""
    for name in PACKAGES:
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def load_api() -> ModuleType:
    """NIXL's ``_api`` module; PluginError with the install hint when NIXL is missing."""
    problems = []
    for name in PACKAGES:
        try:
            return importlib.import_module(f"{name}._api")
        except ImportError as exc:  # also missing shared libraries (an ImportError subclass)
            problems.append(f"{name}: {exc}")
        except OSError as exc:
            problems.append(f"{name}: {exc}")
    raise PluginError(
        f"the nixl tier needs NIXL, which cannot be imported ({'; '.join(problems)}); "
        f"install it with: {INSTALL_HINT}"
    )


def usable_plugins(agent: Any) -> list[str]:
    """Plugins whose library loads on this host (NIXL lists every plugin it ships, usable or not).

    Asks the binding directly: the Python wrapper logs a traceback for every plugin that fails.
    """
    usable = []
    for name in agent.get_plugin_list():
        try:
            agent.agent.getPluginParams(name)
        except Exception:  # GDS, LIBFABRIC, ... need hardware or libraries this host lacks
            continue
        usable.append(name)
    return usable


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str], lock: threading.Lock) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them, holding
    ``lock`` (os.environ is the process's: every caller that changes it passes the same lock)."""
    with lock:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old


def create_agent(api: ModuleType, name: str, plugin: str, params: Mapping[str, str], *,
                 env: Mapping[str, str] | None = None, env_lock: threading.Lock | None = None) -> Any:
    """A NIXL agent with exactly one storage ``plugin`` instantiated with ``params``.

    ``env``: environment variables the plugin reads while it starts (set for that moment only,
    under ``env_lock``, which ``env`` requires).

    The agent is thread-safe (STRICT sync: NIXL serialises calls on it) because the tier waits
    on transfers from several worker threads. Raises ConfigError naming the usable plugins when
    ``plugin`` cannot load here, or when NIXL rejects the parameters.
    """
    config = api.nixl_agent_config(
        enable_prog_thread=False,  # only UCX uses it; storage plugins progress when polled
        enable_listen_thread=False,  # NIXL's listener binds 0.0.0.0: never start it
        backends=[],  # no UCX: a storage tier talks to nobody
        sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
    )
    agent = api.nixl_agent(name, config)
    usable = usable_plugins(agent)
    if plugin not in usable:
        raise ConfigError(
            f"NIXL plugin {plugin!r} is not available on this host; usable plugins here: "
            f"{', '.join(usable) or 'none'} (the nixl tier supports POSIX and OBJ)"
        )
    if env and env_lock is None:
        raise ValueError("create_agent: env needs the env_lock of every caller that sets the environment")
    try:
        with scoped_env(env or {}, env_lock or threading.Lock()):
            agent.create_backend(plugin, dict(params))
    except Exception as exc:
        raise ConfigError(f"NIXL refused to start its {plugin} plugin with these options: {exc}") from None
    return agent
