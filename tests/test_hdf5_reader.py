"""The Rust core's HDF5 listing (no libhdf5) against h5py's, the reference: on every file stock
Keras writes and on the layouts h5py can produce, the same datasets at the same offsets with the
same shapes and dtypes; anything the listing leaves out goes through h5py and stock's checks.
Mutated files give a list or a `KerasSaveError`, never a crash."""

from __future__ import annotations

import io
import random
import struct
import zipfile

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import MODELS
from kerassave_fast._core import KerasSaveError, TensorFile, hdf5_stored_datasets
from kerassave_fast.formats.weights_h5 import _listed_by_h5py, listed_by_rust
from test_legacy_h5 import stock_save


def _views(path) -> tuple[set, set]:
    """(Rust's listing, h5py's listing) of the HDF5 file at `path`, as comparable sets."""
    with open(path, "rb") as f:
        data = f.read()
    rust = listed_by_rust(TensorFile(str(path)), 0, len(data))
    assert rust is not None, f"the Rust listing refused {path}"
    with h5py.File(io.BytesIO(data), "r") as h5:
        reference = _listed_by_h5py(h5)  # contiguous datasets only
    as_set = lambda tensors: {(t.name, t.offset, t.shape, t.dtype.name) for t in tensors}  # noqa: E731
    return as_set(t for t in rust if t.chunking is None), as_set(reference)


