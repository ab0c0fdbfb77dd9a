"""What counts as a host buffer (lmtier.buffers): zero-copy byte views, typed errors otherwise."""

from __future__ import annotations

import pytest

from lmtier.buffers import as_bytes_view, writable_bytes_view
from lmtier.errors import InvalidArgumentError


def test_cpu_torch_tensors_of_any_dtype_are_zero_copy_byte_views() -> None:
    import torch

    t = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    view = as_bytes_view(t)
    assert view.nbytes == 12 and view.format == "B" and view.ndim == 1
    t[1, 2] = 100.0  # the view is the tensor's memory, not a copy
    assert bytes(view) == t.view(torch.uint8).numpy().tobytes()
    assert as_bytes_view(torch.empty(0)).nbytes == 0


@pytest.mark.parametrize(("tensor", "message"), [
    (lambda torch: torch.zeros(4, 4).t(), "C-contiguous"),
    (lambda torch: torch.zeros(4, device="meta"), "must be in host memory, got a tensor on meta"),
])
def test_tensors_that_are_not_contiguous_host_memory_are_typed_errors(tensor, message: str) -> None:
    import torch

    with pytest.raises(InvalidArgumentError, match=message):
        as_bytes_view(tensor(torch))


def test_a_read_only_buffer_is_refused_where_it_would_be_written() -> None:
    with pytest.raises(InvalidArgumentError, match="get_into needs writable buffers, got a read-only bytes"):
        writable_bytes_view(b"abc")
    assert writable_bytes_view(bytearray(3)).nbytes == 3


def test_a_str_is_not_a_host_buffer() -> None:
    with pytest.raises(InvalidArgumentError, match="got str"):
        as_bytes_view("text")
