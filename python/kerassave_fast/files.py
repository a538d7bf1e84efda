"""File plumbing shared by every container: atomic replacement, and file regions h5py reads through."""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import errno
import io
import os
import queue
import shutil
import tempfile
import threading
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ._core import KerasSaveError, TensorFile, rename_all


@dataclass
class Destination:
    """Where a save writes: `path` and an open `file` on it. Every byte goes through `file`: the
    path is never reopened, so nothing can be written into another file that took its name."""

    path: str  # the target itself when written in place, else a temporary file beside it
    file: TensorFile


@dataclass
class Durable:
    """A save that fsyncs what it writes (`save_model(..., fsync=True)`)."""

    synced: bool = False  # whether it has fsynced anything yet


# The durable save running on this thread (or task), if any.
_FSYNC: contextvars.ContextVar[Durable | None] = contextvars.ContextVar("kerassave_fast_fsync", default=None)


@contextlib.contextmanager
def durability(fsync: bool) -> Iterator[Durable | None]:
    """Within the block, every file a save completes is fsynced, then the directory entry that
    names it, before the save returns (see `sync`). Yields the durable save, None if not asked."""
    token = _FSYNC.set(Durable() if fsync else None)
    try:
        yield _FSYNC.get()
    finally:
        _FSYNC.reset(token)


def _fsync(fd: int) -> None:
    os.fsync(fd)
    durable = _FSYNC.get()
    if durable is not None:
        durable.synced = True


def _sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def sync(path: str) -> None:
    """When saves are durable here: fsyncs `path` (a file, or a directory and everything in it),
    then the directory that holds it, so the save survives a power loss once it returns."""
    if not _FSYNC.get() or not os.path.exists(path):
        return
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            for name in files:
                _sync_file(os.path.join(root, name))
            for name in dirs:
                _sync_directory(os.path.join(root, name))
        _sync_directory(path)
    else:
        _sync_file(path)
    _sync_directory(os.path.dirname(os.path.abspath(path)))


def sync_name(path: str) -> None:
    """When saves are durable here: fsyncs the directory holding `path`, after a rename made it."""
    if _FSYNC.get():
        _sync_directory(os.path.dirname(os.path.abspath(path)))


def _sync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


# rename(2) over a file that is a mount point (a single-file bind mount) fails with these.
_RENAME_IMPOSSIBLE = (errno.EBUSY, errno.EXDEV)

# The files mapped by mapped loads, as ((device, inode), weak reference to the map): a file must not
# be written in place while a map of it lives (its pages not yet copied would show the new bytes).
_MAPPED_LOCK = threading.Lock()
_MAPPED: list[tuple[tuple[int, int], weakref.ref]] = []


def note_mapped(fd: int, mapped) -> None:
    """Records that `mapped` (an `mmap`) maps the file open at `fd`, for as long as it lives."""
    identity = os.fstat(fd)
    with _MAPPED_LOCK:
        _MAPPED[:] = [(k, r) for k, r in _MAPPED if r() is not None]
        _MAPPED.append(((identity.st_dev, identity.st_ino), weakref.ref(mapped)))


_NO_RENAME = "no new file can be renamed over it here"


def _refuse_if_mapped(target: str, filepath: str, why: str = _NO_RENAME) -> None:
    """Refuses to write `target` in place while a model loaded from it with mmap=True reads its pages
    (truncating a mapped file takes its pages away: the next read of one kills the process, SIGBUS)."""
    identity = _stat_or_none(target)
    if identity is None:
        return
    with _MAPPED_LOCK:
        live = any(k == (identity.st_dev, identity.st_ino) and r() is not None for k, r in _MAPPED)
    if live:
        raise KerasSaveError(
            f"{filepath}: cannot be written in place ({why}) while a model loaded from it with mmap=True "
            "still reads its pages; save to another path, or load it with mmap=False"
        )


