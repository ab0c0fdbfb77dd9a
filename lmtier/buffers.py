"""What counts as a host buffer, and the zero-copy byte views lmtier takes of one.

A *host buffer* is any C-contiguous buffer-protocol object (``bytes``, ``bytearray``,
``memoryview``, numpy arrays), a :class:`~lmtier.memory.HostBuffer`, or a CPU torch tensor of any
dtype. :func:`as_bytes_view` turns each into a flat ``uint8`` memoryview over the same memory;
anything else (a GPU tensor, a non-contiguous one, a ``str``) is an
:class:`~lmtier.errors.InvalidArgumentError` that says what to do instead.
"""

from __future__ import annotations

from typing import Any

from lmtier.errors import InvalidArgumentError

__all__ = ["as_bytes_view", "is_torch_tensor", "writable_bytes_view"]


def as_bytes_view(value: object) -> memoryview:
    """A flat, byte-typed, zero-copy view of a C-contiguous host buffer: any buffer-protocol object,
    a :class:`~lmtier.memory.HostBuffer` or a CPU torch tensor (any dtype); InvalidArgumentError
    otherwise."""
    from lmtier.memory import HostBuffer

    if isinstance(value, HostBuffer):  # no buffer protocol for pure-Python classes before 3.12
        return value.view()
    if is_torch_tensor(value):  # torch tensors have no buffer protocol either
        return _tensor_bytes(value)
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentError(
            f"values must be host buffers (bytes, memoryview, numpy arrays, CPU torch tensors), "
            f"got {type(value).__name__}"
        ) from None
    if not view.c_contiguous:
        raise InvalidArgumentError("values must be C-contiguous buffers; call .contiguous() first")
    return view.cast("B") if (view.format != "B" or view.ndim != 1) else view


def writable_bytes_view(value: object, *, what: str = "get_into") -> memoryview:
    """:func:`as_bytes_view` of a buffer the caller wants filled; InvalidArgumentError if it is
    read-only (``what`` names the call in the message)."""
    view = as_bytes_view(value)
    if view.readonly:
        raise InvalidArgumentError(
            f"{what} needs writable buffers, got a read-only {type(value).__name__}; pass a bytearray, "
            "a numpy array, a HostBuffer or a CPU tensor"
        )
    return view


def is_torch_tensor(value: object) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch."""
    # by name: importing torch here would make every caller pay for it
    return any(c.__module__ == "torch" and c.__name__ == "Tensor" for c in type(value).__mro__)


def _tensor_bytes(tensor: Any) -> memoryview:
    import torch

    if tensor.device.type != "cpu":
        raise InvalidArgumentError(
            f"values must be in host memory, got a tensor on {tensor.device}; copy it to the host "
            "(into a HostBuffer) first"
        )
    if not tensor.is_contiguous():
        raise InvalidArgumentError("values must be C-contiguous buffers; call .contiguous() first")
    flat = tensor.detach().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy() if flat.numel() else b"").cast("B")
