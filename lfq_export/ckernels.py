"""Small C kernels compiled on first use and called through ctypes.

Two hot loops of the optimiser are a dozen memory passes each in eager torch and one or two in C: the
straight-through fake-quantization (`grids.fused`) and the LFQ soft cross-entropy over the vocabulary
(`ce_kernel`). Each source is compiled with the system's C compiler into ~/.cache/lfq-export/kernels
(about a second; the library's name is a digest of the source, the flags and the CPU's feature flags,
since it is built with -march=native) and loaded once. ctypes releases the GIL during a call, so work
is split over torch's intra-op thread count with a shared thread pool.

No fast-math and no floating-point contraction: every kernel does its fp32 operations in a fixed,
documented order, the same on every vector width. Without a compiler, on an unwritable cache, or with
the kernel's environment switch set to 0, `load` returns None and the callers use eager torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["load", "run_split", "ptr"]

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared"]

_loaded: dict[str, ctypes.CDLL | None] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the compiler flags and the CPU (-march=native)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags} {' '.join(FLAGS)}"


def _compile(name: str, source: str) -> Path | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: %s runs eagerly", name)
        return None
    from .model_io import cache_root  # (lazy: model_io imports the grids, which import this)

    digest = hashlib.sha256((source + _cpu_key()).encode()).hexdigest()[:16]
    cache = cache_root() / "kernels"
    lib_path = cache / f"{name}_{digest}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            r = subprocess.run([cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if r.returncode != 0:
                log.info("kernel %s did not compile (%s): eager fallback", name, r.stderr[-500:])
                return None
            os.replace(out, lib_path)  # atomic: a concurrent process sees the whole library or none
    return lib_path


def load(name: str, source: str, signatures: dict[str, list], switch: str) -> ctypes.CDLL | None:
    """The compiled library `name` with `signatures` (function → ctypes argument types; all return void),
    or None when the environment variable `switch` is "0" or it cannot be built. Cached per process."""
    if name not in _loaded:
        lib = None
        if os.environ.get(switch, "1") != "0":
            try:
                path = _compile(name, source)
                if path is not None:
                    lib = ctypes.CDLL(str(path))
                    for fn, args in signatures.items():
                        getattr(lib, fn).argtypes = args
                        getattr(lib, fn).restype = None
            except OSError as e:  # unwritable cache, a library that does not load...
                log.info("kernel %s unavailable (%s): eager fallback", name, e)
                lib = None
        _loaded[name] = lib
    return _loaded[name]


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run_split(fn: Callable, n: int, pointers: tuple, shape: tuple, threads: int) -> None:
    """`fn(*pointers, i0, i1, *shape)` over `threads` contiguous ranges of `range(n)` (one call per thread;
    ctypes drops the GIL). Kernels only split work whose result does not depend on the split."""
    global _pool, _pool_size
    workers = max(1, min(threads, n))
    if workers == 1:
        fn(*pointers, 0, n, *shape)
        return
    if _pool is None or _pool_size < workers:
        _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lfq-kernel"), workers
    bounds = [n * i // workers for i in range(workers + 1)]
    futures = [_pool.submit(fn, *pointers, bounds[i], bounds[i + 1], *shape) for i in range(workers)]
    for f in futures:
        f.result()
