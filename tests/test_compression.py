"""Compressed HDF5 (`compression="gzip"|"zstd"`, `checksum=True`): stock h5py/Keras read ours
bitwise (zstd through hdf5plugin), we read ours and files h5py compressed with its own chunking,
and a damaged chunk is refused naming the file."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 -- registers zstd (filter 32015) in h5py's libhdf5: stock's way to read it
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import CUSTOM_OBJECTS, assert_same_state, state_of
from kerassave_fast import KerasSaveError
from kerassave_fast._core import TensorFile, hdf5_encode_chunks, hdf5_stored_datasets

sys.path.insert(0, str(Path(__file__).parent))
import tf_keras_models

SETTINGS = [
    {"compression": "gzip"},
    {"compression": "gzip", "compression_level": 1, "checksum": True},  # ISA-L's level 1
    {"compression": "gzip", "compression_level": 3},  # ISA-L's level 3
    {"compression": "zstd"},
    {"compression": "zstd", "compression_level": 9, "checksum": True},
    {"checksum": True},
]
# (filter ids h5py reports, in pipeline order) for each setting
FILTERS = {"gzip": ["32002", "1"], "zstd": ["32002", "32015"]}


def _ids(settings: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in settings.items())


def _filters_of(dataset: h5py.Dataset) -> list[str]:
    plist = dataset.id.get_create_plist()
    return [str(plist.get_filter(i)[0]) for i in range(plist.get_nfilters())]


def _expected_filters(settings: dict) -> list[str]:
    shuffle_codec = {"gzip": ["2", "1"], "zstd": ["2", "32015"]}.get(settings.get("compression"), [])
    return shuffle_codec + (["3"] if settings.get("checksum") else [])


def _check_layout(path, settings: dict, chunked_names: set[str] | None = None) -> None:
    """Every dataset with elements is chunked with the filters asked for; scalars stay contiguous."""

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.shape and obj.size:
            assert obj.chunks is not None, name
            assert _filters_of(obj) == _expected_filters(settings), name

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    listed = hdf5_stored_datasets(TensorFile(str(path)))
    assert any(chunking is not None for *_, chunking in listed)  # our reader reads them by chunk


@pytest.mark.parametrize("settings", SETTINGS, ids=_ids)
@pytest.mark.parametrize("name", ["convnet", "low_precision", "embedding_lstm"])
def test_keras3_files_round_trip_and_load_in_stock(model_zoo, tmp_path, name, settings):
    model = model_zoo(name)
    keras_path, h5_path, weights_path = tmp_path / "m.keras", tmp_path / "m.h5", tmp_path / "m.weights.h5"
    ksf.save_model(model, keras_path, **settings, chunk_bytes=4096)
    ksf.save_model(model, h5_path, **settings, chunk_bytes=4096)
    ksf.save_weights(model, weights_path, **settings, chunk_bytes=4096)
    _check_layout(weights_path, settings)
    _check_layout(h5_path, settings)
    assert_same_state(model, keras.saving.load_model(keras_path, custom_objects=CUSTOM_OBJECTS))  # stock
    assert_same_state(model, ksf.load_model(keras_path, custom_objects=CUSTOM_OBJECTS))
    assert_same_state(model, ksf.load_model(h5_path, custom_objects=CUSTOM_OBJECTS))
    for load in (keras.Model.load_weights, ksf.load_weights):  # stock, ours
        fresh = keras.models.clone_model(model)
        fresh.compile(optimizer=model.optimizer.__class__.from_config(model.optimizer.get_config()), loss="mse")
        fresh.optimizer.build(fresh.trainable_variables)
        load(fresh, weights_path)
        for a, b in zip(model.weights, fresh.weights, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Run in a process that never imported hdf5plugin: h5py there cannot undo zstd, so each chunk is ours to read.
_LOAD_WITHOUT_PLUGIN = """
import hashlib, json, sys
import h5py, numpy as np
import kerassave_fast as ksf
assert not h5py.h5z.filter_avail(32015), "zstd readable by h5py: the test would prove nothing"
keras_path, h5_path, weights_path = sys.argv[1:4]
def digest(model):
    variables = list(model.weights) + list(model.optimizer.variables)
    return [hashlib.sha256(np.asarray(v.numpy()).tobytes()).hexdigest() for v in variables]
