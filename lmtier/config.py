"""Tier configuration: pydantic models, YAML loading, ``LMTIER_*`` overrides.

Validation has two phases. Phase one (:func:`load_config`) checks the core schema: tiers, names,
write modes, byte sizes. Phase two (:meth:`LmtierConfig.validate_backends`, run by
:meth:`StorageManager.from_config`) resolves each tier's backend through the registry and validates
its ``options`` against that backend's own pydantic model. Every error names the key path, e.g.
``tiers[1].options.root``, and what is allowed.

Environment overrides: ``LMTIER_CONFIG`` names the YAML file; ``LMTIER_<KEY>`` overrides a scalar
top-level key (``LMTIER_CHUNK_TOKENS=512``) and ``LMTIER_TIERS__<NAME>__<KEY>`` a scalar key of the
tier called NAME (``LMTIER_TIERS__HOT__WRITE=async``, ``LMTIER_TIERS__NVME__OPTIONS__ROOT=/data``);
``LMTIER_SERVER_TIMEOUT_S__<KIND>`` one kind of the server deadlines (``..._LOOKUP=0.2``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lmtier.errors import ConfigError, InvalidArgumentError
from lmtier.registry import format_validation_error

if TYPE_CHECKING:
    from pydantic import BaseModel as _Model

    from lmtier.registry import BackendRegistry

__all__ = [
    "DEFAULT_CONFIG_YAML",
    "BreakerConfig",
    "CodecConfig",
    "Deadlines",
    "LmtierConfig",
    "ServerDeadlines",
    "TierConfig",
    "env_overrides",
    "load_config",
]

#: The embedded default: a pinned-RAM tier over a local disk tier.
DEFAULT_CONFIG_YAML = """\
chunk_tokens: 256
tiers:
  - {name: hot, backend: cpu, options: {max_bytes: 2GiB}}
  - {name: local, backend: disk, options: {root: ~/.cache/lmtier, max_bytes: 20GiB}}
"""


#: Bounds of settings whose larger values are never meant (a typo, an extra zero, ``.inf``).
MAX_COOLDOWN_S = 3600.0
MAX_QUEUE_DEPTH = 1 << 16


def _refuse_bool(cls: type, value: Any) -> Any:
    """Before pydantic's lax conversion, which reads YAML's ``true`` as the number 1."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not the boolean {value!r}")
    return value


class BreakerConfig(BaseModel):
    """Circuit breaker for one tier: open after ``failures`` consecutive unavailable errors."""

    model_config = ConfigDict(extra="forbid")
    failures: int = Field(3, ge=1, description="consecutive failures that open the circuit")
    cooldown_s: float = Field(1.0, gt=0, description="first wait before a probe call")
    max_cooldown_s: float = Field(30.0, gt=0, description="cap of the doubling cooldown")

    _no_bools = field_validator("failures", "cooldown_s", "max_cooldown_s", mode="before")(_refuse_bool)

    @field_validator("cooldown_s", "max_cooldown_s")
    @classmethod
    def _closes_again(cls, seconds: float) -> float:
        # an infinite or huge cooldown is a circuit that never closes: the tier is off for good
        if not seconds <= MAX_COOLDOWN_S:
            raise ValueError(f"must be at most {MAX_COOLDOWN_S:g} seconds (an hour), got {seconds!r}: "
                             "a longer cooldown is a circuit that never closes; remove the tier instead")
        return seconds