def _chunked_as_h5py_reads_them(path) -> set[str]:
    """Names of the datasets the Rust listing reads by chunk, each checked to decode (Rust core)
    to exactly what h5py reads."""
    file = TensorFile(str(path))
    chunked = [t for t in listed_by_rust(file, 0, file.size()) if t.chunking is not None]
    with h5py.File(path, "r") as h5:
        for t in chunked:
            out = np.empty(t.shape, t.dtype)
            file.read_chunked(0, [(t.name, t.chunking, t.shape, t.dtype.itemsize, out.reshape(-1).view(np.uint8))])
            np.testing.assert_array_equal(out, h5[t.name][()], err_msg=t.name)
    return {t.name.rsplit("/", 1)[-1] for t in chunked}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_stock_file_is_listed_as_h5py_lists_it(model_zoo, tmp_path, name):
    model = model_zoo(name)
    keras.saving.save_model(model, tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as z:
        (tmp_path / "member.h5").write_bytes(z.read("model.weights.h5"))
    model.save_weights(tmp_path / "m.weights.h5")
    stock_save(model, tmp_path / "m.h5")
    for file in ("member.h5", "m.weights.h5", "m.h5"):
        rust, reference = _views(tmp_path / file)
        only_rust, only_h5py = sorted(rust - reference)[:3], sorted(reference - rust)[:3]
        assert rust == reference, f"{name} {file}: only Rust {only_rust}, only h5py {only_h5py}"
        assert rust, f"{name} {file}: nothing listed"


def _write_layouts(path, libver, track_order) -> None:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w", libver=libver, track_order=track_order) as f:
        f.attrs["model_config"] = "x" * 70_000  # an attribute large enough for dense storage (latest)
        many = f.create_group("many")  # more links than compact storage holds
        for i in range(40):
            many.create_dataset(str(i), data=rng.standard_normal((i + 1,)).astype("float32"))
        plain = f.create_group("layers/dense/vars")
        for dtype in ("float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32"):
            plain[dtype] = rng.integers(0, 100, (3, 5)).astype(dtype)
        plain["int64"] = np.arange(7, dtype="int64")
        plain["scalar"] = np.float32(3.5)
        plain["empty"] = np.zeros((0, 4), "float32")
        plain["bool"] = np.array([True, False])
        plain["big_endian"] = np.arange(4, dtype=">f4")
        plain["strings"] = np.array([b"a", b"bc"])
        plain.create_dataset("never_written", (4, 4), "float32")
        plain.create_dataset("gzip", data=np.ones((64, 64), "float32"), compression="gzip", shuffle=True)
        plain.create_dataset("fletcher32", data=np.ones((8,), "float32"), fletcher32=True)
        plain.create_dataset("chunked", data=np.ones((8, 8), "float32"), chunks=(4, 4))
        ds = plain.create_dataset("bf16", data=np.arange(6).astype(ml_dtypes.bfloat16))
        ds.attrs["dtype"] = "bfloat16"
        plain.create_dataset("opaque_no_attr", data=np.arange(6).astype(ml_dtypes.bfloat16))
        plain["soft"] = h5py.SoftLink("/layers/dense/vars/float32")
        plain["external"] = h5py.ExternalLink("other.h5", "/x")
        plain["hard_again"] = plain["float64"]  # one object, two names: listed once


@pytest.mark.parametrize("libver", ["earliest", "latest"])
@pytest.mark.parametrize("track_order", [False, True])
def test_h5py_layouts_are_listed_as_h5py_lists_them(tmp_path, libver, track_order):
    path = tmp_path / "layouts.h5"
    _write_layouts(path, libver, track_order)
    rust, reference = _views(path)
    # "hard_again" and "float64" name one object: each lister keeps the first name it reaches.
    # Booleans (an HDF5 enum) are left to h5py, which converts them.
    assert {t[1:] for t in rust} == {t[1:] for t in reference if t[3] != "bool"}
    names = {t[0].rsplit("/", 1)[-1] for t in rust}
    assert len(rust) == 40 + 13, sorted(names)  # 9 dtypes, int64, scalar, bf16, unmarked opaque
    assert names.isdisjoint({"big_endian", "strings", "never_written", "gzip", "fletcher32", "chunked", "soft"})
    assert "bf16" in names and "empty" not in names
    # Unmarked 2-byte opaque (the legacy `.h5` writers' bfloat16) is read as h5py reads it: raw "|V2".
    assert {t[3] for t in rust if t[0].endswith("/opaque_no_attr")} == {np.dtype("|V2").name}
    # Chunked datasets indexed by a version 1 B-tree (h5py's default) are read by chunk; the chunk
    # indexes of `libver="latest"` (fixed/extensible arrays, version 2 B-trees) are left to h5py.
    expected = {"gzip", "fletcher32", "chunked"} if libver == "earliest" else set()
    assert _chunked_as_h5py_reads_them(path) == expected


def test_a_user_block_is_left_to_h5py(tmp_path):
    """Addresses then count from the superblock, not from the file's start (Keras never writes one)."""
    path = tmp_path / "userblock.h5"
    with h5py.File(path, "w", userblock_size=1024) as f:
        f["x"] = np.arange(10, dtype="float32")
    assert hdf5_stored_datasets(TensorFile(str(path))) is None


def test_bytes_and_file_sources_agree(model_zoo, tmp_path):
    model_zoo("seed_example").save_weights(tmp_path / "m.weights.h5")
    data = (tmp_path / "m.weights.h5").read_bytes()
    padded = b"\0" * 100 + data  # the HDF5 file at an offset, as a member inside a zip
    (tmp_path / "padded").write_bytes(padded)
    from_file = hdf5_stored_datasets(TensorFile(str(tmp_path / "padded")), 100, len(data))
    assert from_file == hdf5_stored_datasets(data) == hdf5_stored_datasets(padded, 100, len(data))
    assert from_file


def _mutants(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        mutated = bytearray(data)
        kind = rng.randrange(4)
        at = rng.randrange(len(data))
        if kind == 0:
            mutated[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            mutated[at] = rng.choice((0, 0xFF))
        elif kind == 2:
            mutated[at : at + 8] = rng.choice((2**63 - 1, 2**32, len(data) - 8)).to_bytes(8, "little")
        else:
            mutated = mutated[:at]
        yield bytes(mutated[: len(data)])


def test_mutated_files_give_a_listing_or_a_clean_error(model_zoo, tmp_path):
    """Bytes flipped, zeroed, set to huge offsets, cut: the listing returns datasets inside the
    file, None (left to h5py) or raises `KerasSaveError` naming the file."""
    model = model_zoo("optimizer_adam")
    stock_save(model, tmp_path / "m.h5")
    model.save_weights(tmp_path / "m.weights.h5")
    outcomes = {"listed": 0, "left to h5py": 0, "refused": 0}
    for seed, file in enumerate(("m.h5", "m.weights.h5")):
        data = (tmp_path / file).read_bytes()
        for mutated in _mutants(data, 1500, seed):
            try:
                listed = hdf5_stored_datasets(mutated)
            except KerasSaveError as e:
                assert str(e).startswith("<memory>: corrupted HDF5 file"), e
                outcomes["refused"] += 1
                continue
            if listed is None:
                outcomes["left to h5py"] += 1
                continue
            for name, offset, shape, dtype, chunking in listed:
                nbytes = int(np.prod(shape)) * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)
                stretches = [(offset, nbytes)] if chunking is None else [(o, n) for o, n, _, _ in chunking[2]]
                for at, n in stretches:
                    assert 0 < nbytes and at + n <= len(mutated), (name, at, n, len(mutated))
            outcomes["listed"] += 1
    assert all(outcomes.values()), outcomes


HANGS_STOCK = """
import sys
import kerassave_fast as ksf
try:
    ksf.load_model(sys.argv[1])
except Exception as e:
    print(type(e).__name__, e)
"""


def _grow_last_heap_object(data: bytearray) -> None:
    """Grows the size of the last object of the first global heap collection by 16 bytes, so the
    next object header libhdf5 reads lies inside the zero-filled free space: index 0, size 0."""
    collection = data.index(b"GCOL")
    end = collection + int.from_bytes(data[collection + 8 : collection + 16], "little")
    at, last = collection + 16, None
    while at + 16 <= end:
        index, size = int.from_bytes(data[at : at + 2], "little"), int.from_bytes(data[at + 8 : at + 16], "little")
        if index == 0:
            assert size >= 64, "too little free space to land in"
            break
        last, at = at, at + 16 + (size + 7) // 8 * 8
    size = int.from_bytes(data[last + 8 : last + 16], "little")
    data[last + 8 : last + 16] = (size + 16).to_bytes(8, "little")


@pytest.mark.parametrize("flavour", ["keras", "tf_keras"])
def test_a_file_libhdf5_hangs_on_is_refused_naming_it(model_zoo, tmp_path, flavour):
    """A `.h5` whose global heap (where h5py keeps `str` attributes) has its last object's size
    grown: libhdf5 then loops forever reading `model_config` (stock Keras hangs, and h5py: checked
    here with a timeout); ours refuses the file, naming it."""
    import os
    import subprocess
    import sys

    path = tmp_path / "m.h5"
    if flavour == "keras":
        stock_save(model_zoo("optimizer_adam"), path)
    else:
        import tf_keras

        tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)]).save(path)
    data = bytearray(path.read_bytes())
    _grow_last_heap_object(data)
    path.write_bytes(bytes(data))
    h5py_read = "import h5py, sys; h5py.File(sys.argv[1], 'r').attrs.get('model_config')"
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", h5py_read, str(path)], capture_output=True, timeout=10)
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1" if flavour == "tf_keras" else "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-c", HANGS_STOCK, str(path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.stdout.startswith("KerasSaveError"), run.stdout + run.stderr[-2000:]
    assert str(path) in run.stdout and "global heap" in run.stdout


