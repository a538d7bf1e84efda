"""`python -m kerassave_fast` / `kerassave-fast`: look into, check and convert saved models.

    inspect FILE [--json]   format, flavour, Keras version, layers, variables, optimizer, compression
                            (FILE: .keras, .h5, .weights.h5, .weights.json, SavedModel dir, TF checkpoint)
    verify FILE             CRCs and structure; exit code 0 (sound) or 1 (what is wrong is printed)
    convert SRC DST         load SRC, save DST (format from DST's suffix; --compression gzip|zstd)
    bench [ARGS]            the benchmark suite (benches/run.py of a source checkout)

`inspect` and `verify` read metadata and checksums only: no model is built, and neither Keras nor
TensorFlow is imported. h5py and numpy are imported where needed: `inspect` and `verify` of a
`.keras` whose weights the Rust core walks whole need neither (their imports took most of
`inspect`'s time and a large share of `verify`'s, whose CRC pass reads every byte).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import json
import math
import os
import sys
import zipfile
from dataclasses import asdict, dataclass, field

from ._core import (
    MAX_THREADS,
    OBJECT_GRAPH_KEY,
    KerasSaveError,
    TensorBundleReader,
    TensorFile,
    ZipArchive,
    hdf5_stored_datasets,
)
from .files import MODEL_FILE_SUFFIXES, FileRegion
from .formats.zip_members import member_name

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the command line's start-up)
if TYPE_CHECKING:
    import h5py

KERAS_ZIP, LEGACY_H5, WEIGHTS_H5, SHARDED_WEIGHTS, SAVED_MODEL, TF_CHECKPOINT = (
    "keras-v3-zip",
    "legacy-h5",
    "keras-v3-weights-h5",
    "keras-v3-sharded-weights",
    "tf-saved-model",
    "tf-checkpoint",
)
_VERIFY_BATCH = 256 << 20  # bytes of bundle tensors read (and CRC32C-checked) at a time


@dataclass
class Variable:
    name: str
    shape: list[int]
    dtype: str
    bytes: int
    compression: str | None = None  # HDF5 filters of a chunked dataset, e.g. "shuffle+gzip(4)+fletcher32"


@dataclass
class Report:
    path: str
    format: str
    flavour: str | None = None
    keras_version: str | None = None
    model: str | None = None
    layers: list[dict] = field(default_factory=list)
    optimizer: str | None = None
    variables: list[Variable] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(v.bytes for v in self.variables)

    def to_json(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def file_format(path: str) -> str:
    """Which container `path` is, from its content (a TF checkpoint: its prefix)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            return SAVED_MODEL
        raise KerasSaveError(f"{path}: a directory without saved_model.pb is no SavedModel")
    if not os.path.exists(path) and os.path.exists(path + ".index"):
        return TF_CHECKPOINT
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic.startswith(b"PK"):
        return KERAS_ZIP
    if magic == b"\x89HDF\r\n\x1a\n":
        with _open_hdf5(path) as h5:
            return LEGACY_H5 if "keras_version" in h5.attrs or "layer_names" in h5.attrs else WEIGHTS_H5
    if magic.lstrip().startswith(b"{") and path.endswith(".weights.json"):
        _shards(path)  # refuses a map that is not one
        return SHARDED_WEIGHTS
    raise KerasSaveError(f"{path}: neither a .keras zip, an HDF5 file, a SavedModel nor a TF checkpoint")


def _shards(path: str) -> list[str]:
    """The shard files a `.weights.json` map names (paths beside it), as stock's reader finds them."""
    from .formats import sharded_weights

    with open(path, "rb") as f:
        try:
            config = json.loads(f.read())
        except ValueError as e:
            raise KerasSaveError(f"{path}: not a sharded weights map (invalid JSON: {e})") from None
    names = sharded_weights.files_to_open(path, config)
    if names is None:
        raise KerasSaveError(f"{path}: not a sharded weights map (no 'weight_map' naming shard files beside it)")
    return [os.path.join(os.path.dirname(path), name) for name in names]