def refuse_stock_write_if_mapped(filepath) -> None:
    """Before a save is handed to stock, which writes its file in place: refused if mapped."""
    if isinstance(filepath, (str, bytes, os.PathLike)):
        path = os.fsdecode(filepath)
        _refuse_if_mapped(os.path.realpath(path), path, "stock's writer would rewrite it")


@contextlib.contextmanager
def atomic_replace(filepath: str, staged: list[_Staged] | None = None) -> Iterator[Destination]:
    """Yields where to write `filepath`'s new content: a temporary file beside it, renamed over it
    only on success, so a failed save leaves the previous file untouched and nothing behind.

    Like `open(filepath, "wb")`: a symlink is followed, a target we may not write is refused with
    stock's `PermissionError`, and the target's mode, owner, group and extended attributes (ACLs
    included) carry over, where the OS allows. Where a rename cannot work -- the target is a
    single-file bind mount, or its directory is not writable -- the target is written in place, as
    stock does (then a failed save can leave it broken).

    With `staged`, the complete temporary file is not renamed but added to it, for
    `atomic_replace_all` to rename with the others.
    """
    target = os.path.realpath(filepath)
    directory = os.path.dirname(target)
    previous = _stat_or_none(target)
    if previous is not None:
        _check_writable(target, filepath)
    fd, tmp_path = -1, None
    if previous is None or previous.st_dev == os.stat(directory).st_dev:
        try:
            fd, tmp_path = tempfile.mkstemp(prefix=_our_temporary_prefix(target), suffix=".tmp", dir=directory)
        except OSError as e:
            if previous is None or not isinstance(e, PermissionError):  # stock could not create it either
                raise type(e)(e.errno, e.strerror, filepath) from None  # named as stock names it
    if tmp_path is None:
        _refuse_if_mapped(target, filepath)
        yield from _in_place(target)
        return
    try:
        _carry_over(fd, target, previous)
        yield Destination(tmp_path, TensorFile(tmp_path, writable=True, fd=fd))
        if _FSYNC.get():
            _fsync(fd)  # the data first: a rename must never name a file whose bytes may be lost
        os.close(fd)
        fd = -1
        if staged is not None:
            staged.append(_Staged(tmp_path, target, filepath))
            tmp_path = None  # the caller's now
            return
        placing = _Staged(tmp_path, target, filepath)
        try:
            _put_in_place(placing)
        finally:
            tmp_path = None if placing.kept else tmp_path
        if _FSYNC.get():
            _sync_directory(directory)  # then the name
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        if tmp_path is not None:
            _note_not_saved(e, filepath, tmp_path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_path)
        raise


def _note_not_saved(e: BaseException, filepath: str, tmp_path: str) -> None:
    """An error naming the temporary file, about to be removed, says what became of the target."""
    if isinstance(e, OSError) and e.filename is not None and os.fsencode(e.filename) == os.fsencode(tmp_path):
        e.add_note(
            f"{filepath} was not saved; its previous content is unchanged (the error names the "
            "temporary file it was written to, now removed)"
        )


@dataclass
class _Staged:
    """A complete temporary file and the target it replaces (`filepath` as the caller named it)."""

    tmp_path: str
    target: str
    filepath: str
    kept: bool = False  # the only complete copy, once a copy in place failed: not to be removed


def _put_in_place(staged: _Staged) -> None:
    """Renames the temporary file over its target, or, where no rename can work, copies it there
    in place, as stock writes."""
    held = _hold(staged.target)
    try:
        os.replace(staged.tmp_path, staged.target)
    except OSError as e:
        if e.errno not in _RENAME_IMPOSSIBLE:
            raise
        _refuse_if_mapped(staged.target, staged.filepath)
        try:
            shutil.copyfile(staged.tmp_path, staged.target)
        except BaseException as failed:
            staged.kept = True
            failed.add_note(
                f"{staged.filepath} may be incomplete; the new file is whole at {staged.tmp_path} (copy it there)"
            )
            raise
        os.unlink(staged.tmp_path)
        sync(staged.target)
    finally:
        _release_later(held)


