"""Bad input: mutated files are refused or load bitwise equal; every refusal stock makes, we make."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state, member

WEIGHTS = "model.weights.h5"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def original(model_zoo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "original.keras"
    ksf.save_model(model_zoo("low_precision"), path)
    return path


def _regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the file by what they hold."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        infos, cd_start = zf.infolist(), zf.start_dir
    local_headers, members = [], {}
    for info in infos:
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len
        local_headers.append((info.header_offset, start))
        members[info.filename] = (start, start + info.compress_size)
    h5_start, h5_end = members[WEIGHTS]
    tensors = []
    with h5py.File(io.BytesIO(data[h5_start:h5_end]), "r") as f:

        def visit(_, obj):
            if isinstance(obj, h5py.Dataset) and obj.id.get_offset() is not None:
                tensors.append(
                    (h5_start + obj.id.get_offset(), h5_start + obj.id.get_offset() + obj.id.get_storage_size())
                )

        f.visititems(visit)
    tensors.sort()
    metadata, cursor = [], h5_start
    for a, b in tensors:
        if a > cursor:
            metadata.append((cursor, a))
        cursor = b
    metadata.append((cursor, h5_end))
    return {
        "directory": [(cd_start, len(data))],
        "local_header": local_headers,
        "config": [members["config.json"]],
        "hdf5_metadata": metadata,
        "tensor_data": tensors,
    }


# Files per format: `make corpus` sets KSF_CORPUS_FILES=10000; `make test` runs a few hundred.
CORPUS_FILES = int(os.environ.get("KSF_CORPUS_FILES", "0"))


def _positions(ranges, count, rng) -> list[int]:
    pool = np.concatenate([np.arange(a, b) for a, b in ranges if b > a])
    return sorted(rng.choice(pool, size=min(count, len(pool)), replace=False).tolist())


def _flips(ranges, count, rng) -> list[tuple[int, int]]:
    """Up to `count` distinct (byte position, bit) pairs inside `ranges`."""
    pool = np.concatenate([np.arange(a, b) for a, b in ranges if b > a])
    picks = rng.choice(len(pool) * 8, size=min(count, len(pool) * 8), replace=False)
    return sorted((int(pool[p // 8]), int(p % 8)) for p in picks)


def _flipped(data: bytes, pos: int, bit: int) -> bytes:
    mutated = bytearray(data)
    mutated[pos] ^= 1 << bit
    return bytes(mutated)


def _write_corpus(original: Path, directory: Path, files: int = 0) -> dict[str, str]:
    """Writes the mutants (about `files` of them, or a few hundred); returns {file name: region it damages}."""
    data = original.read_bytes()
    regions = _regions(original)
    rng = np.random.default_rng(20261125)
    corpus = {}

    def put(name: str, region: str, content: bytes) -> None:
        (directory / name).write_bytes(content)
        corpus[name] = region

    boundaries = sorted({b for ranges in regions.values() for r in ranges for b in r})
    cuts = sorted({*range(0, len(data), max(1, len(data) // 40)), *(b + d for b in boundaries for d in (-1, 0, 1))})
    for cut in (c for c in cuts if 0 <= c < len(data)):
        put(f"truncate-{cut:07d}.keras", "truncation", data[:cut])
    # Flips shared out between the regions, the smallest first: what one cannot hold goes to the next.
    wanted = max(files - len(corpus), 0) or 200
    by_size = sorted(regions, key=lambda r: sum(b - a for a, b in regions[r]))
    for n, region in enumerate(by_size):
        flips = _flips(regions[region], wanted // (len(by_size) - n), rng)
        wanted -= len(flips)
        for i, (pos, bit) in enumerate(flips):
            put(f"flip-{region}-{i:05d}.keras", region, _flipped(data, pos, bit))
    for region in ("hdf5_metadata", "tensor_data", "directory"):
        for i, pos in enumerate(_positions(regions[region], 12, rng)):
            mutated = bytearray(data)
            mutated[pos : pos + 64] = bytes(len(mutated[pos : pos + 64]))
            if bytes(mutated) != data:
                put(f"zero-{region}-{i:03d}.keras", region, bytes(mutated))
    return corpus


def _run_corpus(
    original: Path, directory: Path, mode: str = "model", env: dict | None = None, per_file: float = 120
) -> dict[str, dict]:
    """Each mutant's outcome from corpus_worker.py (`mode`: see there): a load that takes longer
    than `per_file` seconds is recorded as "HANG" (the worker is killed and restarted after that file)."""
    import queue
    import threading

    names, outcomes, after = sorted(p.name for p in directory.iterdir()), {}, ""
    while len(outcomes) < len(names):
        command = [sys.executable, str(HERE / "corpus_worker.py"), str(original), str(directory), mode, after]
        # stderr to a file: a pipe nobody reads fills up after a few hundred loads' warnings and
        # blocks the worker, which would look like a hang.
        errors = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=errors, text=True, env={**os.environ, **(env or {})}
        )
        lines: queue.Queue = queue.Queue()

        def forward(stdout=proc.stdout, lines=lines) -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=forward, daemon=True).start()
        current, deadline = None, time.monotonic() + 600  # the first line comes after TensorFlow's import
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                proc.kill()
                assert current is not None, "the worker did not start"
                proc.wait()
                outcomes[current] = {"file": current, "outcome": "HANG"}
                after = current
                break
            if line is None:
                proc.wait()
                errors.seek(0)
                died = f"worker died ({proc.returncode}) at {current}: {errors.read()[-2000:]}"
                assert proc.returncode == 0, died
                break
            record = json.loads(line)
            if "start" in record:
                current, deadline = record["start"], time.monotonic() + per_file
            else:
                outcomes[record["file"]] = record
                after = record["file"]
        proc.stdout.close()
        errors.close()
    return outcomes


# What a legacy `.h5` may also do, as in stock: a damaged training config loads the weights alone,
# uncompiled; an optimizer group whose name is damaged is not found, leaving a fresh optimizer.
H5_ONLY = ("weights equal, not compiled", "weights equal, optimizer state not")


def _byte_order_flipped(original: Path, mutant: Path) -> bool:
    """Whether `mutant` is a valid HDF5 file of other values: the same datasets with the same stored
    bytes, one of them now declared in the other byte order (one bit of its datatype message). A
    file written on a big-endian machine looks just so; HDF5 keeps no checksum to tell them apart,
    as with a flipped tensor byte."""

    def datasets(path):
        found = {}
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda n, o: (
                    found.__setitem__(n, (o.dtype, o.shape, o.id.get_offset())) if isinstance(o, h5py.Dataset) else None
                )
            )
        return found

    try:
        a, b = datasets(original), datasets(mutant)
    except Exception:
        return False
    changed = [n for n in a if a[n] != b.get(n)]
    return (
        a.keys() == b.keys()
        and len(changed) == 1
        and a[changed[0]][1:] == b[changed[0]][1:]
        and a[changed[0]][0].newbyteorder() == b[changed[0]][0]
    )


def _check_outcomes(
    outcomes: dict[str, dict], corpus: dict[str, str], directory: Path, h5=False, original: Path | None = None
) -> None:
    """No hang, no different weights; refusals of the expected types (`h5`: whatever stock's code
    raises on a damaged config, named by an exception note) naming the file. For HDF5 files, weights
    that differ because the mutant is a valid file of other values (`_byte_order_flipped`) are
    relabelled so."""
    allowed = ("refused", "equal", *(H5_ONLY if h5 else ()))
    for name, o in outcomes.items():
        if o["outcome"] == "DIFFERENT" and h5 and original and _byte_order_flipped(original, directory / name):
            o["outcome"] = "other values: byte order of a valid file flipped"
            continue
        assert o["outcome"] in allowed, f"{name}: {o['outcome']}"
        if o["outcome"] != "refused":
            continue
        named = str(directory / name) in " ".join([o["message"], *o["notes"]])
        if h5:
            assert named, f"{name}: error does not name the file: {o}"
            continue
        assert {"ValueError", "KeyError", "OSError"} & set(o["mro"]), f"{name}: unexpected {o}"
        if o["type"] == "KerasSaveError":
            assert named, f"{name}: error does not name the file: {o}"
    assert set(outcomes) == set(corpus)


def _report(kind: str, outcomes: dict[str, dict]) -> collections.Counter:
    counts = collections.Counter(o["outcome"] for o in outcomes.values())
    print(f"{kind} corpus outcomes:", len(outcomes), dict(counts))
    assert counts["refused"] and counts["equal"], counts
    return counts


def test_mutated_files_are_refused_or_load_bitwise_equal(original, tmp_path):
    corpus = _write_corpus(original, tmp_path, CORPUS_FILES)
    outcomes = _run_corpus(original, tmp_path)
    _check_outcomes(outcomes, corpus, tmp_path)
    for name, o in outcomes.items():
        if corpus[name] in ("tensor_data", "hdf5_metadata", "config") and name.startswith("flip"):
            assert o["outcome"] == "refused" and "CRC-32" in o["message"], f"{name}: {o}"
    counts = _report(".keras", outcomes)
    assert counts["refused"] > len(outcomes) // 2, "the corpus should mostly be refused"


def _write_h5_corpus(original: Path, directory: Path, flips: int) -> dict[str, str]:
    """Mutants of an HDF5 file (`.h5`, `.weights.h5`) in its metadata only (HDF5 keeps no checksum
    of tensor bytes, so a flipped tensor byte loads, in stock and here): truncations, bit flips,
    zeroed runs. Each keeps `original`'s suffixes."""
    data = original.read_bytes()
    suffix = "".join(original.suffixes)
    tensors = []
    with h5py.File(original, "r") as f:
        f.visititems(
            lambda _, o: (
                tensors.append((o.id.get_offset(), o.id.get_offset() + o.id.get_storage_size()))
                if isinstance(o, h5py.Dataset) and o.id.get_offset() is not None
                else None
            )
        )
    metadata, cursor = [], 0
    for a, b in sorted(tensors):
        metadata.append((cursor, a))
        cursor = b
    metadata.append((cursor, len(data)))
    rng = np.random.default_rng(20261126)
    corpus = {}

    def put(name: str, region: str, content: bytes) -> None:
        (directory / name).write_bytes(content)
        corpus[name] = region

    for cut in sorted({*range(0, len(data), max(1, len(data) // 30)), *(b for r in metadata for b in r)}):
        if 0 <= cut < len(data):
            put(f"truncate-{cut:07d}{suffix}", "truncation", data[:cut])
    for i, (pos, bit) in enumerate(_flips(metadata, flips, rng)):
        put(f"flip-{i:05d}{suffix}", "hdf5_metadata", _flipped(data, pos, bit))
    for i, pos in enumerate(_positions(metadata, flips // 10, rng)):
        mutated = bytearray(data)
        end = min(pos + 16, next(b for a, b in metadata if a <= pos < b))  # tensor bytes stay as they are
        mutated[pos:end] = bytes(end - pos)
        if bytes(mutated) != data:
            put(f"zero-{i:04d}{suffix}", "hdf5_metadata", bytes(mutated))
    return corpus


def _h5_flips() -> int:
    """Flips making an HDF5 corpus of at least CORPUS_FILES files (truncations and zeroed runs come on top)."""
    return CORPUS_FILES or 150


def test_mutated_h5_files_are_refused_or_load_bitwise_equal(model_zoo, tmp_path):
    """Legacy `.h5` files (no CRC: libhdf5 and our HDF5 walk see the damage) refused with a clean
    error, or loaded bitwise equal; none hangs (a per-file timeout) or crashes the process."""
    original = tmp_path / "original.h5"
    ksf.save_model(model_zoo("optimizer_adam"), original)
    mutants = tmp_path / "mutants"
    mutants.mkdir()
    corpus = _write_h5_corpus(original, mutants, _h5_flips())
    outcomes = _run_corpus(original, mutants)
    _check_outcomes(outcomes, corpus, mutants, h5=True, original=original)
    _report(".h5", outcomes)


def test_mutated_weights_files_are_refused_or_load_bitwise_equal(model_zoo, tmp_path):
    """`load_weights` of mutated `.weights.h5` files into a model: refused naming the file, or
    every weight loaded bitwise equal."""
    original = tmp_path / "original.keras"
    model = model_zoo("low_precision")
    ksf.save_model(model, original)
    weights = tmp_path / "original.weights.h5"
    ksf.save_weights(model, weights)
    mutants = tmp_path / "mutants"
    mutants.mkdir()
    corpus = _write_h5_corpus(weights, mutants, _h5_flips())
    outcomes = _run_corpus(original, mutants, mode="weights")
    _check_outcomes(outcomes, corpus, mutants, h5=True, original=weights)
    _report(".weights.h5", outcomes)


def _write_checkpoint_corpus(prefix: Path, directory: Path, flips: int) -> dict[str, str]:
    """Mutated TF checkpoints, each a directory holding `ckpt.index` and `ckpt.data-00000-of-00001`:
    the index truncated at every byte and bit-flipped, the data bit-flipped (CRC32C) and truncated."""
    index, data = Path(f"{prefix}.index"), Path(f"{prefix}.data-00000-of-00001")
    rng = np.random.default_rng(20261127)
    corpus = {}

    def put(name: str, region: str, index_bytes: bytes | None = None, data_bytes: bytes | None = None) -> None:
        (directory / name).mkdir()
        for source, content in ((index, index_bytes), (data, data_bytes)):
            target = directory / name / source.name.replace(prefix.name, "ckpt")
            if content is None:
                os.link(source, target)  # unchanged: shared, not copied
            else:
                target.write_bytes(content)
        corpus[name] = region

    index_bytes, data_bytes = index.read_bytes(), data.read_bytes()
    for cut in range(len(index_bytes)):
        put(f"index-truncate-{cut:06d}", "truncation", index_bytes=index_bytes[:cut])
    index_flips = _flips([(0, len(index_bytes))], flips, rng)
    for i, (pos, bit) in enumerate(index_flips):
        put(f"index-flip-{i:05d}", "index", index_bytes=_flipped(index_bytes, pos, bit))
    # The data gets a tenth of the flips, or what the index had no bits left for.
    for i, (pos, bit) in enumerate(_flips([(0, len(data_bytes))], max(flips // 10, flips - len(index_flips)), rng)):
        put(f"data-flip-{i:05d}", "data", data_bytes=_flipped(data_bytes, pos, bit))
    for cut in sorted({*range(0, len(data_bytes), max(1, len(data_bytes) // 20))}):
        put(f"data-truncate-{cut:07d}", "truncation", data_bytes=data_bytes[:cut])
    return corpus


TF_KERAS = {"TF_USE_LEGACY_KERAS": "1"}


@pytest.fixture(scope="module")
def tf_keras_original(tmp_path_factory) -> Path:
    """A trained tf_keras Dense + Adam model in a `.h5` that our load reads back bitwise."""
    import tf_keras_models

    path = tmp_path_factory.mktemp("tf_keras_corpus") / "original.h5"
    ksf.save_model(tf_keras_models.trained(tf_keras_models.dense_adam), path)
    return path


def test_mutated_tf_keras_h5_files_are_refused_or_load_bitwise_equal(tf_keras_original, tmp_path):
    """tf_keras `load_model` of mutated `.h5` files (stock's reader behind our HDF5 walk)."""
    corpus = _write_h5_corpus(tf_keras_original, tmp_path, _h5_flips())
    outcomes = _run_corpus(tf_keras_original, tmp_path, env=TF_KERAS)
    _check_outcomes(outcomes, corpus, tmp_path, h5=True, original=tf_keras_original)
    _report("tf_keras .h5", outcomes)


def test_mutated_tf_checkpoints_are_refused_or_load_bitwise_equal(tf_keras_original, tmp_path):
    """tf_keras `load_weights` of mutated TF checkpoints (the tensor bundle our Rust core reads)."""
    import tf_keras

    model = tf_keras.models.load_model(tf_keras_original)
    saved = tmp_path / "saved"
    saved.mkdir()
    ksf.save_weights(model, saved / "original")
    mutants = tmp_path / "mutants"
    mutants.mkdir()
    flips = CORPUS_FILES or 150
    corpus = _write_checkpoint_corpus(saved / "original", mutants, flips)
    outcomes = _run_corpus(tf_keras_original, mutants, mode="weights", env=TF_KERAS)
    _check_outcomes(outcomes, corpus, mutants)
    for name, o in outcomes.items():
        if corpus[name] == "data":
            assert o["outcome"] == "refused", f"{name}: {o}"
    _report("TF checkpoint", outcomes)


# ---------------------------------------------------------------------------------------------
# Stock's refusals, on crafted files whose CRCs are valid


@pytest.fixture(scope="module")
def stock_file(model_zoo, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crafted") / "stock.keras"
    keras.saving.save_model(model_zoo("seed_example"), path)
    return path


def _repack(src: Path, dst: Path, edit_h5) -> Path:
    """A copy of `src` whose model.weights.h5 went through `edit_h5(h5py.File)`, CRCs recomputed."""
    with zipfile.ZipFile(src) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    buffer = io.BytesIO(dict((i.filename, d) for i, d in members)[WEIGHTS])
    with h5py.File(buffer, "r+") as f:
        edit_h5(f)
    with zipfile.ZipFile(dst, "w") as zf:
        for info, data in members:
            zf.writestr(info, buffer.getvalue() if info.filename == WEIGHTS else data)
    return dst


def _replace(f: h5py.File, path: str, make) -> None:
    del f[path]
    make(f, path)


CRAFTED = {
    "soft_link": (
        lambda f: _replace(f, "layers/dense/vars", lambda f, p: f.__setitem__(p, h5py.SoftLink("/vars"))),
        "Not allowed: H5 file with SoftLink",
    ),
    "external_link": (
        lambda f: _replace(f, "layers/dense/vars", lambda f, p: f.__setitem__(p, h5py.ExternalLink("x.h5", "/v"))),
        "Not allowed: H5 file with ExternalLink",
    ),
    "external_dataset": (
        lambda f: _replace(
            f,
            "layers/dense/vars/0",
            lambda f, p: f.create_dataset(p, (3, 5), "f4", external=[("outside.bin", 0, 60)]),
        ),
        "Not allowed: H5 file with external Dataset",
    ),
    "virtual_dataset": (
        lambda f: _replace(
            f,
            "layers/dense/vars/0",
            lambda f, p: f.create_virtual_dataset(p, _layout_of(f["layers/dense/vars/1"])),
        ),
        "Not allowed: H5 file with virtual Dataset",
    ),
    "shape_bomb": (
        lambda f: _replace(
            f,
            "layers/dense/vars/0",
            lambda f, p: f.create_dataset(p, (1 << 30, 8), "f4", chunks=(1024, 8), compression="gzip"),
        ),
        "refusing to load a potential decompression/shape bomb",
    ),
}


def _layout_of(source: h5py.Dataset) -> h5py.VirtualLayout:
    layout = h5py.VirtualLayout(shape=(3, 5), dtype="f4")
    layout[0, :] = h5py.VirtualSource(source)
    return layout


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_stock_refusals_are_kept(stock_file, tmp_path, case):
    edit, message = CRAFTED[case]
    path = _repack(stock_file, tmp_path / f"{case}.keras", edit)
    with pytest.raises(ValueError, match=message):
        keras.saving.load_model(path)
    with pytest.raises(ValueError, match=message):
        ksf.load_model(path)


def _bomb_zip(src: Path, dst: Path) -> Path:
    """`src` with model.weights.h5 DEFLATED and declaring 5 GiB through a ZIP64 extra field."""
    with zipfile.ZipFile(src) as zf:
        members = [(info.filename, zf.read(info)) for info in zf.infolist()]
    out, directory = bytearray(), bytearray()
    for name, data in members:
        declared, method, payload = len(data), 0, data
        if name == WEIGHTS:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload, method, declared = compressor.compress(data) + compressor.flush(), 8, 5 << 30
        crc, encoded = zlib.crc32(data), name.encode()
        size32 = 0xFFFFFFFF if declared > 0xFFFFFFFF else declared
        extra = struct.pack("<HHQ", 1, 8, declared) if declared > 0xFFFFFFFF else b""
        offset = len(out)
        out += struct.pack(
            "<IBBHHHHIIIHH", 0x04034B50, 45, 0, 0, method, 0, 0x21, crc, len(payload), size32, len(encoded), len(extra)
        )
        out += encoded + extra + payload
        directory += struct.pack(
            "<IBBBBHHHHIIIHHHHHII", 0x02014B50, 45, 3, 45, 0, 0, method, 0, 0x21, crc, len(payload), size32,
            len(encoded), len(extra), 0, 0, 0, 0o600 << 16, offset,
        )  # fmt: skip
        directory += encoded + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(directory), len(out), 0)
    dst.write_bytes(bytes(out + directory + end))
    return dst


def test_zip_bomb_refused(stock_file, tmp_path):
    path = _bomb_zip(stock_file, tmp_path / "bomb.keras")
    message = "refusing to load a potential decompression bomb"
    with pytest.raises(ValueError, match=message):
        keras.saving.load_model(path)
    with pytest.raises(ValueError, match=message):
        ksf.load_model(path)


def test_flipped_tensor_byte_refused_like_stock(stock_file, tmp_path):
    data = bytearray(stock_file.read_bytes())
    h5 = member(stock_file, WEIGHTS)
    with h5py.File(io.BytesIO(h5), "r") as f:
        offset_in_h5 = f["layers/dense/vars/0"].id.get_offset()
    data[bytes(data).find(h5) + offset_in_h5 + 5] ^= 0x10
    path = tmp_path / "flipped.keras"
    path.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile, match=r"Bad CRC-32 for file 'model\.weights\.h5'"):
        keras.saving.load_model(path)
    with pytest.raises(zipfile.BadZipFile, match=r"Bad CRC-32 for file 'model\.weights\.h5'") as ours:
        ksf.load_model(path)
    assert isinstance(ours.value, ksf.KerasSaveError) and str(path) in str(ours.value)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_recompressed_members_load(stock_file, tmp_path, method):
    """A `.keras` recompressed by a zip tool: slower path (stock's, for methods we do not read), same weights."""
    path = tmp_path / "recompressed.keras"
    with zipfile.ZipFile(stock_file) as src, zipfile.ZipFile(path, "w", method) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    expected = keras.saving.load_model(stock_file)
    loaded = ksf.load_model(path)
    for a, b in zip(
        expected.weights + expected.optimizer.variables, loaded.weights + loaded.optimizer.variables, strict=True
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    fresh = keras.models.clone_model(expected)
    ksf.load_weights(fresh, path)
    for a, b in zip(expected.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_member_load_weights_never_reads_is_not_read_here_either(stock_file, tmp_path):
    """A member beside the model's, in a method nobody here reads (Deflate64, 9): stock's
    `load_weights` never opens it, and ours loads too; `load_model` extracts every member: both refuse."""
    path = tmp_path / "extra.keras"
    with zipfile.ZipFile(stock_file) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("notes.txt", b"the extra member")
    data = bytearray(path.read_bytes())
    for signature, method_at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):  # local header, central directory
        header = data.rfind(signature)
        data[header + method_at : header + method_at + 2] = struct.pack("<H", 9)
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("notes.txt").compress_type == 9
    with pytest.raises(NotImplementedError):
        keras.saving.load_model(path)
    with pytest.raises(ksf.KerasSaveError, match="compression method 9"):
        ksf.load_model(path)
    expected = keras.saving.load_model(stock_file)
    stocks, ours = keras.models.clone_model(expected), keras.models.clone_model(expected)
    stocks.load_weights(path)
    ksf.load_weights(ours, path)
    for a, b, c in zip(expected.weights, stocks.weights, ours.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize("content", [b"", b"PK", b"not a zip at all" * 10, os.urandom(4096)])
def test_garbage_is_refused_with_the_path(tmp_path, content):
    path = tmp_path / "garbage.keras"
    path.write_bytes(content)
    with pytest.raises(ksf.KerasSaveError) as error:
        ksf.load_model(path)
    assert str(path) in str(error.value)


def test_missing_file_is_stocks_error(tmp_path):
    with pytest.raises(ValueError, match="File not found"):
        ksf.load_model(tmp_path / "absent.keras")
    with pytest.raises(ValueError, match="File not found"):
        keras.saving.load_model(tmp_path / "absent.keras")


def _rewriting_before_the_tensors_are_read(monkeypatch, path, at: int) -> None:
    """Flips the byte at `at` of `path` after the HDF5 listing, before the tensors are read."""
    from kerassave_fast.formats import keras_zip

    real = keras_zip.read_weights

    def rewrite_then_read(*args, **kwargs):
        with open(path, "r+b") as f:  # another process rewriting the file in place
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0xFF]))
        return real(*args, **kwargs)

    monkeypatch.setattr(keras_zip, "read_weights", rewrite_then_read)


def test_file_changed_while_being_read_is_refused(tmp_path, monkeypatch):
    """The CRC is checked again over the bytes actually read, not only before reading: a byte of a
    tensor read after it changed fails it."""
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256)])  # a 64 KiB kernel
    path = tmp_path / "changing.keras"
    ksf.save_model(model, path)
    start, end = max(_regions(path)["tensor_data"], key=lambda r: r[1] - r[0])
    _rewriting_before_the_tensors_are_read(monkeypatch, path, (start + end) // 2)
    with pytest.raises(zipfile.BadZipFile, match="changed while being read"):
        ksf.load_model(path)


def test_a_change_to_bytes_already_read_loads_the_file_as_it_was(original, model_zoo, tmp_path, monkeypatch):
    """Small tensors lie in the pages the HDF5 listing read (h5py is served the same pages, and
    the tensors are copied from them): a later change there is never seen, nor mixed in."""
    path = tmp_path / "changing.keras"
    path.write_bytes(original.read_bytes())
    _rewriting_before_the_tensors_are_read(monkeypatch, path, _regions(path)["tensor_data"][0][0])
    assert_same_state(model_zoo("low_precision"), ksf.load_model(path))


@pytest.mark.parametrize(
    "name",
    ["assets/../../ksf-escaped.txt", "/ksf-absolute.txt", "config.json"],
    ids=["dot-dot", "absolute", "duplicate"],
)
def test_hostile_member_names_load_as_in_stock(stock_file, tmp_path, name):
    """Members named to escape the extraction directory (`../`, absolute) or named twice (the last
    one wins in `zipfile`): ours does what stock does, and writes nothing outside."""
    path = tmp_path / "crafted.keras"
    shutil.copy(stock_file, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr(name, member(stock_file, "config.json") if name == "config.json" else b"outside")
    loaded = []
    for load in (keras.saving.load_model, ksf.load_model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stock: "Skipping invalid path during archive extraction"
            loaded.append(load(path))
    assert_same_state(*loaded)
    escaped = Path(name).name
    for where in (Path(tempfile.gettempdir()), tmp_path, tmp_path.parent, Path.cwd(), Path("/")):
        assert not (where / escaped).exists() or escaped == "config.json", f"{where / escaped} written"
