"""Backend discovery: pluggy over the ``lmtier`` entry-point group, plus programmatic registration.

Our own backends (``lmtier_backends/*/plugin.py``) register exactly as a third party does. Plugin
modules are cheap; the factory and config model of a :class:`BackendSpec` are imported lazily, and
an ``ImportError`` there becomes a :class:`PluginError` carrying the spec's install hint.

Set ``LMTIER_DISABLE_PLUGIN_AUTOLOAD=1`` (any value but ``0``, ``false``, ``no``, ``off`` or empty) to
skip entry points, built-in backends included; then register plugins by hand.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy
from pydantic import BaseModel, ValidationError

from lmtier import hookspecs
from lmtier.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from lmtier.codecs.base import CodecSpec, ValueCodec
    from lmtier.protocol import StorageBackend

__all__ = [
    "AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "BackendRegistry",
    "BackendSpec",
    "autoload_disabled",
    "hookimpl",
    "import_string",
]

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "lmtier"
AUTOLOAD_ENV = "LMTIER_DISABLE_PLUGIN_AUTOLOAD"
_FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
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


class _DuplicateName(PluginError):
    """Two plugins provide one backend name: fatal at discovery (the others are only logged)."""


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


def autoload_disabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``LMTIER_DISABLE_PLUGIN_AUTOLOAD`` asks to skip entry-point discovery."""
    value = (os.environ if env is None else env).get(AUTOLOAD_ENV, "")
    return value.strip().lower() not in _FALSE_WORDS


