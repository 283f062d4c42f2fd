"""Transparent huge pages for large CPU tensors.

On CPU, fresh memory costs its first touch: the kernel zeroes and maps it 4 KiB at a time, and a 100 MB activation
takes tens of milliseconds of page faults (docs/kernels.md). torch can put its large CPU allocations on 2 MiB pages,
but only when THP_MEM_ALLOC_ENABLE=1 is in the environment at its first allocation. Two things here:

- ``request_huge_pages()`` (public: ``sparse_nlp.kernels.request_huge_pages``) sets that variable, unless the user
  set it (to anything: "0" opts out). It changes a process-wide setting, so nothing calls it for the user: a script
  that wants huge pages calls it before it allocates its first large tensor (importing torch and transformers first
  is fine), as the benchmarks do; the recipes export the variable before importing torch.
- ``empty_on_huge_pages`` allocates a buffer 2 MiB-aligned and advised with madvise(MADV_HUGEPAGE) whatever torch
  does: the native kernels' outputs (output_pool.py) get huge pages even where torch's do not.

``huge_page_status()`` says in one line which of these hold (the benchmarks print and record it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path
from typing import Optional

import torch

THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's switch (c10's CPU allocator): align to 2 MiB and madvise, >= 2 MiB
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def request_huge_pages() -> None:
    """Ask torch to put its large CPU tensors on transparent huge pages, unless the user chose either way: sets
    THP_MEM_ALLOC_ENABLE=1 in this process's environment. torch reads it once, at its first CPU allocation, so call
    this before allocating tensors; huge_page_status() says afterwards whether it took effect."""
    os.environ.setdefault(THP_ENV, "1")


def system_thp_mode() -> Optional[str]:
    """The kernel's THP mode, "always", "madvise" or "never" (None: not Linux, or not readable)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return None
    chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


@functools.lru_cache(maxsize=None)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def huge_pages_possible() -> bool:
    """Whether advised memory can get huge pages here: Linux, libc's madvise, THP not "never"."""
    return _madvise() is not None and system_thp_mode() in ("always", "madvise")


def empty_on_huge_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(numel, dtype=dtype) on the CPU, 2 MiB-aligned and advised for huge pages when it spans at least
    one huge page and huge pages are possible; a plain torch.empty otherwise. Its pages are not touched here."""
    itemsize = dtype.itemsize
    nbytes = numel * itemsize
    if nbytes < HUGE_PAGE or not huge_pages_possible():
        return torch.empty(numel, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # room to start on a 2 MiB boundary
    start = raw.data_ptr()
    aligned = -(-start // HUGE_PAGE) * HUGE_PAGE
    _madvise()(aligned, nbytes - nbytes % HUGE_PAGE, MADV_HUGEPAGE)  # whole huge pages; a failure leaves 4 KiB ones
    offset = aligned - start  # a multiple of 64 (torch aligns its allocations so), hence of any itemsize
    return torch.empty(0, dtype=dtype).set_(raw.untyped_storage(), offset // itemsize, (numel,))


def _anon_huge_kib() -> Optional[int]:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def torch_uses_huge_pages() -> bool:
    """Whether torch's own large CPU allocations get huge pages: a fresh 8 MiB tensor, touched, must raise this
    process's AnonHugePages by at least one 2 MiB page."""
    if not huge_pages_possible():
        return False
    before = _anon_huge_kib()
    probe = torch.empty(4 * HUGE_PAGE, dtype=torch.uint8)
    probe.fill_(0)
    after = _anon_huge_kib()
    return before is not None and after is not None and after - before >= HUGE_PAGE // 1024


def huge_page_status() -> str:
    """One line: where large CPU tensors get huge pages in this process, or why not."""
    mode = system_thp_mode()
    if not huge_pages_possible():
        return (f"huge pages: unavailable (transparent huge pages: {mode or 'not on this system'}); CPU tensors use "
                "4 KiB pages")
    if torch_uses_huge_pages():
        return "huge pages: torch's large CPU tensors and the native kernels' outputs"
    told = os.environ.get(THP_ENV)
    if told is None:
        why = f"not requested: call sparse_nlp.kernels.request_huge_pages() first, or export {THP_ENV}=1"
    elif told == "1":
        why = f"torch allocated before {THP_ENV}=1 was set; request huge pages before the first large tensor"
    else:
        why = f"{THP_ENV}={told} was set"
    return f"huge pages: the native kernels' outputs only ({why})"
