"""SGLang's real HiCache classes on a CPU-only machine, for the sglang integration tests.

SGLang (installed ``--no-deps``: its wheel pins a CUDA torch) imports its storage interface and
backend factory on CPU torch as is. Its host-pool classes (``MHATokenToKVPoolHost``,
``MLATokenToKVPoolHost``) import SGLang's model-config package too, which imports ``torchvision``
for a few vision models' preprocessing at module level; PyPI's torchvision is a CUDA build that
does not load on CPU torch 2.13. :func:`host_pool_classes` therefore answers those imports with an
inert stand-in module (only when no torchvision is importable): nothing on the HiCache storage
path calls it. The pools themselves are SGLang's own, built on CPU tensors (``pin_memory=False``).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["EXTRA", "cache_controller", "fill_random", "host_pool_classes", "main", "mha_pool", "mla_pool",
           "storage_config"]

EXTRA = {"backend_name": "lmtier", "module_path": "lmtier.integrations.sglang",
         "class_name": "LMTierHiCacheStorage", "interface_v1": 1}


class _Inert:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return _Inert()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _Inert()


class _InertModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _InertModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def host_pool_classes() -> tuple[type, type]:
    """SGLang's ``MHATokenToKVPoolHost`` and ``MLATokenToKVPoolHost`` (see the module doc)."""
    stand_in = None
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        # transformers decides once whether torchvision exists; ask it before the stand-in does
        import transformers.utils.import_utils as tf_imports

        tf_imports.is_torchvision_available()
        stand_in = _TorchvisionStandIn()
        sys.meta_path.insert(0, stand_in)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "only CUDA supports ..." from quantization modules
            from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
            from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
    finally:
        if stand_in is not None:  # only SGLang's modules keep the inert objects; later imports fail as before
            sys.meta_path.remove(stand_in)
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]
    return MHATokenToKVPoolHost, MLATokenToKVPoolHost


def mha_pool(layout: str = "page_first", *, layers: int = 3, heads: int = 2, head_dim: int = 16,
             page_size: int = 4, device_tokens: int = 64, dtype: torch.dtype = torch.bfloat16) -> Any:
    """SGLang's MHA host pool (2x the device tokens) over CPU 'device' buffers."""
    from sglang.srt.mem_cache.device_pool_info import KVBufferLayout, KVBuffers, MHABufferInfo

    mha_cls, _ = host_pool_classes()
    k = tuple(torch.zeros(device_tokens, heads, head_dim, dtype=dtype) for _ in range(layers))
    v = tuple(torch.zeros(device_tokens, heads, head_dim, dtype=dtype) for _ in range(layers))
    buffers = KVBuffers(k=k, v=v, k_data_ptrs=_ptrs(k), v_data_ptrs=_ptrs(v), layout=KVBufferLayout.NHD)
    info = MHABufferInfo(buffers=buffers, page_size=page_size, head_num=heads, head_dim=head_dim,
                         v_head_dim=head_dim, dtype=dtype, device=torch.device("cpu"))
    return mha_cls(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                   device_capacity_tokens=device_tokens, start_layer=0, end_layer=layers)


def mla_pool(layout: str = "page_first", *, layers: int = 3, rank: int = 32, rope: int = 16,
             page_size: int = 4, device_tokens: int = 64, dtype: torch.dtype = torch.bfloat16) -> Any:
    """SGLang's MLA host pool (2x the device tokens) over CPU 'device' buffers."""
    from sglang.srt.mem_cache.device_pool_info import MLABufferInfo

    _, mla_cls = host_pool_classes()
    bufs = tuple(torch.zeros(device_tokens, 1, rank + rope, dtype=dtype) for _ in range(layers))
    info = MLABufferInfo(buffers=bufs, data_ptrs=_ptrs(bufs), layer_indices=tuple(range(layers)),
                         device_layer_num=layers, page_size=page_size, kv_lora_rank=rank,
                         qk_rope_head_dim=rope, kv_cache_dim=rank + rope, dtype=dtype,
                         device=torch.device("cpu"))
    return mla_cls(info, 2.0, 0, page_size, layout, pin_memory=False, device="cpu",
                   device_capacity_tokens=device_tokens, start_layer=0, end_layer=layers,
                   target_layer_num=layers)


def storage_config(extra: dict[str, Any] | None = None, **fields: Any) -> Any:
    """SGLang's HiCacheStorageConfig of a one-GPU deployment, ``fields`` overriding."""
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    base: dict[str, Any] = dict(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=True, is_page_first_layout=True,
                                model_name="tiny-llama", extra_config=dict(EXTRA if extra is None else extra))
    base.update(fields)
    return HiCacheStorageConfig(**base)


@contextlib.contextmanager
def cache_controller(host_pool: Any, extra: dict[str, Any], workdir: Path) -> Iterator[Any]:
    """SGLang's own ``HiCacheController`` of a one-rank deployment on CPU, storage attached.

    What a scheduler process sets up before building one: a (one-process, gloo) torch.distributed
    group for its TP group and the parallel widths in SGLang's runtime context; the device pool
    is SGLang's ``MHATokenToKVPool`` on CPU. The controller starts its prefetch, transfer, sync and
    backup threads; leaving the block detaches the storage (stopping them, closing the backend)
    and undoes the process-wide setup.
    """
    import torch.distributed as dist
    from sglang.srt.managers.cache_controller import HiCacheController
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.runtime_context import get_parallel

    device_pool = MHATokenToKVPool(host_pool.device_capacity_tokens, host_pool.page_size, host_pool.dtype,
                                   host_pool.head_num, host_pool.head_dim, host_pool.layer_num, "cpu", False)
    allocator = TokenToKVPoolAllocator(host_pool.device_capacity_tokens, host_pool.dtype, "cpu", device_pool, False)
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'dist-init'}", rank=0, world_size=1)
    get_parallel().override_permanently(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_dcp_size=1,
                                        attn_dcp_rank=0)
    controller = None
    try:
        controller = HiCacheController(
            allocator, host_pool, host_pool.page_size, dist.group.WORLD, threading.Event(),
            io_backend="direct", write_policy="write_through", storage_backend="dynamic",
            model_name="tiny-llama", storage_backend_extra_config=dict(extra))
        yield controller
    finally:
        if controller is not None:
            controller.detach_storage_backend()
        get_parallel().clear_stamp()
        dist.destroy_process_group()


def fill_random(pool: Any, seed: int) -> None:
    """Fill the whole host pool with bytes drawn from ``seed`` (the same in every process)."""
    gen = torch.Generator().manual_seed(seed)
    flat = pool.kv_buffer.view(torch.uint8).reshape(-1)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=gen))


def main(argv: list[str]) -> int:
    """``write CONFIG SEED KEY...``: store the first pages of a seeded MHA pool (another process)."""
    from lmtier.integrations.sglang import LMTierHiCacheStorage

    command, config, seed, *keys = argv
    assert command == "write", command
    backend = LMTierHiCacheStorage(storage_config({**EXTRA, "lmtier_config": config}), {})
    try:
        pool = mha_pool()
        backend.register_mem_pool_host(pool)
        fill_random(pool, int(seed))
        indices = pool.alloc(len(keys) * pool.page_size)
        stored = sum(backend.batch_set_v1(keys, indices))
        backend.store.flush()
    finally:
        backend.close()
    print(f"stored={stored}")
    return 0


def _ptrs(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.uint64)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
