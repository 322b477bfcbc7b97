"""Sequential file I/O that keeps the page cache (and so the process's memory traffic) flat.

Why: a conversion writes as many bytes as it reads (15 GB for a 7B model). Left to itself, every written byte
sits in a freshly allocated page-cache page until the kernel's dirty limits throttle the writer, and on a VM each
fresh page is expensive (measured: 0.5 GB/s for plain 256 MB writes vs 1.7 GB/s when the cache is kept flat).
`SequentialWriter` starts writeback of each chunk as soon as it is written and drops chunks once they are clean,
so the same few hundred MB of cache pages are recycled and the disk works while we compute.
`read_into` fills a caller's (reused) buffer with positional reads: no mmap page faults, no fresh allocation.

Atomic replacement (what ckpt_layout builds on): a file is written to a temporary sibling `.NAME.tmp-HOST-PID`,
fsynced and renamed over its target, then the directory is fsynced; a directory is published by an atomic exchange
with the old one (renameat2 RENAME_EXCHANGE) or, where that is unsupported, by two renames that `recover` undoes
after a kill. Leftovers are removed only when provably stale: made on this host by a process no longer running.
A failed write raises one ConvertError line naming the file (and, for a full disk, the space needed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from megatune.convert.errors import ConvertError

# Kick writeback every CHUNK bytes; drop pages more than LAG bytes behind the write position (by then clean).
CHUNK = 64 << 20
LAG = 256 << 20


class SequentialWriter:
    """A write-only binary file object (write / flush / close) over a raw fd, with cache dropping (see above).

    `keep_cache=True` behaves like a plain unbuffered file (for callers that want the data to stay cached).
    A failed write raises OSError naming the file; `close` fsyncs, `abandon` closes without writing more."""

    def __init__(self, path: str | os.PathLike, keep_cache: bool = False):
        self.path = str(path)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.keep_cache = keep_cache
        self.abandoned = False
        self.error: OSError | None = None  # the first failed write, named by this file
        self.pos = 0
        self._kicked = 0  # writeback started for [0, _kicked)
        self._dropped = 0  # pages dropped for [0, _dropped)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self.abandoned or self.error is not None:  # a failed file: drop (torch's zip writer still finalises)
            return n
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.error = OSError(e.errno, e.strerror, self.path)
            raise self.error from None
        self.pos += n
        if not self.keep_cache and self.pos - self._kicked >= CHUNK:
            self._advise()
        return n

    def _advise(self) -> None:
        # POSIX_FADV_DONTNEED on dirty pages starts their writeback without waiting (Linux: WB_SYNC_NONE)
        # and drops those already clean: the first call kicks the fresh chunk, the second drops old ones.
        os.posix_fadvise(self.fd, self._kicked, self.pos - self._kicked, os.POSIX_FADV_DONTNEED)
        self._kicked = self.pos
        if self.pos - LAG > self._dropped:
            os.posix_fadvise(self.fd, self._dropped, self.pos - LAG - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = self.pos - LAG

    def flush(self) -> None:
        """Nothing is buffered in user space."""

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            if not self.keep_cache and self.pos > self._kicked:
                self._advise()
            os.fsync(self.fd)  # on disk before the directory holding it is published
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None
        finally:
            os.close(self.fd)
            self.fd = -1

    def abandon(self) -> None:
        """Stop writing (after an error): close the file; later writes are dropped. The caller removes it."""
        self.abandoned = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SequentialWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def read_into(fd: int, offset: int, buf) -> int:
    """Fill `buf` (any writable buffer) from `fd` at `offset`; returns the bytes read (< len(buf) only at EOF)."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def preadv_full(fd: int, iov: list[memoryview], offset: int) -> int:
    """os.preadv until every buffer is full (a regular file returns short only at EOF); returns bytes read.
    Scatters one contiguous file range over many buffers, e.g. the rows of a column block, with no gather copy."""
    done = 0
    while iov:
        n = os.preadv(fd, iov, offset + done)
        if n == 0:
            break
        done += n
        while iov and n >= len(iov[0]):
            n -= len(iov[0])
            iov = iov[1:]
        if iov and n:
            iov[0] = iov[0][n:]
    return done


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Drop clean cached pages of a range already consumed (see the module docstring for why)."""
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


# ------------------------------------------------------------------------------------------------ atomic replacement
def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """`.NAME.tmp-HOST-PID` (or `.old-`): where a file or directory is staged; its owner is recoverable."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{socket.gethostname()}-{os.getpid()}")