def test_damaged_datatypes_on_h5pys_path_are_refused(tmp_path):
    """Datasets the Rust listing leaves out go through h5py; there, a float of no IEEE layout (a
    flipped bit in its datatype message: libhdf5 converts the bytes into other numbers) is refused,
    and a standard one served."""
    from h5py import h5d, h5s, h5t

    from kerassave_fast.formats.weights_h5 import consistent

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["standard"] = np.arange(4, dtype="float32")
        odd = h5t.IEEE_F32LE.copy()
        odd.set_ebias(100)  # what a flipped exponent-bias byte makes of a float32
        dsid = h5d.create(f.id, b"odd", odd, h5s.create_simple((4,)))
        dsid.write(h5s.ALL, h5s.ALL, np.arange(4, dtype="float32"))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert consistent(f["standard"]) is not None
        with pytest.raises(KerasSaveError, match=r"f\.h5: dataset '/odd' has a floating-point type of no standard"):
            consistent(f["odd"])
    assert [d[0] for d in hdf5_stored_datasets(TensorFile(str(tmp_path / "f.h5")))] == ["/standard"]


MOVED_BIAS = """
import os, sys
import numpy as np
import kerassave_fast as ksf
if os.environ["TF_USE_LEGACY_KERAS"] == "1":
    import tf_keras as keras
else:
    import keras
original, moved = (keras.models.load_model(p, compile=False).get_weights() for p in sys.argv[1:3])
print("stock:", "different" if any((a != b).any() for a, b in zip(original, moved)) else "same")
try:
    ksf.load_model(sys.argv[2])
    print("ours: loaded")
except Exception as e:
    print("ours:", type(e).__name__, e)
"""


@pytest.mark.parametrize("flavour", ["keras", "tf_keras"])
def test_a_data_address_moved_onto_metadata_is_refused(model_zoo, tmp_path, flavour):
    """A bias whose contiguous data address is damaged so that it points into a B-tree node: stock
    loads those bytes as the bias, silently; ours refuses the file, naming it."""
    import os
    import subprocess
    import sys

    path, moved = tmp_path / "m.h5", tmp_path / "moved.h5"
    if flavour == "keras":
        stock_save(model_zoo("optimizer_adam"), path)
    else:
        import tf_keras

        tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2)]).save(path)
    data = bytearray(path.read_bytes())
    with h5py.File(path, "r") as f:
        bias = next(f[n] for n in _all_datasets(f) if n.rsplit("/", 1)[-1].startswith("bias"))
        address = bias.id.get_offset().to_bytes(8, "little")
    assert data.count(address) == 1
    at = data.index(address)
    data[at : at + 8] = (data.index(b"TREE") + 8).to_bytes(8, "little")
    moved.write_bytes(bytes(data))
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1" if flavour == "tf_keras" else "0", "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-c", MOVED_BIAS, str(path), str(moved)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert "stock: different" in run.stdout, run.stdout + run.stderr[-2000:]
    assert f"ours: KerasSaveError {moved}: corrupted HDF5 file: the bytes of dataset" in run.stdout, run.stdout


