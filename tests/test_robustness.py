"""Bad input: mutated files are refused or load bitwise equal; every refusal stock makes, we make."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import member

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


def _positions(ranges, count, rng) -> list[int]:
    pool = np.concatenate([np.arange(a, b) for a, b in ranges if b > a])
    return sorted(rng.choice(pool, size=min(count, len(pool)), replace=False).tolist())


def _write_corpus(original: Path, directory: Path) -> dict[str, str]:
    """Writes the mutants; returns {file name: region it damages}."""
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
    for region, ranges in regions.items():
        for i, pos in enumerate(_positions(ranges, 40, rng)):
            mutated = bytearray(data)
            mutated[pos] ^= 1 << int(rng.integers(8))
            put(f"flip-{region}-{i:03d}.keras", region, bytes(mutated))
    for region in ("hdf5_metadata", "tensor_data", "directory"):
        for i, pos in enumerate(_positions(regions[region], 12, rng)):
            mutated = bytearray(data)
            mutated[pos : pos + 64] = bytes(len(mutated[pos : pos + 64]))
            if bytes(mutated) != data:
                put(f"zero-{region}-{i:03d}.keras", region, bytes(mutated))
    return corpus


def test_mutated_files_are_refused_or_load_bitwise_equal(original, tmp_path):
    corpus = _write_corpus(original, tmp_path)
    run = subprocess.run(
        [sys.executable, str(HERE / "corpus_worker.py"), str(original), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, f"worker died ({run.returncode}): {run.stderr[-2000:]}"
    outcomes = {o["file"]: o for o in map(json.loads, run.stdout.splitlines())}
    assert set(outcomes) == set(corpus), "the worker stopped before the end of the corpus"
    for name, o in outcomes.items():
        assert o["outcome"] != "DIFFERENT", f"{name} loaded with different weights"
        if o["outcome"] == "refused":
            assert {"ValueError", "KeyError", "OSError"} & set(o["mro"]), f"{name}: unexpected {o}"
            if o["type"] == "KerasSaveError":
                assert str(tmp_path / name) in o["message"], f"{name}: error does not name the file: {o}"
        if corpus[name] in ("tensor_data", "hdf5_metadata", "config") and name.startswith("flip"):
            assert o["outcome"] == "refused" and "CRC-32" in o["message"], f"{name}: {o}"
    refused = sum(o["outcome"] == "refused" for o in outcomes.values())
    assert refused > len(outcomes) // 2, "the corpus should mostly be refused"


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


def test_file_changed_while_being_read_is_refused(original, tmp_path, monkeypatch):
    """The CRC is checked again over the bytes actually read, not only before reading."""
    from kerassave_fast.formats import keras_zip

    path = tmp_path / "changing.keras"
    path.write_bytes(original.read_bytes())
    tensor_at = _regions(path)["tensor_data"][0][0]

    def rewrite_then_read(*args, **kwargs):
        with open(path, "r+b") as f:  # another process rewriting the file in place
            f.seek(tensor_at)
            byte = f.read(1)
            f.seek(tensor_at)
            f.write(bytes([byte[0] ^ 0xFF]))
        return keras_zip.read_weights.__wrapped__(*args, **kwargs)

    rewrite_then_read.__wrapped__ = keras_zip.read_weights
    monkeypatch.setattr(keras_zip, "read_weights", rewrite_then_read)
    with pytest.raises(zipfile.BadZipFile, match="changed while being read"):
        ksf.load_model(path)
