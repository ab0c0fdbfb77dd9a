"""The wire protocol between ``lmtier serve`` and its clients, specified (hookspecs.py style).

One Unix stream socket per client process (each vLLM worker / TP rank is one client). KV bytes
never cross it: they live in the server's shared-memory **slab**, which the client maps once (the
slab's file descriptor arrives with the hello reply, as ``SCM_RIGHTS`` ancillary data) and copies
to and from itself. The socket carries only control messages.

Framing
-------
Every message is one **frame**: a 4-byte unsigned big-endian length ``N`` (1 ≤ N ≤
:data:`MAX_FRAME_BYTES`), then ``N`` bytes of MessagePack encoding one map. A length of 0 or above
the limit cannot be resynchronised: the server answers :data:`E_BAD_FRAME` and closes the
connection. Anything else that is wrong with a frame is answered with an :class:`Error` and the
connection stays usable.

Requests and replies
--------------------
A request is a map with ``"op"`` (the operation's name, below) and ``"id"`` (a client-chosen
integer ≥ 1; the reply carries the same ``id``). A client may have many requests in flight on one
connection; the server handles them concurrently and replies in any order. Every request gets
exactly one reply: the operation's own reply map (``"op"`` is the request's op) or an
:class:`Error` (``"op": "error"``). Fields whose default is given may be omitted. Unknown fields
are ignored (so a later minor revision can add optional fields).

The first request on a connection must be :class:`Hello`; a client whose protocol version is not
:data:`PROTOCOL_VERSION` is refused there (:data:`E_VERSION`, with a message naming both versions)
and the connection is closed.

Keys are 24-byte binaries: the namespace's 8 bytes (its 16 hex digits) then the 16-byte digest of
a :class:`~lmtier.keys.ChunkKey` (:func:`encode_key` / :func:`decode_key`).

Revisions within version 1 (each optional, so peers of either side keep working together): the
``namespace`` op (:class:`Namespace`) was added for the server's lossy value codecs; a server
that predates it answers :data:`E_UNKNOWN_OP`, which the client takes as "no lossy tiers to
declare" (its chunks are then stored raw in such tiers, never lossy under a namespace that does
not say so). :class:`Clear` gained ``tiers`` and ``namespaces`` (and clears every tier that can
be by default); a server that predates them ignores them and clears its hot tier only, and its
reply lacks ``tiers``, which tells the client so. :class:`LookupReply` gained ``read_costs`` (the
server's learned read cost of each tier, for the client's load decision); a server that predates
it leaves it out, and its clients load every hit, as before. :class:`Lookup` gained ``tails``
and :class:`LookupReply` ``tail_tiers`` (the engine's probe for a stored partial last chunk, in
the lookup's round trip); a server that predates them ignores ``tails`` and leaves ``tail_tiers``
out, which the client takes as "no tail stored" (the engine recomputes those few tokens).
The ``residency`` op (:class:`Residency`) was added for KV-aware routing (which
tier holds which chunk, as it changes); a server that predates it answers :data:`E_UNKNOWN_OP`,
which the client takes as "no residency changes reported" (the engine then publishes stores
only, never removals).

Slots and ownership
-------------------
A **slot** is a range of the slab, named by a server-chosen integer unique on its connection. The
client holds a slot either as a **reservation** (:class:`Reserve`: writable, for a chunk it is
about to store) or as a **lease** (:class:`Fetch`: read-only, holding a stored chunk; the server
never recycles a leased range while the lease is held, even if the chunk is evicted meanwhile).
The client gives a slot back with :class:`Release`, or — for a reservation — with
:class:`Commit`, which hands the range to the cache.

**Liveness is structural**: when a connection closes (the client exits, crashes or is killed), the
server releases every slot it held, at once. There is no reaper and no lease timeout; a client
that is alive but idle keeps what it holds.

Faults of the server (dead, frozen, restarting) are the client's to absorb: each of its calls has
a deadline and a late or missing answer is a miss (see :mod:`lmtier.server.client`).

Errors
------
Bad input from a client — a frame that does not parse, an unknown op, a field of the wrong type, a
commit or release of a slot it does not hold — is answered with an :class:`Error` naming what is
wrong, logged by the server with the client's pid; nothing is applied (a request is validated
whole before any part of it takes effect), nothing stored is lost, and other clients are not
affected. On the client side an error reply raises :class:`ServerError` (an
:class:`~lmtier.errors.LmtierError`) carrying ``code``.

Messages
--------
"""

from __future__ import annotations

import struct
from typing import Annotated, Any

