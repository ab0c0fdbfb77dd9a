"""native/ builds with nvcc (no GPU needed) and its C API validates arguments before any CUDA work."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmtier.errors import InvalidArgumentError, LmtierError, NativeUnavailableError, NotSupportedError
from lmtier.transfer import _native, transfer_status

NATIVE = Path(__file__).resolve().parents[2] / "native"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(home) if home.is_file() else None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("native")
    env = dict(os.environ, NVCC=nvcc, LMT_BUILD_DIR=str(out))
    proc = subprocess.run(
        ["bash", str(NATIVE / "build.sh")], env=env, capture_output=True, text=True, timeout=110
    )
    assert proc.returncode == 0, proc.stderr
    lib = out / "liblmtier_transfer.so"
    assert lib.is_file()
    return lib


@pytest.fixture
def lib(built: Path) -> ctypes.CDLL:
    loaded = _native._load(str(built))
    assert loaded.lib is not None, loaded.error
    return loaded.lib


def test_native_compiles_with_nvcc_and_reports_its_abi(lib: ctypes.CDLL) -> None:
    assert lib.lmt_abi_version() == _native.ABI_VERSION
    assert lib.lmt_version_string().startswith(b"lmtier_transfer")
    assert lib.lmt_status_string(0) == b"LMT_OK"
    assert lib.lmt_status_string(99) == b"LMT_ERR_UNKNOWN"


def test_transfer_status_names_the_library_from_the_env(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_NATIVE_LIB", str(built))
    status = transfer_status()
    assert status["library"] == str(built)
    assert status["library_version"].startswith("lmtier_transfer")
    expected = "native" if torch.cuda.is_available() else "fallback"
    assert status["active"] == expected


def _call(
    lib: ctypes.CDLL,
    *,
    direction: int = 1,
    runs: int = 1,
    reserved: int = 0,
    ids: list[int] | None = None,
    pages: list[int] | None = None,
    layers: list[int] | None = None,
    layer_ptrs: list[int] | None = None,
) -> tuple[int, str]:
    layout = _native._Layout(8, 256, (ctypes.c_uint64 * 2)(0, 2048), 256, runs, reserved)
    ptrs = layer_ptrs if layer_ptrs is not None else [0x10000, 0x20000]
    ids = [0, 1] if ids is None else ids
    pages = [len(ids)] if pages is None else pages
    sel = None if layers is None else (ctypes.c_int32 * len(layers))(*layers)
    status = lib.lmt_copy_pages(
        direction,
        ctypes.byref(layout),
        (ctypes.c_uint64 * len(ptrs))(*ptrs),
        len(ptrs),
        sel,
        0 if layers is None else len(layers),
        (ctypes.c_int32 * max(1, len(ids)))(*ids),
        (ctypes.c_int32 * len(pages))(*pages),
        (ctypes.c_uint64 * len(pages))(*([0x1000] * len(pages))),
        len(pages),
        0,
        None,
        None,
    )
    return status, lib.lmt_last_error().decode()


@pytest.mark.parametrize(
    ("kwargs", "status", "match"),
    [
        ({"direction": 2}, 1, "direction"),
        ({"runs": 3}, 6, "1 or 2 runs"),
        ({"runs": 0}, 1, "1 or 2 runs"),
        ({"reserved": 1}, 1, "reserved"),
        ({"ids": [0, 8]}, 1, r"out of \[0, 8\)"),
        ({"ids": [3, 3]}, 1, "repeats"),
        ({"ids": [0], "pages": [2, -1]}, 1, "< 0"),
        ({"layers": [2]}, 1, "out of"),
        ({"layers": [1, 1]}, 1, "repeated"),
        ({"layer_ptrs": [0x10000, 0]}, 1, "NULL"),
    ],
)
def test_c_api_rejects_bad_arguments_with_a_message(
    lib: ctypes.CDLL, kwargs: dict[str, object], status: int, match: str
) -> None:
    import re

    got, message = _call(lib, **kwargs)  # type: ignore[arg-type]
    assert got == status
    assert re.search(match, message), message


def test_c_api_accepts_repeated_ids_when_reading_the_cache_and_empty_batches(lib: ctypes.CDLL) -> None:
    # Nothing to move: succeeds without touching CUDA.
    assert _call(lib, ids=[], pages=[0])[0] == 0
    assert _call(lib, layers=[])[0] == 0
    if not torch.cuda.is_available():
        status, message = _call(lib, direction=0, ids=[3, 3])
        assert status == 3, message  # got past validation, then found no device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_device_count_without_a_gpu_is_no_device(lib: ctypes.CDLL) -> None:
    count = ctypes.c_int(-1)
    assert lib.lmt_device_count(ctypes.byref(count)) == 3
    assert count.value == 0


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (1, InvalidArgumentError),
        (2, InvalidArgumentError),
        (3, NativeUnavailableError),
        (4, NativeUnavailableError),
        (5, LmtierError),
        (6, NotSupportedError),
    ],
)
def test_status_codes_map_to_typed_errors(lib: ctypes.CDLL, status: int, error: type[Exception]) -> None:
    with pytest.raises(error, match=lib.lmt_status_string(status).decode()):
        _native._raise(lib, status)
