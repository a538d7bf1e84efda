"""TensorFlow's tensor bundle (`prefix.index` + `prefix.data-00000-of-00001`): what a TF checkpoint and
a SavedModel's `variables/` hold. The Rust core packs the tensors and writes the index
(rust/bundle/files.rs); this module hands it the tensors in TensorFlow's order and reads them back
into arrays TensorFlow can adopt.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .._core import TensorBundleReader, TensorBundleWriter, bundle_write_sharded_index
from ..asynchronous import side_by_side
from ..files import atomic_replace_all
from ..tensors import aligned_empty, as_bytes

DT_STRING = 7


@dataclass
class BundleTensor:
    """One tensor to save under `key`: `value` is an array of a fixed-size dtype (a view of the
    variable, never a copy), or for DT_STRING the elements as `bytes`, in C order."""

    key: str
    dtype: int  # TensorFlow's DataType enum value
    shape: tuple[int, ...]
    value: np.ndarray | list[bytes]


def index_path(prefix: str) -> str:
    return prefix + ".index"


def data_path(prefix: str, shard: int = 0, num_shards: int = 1) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def items(tensors: list[BundleTensor]) -> list[tuple]:
    """The tensors as the Rust writer takes them."""
    return [(t.key, t.dtype, list(t.shape), t.value if t.dtype == DT_STRING else as_bytes(t.value)) for t in tensors]


@contextlib.contextmanager
def writing(prefix: str) -> Iterator[TensorBundleWriter]:
    """A writer of the bundle at `prefix`, batch by batch; the bundle replaces any previous one only
    when the block completes after `finish` (data file first, then the index)."""
    with atomic_replace_all([data_path(prefix), index_path(prefix)]) as (data, index):
        yield TensorBundleWriter(data.file, index.file)


def write(prefix: str, tensors: list[BundleTensor], threads: int = 0, max_shard_bytes: int | None = None) -> None:
    """Writes the bundle with the tensors' bytes in the given order (TensorFlow's `SaveV2` order),
    cut into data shards of at most `max_shard_bytes` each if given (see `shards`)."""
    groups = shards(tensors, max_shard_bytes) if max_shard_bytes else [tensors]
    if len(groups) == 1:
        with writing(prefix) as writer:
            writer.add(items(tensors), threads)
            writer.finish()
        return
    n = len(groups)
    with atomic_replace_all([*(data_path(prefix, i, n) for i in range(n)), index_path(prefix)]) as files:
        writers = [TensorBundleWriter(data.file, files[-1].file) for data in files[:-1]]
        # One writer per shard at a time, shards side by side: separate files take parallel writes.
        adds = [functools.partial(w.add, items(group), 1) for w, group in zip(writers, groups, strict=True)]
        side_by_side(adds, workers=threads or os.cpu_count() or 1)
        bundle_write_sharded_index(files[-1].file, writers)


def max_shard_bytes(max_shard_size) -> int | None:
    """Our `max_shard_size` argument (GB, as Keras 3's own `save_weights` takes it) in bytes."""
    if max_shard_size is None:
        return None
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int | float) or not max_shard_size > 0:
        raise ValueError(
            f"`max_shard_size` must be a positive number of GB. Received: max_shard_size={max_shard_size!r}"
        )
    return max(1, int(max_shard_size * 1024**3))


def shards(tensors: list[BundleTensor], max_bytes: int) -> list[list[BundleTensor]]:
    """The tensors, in order, cut into consecutive shards of at most `max_bytes` of data each; a
    tensor larger than that has a shard of its own (tensors stay whole: every reader reads them)."""
    groups: list[list[BundleTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.value.nbytes if tensor.dtype != DT_STRING else sum(len(b) + 10 for b in tensor.value)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    return groups


@dataclass
class BundleEntry:
    key: str
    dtype: int
    shape: tuple[int, ...]
    size: int
    partitioned: bool
    shard: int
    offset: int


class BundleReader:
    """An open bundle: the index read and checked by the Rust core, tensors read on demand (in
    parallel, CRC32C checked) into 64-byte-aligned arrays."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._reader = TensorBundleReader(prefix)
        self._ahead: dict[str, np.ndarray] = {}
        self._ahead_thread: threading.Thread | None = None
        self._ahead_error: BaseException | None = None
        self.entries = {
            key: BundleEntry(key, dtype, tuple(shape), size, partitioned, shard, offset)
            for key, dtype, shape, size, partitioned, shard, offset in self._reader.entries()
        }

    @property
    def index_path(self) -> str:
        return self._reader.index_path

    def read_arrays(self, keys: list[str], dtypes: list[np.dtype], threads: int = 0) -> list[np.ndarray]:
        """The tensors under `keys` (whole, fixed-size dtypes), each in a fresh aligned array (one
        `read_ahead` read is handed out once, never twice)."""
        ahead = self._take_read_ahead(keys, dtypes)
        missing = [i for i, array in enumerate(ahead) if array is None]
        arrays = [aligned_empty(self.entries[keys[i]].shape, dtypes[i]) for i in missing]
        if missing:
            self._reader.read_tensors([keys[i] for i in missing], [as_bytes(a) for a in arrays], threads)
        for i, array in zip(missing, arrays, strict=True):
            ahead[i] = array
        return ahead

    def read_ahead(self, keys: list[str], dtypes: list[np.dtype], threads: int = 0) -> None:
        """Starts reading `keys` on a background thread (the GIL released), for `read_arrays` later."""
        arrays = [aligned_empty(self.entries[k].shape, dtype) for k, dtype in zip(keys, dtypes, strict=True)]
        self._ahead = dict(zip(keys, arrays, strict=True))

        def read() -> None:
            try:
                self._reader.read_tensors(keys, [as_bytes(a) for a in arrays], threads)
            except BaseException as e:  # raised where the arrays are wanted
                self._ahead_error = e

        self._ahead_thread = threading.Thread(target=read, name="kerassave-read-ahead", daemon=True)
        self._ahead_thread.start()

    def _take_read_ahead(self, keys: list[str], dtypes: list[np.dtype]) -> list[np.ndarray | None]:
        if not self._ahead:
            return [None] * len(keys)
        self.join()
        if self._ahead_error is not None:
            raise self._ahead_error
        taken = []
        for key, dtype in zip(keys, dtypes, strict=True):
            array = self._ahead.get(key)
            taken.append(self._ahead.pop(key) if array is not None and array.dtype == dtype else None)
        return taken

    def join(self) -> None:
        """Waits for `read_ahead`: no thread writes into our arrays after this."""
        if self._ahead_thread is not None:
            self._ahead_thread.join()

    def read_strings(self, key: str) -> np.ndarray:
        """A DT_STRING tensor as an object array of `bytes` (a scalar gives a 0-d array)."""
        elements = self._reader.read_strings(key)
        array = np.empty(len(elements), dtype=object)
        array[:] = elements
        return array.reshape(self.entries[key].shape)
