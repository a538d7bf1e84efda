"""Typed stubs of the Rust core (rust/lib.rs)."""

import os
from collections.abc import Buffer, Callable, Sequence

ZIP64_LIMIT: int
MAX_THREADS: int
OBJECT_GRAPH_KEY: str  # the bundle key of TensorFlow's object graph

class KerasSaveError(ValueError):
    """A saved-model file is malformed: truncated, corrupted, hostile or not the format its name says."""

class BadKerasZipFile(KerasSaveError):  # also a zipfile.BadZipFile
    """A `.keras` file whose zip container is malformed."""

class TensorFile:
    """An open file whose tensors are written or read at planned offsets."""

    def __init__(self, path: str, writable: bool = False, fd: int | None = None) -> None: ...
    @property
    def path(self) -> str: ...
    def fileno(self) -> int: ...
    def size(self) -> int: ...
    def write_tensors(self, offsets: Sequence[int], buffers: Sequence[Buffer], threads: int = 0) -> list[int]: ...
    def read_tensors(self, offsets: Sequence[int], buffers: Sequence[Buffer], threads: int = 0) -> list[int]: ...
    def crc32(self, start: int, length: int, known: Sequence[tuple[int, int, int]] = (), threads: int = 0) -> int: ...
    def read_chunked(
        self, start: int, datasets: Sequence[tuple[str, Chunking, Sequence[int], int, Buffer]], threads: int = 0
    ) -> list[tuple[int, int, int]]:
        """Reads, checks and decodes chunked datasets (name, chunking, shape, element size, buffer);
        returns (offset from `start`, stored length, CRC-32 of the stored bytes) of each chunk read."""

DateTime = tuple[int, int, int, int, int, int]

class ZipWriter:
    """Frames STORED zip members in a `TensorFile` the way `zipfile` does."""

    def __init__(self, file: TensorFile, zip64_limit: int = ...) -> None: ...
    def add_stored(self, name: str, data: bytes, date_time: DateTime, external_attr: int) -> None: ...
    def begin_stored(
        self, name: str, date_time: DateTime, external_attr: int, size_hint: int, alignment: int = 1
    ) -> int: ...
    def data_start(self, name: str, size_hint: int, alignment: int = 1) -> int: ...
    def end_stored(self, size: int, crc32: int) -> None: ...
    def finish(self) -> int: ...

class ZipMember:
    index: int
    raw_name: bytes
    flags: int
    method: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int
    external_attr: int
    date_time: DateTime

class ZipArchive:
    """The directory of a zip file, read without trusting it."""

    def __init__(self, file: TensorFile) -> None: ...
    def members(self) -> list[ZipMember]: ...
    def data_offset(self, index: int) -> int: ...
    def read(self, index: int) -> bytes: ...
    def check_crc(self, index: int, threads: int = 0) -> None: ...

BundleItem = tuple[str, int, Sequence[int], Buffer | Sequence[bytes]]

class TensorBundleWriter:
    """A single-shard tensor bundle written batch by batch, then its index."""

    def __init__(self, data_file: TensorFile, index_file: TensorFile) -> None: ...
    def add(self, tensors: Sequence[BundleItem], threads: int = 0) -> None: ...
    def reset(self) -> None: ...
    def __len__(self) -> int: ...
    def finish(self) -> tuple[int, int]: ...

def bundle_write_sharded_index(index_file: TensorFile, shards: list[TensorBundleWriter]) -> int:
    """Cuts each shard's data file to what it wrote and writes the index of all of them (shard `i` of
    `len(shards)`); returns the index's length."""

class TensorBundleReader:
    """An open tensor bundle (`prefix.index` + `prefix.data-*`), its index read and validated."""

    def __init__(self, prefix: str) -> None: ...
    @property
    def index_path(self) -> str: ...
    @property
    def num_shards(self) -> int: ...
    def entries(self) -> list[tuple[str, int, list[int], int, bool, int, int]]: ...
    def read_tensors(self, keys: Sequence[str], buffers: Sequence[Buffer], threads: int = 0) -> None: ...
    def read_strings(self, key: str) -> list[bytes]: ...

# (chunk shape, filter ids in pipeline order, [(offset in the HDF5 file, stored size, filter mask, coordinates)])
Chunking = tuple[list[int], list[int], list[tuple[int, int, int, list[int]]]]

def hdf5_stored_datasets(
    source: TensorFile | bytes,
    start: int = 0,
    length: int | None = None,
    pages: dict[int, bytes] | None = None,
    path: str | None = None,
    left_to_libhdf5: list[str] | None = None,
) -> list[tuple[str, int, list[int], str, Chunking | None]] | None:
    """(h5py path, offset in the HDF5 file, shape, numpy dtype name, chunking) of each dataset
    readable here: plain little-endian numbers or Keras' bfloat16, allocated, and either contiguous
    and unfiltered (read by offset; chunking None) or chunked in a version 1 B-tree with shuffle,
    deflate, zstd or Fletcher-32 filters, every chunk present (offset 0). `left_to_libhdf5`
    receives what only libhdf5 can judge (datasets not listed or carrying a `dtype` attribute,
    objects reached twice or holding unknown messages, an end-of-file address other than the
    file's length): empty, the listing is the whole file as h5py sees it."""

def hdf5_encode_chunks(
    chunks: Sequence[Buffer], filters: Sequence[int], level: int, itemsize: int, threads: int = 0
) -> list[StoredChunk]:
    """HDF5's filter pipeline run over each raw chunk, in parallel: what HDF5 stores for each."""

class StoredChunk:
    """One chunk as HDF5 stores it: read-only bytes (the buffer protocol), made by the core."""
    def __buffer__(self, flags: int, /) -> memoryview: ...

HDF5_LAID_OUT_VERSION: str  # the libhdf5 whose layout `hdf5_lay_out` replays

def hdf5_lay_out(
    steps: Sequence[tuple[str, str, tuple[str, int, tuple[int, ...]] | None, tuple[str, str] | None]],
) -> tuple[int, list[int], list[tuple[int, bytes]]] | None:
    """The HDF5 file h5py's file-object driver writes for `steps`, laid out without h5py: each step
    a group (path, "", None, attribute) or a dataset (group, name, (dtype kind, item size, shape),
    attribute), an attribute (name, string). Returns (file size, offset of each dataset with bytes
    in order, the bytes between those datasets as (start, bytes)); None when h5py must lay it out."""

def tensor_bytes_moved() -> int:
    """Tensor bytes the core has written, read or compressed in this process so far (for progress bars)."""

def rename_all(pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]]) -> int:
    """Renames each (from, to) in order in one call, no Python code running between them; returns
    how many were renamed (it stops at the first that fails)."""

def attribute_state(
    model: object, kinds: dict[type, int], kind_of: Callable[[object], int], plain: tuple[type, ...]
) -> list:
    """`keras3.state._attribute_state`'s walk of `model`: `kinds` caches `kind_of(value)` (0 plain
    value, 1 Keras object, 2 list/tuple/dict, 3 other) by class; `plain` are the plain types."""

def hdf5_read_chunked(
    data: bytes,
    start: int,
    datasets: Sequence[tuple[str, Chunking, Sequence[int], int, Buffer]],
    path: str,
    threads: int = 0,
) -> list[tuple[int, int, int]]:
    """`TensorFile.read_chunked` of an HDF5 file in memory (`data` from `start`), naming `path` in errors."""