from_keras, from_h5 = ksf.load_model(keras_path), ksf.load_model(h5_path)
before = digest(from_keras)
for v in from_keras.weights:
    v.assign(np.zeros(v.shape, v.dtype))
ksf.load_weights(from_keras, weights_path)
print(json.dumps([before, digest(from_h5), digest(from_keras)]))
"""


def test_zstd_files_load_here_without_hdf5plugin(model_zoo, tmp_path):
    """Ours reads zstd with no plugin: every chunk is decoded by the Rust core, the legacy `.h5`
    writers' bfloat16 (2-byte opaque, no `dtype` mark) included -- it once fell back to h5py."""
    model = model_zoo("low_precision")
    paths = [tmp_path / "m.keras", tmp_path / "m.h5", tmp_path / "m.weights.h5"]
    ksf.save_model(model, paths[0], compression="zstd", chunk_bytes=64)
    ksf.save_model(model, paths[1], compression="zstd", chunk_bytes=64)
    ksf.save_weights(model, paths[2], compression="zstd", chunk_bytes=64)
    opaque = []  # the legacy file's bfloat16 tensors: unmarked opaque, chunked
    with h5py.File(paths[1], "r") as f:
        f.visititems(lambda _, o: opaque.append(o.chunks is not None) if getattr(o, "dtype", None) == "V2" else None)
    assert opaque and all(opaque)
    run = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_PLUGIN, *map(str, paths)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = [hashlib.sha256(data.tobytes()).hexdigest() for _, data in state_of(model)]
    assert json.loads(run.stdout.splitlines()[-1]) == [expected] * 3


_REZIPPED_WITHOUT_PLUGIN = """
import hashlib, json, sys
import h5py, numpy as np
import kerassave_fast as ksf
from kerassave_fast import cli
assert not h5py.h5z.filter_avail(32015), "zstd readable by h5py: the test would prove nothing"
good, damaged = sys.argv[1:3]
model = ksf.load_model(good)
variables = list(model.weights) + list(model.optimizer.variables)
digests = [hashlib.sha256(np.asarray(v.numpy()).tobytes()).hexdigest() for v in variables]
try:
    ksf.load_model(damaged)
    refused = None
except ksf.KerasSaveError as e:
    refused = str(e)
print(json.dumps([digests, cli.main(["verify", good]), cli.main(["verify", damaged]), refused]))
"""


