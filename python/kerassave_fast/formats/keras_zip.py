"""The Keras v3 `.keras` zip: `metadata.json`, `config.json`, `model.weights.h5`, `assets/...`.

Members are framed exactly as `zipfile` frames them for stock Keras (keras/src/saving/saving_lib.py,
`_save_model_to_fileobj`). `model.weights.h5` is STORED, so its HDF5 bytes sit verbatim in the zip:
tensors are written to and read from their offsets inside it, with no temporary `.h5` and no copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
import time
import warnings
import weakref
import zipfile
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass

import h5py
from keras.src.saving import saving_lib
from keras.src.utils import file_utils

from .._core import ZIP64_LIMIT, BadKerasZipFile, KerasSaveError, TensorFile, ZipArchive, ZipWriter
from ..asynchronous import Write
from ..files import FileRegion, atomic_replace
from ..keras3 import state as keras3_state
from ..mapped import BACKGROUND, Mapping, refuse_if_replaced, verify_in_background
from .weights_h5 import (
    Compression,
    Listed,
    ReadTensors,
    StreamedWrite,
    WeightsPlan,
    laid_out_by_shapes,
    list_before_opening,
    make_layout,
    placing,
    read_weights,
    remembered_layout,
    reserved_tensors,
    write_compressed,
    write_layout,
)
from .zip_members import member_name

CONFIG = saving_lib._CONFIG_FILENAME
METADATA = saving_lib._METADATA_FILENAME
WEIGHTS = saving_lib._VARS_FNAME_H5
ASSETS = saving_lib._ASSETS_DIRNAME

# What `zipfile` records for members written from memory: `ZipInfo`'s default date for
# `zf.open(name, "w")`, the current time for `zf.writestr(name, data)`, and owner read/write.
_ZIPINFO_DEFAULT_DATE = (1980, 1, 1, 0, 0, 0)
_OWNER_RW = 0o600 << 16
# Stock's zip-bomb limits for extracted members (Keras 3.14 and older 3.13 have none: 3.15's then).
_EXTRACT_BOMB_FLOOR = getattr(saving_lib, "_ZIP_EXTRACT_BOMB_FLOOR_BYTES", 1 << 28)
_METHODS_ANYONE_READS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
_MAX_EXPANSION = getattr(saving_lib, "_ZIP_MEMBER_MAX_EXPANSION", 100)


class _AssetsInto:
    """The `zf.write(path, arcname)` that Keras' `_write_to_zip_recursively` calls, into our writer."""

    def __init__(self, writer: ZipWriter):
        self._writer = writer

    def write(self, filename: str, arcname: str) -> None:
        info = zipfile.ZipInfo.from_file(filename, arcname)
        with open(filename, "rb") as f:
            self._writer.add_stored(info.filename, f.read(), info.date_time, info.external_attr)


# model -> ((size, alignment, ZIP64 limit) of its weights member, where it started, the lengths of
# the metadata and config before it) at its last blocking save: where it starts again if they are equal.
_STARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STARTS_LOCK = threading.Lock()


