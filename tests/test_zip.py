"""The zip framing against the reference reader and writer: Python's `zipfile`."""

from __future__ import annotations

import gc
import os
import zipfile

import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast._core import ZIP64_LIMIT, TensorFile, ZipArchive, ZipWriter
from kerassave_fast.formats import keras_zip

WHEN = (2026, 11, 25, 18, 4, 30)


def _write(path, limit, members):
    """Frames `members` ({name: bytes}) with our writer; the middle one as a member others fill."""
    path.write_bytes(b"")
    file = TensorFile(path, writable=True)
    writer = ZipWriter(file, limit)
    for i, (name, data) in enumerate(members.items()):
        if i == 1:
            start = writer.begin_stored(name, WHEN, 0o600 << 16, len(data))
            crcs = file.write_tensors([start], [np.frombuffer(data, np.uint8)])
            writer.end_stored(len(data), file.crc32(start, len(data), [(start, len(data), crcs[0])]))
        else:
            writer.add_stored(name, data, WHEN, 0o644 << 16)
    return writer.finish()


@pytest.mark.parametrize("limit", [ZIP64_LIMIT, 1, 100, 5000])
def test_zipfile_reads_what_we_write(tmp_path, limit):
    rng = np.random.default_rng(limit)
    members = {f"m{i}.bin": rng.bytes(int(n)) for i, n in enumerate([0, 7000, 130, 4096, 1])}
    members["ünïcode/名前.txt"] = b"utf-8 names set flag bit 11"
    path = tmp_path / "t.zip"
    size = _write(path, limit, members)
    assert size == os.path.getsize(path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert [i.filename for i in zf.infolist()] == list(members)
        for info in zf.infolist():
            assert zf.read(info) == members[info.filename]
            assert info.date_time == WHEN and info.compress_type == zipfile.ZIP_STORED
    archive = ZipArchive(TensorFile(path))
    assert [keras_zip.member_name(m) for m in archive.members()] == list(members)


def test_zip64_records_where_zipfile_puts_them(tmp_path):
    """With a tiny limit every size/offset goes through ZIP64 fields, as zipfile writes them."""
    members = {"a": b"x" * 300, "b": b"y" * 300, "c": b"z" * 300}
    ours, theirs = tmp_path / "ours.zip", tmp_path / "theirs.zip"
    _write(ours, 100, members)
    data = ours.read_bytes()
    assert b"PK\x06\x06" in data and b"PK\x06\x07" in data  # ZIP64 end record and locator
    with zipfile.ZipFile(theirs, "w") as zf:  # zipfile with its real limit, same names: layout differs only by ZIP64
        for name, content in members.items():
            zf.writestr(zipfile.ZipInfo(name, WHEN), content)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert [(i.filename, i.CRC, i.file_size) for i in a.infolist()] == [
            (i.filename, i.CRC, i.file_size) for i in b.infolist()
        ]


def test_we_read_what_zipfile_writes(tmp_path):
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("plain", b"abc")
        with zf.open("forced64", "w", force_zip64=True) as f:
            f.write(b"0123456789" * 100)
        zf.writestr(zipfile.ZipInfo("deflated"), b"d" * 1000, compress_type=zipfile.ZIP_DEFLATED)
        zf.comment = b"an archive comment"
    archive = ZipArchive(TensorFile(path))
    with zipfile.ZipFile(path) as zf:
        for ours, info in zip(archive.members(), zf.infolist(), strict=True):
            assert (keras_zip.member_name(ours), ours.crc32, ours.size, ours.compressed_size) == (
                info.filename,
                info.CRC,
                info.file_size,
                info.compress_size,
            )
            assert (ours.header_offset, ours.method, ours.date_time) == (
                info.header_offset,
                info.compress_type,
                info.date_time,
            )
            assert archive.read(ours.index) == zf.read(info)


def test_prepended_bytes_are_tolerated_like_zipfile(tmp_path):
    path = tmp_path / "sfx.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("inner", b"payload")
    path.write_bytes(b"#!/bin/sh\nexit 0\n" + path.read_bytes())
    archive = ZipArchive(TensorFile(path))
    assert archive.read(0) == b"payload"
    with zipfile.ZipFile(path) as zf:
        assert zf.read("inner") == b"payload"


def test_keras_file_with_zip64_framing_loads_in_stock(model_zoo, tmp_path):
    model = model_zoo("optimizer_adam")
    path = tmp_path / "zip64.keras"
    keras_zip.prepare_save(model, str(path), zip64_limit=256)()
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
    assert_same_state(model, keras.saving.load_model(path))
    assert_same_state(model, ksf.load_model(path))


def test_zip64_decision_uses_the_exact_member_size_like_zipfile(model_zoo, tmp_path):
    """`zipfile.writestr` puts ZIP64 fields in a local header when size * 1.05 > ZIP64_LIMIT."""
    model = model_zoo("seed_example")
    probe = tmp_path / "probe.keras"
    keras_zip.prepare_save(model, str(probe))()
    size = zipfile.ZipFile(probe).getinfo("model.weights.h5").file_size
    for limit, zip64 in ((int(size * 1.05) - 1, True), (int(size * 1.05) + 1, False)):
        path = tmp_path / f"limit{limit}.keras"
        keras_zip.prepare_save(model, str(path), zip64_limit=limit)()
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("model.weights.h5")
            data = path.read_bytes()
            extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
            assert (extra_len == 20) == zip64, (limit, size, extra_len)
            assert zf.testzip() is None


@pytest.mark.big
@pytest.mark.skipif(os.environ.get("KSF_BIG_TESTS") != "1", reason="writes > 4 GiB; set KSF_BIG_TESTS=1")
def test_model_over_4_gib(tmp_path):
    """5 x 16384^2 float32 = 5.4 GB: ZIP64 sizes and offsets for real, loaded by us and by stock."""
    units = 16384
    model = keras.Sequential([keras.Input((units,))] + [keras.layers.Dense(units, use_bias=False) for _ in range(5)])
    path = tmp_path / "big.keras"
    ksf.save_model(model, path)
    assert os.path.getsize(path) > 4 << 30
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("model.weights.h5")
        assert info.file_size > 4 << 30 and info.compress_type == zipfile.ZIP_STORED
    loaded = ksf.load_model(path)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())
    del loaded
    gc.collect()
    stock = keras.saving.load_model(path)
    assert np.array_equal(stock.weights[-1].numpy(), model.weights[-1].numpy())


def test_member_names_longer_than_a_zip_header_holds_are_refused(tmp_path):
    """`zipfile` cannot write them either (a `struct.error`); the 16-bit length must not wrap."""
    path = tmp_path / "long.zip"
    path.write_bytes(b"")
    writer = ZipWriter(TensorFile(path, writable=True))
    with pytest.raises(ValueError, match="longer than the 65535 bytes"):
        writer.add_stored("a" * 65536, b"x", WHEN, 0)
    with pytest.raises(ValueError, match="longer than the 65535 bytes"):
        writer.begin_stored("a" * 65536, WHEN, 0, 1)
