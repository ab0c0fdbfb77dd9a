"""The conformance suite's back doors (lmtier.testing.backdoors) over the stores our tests run:
files in the shared layout, a file tier's root unmounted and mounted again, objects in a SeaweedFS
bucket, a SeaweedFS server killed and restarted, and an object whose bytes rot inside SeaweedFS's
own volume files (the server cannot serve it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtier.keys import ChunkKey
from lmtier.kit import FileLayout, object_name
from tests.support.seaweedfs import SeaweedFS, create_bucket

__all__ = ["KilledSeaweedFS", "RawFiles", "RawObjects", "UnmountedRoot", "rot_in_volume", "seaweedfs_serving"]


class RawFiles:
    """raw_store: each key's file (lmtier.kit.FileLayout), read and replaced behind the tier's back,
    or made unreadable (an UnreadableStore)."""

    def __init__(self, root: Path, fan_out: int = 2) -> None:
        self.layout = FileLayout(root, fan_out)

    def read(self, key: ChunkKey) -> bytes | None:
        path = Path(self.layout.path_of(key))
        return path.read_bytes() if path.exists() else None

    def write(self, key: ChunkKey, data: bytes) -> None:
        path = Path(self.layout.path_of(key))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def make_unreadable(self, key: ChunkKey) -> None:
        """A directory where the key's file was: opening or reading it fails (EISDIR)."""
        path = Path(self.layout.path_of(key))
        path.unlink()
        path.mkdir()


@dataclass
class UnmountedRoot:
    """service for a file tier: its root taken away as an unmount does, and put back.

    ``stop`` moves the root's whole tree aside and leaves an empty directory in its place (the
    bare mount point: no marker, no files), ``start`` puts the tree back. Every file and
    directory the tier had stays the same object; only its path comes and goes. What a tier must
    do meanwhile: fail typed or miss, and never write into the bare mount point (those files
    would land on the filesystem underneath and vanish at the next mount)."""

    root: Path
    deadline_s: float = 10.0

    @property
    def aside(self) -> Path:
        return self.root.with_name(self.root.name + ".unmounted")

    def stop(self) -> None:
        os.rename(self.root, self.aside)
        self.root.mkdir()

    def start(self) -> None:
        if not self.aside.exists():
            return
        left = sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*"))
        assert not left, f"the tier wrote into its unmounted root's mount point: {left[:5]}"
        self.root.rmdir()
        os.rename(self.aside, self.root)


class RawObjects:
    """raw_store: each key's object (lmtier.kit.object_name), read and written with boto3."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix

    def read(self, key: ChunkKey) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=object_name(self.prefix, key))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        with body:
            data: bytes = body.read()
            return data

    def write(self, key: ChunkKey, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=object_name(self.prefix, key), Body=data)


@dataclass
class KilledSeaweedFS:
    """service: the S3 server SIGKILLed, and relaunched on its ports and data."""

    server: SeaweedFS
    deadline_s: float

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.restart()


@contextlib.contextmanager
def seaweedfs_serving(workdir: Path, bucket: str, **kwargs: Any) -> Iterator[SeaweedFS]:
    """A SeaweedFS server of the caller's own with ``bucket`` made, stopped (by PID) afterwards."""
    server = SeaweedFS(workdir, **kwargs)
    server.start()
    try:
        create_bucket(server.endpoint, bucket)
        yield server
    finally:
        server.close()


def rot_in_volume(server: SeaweedFS, data: bytes) -> None:
    """Flip one bit of the object holding ``data`` inside SeaweedFS's volume files (``*.dat``), as a
    bad sector under the server would: the volume server's own CRC check then fails every GET of
    that object (SeaweedFS answers HTTP 500 after ~13 s of its own retries), while its HEAD and
    every other object are fine. ``data`` must be unique in the store (random bytes are)."""
    probe = data[len(data) // 2:len(data) // 2 + 64]
    hits = []
    for dat in server.workdir.rglob("*.dat"):
        blob = dat.read_bytes()
        at = blob.find(probe)
        if at >= 0:
            hits.append((dat, at))
    assert len(hits) == 1, f"expected the object's bytes in exactly one volume file, found {hits}"
    dat, at = hits[0]
    with dat.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
