"""Fixtures of the fault suite: real filesystems to fill up and remount read-only.

A filesystem case runs on a small tmpfs that the test mounts itself, so a full or read-only
filesystem is the kernel's, not a fake's. Mounting needs root (CAP_SYS_ADMIN); elsewhere these
tests skip, saying why. Every mount is undone on every path, a busy one lazily.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.ledger import FaultRecord
from tests.faults.remotes import Remote, remote_fixture


class ScratchFS:
    """A tmpfs of ``size`` bytes mounted at ``path``; ``read_only()`` / ``read_write()`` remount it."""

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.mounted = False

    def mount(self) -> None:
        _run("mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "lmtier-faults", str(self.path))
        self.mounted = True

    def read_only(self) -> None:
        _run("mount", "-o", "remount,ro", str(self.path))

    def read_write(self) -> None:
        _run("mount", "-o", "remount,rw", str(self.path))

    def unmount(self) -> None:
        if not self.mounted:
            return
        if subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            _run("umount", "-l", str(self.path))  # still busy (an open file): detach it now
        self.mounted = False


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


def _why_no_mounts() -> str | None:
    if os.geteuid() != 0:
        return "mounting a scratch tmpfs needs root; run the fault suite as root to cover real filesystems"
    if not (shutil.which("mount") and shutil.which("umount")):
        return "no mount(8) / umount(8) here"
    return None


@pytest.fixture
def scratch_fs(tmp_path: Path) -> Iterator[Callable[[int], ScratchFS]]:
    """``scratch_fs(size)`` mounts a fresh tmpfs of ``size`` bytes under ``tmp_path``."""
    why = _why_no_mounts()
    if why:
        pytest.skip(why)
    made: list[ScratchFS] = []

    def make(size: int) -> ScratchFS:
        fs = ScratchFS(tmp_path / f"fs{len(made)}", size)
        fs.path.mkdir()
        made.append(fs)
        try:
            fs.mount()
        except OSError as exc:
            pytest.skip(f"cannot mount a scratch tmpfs here ({exc})")
        return fs

    try:
        yield make
    finally:
        for fs in reversed(made):
            fs.unmount()


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Iterator[Callable[[str], FaultRecord]]:
    """``ledger(fault)`` -> a :class:`~tests.faults.ledger.FaultRecord` written out at teardown."""
    records: list[FaultRecord] = []

    def open_record(fault: str) -> FaultRecord:
        record = FaultRecord(fault, test=request.node.name)
        records.append(record)
        return record

    yield open_record
    for record in records:
        record.write()


@pytest.fixture(params=["redis", "s3"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Remote]:
    """A private real server of each kind (redis-server, SeaweedFS), stopped after the test."""
    yield from remote_fixture(request.param, tmp_path / request.param)
