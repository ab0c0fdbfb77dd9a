"""On a GPU: a worker (this process, KV in GPU memory) and ``lmtier serve`` (a subprocess, no CUDA).

The worker maps the server's slab, registers it with ``cudaHostRegister`` and moves pages between
its GPU cache and slab slots with the native kernel (``LMTIER_REQUIRE_NATIVE=1``: a fallback
would fail the test). The bytes must come back equal, and the server must not have touched the
GPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lmtier.keys import chunk_keys, make_namespace
from tests.server.serverproc import ServerProc, start_server, tiers_yaml, wait_until

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.server,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    srv = start_server(tmp_path, config=tiers_yaml(tmp_path, slab="256MiB", disk=False))
    yield srv
    srv.close()


@pytest.fixture
def require_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMTIER_REQUIRE_NATIVE", "1")


@pytest.mark.parametrize("mode", ["mapped", "staged"])
def test_gpu_pages_round_trip_through_the_registered_slab_with_the_native_kernel(
        server: ServerProc, require_native: None, mode: str) -> None:
    from lmtier.server.client import ServerStore
    from lmtier.transfer import chunk_nbytes, describe_layout, offload, onload

    layers, pages, blocks = 4, 16, 80
    raw = torch.randint(0, 256, (layers * blocks * 2 * 16 * 8 * 128 * 2,), dtype=torch.uint8, device="cuda")
    big = raw.view(torch.bfloat16).view(layers, blocks, 2, 16, 8, 128)
    kv = [big[i] for i in range(layers)]
    layout = describe_layout(kv[0], "flashinfer")
    nbytes = chunk_nbytes(layout, layers, pages)
    src = [list(range(0, 16)), list(range(16, 32))]
    dst = [list(range(40, 56)), list(range(56, 72))]
    keys = chunk_keys(np.arange(512), make_namespace(test="gpu"), 256)
    store = ServerStore(server.address, register_cuda=True, connect_timeout_s=30, fetch_timeout_s=30,
                        commit_timeout_s=30)
    try:
        wait_until(lambda: store.connected, 60, "the slab to be mapped and registered")
        reserved = store.reserve([nbytes, nbytes])
        assert all(c is not None and c.tensor.is_pinned() for c in reserved)
        offload(kv, layout, src, [c.tensor for c in reserved], mode=mode)
        torch.cuda.synchronize()
        assert store.commit(list(zip(keys, reserved, strict=True))).result() == 2
        leases = store.fetch(keys, [nbytes, nbytes]).result()
        assert all(c is not None for c in leases)
        onload(kv, layout, dst, [c.tensor for c in leases], mode=mode)
        torch.cuda.synchronize()
        for c in leases:
            c.release()
        for layer in kv:
            # as integers: random bytes seen as bf16 hold NaNs, which never equal themselves
            assert torch.equal(layer[0:32].view(torch.int16), layer[40:72].view(torch.int16)), \
                "the pages came back through the slab unchanged"
        wait_until(lambda: server.status()["leases"] == 0, what="leases released")
    finally:
        store.close()
    # a CUDA context holds /dev/nvidia-uvm and /dev/nvidiaN open; the server must have none
    opened = [os.readlink(fd) for fd in Path(f"/proc/{server.pid}/fd").iterdir()]
    assert not [f for f in opened if re.match(r"/dev/nvidia(-uvm|\d)", f)], "lmtier serve touched the GPU"
