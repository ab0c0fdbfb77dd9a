"""The ``redis`` tier: Redis or Redis Cluster (``pip install 'lmtier[redis]'``)."""