import msgspec

from lmtier.errors import LmtierError

__all__ = [
    "E_BAD_ARGUMENT",
    "E_BAD_FRAME",
    "E_BAD_MESSAGE",
    "E_HELLO_FIRST",
    "E_INTERNAL",
    "E_NOT_HELD",
    "E_UNKNOWN_OP",
    "E_VERSION",
    "FRAME_HEADER",
    "KEY_BYTES",
    "MAX_FRAME_BYTES",
    "OPS",
    "PROTOCOL_VERSION",
    "Clear",
    "ClearReply",
    "Commit",
    "CommitReply",
    "Contains",
    "ContainsReply",
    "Delete",
    "DeleteReply",
    "Error",
    "Fetch",
    "FetchReply",
    "Flush",
    "FlushReply",
    "Hello",
    "HelloReply",
    "Lookup",
    "LookupReply",
    "Namespace",
    "NamespaceReply",
    "Ping",
    "PingReply",
    "Release",
    "ReleaseReply",
    "Reply",
    "Request",
    "Reserve",
    "ReserveReply",
    "Residency",
    "ResidencyReply",
    "ServerError",
    "Slot",
    "Stats",
    "StatsReply",
    "decode_hello_version",
    "decode_key",
    "decode_reply",
    "decode_request",
    "encode",
    "encode_key",
    "frame",
]

#: Bumped on any change an old peer could misread. Checked at :class:`Hello`.
PROTOCOL_VERSION = 1
#: The largest frame either side sends or accepts (a lookup of 100,000 keys is ~3 MiB).
MAX_FRAME_BYTES = 16 << 20
#: The frame header: payload length, unsigned 32-bit big-endian.
FRAME_HEADER = struct.Struct(">I")
#: Bytes of one key on the wire: 8 (namespace) + 16 (digest).
KEY_BYTES = 24

# -- error codes (Error.code) ------------------------------------------------------------------
#: The client's protocol version is not the server's; the connection is closed after the reply.
E_VERSION = "version_mismatch"
#: A frame length of 0 or above MAX_FRAME_BYTES; the stream cannot be resynchronised: closed.
E_BAD_FRAME = "bad_frame"
#: The frame is not a MessagePack map of a known op with well-typed fields.
E_BAD_MESSAGE = "bad_message"
#: ``op`` names no operation of this protocol version.
E_UNKNOWN_OP = "unknown_op"
#: A request other than hello arrived before hello.
E_HELLO_FIRST = "hello_first"
#: A commit or release named a slot this connection does not hold (never had, or gave back).
E_NOT_HELD = "not_held"
#: Well-formed but unacceptable values (a key of the wrong length, a size ≤ 0 or above the slab).
E_BAD_ARGUMENT = "bad_argument"
#: The server failed unexpectedly while handling the request (logged with a traceback there).
E_INTERNAL = "internal"


class ServerError(LmtierError):
    """An :class:`Error` reply: the server refused a request. ``code`` is one of the ``E_*`` codes."""

    def __init__(self, code: str, message: str, *, request_id: int = 0) -> None:
        super().__init__(f"lmtier server: {message} [{code}]")
        self.code = code
        self.message = message
        #: The ``id`` of the request this answers (0 when it could not be read).
        self.request_id = request_id


# -- requests -----------------------------------------------------------------------------------
Key = Annotated[bytes, msgspec.Meta(min_length=24, max_length=24)]
Size = Annotated[int, msgspec.Meta(ge=1)]
SlotId = Annotated[int, msgspec.Meta(ge=1)]


class _Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=False, kw_only=True):
    id: Annotated[int, msgspec.Meta(ge=1)]
    """Client-chosen, ≥ 1; echoed by the reply."""


class Hello(_Request, tag="hello"):
    """First message of a connection: who the client is and which protocol it speaks.

    The reply is :class:`HelloReply` with the slab's file descriptor attached (``SCM_RIGHTS``);
    a version other than :data:`PROTOCOL_VERSION` is an :data:`E_VERSION` error, then the
    connection is closed. The server reads ``version`` even from a hello of another version, so
    these fields never change meaning. A second hello on a connection is a :data:`E_BAD_MESSAGE`.
    """

    version: int
    pid: int
    """The client's process id (for logs; the server also records the kernel's peer pid)."""
    namespace: str = ""
    """The client's main KV namespace (16 hex), for logs and ``/v1/status``; keys carry their own."""
    name: str = ""
    """Free text for logs and status (e.g. ``"vllm worker tp0"``)."""


