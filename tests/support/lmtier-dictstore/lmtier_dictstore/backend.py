"""A dict of bytes: the whole StorageBackend contract, and no argument checks (lmtier checks them)."""

from lmtier import Capabilities


class DictStore:
    def __init__(self, config):
        self._data = {}

    @property
    def capabilities(self):
        return Capabilities()

    async def contains(self, keys):
        return [key in self._data for key in keys]

    async def get(self, keys):
        return [self._data.get(key) for key in keys]

    async def put(self, items):
        for key, value in items:
            self._data[key] = bytes(memoryview(value).cast("B"))  # a copy: the caller may reuse value

    async def delete(self, keys):
        for key in keys:
            self._data.pop(key, None)

    async def aclose(self):
        self._data.clear()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.aclose()