def human_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB" if n >= 10**5 else f"{n} bytes"


def free_bytes(path: str | Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def write_error(path: str | Path, e: OSError, need: int | None = None) -> ConvertError:
    """One line for a failed write: the file, what happened, and for a full disk the space that was needed."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        needed = f"; about {human_size(need)} needed" if need else ""
        return ConvertError(f"{path}: no space left on device ({human_size(free_bytes(path))} free{needed}); free some "
                            f"space or write to another filesystem")
    return ConvertError(f"{path}: cannot write ({e.strerror or e})")


# ------------------------------------------------------------------------------------------------ atomic files
def fsync_dir(directory: str | Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path: Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temp sibling to fill; then fsync it, rename it over `path`, fsync the directory. On any error the
    temp file goes and `path` is as it was."""
    tmp = temp_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e, need) from None
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    with _replacing(path, len(data)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy_file_atomic(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    with _replacing(dst, Path(src).stat().st_size) as tmp:
        shutil.copy2(src, tmp)



def torch_save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp sibling, fsync, rename into place. Written through SequentialWriter so that a failed
    write (a full disk) surfaces as its OSError rather than torch's "unexpected pos" RuntimeError."""
    path = Path(path)
    with _replacing(path) as tmp:
        out = SequentialWriter(tmp, keep_cache=True)
        try:
            torch.save(obj, out)
            if out.error is not None:
                raise out.error
        except BaseException:
            out.abandon()
            if out.error is not None:  # torch reports it as RuntimeError("unexpected pos ...")
                raise out.error from None
            raise
        out.close()


# ------------------------------------------------------------------------------------------------ directories
_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (renameat2 RENAME_EXCHANGE). False where the OS or filesystem cannot."""
    fn = getattr(_LIBC, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: Path, dst: Path) -> None:
    """Put the finished directory `tmp` at `dst`, replacing what is there; `dst` is never missing on the way."""
    fsync_dir(tmp)
    if not dst.exists():
        os.rename(tmp, dst)
    elif exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old copy
    else:  # fallback: two renames; a kill between them is undone by recover() on the next run
        old = temp_sibling(dst, "old")
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except BaseException:  # an error or a signal in between: put the old copy back
            if not dst.exists():
                os.rename(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dst.parent)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_owner(host: str | None, pid: str) -> bool:
    """Provably gone: made on this host (or by an older megatune that wrote no host) by a process not running."""
    return (host is None or host == socket.gethostname()) and int(pid) != os.getpid() and not _alive(int(pid))



def recover(dst: str | Path) -> None:
    """Undo a publish killed between its two renames: put the old copy back where `dst` is missing."""
    dst = Path(dst)
    if dst.exists() or not dst.parent.is_dir():
        return
    for p in dst.parent.iterdir():
        m = _LEFTOVER.match(p.name)
        if m and m["name"] == dst.name and m["kind"] == "old" and dead_owner(m["host"], m["pid"]):
            os.rename(p, dst)
            return


def clean_stale(directory: str | Path, name: str | None = None,
                also: Callable[[Path], bool] | None = None) -> list[Path]:
    """Remove provably stale leftovers (`.NAME.tmp-HOST-PID`, `.NAME.old-HOST-PID`) in `directory`, of `name` only
    when given, plus what `also` calls stale; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        m = _LEFTOVER.match(p.name)
        if (m is not None and (name is None or m["name"] == name) and dead_owner(m["host"], m["pid"])) or (
                also is not None and also(p)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