def prepare_save(
    model,
    filepath: str,
    include_optimizer: bool = True,
    threads: int = 0,
    zip64_limit: int = ZIP64_LIMIT,
    compression: Compression | None = None,
    alignment: int = 1,
    flavour=keras3_state,
    blocking: bool = False,
) -> Write:
    """Saves `model` to `filepath` as a `.keras` zip in two halves. This first one takes the model's
    config, its assets and a snapshot of its variables, now; it returns the second, which writes the
    file (on any thread), replacing any previous file only when complete, and must be called once.

    `blocking`: the second half runs at once, on this thread. The config is then serialized there,
    while the tensors are already being written where the weights member started at the model's
    last save (the members before it are the config and metadata: the same lengths put it there
    again; if they changed, the tensors are written again where it starts now). A model whose
    walk is remembered (`flavour.replay_walk`) has each snapshot written as soon as it is taken
    (the layout, when not remembered, made first from the shapes and dtypes the walk recorded),
    and the walk is checked to still hold only then, while they are written: if it does not, the
    save walks the model and writes the file again. When h5py must lay the weights member out
    (the first save of an architecture), each tensor is written as soon as HDF5 has placed it,
    while h5py places the rest.
    `flavour` is the Keras flavour's glue (`keras3.state`, `tf_keras.keras_v3`): its config and state walk.
    `zip64_limit` is `zipfile`'s; tests lower it to exercise ZIP64 framing on small models.
    With `alignment` > 1, the weights member starts at a multiple of it in the file, and every tensor too.
    """
    serialized = [] if blocking else [flavour.serialize_model_as_json(model)]
    replay = flavour.replay_walk(model, include_optimizer) if blocking and compression is None else None
    if replay is not None and not replay.speculative:
        replay = None
    planned = [] if replay is not None else [flavour.plan_model_state(model, include_optimizer)]

    def encoded() -> tuple[bytes, bytes]:
        """metadata.json and config.json's bytes, serialized once per save (a second attempt at
        writing the zip reuses them: stock serializes once, and before walking the model)."""
        if not serialized:
            serialized.append(flavour.serialize_model_as_json(model))
        config_json, metadata_json = serialized[0]
        return metadata_json.encode(), config_json.encode()

    def write_zip(file: TensorFile, plan: WeightsPlan | None, assets, replay) -> bool:
        """Writes the zip into `file`, of `plan` and `assets` (None: no object saved assets), or
        with no plan of `replay`'s snapshots: False, once nothing is being written, if its walk
        no longer holds."""
        with contextlib.ExitStack() as joins:
            writer = ZipWriter(file, zip64_limit)
            with _STARTS_LOCK:
                last = _STARTS.get(model) if blocking else None
            lengths = None  # of metadata.json and config.json, once written
            early = None  # the weights member being written (a StreamedWrite) before its start is certain
            if compression is None:
                layout = remembered_layout(replay.template if plan is None else plan, alignment=alignment)
                if layout is None and plan is None and last is not None and laid_out_by_shapes(replay.template):
                    # A replayed walk knows its snapshots' shapes and dtypes before taking any: laid out
                    # from them, each snapshot is written as it is taken, as when the layout is remembered.
                    layout, _ = make_layout(replay.template, alignment=alignment)
                if layout is not None and last is not None and last[0] == (layout.size, alignment, zip64_limit):
                    # Where it started last time, while the config is serialized (and a replayed walk checked)
                    early = joins.enter_context(StreamedWrite(file, last[1], threads))
                    place = placing(early, layout)
                    if plan is None:
                        plan = replay.plan(place)
                    else:
                        for dataset in plan.datasets:
                            place(dataset)
                    early.flush()
                elif plan is None:
                    plan = replay.plan()
                if plan is None:
                    return False
                tensors = reserved_tensors(plan)
                if layout is None:  # h5py lays it out while the tensors it placed are written
                    if last is None:  # where it starts now, for a model not saved before
                        lengths = _add_members(writer, encoded())
                        guess = writer.data_start(WEIGHTS, sum(a.nbytes for a in tensors), alignment)
                    else:  # where it started last time, while the config is serialized after
                        guess = last[1]
                    early = joins.enter_context(StreamedWrite(file, guess, threads))
                    layout, tensors = make_layout(plan, alignment=alignment, on_placed=early.place)
            if lengths is None:
                if early is not None and last[2] != tuple(map(len, encoded())):
                    # The member moved: the early write may cover where the config goes now. It ends
                    # before the members are written, and the tensors are written again below.
                    early.wait()
                    early = None
            if replay is not None and not replay.holds():
                return False
            if lengths is None:
                lengths = _add_members(writer, encoded())
            if compression is None:
                start = writer.begin_stored(WEIGHTS, time.localtime()[:6], _OWNER_RW, layout.size, alignment)
                if early is not None and early.start == start:
                    crc = early.finish(layout)
                else:
                    if early is not None:
                        early.wait()  # it writes where the member does not start
                    crc = write_layout(file, start, layout, tensors, threads)
                writer.end_stored(layout.size, crc)
                if blocking:
                    with _STARTS_LOCK:
                        _STARTS[model] = ((layout.size, alignment, zip64_limit), start, lengths)
            else:  # the size comes out of the compression: hint an upper bound (ZIP64 when it may be needed)
                bound = compression.size_bound(plan)
                start = writer.begin_stored(WEIGHTS, time.localtime()[:6], _OWNER_RW, bound, alignment)
                size = write_compressed(file, start, plan, compression, threads, alignment)
                writer.end_stored(size, file.crc32(start, size, [], threads))
            if assets is not None and assets.working_dir is not None:  # None: no object saved assets
                saving_lib._write_to_zip_recursively(_AssetsInto(writer), assets.working_dir, ASSETS)
            writer.finish()  # cuts the file where the zip ends: no misplaced early write is left past it
            return True

    def write() -> None:
        try:
            with atomic_replace(filepath) as destination:
                if replay is None or not write_zip(destination.file, None, None, replay):
                    if not planned:  # the replayed walk no longer holds: walk, and write again
                        planned.append(flavour.plan_model_state(model, include_optimizer))
                    write_zip(destination.file, *planned[0], None)
        finally:
            for _, assets in planned:
                assets.close()

    return write


