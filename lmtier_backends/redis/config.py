"""Options of the ``redis`` backend (pydantic only: importing this module imports no client).

Secrets never appear in ``repr``/``str`` or logs: a password given in the URL is moved out of it
into :attr:`RedisConfig.password` (a :class:`~pydantic.SecretStr`) during validation, so the
stored ``url`` is always credential-free and safe to log.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lmtier.errors import ConfigError

__all__ = ["RedisConfig"]

_SCHEMES = ("redis", "rediss", "unix")


class _Masked:
    """A credential on its way through validation, masked in reprs (validation errors print
    their input): one taken out of the url, or a password of the wrong type."""

    __slots__ = ("problem", "shown", "value")

    def __init__(self, value: Any, problem: str = "", shown: str = "<from the url>") -> None:
        self.value = value
        self.problem = problem
        self.shown = shown

    def __repr__(self) -> str:
        return self.shown


class RedisConfig(BaseModel):
    """Where the Redis tier lives and how to talk to it.

    Attributes:
        url: ``redis://host:port/db``, ``rediss://host:port/db`` (TLS) or
            ``unix:///path/to/redis.sock?db=0``. Credentials in it (``redis://user:pw@host``) are
            accepted and moved to ``username``/``password``. With ``cluster: true`` the URL names
            one seed node (``rediss://`` for TLS); the others are discovered.
        username: ACL user (Redis 6+); ``None`` means the ``default`` user.
        password: the password; prefer ``password_env`` in files. Never shown in logs or repr.
        password_env: the NAME of an environment variable holding the password, read when the
            tier opens (so a rotated secret needs only a restart, not a config change).
        cluster: the URL is a Redis Cluster node; keys are spread over the cluster's slots and
            every batch is split by node and sent to the nodes in parallel.
        key_prefix: prepended to ``str(key)``; isolates lmtier's keys from other users of the
            same server (and lets an operator drop them with ``SCAN MATCH lmtier:*``).
        ttl_s: expiry of each stored chunk (``SET ... PX``); ``None`` keeps chunks until Redis
            evicts them under its ``maxmemory-policy``.
        max_connections: connections per node, and worker threads of the tier: how many batch
            operations run at once.
        put_streams: how many parallel streams a large ``put`` batch is spread over in all
            (at least one per node): a node's share of 8 MiB or more is split into runs sent on
            their own connections and worker threads, so that the client's part of the work
            (checksumming and copying every byte into the socket) runs on several cores. Raise
            it with the client's cores; 1 (or a Cluster of 2+ nodes with the default) sends
            each node's share as one stream.
        get_streams: the same for ``get`` and ``get_into`` batches (receiving and checksumming
            every byte is the client's share of a get): a batch of 8 MiB or more, by the sizes
            given (``get_into``) or last seen (``get``), runs as up to this many streams. The
            default is 1: on 2 cores, 2 streams were not faster (1 MiB values: 1953 vs 2119 MB/s,
            7 repeats), the payloads being hashed as they arrive instead; raise it with the cores.
        connect_timeout_s / read_timeout_s: socket deadlines; exceeding one is a timeout
            (a miss / skipped write for the manager). The manager's own per-call deadlines
            (``timeout_s`` of the tier, sub-second for reads) answer callers much sooner; these
            bound how long a call it stopped waiting for keeps a worker thread and its buffers
            (the connect handshake can be left only through them).
        recv_pool_bytes: a reusable host slab that large ``get`` results are received into
            (0 disables it). Reusing warm memory avoids a page fault per 4 KiB of every value:
            measured ~2x faster GETs of 37.7 MB values than freshly allocated buffers. Returned
            values are read-only lease views of the slab; when it is full (callers still hold
            views), values go to fresh buffers instead.
        tls_ca_file: CA bundle for ``rediss://`` (default: the system store).
        tls_verify: verify the server certificate and hostname for ``rediss://``.
        connect_at_open: PING every node when the tier opens, so a wrong password or
            certificate fails loudly at startup (a server that is down raises
            BackendUnavailableError, which the StorageManager turns into a tier that starts
            down and is re-opened in the background). ``False`` opens without contacting Redis
            (a server that is down at startup is then a tier with an open circuit until it
            comes up; a wrong password shows at the first call).
    """

    model_config = ConfigDict(extra="forbid")

    url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// (TLS) or unix:// URL")
    username: str | None = Field(None, description="ACL user name (Redis 6+)")
    password: SecretStr | None = Field(None, description="password (prefer password_env in files)")
    password_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="name of an env variable holding the password"
    )
    cluster: bool = Field(False, description="talk to a Redis Cluster (url is a seed node)")
    key_prefix: str = Field("lmtier:", max_length=256, description="prefix of every Redis key")
    ttl_s: float | None = Field(None, gt=0, description="expiry of stored chunks; None = no expiry")
    max_connections: int = Field(8, ge=1, le=1024, description="connections per node = worker threads")
    put_streams: int = Field(2, ge=1, le=64, description="parallel streams a large put batch uses in all")
    get_streams: int = Field(1, ge=1, le=64, description="parallel streams a large get batch uses in all")
    connect_timeout_s: float = Field(2.0, gt=0, description="TCP/TLS connect deadline")
    read_timeout_s: float = Field(5.0, gt=0, description="deadline of each socket read/write")
    recv_pool_bytes: ByteSize = Field(ByteSize(256 << 20), ge=0, description="warm slab for large gets; 0 = off")
    tls_ca_file: str | None = Field(None, description="CA bundle for rediss:// (default: system store)")
    tls_verify: bool = Field(True, description="verify the server certificate for rediss://")
    connect_at_open: bool = Field(True, description="PING at open: fail fast on a wrong password or certificate")

    @model_validator(mode="before")
    @classmethod
    def _move_credentials_out_of_the_url(cls, data: Any) -> Any:
        """``redis://user:pw@host`` -> url ``redis://host``, username ``user``, password ``pw``.

        Why no error is raised here: a model-level error prints the whole input, password
        included. Conflicts are wrapped in :class:`_Masked` and reported by the field
        validators below, whose error shows only a masked value.
        """
        if not isinstance(data, dict):
            return data
        given = data.get("password")
        if given is not None and not isinstance(given, (str, SecretStr)):  # e.g. an unquoted YAML number
            data = dict(data)
            data["password"] = _Masked(given, "the password must be a string (quote it in YAML)", "<hidden>")
        if not isinstance(data.get("url"), str):
            return data
        parts = urlsplit(data["url"])
        try:
            user, password = parts.username, parts.password
        except ValueError:
            return data
        if user is None and password is None:
            return data
        data = dict(data)
        if password is not None:
            explicit = [k for k in ("password", "password_env") if data.get(k) is not None]
            data["password"] = _Masked(unquote(password), _both("password", ", ".join(explicit)))
        if user:
            given = data.get("username")
            clash = "username" if given is not None and given != unquote(user) else ""
            data["username"] = _Masked(unquote(user), _both("username", clash))
        # host[:port] exactly as written (after the last "@", as urlsplit reads it), so that
        # _check_url still sees, and rejects, an invalid port instead of it silently vanishing
        netloc = parts.netloc.rpartition("@")[2]
        # not urlunsplit: it drops the "//" of an empty netloc (unix://:pw@/path -> unix:/path)
        data["url"] = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        return data

    @field_validator("username", "password", mode="before")
    @classmethod
    def _unwrap_masked_credentials(cls, value: Any) -> Any:
        if isinstance(value, _Masked):
            if value.problem:
                raise ValueError(value.problem)
            return value.value
        return value

    @field_validator("password_env")
    @classmethod
    def _one_password_source(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is not None and info.data.get("password") is not None:
            raise ValueError("set either password or password_env, not both")
        return name

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ValueError("url must start with redis://, rediss:// (TLS) or unix://")
        if parts.scheme == "unix" and not parts.path:
            raise ValueError("a unix:// url needs a socket path, e.g. unix:///run/redis/redis.sock")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("the url names no host, e.g. redis://127.0.0.1:6379/0")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("the url has an invalid port") from None
        path = parts.path.strip("/")
        if parts.scheme != "unix" and path and not path.isdigit():
            raise ValueError("the path of the url must be a database number, e.g. /0")
        return url

    @field_validator("cluster")
    @classmethod
    def _cluster_needs_tcp_and_db0(cls, cluster: bool, info: ValidationInfo) -> bool:
        url = info.data.get("url")
        if cluster and isinstance(url, str):
            if url.startswith("unix:"):
                raise ValueError("cluster: true needs a redis:// or rediss:// seed node url, not unix://")
            if urlsplit(url).path.strip("/") not in ("", "0"):
                raise ValueError("Redis Cluster has only database 0; drop the /<db> from the url")
        return cluster

    @field_validator("key_prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        if any(c.isspace() for c in prefix):
            raise ValueError("key_prefix must not contain whitespace")
        if "{" in prefix or "}" in prefix:
            # a hash tag in the prefix would send every key to one Cluster slot, i.e. one node
            raise ValueError("key_prefix must not contain '{' or '}' (a Redis Cluster hash tag)")
        return prefix

    # -- derived values ---------------------------------------------------------------------------
    @property
    def db(self) -> int:
        """The database number from the URL (``/n`` or ``?db=n`` for unix sockets)."""
        parts = urlsplit(self.url)
        if parts.scheme == "unix":
            for item in parts.query.split("&"):
                name, _, value = item.partition("=")
                if name == "db" and value.isdigit():
                    return int(value)
            return 0
        path = parts.path.strip("/")
        return int(path) if path else 0

    @property
    def tls(self) -> bool:
        return self.url.startswith("rediss:")

    def resolve_password(self, environ: dict[str, str] | None = None) -> str | None:
        """The password to use: ``password``, or the variable named by ``password_env``.

        Raises ConfigError when ``password_env`` names a variable that is not set.
        """
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is None:
            return None
        env = os.environ if environ is None else environ
        value = env.get(self.password_env)
        if value is None:
            raise ConfigError(
                f"redis tier: password_env names the environment variable {self.password_env!r}, "
                "which is not set; export it (or drop password_env if the server needs no password)"
            )
        return value

    def display_url(self) -> str:
        """The URL with the user name (never the password), for messages and logs."""
        if not self.username:
            return self.url
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, f"{quote(self.username, safe='')}@{parts.netloc}",
                           parts.path, parts.query, parts.fragment))


def _both(field: str, other: str) -> str:
    """The complaint about a credential given in the url and again as ``other`` ('' = none)."""
    return f"the url carries a {field} and {other} is also set; keep one" if other else ""
