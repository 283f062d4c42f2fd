"""Build and load the compiled CPU kernels (cpu_kernels.c) with the machine's C compiler.

The library is compiled once per source version, compiler flags and CPU (it is built with -march=native) into
$SPARSE_NLP_CACHE (default ~/.cache/sparse_nlp), in well under a second, and loaded with ctypes. Where it cannot
be built (no compiler, a failed compile, SPARSE_NLP_NATIVE=0) `load_native()` returns None with the reason in
`native_unavailable_reason()`, and the CPU path stays on torch ops. $SPARSE_NLP_NATIVE_FLAGS adds compiler flags.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC"]
NATIVE_FLAGS = ["-march=native"]  # dropped when the compiler does not take it
DISABLE_ENV = "SPARSE_NLP_NATIVE"
CACHE_ENV = "SPARSE_NLP_CACHE"
EXTRA_FLAGS_ENV = "SPARSE_NLP_NATIVE_FLAGS"  # appended last, e.g. "-mno-avx512f" (the tests build the 8-wide code so)


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get(EXTRA_FLAGS_ENV, ""))


class NativeUnavailable(RuntimeError):
    """The compiled kernels could not be built or loaded; the message says why."""


def _compiler() -> list[str]:
    """The C compiler as an argument list: $CC, else Python's own, else cc / gcc / clang on PATH."""
    candidates = [os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"]
    for candidate in candidates:
        if not candidate:
            continue
        args = shlex.split(candidate)
        if args and shutil.which(args[0]):
            return args
    raise NativeUnavailable("no C compiler found (set CC, or install gcc)")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else the platform's words."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(wanted)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_nlp")


def _build(compiler: list[str], target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: concurrent builders (DDP ranks) never see a
    half-written library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (NATIVE_FLAGS, []):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd = [*compiler, *FLAGS, *extra, *_extra_flags(), str(SOURCE), "-o", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)
                return
            message = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as err:
            message = str(err)
        os.unlink(tmp)
        errors.append(f"{' '.join(cmd[:1] + extra)}: {message}")
    raise NativeUnavailable("compiling cpu_kernels.c failed (" + "; ".join(errors) + ")")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sparse_nlp_dds_f32.argtypes = [p, i64, i64, p, p, p, i64, i64, p, p, i64]
    lib.sparse_nlp_dds_f32.restype = i32
    lib.sparse_nlp_sdd_f32.argtypes = [p, i64, p, i64, i64, p, p, i64, i64, p, i32]
    lib.sparse_nlp_sdd_f32.restype = i32
    lib.sparse_nlp_pack_blocks.argtypes = [p, p, i64, i64, i32, p]
    lib.sparse_nlp_pack_blocks.restype = None
    lib.sparse_nlp_vector_width.argtypes = []
    lib.sparse_nlp_vector_width.restype = i32
    return lib


def library_path(compiler: list[str]) -> Path:
    key = hashlib.sha256()
    flags = compiler + FLAGS + NATIVE_FLAGS + _extra_flags()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), _cpu_identity().encode(),
                 sys.platform.encode()):
        key.update(part)
    return cache_dir() / f"cpu_kernels-{key.hexdigest()[:16]}.so"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[Optional[ctypes.CDLL], str]:
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    if not sys.platform.startswith(("linux", "darwin")):
        return None, f"not built on {sys.platform} (Linux and macOS only)"
    try:
        compiler = _compiler()
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        return _declare(ctypes.CDLL(str(path))), ""
    except (NativeUnavailable, OSError) as err:
        return None, str(err)


def load_native() -> Optional[ctypes.CDLL]:
    """The compiled kernels, built on first use; None where they cannot be built (see native_unavailable_reason)."""
    return _load()[0]


def native_unavailable_reason() -> str:
    """Why load_native() returned None ('' when it did not)."""
    return _load()[1]


def reset_native_cache() -> None:
    """Forget the loaded library (tests: a changed environment takes effect at the next load)."""
    _load.cache_clear()