def _add_members(writer: ZipWriter, encoded: tuple[bytes, bytes]) -> tuple[int, int]:
    """Writes metadata.json and config.json, as stock writes them; returns their lengths."""
    metadata_bytes, config_bytes = encoded
    writer.add_stored(METADATA, metadata_bytes, _ZIPINFO_DEFAULT_DATE, _OWNER_RW)
    writer.add_stored(CONFIG, config_bytes, _ZIPINFO_DEFAULT_DATE, _OWNER_RW)
    return len(metadata_bytes), len(config_bytes)


@dataclass
class WeightsMember:
    """`model.weights.h5` of an open `.keras`, open in h5py."""

    source: TensorFile | bytes  # where its bytes are read from: the file, or the member inflated in memory
    start: int  # its first byte in `source`
    size: int
    h5: h5py.File
    region: FileRegion | None  # what h5py reads through, when read in place
    listed: Listed  # the Rust core's listing, made before h5py opened it


class KerasArchive:
    """An open `.keras` file: its members by name (the last one wins, as in `zipfile`)."""

    def __init__(self, filepath: str):
        self.path = filepath
        self.file = TensorFile(filepath)
        self.zip = ZipArchive(self.file)
        self.members = self.zip.members()
        self.by_name = {member_name(m): m for m in self.members}
        self.opened = os.fstat(self.file.fileno())  # what a mapped load checks the file against at its end

    @property
    def readable_here(self) -> bool:
        """Whether every member is STORED or DEFLATED, the methods read here (stock also reads
        BZIP2 and LZMA members, through `zipfile`; its `load_model` extracts them all). A method no
        one reads is refused, naming the file, where `zipfile` would raise a bare NotImplementedError."""
        return self._readable_here(self.members)

    @property
    def weights_readable_here(self) -> bool:
        """`readable_here` for the weights member alone: all that stock's `load_weights` reads."""
        return self._readable_here([m for m in self.members if member_name(m) == WEIGHTS])

    def _readable_here(self, members) -> bool:
        for m in members:
            if m.method not in _METHODS_ANYONE_READS:
                raise BadKerasZipFile(
                    f"{self.path}: member {member_name(m)!r} has compression method {m.method}, "
                    "which no zip reader here supports (a damaged file?)"
                )
        return all(m.method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for m in members)

    def read(self, name: str) -> bytes:
        member = self.by_name.get(name)
        if member is None:
            raise KeyError(f"There is no item named {name!r} in the archive {self.path}")
        return self.zip.read(member.index)

    @contextlib.contextmanager
    def open_weights(self, threads: int, check_first: bool = False):
        """Yields `model.weights.h5` open in h5py. Its CRC-32 is checked by `checked_arrays` over the
        bytes as they are read (each byte read once), or first, before HDF5 parses a byte of it, if
        `check_first`. Whatever fails in between is blamed on the file when its CRC is wrong: the
        error is then a `BadKerasZipFile` naming it.

        A STORED member is read in place; a DEFLATED one (not written by stock Keras) is inflated first.
        """
        member = self.by_name[WEIGHTS]
        region = None
        if member.method == zipfile.ZIP_STORED:
            start = self.zip.data_offset(member.index)
            if check_first:
                self.zip.check_crc(member.index, threads)
            source, size = self.file, member.size
            fileobj = region = FileRegion(self.file.fileno(), start, member.size, self.path)
        else:
            source = self.zip.read(member.index)
            start, size, fileobj = 0, len(source), io.BytesIO(source)
        try:
            listed = list_before_opening(source, start, size, region, f"{self.path}: '{WEIGHTS}'")
            try:
                h5 = h5py.File(fileobj, "r")
            except OSError as e:
                raise KerasSaveError(f"{self.path}: '{WEIGHTS}' is not a readable HDF5 file: {e}") from e
            with h5:
                yield WeightsMember(source, start, size, h5, region, listed)
        except Exception as e:
            if region is not None and not check_first and not isinstance(e, zipfile.BadZipFile):
                try:
                    self.zip.check_crc(member.index, threads)
                except zipfile.BadZipFile as damaged:  # what went wrong: the file is damaged
                    raise damaged from e
            raise

    def checked_arrays(self, weights: WeightsMember, reading: Future[ReadTensors], mapped: bool = False) -> dict:
        """The tensors `read_weights` read, once the member's CRC-32 checks out for the bytes as they
        were read -- the tensors, and the bytes between them that h5py is served from now on. A
        file rewritten in place while it was read is refused, never mixed. A `mapped` load's tensors
        were not read: its CRC is checked by `verify` (see mapped.py)."""
        read = reading.result()
        if weights.region is not None:  # else inflated in memory, already checked
            chunks = [(offset, length) for offset, length, _ in read.chunks]
            between = weights.region.freeze([(offset, data) for offset, data, _ in read.stretches], chunks)
            if mapped:  # h5py's view of the file is frozen consistent with the map; the CRC is `verify`'s
                return read.arrays
            known = [(offset, len(data), crc) for offset, data, crc in read.stretches] + read.chunks + between
            known = sorted((weights.start + offset, length, crc) for offset, length, crc in known)
            member = self.by_name[WEIGHTS]
            if self.file.crc32(weights.start, weights.size, known) != member.crc32:
                raise BadKerasZipFile(
                    f"{self.path}: Bad CRC-32 for file '{WEIGHTS}' (a damaged file, or it changed while being read)"
                )
        return read.arrays

    def mapping(self, weights: WeightsMember, mmap: bool) -> Mapping | None:
        """A private map of the file for a load with `mmap` (None when the member is not read in place)."""
        return Mapping(self.file) if mmap and weights.region is not None else None

    def end_mapped_load(self, model, weights: WeightsMember, verify) -> None:
        """Refuses a file changed during the mapped load of `model`; starts the background CRC check."""
        refuse_if_replaced(self.path, self.file.fileno(), self.opened)
        if verify == BACKGROUND:
            crc = self.by_name[WEIGHTS].crc32
            verify_in_background(model, self.file, weights.start, weights.size, crc, WEIGHTS)

    @contextlib.contextmanager
    def extracted_assets(self):
        """Stock's assets store when the zip has more than the three standard members, else None.

        Only `assets/...` members are extracted (stock extracts every member, weights included).
        """
        if len(self.members) <= 3:
            yield None
            return
        for m in self.members:  # stock's `_reject_zip_extract_bomb`
            if m.size > _EXTRACT_BOMB_FLOOR and m.size > _MAX_EXPANSION * m.compressed_size:
                raise KerasSaveError(
                    f"{self.path}: Not allowed: archive member '{member_name(m)}' declares {m.size} bytes but "
                    f"only {m.compressed_size} are stored on disk; refusing to extract a potential "
                    "decompression bomb."
                )
        with tempfile.TemporaryDirectory() as tmp:
            base = file_utils.resolve_path(tmp)
            for m in self.members:
                name = member_name(m)
                if not name.startswith(f"{ASSETS}/"):
                    continue
                target = file_utils.resolve_sub_path(base, name)
                if target is None:
                    warnings.warn(f"Skipping invalid path during archive extraction: '{name}'.", stacklevel=2)
                    continue
                if name.endswith("/"):
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(self.zip.read(m.index))
            yield saving_lib.DiskIOStore(os.path.join(base, ASSETS), mode="r")