# Files that make one whole are renamed under it: another thread's save to the same targets would
# interleave its renames with these (a checkpoint's new data shard beside the other save's index).
_RENAMES_LOCK = threading.Lock()


@contextlib.contextmanager
def atomic_replace_all(filepaths: Sequence[str]) -> Iterator[list[Destination]]:
    """`atomic_replace` for files that make one whole (a tensor bundle's data shard and index): each
    is written beside its target, and only once all are complete are they renamed over their
    targets, in the order given, in one call of the Rust core: an exception (`KeyboardInterrupt`)
    cannot come between two renames, nor another thread's save to the same targets. A failed save
    leaves every previous file untouched; put last the file readers open first (a bundle's
    `.index`), so it is the last to change. The renames are still not one atomic step for the
    system: a crash between them leaves the new files before it beside the old after.
    """
    staged: list[_Staged] = []
    try:
        with contextlib.ExitStack() as stack:
            # Contexts exit last-in first-out: entered in reverse, they are staged in the given order.
            destinations = [stack.enter_context(atomic_replace(path, staged)) for path in reversed(filepaths)]
            yield destinations[::-1]
        held = [_hold(s.target) for s in staged]
        try:
            with _RENAMES_LOCK:
                renamed = rename_all([(s.tmp_path, s.target) for s in staged])
                for s in staged[renamed:]:  # one failed: renamed again here, to raise its error or copy in place
                    try:
                        _put_in_place(s)
                    except BaseException as e:
                        if not s.kept:
                            _note_not_saved(e, s.filepath, s.tmp_path)
                        raise
        finally:
            for fd in held:
                _release_later(fd)
        if _FSYNC.get():
            for directory in dict.fromkeys(os.path.dirname(s.target) for s in staged):
                _sync_directory(directory)
    finally:
        for s in staged:  # those not renamed (a failure); a renamed one's name is gone
            if not s.kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(s.tmp_path)


def _hold(path: str) -> int:
    """A descriptor that keeps the file at `path` alive (-1 when none can be had): held across the
    rename that replaces it, the old file's blocks are freed when it is closed, not in the rename."""
    try:
        return os.open(path, getattr(os, "O_PATH", os.O_RDONLY | os.O_NONBLOCK) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return -1


_CLOSE_LOCK = threading.Lock()
_to_close: queue.SimpleQueue | None = None  # the closing thread's, once it runs


def _release_later(fd: int) -> None:
    """Closes `fd` on a background thread: the last reference to a replaced file, whose freeing
    then overlaps with the caller's work instead of adding to the save."""
    global _to_close
    if fd < 0:
        return
    with _CLOSE_LOCK:
        if _to_close is None:
            _to_close = queue.SimpleQueue()
            name = "kerassave_fast closer"
            threading.Thread(target=_close_forever, args=(_to_close,), name=name, daemon=True).start()
        _to_close.put(fd)


def _close_forever(fds: queue.SimpleQueue) -> None:
    while True:
        os.close(fds.get())


def _forget_closer_in_child() -> None:
    """A forked child has no closing thread (the descriptors it inherited close at its exit), and
    no renames running (a thread of the parent may have held their lock)."""
    global _to_close, _RENAMES_LOCK
    _to_close = None
    _RENAMES_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_closer_in_child)

# Tags our temporary files: a later save removes those whose process is gone (killed mid-save).
_HOST = "".join(c for c in os.uname().nodename if c.isalnum())[:32]  # gethostname(2), without importing socket


def _temporary_prefix(name: str) -> str:
    """`.<name>.`, cut to at most 120 bytes, between characters (TensorFlow refuses a path that is
    not UTF-8), so that the temporary file's name stays within NAME_MAX, 255 bytes."""
    size = 0
    for cut, character in enumerate(name):
        size += len(os.fsencode(character))
        if size > 120:
            return f".{name[:cut]}."
    return f".{name}."


