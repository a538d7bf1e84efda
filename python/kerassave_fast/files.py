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
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it (setting it, even briefly, races other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)  # no /proc: the only other way to learn it is to set it
    os.umask(umask)
    return umask


class _Seekable(io.RawIOBase):
    """Position bookkeeping shared by the file objects h5py is given."""

    def __init__(self, size: int = 0):
        super().__init__()
        self._size = size
        self._pos = 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

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


class FileRegion(_Seekable):
    """A stretch of an open file, seen as a whole read-only file.

    h5py reads an HDF5 file through it where it sits inside a zip member, without copying it out.
    Reads past the region's end see zeros, as HDF5's own POSIX driver gives them.
    """

    def __init__(self, fd: int, start: int, size: int):
        super().__init__(size)
        self._fd = fd
        self._start = start

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


class SparseImage(_Seekable):
    """An HDF5 file laid out in memory: h5py writes its metadata here, scattered over an address
    space that is mostly the tensors' (never allocated); `writes` keeps them in order."""

    def __init__(self):
        super().__init__()
        self.writes: list[tuple[int, bytes]] = []

    def writable(self) -> bool:
        return True

    def write(self, buffer) -> int:
        data = bytes(memoryview(buffer).cast("B"))
        self.writes.append((self._pos, data))
        self._pos += len(data)
        self._size = max(self._size, self._pos)
        return len(data)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        view[:] = bytes(len(view))
        for offset, data in self.writes:  # later writes win, as on disk
            lo, hi = max(offset, self._pos), min(offset + len(data), self._pos + len(view))
            if lo < hi:
                view[lo - self._pos : hi - self._pos] = data[lo - offset : hi - offset]
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        self._size = self._pos if size is None else size  # HDF5 saying where its file ends
        return self._size

    def flush(self) -> None:
        pass
