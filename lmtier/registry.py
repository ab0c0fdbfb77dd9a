"""Backend discovery: pluggy over the ``lmtier`` entry-point group, plus programmatic registration.

Our own backends (``lmtier_backends/*/plugin.py``) register exactly as a third party does. Plugin
modules are cheap; the factory and config model of a :class:`BackendSpec` are imported lazily, and
an ``ImportError`` there becomes a :class:`PluginError` carrying the spec's install hint.

Set ``LMTIER_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry points (then register plugins by hand).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast

import pluggy
from pydantic import BaseModel, ValidationError

from lmtier import hookspecs
from lmtier.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from lmtier.protocol import StorageBackend

__all__ = ["ENTRY_POINT_GROUP", "BackendRegistry", "BackendSpec", "hookimpl", "import_string"]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "lmtier"
hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT)


@dataclass(frozen=True)
class BackendSpec:
    """How to build a backend, without importing it.

    Attributes:
        name: the ``backend:`` value in YAML (lowercase, unique).
        factory: ``"module:attr"`` of a callable taking the validated config instance and
            returning a :class:`~lmtier.protocol.StorageBackend` (or an awaitable of one).
        config: ``"module:attr"`` of a pydantic model for the tier's ``options``.
        install_hint: what to run when the factory's imports are missing, e.g.
            ``pip install 'lmtier[redis]'``.
        description: one line for ``lmtier backends``.
    """

    name: str
    factory: str
    config: str
    install_hint: str = ""
    description: str = ""


def import_string(path: str, *, hint: str = "") -> Any:
    """Import ``"module:attr"``; a missing module raises PluginError with ``hint``."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{path!r} is not of the form 'module:attr'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = f"; install it with: {hint}" if hint else ""
        raise PluginError(f"cannot import {module_name!r} ({exc}){extra}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PluginError(f"module {module_name!r} has no attribute {attr!r}") from None


class BackendRegistry:
    """Known backends by name. Build with :meth:`discover` (entry points) or register by hand."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._specs: dict[str, BackendSpec] = {}
        self._origins: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}

    @classmethod
    def discover(cls, *, autoload: bool | None = None) -> BackendRegistry:
        """A registry holding every backend installed through the ``lmtier`` entry points."""
        reg = cls()
        if autoload is None:
            autoload = os.environ.get("LMTIER_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0", "false")
        if autoload:
            reg.load_entry_points()
        return reg

    def load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the others
                self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                log.warning("lmtier plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)
                continue
            self.register_plugin(module, name=f"entrypoint:{ep.name}")

    def register_plugin(self, plugin: object, *, name: str | None = None) -> None:
        """Register a module/object holding ``@hookimpl`` functions and collect its specs."""
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self._pm.is_registered(plugin) or self._pm.has_plugin(plugin_name):
            return
        self._pm.register(plugin, name=plugin_name)
        impls = [i for i in self._pm.hook.lmtier_backend_specs.get_hookimpls() if i.plugin is plugin]
        for impl in impls:
            specs = cast("list[BackendSpec]", impl.function() or [])
            for spec in specs:
                self.register(spec, origin=plugin_name)

    def register(self, spec: BackendSpec, *, origin: str = "programmatic") -> None:
        """Add one backend; a name already taken raises PluginError naming both origins."""
        if not isinstance(spec, BackendSpec):
            raise PluginError(f"{origin}: lmtier_backend_specs must return BackendSpec objects, got {spec!r}")
        if spec.name in self._specs:
            raise PluginError(
                f"backend name {spec.name!r} is provided twice: by {self._origins[spec.name]} and by "
                f"{origin}; uninstall one of them or rename it"
            )
        self._specs[spec.name] = spec
        self._origins[spec.name] = origin

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> BackendSpec:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise ConfigError(
                f"unknown backend {name!r}; known backends: {known}. A third-party backend must be "
                f"pip-installed so that it registers an entry point in the {ENTRY_POINT_GROUP!r} group"
            ) from None

    def origin(self, name: str) -> str:
        return self._origins[name]

    def config_model(self, name: str) -> type[BaseModel]:
        spec = self.spec(name)
        model = import_string(spec.config, hint=spec.install_hint)
        if not (inspect.isclass(model) and issubclass(model, BaseModel)):
            raise PluginError(f"backend {name!r}: config {spec.config!r} is not a pydantic model")
        return model

    def validate_options(self, name: str, options: Mapping[str, Any], *, path: str = "options") -> BaseModel:
        """Validate a tier's options against the backend's config model (phase two)."""
        model = self.config_model(name)
        try:
            return model.model_validate(dict(options))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix=path, model=model)) from None

    async def create(self, name: str, options: Mapping[str, Any] | BaseModel, *, path: str = "options") -> StorageBackend:
        """Validate options and build the backend, awaiting an async factory."""
        spec = self.spec(name)
        config = options if isinstance(options, BaseModel) else self.validate_options(name, options, path=path)
        factory = import_string(spec.factory, hint=spec.install_hint)
        backend = factory(config)
        if inspect.isawaitable(backend):
            backend = await backend
        return backend  # type: ignore[no-any-return]


def _allowed_keys(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that the error location ``loc`` points into."""
    import typing

    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (inspect.isclass(current) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = field.annotation
        for _ in range(3):  # unwrap list[X], X | None
            args = [a for a in typing.get_args(current) if a is not type(None)]
            if inspect.isclass(current) and issubclass(current, BaseModel):
                break
            current = args[-1] if args else current
    if inspect.isclass(current) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def format_validation_error(exc: ValidationError, *, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``tiers[1].options.root: <what is wrong> (got <input>)``."""
    lines = []
    for err in exc.errors():
        parts = [prefix] if prefix else []
        for loc in err["loc"]:
            if isinstance(loc, int):
                parts[-1:] = [f"{parts[-1]}[{loc}]"] if parts else [f"[{loc}]"]
            else:
                parts.append(str(loc))
        where = ".".join(parts) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            allowed = _allowed_keys(model, tuple(err["loc"]))
            if allowed:
                msg += f"; allowed keys: {', '.join(allowed)}"
        got = err.get("input")
        shown = "" if err["type"] in ("missing",) else f" (got {got!r})"
        lines.append(f"{where}: {msg}{shown}")
    return "invalid lmtier configuration:\n  " + "\n  ".join(lines)
