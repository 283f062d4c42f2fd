"""Huge pages: the kernels' buffers are advised for them always; torch's only when the user asks
(sparse_nlp.kernels.request_huge_pages(): importing sparse_nlp changes no environment variable); the status line says
which holds, or why not."""
import os
import subprocess
import sys

import pytest
import torch

from sparse_nlp.kernels.backends.native.huge_pages import (
    HUGE_PAGE,
    THP_ENV,
    _anon_huge_kib,
    empty_on_huge_pages,
    huge_pages_possible,
    system_thp_mode,
)
from sparse_nlp.kernels.backends.native.output_pool import OutputPool

needs_huge_pages = pytest.mark.skipif(not huge_pages_possible(),
                                      reason=f"no transparent huge pages here (mode: {system_thp_mode()})")
# Where the system gives every large allocation huge pages ("always"), torch gets them unasked: no fallback to see.
needs_madvise_mode = pytest.mark.skipif(system_thp_mode() != "madvise",
                                        reason=f"THP mode {system_thp_mode()}: torch's path does not depend on asking")


@needs_huge_pages
def test_a_large_buffer_starts_on_a_huge_page_and_faults_in_huge_pages():
    before = _anon_huge_kib()
    buf = empty_on_huge_pages(3 * HUGE_PAGE // 4, torch.float32)  # 6 MiB: three whole huge pages
    assert buf.shape == (3 * HUGE_PAGE // 4,) and buf.dtype == torch.float32 and buf.is_contiguous()
    assert buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(1.0)  # the first touch
    assert _anon_huge_kib() - before >= 2 * HUGE_PAGE // 1024  # at least two of the three came as huge pages
    assert float(buf.sum()) == buf.numel()


def test_a_small_buffer_is_a_plain_tensor():
    buf = empty_on_huge_pages(1000, torch.float64)
    assert buf.shape == (1000,) and buf.dtype == torch.float64 and buf.storage_offset() == 0


def test_pool_outputs_on_an_offset_buffer_hold_their_values():
    pool = OutputPool()
    numel = HUGE_PAGE  # 8 MiB of float32
    y = pool.empty((numel // 512, 512), torch.float32, torch.device("cpu"))
    expected = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape)
    y.copy_(expected)
    y += 1  # in place, as a residual add does
    torch.testing.assert_close(y, expected + 1)
    if huge_pages_possible():
        assert y.data_ptr() % HUGE_PAGE == 0


def _status_of(script: str, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if k != THP_ENV}
    environment.update(env)
    code = script + "\nfrom sparse_nlp.kernels import huge_page_status\nprint(huge_page_status())"
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


REQUEST = "from sparse_nlp.kernels import request_huge_pages\nrequest_huge_pages()"


def test_importing_sparse_nlp_sets_no_environment_variable():
    environment = {k: v for k, v in os.environ.items() if k != THP_ENV}
    code = f"import os, sparse_nlp, sparse_nlp.kernels\nprint(os.environ.get({THP_ENV!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "None"


@needs_huge_pages
def test_requesting_huge_pages_gets_them_for_torch_and_says_so():
    assert _status_of("import torch, transformers\nimport sparse_nlp\n" + REQUEST) == (
        "huge pages: torch's large CPU tensors and the native kernels' outputs")


@needs_huge_pages
@needs_madvise_mode
def test_the_fallback_is_reported_with_its_reason():
    not_asked = _status_of("import sparse_nlp")
    assert not_asked == ("huge pages: the native kernels' outputs only (not requested: call "
                         f"sparse_nlp.kernels.request_huge_pages() first, or export {THP_ENV}=1)")
    opted_out = _status_of(REQUEST, **{THP_ENV: "0"})
    assert opted_out == f"huge pages: the native kernels' outputs only ({THP_ENV}=0 was set)"
    too_late = _status_of("import torch\nx = torch.ones(4 << 20)\n" + REQUEST)
    assert too_late.startswith(f"huge pages: the native kernels' outputs only (torch allocated before {THP_ENV}=1")
