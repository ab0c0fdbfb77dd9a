"""``async with backend:`` for every backend: one mixin instead of the same two methods in each."""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["AsyncClosing"]


class AsyncClosing:
    """Mixin: ``__aenter__`` returns the backend, ``__aexit__`` awaits its ``aclose()`` (which the
    backend defines, idempotent as the protocol requires)."""

    async def aclose(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define aclose()")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