class Lookup(_Request, tag="lookup"):
    """How many leading ``keys`` are stored in any tier (prefix semantics). Reply :class:`LookupReply`."""

    keys: list[Key]
    tails: list[Key] = []
    """Keys that would extend the prefix (partial last chunks); where each is stored comes back in
    :attr:`LookupReply.tail_tiers` when every key of ``keys`` is stored. Asked of each tier in the
    same call as ``keys``: the client's tail probe costs no round trip of its own."""


class Contains(_Request, tag="contains"):
    """Whether each key is stored in some tier (not a prefix answer). Reply :class:`ContainsReply`."""

    keys: list[Key]


class Reserve(_Request, tag="reserve"):
    """Writable slots of exactly ``sizes[i]`` bytes for chunks about to be stored.

    Reply :class:`ReserveReply`: ``None`` where the slab has no room now (it evicts least recently
    used chunks first; leased ranges cannot be reclaimed) or, with ``keys``, where the hot tier
    already holds the chunk. Never waits on a tier. Each size must be
    in ``[1, slab bytes]``. The client fills the slots and then commits or releases each one.
    """

    sizes: list[Size]
    keys: list[Key] | None = None
    """Optional, one per size: the chunks' keys. A slot is then ``None`` also where the hot tier
    holds ``keys[i]`` already (nothing to copy)."""


class Commit(_Request, tag="commit"):
    """Store filled reservations: ``items[i] = (key, slot)``. Reply :class:`CommitReply`.

    The request is checked whole first (every slot held by this connection as a reservation, each
    named once, keys well formed); if any check fails nothing happens (:data:`E_NOT_HELD` /
    :data:`E_BAD_ARGUMENT`) and the client still holds its reservations. Otherwise every slot is
    handed to the cache at once (the client holds none of them any more, whatever happens next);
    keys already in the hot tier are skipped; the reply comes after the hot tier has the rest
    (colder tiers are written per their write mode: through tiers before the reply, async tiers
    behind it).
    """

    items: list[tuple[Key, SlotId]]
    request_id: str | None = None
    """The engine's request id, for the server's log line."""


class Fetch(_Request, tag="fetch"):
    """Leases on slots holding ``keys``' values. Reply :class:`FetchReply`.

    A key stored with a size other than ``sizes[i]`` is a miss (and is deleted). A hit in the hot
    tier is leased in place (no copy); a hit in a colder tier is copied once into a new slab range
    (and promoted to the hot tier per policy). Every lease returned must be released.
    """

    keys: list[Key]
    sizes: list[Size]


class Release(_Request, tag="release"):
    """Give back leases and reservations. Reply :class:`ReleaseReply`.

    Checked whole: a slot this connection does not hold (never had, released already, committed)
    is :data:`E_NOT_HELD` and then none of the listed slots is released.
    """

    slots: list[SlotId]


class Delete(_Request, tag="delete"):
    """Remove ``keys`` from every tier (best effort). Reply :class:`DeleteReply`."""

    keys: list[Key]


class Flush(_Request, tag="flush"):
    """Wait until background tier writes are done. Reply :class:`FlushReply`."""


class Ping(_Request, tag="ping"):
    """Liveness probe; answered at once. Reply :class:`PingReply`."""


class Stats(_Request, tag="stats"):
    """The server's state, as ``/v1/status`` shows it. Reply :class:`StatsReply`."""


class Clear(_Request, tag="clear"):
    """Drop what tiers hold (what ``POST /v1/clear`` does). Reply :class:`ClearReply`.

    A tier that cannot be cleared (a remote store others share) is kept; naming one, or a name
    that is no tier, is :data:`E_BAD_ARGUMENT` and nothing is cleared. (Before the ``tiers`` and
    ``namespaces`` fields, a server cleared the hot tier only, whatever was sent; its reply has
    no ``tiers``.)
    """

    tiers: list[str] | None = None
    """Names of the tiers to clear; ``None``: every tier that can be."""
    namespaces: list[str] | None = None
    """Clear only chunks of these namespaces (16 hex digits each); ``None``: every chunk."""


