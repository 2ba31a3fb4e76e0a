"""Atomic outputs: write under a temporary name in the destination's filesystem, rename when complete.

A crash at any point leaves either the old state or the new one, never a half-written file that an
engine would load blindly. Disk-full and permission errors become one-line `OutputError`s.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

__all__ = ["atomic_dir", "atomic_file", "check_output_path", "os_error_message"]


def os_error_message(e: OSError, path: Path | str) -> str:
    if e.errno == errno.ENOSPC:
        return f"{path}: disk full while writing; free space and run again (nothing was left behind)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable ({e.strerror}); choose another output location"
    return f"{path}: cannot write ({e.strerror or e})"


def _embedded_os_error(e: BaseException) -> OSError | None:
    """Libraries written in Rust/C (safetensors, onnx) report I/O failures as their own exception
    types with "(os error N)" in the message; recover the OSError so it gets a clear message."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code))
    return None


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite`, and an unwritable location, before any compute.

    Writability is probed by creating a file (permission bits say nothing for root)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    probe = path.absolute().parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{probe}: is a file, not a directory; choose another output location")
    try:
        fd, name = tempfile.mkstemp(prefix=".lfq-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise OutputError(f"{path.absolute().parent}: output directory is not writable ({e.strerror})") from None


def _tmp_name(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(tmp: Path, dest: Path, overwrite: bool) -> None:
    if tmp.is_file():  # some writers create 0600 files; published outputs get normal permissions
        os.chmod(tmp, 0o666 & ~_umask())
    if dest.exists() or dest.is_symlink():
        if not overwrite:
            raise OutputError(f"{dest}: already exists; pass --overwrite to replace it")
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, dest)


@contextmanager
def atomic_dir(dest: Path, overwrite: bool = False, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `dest`; on success run `check(tmp)` and rename.

    On any exception the temporary directory is removed and `dest` is untouched."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(dest)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(os_error_message(e, dest)) from None
    try:
        yield tmp
        if check is not None:
            check(tmp)
        _replace(tmp, dest, overwrite)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        oe = _embedded_os_error(e)
        if oe is not None:
            raise OutputError(os_error_message(oe, dest)) from None
        raise


@contextmanager
def atomic_file(dest: Path, overwrite: bool = False, check: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary file path next to `dest`; on success fsync, run `check(tmp)` and rename."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(os_error_message(e, dest)) from None
    tmp = _tmp_name(dest)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        _replace(tmp, dest, overwrite)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        oe = _embedded_os_error(e)
        if oe is not None:
            raise OutputError(os_error_message(oe, dest)) from None
        raise
