"""Options of the ``disk`` backend."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ByteSize, ConfigDict, Field, field_validator

from lmtier.kit.options import FileLayoutOptions

__all__ = ["DiskConfig"]


class DiskConfig(FileLayoutOptions):
    """Where and how the disk tier stores chunks.

    Attributes:
        root: directory holding the tier (created if missing; ``~`` is expanded). It must be new,
            empty, or a disk tier's root already: the first open writes a ``.lmtier_disk_root`` marker
            file, and a non-empty directory without one is refused (the tier deletes files in its
            root). One process owns it at a time: the in-memory index is not shared, so two live
            processes on one root would evict each other's files without knowing.
        max_bytes: bytes of files (64-byte header + payload each) the tier keeps; least recently
            used files are evicted beyond it. Writes in flight may exceed it briefly by at most
            ``max_concurrency`` items.
        max_concurrency: file operations running at once (worker threads of the tier). Raise it
            for NVMe drives that want deep queues; 1 serialises all I/O.
        fsync: ``False`` (default) trusts the page cache: a put returns once the bytes are in the
            kernel, and an OS crash or power loss may lose recent puts (never corrupt them
            silently: a torn file fails its checksum and becomes a miss). ``True`` fsyncs each
            file and its directory before the rename that publishes it, so a finished put
            survives power loss, at the cost of waiting for the device (often 2-10x slower puts).
            A KV cache can always be recomputed, hence the default.
        get_buffer_bytes: memory kept, while idle, for reuse as ``get`` result buffers of 1 MiB
            or more. ``get`` returns private copies; fresh memory for each costs page faults that
            slowed large reads by 20-80% where measured, so buffers whose views were dropped are
            reused (exact sizes: KV chunks of a model are all alike). 0 disables the reuse.
        fan_out: directory levels below ``root/<namespace>/``
            (:class:`~lmtier.kit.FileLayoutOptions`).
    """

    model_config = ConfigDict(extra="forbid")
    root: Path = Field(Path("~/.cache/lmtier"), description="directory of the tier (~ expanded)")
    max_bytes: ByteSize = Field(ByteSize(20 << 30), gt=0, description="LRU-evicts beyond this many bytes")
    max_concurrency: int = Field(8, ge=1, le=256, description="file operations running at once (threads)")
    fsync: bool = Field(False, description="fsync each put before publishing it: durable but slower")
    get_buffer_bytes: ByteSize = Field(ByteSize(1 << 30), ge=0,
                                       description="idle memory kept to reuse get's result buffers")

    @field_validator("root", mode="before")
    @classmethod
    def _not_empty(cls, root: object) -> object:
        # before conversion: Path("") is Path("."), the current directory, which is never meant
        if isinstance(root, (str, os.PathLike)) and not os.fspath(root).strip():
            raise ValueError("root is empty; name the tier's own directory, e.g. ~/.cache/lmtier")
        return root

    @field_validator("root")
    @classmethod
    def _expand_user(cls, root: Path) -> Path:
        return root.expanduser()