def _flavour_of(keras_version) -> str | None:
    if not isinstance(keras_version, str) or not keras_version:
        return None
    return "tf_keras" if keras_version.startswith("2.") else "keras3"


def _text(value) -> str | None:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _filters(dataset: h5py.Dataset) -> str | None:
    if dataset.chunks is None:
        return None
    parts = ["shuffle"] if dataset.shuffle else []
    if dataset.compression:
        level = dataset.compression_opts
        parts.append(f"{dataset.compression}({level})" if level is not None else dataset.compression)
    for f, options in dataset._filters.items():
        if f == "32015":  # zstd, the filter id hdf5plugin registers
            parts.append(f"zstd({options[0]})" if options else "zstd")
        elif f not in ("shuffle", "gzip", "fletcher32", "lzf", "szip"):
            parts.append(f"filter {f}")
    if dataset.fletcher32:
        parts.append("fletcher32")
    return "+".join(parts) or "chunked"


def _hdf5_variables(h5: h5py.File) -> list[Variable]:
    import h5py

    found: list[Variable] = []

    def visit(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset):
            bf16 = obj.attrs.get("dtype") in ("bfloat16", b"bfloat16")  # Keras 3 stores it as uint16
            dtype = "bfloat16" if bf16 else str(obj.dtype)
            found.append(Variable(name, list(obj.shape), dtype, int(obj.size * obj.dtype.itemsize), _filters(obj)))

    h5.visititems(visit)
    return found


def _model_summary(report: Report, config: dict) -> None:
    report.model = config.get("class_name")
    inner = config.get("config") or {}
    for layer in inner.get("layers", []) if isinstance(inner, dict) else []:
        report.layers.append({"name": (layer.get("config") or {}).get("name"), "class": layer.get("class_name")})


@dataclass
class _OpenKeras:
    archive: ZipArchive
    names: dict[str, int]  # member name -> index (the last one wins, as in `zipfile`)
    file: TensorFile


def _open_keras(path: str) -> _OpenKeras:
    file = TensorFile(path)
    archive = ZipArchive(file)
    return _OpenKeras(archive, {member_name(m): m.index for m in archive.members()}, file)


def _metadata(opened: _OpenKeras, path: str) -> dict:
    """A `.keras`'s `metadata.json`, or {} where it is missing or not an object (stock's loads never read it)."""
    try:
        return _json_member(opened, "metadata.json", path)
    except KerasSaveError:
        return {}