class Namespace(_Request, tag="namespace"):
    """Register the KV namespace an engine keys its chunks under; learn the one to use instead.
    Reply :class:`NamespaceReply`.

    The fields are :class:`~lmtier.keys.KVNamespace`'s (``extra`` as ``[key, value]`` pairs).
    The server's lossy tiers (value codecs that quantize KV, ``docs/codecs.md``) encode only
    chunks of namespaces registered this way that name the server's lossy codecs; so the reply
    names the namespace to key under: this one with the server's lossy codec tags added to
    ``extra`` (``["lossy_codecs", "fp8/vector"]``: :func:`lmtier.codecs.declare_lossy`), or this
    one unchanged when every tier is exact. Registrations live in the server's memory: a client
    registers again after it reconnects. KV a lossy tier cannot quantize (e.g. not float) is
    :data:`E_BAD_ARGUMENT`, naming the tier. Optional (see "Revisions" above).
    """

    model: str
    kv_layout: str
    dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_size: int
    page_bytes: int
    chunk_tokens: int
    engine: str = "lmtier"
    tp_rank: int = 0
    tp_world_size: int = 1
    extra: list[tuple[str, str]] = []


class Residency(_Request, tag="residency"):
    """Which tier took or dropped which chunk since this connection's previous ``residency``
    request. Reply :class:`ResidencyReply`.

    The first one on a connection starts recording for it (the reply is empty); from then on the
    server keeps, per connection, every change of any client's chunks in order (a tier took a
    chunk: a write landed there; it dropped one: evicted, deleted, found corrupt), at most
    :data:`lmtier.store.RESIDENCY_BACKLOG` of them between two requests: older ones are dropped and
    counted. A new connection (a reconnect, a restarted server) starts afresh: what changed in
    between is not told. Evictions a tier makes without telling the server's manager and
    ``POST /v1/clear`` are not reported (:class:`lmtier.store.SupportsResidency`). Optional (see
    "Revisions" above).
    """


Request = (Hello | Lookup | Contains | Reserve | Commit | Fetch | Release | Delete | Flush | Ping | Stats | Clear
           | Namespace | Residency)
#: Every operation name of this protocol version.
OPS = frozenset({"hello", "lookup", "contains", "reserve", "commit", "fetch", "release", "delete", "flush",
                 "ping", "stats", "clear", "namespace", "residency"})


# -- replies ------------------------------------------------------------------------------------
class _Reply(msgspec.Struct, tag_field="op", forbid_unknown_fields=False, kw_only=True, omit_defaults=True):
    id: int


class Slot(msgspec.Struct, array_like=True):
    """A slab range handed to the client: ``[slot, offset]`` on the wire.

    ``offset`` is the byte offset in the slab; the range's size is the requested size.
    """

    slot: int
    offset: int


class HelloReply(_Reply, tag="hello"):
    """Accepted. The slab's file descriptor is attached to this frame (map it shared, read-write)."""

    version: int
    server_pid: int
    slab_bytes: int
    slab_id: str
    """Differs between server starts: a client that reconnects knows its old mapping is stale."""
    tiers: list[str] = []
    """The server's tier names, hottest first (for the client's logs and ``tier_names``)."""


class LookupReply(_Reply, tag="lookup"):
    hit_chunks: int
    tiers: list[str] = []
    """The hottest tier holding each of the leading chunks (``len(tiers) == hit_chunks``)."""
    read_costs: dict[str, list[float]] = {}
    """Each tier's read cost as the server has learned it from its reads (:mod:`lmtier.cost`):
    ``[latency_s, seconds_per_byte, samples]`` per tier name; a tier not learned (or seeded) yet is
    absent. The client weighs a hit's load against recomputing it with these."""
    tail_tiers: list[str | None] | None = None
    """For each of the request's ``tails``, the hottest tier holding it (``None``: absent); an empty
    list unless every key of ``keys`` is stored. Absent (``None``) from a server that predates
    tails: the client then takes every tail as absent (a miss, never a wrong hit)."""


class ContainsReply(_Reply, tag="contains"):
    present: list[bool]


class ReserveReply(_Reply, tag="reserve"):
    slots: list[Slot | None]


class CommitReply(_Reply, tag="commit"):
    written: int
    """Chunks newly stored in the hot tier (keys already there are not counted)."""


class FetchReply(_Reply, tag="fetch"):
    slots: list[Slot | None]


class ReleaseReply(_Reply, tag="release"):
    released: int


class DeleteReply(_Reply, tag="delete"):
    pass


class FlushReply(_Reply, tag="flush"):
    pass


class PingReply(_Reply, tag="ping"):
    server_pid: int


class StatsReply(_Reply, tag="stats"):
    status: dict[str, Any]
    """Same document as ``GET /v1/status``."""


class ClearReply(_Reply, tag="clear"):
    cleared: int
    """Chunks dropped, all tiers together (leased ranges are freed when their leases are released)."""
    tiers: dict[str, int | None] | None = None
    """Per tier asked: chunks dropped, or ``None`` for a tier that cannot be cleared (kept).
    Absent from a server that predates it (which cleared its hot tier only)."""