def _our_temporary_prefix(target: str) -> str:
    """The name prefix of this process's temporaries for `target` (a real path), after removing
    those that saves of `target` left behind on this host when their process died."""
    prefix = _temporary_prefix(os.path.basename(target))
    _remove_stale_temporaries(os.path.dirname(target), prefix)
    return f"{prefix}{_HOST}-{os.getpid()}."


def staging_directory(target: str, suffix: str = ".tmp") -> str:
    """A new directory beside `target` (a real path) to build its next content in (a SavedModel),
    named so that a later save removes it if this process dies before moving it into place."""
    return tempfile.mkdtemp(prefix=_our_temporary_prefix(target), suffix=suffix, dir=os.path.dirname(target))


# The suffixes that make Keras 3's `model.save` write a model file (anything else: refused, or a
# SavedModel directory for tf_keras).
MODEL_FILE_SUFFIXES = (".keras", ".h5", ".hdf5")

_TEMPORARY_SUFFIXES = (".tmp", ".old")  # being written; a previous SavedModel moved aside to be removed


def _remove_stale_temporaries(directory: str, prefix: str) -> None:
    """Deletes temporary files and directories a save of this target left behind on this host when
    its process died before renaming them (kill -9, OOM killer): they are never renamed over
    anything, so only their space is lost, but it is a whole model's worth each time."""
    try:
        with os.scandir(directory) as listing:
            entries = list(listing)
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix + _HOST + "-") and entry.name.endswith(_TEMPORARY_SUFFIXES)):
            continue
        pid = entry.name[len(prefix + _HOST) + 1 :].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread's save in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _in_place(target: str) -> Iterator[Destination]:
    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        yield Destination(target, TensorFile(target, writable=True, fd=fd))
        if _FSYNC.get():
            _fsync(fd)
    finally:
        os.close(fd)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _check_writable(target: str, filepath: str) -> None:
    """Stock's `open(filepath, "wb")` would fail on a file we may not write: fail the same way, early."""
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))  # NONBLOCK: a FIFO must not hang us
    except OSError as e:
        raise type(e)(e.errno, e.strerror, filepath) from None