def _json_member(opened: _OpenKeras, name: str, path: str) -> dict:
    """A `.keras`'s JSON member, which stock reads as an object."""
    if name not in opened.names:
        raise KerasSaveError(f"{path}: member {name!r} is missing")
    try:
        value = json.loads(opened.archive.read(opened.names[name]))
    except ValueError as e:
        raise KerasSaveError(f"{path}: member {name!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise KerasSaveError(f"{path}: member {name!r} is not a JSON object")
    return value


@dataclass
class _HDF5In:
    """An HDF5 file: `size` bytes at `start` of `source` (a file, or bytes), `where` in errors."""

    source: TensorFile | bytes
    start: int
    size: int
    where: str


def _weights_member(opened: _OpenKeras, path: str) -> _HDF5In:
    """The `.keras`'s weights member: in the file when stored, else inflated (its CRC checked)."""
    index = opened.names["model.weights.h5"]
    member = opened.archive.members()[index]
    where = f"{path}: 'model.weights.h5'"
    if member.method == zipfile.ZIP_STORED:
        return _HDF5In(opened.file, opened.archive.data_offset(index), member.size, where)
    data = opened.archive.read(index)
    return _HDF5In(data, 0, len(data), where)


def _keras_weights(weights: _HDF5In, path: str) -> h5py.File:
    """h5py's view of the weights member, once the Rust core's walk of it (`_listed`) found nothing
    libhdf5 would loop forever on."""
    import h5py

    if isinstance(weights.source, bytes):
        return h5py.File(io.BytesIO(weights.source), "r")
    return h5py.File(FileRegion(weights.source.fileno(), weights.start, weights.size, path), "r")


@dataclass
class _Listed:
    """The Rust core's walk of an HDF5 file: `hdf5_stored_datasets`' tuples, names as `visititems`
    gives them (no leading slash); `complete`: they are every dataset of the file, and libhdf5 would
    open it (it need not look)."""

    datasets: list[tuple]
    complete: bool


def _listed(hdf5: _HDF5In) -> _Listed:
    """Walks the file's metadata without libhdf5: every object header and heap parsed, damage
    libhdf5 loops forever on refused (`KerasSaveError`), each listed dataset's bytes checked to lie
    in the file, apart from the others and the metadata."""
    left_to_libhdf5: list[str] = []
    found = hdf5_stored_datasets(hdf5.source, hdf5.start, hdf5.size, None, hdf5.where, left_to_libhdf5)
    datasets = [(name.lstrip("/"), *rest) for name, *rest in found or []]
    return _Listed(datasets, found is not None and not left_to_libhdf5)


# numpy's names of the Rust listing's dtypes (what h5py reports); uint16 is left to h5py, which
# reports a `dtype` attribute of "bfloat16" on any type as bfloat16.
_NUMPY_NAMES = {
    "<f2": "float16", "<f4": "float32", "<f8": "float64", "|i1": "int8", "<i2": "int16", "<i4": "int32",
    "<i8": "int64", "|u1": "uint8", "<u4": "uint32", "<u8": "uint64", "bfloat16": "bfloat16",
}  # fmt: skip


def _itemsize(dtype: str) -> int:
    """Bytes per element of a listed dtype: numpy's spelling ends with them ("<f4", "|V2")."""
    return 2 if dtype == "bfloat16" else int(dtype[2:])


def _listed_variables(listed: _Listed) -> list[Variable] | None:
    """The variables as `_hdf5_variables` reports them, from the walk alone; None when h5py must
    look (a dataset not listed, chunked: its filters' options, or of a type named otherwise)."""
    if not listed.complete or any(chunking or dtype not in _NUMPY_NAMES for *_, dtype, chunking in listed.datasets):
        return None
    variables = [
        Variable(name, list(shape), _NUMPY_NAMES[dtype], math.prod(shape) * _itemsize(dtype))
        for name, _, shape, dtype, _ in listed.datasets
    ]
    return sorted(variables, key=lambda v: v.name.split("/"))  # `visititems`' order: by name, depth first


def _open_hdf5(path: str) -> h5py.File:
    """h5py's file, once the Rust core's walk of it found nothing libhdf5 would loop forever on."""
    import h5py

    source = TensorFile(path)
    hdf5_stored_datasets(source, 0, source.size())
    return h5py.File(path, "r")


def inspect_file(path: str) -> Report:
    """What `path` holds, from its metadata (no tensor is read, no model built)."""
    path = os.fspath(path)
    report = Report(path, file_format(path))
    if report.format == KERAS_ZIP:
        opened = _open_keras(path)
        config = _json_member(opened, "config.json", path)
        report.keras_version = _metadata(opened, path).get("keras_version")
        report.flavour = _flavour_of(report.keras_version)
        _model_summary(report, config)
        optimizer = (config.get("compile_config") or {}).get("optimizer")
        report.optimizer = optimizer.get("class_name") if isinstance(optimizer, dict) else optimizer
        if "model.weights.h5" in opened.names:
            weights = _weights_member(opened, path)
            report.variables = _listed_variables(_listed(weights))
            if report.variables is None:
                with _keras_weights(weights, path) as h5:
                    report.variables = _hdf5_variables(h5)
    elif report.format == SHARDED_WEIGHTS:
        for shard in _shards(path):  # each variable once, in the shard holding it (a group may span shards)
            with _open_hdf5(shard) as h5:
                report.variables += [
                    dataclasses.replace(v, name=f"{os.path.basename(shard)}:{v.name}") for v in _hdf5_variables(h5)
                ]
    elif report.format in (LEGACY_H5, WEIGHTS_H5):
        with _open_hdf5(path) as h5:
            report.keras_version = _text(h5.attrs.get("keras_version"))
            report.flavour = _flavour_of(report.keras_version)
            if "model_config" in h5.attrs:
                _model_summary(report, json.loads(_text(h5.attrs["model_config"])))
            if "training_config" in h5.attrs:
                training = json.loads(_text(h5.attrs["training_config"]))
                report.optimizer = (training.get("optimizer_config") or {}).get("class_name")
            report.variables = _hdf5_variables(h5)
    else:
        prefix = os.path.join(path, "variables", "variables") if report.format == SAVED_MODEL else path
        if report.format == SAVED_MODEL and os.path.exists(os.path.join(path, "keras_metadata.pb")):
            report.flavour = "tf_keras"
        for key, dtype, shape, size, _, _, _ in TensorBundleReader(prefix).entries():
            if key != OBJECT_GRAPH_KEY:  # the object graph TensorFlow keeps beside the variables
                report.variables.append(Variable(key, list(shape), _bundle_dtype_name(dtype), size))
    return report


# TensorFlow's DataType enum (tensorflow/core/framework/types.proto), named as numpy names them.
_DATA_TYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 7: "string", 8: "complex64",
    9: "int64", 10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
}  # fmt: skip


