"""The ``redis`` tier: Redis or Redis Cluster (``pip install 'lmtier[redis]'``)."""

__all__: list[str] = []