def _carry_over(fd: int, target: str, previous: os.stat_result | None) -> None:
    """Gives the new file what the old one had (or what `open` would give a new file)."""
    if previous is None:
        os.fchmod(fd, 0o666 & ~_umask())
        return
    if (previous.st_uid, previous.st_gid) != (os.geteuid(), os.getegid()):
        with contextlib.suppress(PermissionError):  # only root may give a file away
            os.fchown(fd, previous.st_uid, previous.st_gid)
    with contextlib.suppress(OSError):  # ACLs live in xattrs; some file systems have none
        for name in os.listxattr(target):
            with contextlib.suppress(OSError):
                os.setxattr(fd, name, os.getxattr(target, name))
    os.fchmod(fd, previous.st_mode & 0o1777)  # never setuid/setgid: writing a file clears them too


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
    """A stretch of an open file, seen as a whole read-only file, through which h5py reads an HDF5
    file where it sits (inside a zip member) without copying it out.

    Each page is read from the file once and kept, so HDF5 sees one version of every byte however
    often it asks: a file rewritten in place during a load cannot mix two versions (long stretches
    HDF5 never read, checksummed in bulk, are not kept: read again if it asks, they must match). `freeze` then
    takes in every byte between the tensors, and checks the kept bytes that overlap a tensor
    against the tensor as it was read; after it, nothing HDF5 sees is unchecked. Reads past the
    region's end see zeros, as HDF5's own POSIX driver gives them.
    """

    PAGE = 1 << 12
    _BULK = 1 << 20  # bytes per read of a stretch HDF5 never asked for (at least 16 pages of one)

    def __init__(self, fd: int, start: int, size: int, where: str):
        super().__init__(size)
        self._fd = fd
        self._start = start
        self._where = where
        self._pages: dict[int, bytes] = {}
        self._tensors: list[tuple[int, memoryview]] | None = None  # set by `freeze`: (offset, bytes as read)
        self._unkept: list[tuple[int, int, int]] = []  # (offset, length, CRC-32) checksummed, not kept

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        wanted = len(view)
        available = max(0, min(wanted, self._size - self._pos))
        done = 0
        while done < available:
            index, skip = divmod(self._pos + done, self.PAGE)
            page = self._page(index)
            n = min(len(page) - skip, available - done)
            if n <= 0:  # the file is shorter than the region: zeros, as past the end
                break
            view[done : done + n] = page[skip : skip + n]
            done += n
        view[done:] = bytes(wanted - done)
        self._pos += wanted
        return wanted

    def _page(self, index: int) -> bytes:
        page = self._pages.get(index)
        if page is None and self._unkept:
            self._keep_checked(index * self.PAGE)
            page = self._pages.get(index)
        if page is None:
            offset = index * self.PAGE
            page = os.pread(self._fd, min(self.PAGE, self._size - offset), self._start + offset)
            if self._tensors is not None:
                self._check_against_tensors(offset, page)
            self._pages[index] = page
        return page

    def _keep_checked(self, offset: int) -> None:
        """HDF5 asks for a page of a stretch checksummed but not kept: the stretch is read again,
        kept, and must be what was checksummed."""
        for start, length, crc in self._unkept:
            if start <= offset < start + length:
                data = os.pread(self._fd, length, self._start + start)
                if zlib.crc32(data) != crc:
                    raise KerasSaveError(f"{self._where}: the file changed while it was being read")
                for k in range(0, length, self.PAGE):
                    self._pages.setdefault((start + k) // self.PAGE, data[k : k + self.PAGE])
                return

    def _check_against_tensors(self, offset: int, page: bytes) -> None:
        for t_offset, t_bytes in self._tensors_overlapping(offset, offset + len(page)):
            lo, hi = max(offset, t_offset), min(offset + len(page), t_offset + len(t_bytes))
            if page[lo - offset : hi - offset] != t_bytes[lo - t_offset : hi - t_offset]:
                raise KerasSaveError(f"{self._where}: the file changed while it was being read")

    def _tensors_overlapping(self, lo: int, hi: int) -> list[tuple[int, memoryview]]:
        tensors = self._tensors or []
        i = max(0, bisect.bisect_right(tensors, lo, key=lambda t: t[0]) - 1)
        found = []
        while i < len(tensors) and tensors[i][0] < hi:
            if tensors[i][0] + len(tensors[i][1]) > lo:
                found.append(tensors[i])
            i += 1
        return found

    def seed(self, pages: dict[int, bytes]) -> None:
        """Takes pages already read from the same file (index -> bytes of that PAGE-sized page), for
        any not read yet: they are then served as if read here."""
        for index, page in pages.items():
            if 0 <= index * self.PAGE < self._size and len(page) == min(self.PAGE, self._size - index * self.PAGE):
                self._pages.setdefault(index, page)

    def copy_if_held(self, offset: int, out) -> bool:
        """Copies `len(out)` bytes from `offset` into `out` (a writable byte buffer) if every page
        they span is held already; else does nothing and returns False. Bytes served so are the
        region's: `freeze` counts them between the tensors."""
        first, last = offset // self.PAGE, (offset + len(out) - 1) // self.PAGE
        if not len(out) or any(i not in self._pages for i in range(first, last + 1)):
            return False
        view = memoryview(out).cast("B")
        done = 0
        for index in range(first, last + 1):
            page = self._pages[index]
            skip = offset + done - index * self.PAGE
            n = min(len(page) - skip, len(out) - done)
            view[done : done + n] = page[skip : skip + n]
            done += n
        return done == len(out)

    def freeze(
        self, tensors: list[tuple[int, memoryview]], checksummed: Sequence[tuple[int, int]] = (), checksums: bool = True
    ) -> list[tuple[int, int, int]]:
        """Serves the region from memory from now on, consistent with `tensors` -- (offset, bytes as
        read), sorted and disjoint; returns (offset, length, CRC-32) of each stretch between them and
        the (offset, length) stretches already `checksummed` elsewhere (compressed chunks as the Rust
        core read them), read now, if `checksums`, for a zip member's CRC; else nothing (then pages
        are read only when HDF5 asks)."""
        self._tensors = tensors
        for index, page in list(self._pages.items()):
            self._check_against_tensors(index * self.PAGE, page)
        if not checksums:
            return []
        covered = sorted([(offset, len(data)) for offset, data in tensors] + list(checksummed))
        gaps, cursor = [], 0
        for offset, length in [*covered, (self._size, 0)]:
            if offset > cursor:
                gaps.append((cursor, offset - cursor))
            cursor = max(cursor, offset + length)
        return [(offset, length, self._crc32(offset, length)) for offset, length in gaps]

    def _crc32(self, offset: int, length: int) -> int:
        crc, end = 0, offset + length
        while offset < end:
            index, skip = divmod(offset, self.PAGE)
            if skip == 0 and index not in self._pages and end - offset >= 16 * self.PAGE:
                # A long stretch HDF5 has not read (compressed chunks the Rust core decoded): read
                # in large pieces, not kept, as HDF5 never reads it again.
                n = min(self._BULK, end - offset) // self.PAGE * self.PAGE
                n = next((k * self.PAGE for k in range(n // self.PAGE) if index + k in self._pages), n)
                data = os.pread(self._fd, n, self._start + offset)
                self._unkept.append((offset, len(data), zlib.crc32(data)))
            else:
                page = self._page(index)
                data = page[skip : skip + min(len(page) - skip, end - offset)]
            if not data:
                raise KerasSaveError(f"{self._where}: the file is truncated at byte {self._start + offset}")
            crc = zlib.crc32(data, crc)
            offset += len(data)
        return crc


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


class FileWindow(_Seekable):
    """A stretch of an open file from `start` on, seen by h5py as a whole writable file: how a
    compressed HDF5 file (whose size its data decides) goes straight where it belongs, a
    `.weights.h5` file or the member of a `.keras` zip, through the descriptor of the save."""

    def __init__(self, fd: int, start: int, path: str):
        super().__init__()
        self._fd = fd
        self._start = start
        self._path = path  # named in errors, as the Rust core's writes name it
        self.failure: OSError | None = None  # the write that failed: h5py raises only its errno

    def writable(self) -> bool:
        return True

    def write(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], self._start + self._pos + done)
            except OSError as e:  # a full disk, a file size limit: say which file, as OSError(errno, text, path)
                self.failure = OSError(e.errno, f"{self._path}: write failed: {e.strerror}", self._path)
                raise self.failure from e
        self._pos += done
        self._size = max(self._size, self._pos)
        return done

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = os.preadv(self._fd, [view[: max(0, self._size - self._pos)]], self._start + self._pos)
        view[n:] = bytes(len(view) - n)  # past what was written: zeros, as HDF5's POSIX driver gives
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        # HDF5 saying where its file ends; nothing follows the window while it is written
        self._size = self._pos if size is None else size
        os.ftruncate(self._fd, self._start + self._size)
        return self._size

    def flush(self) -> None:
        pass


def changed(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether a file's bytes may have changed between two `fstat`s of one descriptor. Its change
    time also moves when a save renames a new file over it (one link less), which leaves the bytes
    we read alone; a write that put back the modification time shows only there."""
    if before.st_size != after.st_size or before.st_mtime_ns != after.st_mtime_ns:
        return True
    return before.st_ctime_ns != after.st_ctime_ns and before.st_nlink == after.st_nlink