_STRING = 7


def _bundle_dtype_name(dtype: int) -> str:
    return _DATA_TYPES.get(dtype, f"DataType {dtype}")


def verify_file(path: str, threads: int = 0) -> list[str]:
    """What is wrong with `path` (empty: nothing found). Checks every CRC the format has (zip
    CRC-32 of each member, CRC32C of each bundle tensor, HDF5 Fletcher-32 of checksummed chunks)
    and the structure: the HDF5 metadata parses, every dataset lies inside the file and its chunks
    decode; configs parse as JSON. Uncompressed HDF5 tensors carry no checksum in any format."""
    path = os.fspath(path)
    try:
        kind = file_format(path)
        if kind == KERAS_ZIP:
            return _verify_keras(path, threads)
        if kind in (LEGACY_H5, WEIGHTS_H5):
            import h5py

            source = TensorFile(path)
            hdf5 = _HDF5In(source, 0, source.size(), path)
            listed = _listed(hdf5)  # before h5py, which may hang on damage
            with h5py.File(path, "r") as h5:
                problems = _verify_json_attributes(h5) + _decode_chunked(hdf5, listed, threads)
                return problems + _verify_hdf5(h5, hdf5.size, path, listed)
        if kind == SHARDED_WEIGHTS:
            return [p for shard in _shards(path) for p in verify_file(shard, threads)]
        if kind == SAVED_MODEL:
            return _verify_saved_model(path) + _verify_bundle(os.path.join(path, "variables", "variables"), threads)
        return _verify_bundle(path, threads)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        return [str(e) if path in str(e) else f"{path}: {e}"]


def _verify_keras(path: str, threads: int) -> list[str]:
    opened = _open_keras(path)
    problems = []
    for member in opened.archive.members():
        try:
            if member.method == zipfile.ZIP_STORED:
                opened.archive.check_crc(member.index, threads)
            else:
                opened.archive.read(member.index)  # inflated, size and CRC checked
        except (OSError, ValueError) as e:
            problems.append(str(e))
    try:  # (stock's loads never read metadata.json: it is not checked here beyond its CRC)
        _json_member(opened, "config.json", path)
    except (KerasSaveError, OSError) as e:
        problems.append(str(e))
    if "model.weights.h5" in opened.names and not problems:
        where = f"{path}: 'model.weights.h5'"
        try:
            weights = _weights_member(opened, path)
            listed = _listed(weights)
            problems += _decode_chunked(weights, listed, threads)
            if not listed.complete:
                with _keras_weights(weights, path) as h5:
                    problems += _verify_hdf5(h5, weights.size, where, listed)
        except KerasSaveError as e:  # named once: the Rust core's errors name the file already
            problems.append(str(e) if str(e).startswith(path) else f"{where}: {e}")
        except OSError as e:
            problems.append(f"{where} is not a readable HDF5 file: {e}")
    return problems


