"""Tier configuration: pydantic models, YAML loading, ``LMTIER_*`` overrides.

Validation has two phases. Phase one (:func:`load_config`) checks the core schema: tiers, names,
write modes, byte sizes. Phase two (:meth:`LmtierConfig.validate_backends`, run by
:meth:`StorageManager.from_config`) resolves each tier's backend through the registry and validates
its ``options`` against that backend's own pydantic model. Every error names the key path, e.g.
``tiers[1].options.root``, and what is allowed.

Environment overrides: ``LMTIER_CONFIG`` names the YAML file; ``LMTIER_<KEY>`` overrides a scalar
top-level key (``LMTIER_CHUNK_TOKENS=512``) and ``LMTIER_TIERS__<NAME>__<KEY>`` a scalar key of the
tier called NAME (``LMTIER_TIERS__HOT__WRITE=async``, ``LMTIER_TIERS__NVME__OPTIONS__ROOT=/data``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmtier.errors import ConfigError
from lmtier.registry import format_validation_error

if TYPE_CHECKING:
    from pydantic import BaseModel as _Model

    from lmtier.registry import BackendRegistry

__all__ = ["DEFAULT_CONFIG_YAML", "BreakerConfig", "LmtierConfig", "TierConfig", "env_overrides", "load_config"]

#: The embedded default: a pinned-RAM tier over a local disk tier.
DEFAULT_CONFIG_YAML = """\
chunk_tokens: 256
tiers:
  - {name: hot, backend: cpu, options: {max_bytes: 2GiB}}
  - {name: local, backend: disk, options: {root: ~/.cache/lmtier, max_bytes: 20GiB}}
"""


class BreakerConfig(BaseModel):
    """Circuit breaker for one tier: open after ``failures`` consecutive unavailable errors."""

    model_config = ConfigDict(extra="forbid")
    failures: int = Field(3, ge=1, description="consecutive failures that open the circuit")
    cooldown_s: float = Field(1.0, gt=0, description="first wait before a probe call")
    max_cooldown_s: float = Field(30.0, gt=0, description="cap of the doubling cooldown")


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
    timeout_s: float | None = Field(None, gt=0, description="per-call deadline; exceeding it is a miss")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


class LmtierConfig(BaseModel):
    """The whole lmtier configuration (what the YAML file holds)."""

    model_config = ConfigDict(extra="forbid")
    chunk_tokens: int = Field(256, ge=1, le=1 << 20, description="tokens per stored chunk")
    tiers: list[TierConfig] = Field(min_length=1, description="storage tiers, hottest first")
    host_pool_bytes: ByteSize = Field(ByteSize(256 << 20), description="pinned staging pool of the engine")
    log_level: str | None = Field(None, description="level of the `lmtier` logger where an integration sets up logging")

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
        if self.tiers and self.tiers[0].write != "through":
            raise ValueError("the first (hottest) tier must use write: through; puts land there first")
        return self

    def validate_backends(self, registry: BackendRegistry) -> list[_Model]:
        """Phase two: each tier's options against its backend's model; returns the instances."""
        validated = []
        for i, tier in enumerate(self.tiers):
            try:
                registry.spec(tier.backend)
            except ConfigError as exc:
                raise ConfigError(f"tiers[{i}].backend: {exc}") from None
            validated.append(registry.validate_options(tier.backend, tier.options, path=f"tiers[{i}].options"))
        return validated


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
            text = Path(source).expanduser().read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read lmtier config {where}: {exc.strerror}; check LMTIER_CONFIG / the path") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where} is not valid YAML: {exc}") from None
    elif isinstance(source, Mapping):
        data = dict(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with a 'tiers' list")
    data = _apply_env(data, env)
    try:
        return LmtierConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: " + format_validation_error(exc, model=LmtierConfig)) from None


def env_overrides(env: Mapping[str, str] | None = None) -> list[str]:
    """The ``LMTIER_*`` variables of ``env`` (default ``os.environ``) that override config keys."""
    env = os.environ if env is None else env
    out = []
    for var in env:
        if not var.startswith("LMTIER_") or var in _NOT_OVERRIDES:
            continue
        path = var[len("LMTIER_"):].lower().split("__")
        if (path[0] == "tiers" and len(path) >= 3) or (
                len(path) == 1 and path[0] in LmtierConfig.model_fields and path[0] != "tiers"):
            out.append(var)
    return sorted(out)


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``LMTIER_*`` scalars; values are parsed as YAML scalars ("512" -> 512)."""
    data = {**data, "tiers": [dict(t) if isinstance(t, Mapping) else t for t in data.get("tiers", [])]}
    for var, raw in env.items():
        if not var.startswith("LMTIER_") or var in _NOT_OVERRIDES:
            continue
        path = var[len("LMTIER_"):].lower().split("__")
        value = yaml.safe_load(raw) if raw.strip() else raw
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{var}: only scalar keys can be overridden from the environment")
        if path[0] == "tiers" and len(path) >= 3:
            tier = next((t for t in data["tiers"] if isinstance(t, dict) and t.get("name") == path[1]), None)
            if tier is None:
                raise ConfigError(f"{var}: no tier named {path[1]!r} in the configuration")
            _set_nested(tier, path[2:], value)
        elif len(path) == 1 and path[0] in LmtierConfig.model_fields and path[0] != "tiers":
            data[path[0]] = value
    return data


def _set_nested(obj: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        nxt = obj.get(part)
        nxt = dict(nxt) if isinstance(nxt, Mapping) else {}
        obj[part] = nxt
        obj = nxt
    obj[path[-1]] = value


# variables that configure lmtier itself rather than overriding a config key
_NOT_OVERRIDES = frozenset({
    "LMTIER_CONFIG", "LMTIER_DISABLE_PLUGIN_AUTOLOAD", "LMTIER_REQUIRE_NATIVE", "LMTIER_DISABLE_NATIVE",
    "LMTIER_NATIVE_LIB",
})
