"""filedir against lmtier's conformance suite, with the back door to its files that turns on the
corruption scenarios (truncated files, flipped bits, swapped values, newer formats)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lmtier_filedir.backend import FileDirBackend
from lmtier_filedir.plugin import FileDirConfig

from lmtier.keys import ChunkKey
from lmtier.kit import FileLayout
from lmtier.testing import BackendConformance


class RawFiles:
    """What the suite's scenarios read and damage: the file of each key, behind the tier's back."""

    def __init__(self, root: Path) -> None:
        self.layout = FileLayout(root)

    def read(self, key: ChunkKey) -> bytes | None:
        path = Path(self.layout.path_of(key))
        return path.read_bytes() if path.exists() else None

    def write(self, key: ChunkKey, data: bytes) -> None:
        Path(self.layout.path_of(key)).write_bytes(data)


class TestFileDir(BackendConformance):
    big_item_bytes = 8 << 20

    @pytest.fixture
    def backend_factory(self, tmp_path):
        config = FileDirConfig(root=tmp_path / "tier")
        return lambda: FileDirBackend(config)

    @pytest.fixture
    def raw_store(self, tmp_path):
        return RawFiles(tmp_path / "tier")