class Deadlines(BaseModel):
    """How long the manager waits for one call to a tier, per kind of call, in seconds.

    A call that has not answered by its deadline is a miss (reads) or a skipped write for its
    caller, is counted (``lmtier_tier_deadline_misses_total``) and opens the tier's circuit at
    once; the call itself is left to finish in the background (its buffers stay out of use until
    it does). Large ``get_into`` and ``put`` batches are sent in slices of at most 64 MiB, each
    with its own deadline, so a deadline bounds the wait for progress, not a whole transfer.

    In YAML, ``timeout_s`` is either one number (every kind) or a mapping of some kinds, e.g.
    ``timeout_s: {lookup: 0.1, get: 0.3}`` (the others keep their defaults).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    lookup: float = Field(0.5, gt=0, description="presence checks (lookup, contains)")
    get: float = Field(0.5, gt=0, description="reads (get, get_into): per call or 64 MiB slice")
    put: float = Field(5.0, gt=0, description="writes: per call or 64 MiB slice")
    delete: float = Field(2.0, gt=0, description="deletes")
    open: float = Field(2.0, gt=0, description="opening the tier at start (connect, handshake); a tier whose "
                                               "service is down or has not answered by then starts down and "
                                               "is re-opened in the background")

    _no_bools = field_validator("*", mode="before")(_refuse_bool)


class ServerDeadlines(BaseModel):
    """How long an engine process waits for ``lmtier serve``, per kind of call, in seconds.

    Used where the configuration names a server (``server:`` / ``LMTIER_SERVER``): a call the
    server has not answered by its deadline is a miss (lookup 0, fetch and reserve nothing,
    commit 0), and the client treats the server as unresponsive until it answers a ping, so a
    frozen server costs one call one deadline, not every call. In YAML, ``server_timeout_s`` is
    either one number (every kind) or a mapping of some kinds, like a tier's ``timeout_s``.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    lookup: float = Field(0.5, gt=0, description="lookups and presence checks (the request waits on them)")
    fetch: float = Field(5.0, gt=0, description="fetches: leases on slab slots, read from colder tiers if needed")
    reserve: float = Field(0.5, gt=0, description="reserving slab slots to store into; deletes, releases")
    commit: float = Field(30.0, gt=0, description="commits (behind the call: nothing waits on them)")
    flush: float = Field(60.0, gt=0, description="flush: the server's background tier writes")
    connect: float = Field(2.0, gt=0, description="one connect + hello; pings, stats, namespace registration")

    _no_bools = field_validator("*", mode="before")(_refuse_bool)


