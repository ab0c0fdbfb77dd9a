"""The shared-memory slab: the server's hot tier, mapped by every client.

The server creates it once (:meth:`Slab.create`) as an anonymous ``memfd`` of the cpu tier's
``max_bytes`` and hands its file descriptor to each client in the hello reply (``SCM_RIGHTS``);
clients map it (:meth:`Slab.from_fd`) and copy KV pages to and from ranges of it themselves.

Why a memfd rather than a named POSIX segment under ``/dev/shm``: nothing is left behind when the
server is killed (the memory goes when the last mapping and descriptor close), no name can be
guessed or squatted by another user, and it is not bound by a container's ``/dev/shm`` size (64 MiB
by default in Docker). Why the server commits the whole slab at start (``fallocate``): the pages
are then charged to the server's memory cgroup, not to whichever client touched a page first, and
a client writing a page can never take a ``SIGBUS`` for a page the system could not provide.

On a client with CUDA, :meth:`Slab.register_cuda` page-locks the mapping (``cudaHostRegister``), so
the native transfer kernel copies between GPU pages and slab ranges at pinned-memory speed; the
server itself never touches a GPU.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import threading
from typing import TYPE_CHECKING, Any

from lmtier.errors import CapacityError, LmtierError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Slab"]

_PAGE = mmap.PAGESIZE
# cudaHostRegisterPortable | cudaHostRegisterMapped: usable from every device, device-addressable
_CUDA_REGISTER_FLAGS = 0x01 | 0x02


class Slab:
    """One mapping of a shared-memory slab: its bytes as an mmap, a numpy array and a torch tensor.

    The mapping lives as long as this object and every tensor or memoryview taken from it (each
    holds a reference); dropping the last one unmaps it (and unregisters it from CUDA first).
    """

    def __init__(self, fd: int, size: int, slab_id: str, *, owner: bool) -> None:
        self.size = size
        self.slab_id = slab_id
        self.owner = owner
        self._fd = fd
        self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        import numpy as np
        import torch

        self.array: np.ndarray[Any, Any] = np.frombuffer(self._mmap, dtype=np.uint8)
        self.tensor: torch.Tensor = torch.from_numpy(self.array)
        self.base_ptr = int(self.array.ctypes.data)
        self._cuda_registered = False
        self._lock = threading.Lock()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def create(cls, size: int) -> Slab:
        """A new slab of ``size`` bytes (rounded up to a page), committed now (server side)."""
        if size <= 0:
            raise LmtierError(f"slab size must be positive, got {size}")
        size = (size + _PAGE - 1) // _PAGE * _PAGE
        slab_id = secrets.token_hex(8)
        fd = os.memfd_create(f"lmtier-slab-{slab_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise CapacityError(
                    f"cannot commit a {size}-byte shared-memory slab ({exc.strerror}); lower the cpu tier's "
                    "max_bytes or raise the memory limit of the server (its cgroup / container)") from None
            return cls(fd, size, slab_id, owner=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, size: int, slab_id: str) -> Slab:
        """Map a slab received from the server (client side); takes ownership of ``fd``."""
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise LmtierError(f"the slab descriptor holds {actual} bytes, the server announced {size}")
            return cls(fd, size, slab_id, owner=False)
        except BaseException:
            os.close(fd)
            raise

    # -- access --------------------------------------------------------------------------------
    def fileno(self) -> int:
        """The slab's descriptor (the server sends it to clients)."""
        return self._fd

    def view(self, offset: int, nbytes: int, *, readonly: bool = False) -> memoryview:
        """A memoryview of ``[offset, offset + nbytes)``."""
        mv = self.array[offset: offset + nbytes].data
        return mv.toreadonly() if readonly else mv

    def tensor_of(self, offset: int, nbytes: int) -> torch.Tensor:
        """A flat uint8 tensor over ``[offset, offset + nbytes)`` (keeps the mapping alive)."""
        return self.tensor[offset: offset + nbytes]

    # -- CUDA ----------------------------------------------------------------------------------
    @property
    def cuda_registered(self) -> bool:
        return self._cuda_registered

    def register_cuda(self) -> None:
        """Page-lock the mapping for the GPU (``cudaHostRegister``; ~0.17 s per GiB). Idempotent."""
        with self._lock:
            if self._cuda_registered:
                return
            import torch

            err = torch.cuda.cudart().cudaHostRegister(self.base_ptr, self.size, _CUDA_REGISTER_FLAGS)
            if int(err) != 0:
                raise LmtierError(f"cudaHostRegister of the {self.size}-byte slab failed (error {int(err)}); "
                                  "check `ulimit -l` and the container's memlock limit")
            self._cuda_registered = True

    def _unregister_cuda(self) -> None:
        if self._cuda_registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.base_ptr)
            self._cuda_registered = False

    # -- lifetime ------------------------------------------------------------------------------
    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: CUDA may be gone already
            self._unregister_cuda()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"Slab({self.slab_id}, {self.size} bytes, owner={self.owner}, cuda={self._cuda_registered})"
