"""Small C kernels compiled on first use and called through ctypes.

Two hot loops of the optimiser are a dozen memory passes each in eager torch and one to three in C: the
straight-through fake-quantization (`grids.fused`) and the LFQ soft cross-entropy over the vocabulary
(`ce_kernel`). Each source is compiled with the system's C compiler into ~/.cache/lfq-export/kernels
(about a second; the library's name is a digest of the source, the flags and the CPU's feature flags,
since it is built with -march=native) and loaded once.

Threads: the kernels split their work with OpenMP (`FOR_SLICES`, static slices of rows or columns whose
results do not depend on the split). Built with -fopenmp, the library binds to the OpenMP runtime torch
has already loaded (`libgomp.so.1`), so the kernels run on torch's own intra-op threads; a Python thread
pool beside torch's spinning OpenMP workers made the same kernel several times slower inside a training
step than alone. Without OpenMP support the slices run one after another.

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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["load", "ptr"]

FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared"]

#: prepended to every kernel: `FOR_SLICES(n, nthreads, i0, i1, body)` runs `body` for `nthreads` static slices
#: [i0, i1) of [0, n), one per OpenMP thread
PRELUDE = r"""
#include <stdint.h>
#define FOR_SLICES(n, nthreads, i0, i1, ...) \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads)") \
    for (int64_t _slice = 0; _slice < (nthreads); _slice++) { \
        const int64_t i0 = (n) * _slice / (nthreads), i1 = (n) * (_slice + 1) / (nthreads); \
        __VA_ARGS__ \
    }
"""

_loaded: dict[str, ctypes.CDLL | None] = {}


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

    source = PRELUDE + source
    digest = hashlib.sha256((source + _cpu_key()).encode()).hexdigest()[:16]
    cache = cache_root() / "kernels"
    lib_path = cache / f"{name}_{digest}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            r = subprocess.run([cc, *FLAGS, "-fopenmp", str(src), "-o", str(out), "-lm"], capture_output=True,
                               text=True)
            if r.returncode != 0:  # a compiler without OpenMP: the slices run in turn
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
