"""lmtier-memdict: an example third-party lmtier backend (``backend: memdict``)."""

__all__: list[str] = []
