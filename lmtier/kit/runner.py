"""A bounded pool of worker threads for a backend's blocking calls, safe to cancel.

Client libraries for files, Redis, S3 and NIXL block; a backend runs them on
:class:`WorkerPool` threads and awaits the batch. What the pool guarantees:

* **Bounded**: at most ``max_workers`` calls run at once, across every batch of the backend; a
  batch of many small calls costs a few thread hand-offs (each worker takes the next call of the
  batch until none is left) and one wake-up of the event loop, not one per call.
* **Results in order, per call**: ``run`` returns one :class:`Outcome` per call, in the order
  given: the call's value or the exception it raised, so one bad key never hides the others.
* **Cancel-safe**: when the awaiting task is cancelled (a deadline, a client gone), every call
  still to start is skipped and every running call's :class:`CancelToken` is cancelled, which
  runs the abort actions the call registered (drop a connection, shut a socket) so a blocked
  read ends at once. The cancellation then propagates **after** every call that was inside
  :meth:`CancelToken.touching_caller_memory` has left it: once a cancelled ``get_into`` has
  unwound, no thread writes the caller's buffers. Calls outside such a section are not waited
  for; they end on their own thread and their results are dropped.
* **Closed means done**: :meth:`WorkerPool.aclose` waits for every call still running
  (cancelled ones too) before the threads go, so a backend may free what its calls use after it.
  Calls of a batch that had not started when the pool closed fail with
  :class:`~lmtier.errors.BackendUnavailableError`.

Why results travel through slots emptied on return and not through futures: a finished future
(and the worker's work item) stays referenced for a moment after the call, and would keep a
returned value (a lease view of a receive slab, say) alive after the caller dropped it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from lmtier.errors import BackendUnavailableError

__all__ = ["CancelToken", "Cancelled", "Outcome", "WorkerPool"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside a worker when its call was cancelled (:meth:`CancelToken.check`).

    Deliberately not an ``OSError`` or ``ConnectionError``, so client libraries that retry those
    (botocore, urllib3, redis-py) do not retry it.
    """