def _decode_chunked(hdf5: _HDF5In, listed: _Listed, threads: int) -> list[str]:
    """Decodes the listed chunked datasets (zstd needs no plugin), one in memory at a time."""
    chunked = [(name, shape, dtype, chunking) for name, _, shape, dtype, chunking in listed.datasets if chunking]
    if not chunked:
        return []
    import numpy as np

    from .formats.weights_h5 import read_chunked

    problems = []
    for name, shape, dtype, chunking in chunked:
        buffer = np.empty(math.prod(shape) * _itemsize(dtype), np.uint8)
        try:
            items = [(name, chunking, shape, _itemsize(dtype), buffer)]
            read_chunked(hdf5.source, hdf5.start, items, hdf5.where, threads)
        except (OSError, ValueError) as e:  # the Rust core's chunk errors name the file and the dataset
            problems.append(str(e))
    return problems


def _verify_json_attributes(h5: h5py.File) -> list[str]:
    problems = []
    for name in ("model_config", "training_config"):
        if name in h5.attrs:
            try:
                json.loads(_text(h5.attrs[name]))
            except ValueError as e:
                problems.append(f"{h5.filename}: root attribute {name!r} is not valid JSON: {e}")
    return problems


# What h5py raises for a file libhdf5 refuses (RuntimeError: "Object visitation failed", ...).
_HDF5_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def _verify_hdf5(h5: h5py.File, size: int, where: str, listed: _Listed) -> list[str]:
    """h5py's checks of the datasets the walk did not list."""
    import h5py

    problems = []
    checked = {name for name, *_ in listed.datasets}

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset) or name in checked:
            return
        try:
            if obj.chunks is None:
                offset = obj.id.get_offset()
                nbytes = obj.id.get_storage_size()
                if obj.size and offset is None:
                    problems.append(f"{where}: dataset {name!r} has no data")
                elif offset is not None and offset + nbytes > size:
                    end = offset + nbytes
                    problems.append(f"{where}: dataset {name!r} ends past the end of the file ({end} > {size})")
            else:
                for block in obj.iter_chunks():  # decoded, Fletcher-32 checked: one chunk in memory at a time
                    obj[block]
        except _HDF5_ERRORS as e:
            problems.append(f"{where}: dataset {name!r}: {e}")

    try:
        h5.visititems(visit)
    except _HDF5_ERRORS as e:
        problems.append(f"{where}: {e}")
    return problems


def _verify_bundle(prefix: str, threads: int) -> list[str]:
    import numpy as np

    reader = TensorBundleReader(prefix)  # the index parsed and validated
    entries = [(key, dtype, size) for key, dtype, _, size, partitioned, _, _ in reader.entries() if not partitioned]
    fixed = [(key, size) for key, dtype, size in entries if dtype != _STRING]
    strings = [key for key, dtype, _ in entries if dtype == _STRING]
    problems = []
    buffer = np.empty(min(_VERIFY_BATCH, max((s for _, s in fixed), default=0)), np.uint8)
    batch: list[tuple[str, int]] = []

    def check(batch: list[tuple[str, int]]) -> None:
        views, at = [], 0
        for _, size in batch:
            views.append(buffer[at : at + size])
            at += size
        try:
            reader.read_tensors([key for key, _ in batch], views, threads)  # CRC32C checked
        except (OSError, ValueError) as e:
            problems.append(str(e))

    for key, size in fixed:
        if size > len(buffer):
            buffer = np.empty(size, np.uint8)
        if batch and sum(s for _, s in batch) + size > len(buffer):
            check(batch)
            batch = []
        batch.append((key, size))
    if batch:
        check(batch)
    for key in strings:
        try:
            reader.read_strings(key)
        except (OSError, ValueError) as e:
            problems.append(str(e))
    return problems


