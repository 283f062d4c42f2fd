"""Recycled output buffers for the native CPU kernels.

Every product writes a fresh output (Y of a 768 -> 3072 layer at 8,192 tokens is 100 MB), and on CPU fresh memory
costs its first touch: the operating system zeroes every page, and in a virtual machine the host may have to back
it again. Measured on a 2-core VM, density 0.2, 768 -> 3072, forward + backward: 30-110 ms of the two threads'
~500 ms went into those page faults. torch keeps no cache of freed CPU memory, so this pool does for our outputs
what torch's CUDA caching allocator does on a GPU: a buffer whose tensors have all been freed is handed out again.

A buffer counts as free when nothing but the pool holds its storage (views, autograd's saved tensors, .numpy()
arrays all hold it). That check uses torch's storage use count, a private API: where it is missing the pool never
reuses anything and behaves as torch.empty. New CPU buffers of 2 MiB or more sit on transparent huge pages
(huge_pages.empty_on_huge_pages), so even their first touch costs 512x fewer faults.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch

from .huge_pages import empty_on_huge_pages

MAX_FREE_BYTES = 2 << 30  # bytes of free buffers kept at most (ones in use are not counted: their tensors hold them)


def _storage_users(buf: torch.Tensor) -> int:
    """Holders of buf's storage besides the temporary storage object made to ask (-1: cannot tell)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return -1
    return use_count(buf.untyped_storage()._cdata) - 1


def _alias(buf: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of `shape` on buf's storage that is not a view of buf: autograd forbids in-place changes
    to views made inside a custom Function's forward, and the layer's output must take them (`y += residual`)."""
    return torch.empty(0, dtype=buf.dtype, device=buf.device).set_(buf.untyped_storage(), buf.storage_offset(), shape)


def _new_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return empty_on_huge_pages(numel, dtype)  # first touches fault 2 MiB at a time, whatever torch was told
    return torch.empty(numel, dtype=dtype, device=device)


class OutputPool:
    """empty(shape, dtype, device) like torch.empty, from a recycled buffer where one of that size is free."""

    def __init__(self, max_free_bytes: int = MAX_FREE_BYTES):
        self.max_free_bytes = max_free_bytes
        self._buffers: OrderedDict[int, torch.Tensor] = OrderedDict()  # id -> flat buffer, oldest first
        self._lock = threading.Lock()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        with self._lock:  # the check and the view that claims the buffer happen together
            for key, buf in self._buffers.items():
                if buf.numel() == numel and buf.dtype == dtype and buf.device == device and _storage_users(buf) == 1:
                    self._buffers.move_to_end(key)
                    return _alias(buf, shape)
            self._evict()
            buf = _new_buffer(numel, dtype, device)
            if _storage_users(buf) == 1:  # reuse is possible: keep it
                self._buffers[id(buf)] = buf
            return _alias(buf, shape)

    def _evict(self) -> None:
        """Drop the oldest free buffers while the free ones hold more than max_free_bytes."""
        free = [(key, buf) for key, buf in self._buffers.items() if _storage_users(buf) == 1]
        total = sum(buf.numel() * buf.element_size() for _, buf in free)
        for key, buf in free:
            if total <= self.max_free_bytes:
                break
            total -= buf.numel() * buf.element_size()
            del self._buffers[key]

    def clear(self) -> None:
        """Forget every buffer (tensors still using one keep it alive until they go)."""
        with self._lock:
            self._buffers.clear()

    def __len__(self) -> int:
        return len(self._buffers)
