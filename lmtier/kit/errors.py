"""One way to turn a client library's exceptions into the lmtier error tree.

The manager degrades :class:`~lmtier.errors.BackendError` to misses and skipped writes and opens
a tier's circuit breaker on :class:`~lmtier.errors.BackendUnavailableError`, so the class a
backend raises decides how a fault is handled. An :class:`ErrorMap` is an ordered list of
:class:`Rule`: the first rule matching an exception picks the lmtier class and the advice that
ends the message (what to do about it); an exception no rule matches becomes a plain
``BackendError``. :data:`OS_ERROR_RULES` is the ``errno`` table every backend over files or
sockets shares::

    ERRORS = ErrorMap("mytier", [
        Rule(MyClient.AuthError, BackendUnavailableError, "the server refused our credentials"),
        *OS_ERROR_RULES,
    ])
    ...
    raise ERRORS(exc, op="get", where=url) from exc

An :class:`~lmtier.errors.LmtierError` passes through unchanged.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmtier.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    LmtierError,
)
from lmtier.kit.naming import RootGoneError

__all__ = ["OS_ERROR_RULES", "ErrorMap", "Rule", "describe", "errno_in"]

Matcher = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]


@dataclass(frozen=True)
class Rule:
    """``match`` (exception classes, or a predicate) -> ``error`` class, with ``advice``."""

    match: Matcher
    error: type[LmtierError]
    advice: str = ""

    def matches(self, exc: BaseException) -> bool:
        if isinstance(self.match, (type, tuple)):
            return isinstance(exc, self.match)
        return bool(self.match(exc))


def errno_in(*codes: int) -> Callable[[BaseException], bool]:
    """A :class:`Rule` matcher: an ``OSError`` whose ``errno`` is one of ``codes``."""
    wanted = frozenset(codes)

    def match(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno in wanted

    match.__name__ = f"errno_in({', '.join(errno.errorcode.get(c, str(c)) for c in codes)})"
    return match


#: What an ``OSError`` means for a tier, by errno: full, slow, or failing/gone.
OS_ERROR_RULES: tuple[Rule, ...] = (
    # before any errno rule: it is an ENOENT, but of the whole tier, not of one file
    Rule(RootGoneError, BackendUnavailableError, "the tier's root was deleted or unmounted: mount it "
         "again (the tier resumes), or restart the tier to begin a new one there"),
    Rule(errno_in(errno.ENOSPC, errno.EDQUOT, errno.EFBIG), CapacityError,
         "free space on that filesystem or lower the tier's max_bytes"),
    Rule(errno_in(errno.ETIMEDOUT), BackendTimeoutError, "the filesystem or peer did not answer (network mount?)"),
    # read-only: writes fail, reads go on (not a reason to take the tier out)
    Rule(errno_in(errno.EROFS), BackendError, "the filesystem is read-only: writes are skipped, reads go on; "
         "remount it read-write to store again"),
    Rule(errno_in(errno.EIO, errno.ENXIO, errno.ENODEV, errno.ESTALE, errno.ENOTCONN,
                  errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EHOSTDOWN, errno.ESHUTDOWN,
                  errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH,
                  errno.EPIPE), BackendUnavailableError,
         "check the device, mount and permissions of the tier's storage, or that its server is up"),
    Rule((ConnectionError, TimeoutError), BackendUnavailableError, "is the server up and reachable?"),
)


def describe(exc: BaseException) -> str:
    """A short description of ``exc``: ``strerror [ENAME] path`` for OS errors, else ``Type: text``."""
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" {os.fspath(exc.filename)}" if exc.filename else ""
        return f"{exc.strerror or exc} [{errno.errorcode.get(exc.errno, '?')}]{where}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ErrorMap:
    """Maps exceptions of one tier to lmtier errors by its :class:`Rule` list (first match wins).

    Args:
        tier: how messages name the tier (``"redis tier redis://10.0.0.5:6379/0"``).
        rules: checked in order.
        default: the class for an exception no rule matches, and ``default_advice`` its advice.
        describer: how messages describe the exception (default: :func:`describe`).
    """

    def __init__(self, tier: str, rules: Sequence[Rule], *, default: type[LmtierError] = BackendError,
                 default_advice: str = "", describer: Callable[[BaseException], str] = describe) -> None:
        self.tier = tier
        self.rules = tuple(rules)
        self.default = default
        self.default_advice = default_advice
        self.describer = describer

    def __call__(self, exc: BaseException, *, op: str, where: str = "") -> LmtierError:
        """The lmtier error for ``exc`` raised while doing ``op`` (on ``where``, if given)."""
        if isinstance(exc, LmtierError):
            return exc
        rule = next((r for r in self.rules if r.matches(exc)), None)
        cls, advice = (rule.error, rule.advice) if rule is not None else (self.default, self.default_advice)
        place = f" {where}" if where else ""
        message = f"{self.tier}: {op}{place} failed: {self.describer(exc)}"
        error = cls(f"{message}; {advice}" if advice else message)
        error.__cause__ = exc
        return error

    def with_rules(self, first: Sequence[Rule], *, tier: str | None = None) -> ErrorMap:
        """A map that tries ``first`` before these rules (e.g. stricter rules at open time)."""
        return ErrorMap(tier or self.tier, (*first, *self.rules), default=self.default,
                        default_advice=self.default_advice, describer=self.describer)