def load(
    filepath: str,
    custom_objects=None,
    compile: bool = True,
    safe_mode: bool = True,
    threads: int = 0,
    flavour=keras3_state,
    mmap: bool = False,
    verify=True,
):
    """Reads a `.keras` zip written by us or by stock Keras, into the model of `flavour` (see `save`).

    `mmap`: aligned tensors of a STORED weights member are adopted from a private map of the file,
    with the member's CRC-32 checked as `verify` says (True, "background" or False; see mapped.py).
    """
    archive = KerasArchive(filepath)
    if WEIGHTS not in archive.by_name or not archive.readable_here:  # stock's path and errors
        return flavour.stock_load_model(filepath, custom_objects, compile, safe_mode)
    config_json = archive.read(CONFIG)
    with (
        archive.open_weights(threads, check_first=mmap and verify is True) as weights,
        archive.extracted_assets() as assets,
    ):
        mapping = archive.mapping(weights, mmap)
        reading = read_weights(
            weights.h5, weights.source, weights.start, weights.size, filepath, threads, mapping, weights.listed
        )
        try:  # the model is built while the tensors are read
            built = flavour.build_model(config_json, custom_objects, compile, safe_mode)
        finally:
            futures.wait([reading])
        arrays = archive.checked_arrays(weights, reading, mapped=mapping is not None)
        flavour.load_model_state(built, weights.h5, arrays, assets)
    if mapping is not None:
        archive.end_mapped_load(built.model, weights, verify)
    return built.model