class NamespaceReply(_Reply, tag="namespace"):
    namespace: str
    """The 16 hex digits of the namespace to key chunks under (the client checks it against its own
    hash of the request's fields plus ``lossy_codecs``)."""
    lossy_codecs: str = ""
    """The ``lossy_codecs`` value the server added to ``extra`` ("" when it added none)."""


class ResidencyReply(_Reply, tag="residency"):
    changes: list[tuple[Key, str, bool]] = []
    """``[key, tier name, held]``, oldest first: ``held`` true when the tier took the chunk, false
    when it dropped it."""
    dropped: int = 0
    """Changes left out because the connection's backlog was full (the oldest ones)."""


class Error(_Reply, tag="error"):
    """The request was refused; nothing of it was applied. ``id`` is 0 when it could not be read."""

    code: str
    message: str


Reply = (HelloReply | LookupReply | ContainsReply | ReserveReply | CommitReply | FetchReply | ReleaseReply
         | DeleteReply | FlushReply | PingReply | StatsReply | ClearReply | NamespaceReply | ResidencyReply | Error)

_ENCODER = msgspec.msgpack.Encoder()
_REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
_REPLY_DECODER = msgspec.msgpack.Decoder(Reply)
_ANY_DECODER = msgspec.msgpack.Decoder()


def encode(message: msgspec.Struct) -> bytes:
    """One frame (header + MessagePack body) for ``message``."""
    body = _ENCODER.encode(message)
    return FRAME_HEADER.pack(len(body)) + body


def frame(body: bytes) -> bytes:
    """A frame around an already encoded body (tests use it to send malformed bodies)."""
    return FRAME_HEADER.pack(len(body)) + body


def decode_request(body: bytes) -> Request:
    """Parse one request body; raises :class:`ServerError` otherwise (its ``request_id`` is the
    ``id`` read from the body, or 0)."""
    try:
        return _REQUEST_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        err = _classify(body, exc)
        raise err from None


def decode_reply(body: bytes) -> Reply:
    """Parse one reply body (client side); raises :class:`ServerError` (``E_BAD_MESSAGE``) otherwise."""
    try:
        return _REPLY_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise ServerError(E_BAD_MESSAGE, f"a reply from the server does not parse: {exc}") from None


def decode_hello_version(body: bytes) -> tuple[int, int] | None:
    """``(id, version)`` of a hello of any protocol version, else None (for the version check)."""
    try:
        obj = _ANY_DECODER.decode(body)
    except msgspec.DecodeError:
        return None
    if isinstance(obj, dict) and obj.get("op") == "hello":
        rid, version = obj.get("id"), obj.get("version")
        if isinstance(rid, int) and isinstance(version, int):
            return rid, version
    return None


def _classify(body: bytes, exc: Exception) -> ServerError:
    try:
        obj: Any = _ANY_DECODER.decode(body)
    except msgspec.DecodeError:
        return ServerError(E_BAD_MESSAGE, f"the frame is not MessagePack: {exc}")
    rid = obj.get("id") if isinstance(obj, dict) else None
    rid = rid if isinstance(rid, int) and not isinstance(rid, bool) and 0 < rid < 1 << 63 else 0
    op = obj.get("op") if isinstance(obj, dict) else None
    if not isinstance(obj, dict):
        err = ServerError(E_BAD_MESSAGE, f"a request must be a map with 'op' and 'id', got {type(obj).__name__}")
    elif not isinstance(op, str):
        err = ServerError(E_BAD_MESSAGE, "a request needs a string 'op'")
    elif op not in OPS:
        err = ServerError(E_UNKNOWN_OP, f"unknown op {op[:40]!r}; this server (protocol {PROTOCOL_VERSION}) "
                                        f"knows {', '.join(sorted(OPS))}")
    else:
        err = ServerError(E_BAD_MESSAGE, f"malformed {op!r} request: {exc}")
    err.request_id = rid
    return err


def encode_key(namespace: str, digest: bytes) -> bytes:
    """The 24-byte wire form of a key (``ChunkKey.namespace``, ``ChunkKey.digest``)."""
    return bytes.fromhex(namespace) + digest


def decode_key(raw: bytes) -> tuple[str, bytes]:
    """``(namespace, digest)`` of a wire key; ValueError when it is not :data:`KEY_BYTES` long."""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a key is {KEY_BYTES} bytes (8 namespace + 16 digest), got {len(raw)}")
    return raw[:8].hex(), raw[8:]