def _one_number_for_every_kind(model: type[BaseModel], value: Any) -> Any:
    """``timeout_s: 0.3`` means 0.3 s for every field of ``model``; a mapping is left to pydantic."""
    kinds = ", ".join(model.model_fields)
    if value is None:
        return {}
    if isinstance(value, bool):  # YAML's yes/no: not a number of seconds
        raise ValueError(f"must be a number of seconds or a mapping of {{{kinds}}}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"must be a number of seconds or a mapping of {{{kinds}}}") from None
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError("a deadline must be a finite number of seconds > 0")
        return dict.fromkeys(model.model_fields, value)
    return value


class CodecConfig(BaseModel):
    """A tier's value codec: ``codec: zstd`` or ``codec: {name: zstd, level: 3}`` in YAML.

    ``name`` is ``none`` or a registered codec (``lz4``, ``zstd``, ``fp8``, ``int8``, or a
    plugin's: ``lmtier backends`` lists them); the other keys are the codec's options, validated
    by its own model when the tiers open (phase two, like a backend's ``options``).
    """

    model_config = ConfigDict(extra="allow")
    name: str = Field("none", pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", description="none, or a codec name")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def enabled(self) -> bool:
        return self.name != "none"


class TierConfig(BaseModel):
    """One tier of the chain, hottest first in ``tiers``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$", description="unique tier name (metrics label)")
    backend: str = Field(description="a registered backend name (see `lmtier backends`)")
    options: dict[str, Any] = Field(default_factory=dict, description="validated by the backend's model")
    write: Literal["through", "async"] = Field(
        "through", description="through: put awaits this tier; async: background, drop-not-block"
    )
    promote: bool = Field(True, description="copy hits from colder tiers into this tier")
    queue_depth: int = Field(64, ge=1, description="async writes queued before new ones are dropped")
    timeout_s: Deadlines = Field(default_factory=Deadlines,
                                 description="per-call deadlines: one number, or {lookup, get, put, delete}")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig,
                               description="value codec: none | lz4 | zstd | fp8 | int8, or {name: ..., options}")
    read_bytes_per_s: ByteSize | None = Field(
        None, gt=0, description="seed of the learned read bandwidth (bytes/s, e.g. 2GB) for load decisions")
    read_latency_s: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="seed of the learned per-call read latency (seconds)")

    _no_bools = field_validator("queue_depth", "read_bytes_per_s", "read_latency_s", mode="before")(_refuse_bool)

    @field_validator("queue_depth")
    @classmethod
    def _bounded_queue(cls, depth: int) -> int:
        if depth > MAX_QUEUE_DEPTH:
            raise ValueError(f"must be at most {MAX_QUEUE_DEPTH}, got {depth}: each queued write holds its "
                             "value in memory until the tier takes it")
        return depth

    @field_validator("codec", mode="before")
    @classmethod
    def _codec_by_name(cls, value: Any) -> Any:
        if value is None or value is False:  # YAML `codec: null` / `codec: no`
            return {"name": "none"}
        if isinstance(value, str):
            return {"name": value.strip().lower()}
        return value

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _one_number_for_every_kind(cls, value: Any) -> Any:
        return _one_number_for_every_kind(Deadlines, value)


class LmtierConfig(BaseModel):
    """The whole lmtier configuration (what the YAML file holds)."""

    model_config = ConfigDict(extra="forbid")
    chunk_tokens: int = Field(256, ge=1, le=1 << 20, description="tokens per stored chunk")
    tiers: list[TierConfig] = Field(default_factory=list, description="storage tiers, hottest first (or server)")
    server: str | None = Field(None, pattern=r"^unix:///\S+$",
                               description="unix:///path/lmtier.sock of `lmtier serve`: the tiers live there "
                                           "(no tiers here); LMTIER_SERVER sets it and drops the file's tiers")
    server_timeout_s: ServerDeadlines = Field(
        default_factory=ServerDeadlines,
        description="deadlines of calls to lmtier serve (with server): one number, or "
                    "{lookup, fetch, reserve, commit, flush, connect}")
    host_pool_bytes: ByteSize = Field(ByteSize(256 << 20), description="the manager's host pool (pinned where CUDA is)")
    device_codec: CodecConfig = Field(
        default_factory=CodecConfig,
        description="a quantizing codec (fp8, int8) the engine runs on the KV cache's device: chunks cross to "
                    "the host and are stored quantized in every tier (docs/codecs.md)")
    log_level: str | None = Field(None, description="level of the `lmtier` logger where an integration sets up logging")
    load_policy: Literal["always", "cost"] = Field(
        "cost", description="always: load every hit; cost: load a hit only where loading is expected to "
                            "beat recomputing it (lmtier.cost)")
    load_margin: float = Field(0.1, ge=0, le=100, allow_inf_nan=False,
                               description="cost policy: loading must be expected this much faster "
                                           "than recomputing (0.1: 10%)")
    recompute_tokens_per_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="seed of the learned prefill speed (tokens/s)")
    #: key path (``tiers[1].options.root``) -> the LMTIER_* variable that set it, for error messages
    _env_keys: dict[str, str] = PrivateAttr(default_factory=dict)

    _no_bools = field_validator("chunk_tokens", "host_pool_bytes", "load_margin", "recompute_tokens_per_s",
                                mode="before")(_refuse_bool)

    @field_validator("server_timeout_s", mode="before")
    @classmethod
    def _server_deadlines(cls, value: Any) -> Any:
        return _one_number_for_every_kind(ServerDeadlines, value)

    @field_validator("device_codec", mode="before")
    @classmethod
    def _device_codec_by_name(cls, value: Any) -> Any:
        return TierConfig._codec_by_name(value)

    @field_validator("host_pool_bytes")
    @classmethod
    def _pool_fits_in_memory(cls, nbytes: ByteSize) -> ByteSize:
        from lmtier.limits import check_fits_in_memory

        check_fits_in_memory(nbytes)
        return nbytes

    @field_validator("tiers")
    @classmethod
    def _unique_names(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        seen: set[str] = set()
        for t in tiers:
            if t.name in seen:
                raise ValueError(f"tier name {t.name!r} is used twice; tier names must be unique")
            seen.add(t.name)
        return tiers

    @model_validator(mode="after")
    def _hottest_is_through(self) -> LmtierConfig:
        if self.server is not None and self.tiers:
            raise ValueError("give either tiers (in this process) or server (lmtier serve holds the tiers), not both")
        if self.server is None and not self.tiers:
            raise ValueError("tiers: at least one tier is needed, or server: unix:///path/lmtier.sock")
        if self.tiers and self.tiers[0].write != "through":
            raise ValueError("the first (hottest) tier must use write: through; puts land there first")
        return self

    def per_process(self, tag: str) -> LmtierConfig:
        """This configuration for one of several processes sharing it (a TP rank, a PP stage):
        each disk tier's ``root`` gets the subdirectory ``tag``, because a disk root has one
        owning process. Unchanged for an empty ``tag`` (one process) or a config naming a server
        (its tiers are the server's). The integrations use it: vLLM (``tp{rank}``), SGLang
        (``tp1-pp0``, ...)."""
        if not tag:
            return self
        if os.sep in tag or tag in (".", ".."):
            raise InvalidArgumentError(f"a per-process tag is one directory name, got {tag!r}")
        tiers = [t.model_copy(update={"options": {**t.options, "root": os.path.join(str(t.options["root"]), tag)}})
                 if t.backend == "disk" and "root" in t.options else t for t in self.tiers]
        copy = self.model_copy(update={"tiers": tiers})
        copy._env_keys = dict(self._env_keys)
        return copy

    def validate_backends(self, registry: BackendRegistry) -> list[_Model]:
        """Phase two: each tier's options against its backend's model; returns the instances."""
        validated = []
        for i, tier in enumerate(self.tiers):
            try:
                registry.spec(tier.backend)
            except ConfigError as exc:
                raise ConfigError(f"tiers[{i}].backend: {exc}") from None
            try:
                validated.append(registry.validate_options(tier.backend, tier.options, path=f"tiers[{i}].options"))
            except ConfigError as exc:
                raise ConfigError(_name_the_variables(str(exc), self._env_keys)) from None
            self.validate_codec(i, registry)
        return validated

    def validate_codec(self, i: int, registry: BackendRegistry) -> None:
        """Phase two for tier ``i``'s codec: a known name (ConfigError listing the known ones) and
        options its model accepts."""
        codec = self.tiers[i].codec
        if not codec.enabled:
            if codec.options:
                raise ConfigError(f"tiers[{i}].codec: options {sorted(codec.options)} given with codec none")
            return
        try:
            registry.codec_spec(codec.name)
            registry.validate_codec_options(codec.name, codec.options, path=f"tiers[{i}].codec")
        except ConfigError as exc:
            msg = str(exc)
            raise ConfigError(_name_the_variables(msg if msg.startswith("invalid") else f"tiers[{i}].codec: {msg}",
                                                  self._env_keys)) from None


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | LmtierConfig | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> LmtierConfig:
    """Load and validate (phase one) a configuration.

    ``source`` is a YAML path, a mapping, a ready :class:`LmtierConfig`, or ``None``: then the
    file named by ``LMTIER_CONFIG``, else the embedded default (cpu + disk). ``LMTIER_*``
    variables from ``env`` (default ``os.environ``) override scalar keys.
    """
    env = os.environ if env is None else env
    if isinstance(source, LmtierConfig):
        return source
    where = "<mapping>"
    if source is None:
        path = env.get("LMTIER_CONFIG")
        if path:
            source = path
        else:
            data: Any = yaml.safe_load(DEFAULT_CONFIG_YAML)
            where = "<embedded default>"
    if isinstance(source, (str, os.PathLike)):
        where = str(source)
        try:
            text = Path(source).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read lmtier config {where}: {exc.strerror}; check LMTIER_CONFIG / the path") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{where} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                              f"{exc.start}); save the config as UTF-8") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    elif isinstance(source, Mapping):
        data = dict(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with a 'tiers' list")
    data, applied = _apply_env(data, env)
    try:
        config = LmtierConfig.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc, model=LmtierConfig)
        raise ConfigError(f"{where}: " + _name_the_variables(message, applied)) from None
    config._env_keys = applied
    return config


def env_overrides(env: Mapping[str, str] | None = None) -> list[str]:
    """The ``LMTIER_*`` variables of ``env`` (default ``os.environ``) that override config keys."""
    env = os.environ if env is None else env
    out = []
    for var in env:
        if not var.startswith("LMTIER_") or var in _NOT_OVERRIDES:
            continue
        path = var[len("LMTIER_"):].lower().split("__")
        if (path[0] == "tiers" and len(path) >= 3) or (len(path) == 2 and path[0] in _KINDS_BY_KEY) or (
                len(path) == 1 and path[0] in LmtierConfig.model_fields and path[0] != "tiers"):
            out.append(var)
    return sorted(out)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Overlay ``LMTIER_*`` scalars; values are parsed as YAML scalars ("512" -> 512). Returns the
    data and, for each key set, its path as errors print it (``tiers[1].options.root``) -> the
    variable that set it."""
    tiers = data.get("tiers", [])
    data = {**data, "tiers": [dict(t) if isinstance(t, Mapping) else t for t in tiers] if isinstance(tiers, list) else tiers}
    applied: dict[str, str] = {}
    # shallower keys first: LMTIER_SERVER_TIMEOUT_S=1 then LMTIER_SERVER_TIMEOUT_S__LOOKUP=0.2 refines it
    for var, raw in sorted(env.items(), key=lambda item: item[0].count("__")):
        if not var.startswith("LMTIER_") or var in _NOT_OVERRIDES:
            continue
        path = var[len("LMTIER_"):].lower().split("__")
        if path[0] == "tiers" and len(path) < 3:
            raise ConfigError(f"{var}: name a tier and a key below it, e.g. LMTIER_TIERS__HOT__WRITE=async or "
                              "LMTIER_TIERS__HOT__OPTIONS__MAX_BYTES=4GiB; the tier list itself comes from the file")
        if not (path[0] == "tiers" or (len(path) == 1 and path[0] in LmtierConfig.model_fields)
                or (len(path) == 2 and path[0] in _KINDS_BY_KEY)):
            continue  # another component's variable (LMTIER_TRANSFER_MODE, ...)
        if "" in path:
            raise ConfigError(f"{var}: an empty key between '__' separators; name a tier and a key, e.g. "
                              "LMTIER_TIERS__HOT__WRITE=async")
        value = _env_scalar(var, raw)
        if path[0] in _KINDS_BY_KEY and len(path) == 2:  # one kind of a deadline mapping
            current = data.get(path[0])
            kinds = (dict(current) if isinstance(current, Mapping)
                     else dict.fromkeys(_KINDS_BY_KEY[path[0]].model_fields, current)
                     if isinstance(current, (int, float)) and not isinstance(current, bool) else {})
            kinds[path[1]] = value
            data[path[0]] = kinds
            applied[".".join(path)] = var
        elif path[0] == "tiers":
            if not isinstance(data["tiers"], list):
                continue  # the file's own error (tiers is not a list) is reported by validation
            index = next((i for i, t in enumerate(data["tiers"]) if isinstance(t, dict) and t.get("name") == path[1]),
                         None)
            if index is None:
                raise ConfigError(f"{var}: no tier named {path[1]!r} in the configuration")
            _set_nested(data["tiers"][index], path[2:], value)
            applied[f"tiers[{index}]." + ".".join(path[2:])] = var
        else:
            data[path[0]] = value
            applied[path[0]] = var
    if applied.get("server") == "LMTIER_SERVER" and data.get("server"):
        data["tiers"] = []  # the server holds the tiers: the file's (or the default's) are not used here
    return data, applied


def _env_scalar(var: str, raw: str) -> Any:
    """The YAML scalar ``raw`` of variable ``var`` (``"512"`` -> 512), or a ConfigError naming it."""
    if not raw.strip():
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"{var}={raw[:40]!r} is not a YAML scalar ({reason[:160]}); the value must be "
                          "one number, word or path, or text in quotes") from None
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{var}={raw[:40]!r}: only scalar keys can be overridden from the environment")
    return value


def _name_the_variables(message: str, applied: Mapping[str, str]) -> str:
    """Append to each line of a validation ``message`` the variable that set its key, if any."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        where = line.strip().split(": ", 1)[0]
        if where in applied:
            lines[i] = f"{line} (set by {applied[where]})"
    return "\n".join(lines)


def _set_nested(obj: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = obj.get(part)
        nxt = dict(nxt) if isinstance(nxt, Mapping) else {}
        obj[part] = nxt
        obj = nxt
    obj[path[-1]] = value


#: top-level keys that are a mapping of deadlines: LMTIER_<KEY>__<KIND> sets one kind
_KINDS_BY_KEY: dict[str, type[BaseModel]] = {"server_timeout_s": ServerDeadlines}

# variables that configure lmtier itself rather than overriding a config key
_NOT_OVERRIDES = frozenset({
    "LMTIER_CONFIG", "LMTIER_DISABLE_PLUGIN_AUTOLOAD", "LMTIER_REQUIRE_NATIVE", "LMTIER_DISABLE_NATIVE",
    "LMTIER_NATIVE_LIB",
})
