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
        (7, LmtierError),
    ],
)
def test_status_codes_map_to_typed_errors(lib: ctypes.CDLL, status: int, error: type[Exception]) -> None:
    with pytest.raises(error, match=lib.lmt_status_string(status).decode()):
        _native._raise(lib, status)


@pytest.mark.parametrize(
    ("device", "nbytes", "slots", "streams", "match"),
    [
        (-1, 1 << 20, 4, 2, "device -1"),
        (0, 1 << 20, 1, 2, "slots 1"),
        (0, 1 << 20, 65, 2, "slots 65"),
        (0, 1 << 20, 4, 0, "copy_streams 0"),
        (0, 1 << 20, 4, 9, "copy_streams 9"),
        (0, 1000, 4, 2, "cannot make 4 slots"),
    ],
)
def test_staging_create_rejects_bad_sizes_with_a_message(
    lib: ctypes.CDLL, device: int, nbytes: int, slots: int, streams: int, match: str
) -> None:
    out = ctypes.c_void_p()
    assert lib.lmt_staging_create(device, nbytes, slots, streams, ctypes.byref(out)) == 1
    assert match in lib.lmt_last_error().decode()
    assert out.value is None
    assert lib.lmt_staging_create(0, 1 << 20, 4, 2, None) == 1  # no place for the handle


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_staging_create_without_a_gpu_is_no_device(lib: ctypes.CDLL) -> None:
    out = ctypes.c_void_p()
    assert lib.lmt_staging_create(0, 1 << 20, 4, 2, ctypes.byref(out)) == 3
    assert out.value is None
    assert lib.lmt_staging_destroy(None) == 0
    assert lib.lmt_staging_slot_bytes(None) == 0


def test_staged_copy_needs_a_staging_buffer(lib: ctypes.CDLL) -> None:
    layout = _native._Layout(8, 256, (ctypes.c_uint64 * 2)(0, 0), 256, 1, 0)
    status = lib.lmt_copy_pages_staged(
        1, ctypes.byref(layout), (ctypes.c_uint64 * 1)(0x10000), 1, None, 0, (ctypes.c_int32 * 1)(0),
        (ctypes.c_int32 * 1)(1), (ctypes.c_uint64 * 1)(0x1000), 1, 0, None, None, None,
    )
    assert status == 1
    assert "staging is NULL" in lib.lmt_last_error().decode()


@pytest.mark.parametrize(
    ("env", "match"),
    [({"LMTIER_TRANSFER_MODE": "fast"}, "LMTIER_TRANSFER_MODE"), ({"LMTIER_STAGING_BYTES": "lots"}, "not an integer")],
)
def test_bad_transfer_settings_are_named(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], match: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(InvalidArgumentError, match=match):
        _native.staging_config()


def test_transfer_status_reports_the_copy_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_TRANSFER_MODE", "staged")
    monkeypatch.setenv("LMTIER_STAGING_BYTES", str(16 << 20))
    monkeypatch.setenv("LMTIER_STAGING_H2D_BYTES", str(48 << 20))
    status = transfer_status()
    assert (status["mode"], status["staging_bytes_d2h"], status["staging_bytes_h2d"]) == ("staged", 16 << 20, 48 << 20)
    monkeypatch.setenv("LMTIER_TRANSFER_MODE", "fast")
    assert "LMTIER_TRANSFER_MODE" in transfer_status()["mode_error"]


@pytest.mark.parametrize(
    ("pages", "layers", "page_bytes", "staged"),
    [
        ([16] * 40, list(range(36)), 64 << 10, True),  # all layers of 40 Qwen3-8B chunks
        ([16] * 40, [7], 64 << 10, True),  # one layer: 1 MiB per chunk
        ([16] * 40, [3, 9], 64 << 10, True),  # two separate layers
        ([16] * 40, [7], 18 << 10, False),  # one MLA layer: 288 KiB per chunk
        ([16], list(range(36)), 1 << 10, False),  # 576 KiB in all: below the call minimum
        ([0, 16, 0], [1], 1 << 20, True),  # empty chunks make no copies
    ],
)
def test_auto_mode_stages_large_calls_with_long_host_ranges(
    pages: list[int], layers: list[int], page_bytes: int, staged: bool
) -> None:
    assert _native._worth_staging(pages, layers, page_bytes, _native.StagingConfig()) is staged