class BackendRegistry:
    """Known backends by name. Build with :meth:`discover` (entry points) or register by hand."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._specs: dict[str, BackendSpec] = {}
        self._origins: dict[str, str] = {}
        self._codecs: dict[str, CodecSpec] = {}
        self._codec_origins: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}
        #: False when discovery skipped the entry points (``LMTIER_DISABLE_PLUGIN_AUTOLOAD``).
        self.autoloaded = False

    @classmethod
    def discover(cls, *, autoload: bool | None = None) -> BackendRegistry:
        """A registry holding every backend installed through the ``lmtier`` entry points.

        ``autoload=None`` loads them unless ``LMTIER_DISABLE_PLUGIN_AUTOLOAD`` is set; the registry
        is then empty (built-in backends included) until plugins are registered by hand.
        """
        reg = cls()
        if autoload is None:
            autoload = not autoload_disabled()
        if autoload:
            reg.load_entry_points()
        return reg

    def load_entry_points(self) -> None:
        """Register the plugin module of every entry point in the ``lmtier`` group.

        A plugin that fails to import, whose hook raises or returns something other than
        ``BackendSpec`` objects is logged and recorded in :attr:`load_errors`, and the other
        plugins still load. A backend name provided twice raises :class:`PluginError`.
        """
        self.autoloaded = True
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            try:
                self.register_plugin(ep.load(), name=f"entrypoint:{ep.name}")
            except _DuplicateName:
                raise  # two packages claim one name: refusing it is the point
            except Exception as exc:  # a broken third-party plugin must not break the others
                self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                log.warning("lmtier plugin %r (%s) failed to load: %s", ep.name, ep.value, exc)

    def register_plugin(self, plugin: object, *, name: str | None = None) -> None:
        """Register a module/object holding ``@hookimpl`` functions and collect its specs.

        All or nothing: if the hook raises, returns a non-``BackendSpec`` or a name already
        taken, :class:`PluginError` is raised and none of the plugin's backends is registered.
        Registering the same plugin (or name) again does nothing.
        """
        plugin_name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self._pm.is_registered(plugin) or self._pm.has_plugin(plugin_name):
            return
        self._pm.register(plugin, name=plugin_name)
        try:
            specs: list[BackendSpec] = []
            for impl in self._pm.hook.lmtier_backend_specs.get_hookimpls():
                if impl.plugin is not plugin:
                    continue
                try:
                    result = impl.function()
                except Exception as exc:
                    raise PluginError(f"{plugin_name}: lmtier_backend_specs() raised "
                                      f"{type(exc).__name__}: {exc}") from exc
                if result is not None and not isinstance(result, (list, tuple)):
                    raise PluginError(f"{plugin_name}: lmtier_backend_specs must return a list of "
                                      f"BackendSpec objects, got {result!r}")
                specs.extend(result or [])
            taken = dict(self._origins)
            for spec in specs:  # check every spec before registering any
                self._check_new(spec, plugin_name, taken)
                taken[spec.name] = plugin_name
            codecs = self._plugin_codecs(plugin, plugin_name)
        except BaseException:
            self._pm.unregister(plugin)
            raise
        for spec in specs:
            self._specs[spec.name] = spec
            self._origins[spec.name] = plugin_name
        for codec in codecs:
            self._codecs[codec.name] = codec
            self._codec_origins[codec.name] = plugin_name

    def _plugin_codecs(self, plugin: object, plugin_name: str) -> list[CodecSpec]:
        """The plugin's ``lmtier_value_codecs`` specs, all checked (PluginError otherwise)."""
        out: list[CodecSpec] = []
        for impl in self._pm.hook.lmtier_value_codecs.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                result = impl.function()
            except Exception as exc:
                raise PluginError(f"{plugin_name}: lmtier_value_codecs() raised {type(exc).__name__}: {exc}") from exc
            if result is not None and not isinstance(result, (list, tuple)):
                raise PluginError(f"{plugin_name}: lmtier_value_codecs must return a list of CodecSpec objects, "
                                  f"got {result!r}")
            out.extend(result or [])
        names = dict(self._codec_origins)
        ids = {spec.codec_id: spec.name for spec in self._codecs.values()}
        for spec in out:
            self._check_new_codec(spec, plugin_name, names, ids)
            names[spec.name] = plugin_name
            ids[spec.codec_id] = spec.name
        return out

    @staticmethod
    def _check_new_codec(spec: object, origin: str, names: Mapping[str, str], ids: Mapping[int, str]) -> None:
        from lmtier.codecs.base import PLUGIN_CODEC_IDS, CodecSpec
        from lmtier.framing import LMTIER_CODEC_IDS

        if not isinstance(spec, CodecSpec):
            raise PluginError(f"{origin}: lmtier_value_codecs must return CodecSpec objects, got {spec!r}")
        if spec.name == "none" or not spec.name:
            raise PluginError(f"{origin}: {spec.name!r} cannot name a codec ('none' means no codec)")
        if spec.name in names:
            raise _DuplicateName(f"codec name {spec.name!r} is provided twice: by {names[spec.name]} and by "
                                 f"{origin}; uninstall one of them or rename it")
        if spec.codec_id in ids:
            raise _DuplicateName(f"codec id {spec.codec_id:#x} is claimed by codecs {ids[spec.codec_id]!r} and "
                                 f"{spec.name!r} ({origin}); every codec needs an id of its own")
        if spec.codec_id not in PLUGIN_CODEC_IDS and LMTIER_CODEC_IDS.get(spec.codec_id) != spec.name:
            raise PluginError(f"{origin}: codec {spec.name!r} has id {spec.codec_id:#x}; ids below 0x8000 are "
                              "lmtier's own (lmtier.framing.LMTIER_CODEC_IDS): pick one in 0x8000..0xFFFF")

    def register(self, spec: BackendSpec, *, origin: str = "programmatic") -> None:
        """Add one backend; a name already taken raises PluginError naming both origins."""
        self._check_new(spec, origin, self._origins)
        self._specs[spec.name] = spec
        self._origins[spec.name] = origin

    @staticmethod
    def _check_new(spec: object, origin: str, taken: Mapping[str, str]) -> None:
        if not isinstance(spec, BackendSpec):
            raise PluginError(f"{origin}: lmtier_backend_specs must return BackendSpec objects, got {spec!r}")
        if spec.name in taken:
            raise _DuplicateName(
                f"backend name {spec.name!r} is provided twice: by {taken[spec.name]} and by "
                f"{origin}; uninstall one of them or rename it"
            )

    def names(self) -> list[str]:
        return sorted(self._specs)

    def spec(self, name: str) -> BackendSpec:
        """The spec of backend ``name``; ConfigError listing the known ones and what to install."""
        try:
            return self._specs[name]
        except KeyError:
            raise ConfigError(self._unknown(name)) from None

    def _unknown(self, name: object) -> str:
        known = self.names()
        close = difflib.get_close_matches(str(name), known, n=1)
        msg = f"unknown backend {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
        msg += f"; known backends: {', '.join(known) or 'none'}"
        if self.load_errors:
            failed = "; ".join(f"{ep} ({err})" for ep, err in sorted(self.load_errors.items()))
            msg += f". Plugins that failed to load (reinstall the package providing them): {failed}"
        if not self.autoloaded:
            msg += (f". Entry-point discovery is off ({AUTOLOAD_ENV} is set or autoload=False): unset it, "
                    "or register the plugin by hand (BackendRegistry.register_plugin)")
        else:
            msg += (f". To add a backend, pip-install the package that provides it: it registers an entry "
                    f"point in the {ENTRY_POINT_GROUP!r} group (`lmtier backends` lists what is installed)")
        return msg

    # -- value codecs ---------------------------------------------------------------------------
    def codec_names(self) -> list[str]:
        """Registered codec names (``none`` is always accepted too)."""
        return sorted(self._codecs)

    def codec_specs(self) -> list[CodecSpec]:
        return [self._codecs[n] for n in self.codec_names()]

    def codec_spec(self, name: str) -> CodecSpec:
        """The spec of codec ``name``; ConfigError listing the known ones."""
        try:
            return self._codecs[name]
        except KeyError:
            known = ["none", *self.codec_names()]
            close = difflib.get_close_matches(str(name), known, n=1)
            msg = f"unknown codec {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            msg += f"; known codecs: {', '.join(known)}"
            if not self.autoloaded:
                msg += f". Entry-point discovery is off ({AUTOLOAD_ENV} is set): register codec plugins by hand"
            else:
                msg += (". A codec from another package is installed with it (it registers an entry point in "
                        f"the {ENTRY_POINT_GROUP!r} group; `lmtier backends` lists codecs too)")
            raise ConfigError(msg) from None

    def validate_codec_options(self, name: str, options: Mapping[str, Any], *, path: str = "codec") -> BaseModel:
        """A codec's options against its model (phase two of config validation)."""
        spec = self.codec_spec(name)
        model = import_string(spec.config, hint=spec.install_hint)
        if not (inspect.isclass(model) and issubclass(model, BaseModel)):
            raise PluginError(f"codec {name!r}: config {spec.config!r} is not a pydantic model")
        try:
            return model.model_validate(dict(options))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, prefix=path, model=model)) from None

    def create_codec(self, name: str, options: Mapping[str, Any] | BaseModel | None = None, *,
                     path: str = "codec") -> ValueCodec:
        """Build codec ``name`` with ``options`` (validated); ConfigError/PluginError naming what to fix."""
        spec = self.codec_spec(name)
        config = options if isinstance(options, BaseModel) else \
            self.validate_codec_options(name, options or {}, path=path)
        codec = import_string(spec.factory, hint=spec.install_hint)(config)
        if getattr(codec, "codec_id", None) != spec.codec_id or bool(getattr(codec, "lossy", None)) != spec.lossy:
            raise PluginError(f"codec {name!r}: the factory built {codec!r}, whose codec_id/lossy differ from its "
                              f"spec ({spec.codec_id:#x}, lossy={spec.lossy})")
        return codec  # type: ignore[no-any-return]

    def decoders(self) -> dict[int, ValueCodec]:
        """One instance (default options) of every registered codec, by id: what reads decode with.
        A codec whose imports fail is left out (its values are then misses left in place), logged."""
        out: dict[int, ValueCodec] = {}
        for spec in self._codecs.values():
            try:
                out[spec.codec_id] = self.create_codec(spec.name)
            except (PluginError, ConfigError) as exc:
                log.warning("lmtier codec %r cannot decode in this process: %s", spec.name, exc)
        return out

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