def _all_datasets(f: h5py.File) -> list[str]:
    names = []
    f.visititems(lambda name, o: names.append(name) if isinstance(o, h5py.Dataset) else None)
    return names


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _decode_chunked(path) -> dict[str, np.ndarray]:
    """Every dataset the Rust core reads by chunk, decoded by it."""
    file = TensorFile(str(path))
    chunked = [d for d in hdf5_stored_datasets(file) or [] if d[4] is not None]
    outs = {name: np.empty(shape, _numpy_dtype(dtype)) for name, _, shape, dtype, _ in chunked}
    items = [(n, c, s, outs[n].itemsize, outs[n].reshape(-1).view(np.uint8)) for n, _, s, _, c in chunked]
    file.read_chunked(0, items)
    return outs


def test_mutated_compressed_files_decode_exactly_or_are_refused(model_zoo, tmp_path):
    """Compressed files (ours with gzip + Fletcher-32 and zstd; h5py's own N-dimensional chunks),
    mutated: the listing and the Rust core's chunk reader give the original values, leave the
    dataset to h5py, or raise `KerasSaveError` naming the file -- never other values, never a crash."""
    model = model_zoo("convnet")
    files = {
        "gzip.weights.h5": {"compression": "gzip", "checksum": True},
        "zstd.weights.h5": {"compression": "zstd"},
    }
    for name, settings in files.items():
        ksf.save_weights(model, tmp_path / name, chunk_bytes=512, **settings)
    with h5py.File(tmp_path / "gzip.weights.h5") as src, h5py.File(tmp_path / "h5py.weights.h5", "w") as dst:

        def copy(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.ndim:
                chunks = tuple(max(1, d // 2) for d in obj.shape)
                dst.create_dataset(name, data=obj[()], chunks=chunks, compression="gzip")

        src.visititems(copy)
    with h5py.File(tmp_path / "h5py.weights.h5") as h5:  # the decoder against libhdf5's, once
        for name, values in _decode_chunked(tmp_path / "h5py.weights.h5").items():
            np.testing.assert_array_equal(values, h5[name][()])
    outcomes = {"decoded": 0, "refused": 0, "left to h5py": 0}
    for seed, name in enumerate((*files, "h5py.weights.h5")):
        data = (tmp_path / name).read_bytes()
        original = _decode_chunked(tmp_path / name)
        assert original
        for i, mutated in enumerate(_mutants(data, 400, 100 + seed)):
            path = tmp_path / f"mutant-{i % 2}.h5"
            path.write_bytes(mutated)
            try:
                decoded = _decode_chunked(path)
            except KerasSaveError as e:
                assert str(path) in str(e), e
                outcomes["refused"] += 1
                continue
            if not decoded:
                outcomes["left to h5py"] += 1
                continue
            for dataset, out in decoded.items():
                expected = original.get(dataset)
                if expected is not None and expected.shape == out.shape and expected.dtype == out.dtype:
                    np.testing.assert_array_equal(out, expected, err_msg=f"{name} mutant {i}: {dataset}")
            outcomes["decoded"] += 1
    assert all(outcomes.values()), outcomes


def test_chunks_out_of_proportion_to_their_dataset_are_left_to_h5py(tmp_path):
    """Each chunk read in parallel allocates its raw size: a one-element dataset declaring a 1 GiB
    chunk (a few stored bytes of deflate) must not take a gigabyte per core. h5py reads it, one
    chunk at a time; chunks a little past an extendible dataset's end are still read here."""
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "huge_chunk", data=np.ones(1, "float32"), maxshape=(None,), chunks=(1 << 21,), compression="gzip"
        )
        f.create_dataset("resizable", data=np.ones(10, "float32"), maxshape=(None,), chunks=(1024,), compression="gzip")
    assert [d[0] for d in hdf5_stored_datasets(TensorFile(str(path)))] == ["/resizable"]


def _set_filter_parameter(path, filter_id: int, name: bytes, value: int) -> int:
    """Sets the one parameter of the filter `filter_id` in the file's pipeline message (as h5py
    writes it: id, name length 8, flags 1, one parameter, the name); returns the old one."""
    data = bytearray(path.read_bytes())
    description = struct.pack("<4H", filter_id, 8, 1, 1) + name.ljust(8, b"\0")
    at = data.index(description) + len(description)
    (old,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at, value)
    path.write_bytes(data)
    return old


def test_a_shuffle_parameter_other_than_the_element_size_reads_as_h5py_reads_it(tmp_path):
    """libhdf5 unshuffles by the shuffle filter's own parameter (h5py writes the element size
    there): a float32 dataset whose parameter says 2 reads other values than unshuffling by 4."""
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(4096, dtype="float32"), chunks=(1024,), compression="gzip", shuffle=True)
    assert _chunked_as_h5py_reads_them(path) == {"x"}
    assert _set_filter_parameter(path, 2, b"shuffle", 2) == 4
    with h5py.File(path, "r") as h5:
        assert not np.array_equal(h5["x"][()], np.arange(4096, dtype="float32"))
    assert _chunked_as_h5py_reads_them(path) == set()


def test_a_deflate_level_libhdf5_refuses_is_refused_as_stock_refuses_it(tmp_path):
    """libhdf5's deflate filter refuses a level past 9 on read: h5py fails there, and so must we
    (the dataset is left to h5py, which raises), not decode what stock cannot read."""
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(4096, dtype="float32"), chunks=(1024,), compression="gzip")
    assert [d[0] for d in hdf5_stored_datasets(TensorFile(str(path)))] == ["/x"]
    assert _set_filter_parameter(path, 1, b"deflate", 10) == 4
    with h5py.File(path, "r") as h5, pytest.raises(OSError):
        h5["x"][()]
    assert hdf5_stored_datasets(TensorFile(str(path))) == []


