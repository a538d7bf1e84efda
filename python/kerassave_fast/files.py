"""File plumbing shared by every container: atomic replacement and file regions for h5py."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_replace(filepath: str) -> Iterator[str]:
    """Yields a temporary path beside `filepath`; renames it over `filepath` only on success.

    A failed save leaves the previous file untouched and no temporary file behind. Like
    `open(filepath, "wb")`, a symlink is followed and the file's mode is kept (or set from the umask).
    """
    target = os.path.realpath(filepath)
    directory, name = os.path.split(target)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _mode_for(target))
        os.close(fd)
        fd = -1
        yield tmp_path
        os.replace(tmp_path, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise


def _mode_for(target: str) -> int:
    try:
        return os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


class FileRegion(io.RawIOBase):
    """A stretch of an open file, seen as a whole file.

    h5py reads and writes HDF5 metadata through it, so an HDF5 file can live inside a zip member
    without being copied out. Reads past the region's end see zeros, as HDF5's own POSIX driver
    gives them; `truncate` only records where HDF5 says its file ends.
    """

    def __init__(self, fd: int, start: int, size: int = 0, writable: bool = False):
        super().__init__()
        self._fd = fd
        self._start = start
        self._size = size
        self._writable = writable
        self._pos = 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self._writable

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = len(view)
        available = max(0, min(wanted, self._size - self._pos))
        done = 0
        while done < available:
            n = os.preadv(self._fd, [view[done:available]], self._start + self._pos + done)
            if n == 0:
                break
            done += n
        view[done:] = bytes(wanted - done)
        self._pos += wanted
        return wanted

    def write(self, buffer) -> int:
        if not self._writable:
            raise io.UnsupportedOperation("this file region is read-only")
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], self._start + self._pos + done)
        self._pos += done
        self._size = max(self._size, self._pos)
        return done

    def truncate(self, size: int | None = None) -> int:
        self._size = self._pos if size is None else size
        return self._size

    def flush(self) -> None:
        pass
