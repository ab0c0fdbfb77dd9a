"""The ``cpu`` tier: chunks in one preallocated host slab (pinned when CUDA exists), LRU, zero-copy reads."""

__all__: list[str] = []