# What TensorFlow's fingerprint.pb holds of a SavedModel's files (hashes of their content).
_FINGERPRINTED = (
    "saved_model_checksum", "graph_def_program_hash", "signature_def_hash", "saved_object_graph_hash", "checkpoint_hash"
)  # fmt: skip


def _verify_saved_model(path: str) -> list[str]:
    """The SavedModel's protocol buffers parse, and TensorFlow's hashes of its files, recomputed,
    equal those its fingerprint.pb recorded at the save (a changed byte in the graph is found)."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import fingerprint_pb2
    from tensorflow.python.saved_model import loader_impl
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    try:
        loader_impl.parse_saved_model(path)
    except (OSError, DecodeError) as e:
        return [f"{path}: saved_model.pb does not parse: {e}"]
    problems = []
    metadata = os.path.join(path, "keras_metadata.pb")
    if os.path.exists(metadata) and importlib.util.find_spec("tf_keras") is not None:  # (tf_keras' own format)
        from tf_keras.protobuf import saved_metadata_pb2

        with open(metadata, "rb") as f:
            try:
                saved_metadata_pb2.SavedMetadata().ParseFromString(f.read())
            except DecodeError as e:
                problems.append(f"{metadata} does not parse: {e}")
    recorded = os.path.join(path, "fingerprint.pb")
    if os.path.exists(recorded):  # (TensorFlow before 2.12 wrote none)
        stored, fresh = fingerprint_pb2.FingerprintDef(), fingerprint_pb2.FingerprintDef()
        try:
            with open(recorded, "rb") as f:
                stored.ParseFromString(f.read())
            fresh.ParseFromString(fingerprinting.CreateFingerprintDef(path))
        except (OSError, DecodeError, fingerprinting.FingerprintException) as e:
            return [*problems, f"{recorded}: {e}"]
        problems += [
            f"{recorded}: its {name} does not match the files (changed or damaged since the save)"
            for name in _FINGERPRINTED
            if getattr(stored, name) != getattr(fresh, name)
        ]
    return problems


def convert(source: str, destination: str, **save_kwargs) -> None:
    """Loads `source` (its own flavour) and saves it as `destination` says (`.keras`, `.h5`,
    `.weights.h5`, else a SavedModel: tf_keras' `save_format="tf"`, Keras 3's `export`)."""
    from . import api

    report = inspect_file(source)
    weights_only = report.format in (WEIGHTS_H5, SHARDED_WEIGHTS, TF_CHECKPOINT)
    if weights_only or (report.format == LEGACY_H5 and report.model is None):
        raise KerasSaveError(f"{source}: holds weights only, no model to convert")
    if destination.endswith(".json"):
        raise KerasSaveError(f"{destination}: sharded weights need `max_shard_size`, which convert does not take")
    flavour = report.flavour or ("tf_keras" if api.legacy_keras_requested() else "keras3")
    suffix = os.path.splitext(os.path.basename(destination.rstrip(os.sep)))[1]
    a_file = destination.endswith(MODEL_FILE_SUFFIXES)
    if flavour == "keras3" and suffix and not a_file and not os.path.isdir(destination):
        # as Keras 3's `model.save` refuses it (tf_keras saves a SavedModel)
        why = "names no format"
        if suffix in MODEL_FILE_SUFFIXES:
            why = "is a file's suffix, after which a separator asks for a directory"
        raise ValueError(
            f"{destination}: {suffix!r} {why}: give `.keras`, `.h5` or `.weights.h5`, or a name without a "
            "suffix for a SavedModel export"
        )
    model = api.load_model_as(flavour, source)
    if destination.endswith(".weights.h5"):
        api.save_weights(model, destination, **save_kwargs)
    elif a_file:
        api.save_model(model, destination, **save_kwargs)
    elif flavour == "tf_keras":
        api.save_model(model, destination, save_format="tf", **save_kwargs)
    else:
        api.export_saved_model(model, destination, **save_kwargs)


def _print_report(report: Report) -> None:
    print(f"{report.path}: {report.format}")
    for label, value in (
        ("flavour", report.flavour),
        ("keras version", report.keras_version),
        ("model", report.model),
        ("optimizer", report.optimizer),
    ):
        if value:
            print(f"  {label}: {value}")
    if report.layers:
        print(f"  layers ({len(report.layers)}): " + ", ".join(f"{x['name']} ({x['class']})" for x in report.layers))
    print(f"  variables: {len(report.variables)}, {report.total_bytes:,} bytes")
    for v in report.variables:
        extra = f"  [{v.compression}]" if v.compression else ""
        print(f"    {v.name}  {tuple(v.shape)}  {v.dtype}  {v.bytes:,} B{extra}")


def _bench(args: list[str]) -> int:
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benches", "run.py")
    if not os.path.exists(script):
        print("kerassave-fast bench: needs a source checkout (benches/run.py); not found", file=sys.stderr)
        return 2
    import subprocess

    return subprocess.call([sys.executable, os.path.abspath(script), *args])


def _thread_count(text: str) -> int:
    count = int(text)
    if not 0 <= count <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be from 0 (all cores) to {MAX_THREADS}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kerassave-fast", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="what a saved model or weights file holds")
    inspect.add_argument("file")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    verify = commands.add_parser("verify", help="check CRCs and structure (exit code 1 if anything is wrong)")
    verify.add_argument("file")
    verify.add_argument("--threads", type=_thread_count, default=0, help=f"0 (all cores) to {MAX_THREADS}")
    conv = commands.add_parser("convert", help="load SRC, save DST")
    conv.add_argument("source")
    conv.add_argument("destination")
    conv.add_argument("--compression", choices=("gzip", "zstd"))
    conv.add_argument("--compression-level", type=int)
    commands.add_parser("bench", help="run benches/run.py (a source checkout), with its arguments", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with _paths_printable(sys.stdout):
        return _run(args)


@contextlib.contextmanager
def _paths_printable(stream):
    """A path's bytes that are not UTF-8 (kept by Python as surrogates) printed as those bytes, as
    `ls` does, where a strict stream would raise UnicodeEncodeError (any UTF-8 locale's stdout)."""
    if not isinstance(stream, io.TextIOWrapper) or stream.errors != "strict":
        yield
        return
    stream.reconfigure(errors="surrogateescape")
    try:
        yield
    finally:
        stream.reconfigure(errors="strict")


def _one_line(text: str, limit: int = 500) -> str:
    """An error's first line, at most `limit` characters (Keras puts whole model configs in some)."""
    lines = text.strip().splitlines() or [""]
    first = lines[0]
    return first if len(lines) == 1 and len(first) <= limit else first[:limit].rstrip() + " [...]"


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "inspect":
            report = inspect_file(args.file)
            if args.json:
                print(json.dumps(report.to_json(), indent=1))
            else:
                _print_report(report)
            return 0
        if args.command == "verify":
            problems = verify_file(args.file, args.threads)
            for problem in problems:
                print(problem)
            print(f"{args.file}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
            return 1 if problems else 0
        options = {"compression": args.compression} if args.compression else {}
        if args.compression_level is not None:
            options["compression_level"] = args.compression_level
        convert(args.source, args.destination, **options)
        return 0
    except Exception as e:  # one line naming the file, not a traceback (a model stock cannot load, ...)
        named = getattr(args, "file", None) or args.source
        what = _one_line(str(e) if isinstance(e, _HDF5_ERRORS) else f"{type(e).__name__}: {e}")
        print(f"kerassave-fast {args.command}: {what if named in what else f'{named}: {what}'}", file=sys.stderr)
        return 1