def _h5(build) -> bytearray:
    data = io.BytesIO()
    with h5py.File(data, "w") as h5:
        build(h5)
    return bytearray(data.getvalue())


def _left_to_libhdf5(data: bytes) -> list[str]:
    left: list[str] = []
    assert hdf5_stored_datasets(bytes(data), 0, len(data), None, "m.h5", left) is not None
    return left


def _plain(h5) -> None:
    h5["layers/dense/vars/0"] = np.ones((2, 2), "f4")
    h5["layers/dense/vars/1"] = np.ones(3, "f4")


def _message(data: bytes, name: str, kind: int) -> int:
    """Where the first message of type `kind` in `name`'s version 1 object header starts."""
    with h5py.File(io.BytesIO(bytes(data)), "r") as h5:
        address = h5py.h5o.get_info(h5[name].id).addr
    version, _, _, _, size = struct.unpack_from("<BBHII", data, address)
    assert version == 1
    at = address + 16
    while at + 8 <= address + 16 + size:
        found, length = struct.unpack_from("<HH", data, at)
        if found == kind:
            return at
        at += 8 + length
    raise AssertionError(f"{name}: no message of type {kind}")


def test_the_walk_leaves_to_libhdf5_what_h5py_may_see_otherwise():
    """The listing is only the whole file (nothing left to libhdf5: the command line then needs no
    h5py) when h5py would see the same: each departure below is reported."""
    assert _left_to_libhdf5(_h5(_plain)) == []

    def linked_twice(h5):  # h5py's visit names it a/x, the walk would meet z first
        h5["a/x"] = np.arange(4, dtype="f4")
        h5["z"] = h5["a/x"]

    assert _left_to_libhdf5(_h5(linked_twice)) == ["/a/x"]

    def tagged(h5):  # h5py's readers (ours, the CLI's) take a `dtype` attribute's word for the type
        h5.create_dataset("w", data=np.ones(3, "f4")).attrs["dtype"] = "bfloat16"

    assert _left_to_libhdf5(_h5(tagged)) == ["/w"]

    short = _h5(_plain)  # an end-of-file address before the file's end: libhdf5 refuses what lies past it
    struct.pack_into("<Q", short, 40, len(short) - 8)  # superblock version 0: the address at byte 40
    assert any("superblock says" in what for what in _left_to_libhdf5(short))

    unknown = _h5(_plain)  # the fill value message made a type unknown to the walk, "fail if unknown"
    at = _message(unknown, "layers/dense/vars/0", 5)
    struct.pack_into("<H", unknown, at, 0x2F)
    unknown[at + 4] = 0x80
    assert _left_to_libhdf5(unknown) == ["/layers/dense/vars/0"]
    with pytest.raises(Exception, match="unknown message"):
        with h5py.File(io.BytesIO(bytes(unknown)), "r") as h5:
            h5["layers/dense/vars/0"]
