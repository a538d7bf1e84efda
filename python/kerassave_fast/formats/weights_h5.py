"""HDF5 files of model state: the `model.weights.h5` payload of Keras 3 (also a `.weights.h5` file on
its own) and legacy `.h5` files (see legacy_h5.py), described as a plan of stock's h5py calls.

h5py lays out the HDF5 metadata (groups, attributes, dataset headers) exactly where stock Keras
would have it; each tensor's bytes are then moved by the Rust core straight to the offset HDF5
reserved for them, or read from the offset HDF5 recorded. The tensor bytes never pass through h5py.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import math
import numbers
import os
import queue
import resource
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import h5py
import numpy as np
from h5py import h5d, h5o, h5p, h5s, h5t
from h5py._hl import base
from h5py._hl.dataset import make_new_dset

from .._core import (
    HDF5_LAID_OUT_VERSION,
    KerasSaveError,
    TensorFile,
    hdf5_encode_chunks,
    hdf5_lay_out,
    hdf5_read_chunked,
    hdf5_stored_datasets,
)
from ..files import Destination, FileRegion, FileWindow, SparseImage, atomic_replace, changed
from ..mapped import Mapping, refuse_if_replaced
from ..tensors import BFLOAT16, aligned_empty, as_bytes, snapshot


@dataclass
class PlannedGroup:
    """A group, created when stock would create it (its parent made if missing), with its attributes."""

    path: str
    attrs: dict | None


@dataclass
class PlannedAttribute:
    """`h5[path].attrs[name] = value` on a group that exists ("" is the root)."""

    path: str
    name: str
    value: object


@dataclass
class PlannedDataset:
    """One variable's tensor: dataset `name` of group `group`, bytes from `array`.

    `created`: made as by `group.create_dataset(name, shape, dtype)` and then written, as the legacy
    `.h5` writers do (`name` may hold '/': missing groups are made); else as by `group[name] = array`.
    """

    group: str
    name: str
    array: np.ndarray
    created: bool = False
    # Keras 3 stores bfloat16 as 16-bit words plus a `dtype` attribute; tf_keras' stores leave it to h5py.
    bfloat16_attribute: bool = True

    def with_array(self, array: np.ndarray) -> PlannedDataset:
        """The same dataset over `array` (a fresh snapshot): `dataclasses.replace` costs 5x more."""
        return PlannedDataset(self.group, self.name, array, self.created, self.bfloat16_attribute)

    @property
    def compressible(self) -> bool:
        """Whether a compressed save writes it chunked: numbers (bfloat16 included) with elements.
        Not booleans and complex numbers (HDF5 enums and compounds): only h5py reads those, and
        it cannot undo zstd without hdf5plugin."""
        array = self.array
        return bool(array.ndim and array.size) and (array.dtype == BFLOAT16 or array.dtype.kind in "iuf")

    @property
    def reserved(self) -> bool:
        """Whether HDF5 only reserves room and the Rust core writes the bytes (fixed-size numbers)."""
        dtype = self.array.dtype
        if dtype == BFLOAT16:  # Keras 3 stores it as uint16 plus a `dtype` attribute; others as h5py does
            return self.bfloat16_attribute and not self.created
        return dtype.kind in "biufc" and dtype.isnative


@dataclass
class WeightsPlan:
    """What stock Keras would write into the weights file, in its order, holding no copies."""

    steps: list[PlannedGroup | PlannedAttribute | PlannedDataset] = field(default_factory=list)

    def add_group(self, path: str, attrs: dict | None = None) -> None:
        self.steps.append(PlannedGroup(path, attrs))

    def add_attribute(self, path: str, name: str, value) -> None:
        self.steps.append(PlannedAttribute(path, name, value))

    def add_dataset(
        self, group: str, name: str, value, created: bool = False, bfloat16_attribute: bool = True
    ) -> PlannedDataset:
        return self.add_snapshot(group, name, snapshot(value), created, bfloat16_attribute)

    def add_snapshot(
        self, group: str, name: str, array: np.ndarray, created: bool = False, bfloat16_attribute: bool = True
    ) -> PlannedDataset:
        """`add_dataset` of a snapshot already taken."""
        dataset = PlannedDataset(group, name, array, created, bfloat16_attribute)
        self.steps.append(dataset)
        return dataset

    @property
    def datasets(self) -> list[PlannedDataset]:
        return [s for s in self.steps if isinstance(s, PlannedDataset)]


class _ReservedDatasets:
    """Stock's dataset creation, except only the first element is written through HDF5.

    Like stock, each dataset is created with h5py's defaults and its storage allocated by its first
    write, so the metadata is byte for byte stock's; the remaining bytes are left to the Rust core.
    The same libhdf5 calls as h5py's `make_new_dset` and `Group._e`, with the property lists, types
    and dataspaces they would make afresh for every dataset made once per file (a first save of
    thousands of small tensors spends its time here).
    """

    def __init__(self):
        self._dcpl = h5p.create(h5p.DATASET_CREATE)  # what `make_new_dset` sets without chunks or filters
        self._dcpl.set_obj_track_times(False)
        self._dcpl.set_attr_creation_order(
            h5p.CRT_ORDER_TRACKED | h5p.CRT_ORDER_INDEXED if h5py.get_config().track_order else 0
        )
        self._types: dict[np.dtype, h5t.TypeID] = {}
        self._spaces: dict[tuple[int, ...], h5s.SpaceID] = {}
        self._lcpls: dict[int, h5p.PropLCID] = {}

    def _lcpl(self, coding: int) -> h5p.PropLCID:
        if coding not in self._lcpls:
            self._lcpls[coding] = base.dlcpl.copy()
            self._lcpls[coding].set_char_encoding(coding)
        return self._lcpls[coding]

    def create(self, group: h5py.Group, name: str | bytes, array: np.ndarray, named: bool) -> h5d.DatasetID:
        """`named` mirrors `create_dataset(name, data=...)`; otherwise `group[name] = ...` (create, then link)."""
        encoded = group._e(name)  # `Group._e`'s coding, without the property list it copies each call
        coding = h5t.CSET_ASCII if isinstance(name, bytes) or name.isascii() else h5t.CSET_UTF8
        if array.dtype not in self._types:
            self._types[array.dtype] = h5t.py_create(array.dtype, logical=1)
        if array.shape not in self._spaces:
            self._spaces[array.shape] = h5s.create_simple(array.shape, None)
        space = self._spaces[array.shape]
        dsid = h5d.create(group.id, encoded if named else None, self._types[array.dtype], space, dcpl=self._dcpl)
        if array.size:
            first = (0,) * array.ndim
            file_space = space.copy()
            if array.ndim:
                file_space.select_hyperslab(first, (1,) * array.ndim)
            memory_space = h5s.create_simple((1,) * array.ndim) if array.ndim else h5s.create(h5s.SCALAR)
            dsid.write(memory_space, file_space, np.ascontiguousarray(array[first]).reshape((1,) * array.ndim))
        if not named:
            h5o.link(dsid, group.id, encoded, lcpl=self._lcpl(coding))
        return dsid


GZIP, ZSTD = "gzip", "zstd"
# HDF5 filter ids: deflate, shuffle, Fletcher-32, and zstd as hdf5plugin registers it.
_DEFLATE, _SHUFFLE, _FLETCHER32, _ZSTD = 1, 2, 3, 32015
_LEVELS = {GZIP: (range(10), 4), ZSTD: (range(1, 23), 3)}  # allowed, default (h5py's, zstd's)


def _is_integer(value) -> bool:
    """An int or numpy integer, not a bool (nor a float that happens to be whole)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Compression:
    """Chunked, filtered datasets (`save_model(..., compression=...)`): shuffle, then deflate or
    zstd, then optionally Fletcher-32, as h5py sets them up. The Rust core compresses the chunks
    on all cores; HDF5 is handed them ready to store (`write_direct_chunk`)."""

    codec: str | None = None  # None: stored as they are, only the checksum if asked
    level: int = 0
    chunk_bytes: int = 1 << 20
    checksum: bool = False

    @classmethod
    def from_arguments(cls, compression=None, compression_level=None, chunk_bytes=None, checksum=False):
        """The compression asked for, checked; None for none (the stock layout)."""
        if compression not in (None, GZIP, ZSTD):
            raise ValueError(f"`compression` must be None, 'gzip' or 'zstd'. Received: compression={compression!r}")
        if compression is None and compression_level is not None:
            raise ValueError("`compression_level` needs `compression='gzip'` or `'zstd'`")
        if not isinstance(checksum, bool):
            raise ValueError(f"`checksum` must be True or False. Received: checksum={checksum!r}")
        if compression is None and not checksum:
            if chunk_bytes is not None:
                raise ValueError("`chunk_bytes` needs `compression` or `checksum=True`")
            return None
        allowed, default = _LEVELS.get(compression, (range(1), 0))
        level = default if compression_level is None else compression_level
        if not _is_integer(level) or level not in allowed:
            raise ValueError(f"`compression_level` for {compression!r} must be in {allowed}. Received: {level!r}")
        chunk_bytes = 1 << 20 if chunk_bytes is None else chunk_bytes
        if not _is_integer(chunk_bytes) or not 0 < chunk_bytes < 1 << 32:
            raise ValueError(f"`chunk_bytes` must be an integer from 1 to 2**32 - 1. Received: {chunk_bytes!r}")
        return cls(compression, int(level), int(chunk_bytes), checksum)

    @property
    def filters(self) -> list[int]:
        codec = {GZIP: [_SHUFFLE, _DEFLATE], ZSTD: [_SHUFFLE, _ZSTD], None: []}[self.codec]
        return codec + ([_FLETCHER32] if self.checksum else [])

    def size_bound(self, plan: WeightsPlan) -> int:
        """More than the file can take: every tensor twice (a stored chunk is at most its raw
        bytes plus the codec's few bytes of framing; an edge chunk is padded to the chunk's size,
        at most the tensor's), 256 bytes a chunk (B-tree entry, framing, checksum), 8 KiB a dataset
        (its header and its chunk index's first B-tree node: ~4.5 KiB measured), 4 KiB a group,
        strings at their length, and 1 MiB of metadata."""
        total = 1 << 20
        for step in plan.steps:
            if isinstance(step, PlannedGroup):
                total += 4 << 10
            elif isinstance(step, PlannedDataset):
                array = step.array
                total += (8 << 10) + 2 * array.nbytes
                if step.compressible:
                    rows = self.chunk_shape(array.shape, array.dtype.itemsize)[0]
                    total += 256 * -(-array.shape[0] // rows)
                elif array.dtype.kind == "O":  # h5py stores each string, not the pointer
                    total += sum(64 + (len(x) if isinstance(x, bytes) else 4 * len(str(x))) for x in array.flat)
        return total

    def chunk_shape(self, shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
        """Whole rows along the first axis, about `chunk_bytes` each: every chunk is then one
        stretch of the array's memory, and only the last one is partial."""
        row = math.prod(shape[1:]) * itemsize
        if row >= 1 << 32:
            raise ValueError(f"a tensor of shape {shape} has rows too large for an HDF5 chunk (4 GiB)")
        return (max(1, min(shape[0], self.chunk_bytes // max(row, 1))), *shape[1:])


# Raw bytes handed to the Rust core per call when compressing, and how many raw bytes may wait
# compressed for HDF5 (besides a batch being compressed and one being stored).
_COMPRESS_BATCH = 16 << 20
_BYTES_AHEAD = 2 * _COMPRESS_BATCH


def _encoded_batches(array: np.ndarray, compression: Compression, threads: int):
    """One tensor's chunks as HDF5 stores them, `_COMPRESS_BATCH` raw bytes per call of the Rust
    core: ((each chunk's offset in the dataset, its stored bytes), the raw bytes compressed)."""
    chunks = compression.chunk_shape(array.shape, array.dtype.itemsize)
    flat, chunk_len = as_bytes(array), math.prod(chunks) * array.dtype.itemsize
    starts = list(range(0, flat.nbytes, chunk_len))
    per_call = max(1, _COMPRESS_BATCH // chunk_len)
    for first in range(0, len(starts), per_call):
        batch = starts[first : first + per_call]
        raw = [flat[b : b + chunk_len] for b in batch]
        if len(raw[-1]) < chunk_len:  # HDF5 stores an edge chunk whole; its tail is never read
            raw[-1] = np.concatenate([raw[-1], np.zeros(chunk_len - len(raw[-1]), np.uint8)])
        offsets = [(b // chunk_len * chunks[0],) + (0,) * (array.ndim - 1) for b in batch]
        stored = hdf5_encode_chunks(raw, compression.filters, compression.level, array.dtype.itemsize, threads)
        yield (offsets, stored), len(raw) * chunk_len


class _ChunksAhead:
    """Compresses every chunked tensor of a plan, in plan order, on one background thread (the Rust
    core, GIL released, on `threads` cores) while HDF5 stores the chunks compressed before them: the
    serial part of a compressed save (h5py, one chunk at a time) overlaps the compression.

    What waits for HDF5 is bounded by the raw bytes it holds compressed (a stored chunk may be far
    smaller than what it was compressed from, but never much larger), not by batches: a tensor's
    end or a small tensor's one batch would otherwise hold the compressor back while HDF5 stores a
    large batch."""

    def __init__(self, arrays: list[np.ndarray], compression: Compression, threads: int):
        self._ready: deque = deque()  # (item, its raw bytes): a batch, None (a tensor's end) or an error
        self._ahead = 0  # raw bytes of the batches in `_ready`
        self._changed = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(
            target=self._compress, args=(arrays, compression, threads), name="kerassave-compress", daemon=True
        )
        self._thread.start()

    def _compress(self, arrays: list[np.ndarray], compression: Compression, threads: int) -> None:
        try:
            for array in arrays:
                for batch, raw_bytes in _encoded_batches(array, compression, threads):
                    if not self._put(batch, raw_bytes):
                        return
                if not self._put(None):  # the tensor's end
                    return
        except BaseException as e:  # handed to the writer, which raises it
            self._put(e)

    def _put(self, item, size: int = 0) -> bool:
        with self._changed:
            while self._ahead and self._ahead + size > _BYTES_AHEAD and not self._stopped:
                self._changed.wait()
            if self._stopped:
                return False
            self._ready.append((item, size))
            self._ahead += size
            self._changed.notify_all()
            return True

    def _take(self):
        with self._changed:
            while not self._ready:
                self._changed.wait()
            item, size = self._ready.popleft()
            self._ahead -= size
            self._changed.notify_all()
            return item

    def batches(self) -> Iterator[tuple[list[tuple[int, ...]], list[bytes]]]:
        """The next tensor's chunks, batch by batch: (chunk offsets, what HDF5 stores for each)."""
        while (item := self._take()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._ready.clear()  # let go of now, not with this object (a failed save's traceback may keep it)
            self._changed.notify_all()
        self._thread.join()


def _create_compressed_dataset(
    group: h5py.Group, name: str | bytes, array: np.ndarray, compression: Compression, named: bool, ahead: _ChunksAhead
) -> h5d.DatasetID:
    """A chunked dataset as h5py makes one with the same filters, its chunks written already
    filtered (by `ahead`, whose next tensor this must be)."""
    encoded, lcpl = group._e(name, lcpl=True)
    chunks = compression.chunk_shape(array.shape, array.dtype.itemsize)
    codec = {GZIP: ("gzip", compression.level), ZSTD: (_ZSTD, (compression.level,)), None: (None, None)}
    dsid = make_new_dset(
        group,
        array.shape,
        array.dtype,
        name=encoded if named else None,
        chunks=chunks,
        compression=codec[compression.codec][0],
        compression_opts=codec[compression.codec][1],
        shuffle=compression.codec is not None,
        fletcher32=compression.checksum,
        allow_unknown_filter=True,  # zstd is written here; h5py needs hdf5plugin only to read it
        track_order=h5py.get_config().track_order,
    )
    for offsets, stored in ahead.batches():
        for offset, data in zip(offsets, stored, strict=True):
            dsid.write_direct_chunk(offset, data)
    if not named:
        h5o.link(dsid, group.id, encoded, lcpl=lcpl)
    return dsid


def _write_as_stock(group: h5py.Group, step: PlannedDataset) -> None:
    if not step.created:
        group[step.name] = step.array
        return
    dataset = group.create_dataset(step.name, step.array.shape, dtype=step.array.dtype)
    dataset[() if not step.array.shape else slice(None)] = step.array


def _parent_and_leaf(group: h5py.Group, step: PlannedDataset) -> tuple[h5py.Group, str | bytes]:
    """Where a dataset goes, and its name there. `group.create_dataset("a/b/name", ...)` (legacy
    `.h5`) makes the parents from the name as h5py encodes it, bytes: their links are ASCII-coded
    whatever the name holds (a UTF-8-coded link would make HDF5 turn the group into a new-style one)."""
    if not step.created:
        return group, step.name
    name = group._e(step.name)
    if b"/" in name.lstrip(b"/"):
        parent, name = name.rsplit(b"/", 1)
        return group.require_group(parent), name
    return group, name


def write_skeleton(
    target: str | SparseImage | FileWindow,
    plan: WeightsPlan,
    compression: Compression | None = None,
    threads: int = 0,
    alignment: int = 1,
    on_placed: Callable[[int, np.ndarray], None] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Writes the HDF5 file's metadata to `target`; returns (offset, array) of each reserved tensor,
    also handed to `on_placed` as soon as HDF5 has placed it.

    With `alignment` > 1, HDF5 places everything it allocates, every tensor's bytes included, at a
    multiple of it (`H5Pset_alignment`): a file a mapped load can hand to variables without a copy.

    `target` is what stock gives h5py: a path for a `.weights.h5` file (HDF5's POSIX driver), a file
    object for the member of a `.keras` zip (h5py's file-object driver) -- the two lay files out differently.
    With `compression`, every tensor with more than one element is written here, chunked; scalars
    are returned as without it (HDF5 wrote their one element already).
    """
    placed: list[tuple[int, np.ndarray]] = []
    aligned = {"alignment_threshold": 1, "alignment_interval": alignment} if alignment > 1 else {}
    compressed_arrays = [
        d.array for d in plan.steps if isinstance(d, PlannedDataset) and compression is not None and d.compressible
    ]
    ahead = _ChunksAhead(compressed_arrays, compression, threads) if compressed_arrays else None
    with contextlib.ExitStack() as stack:
        if ahead is not None:
            stack.callback(ahead.close)  # also when HDF5 fails: the thread stops, the arrays are let go
        f = stack.enter_context(h5py.File(target, "w", **aligned))
        reserved = _ReservedDatasets()
        group, group_path = f, ""  # the group the last steps went to, and its path (`Group.name` asks HDF5)
        made = {"": f}  # groups made here, by path: asking HDF5 whether a parent exists costs more
        for step in plan.steps:
            if isinstance(step, PlannedGroup):
                parent, _, leaf = step.path.rpartition("/")
                into = made[parent] if parent in made else f.require_group(parent)
                group = made[step.path] = into.create_group(leaf)
                group_path = step.path
                for key, value in (step.attrs or {}).items():
                    group.attrs[key] = value
                continue
            if isinstance(step, PlannedAttribute):
                (f[step.path] if step.path else f).attrs[step.name] = step.value
                continue
            if group_path != step.group:
                group, group_path = (f[step.group] if step.group else f), step.group
            compressed = compression is not None and step.compressible
            if not step.reserved and not compressed:  # strings and other objects: written by h5py as stock does
                _write_as_stock(group, step)
                continue
            keras_bfloat16 = step.array.dtype == BFLOAT16 and step.reserved  # Keras 3's bf16 + attribute
            parent_group, leaf = _parent_and_leaf(group, step)
            named = keras_bfloat16 or step.created
            if compressed:
                dsid = _create_compressed_dataset(parent_group, leaf, step.array, compression, named, ahead)
            else:
                dsid = reserved.create(parent_group, leaf, step.array, named=named)
            if keras_bfloat16:
                h5py.Dataset(dsid).attrs["dtype"] = "bfloat16"
            offset = dsid.get_offset()  # None for a chunked dataset
            if offset is not None and step.array.nbytes:
                placed.append((offset, step.array))
                if on_placed is not None:
                    on_placed(offset, step.array)
    return placed


@dataclass(frozen=True)
class Layout:
    """Where a plan's bytes go in its HDF5 file: each tensor's offset, and every other byte (the
    metadata h5py wrote, zeros where it wrote nothing). The same plan always gets the same layout."""

    size: int
    tensor_offsets: tuple[int, ...]
    metadata: tuple[tuple[int, bytes], ...]  # (offset, bytes): everything between the tensors


# Repeated checkpoints of one architecture reuse its layout instead of running h5py again.
_LAYOUTS: OrderedDict[tuple, Layout] = OrderedDict()
_LAYOUTS_LOCK = threading.Lock()
# Bounded by the metadata they hold (the keys repeat its attributes), not by count: a sharded save
# has one layout per shard, and dropping them would run h5py for every shard of every save.
_MAX_LAYOUT_BYTES = 32 << 20


def _held(layout: Layout) -> int:
    return sum(len(data) for _, data in layout.metadata)


def _layout_key(plan: WeightsPlan, driver: str, alignment: int) -> tuple | None:
    """Everything h5py's layout depends on, or None when h5py writes bytes of its own (strings)."""
    key: list = [driver, alignment, h5py.version.version, h5py.version.hdf5_version, h5py.get_config().track_order]
    for step in plan.steps:
        if isinstance(step, PlannedGroup):
            attrs = tuple((k, _attribute_key(v)) for k, v in (step.attrs or {}).items())
            key.append(("group", step.path, attrs))
        elif isinstance(step, PlannedAttribute):
            key.append(("attribute", step.path, step.name, _attribute_key(step.value)))
        elif step.reserved:
            # A reserved dataset's dtype is a number or bfloat16: its `str` tells them all apart
            key.append(("dataset", step.group, step.name, step.created, step.array.shape, step.array.dtype.str))
        else:
            return None
    return tuple(key)


def _attribute_key(value) -> tuple:
    """An attribute value, exactly (numpy's repr of a long array elides its middle)."""
    if isinstance(value, np.ndarray):
        return ("ndarray", value.dtype.str, repr(value.dtype.metadata), value.shape, value.tobytes())
    if type(value) in (str, bytes):  # as it is: `model_config` is ~1 MB on large models
        return (type(value).__name__, value)
    return (type(value).__name__, repr(value))


OnPlaced = Callable[[int, np.ndarray], None] | None  # told each tensor's offset as HDF5 places it

# HDF5's drivers lay the same calls out differently: stock writes a `.keras` member through h5py's
# file-object driver and a `.weights.h5` file through the POSIX one, so each gets the driver stock uses.
FILE_OBJECT, POSIX = "fileobj", "sec2"


def _gaps(placed: list[tuple[int, np.ndarray]], size: int) -> list[tuple[int, int]]:
    """The (start, end) stretches of a `size`-byte file that no placed tensor covers."""
    gaps, cursor = [], 0
    for start, end in sorted((o, o + a.nbytes) for o, a in placed):
        if start > cursor:
            gaps.append((cursor, start))
        cursor = max(cursor, end)
    if size > cursor:
        gaps.append((cursor, size))
    return gaps


def _lay_out_in_memory(
    plan: WeightsPlan, alignment: int, on_placed: OnPlaced
) -> tuple[int, list[tuple[int, np.ndarray]], list[bytes]]:
    """h5py's file-object driver over an in-memory image, or its layout replayed by the Rust core
    without h5py when the replay covers the plan."""
    laid_out = _replayed_layout(plan, posix=False) if alignment == 1 else None
    if laid_out is not None:
        return _placed(laid_out, on_placed)
    image = SparseImage()
    placed = write_skeleton(image, plan, None, 0, alignment, on_placed)
    return image.size, placed, _between_tensors(placed, image.size, image.writes)


def _placed(
    laid_out: tuple[int, list[tuple[int, np.ndarray]], list[bytes]], on_placed: OnPlaced
) -> tuple[int, list[tuple[int, np.ndarray]], list[bytes]]:
    """A replayed layout, each of its tensors handed to `on_placed`."""
    if on_placed is not None:
        for offset, array in laid_out[1]:
            on_placed(offset, array)
    return laid_out


def _replayed_layout(plan: WeightsPlan, posix: bool) -> tuple[int, list[tuple[int, np.ndarray]], list[bytes]] | None:
    """What h5py would write for the plan through its file-object driver (or libhdf5's POSIX one),
    laid out by the Rust core's replay of libhdf5 (`rust/hdf5/layout.rs`): (size, (offset, array)
    of each tensor with bytes, the bytes between them). None when h5py must lay it out: this h5py's
    libhdf5 is not the one replayed, h5py tracks creation order, a step the replay does not cover
    (an attribute value `_attribute_value` does not take, a dataset h5py writes itself, a name or
    string that is not ASCII, an HDF5 type other than numbers, an object libhdf5's metadata cache
    may have written early that later moves or takes a name)."""
    if h5py.version.hdf5_version != HDF5_LAID_OUT_VERSION or h5py.get_config().track_order:
        return None
    steps: list[tuple] = []
    for step in plan.steps:
        names = (step.group, step.name) if isinstance(step, PlannedDataset) else (step.path, getattr(step, "name", ""))
        if not all(type(n) is str for n in names):  # h5py takes bytes too, and encodes them otherwise
            return None
        if isinstance(step, PlannedGroup):
            attrs = step.attrs or {}
            if len(attrs) > 1 or not all(type(v) is str for v in attrs.values()):  # not numpy's str_
                return None
            steps.append((step.path, "", None, next(iter(attrs.items()), None), False))
        elif isinstance(step, PlannedAttribute):
            value = _attribute_value(step.value)
            if value is None:
                return None
            steps.append((step.path, step.name, value))
        elif isinstance(step, PlannedDataset) and step.reserved:
            dtype = step.array.dtype
            bfloat16 = dtype == BFLOAT16  # opaque words, and Keras 3 marks it with a `dtype` attribute
            if not dtype.isnative or dtype.byteorder not in "=<|" or (dtype.kind == "V" and not bfloat16):
                return None
            element = (dtype.kind, dtype.itemsize, step.array.shape)
            attribute = ("dtype", "bfloat16") if bfloat16 else None
            steps.append((step.group, step.name, element, attribute, step.created))
        else:
            return None
    laid_out = hdf5_lay_out(steps, posix)
    if laid_out is None:
        return None
    size, offsets, between = laid_out
    tensors = [d.array for d in plan.datasets if d.array.nbytes]
    return size, list(zip(offsets, tensors, strict=True)), [data for _, data in between]


def _attribute_value(value) -> tuple[str, list[bytes], int] | None:
    """An attribute value as `hdf5_lay_out` takes it, for the types h5py stores as the legacy
    writers use them: `str` and `bytes` (a variable-length string), a list of `bytes` (an array of
    them), an empty list (numpy's empty float64 array), a 1-D numpy array of `S{n}`; else None."""
    if type(value) is str:
        return ("str", [value.encode("utf-8", "surrogatepass")], 0)
    if type(value) is bytes:
        return ("bytes", [value], 0)
    if type(value) is list:
        if not value:
            return ("empty", [], 0)
        if all(type(v) is bytes for v in value):
            return ("list", value, 0)
        return None
    # (not h5py's `string_dtype`: its metadata may make the strings UTF-8)
    if type(value) is np.ndarray and value.dtype.kind == "S" and value.dtype.metadata is None and value.ndim == 1:
        width = value.dtype.itemsize
        data = value.tobytes()
        return ("fixed", [data[i : i + width] for i in range(0, len(data), width)], width)
    return None


def _between_tensors(placed: list[tuple[int, np.ndarray]], size: int, writes) -> list[bytes]:
    """The bytes between the tensors: `writes` (offset, bytes) replayed in order (writes inside a
    tensor's stretch, the element that made HDF5 allocate it, are dropped: the tensor's own bytes go there)."""
    gaps = _gaps(placed, size)
    starts = [g for g, _ in gaps]
    contents = [bytearray(end - start) for start, end in gaps]
    for offset, data in writes:
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        while i < len(gaps) and gaps[i][0] < offset + len(data):
            lo, hi = max(gaps[i][0], offset), min(gaps[i][1], offset + len(data))
            if lo < hi:
                contents[i][lo - gaps[i][0] : hi - gaps[i][0]] = data[lo - offset : hi - offset]
            i += 1
    return [bytes(c) for c in contents]


def _lay_out_on_scratch(
    plan: WeightsPlan, alignment: int, on_placed: OnPlaced
) -> tuple[int, list[tuple[int, np.ndarray]], list[bytes]]:
    """HDF5's POSIX driver writing a scratch file in memory-backed /dev/shm (sparse: the tensors'
    stretches are never written); the bytes between the tensors are read back from it. h5py never
    writes where the user's file goes, so a full disk there is a clean `OSError` from the Rust core.
    When the Rust core's replay of that driver covers the plan, h5py does not run."""
    laid_out = _replayed_layout(plan, posix=True) if alignment == 1 else None
    if laid_out is not None:
        return _placed(laid_out, on_placed)
    directory = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and limit < sum(d.array.nbytes for d in plan.datasets):
        # The sparse scratch file is as long as the model: let no write of libhdf5's fail (it may crash).
        raise OSError(errno.EFBIG, "the model is larger than the file size limit (RLIMIT_FSIZE)")
    fd, scratch = tempfile.mkstemp(prefix="kerassave-layout-", suffix=".h5", dir=directory)
    try:
        os.close(fd)
        placed = write_skeleton(scratch, plan, None, 0, alignment, on_placed)
        with open(scratch, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            contents = [os.pread(f.fileno(), end - start, start) for start, end in _gaps(placed, size)]
    finally:
        os.unlink(scratch)
    return size, placed, contents


def _lay_out(
    plan: WeightsPlan, driver: str, alignment: int, on_placed: OnPlaced = None
) -> tuple[Layout, list[np.ndarray]]:
    """Runs h5py with `driver`; returns the layout and the tensors in its order."""
    lay_out = _lay_out_on_scratch if driver == POSIX else _lay_out_in_memory
    size, placed, contents = lay_out(plan, alignment, on_placed)
    metadata = tuple((start, data) for (start, _), data in zip(_gaps(placed, size), contents, strict=True))
    return Layout(size, tuple(o for o, _ in placed), metadata), [a for _, a in placed]


def remembered_layout(plan: WeightsPlan, driver: str = FILE_OBJECT, alignment: int = 1) -> Layout | None:
    """The layout an earlier save of the same plan made (each tensor at a multiple of `alignment`
    if above 1: the file must then start at one), or None."""
    key = _layout_key(plan, driver, alignment)
    if key is None:
        return None
    with _LAYOUTS_LOCK:
        layout = _LAYOUTS.get(key)
        if layout is not None:
            _LAYOUTS.move_to_end(key)
    return layout


def laid_out_by_shapes(plan: WeightsPlan) -> bool:
    """Whether the plan's layout depends on its tensors' shapes and dtypes alone: HDF5 only reserves
    room for each (a plan of stand-ins of the same shapes lays the file out the same; h5py writes
    the bytes of any other dataset itself, into the metadata)."""
    return all(d.reserved for d in plan.datasets)


def reserved_tensors(plan: WeightsPlan) -> list[np.ndarray]:
    """The tensors whose bytes the Rust core writes, in the layout's order."""
    return [d.array for d in plan.datasets if d.reserved and d.array.nbytes]


def make_layout(
    plan: WeightsPlan, driver: str = FILE_OBJECT, alignment: int = 1, on_placed: OnPlaced = None
) -> tuple[Layout, list[np.ndarray]]:
    """Lays the plan out with h5py (`on_placed` is told each tensor's offset as soon as it is
    known) and remembers the layout for the next save of the same plan."""
    layout, tensors = _lay_out(plan, driver, alignment, on_placed)
    key = _layout_key(plan, driver, alignment)
    if key is not None:
        with _LAYOUTS_LOCK:
            _LAYOUTS[key] = layout
            held = sum(_held(kept) for kept in _LAYOUTS.values())
            while held > _MAX_LAYOUT_BYTES and len(_LAYOUTS) > 1:
                held -= _held(_LAYOUTS.popitem(last=False)[1])
    return layout, tensors


def _write_rest(file: TensorFile, start: int, layout: Layout, segments: list, known: list, threads: int) -> int:
    """Writes `segments` (offset in the HDF5 file, bytes) and the layout's metadata at `start` of
    `file`; returns the file's CRC-32, joined from theirs and the `known` (file offset, length, CRC-32)."""
    segments = segments + [(o, np.frombuffer(data, np.uint8)) for o, data in layout.metadata]
    crcs = file.write_tensors([start + o for o, _ in segments], [b for _, b in segments], threads)
    known = sorted(known + [(start + o, b.nbytes, c) for (o, b), c in zip(segments, crcs, strict=True)])
    return file.crc32(start, layout.size, known, threads)


def write_layout(file: TensorFile, start: int, layout: Layout, tensors: list[np.ndarray], threads: int = 0) -> int:
    """Writes the HDF5 file at `start` of `file` (a zip member), metadata and tensors in one
    parallel call; returns its CRC-32, joined from the CRCs of the pieces as they were written."""
    segments = [(o, as_bytes(a)) for o, a in zip(layout.tensor_offsets, tensors, strict=True)]
    return _write_rest(file, start, layout, segments, [], threads)


_STREAM_BATCH = 32 << 20


class StreamedWrite:
    """A first save's tensors written at `start` of `file` while h5py lays the file out: each one
    as soon as HDF5 has placed it (`place`, h5py's `on_placed`), on a background thread (the Rust
    core releases the GIL), instead of all of them once the layout is done.

    Use it as a context manager: leaving it, however, waits for the thread (nothing is left
    writing into a file being closed); `finish` completes the file.
    """

    def __init__(self, file: TensorFile, start: int, threads: int = 0):
        self.start = start
        self._file, self._threads = file, threads
        self._placed: queue.SimpleQueue = queue.SimpleQueue()  # batches of (offset, array), then None
        self._batch: list[tuple[int, np.ndarray]] = []
        self._batch_bytes = 0
        self._written: list[tuple[int, int, int]] = []  # (file offset, length, CRC-32) of each tensor
        self._error: BaseException | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._write, name="kerassave-streamed-write", daemon=True)
        self._thread.start()

    def place(self, offset: int, array: np.ndarray) -> None:
        # Handed over in batches of _STREAM_BATCH bytes: each wakes the writing thread, which then
        # takes the GIL from h5py's thread (hundreds of small handovers would slow h5py down).
        self._batch.append((offset, array))
        self._batch_bytes += array.nbytes
        if self._batch_bytes >= _STREAM_BATCH:
            self.flush()

    def flush(self) -> None:
        """Hands over the tensors placed so far now."""
        if self._batch:
            self._placed.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def _write(self) -> None:
        ended = False
        while not ended:
            # Every batch queued meanwhile joins the first in one call: each call takes the GIL back
            # from a thread serializing the config, which may hold it for a switch interval (5 ms).
            batches = [self._placed.get()]
            while not self._placed.empty():
                batches.append(self._placed.get())
            ended = batches[-1] is None
            batch = [placed for b in batches if b is not None for placed in b]
            if self._error is not None or not batch:
                continue
            try:
                buffers = [as_bytes(a) for _, a in batch]
                crcs = self._file.write_tensors([self.start + o for o, _ in batch], buffers, self._threads)
                self._written += [
                    (self.start + o, b.nbytes, c) for (o, _), b, c in zip(batch, buffers, crcs, strict=True)
                ]
            except BaseException as e:  # raised by `finish`
                self._error = e

    def wait(self) -> None:
        """Returns once every tensor placed so far is written (or failed to be)."""
        if not self._ended:
            self._ended = True
            self.flush()
            self._placed.put(None)
            self._thread.join()

    def finish(self, layout: Layout) -> int:
        """Waits for the tensors, writes the layout's metadata; returns the file's CRC-32."""
        self.wait()
        if self._error is not None:
            raise self._error
        return _write_rest(self._file, self.start, layout, [], self._written, self._threads)

    def __enter__(self) -> StreamedWrite:
        return self

    def __exit__(self, *exc) -> None:
        self.wait()


def placing(streamed: StreamedWrite, layout: Layout) -> Callable[[PlannedDataset], None]:
    """What hands each dataset of a plan, in its order, to `streamed` at its offset in `layout`."""
    offsets = iter(layout.tensor_offsets)

    def place(dataset: PlannedDataset) -> None:
        if dataset.reserved and dataset.array.nbytes:
            streamed.place(next(offsets), dataset.array)

    return place


def write_replayed(file: TensorFile, replay, threads: int = 0, alignment: int = 1) -> bool:
    """Writes a `.weights.h5` of a remembered walk (`keras3.state.Replay`) into `file`, each snapshot
    as soon as it is taken, where an earlier save of the same plan left its layout, and checks the
    walk while they are written. False if it could not (no layout, the walk no longer holds):
    `file` may then hold stray bytes."""
    layout = remembered_layout(replay.template, POSIX, alignment)
    if layout is None:
        return False
    with StreamedWrite(file, 0, threads) as streamed:
        plan = replay.plan(placing(streamed, layout))
        streamed.flush()
        if plan is None or not replay.holds():
            return False
        streamed.finish(layout)
    return True


def write_weights_file(
    destination: Destination,
    plan: WeightsPlan,
    threads: int = 0,
    compression: Compression | None = None,
    alignment: int = 1,
) -> None:
    """Writes an HDF5 file (`.weights.h5`, legacy `.h5`) laid out as stock's is (HDF5's POSIX driver), metadata and
    tensors in one parallel call of the Rust core; compressed, h5py writes it through the save's descriptor."""
    if compression is not None:
        write_compressed(destination.file, 0, plan, compression, threads, alignment)
        return
    layout = remembered_layout(plan, POSIX, alignment)
    if layout is not None:
        write_layout(destination.file, 0, layout, reserved_tensors(plan), threads)
        return
    with StreamedWrite(destination.file, 0, threads) as streamed:
        layout, _ = make_layout(plan, POSIX, alignment, streamed.place)
        streamed.finish(layout)


def write_plan(
    plan: WeightsPlan,
    filepath: str,
    threads: int = 0,
    compression: Compression | None = None,
    alignment: int = 1,
) -> None:
    """Writes `filepath` as an HDF5 file of `plan`, replacing any old file only when complete."""
    with atomic_replace(filepath) as destination:
        write_weights_file(destination, plan, threads, compression, alignment)


def write_compressed(
    file: TensorFile, start: int, plan: WeightsPlan, compression: Compression, threads: int = 0, alignment: int = 1
) -> int:
    """Writes the plan as an HDF5 file with chunked, filtered tensors at `start` of `file`, through
    h5py's file-object driver (its size depends on the data: no layout is remembered); returns its size."""
    window = FileWindow(file.fileno(), start, file.path)
    # What stays contiguous (scalars, booleans, complex numbers) HDF5 only reserved, writing each
    # one's first element: the rest of their bytes are written here.
    try:
        placed = write_skeleton(window, plan, compression, threads, alignment)
    except OSError as e:
        if window.failure is None:
            raise
        raise window.failure from e
    if placed:
        file.write_tensors([start + offset for offset, _ in placed], [as_bytes(a) for _, a in placed], threads)
    return window.size


@dataclass
class StoredTensor:
    """A dataset whose bytes lie contiguous and unfiltered in the file, readable by offset, or
    chunked with filters the Rust core undoes (`chunking`, as `hdf5_stored_datasets` lists it)."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    chunking: tuple | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _as_stored_tensor(h5: h5py.File, name: bytes) -> StoredTensor | None:
    dsid = h5d.open(h5.id, name)
    plist = dsid.get_create_plist()
    if plist.get_layout() != h5d.CONTIGUOUS or plist.get_nfilters() or plist.get_external_count():
        return None
    space = dsid.get_space()
    if space.get_simple_extent_type() == h5s.NULL:
        return None
    dtype = dsid.dtype
    if dtype.kind == "V" and dtype.itemsize == 2 and h5py.Dataset(dsid).attrs.get("dtype") == "bfloat16":
        dtype = BFLOAT16
    elif _untagged_opaque(dsid):  # read as h5py reads it ("|V2": the legacy writers' bfloat16)
        pass
    elif dtype.kind not in "biufc" or not dtype.isnative:
        return None
    offset = dsid.get_offset()
    if offset is None:
        return None  # never written: h5py reads fill values
    tensor = StoredTensor("/" + name.decode("utf-8", "surrogateescape"), offset, space.shape, dtype)
    return tensor if dsid.get_storage_size() == tensor.nbytes else None


def _untagged_opaque(dsid: h5d.DatasetID) -> bool:
    file_type = dsid.get_type()  # the sizes the Rust listing takes (rust/hdf5/reader.rs, untagged_opaque)
    return file_type.get_class() == h5t.OPAQUE and not file_type.get_tag() and file_type.get_size() in (1, 2, 4, 8, 16)


def _listed_by_h5py(h5: h5py.File) -> list[StoredTensor]:
    names: list[bytes] = []

    def visit(name: bytes, info) -> None:
        if info.type == h5o.TYPE_DATASET:
            names.append(name)

    # Each object once, through hard links only. A file libhdf5 cannot visit whole is refused here
    # (its `RuntimeError`), where stock, reading by path, may fail otherwise or load it: its datasets
    # would go unchecked for overlaps and bounds, and a damaged address would load other bytes.
    h5o.visit(h5.id, visit, info=True)
    return [t for t in (_as_stored_tensor(h5, n) for n in names) if t is not None and t.nbytes]


def read_chunked(source: TensorFile | bytes, start: int, items: list, where: str, threads: int = 0) -> list:
    """`TensorFile.read_chunked` of the HDF5 file at `start` of `source`, a file or its bytes
    (a compressed zip member, inflated), errors naming `where`."""
    if not items:
        return []
    if isinstance(source, TensorFile):
        return source.read_chunked(start, items, threads)
    return hdf5_read_chunked(source, start, items, where, threads)


def listed_by_rust(
    source: TensorFile | bytes, start: int, size: int, pages: dict[int, bytes] | None = None, path: str | None = None
) -> list[StoredTensor] | None:
    """The Rust core's listing (no libhdf5, a fraction of the cost per dataset), or None for a
    file it cannot walk (h5py lists that one, and stock's errors follow). A file corrupted in a way
    libhdf5 does not survive (it hangs) is refused with `KerasSaveError` before h5py reads it.
    `pages` receives the 4 KiB pages of the file the walk read; `path` names `source`'s bytes in errors."""
    found = hdf5_stored_datasets(source, start, size, pages, path)
    if found is None:
        return None
    return [
        StoredTensor(name, offset, tuple(shape), BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype), chunking)
        for name, offset, shape, dtype, chunking in found
    ]


@dataclass
class Listed:
    """The Rust core's listing of an HDF5 file, made before h5py opens it: its tensors (None when
    it cannot walk the file: h5py lists them then), and the region h5py reads through (if any),
    holding the pages the listing read, so h5py is served them without reading them again."""

    tensors: list[StoredTensor] | None
    region: FileRegion | None = None


def list_before_opening(
    source: TensorFile | bytes, start: int, size: int, region: FileRegion | None, path: str | None = None
) -> Listed:
    """Lists the HDF5 file at `start` of `source` and seeds `region` (the same file as h5py will
    read it) with the pages read meanwhile: each page of metadata is read once per load. `path`
    names `source`'s bytes in errors."""
    pages: dict[int, bytes] | None = {} if region is not None else None
    tensors = listed_by_rust(source, start, size, pages, path)
    if region is not None:
        region.seed(pages)
    return Listed(tensors, region)


def stored_tensors(
    h5: h5py.File,
    size: int,
    where: str,
    source: TensorFile | bytes | None = None,
    start: int = 0,
    listed: Listed | None = None,
) -> list[StoredTensor]:
    """Every dataset readable by offset, checked to lie inside the file's `size` bytes without
    overlap. Listed by the Rust core (`listed` already, or now from `source`, the HDF5 file at
    `start`) when it can, else by h5py."""
    if listed is not None:
        found = listed.tensors
    else:
        found = listed_by_rust(source, start, size, path=where) if source is not None else None
    if found is None:
        found = _listed_by_h5py(h5)
    if source is None:  # listed by h5py: it reads the chunks
        found = [t for t in found if t.chunking is None]
    chunked = [t for t in found if t.chunking is not None]  # the Rust core checked their chunks
    found = sorted((t for t in found if t.chunking is None), key=lambda t: t.offset)
    end_of_previous, previous = 0, None
    for tensor in found:
        if tensor.offset + tensor.nbytes > size:
            raise KerasSaveError(
                f"{where}: dataset '{tensor.name}' needs bytes {tensor.offset}..{tensor.offset + tensor.nbytes} "
                f"but the weights file has {size} bytes (truncated or corrupted)"
            )
        if tensor.offset < end_of_previous:
            raise KerasSaveError(f"{where}: datasets '{previous}' and '{tensor.name}' overlap (corrupted file)")
        end_of_previous, previous = tensor.offset + tensor.nbytes, tensor.name
    return found + chunked


_IEEE_FLOATS = (h5t.IEEE_F16LE, h5t.IEEE_F16BE, h5t.IEEE_F32LE, h5t.IEEE_F32BE, h5t.IEEE_F64LE, h5t.IEEE_F64BE)


def consistent(dataset: h5py.Dataset) -> h5py.Dataset:
    """`dataset`, unless it is contiguous and its datatype or shape was damaged: a float of no IEEE
    layout (libhdf5 would convert its bytes into other numbers), or stored bytes that are neither
    none (fill values) nor exactly its shape times its element size (libhdf5 would read past them,
    into the next tensor's, or short of them). Stock loads such a file, wrong."""
    plist = dataset.id.get_create_plist()
    if plist.get_layout() != h5d.CONTIGUOUS or plist.get_external_count() or dataset.shape is None:
        return dataset
    file_type = dataset.id.get_type()
    if file_type.get_class() == h5t.FLOAT and not any(file_type.equal(t) for t in _IEEE_FLOATS):
        raise KerasSaveError(
            f"{dataset.file.filename}: dataset '{dataset.name}' has a floating-point type of no standard "
            "layout (corrupted file: HDF5 would convert its bytes into other numbers)"
        )
    stored = dataset.id.get_storage_size()
    declared = math.prod(dataset.shape) * file_type.get_size()
    if stored not in (0, declared):
        raise KerasSaveError(
            f"{dataset.file.filename}: dataset '{dataset.name}' stores {stored} bytes but its shape and "
            f"type need {declared} (corrupted file)"
        )
    return dataset


class ReadAhead:
    """An HDF5 file open for reading through one descriptor: h5py (`.h5`) sees its metadata, every
    page read once, while the Rust core reads the tensors in the background (`tensors`, {dataset
    path: array}, waits for them). Use through `read_ahead`."""

    def __init__(self, h5: h5py.File, region: FileRegion, reading: Future[ReadTensors]):
        self.h5 = h5
        self._region = region
        self._reading = reading
        self._tensors: dict[str, np.ndarray] | None = None

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        if self._tensors is None:
            read = self._reading.result()
            # From now on h5py sees bytes consistent with the tensors as read (HDF5 keeps no checksum:
            # the bytes between them, compressed chunks included, need not be read again for one).
            self._region.freeze([(offset, data) for offset, data, _ in read.stretches], checksums=False)
            self._tensors = read.arrays
        return self._tensors


@contextlib.contextmanager
def read_ahead(filepath: str, threads: int = 0, mapped: bool = False) -> Iterator[ReadAhead]:
    """Opens an HDF5 file (`.weights.h5`, legacy `.h5`) for loading; refuses it at the end if it
    changed meanwhile (HDF5 keeps no checksum: its size and times tell). `mapped`: aligned tensors
    are arrays over a private map of the file (see mapped.py)."""
    file = TensorFile(filepath)
    before = os.fstat(file.fileno())
    region = FileRegion(file.fileno(), 0, before.st_size, filepath)
    mapping = Mapping(file) if mapped else None
    listed = list_before_opening(file, 0, before.st_size, region)
    with h5py.File(region, "r") as h5:
        reading = read_weights(h5, file, 0, before.st_size, filepath, threads, mapping, listed)
        opened = ReadAhead(h5, region, reading)
        yield opened
        opened.tensors  # noqa: B018 -- the checks of `freeze`, even if nothing asked for the tensors
    if mapped:
        refuse_if_replaced(filepath, file.fileno(), before)
    elif changed(before, os.fstat(file.fileno())):
        raise KerasSaveError(f"{filepath}: the file changed while it was being read")


@dataclass
class ReadTensors:
    """Tensors read by offset: {dataset name: array}, and (offset in the HDF5 file, bytes as read,
    CRC-32 or None for a tensor over a mapping) of each one read from a file, in file order (empty
    when they came from memory already checked); (offset, stored length, CRC-32) of each compressed
    chunk read from a file."""

    arrays: dict[str, np.ndarray]
    stretches: list[tuple[int, memoryview, int]]
    chunks: list[tuple[int, int, int]] = field(default_factory=list)


def read_weights(
    h5: h5py.File,
    source: TensorFile | bytes,
    start: int,
    size: int,
    where: str,
    threads: int,
    mapping: Mapping | None = None,
    listed: Listed | None = None,
) -> Future[ReadTensors]:
    """Reads every by-offset dataset into its own aligned array, in the background.

    Lists the datasets now (or takes `listed`), then moves the bytes on a thread (the Rust core
    releases the GIL), so the caller can build the model meanwhile. With a `mapping` of `source`,
    aligned tensors are arrays over it instead (nothing read); tensors lying within pages the
    listing read are copied from them (read once); the others are read.
    """
    found = stored_tensors(h5, size, where, source, start, listed)
    mapped = {}
    if mapping is not None:
        for t in found:
            if t.chunking is None and (array := mapping.array(start + t.offset, t.shape, t.dtype)) is not None:
                mapped[t.name] = array
    arrays = {t.name: mapped[t.name] if t.name in mapped else aligned_empty(t.shape, t.dtype) for t in found}
    by_offset = [t for t in found if t.chunking is None]  # in file order
    region = listed.region if listed is not None else None  # None for a member inflated in memory
    paged = set()  # served from the region's pages: h5py's bytes, checked with them, not tensors apart
    for t in by_offset:
        if region is not None and t.name not in mapped and region.copy_if_held(t.offset, as_bytes(arrays[t.name])):
            paged.add(t.name)
    tensors = [t for t in by_offset if t.name not in mapped and t.name not in paged]  # read
    buffers = [as_bytes(arrays[t.name]) for t in tensors]
    chunked = [(t, as_bytes(arrays[t.name])) for t in found if t.chunking is not None]
    future: Future[ReadTensors] = Future()

    def read() -> None:
        try:
            stretches, chunks_read = [], []
            items = [(t.name, t.chunking, t.shape, t.dtype.itemsize, b) for t, b in chunked]
            if isinstance(source, TensorFile):
                crcs = source.read_tensors([start + t.offset for t in tensors], buffers, threads)
                crc_of = {t.name: c for t, c in zip(tensors, crcs, strict=True)}  # a mapped tensor's is not known
                stretches = [
                    (t.offset, memoryview(as_bytes(arrays[t.name])), crc_of.get(t.name))
                    for t in by_offset
                    if t.name not in paged
                ]
                chunks_read = sorted(read_chunked(source, start, items, where, threads))
            else:  # an inflated (DEFLATED) member already in memory, its CRC checked as inflated
                for t, buffer in zip(tensors, buffers, strict=True):
                    buffer[:] = np.frombuffer(source, np.uint8, t.nbytes, start + t.offset)
                read_chunked(source, start, items, where, threads)
            future.set_result(ReadTensors(arrays, stretches, chunks_read))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=read, name="kerassave-reader", daemon=True).start()
    return future
