"""The CPU thread pool that the torch path (torch_blocked.py) and the native kernels (native/products.py) share.

A product is cut into tasks (chunks of rows, block-rows); `run_tasks` runs them on a pool of torch's thread count.
The torch path's tasks call BLAS, so BLAS runs on one thread per task for the duration of the call (MKL runs the
thin GEMMs badly on two threads, well on one); the native tasks call none, and torch's thread count is left alone.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, Optional

import torch

M_CHUNK = 512  # rows per task for Y and dX: the gathered [M_CHUNK, w] operand stays in L2 (1024: ~5% slower)
POOL_PREFIX = "sparse_nlp_cpu"

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(n, thread_name_prefix=POOL_PREFIX, initializer=torch.set_num_threads,
                                       initargs=(1,))
            _pool_size = n
    return _pool


@contextmanager
def _single_threaded_blas():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_tasks(tasks: list[Callable[[], None]], device: torch.device, blas: bool = True) -> None:
    """Run tasks on the pool on CPU; serially elsewhere or when there is one thread. blas: the tasks call BLAS,
    so torch runs it on one thread per task for the duration (the native kernels call none: nothing to switch)."""
    threads = torch.get_num_threads()
    nested = threading.current_thread().name.startswith(POOL_PREFIX)  # never wait on our own pool
    if device.type != "cpu" or threads == 1 or len(tasks) <= 1 or nested:
        for task in tasks:
            task()
        return
    pool = _get_pool(threads)
    with _single_threaded_blas() if blas else nullcontext():
        for future in [pool.submit(_without_grad, task) for task in tasks]:
            future.result()


def _without_grad(task: Callable[[], None]) -> None:
    with torch.no_grad():  # grad mode is per thread: the pool's threads do not inherit the caller's no_grad
        task()