class CancelToken:
    """One worker's side of the cancellation handshake with the coroutine awaiting its batch.

    A call receives its token as its only argument. It may check it between steps
    (:meth:`check`), register what stops it quickly (:meth:`on_cancel`), and mark the span in
    which it reads or writes memory its caller owns (:meth:`touching_caller_memory`).
    """

    __slots__ = ("_aborts", "_lock", "_touching", "cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cancelled = False
        self._aborts: list[Callable[[], Any]] = []
        self._touching = 0

    def check(self) -> None:
        """Raise :class:`Cancelled` if the call was cancelled."""
        if self.cancelled:
            raise Cancelled("the call was cancelled")

    @contextlib.contextmanager
    def on_cancel(self, abort: Callable[[], Any]) -> Iterator[None]:
        """While inside, a cancellation calls ``abort()`` (on the event loop's thread) to make the
        call stop at once, e.g. by dropping its connection. Raises :class:`Cancelled` on entry if
        the call is already cancelled."""
        with self._lock:
            self.check()
            self._aborts.append(abort)
        try:
            yield
        finally:
            with self._lock:
                self._aborts.remove(abort)

    @contextlib.contextmanager
    def touching_caller_memory(self, abort: Callable[[], Any] | None = None) -> Iterator[None]:
        """While inside, a cancelled batch does not return until the call has left: wrap the
        reads into (or writes from) buffers the caller owns. ``abort`` (optional) makes the call
        leave promptly (shut the socket it is reading from). Raises :class:`Cancelled` on entry
        if the call is already cancelled, so nothing touches caller memory after a
        cancellation was seen."""
        with self._lock:
            self.check()
            self._touching += 1
            if abort is not None:
                self._aborts.append(abort)
        try:
            yield
        except Exception as exc:
            if self.cancelled and not isinstance(exc, Cancelled):  # aborted under us: say so
                raise Cancelled("the call was cancelled") from exc
            raise
        finally:
            with self._lock:
                self._touching -= 1
                if abort is not None:
                    self._aborts.remove(abort)

    def cancel(self) -> bool:
        """Cancel the call: run its abort actions. True if it is touching caller memory now (the
        canceller must wait for it)."""
        with self._lock:
            self.cancelled = True
            aborts = list(self._aborts)
            touching = self._touching > 0
        for abort in aborts:
            try:
                abort()
            except Exception as exc:  # the call sees its resource gone either way
                log.debug("abort action %r failed: %s", abort, exc)
        return touching


class Outcome(Generic[T]):
    """What one call did: ``ok`` and its ``value``, or not ``ok`` and the ``error`` it raised."""

    __slots__ = ("error", "ok", "value")

    def __init__(self, ok: bool, value: T | None = None, error: BaseException | None = None) -> None:
        self.ok = ok
        self.value = value
        self.error = error

    def __repr__(self) -> str:
        return f"Outcome(ok, {self.value!r:.60})" if self.ok else f"Outcome(error={self.error!r:.80})"

    def unwrap(self) -> T:
        """The value, or raise the error."""
        if not self.ok:
            assert self.error is not None
            raise self.error
        return self.value  # type: ignore[return-value]


class _Batch:
    """The calls of one ``run``: a shared cursor the workers take calls from, and their outcomes."""

    def __init__(self, calls: Sequence[Callable[[CancelToken], Any]], workers: int) -> None:
        self.calls = calls
        self.slots: list[Outcome[Any] | None] = [None] * len(calls)
        self.tokens = [CancelToken() for _ in range(workers)]
        self.next = 0
        self.lock = threading.Lock()
        self.stopped = False
        self.left = workers  # workers not yet finished
        self.done: asyncio.Future[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def work(self, w: int, pool: WorkerPool) -> None:
        token = self.tokens[w]
        try:
            while True:
                with self.lock:
                    if self.stopped or token.cancelled or pool.closed or self.next >= len(self.calls):
                        break  # (a pool closing meanwhile leaves the rest of the batch undone)
                    i = self.next
                    self.next += 1
                pool._enter()
                try:
                    self.slots[i] = Outcome(True, self.calls[i](token))
                except Exception as exc:  # reported per call; the backend decides what it means
                    self.slots[i] = Outcome(False, error=exc)
                finally:
                    pool._leave()
        finally:
            with self.lock:
                self.left -= 1
                last = self.left == 0
            if last and self.loop is not None and self.done is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                    self.loop.call_soon_threadsafe(_resolve, self.done)


class WorkerPool:
    """``max_workers`` threads shared by every batch of one backend (see the module docstring).

    Args:
        max_workers: the bound on calls running at once.
        name: thread-name prefix, and the tier named in the error a closed pool raises.
        initializer: called once in each worker thread as it starts (per-thread settings).
    """

    def __init__(self, max_workers: int, name: str, *, initializer: Callable[[], object] | None = None) -> None:
        self.name = name
        self.max_workers = max_workers
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, initializer=initializer,
                                                               thread_name_prefix=f"lmtier-{name}")
        self._inflight: set[concurrent.futures.Future[Any]] = set()
        self._inflight_lock = threading.Lock()  # added on the loop, discarded on the workers
        self._running = 0
        self._count_lock = threading.Lock()
        self.closed = False

    @property
    def running(self) -> int:
        """Calls executing on a worker thread right now."""
        return self._running

    async def run(self, calls: Sequence[Callable[[CancelToken], T]], *,
                  workers: int | None = None) -> list[Outcome[T]]:
        """Run ``call(token)`` for each call on the pool; one :class:`Outcome` per call, in order.

        ``workers`` caps how many of the pool's threads this batch uses (default: all it can).
        Raises :class:`~lmtier.errors.BackendUnavailableError` if the pool is closed, and
        ``CancelledError`` (after the hand-shake above) if the awaiting task is cancelled.
        """
        outcomes, cancelled = await self._run(calls, workers, settle=False)
        if cancelled:
            raise asyncio.CancelledError
        return outcomes

    async def run_settled(self, calls: Sequence[Callable[[CancelToken], T]], *,
                          workers: int | None = None) -> tuple[list[Outcome[T]], bool]:
        """Like :meth:`run`, but a cancellation waits for *every* call already running (calls
        not started are skipped, with a ``CancelledError`` outcome) and returns the outcomes with
        ``True``: for backends that must account for what was done (an index of written files)
        before re-raising ``CancelledError`` themselves. For calls that end quickly (local I/O)."""
        return await self._run(calls, workers, settle=True)

    async def _run(self, calls: Sequence[Callable[[CancelToken], T]], workers: int | None, *,
                   settle: bool) -> tuple[list[Outcome[T]], bool]:
        if not calls:
            return [], False
        if self.closed:
            raise BackendUnavailableError(f"{self.name}: the tier is closed")
        n = max(1, min(len(calls), self.max_workers, workers or self.max_workers))
        batch = _Batch(calls, n)
        loop = asyncio.get_running_loop()
        batch.loop, batch.done = loop, loop.create_future()
        futures: list[concurrent.futures.Future[Any]] = []
        try:
            for w in range(n):
                futures.append(self._submit(batch.work, w, self))
        except RuntimeError:  # shut down by a concurrent aclose(): the workers started finish alone
            with batch.lock:
                batch.stopped = True
                batch.left -= n - len(futures)
            raise BackendUnavailableError(f"{self.name}: the tier is closed") from None
        cancelled = False
        try:
            await batch.done
        except asyncio.CancelledError:
            if not settle:
                await self._abandon(batch, futures)
                raise
            cancelled = True
            with batch.lock:
                batch.stopped = True
            for future in futures:
                future.cancel()
                await _wait_uninterrupted(asyncio.wrap_future(future))
        missing: BaseException = asyncio.CancelledError() if cancelled else \
            BackendUnavailableError(f"{self.name}: the tier was closed before this call ran")
        outcomes = [s if s is not None else Outcome(False, error=missing) for s in batch.slots]
        batch.slots.clear()
        return outcomes, cancelled  # type: ignore[return-value]

    async def call(self, fn: Callable[[CancelToken], T]) -> T:
        """Run one call; its value, or the exception it raised."""
        (outcome,) = await self.run([fn])
        return outcome.unwrap()

    def spawn(self, fn: Callable[[], Any]) -> bool:
        """Run ``fn()`` in the background (e.g. clean-up after a failure); its errors are logged.
        :meth:`aclose` waits for it. False if the pool is closed (``fn`` does not run)."""
        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s: background call %r failed", self.name, fn)

        if self.closed:
            return False
        try:
            self._submit(run)
        except RuntimeError:  # shut down meanwhile
            return False
        return True

    async def aclose(self, *, warn_after_s: float | None = None, last: Callable[[], Any] | None = None) -> None:
        """Refuse new batches, wait for every call still running (cancelled ones too), run
        ``last()`` on a worker thread (tear down what the calls used), then stop the threads.
        ``warn_after_s`` logs a warning if the wait lasts longer. Idempotent (``last`` runs once)."""
        first = not self.closed
        self.closed = True
        with self._inflight_lock:
            running = [asyncio.wrap_future(f) for f in self._inflight]
        if running:
            _, late = await asyncio.wait(running, timeout=warn_after_s)
            if late:
                log.warning("%s: closing still waits for %d running calls", self.name, len(late))
                await asyncio.wait(late)
        try:
            if last is not None and first:
                await asyncio.wrap_future(self._executor.submit(last))
        finally:
            await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    # -- machinery -----------------------------------------------------------------------------
    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future = self._executor.submit(fn, *args)
        with self._inflight_lock:
            self._inflight.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._inflight_lock:
            self._inflight.discard(future)

    def _enter(self) -> None:
        with self._count_lock:
            self._running += 1

    def _leave(self) -> None:
        with self._count_lock:
            self._running -= 1

    @staticmethod
    async def _abandon(batch: _Batch, futures: list[concurrent.futures.Future[Any]]) -> None:
        """Stop a cancelled batch: skip what has not started, abort what runs, and wait for the
        workers that are touching caller memory."""
        with batch.lock:
            batch.stopped = True
        waits = []
        for token, future in zip(batch.tokens, futures, strict=False):
            must_wait = token.cancel()
            if not future.cancel() and must_wait:
                waits.append(asyncio.wrap_future(future))
        for fut in waits:
            await _wait_uninterrupted(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _wait_uninterrupted(fut: asyncio.Future[Any]) -> None:
    """Wait for ``fut`` even if this task is cancelled again meanwhile; ignore its outcome."""
    while not fut.done():
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            continue
        except BaseException:
            break
