"""Where a save writes and what a load reads: exact paths, the target's attributes, in-place
fallbacks, and files rewritten while they are being read."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast import files
from kerassave_fast.formats import keras_zip

NON_UTF8 = os.fsdecode(b"w\xe9\xff")  # not valid UTF-8: os.fsdecode keeps the bytes as surrogates


@pytest.fixture
def model(model_zoo):
    return model_zoo("seed_example")


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_non_utf8_path_is_written_exactly_there(model, tmp_path, suffix):
    path = os.path.join(tmp_path, NON_UTF8 + suffix)
    with open(path, "wb") as f:
        f.write(b"previous")
    if suffix == ".keras":
        ksf.save_model(model, path)
    else:
        ksf.save_weights(model, path)
    assert os.listdir(tmp_path) == [NON_UTF8 + suffix], "a stray file was left beside the target"
    with open(path, "rb") as f:
        data = f.read()
    if suffix == ".keras":
        assert zipfile.is_zipfile(path)
        assert_same_state(model, ksf.load_model(path))
        assert_same_state(model, keras.saving.load_model(path))
    else:
        assert data.startswith(b"\x89HDF\r\n\x1a\n"), "the file has no HDF5 signature"
        with h5py.File(os.fsencode(path), "r") as f:  # libhdf5 opens the exact bytes
            assert "vars" in f["layers/dense"]
        for load in (ksf.load_weights, keras.saving.load_weights):
            fresh = keras.models.clone_model(model)
            load(fresh, path)
            for a, b in zip(model.weights, fresh.weights, strict=True):
                np.testing.assert_array_equal(a.numpy(), b.numpy())


LONG_MULTIBYTE = "\u00e9" * 118  # 236 bytes: a valid name, its first 120 characters more than NAME_MAX allows


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5", ".h5"])
def test_a_long_multibyte_name_is_saved_over_as_stock_saves_it(model, tmp_path, suffix):
    """Our temporary file's name, made from the target's, stays within 255 bytes however many
    bytes its characters take."""
    path = os.path.join(tmp_path, LONG_MULTIBYTE + suffix)
    save = ksf.save_weights if suffix == ".weights.h5" else ksf.save_model
    for _ in range(2):  # a new file, then one replaced
        save(model, path)
        assert os.listdir(tmp_path) == [LONG_MULTIBYTE + suffix]
    if suffix == ".weights.h5":
        fresh = keras.models.clone_model(model)
        keras.saving.load_weights(fresh, path)
        for a, b in zip(model.weights, fresh.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    else:  # stock Keras 3 cannot load a `.h5` of a model compiled with loss="mse"; ours can
        assert_same_state(model, (ksf.load_model if suffix == ".h5" else keras.saving.load_model)(path))


def test_a_temporary_name_is_cut_between_characters_within_120_bytes():
    for name in (LONG_MULTIBYTE, "a" * 300, "\U0001f600" * 40, NON_UTF8 * 100, "ab\u00e9"):
        kept = files._temporary_prefix(name)[1:-1]
        assert name.startswith(kept) and len(os.fsencode(kept)) <= 120
        assert kept == name or len(os.fsencode(name[: len(kept) + 1])) > 120  # no character more fits


def _stock_saved(model, path) -> os.stat_result:
    keras.saving.save_model(model, path)
    return os.stat(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_save_into_a_missing_directory_names_the_target_as_stock(model, tmp_path, suffix):
    path = str(tmp_path / "missing" / f"m{suffix}")
    save = ksf.save_weights if suffix == ".weights.h5" else ksf.save_model
    with pytest.raises(FileNotFoundError) as raised:
        save(model, path)
    assert raised.value.filename == path


def test_owner_group_and_mode_carry_over_like_stock(model, tmp_path):
    theirs, ours = tmp_path / "stock.keras", tmp_path / "ours.keras"
    for p in (theirs, ours):
        p.write_bytes(b"old")
        os.chown(p, 1234, 5678)
        os.chmod(p, 0o640)
    expected = _stock_saved(model, theirs)
    ksf.save_model(model, ours)
    got = os.stat(ours)
    assert (got.st_uid, got.st_gid, stat.S_IMODE(got.st_mode)) == (
        expected.st_uid,
        expected.st_gid,
        stat.S_IMODE(expected.st_mode),
    )


def test_setuid_bits_are_not_carried_over(model, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(b"old")
    os.chmod(path, 0o6755)
    ksf.save_model(model, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


def test_extended_attributes_carry_over(model, tmp_path):
    path = tmp_path / "m.keras"
    path.write_bytes(b"old")
    try:
        os.setxattr(path, "user.origin", b"experiment-7")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"the file system of {tmp_path} has no user xattrs")
        raise
    ksf.save_model(model, path)
    assert os.getxattr(path, "user.origin") == b"experiment-7"


def test_read_only_target_is_written_as_stock_writes_it(model, tmp_path):
    """Mode 0444: root writes it (and it stays 0444), anyone else gets stock's PermissionError
    naming the target -- never an error about a temporary file."""
    theirs, ours = tmp_path / "stock.keras", tmp_path / "ours.keras"
    for p in (theirs, ours):
        p.write_bytes(b"old")
        os.chmod(p, 0o444)
    try:
        _stock_saved(model, theirs)
    except PermissionError:
        with pytest.raises(PermissionError) as e:
            ksf.save_model(model, ours)
        assert e.value.filename == str(ours)
        assert ours.read_bytes() == b"old"
        return
    ksf.save_model(model, ours)
    assert stat.S_IMODE(os.stat(ours).st_mode) == 0o444
    assert_same_state(model, ksf.load_model(ours))


def test_unwritable_directory_falls_back_to_writing_in_place(model, tmp_path, monkeypatch):
    path = tmp_path / "m.keras"
    path.write_bytes(b"old")
    inode = os.stat(path).st_ino

    def no_temporary_files(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(files.tempfile, "mkstemp", no_temporary_files)
    ksf.save_model(model, path)
    assert os.stat(path).st_ino == inode, "not written in place"
    assert_same_state(model, ksf.load_model(path))
    with pytest.raises(PermissionError) as e:  # a new file cannot be created there: stock's error
        ksf.save_model(model, tmp_path / "new.keras")
    assert e.value.filename == str(tmp_path / "new.keras")


def test_rename_refused_falls_back_to_writing_in_place(model, tmp_path, monkeypatch):
    """A single-file bind mount refuses rename(2) over it with EBUSY."""
    path = tmp_path / "m.keras"
    path.write_bytes(b"old")
    inode = os.stat(path).st_ino

    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy", dst)

    monkeypatch.setattr(files.os, "replace", busy)
    ksf.save_model(model, path)
    assert os.stat(path).st_ino == inode
    assert os.listdir(tmp_path) == ["m.keras"]
    assert_same_state(model, ksf.load_model(path))


def test_a_failed_copy_over_a_file_that_refuses_rename_keeps_the_new_file(model, tmp_path, monkeypatch):
    """Where rename(2) is impossible the new file is copied over the old one: if that copy fails,
    the old file may be broken, so the complete new one is kept, and the error says where."""
    path = tmp_path / "m.keras"
    path.write_bytes(b"old")

    def busy(src, dst):
        raise OSError(errno.EBUSY, "Device or resource busy", dst)

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(files.os, "replace", busy)
    monkeypatch.setattr(files.shutil, "copyfile", disk_full)
    with pytest.raises(OSError, match="No space left") as e:
        ksf.save_model(model, path)
    kept = [name for name in os.listdir(tmp_path) if name != "m.keras"]
    assert len(kept) == 1 and str(tmp_path / kept[0]) in "".join(e.value.__notes__)
    monkeypatch.undo()
    os.rename(tmp_path / kept[0], tmp_path / "kept.keras")
    assert_same_state(model, ksf.load_model(tmp_path / "kept.keras"))


@pytest.mark.parametrize("why", ["no-temporary-file", "rename-refused"])
def test_a_file_a_mapped_model_reads_is_never_written_in_place(model, tmp_path, monkeypatch, why):
    """A model loaded with mmap=True reads the pages of its file it has not written yet: writing
    that file in place would change its weights (or, truncated, crash it). Refused, the file whole."""
    path = tmp_path / "m.keras"
    ksf.save_model(model, path, aligned=True)
    saved = path.read_bytes()
    mapped = ksf.load_model(path, mmap=True, verify=False)
    before = [np.array(v.numpy()) for v in mapped.weights]
    if why == "no-temporary-file":
        monkeypatch.setattr(files.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(PermissionError()))
    else:
        monkeypatch.setattr(files.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EBUSY, "")))
    with pytest.raises(ksf.KerasSaveError, match="mmap=True"):
        ksf.save_model(mapped, path)
    assert path.read_bytes() == saved and os.listdir(tmp_path) == ["m.keras"]
    for expected, variable in zip(before, mapped.weights, strict=True):
        assert np.array_equal(expected, variable.numpy())
    other = tmp_path / "other.keras"
    other.write_bytes(b"old")
    ksf.save_model(mapped, other)  # another file: written in place as before
    monkeypatch.undo()
    assert_same_state(mapped, ksf.load_model(other))


def test_a_save_handed_to_stock_never_rewrites_a_file_a_mapped_model_reads(model, tmp_path, monkeypatch):
    """Stock's writers open their file "w", in place: truncating a mapped file kills the process
    (SIGBUS) at the next read of a variable over it. Refused before stock is called."""
    from kerassave_fast import api

    path = tmp_path / "m.keras"
    ksf.save_model(model, path, aligned=True)
    saved = path.read_bytes()
    mapped = ksf.load_model(path, mmap=True, verify=False)
    called = []
    monkeypatch.setattr(api, "stock", lambda module, name: lambda *a, **k: called.append(name))
    with pytest.raises(ksf.KerasSaveError, match="mmap=True"):
        ksf.save_model(mapped, path, zipped=False)  # a save ours hands to stock
    assert called == [] and path.read_bytes() == saved
    ksf.save_model(mapped, tmp_path / "other.keras", zipped=False)  # another path: stock's, as before
    assert called == ["save_model"]
    assert_same_state(model, mapped)


def test_single_file_bind_mount_is_written_in_place(model, tmp_path):
    source, target = tmp_path / "host.keras", tmp_path / "app" / "m.keras"
    target.parent.mkdir()
    source.write_bytes(b"old")
    target.write_bytes(b"")
    mounted = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        ksf.save_model(model, target)
        assert_same_state(model, ksf.load_model(source))
        assert os.listdir(target.parent) == ["m.keras"]
    finally:
        subprocess.run(["umount", str(target)], check=True)


# ---------------------------------------------------------------------------------------------
# Files rewritten in place while they are being read


TABLE = np.array([b"w%07d" % i for i in range(5000)])
LAST = b"w0004999"


@keras.saving.register_keras_serializable(package="ksf_tests")
class Vocabulary(keras.layers.Layer):
    """Keeps a byte-string table beside its weight: h5py serves it itself, lazily, during loading.
    `on_load` (a test hook) runs between reading the weight and reading the table."""

    on_load = None

    def build(self, input_shape):
        self.k = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="k")
        self.table = TABLE  # 40 KB: most of it is not read until `load_own_variables` asks for it

    def call(self, x):
        return x * self.k

    def save_own_variables(self, store):
        store["0"] = self.k
        store["table"] = self.table

    def load_own_variables(self, store):
        self.k.assign(store["0"])
        if Vocabulary.on_load is not None:
            Vocabulary.on_load()
        self.table = store["table"]


def _vocabulary_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, Vocabulary()(inputs))


@pytest.fixture(autouse=True)
def strings_saved(monkeypatch):
    """Keras 3.15 refuses byte strings in a store; older Keras wrote them, and loads must still cope."""
    from kerassave_fast.keras3 import state

    monkeypatch.setattr(state, "_refuse_as_stock", lambda value: None)


def _rewrite(path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert data.count(old) == 1
    with open(path, "r+b") as f:
        f.seek(data.index(old))
        f.write(new)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_file_rewritten_during_load_is_never_mixed(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    model = _vocabulary_model()
    (ksf.save_model if suffix == ".keras" else ksf.save_weights)(model, path)
    Vocabulary.on_load = lambda: _rewrite(path, LAST, b"XXXXXXXX")
    try:
        if suffix == ".keras":
            loaded = ksf.load_model(path)
        else:
            loaded = _vocabulary_model()
            ksf.load_weights(loaded, path)
    except ValueError as e:  # KerasSaveError / BadKerasZipFile
        assert str(path) in str(e)
        return
    finally:
        Vocabulary.on_load = None
    assert np.array_equal(loaded.layers[-1].table, TABLE), "read bytes written after the load began"


def test_file_rewritten_before_the_check_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "m.keras"
    ksf.save_model(_vocabulary_model(), path)
    real_build = keras_zip.keras3_state.build_model

    def build_then_rewrite(*args, **kwargs):
        built = real_build(*args, **kwargs)
        _rewrite(path, LAST, b"XXXXXXXX")
        return built

    monkeypatch.setattr(keras_zip.keras3_state, "build_model", build_then_rewrite)
    with pytest.raises(zipfile.BadZipFile, match="changed while being read"):
        ksf.load_model(path)


def _fsynced(monkeypatch) -> list[str]:
    """What gets fsynced from now on: the path behind each fsynced descriptor."""
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


@pytest.mark.parametrize(
    "call, name",
    [("save_model", "m.keras"), ("save_model", "m.h5"), ("save_weights", "m.weights.h5"), ("save_model", "m_dir")],
)
def test_fsync_syncs_the_file_then_the_directory_naming_it(model, tmp_path, monkeypatch, call, name):
    kwargs = {"zipped": False} if name == "m_dir" else {}  # a directory, written by stock
    synced = _fsynced(monkeypatch)
    getattr(ksf, call)(model, tmp_path / f"plain_{name}", **kwargs)
    assert synced == []  # stock's default: nothing is fsynced
    path = tmp_path / name
    getattr(ksf, call)(model, path, fsync=True, **kwargs)
    assert synced[-1] == str(tmp_path)  # last, the directory entry naming the new file
    if name == "m_dir":
        assert any(s.startswith(f"{path}/") for s in synced)
    else:  # first, the data of the temporary file, before a rename names it
        assert synced[0].startswith(f"{tmp_path}/.{name}.") and synced[0].endswith(".tmp")


def test_fsync_of_a_tf_keras_checkpoint_and_saved_model(tmp_path, monkeypatch):
    tf_keras = pytest.importorskip("tf_keras")
    model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
    model.compile(optimizer="adam", loss="mse")
    synced = _fsynced(monkeypatch)
    ksf.save_weights(model, tmp_path / "ckpt" / "w", fsync=True)
    assert {str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / "checkpoint")} <= set(synced)
    assert len(synced) >= 4  # index, data, TensorFlow's `checkpoint` file, directory
    synced.clear()
    ksf.save_model(model, tmp_path / "sm", save_format="tf", fsync=True)
    # Every file and directory, in the staging directory before it is moved into place, then the parent.
    assert any(s.endswith("/variables") for s in synced) and str(tmp_path) == synced[-1]
    assert any(s.endswith("saved_model.pb") for s in synced)


def test_fsync_must_be_a_bool(model, tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        ksf.save_model(model, tmp_path / "m.keras", fsync="yes")
    assert not (tmp_path / "m.keras").exists()


def _bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def _two_wide_layers():
    return keras.Sequential([keras.Input((512,)), keras.layers.Dense(512), keras.layers.Dense(512)])


def _many_small_tensors():
    """A convnet whose tensors are mostly smaller than a page: the file is a third metadata."""
    layers = [keras.Input((16, 16, 3))]
    for _ in range(12):
        layers += [keras.layers.Conv2D(8, 3, padding="same"), keras.layers.BatchNormalization()]
    return keras.Sequential([*layers, keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])


@pytest.mark.parametrize("load", ["load_model", "load_weights"])
@pytest.mark.parametrize(
    "make, compression",
    [(_two_wide_layers, None), (_many_small_tensors, None), (_two_wide_layers, "gzip")],
    ids=["wide", "many-small", "wide-gzip"],
)
def test_a_keras_load_reads_each_byte_once(tmp_path, load, make, compression):
    """The weights member's CRC is checked over the bytes as they are read: no separate pass; the
    HDF5 metadata the Rust listing reads is what h5py is served, and tensors within those pages
    are copied from them, not read again. Compressed chunks count with the CRC-32s of their
    stored bytes as the Rust core read them to decode them. (Not yet once: small chunks that share
    pages with the metadata, read with it and again by the Rust core -- 1.12x for many-small.)"""
    model = make()
    model.compile(optimizer="adam", loss="mse")
    x = np.ones((2, *model.inputs[0].shape[1:]), "float32")
    model.train_on_batch(x, model.predict(x, verbose=0))
    path = tmp_path / "m.keras"
    ksf.save_model(model, path, compression=compression)
    ksf.load_model(path)  # imports and first-use work out of the count
    before = _bytes_read_by_this_process()
    if load == "load_model":
        ksf.load_model(path)
    else:
        ksf.load_weights(model, path)
    read = _bytes_read_by_this_process() - before
    assert read <= 1.02 * os.path.getsize(path), f"{read} bytes read for a {os.path.getsize(path)}-byte file"


@pytest.mark.parametrize("suffix", [".weights.h5", ".h5"])
def test_a_compressed_hdf5_load_reads_each_byte_once(tmp_path, suffix):
    """The Rust core reads the compressed chunks; nothing reads them again (HDF5 files keep no
    checksum: the bytes between the tensors were once all read for one, then thrown away)."""
    model = _two_wide_layers()
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    model.optimizer.build(model.trainable_variables)
    path = tmp_path / f"m{suffix}"
    if suffix == ".h5":
        ksf.save_model(model, path, compression="gzip", compression_level=1)
        ksf.load_model(path)  # imports and first-use work out of the count
        before = _bytes_read_by_this_process()
        ksf.load_model(path)
    else:
        ksf.save_weights(model, path, compression="gzip", compression_level=1)
        ksf.load_weights(model, path)
        before = _bytes_read_by_this_process()
        ksf.load_weights(model, path)
    read = _bytes_read_by_this_process() - before
    assert read <= 1.05 * os.path.getsize(path), f"{read} bytes read for a {os.path.getsize(path)}-byte file"


def test_a_region_checksums_long_unread_stretches_without_keeping_them(tmp_path):
    """`FileRegion.freeze` reads stretches HDF5 never asked for in large pieces for the CRC, keeps
    none of them, and serves one later only if it is still what was checksummed."""
    import zlib

    data = np.random.default_rng(0).integers(0, 256, 3 << 20, np.uint8).tobytes()
    path = tmp_path / "region"
    path.write_bytes(data)
    with open(path, "r+b") as f:
        region = files.FileRegion(f.fileno(), 0, len(data), str(path))
        region.seek(5000)
        assert region.read(10) == data[5000:5010]  # one page HDF5 read: kept
        [(offset, length, crc)] = region.freeze([])
        assert (offset, length, crc) == (0, len(data), zlib.crc32(data))
        assert len(region._pages) < 8  # the rest was not kept
        region.seek(2 << 20)
        assert region.read(100) == data[2 << 20 : (2 << 20) + 100]
        os.pwrite(f.fileno(), b"\xff" * 8, (1 << 20) + 64)  # rewritten in place after the checksum
        region.seek((1 << 20) + 60)
        with pytest.raises(ksf.KerasSaveError, match="changed while it was being read"):
            region.read(16)


def test_the_replaced_file_is_freed_off_the_save_and_not_leaked(model, tmp_path, monkeypatch):
    """The file a save renames over is held open across the rename and closed on another thread
    (freeing its blocks is then off the save): what is held is the replaced file, and it goes."""
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    replaced = os.stat(path).st_ino
    released = []
    release = files._release_later

    def recording(fd):
        released.append(os.fstat(fd).st_ino if fd >= 0 else None)
        release(fd)

    monkeypatch.setattr(files, "_release_later", recording)
    ksf.save_model(model, path)
    assert released == [replaced] and os.stat(path).st_ino != replaced

    def still_open():
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in links if link.startswith(str(path)) and link.endswith("(deleted)")]

    deadline = time.monotonic() + 10
    while still_open() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not still_open()


def test_a_rename_failing_in_atomic_replace_all_says_the_targets_are_unchanged(tmp_path, monkeypatch):
    """As `atomic_replace` says it: the error names the temporary file, which is gone."""
    targets = [str(tmp_path / "w.data-00000-of-00001"), str(tmp_path / "w.index")]
    for target in targets:
        with open(target, "wb") as f:
            f.write(b"old")
    monkeypatch.setattr(files, "rename_all", lambda pairs: 0)

    def refused(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", src, None, dst)

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError) as raised:
        with files.atomic_replace_all(targets) as destinations:
            for d in destinations:
                d.file.write_tensors([0], [np.frombuffer(b"new", np.uint8)])
    assert f"{targets[0]} was not saved; its previous content is unchanged" in " ".join(raised.value.__notes__)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(t) for t in targets)
    for target in targets:
        with open(target, "rb") as f:
            assert f.read() == b"old"


def test_a_child_forked_while_files_are_renamed_can_rename(tmp_path):
    """The renames' lock, held by a thread of the parent at the fork, is the child's to take."""
    with files._RENAMES_LOCK:
        pid = os.fork()
        if pid == 0:  # the child: a save of files that make one whole must not wait forever
            code = 0 if files._RENAMES_LOCK.acquire(timeout=5) else 1
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