def _deflated_copy(path, to, damage: str | None = None) -> None:
    """`path` zipped again with every member DEFLATED (as a zip tool may), its weights member's
    largest chunk damaged if `damage` is "chunk", or its size in the chunk index made the member's
    if "index" (the zip's CRC then matches the damaged bytes)."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(to, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if damage and info.filename == "model.weights.h5":
                listed = hdf5_stored_datasets(data)
                chunks = (k for *_, c in listed if c is not None for k in c[2])
                offset, size, _, coords = max(chunks, key=lambda k: k[1])
                data = bytearray(data)
                if damage == "chunk":
                    data[offset + size // 2] ^= 0x10
                else:  # its B-tree key: size, filter mask, coordinates, 0, then the address
                    key = struct.pack(f"<II{len(coords) + 1}QQ", size, 0, *coords, 0, offset)
                    assert data.count(key) == 1
                    struct.pack_into("<I", data, data.index(key), len(data))
            target.writestr(info.filename, bytes(data))


def test_a_rezipped_keras_with_zstd_chunks_loads_and_verifies_without_hdf5plugin(model_zoo, tmp_path):
    """A `.keras` whose members another zip tool compressed: the Rust core decodes its zstd chunks
    from the inflated member (h5py got them before, and without hdf5plugin the load failed and
    `verify` reported problems that were not there); a damaged chunk is refused naming the file."""
    model = model_zoo("convnet")
    ksf.save_model(model, tmp_path / "m.keras", compression="zstd", chunk_bytes=2048)
    good, damaged = tmp_path / "good.keras", tmp_path / "damaged.keras"
    _deflated_copy(tmp_path / "m.keras", good)
    _deflated_copy(tmp_path / "m.keras", damaged, damage="chunk")
    run = subprocess.run(
        [sys.executable, "-c", _REZIPPED_WITHOUT_PLUGIN, str(good), str(damaged)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    digests, good_verified, damaged_verified, refused = json.loads(run.stdout.splitlines()[-1])
    assert digests == [hashlib.sha256(data.tobytes()).hexdigest() for _, data in state_of(model)]
    assert (good_verified, damaged_verified) == (0, 1)
    assert refused is not None and str(damaged) in refused


def test_a_rezipped_keras_with_a_lying_chunk_index_is_refused_naming_the_file(model_zoo, tmp_path):
    """The Rust core's walk of an inflated member refuses a chunk index pointing past it, naming
    the file (it named "<memory>" once)."""
    model = model_zoo("convnet")
    ksf.save_model(model, tmp_path / "m.keras", compression="zstd", chunk_bytes=2048)
    _deflated_copy(tmp_path / "m.keras", tmp_path / "lying.keras", damage="index")
    with pytest.raises(KerasSaveError, match=r"lying\.keras.*does not fit"):
        ksf.load_model(tmp_path / "lying.keras")


@pytest.mark.parametrize("settings", SETTINGS[:3], ids=_ids)
def test_tf_keras_h5_round_trips_and_loads_in_stock(tmp_path, settings):
    import tf_keras

    model = tf_keras_models.trained(tf_keras_models.convnet_batchnorm)
    path, weights_path = tmp_path / "m.h5", tmp_path / "w.h5"
    ksf.save_model(model, path, **settings, chunk_bytes=1000)
    ksf.save_weights(model, weights_path, **settings, chunk_bytes=1000)
    _check_layout(path, settings)
    for loaded in (tf_keras.models.load_model(path), ksf.load_model_as("tf_keras", path)):
        expected = model.weights + model.optimizer.variables()
        for a, b in zip(expected, loaded.weights + loaded.optimizer.variables(), strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    fresh = tf_keras.models.clone_model(model)
    fresh.load_weights(weights_path)  # stock
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_h5py_compressed_files_with_its_own_chunks_load_through_our_chunk_reader(model_zoo, tmp_path):
    """A file another writer compressed with h5py's automatic (N-dimensional) chunks and all three
    filters: every tensor is read by the Rust core's chunk reader, bitwise."""
    model = model_zoo("convnet")
    plain, packed = tmp_path / "plain.weights.h5", tmp_path / "packed.weights.h5"
    model.save_weights(plain)  # stock
    with h5py.File(plain) as src, h5py.File(packed, "w") as dst:

        def copy(name, obj):
            if isinstance(obj, h5py.Group):
                dst.require_group(name).attrs.update(dict(obj.attrs))
                return
            # every axis split in two, edge chunks included: not the row chunks we write
            chunks = tuple(max(1, (d + 1) // 2) for d in obj.shape)
            kwargs = {"chunks": chunks, "compression": "gzip", "shuffle": True, "fletcher32": True} if obj.ndim else {}
            dst.create_dataset(name, data=obj[()], **kwargs).attrs.update(dict(obj.attrs))

        dst.attrs.update(dict(src.attrs))
        src.visititems(copy)
    listed = hdf5_stored_datasets(TensorFile(str(packed)))
    assert all(chunking is not None for _, _, shape, _, chunking in listed if shape), "not all read by chunk"
    assert any(len(shape) == 4 and len(chunking[2]) == 16 for _, _, shape, _, chunking in listed if chunking)
    fresh = keras.models.clone_model(model)
    fresh.build(model.input_shape)
    ksf.load_weights(fresh, packed)
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _flip_in_first_big_chunk(path) -> None:
    listed = hdf5_stored_datasets(TensorFile(str(path)))
    chunks = max((c[2] for *_, c in listed if c is not None), key=lambda ch: max(k[1] for k in ch))
    offset, size, _, _ = max(chunks, key=lambda k: k[1])
    data = bytearray(Path(path).read_bytes())
    data[offset + size // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("settings", [{"compression": "gzip"}, {"compression": "zstd"}, {"checksum": True}], ids=_ids)
def test_a_damaged_chunk_is_refused_naming_the_file(model_zoo, tmp_path, settings):
    model = model_zoo("convnet")
    path = tmp_path / "m.weights.h5"
    ksf.save_weights(model, path, **settings, chunk_bytes=2048)
    _flip_in_first_big_chunk(path)
    fresh = keras.models.clone_model(model)
    fresh.build(model.input_shape)
    with pytest.raises(KerasSaveError, match=str(path)) as raised:
        ksf.load_weights(fresh, path)
    if settings.get("checksum"):
        assert "Fletcher-32" in str(raised.value)


def test_a_compressed_keras_member_is_checked_and_read(model_zoo, tmp_path):
    """In a `.keras`, the zip's CRC-32 covers the compressed member too: a flipped byte is refused."""
    model = model_zoo("convnet")
    path = tmp_path / "m.keras"
    ksf.save_model(model, path, compression="gzip")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises((KerasSaveError, ValueError, OSError), match=r"m\.keras"):
        ksf.load_model(path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": "lz4"},
        {"compression": "gzip", "compression_level": 10},
        {"compression": "zstd", "compression_level": 0},
        {"compression_level": 3},
        {"chunk_bytes": 4096},
        {"compression": "gzip", "chunk_bytes": 0},
        {"compression": "gzip", "compression_level": 4.0},
        {"compression": "zstd", "compression_level": 3.0},
        {"compression": "gzip", "chunk_bytes": 4096.0},
        {"checksum": "yes"},
    ],
    ids=str,
)
def test_bad_compression_arguments_are_refused(model_zoo, tmp_path, kwargs):
    with pytest.raises(ValueError):
        ksf.save_model(model_zoo("seed_example"), tmp_path / "m.keras", **kwargs)
    assert not (tmp_path / "m.keras").exists()


def test_compression_where_it_does_not_apply_is_refused(model_zoo, tmp_path):
    with pytest.raises(ValueError, match="compression"):
        ksf.save_model(model_zoo("seed_example"), tmp_path / "m.keras", compression="gzip", zipped=False)
    with pytest.raises(ValueError, match="compression"):
        ksf.save_weights(model_zoo("seed_example"), tmp_path / "m.weights.json", compression="gzip")
    model = tf_keras_models.trained(tf_keras_models.dense_adam)
    with pytest.raises(ValueError, match="compression"):
        ksf.save_model(model, tmp_path / "saved_model", compression="gzip")
    assert not (tmp_path / "saved_model").exists()


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32", "float64", "complex128"])
def test_shuffled_chunks_match_libhdf5_both_ways_for_every_element_size(tmp_path, dtype):
    """Our byte shuffle (vector kernels for 2-, 4- and 8-byte elements, the rest and every tail
    byte by byte) against libhdf5's: chunks we encode read back through h5py, and chunks h5py
    encoded decode here, bitwise. 999 elements a chunk: 62 blocks of 16 and a tail; a partial edge chunk."""
    dt = np.dtype(dtype)
    array = np.random.default_rng(0).integers(0, 256, 1000 * 3 * dt.itemsize, np.uint8).view(dt).reshape(1000, 3)
    rows = 333
    ours, theirs = tmp_path / "ours.h5", tmp_path / "theirs.h5"
    with h5py.File(ours, "w") as f:
        d = f.create_dataset("x", array.shape, dt, chunks=(rows, 3), shuffle=True, compression="gzip")
        for start in range(0, len(array), rows):
            raw = np.zeros((rows, 3), dt)
            raw[: len(array) - start] = array[start : start + rows]
            (stored,) = hdf5_encode_chunks([raw.reshape(-1).view(np.uint8)], [2, 1], 1, dt.itemsize)
            d.id.write_direct_chunk((start, 0), stored)
    with h5py.File(ours, "r") as f:
        assert f["x"][()].tobytes() == array.tobytes()

    with h5py.File(theirs, "w") as f:
        f.create_dataset("x", data=array, chunks=(rows, 3), shuffle=True, compression="gzip")
    file = TensorFile(str(theirs))
    listed = [entry for entry in hdf5_stored_datasets(file) if entry[0] == "/x"]
    if dt.kind == "c":  # not a type the listing reads (h5py's path): the other direction is what counts
        assert not listed
        return
    ((name, _, shape, _, chunking),) = listed
    out = np.empty(array.shape, dt)
    file.read_chunked(0, [(name, chunking, shape, dt.itemsize, out.reshape(-1).view(np.uint8))])
    assert out.tobytes() == array.tobytes()


def test_booleans_and_complex_numbers_are_stored_uncompressed():
    """HDF5 stores them as enums and compounds, which only h5py reads here: chunked with zstd, they
    would need hdf5plugin to load. Numbers and bfloat16 are compressed."""
    from kerassave_fast.formats.weights_h5 import PlannedDataset
    from kerassave_fast.tensors import BFLOAT16

    dtypes = ["bool", "complex64", "int8", "uint16", "float16", "float64", BFLOAT16]
    compressible = [PlannedDataset("g", "0", np.zeros((4, 2), d)).compressible for d in dtypes]
    assert compressible == [False, False, True, True, True, True, True]


def test_the_size_hint_of_a_compressed_member_bounds_its_size(tmp_path):
    """Tiny chunks cost more per chunk than their bytes (B-tree entries, framing): the hint that
    decides ZIP64 before the member is written must still be an upper bound."""
    from kerassave_fast.formats.weights_h5 import Compression, WeightsPlan, write_compressed

    plan = WeightsPlan()
    plan.add_group("g")
    for i in range(3):
        plan.add_dataset("g", str(i), np.random.default_rng(i).normal(size=(20000, 8)).astype("float32"))
    plan.add_dataset("g", "scalar", np.float32(1.0))
    for codec in ("gzip", "zstd"):
        compression = Compression.from_arguments(codec, chunk_bytes=32, checksum=True)
        with open(tmp_path / f"{codec}.h5", "w+b") as f:
            size = write_compressed(ksf._core.TensorFile(f.name, writable=True), 0, plan, compression)
        raw = sum(d.array.nbytes for d in plan.datasets)
        assert 2 * raw + (1 << 20) < size <= compression.size_bound(plan)  # the old hint was short


def test_the_size_hint_bounds_many_small_tensors_and_strings(tmp_path):
    """Each chunked dataset costs kilobytes of header and chunk index whatever its size, and
    h5py stores a string array's strings, not its pointers: both once outgrew the hint."""
    from kerassave_fast.formats.weights_h5 import Compression, WeightsPlan, write_compressed

    plan = WeightsPlan()
    for i in range(300):
        plan.add_group(f"layer{i}")
        plan.add_dataset(f"layer{i}", "0", np.full(2, i, "float32"))
    plan.add_group("vocabulary")
    plan.add_dataset("vocabulary", "0", np.array(["x" * 5000] * 100, dtype=object))
    for codec in ("gzip", "zstd"):
        compression = Compression.from_arguments(codec, checksum=True)
        with open(tmp_path / f"{codec}.h5", "w+b") as f:
            size = write_compressed(TensorFile(f.name, writable=True), 0, plan, compression)
        assert size <= compression.size_bound(plan)
        with h5py.File(tmp_path / f"{codec}.h5", "r") as f:
            assert f["layer299/0"][1] == 299 and f["vocabulary/0"][99] == b"x" * 5000


# A registered layer with a boolean variable, defined alike here and in a process without hdf5plugin.
_FLAGS_LAYER = """
import keras
@keras.saving.register_keras_serializable(package="kerassave_fast_tests")
class Flags(keras.layers.Layer):
    def build(self, input_shape):
        self.flags = self.add_weight(shape=(input_shape[-1],), dtype="bool", initializer="zeros", trainable=False)
    def call(self, x):
        return keras.ops.where(self.flags, x, 0.0)
"""


def test_a_model_with_a_boolean_variable_saved_with_zstd_loads_without_hdf5plugin(tmp_path):
    """Booleans are stored uncompressed (HDF5 enums: only h5py reads them here), so the zstd file
    still loads without a plugin, the flags and the zstd-compressed kernel bitwise."""
    namespace: dict = {}
    exec(_FLAGS_LAYER, namespace)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(6), namespace["Flags"]()])
    flags = model.layers[-1].flags
    flags.assign(np.arange(6) % 2 == 0)
    path = tmp_path / "m.keras"
    ksf.save_model(model, path, compression="zstd", chunk_bytes=64)
    script = (
        "import sys, h5py, numpy as np, kerassave_fast as ksf\n"
        + _FLAGS_LAYER
        + "assert not h5py.h5z.filter_avail(32015)\n"
        "m = ksf.load_model(sys.argv[1])\n"
        "print([np.asarray(v.numpy()).tobytes().hex() for v in m.weights])\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = [np.asarray(v.numpy()).tobytes().hex() for v in model.weights]
    assert run.stdout.splitlines()[-1] == str(expected)


def test_tensors_left_uncompressed_are_written_whole(tmp_path):
    """Booleans, complex numbers and scalars stay contiguous in a compressed file: HDF5 reserves
    them writing only their first element, and the rest of their bytes must follow (they once did
    not: every element but the first read back as zero)."""
    from kerassave_fast.formats.weights_h5 import Compression, WeightsPlan, write_compressed

    rng = np.random.default_rng(0)
    arrays = {
        "flags": rng.random((5, 3)) < 0.5,
        "phases": (rng.normal(size=7) + 1j * rng.normal(size=7)).astype("complex64"),
        "scalar": np.float32(3.5),
        "kernel": rng.normal(size=(300, 8)).astype("float32"),
    }
    plan = WeightsPlan()
    plan.add_group("g")
    for name, array in arrays.items():
        plan.add_dataset("g", name, array)
    for codec in ("gzip", "zstd"):
        path = tmp_path / f"{codec}.h5"
        with open(path, "w+b") as f:
            write_compressed(
                TensorFile(f.name, writable=True), 0, plan, Compression.from_arguments(codec, chunk_bytes=256)
            )
        with h5py.File(path, "r") as f:
            assert f["g/kernel"].chunks is not None and f["g/flags"].chunks is None
            for name, array in arrays.items():
                assert np.asarray(f["g"][name][()]).tobytes() == np.asarray(array).tobytes(), (codec, name)


def test_numpy_integers_are_taken_as_integers(model_zoo, tmp_path):
    model = model_zoo("seed_example")
    ksf.save_weights(
        model, tmp_path / "w.weights.h5", compression="gzip", compression_level=np.int64(5), chunk_bytes=np.int64(4096)
    )
    with h5py.File(tmp_path / "w.weights.h5") as f:
        chunked = []
        f.visititems(
            lambda _, d: chunked.append(d.compression_opts) if isinstance(d, h5py.Dataset) and d.chunks else None
        )
    assert chunked and set(chunked) == {5}


def _decoded_chunk(stored: bytes, itemsize: int) -> bytes:
    """A chunk stored with shuffle + deflate, as libhdf5 undoes the two filters."""
    shuffled = np.frombuffer(zlib.decompress(stored), np.uint8)
    return shuffled.reshape(itemsize, -1).T.tobytes()


def _compressed_ahead(arrays: list[np.ndarray], chunk_bytes: int = 1 << 20):
    from kerassave_fast.formats.weights_h5 import Compression, _ChunksAhead

    return _ChunksAhead(arrays, Compression(codec="gzip", level=1, chunk_bytes=chunk_bytes), threads=1)


def test_the_compressor_runs_ahead_past_tensor_ends_and_small_tensors():
    # Bounded in batches, it stopped two items ahead (a tensor's end counted as one), idle while
    # HDF5 stored a large batch: here it must compress every small tensor with nothing taken.
    arrays = [np.full((64, 16), i, np.float32) for i in range(12)]
    ahead = _compressed_ahead(arrays)
    try:
        ahead._thread.join(timeout=60)
        assert not ahead._thread.is_alive(), "the compressor waited for the writer with little ahead"
        for i, array in enumerate(arrays):
            (offsets, stored), *more = list(ahead.batches())
            assert not more and offsets == [(0, 0)]
            decoded = np.frombuffer(_decoded_chunk(bytes(stored[0]), array.dtype.itemsize), np.float32)
            np.testing.assert_array_equal(decoded.reshape(array.shape), array, err_msg=f"tensor {i}")
    finally:
        ahead.close()


def test_the_compressor_holds_at_most_its_byte_bound_ahead(monkeypatch):
    """Counted in raw bytes: zeros compress to almost nothing, yet each stored chunk came from (and
    may have held) its raw size. A bound of 2.5 batches holds two."""
    from kerassave_fast.formats import weights_h5

    monkeypatch.setattr(weights_h5, "_COMPRESS_BATCH", 1 << 16)
    monkeypatch.setattr(weights_h5, "_BYTES_AHEAD", 5 << 15)
    zeros = np.zeros((1024, 256), np.float32)  # 16 batches of 4 chunks
    ahead = _compressed_ahead([zeros], chunk_bytes=1 << 14)
    try:
        deadline = time.monotonic() + 60
        while ahead._ahead < 2 << 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # and it stays there, waiting for the writer
        assert ahead._thread.is_alive()
        assert ahead._ahead == 2 << 16 and len(ahead._ready) == 2
        taken = b"".join(_decoded_chunk(bytes(s), 4) for _, stored in ahead.batches() for s in stored)
        assert taken == zeros.tobytes()
    finally:
        ahead.close()
