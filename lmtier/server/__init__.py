"""``lmtier serve``: one shared KV cache per node, for every engine process on it (DESIGN §7).

::

    engine process (each vLLM worker / TP rank)          lmtier serve (one per node)
      KVCacheEngine ── ServerStore ── Unix socket ──────► Server ── SlabCache ── StorageManager
           │ copies pages itself                              │                  hot tier = the slab
           ▼                                                  ▼                  colder tiers behind
      shared-memory slab (memfd, mapped by every client and the server; KV bytes never cross the socket)

Modules: :mod:`~lmtier.server.protocol` (the wire protocol, specified), :mod:`~lmtier.server.slab`
(the shared memory), :mod:`~lmtier.server.holdings` (leases and reservations per connection),
:mod:`~lmtier.server.cache` (the server's manager and operations), :mod:`~lmtier.server.daemon`
(the process: socket, signals, drain), :mod:`~lmtier.server.http` (health, metrics, status),
:mod:`~lmtier.server.client` (``ServerStore``, the client side of the ``KVStore`` seam; ``KVCacheEngine``
uses it when the config says ``server: unix:///path`` or ``LMTIER_SERVER`` is set),
:mod:`~lmtier.server.demo` (``lmtier demo --server``). Deployment and the restart matrix: ``docs/server.md``.
Nothing is imported here: the client side must not pull the server's HTTP stack in.
"""

__all__: list[str] = []
