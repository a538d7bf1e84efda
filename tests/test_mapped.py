"""Aligned saves (`aligned=True`) and file-backed loads (`mmap=True`): stock reads the aligned files
bitwise; a mapped load's variables live in a private map of the file, equal bitwise to a copying
load's, train to the same values and never write the file; stock files fall back to copies;
replaced and corrupted files are caught."""

from __future__ import annotations

import gc
import io
import os
import struct
import sys
import threading
import warnings
import zipfile

import h5py
import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import _batch, assert_same_state, state_of
from kerassave_fast import mapped as mapped_module
from kerassave_fast.formats import keras_zip
from kerassave_fast.tensors import ALIGNMENT, snapshot

MODELS = ("convnet", "embedding_lstm", "low_precision", "optimizer_adamw")


def _variables(model) -> list:
    return list(model.weights) + list(model.optimizer.variables)


def _mapped_ranges(path) -> list[tuple[int, int]]:
    """The address ranges this process maps from `path`."""
    target = os.stat(path)
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == target.st_ino:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def _in_map(model, path) -> list[bool]:
    """Per variable: whether its buffer lies in a map of `path`."""
    ranges = _mapped_ranges(path)
    addresses = [snapshot(v).ctypes.data for v in _variables(model)]
    return [any(lo <= a < hi for lo, hi in ranges) for a in addresses]


def _weights_start(path) -> int:
    """Where the `.keras` weights member's bytes start in the file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(keras_zip.WEIGHTS)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len


def _dataset_offsets(h5: h5py.File) -> dict[str, int]:
    offsets = {}
    h5.visititems(
        lambda name, obj: offsets.__setitem__(name, obj.id.get_offset()) if isinstance(obj, h5py.Dataset) else None
    )
    return offsets


@pytest.mark.parametrize("name", MODELS)
def test_aligned_files_put_every_tensor_on_a_boundary_and_stock_reads_them_bitwise(model_zoo, tmp_path, name):
    model = model_zoo(name)
    path = tmp_path / "m.keras"
    ksf.save_model(model, path, aligned=True)
    start = _weights_start(path)
    with zipfile.ZipFile(path) as zf, h5py.File(io.BytesIO(zf.read(keras_zip.WEIGHTS))) as h5:
        offsets = _dataset_offsets(h5)
    assert offsets and all((start + o) % ALIGNMENT == 0 for o in offsets.values() if o is not None), offsets
    assert_same_state(model, keras.saving.load_model(path, custom_objects={}))

    weights = tmp_path / "m.weights.h5"
    ksf.save_weights(model, weights, aligned=True)
    with h5py.File(weights) as h5:
        assert all(o % ALIGNMENT == 0 for o in _dataset_offsets(h5).values() if o is not None)
    fresh = keras.models.clone_model(model)
    fresh.compile(optimizer=type(model.optimizer).from_config(model.optimizer.get_config()), loss="mse")
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(weights)  # stock's
    assert_same_state(model, fresh)


def test_aligned_legacy_h5_loads_in_stock(model_zoo, tmp_path):
    model = model_zoo("optimizer_adamw")
    path = tmp_path / "m.h5"
    ksf.save_model(model, path, aligned=True)
    with h5py.File(path) as h5:
        offsets = _dataset_offsets(h5)
    assert all(o % ALIGNMENT == 0 for name, o in offsets.items() if o is not None), offsets
    loaded = keras.saving.load_model(path, compile=False)  # stock cannot compile its own .h5 of loss="mse"
    for expected, actual in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(np.asarray(expected), np.asarray(actual))


@pytest.mark.parametrize("name", MODELS)
def test_mapped_load_adopts_the_map_and_trains_like_a_copying_load(model_zoo, tmp_path, name):
    model = model_zoo(name)
    path = tmp_path / "m.keras"
    ksf.save_model(model, path, aligned=True)
    saved = path.read_bytes()
    copied = ksf.load_model(path)
    mapped = ksf.load_model(path, mmap=True)
    ksf.verification(mapped).poison_on_failure()  # a sound file: nothing happens
    ksf.verification(mapped).result(60)
    assert_same_state(copied, mapped)
    in_map = _in_map(mapped, path)
    sized = [snapshot(v).nbytes > 0 for v in _variables(mapped)]
    assert all(m for m, s in zip(in_map, sized, strict=True) if s), in_map  # every tensor adopted the map
    x, _ = _batch(model)
    assert np.array_equal(np.asarray(copied.predict(x, verbose=0)), np.asarray(mapped.predict(x, verbose=0)))
    batch = _batch(model, seed=3)
    copied.train_on_batch(*batch)
    mapped.train_on_batch(*batch)
    assert_same_state(copied, mapped)
    assert path.read_bytes() == saved  # a private map: training wrote its own pages


def test_the_map_lives_while_a_variable_uses_it(model_zoo, tmp_path):
    path = tmp_path / "m.keras"
    ksf.save_model(model_zoo("optimizer_adam"), path, aligned=True)
    mapped = ksf.load_model(path, mmap=True, verify=False)
    assert _mapped_ranges(path)
    kept = mapped.layers[0].kernel  # one variable outlives the model
    expected = np.array(kept.numpy())
    del mapped
    gc.collect()
    assert _mapped_ranges(path), "unmapped while a variable still uses it"
    assert np.array_equal(kept.numpy(), expected)
    del kept
    keras.backend.clear_session()
    gc.collect()
    assert not _mapped_ranges(path), "still mapped after the model and its variables were deleted"


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_mapped_load_weights(model_zoo, tmp_path, suffix):
    model = model_zoo("embedding_lstm")
    path = tmp_path / f"m{suffix}"
    if suffix == ".keras":
        ksf.save_model(model, path, aligned=True)
    else:
        ksf.save_weights(model, path, aligned=True)
    fresh = keras.saving.load_model(path if suffix == ".keras" else _full(model, tmp_path))
    for v in fresh.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    ksf.load_weights(fresh, path, mmap=True)
    assert_same_state(model, fresh)
    assert all(m for m, v in zip(_in_map(fresh, path), _variables(fresh), strict=True) if v.shape != ())


def _full(model, tmp_path):
    path = tmp_path / "full.keras"
    keras.saving.save_model(model, path)
    return path


def test_mapped_load_of_a_legacy_h5(model_zoo, tmp_path):
    model = model_zoo("optimizer_sgd_momentum")
    path = tmp_path / "m.h5"
    ksf.save_model(model, path, aligned=True)
    copied, mapped = ksf.load_model(path), ksf.load_model(path, mmap=True)
    assert_same_state(copied, mapped)
    assert any(_in_map(mapped, path))


@pytest.mark.parametrize("name", ["convnet", "low_precision"])
def test_stock_files_load_mapped_with_copies_where_unaligned(model_zoo, tmp_path, name):
    model = model_zoo(name)
    path = tmp_path / "stock.keras"
    keras.saving.save_model(model, path)
    mapped = ksf.load_model(path, mmap=True)
    ksf.verification(mapped).result(60)
    assert_same_state(model, mapped)
    in_map = _in_map(mapped, path)
    assert not all(in_map), "stock places tensors at arbitrary offsets: some must have been copied"


def _flip_in_first_tensor(path) -> None:
    """Flips a byte inside the largest tensor of a `.keras` file (not its metadata)."""
    start = _weights_start(path)
    with zipfile.ZipFile(path) as zf, h5py.File(io.BytesIO(zf.read(keras_zip.WEIGHTS))) as h5:
        datasets = []
        h5.visititems(lambda n, o: datasets.append(o) if isinstance(o, h5py.Dataset) else None)
        largest = max(datasets, key=lambda d: d.id.get_storage_size())
        at = start + largest.id.get_offset() + largest.id.get_storage_size() // 2
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


def test_background_verification_finds_a_flipped_tensor_byte(model_zoo, tmp_path):
    path = tmp_path / "m.keras"
    ksf.save_model(model_zoo("optimizer_adam"), path, aligned=True)
    _flip_in_first_tensor(path)
    mapped = ksf.load_model(path, mmap=True)  # returns first: the check runs after
    with pytest.raises(zipfile.BadZipFile, match=f"{path}.*Bad CRC-32"):
        ksf.verification(mapped).result(60)
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        ksf.load_model(path, mmap=True, verify=True)
    poisoned = ksf.load_model(path, mmap=True)
    ksf.verification(poisoned).poison_on_failure()  # asked before or after the check ends: the same
    assert ksf.verification(poisoned).wait(60)
    assert all(np.isnan(np.asarray(v, dtype="float32")).all() for v in poisoned.weights)
    assert all(np.isnan(np.asarray(v)).all() for v in poisoned.optimizer.variables if "float" in str(v.dtype))
    unchecked = ksf.load_model(path, mmap=True, verify=False)
    assert ksf.verification(unchecked) is None
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        ksf.load_model(path)  # a copying load checks as it reads


@pytest.mark.parametrize("stock_defaults", [{}, {"objects_to_skip": None}])
@pytest.mark.parametrize("check_ends", ["before", "after"])
def test_a_later_load_into_the_model_ends_what_the_last_check_speaks_for(
    model_zoo, tmp_path, monkeypatch, check_ends, stock_defaults
):
    """`load_weights` of a sound file into a model mapped from a damaged one: the damaged file's
    check, ending before or after that load, no longer poisons the model nor stands for its weights."""
    damaged, sound = tmp_path / "damaged.keras", tmp_path / "sound.keras"
    model = model_zoo("optimizer_adam")
    ksf.save_model(model, damaged, aligned=True)
    ksf.save_model(model, sound)
    _flip_in_first_tensor(damaged)
    gate = threading.Event()
    finish = mapped_module.Verification._finish
    monkeypatch.setattr(
        mapped_module.Verification, "_finish", lambda self, error: gate.wait(60) and finish(self, error)
    )
    mapped = ksf.load_model(damaged, mmap=True)
    check = ksf.verification(mapped)
    check.poison_on_failure()
    if check_ends == "before":
        gate.set()
        assert check.wait(60)
    with pytest.raises(FileNotFoundError):
        ksf.load_weights(mapped, tmp_path / "missing.keras")  # a failed load changes nothing
    ksf.load_weights(mapped, sound, skip_mismatch=True)  # nor does one that may keep some weights
    assert ksf.verification(mapped) is check
    ksf.load_weights(mapped, sound, **stock_defaults)  # stock's keywords at their defaults load every weight
    gate.set()
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        check.result(60)  # the damaged file's check still reports it
    check.poison_on_failure()
    assert ksf.verification(mapped) is None
    for expected, actual in zip(model.weights, mapped.weights, strict=True):
        assert np.array_equal(np.asarray(expected), np.asarray(actual))


def _layers_a_and_b(units: int) -> keras.Model:
    """Dense layer a (64 x 64), then b (64 x `units`): a file with another `units` has only a in common."""
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, name="a"), keras.layers.Dense(units, name="b")])


def test_a_partial_mapped_load_keeps_the_earlier_check_speaking_for_the_weights_it_left(tmp_path):
    """A mapped `load_weights` that skips a layer (`skip_mismatch`) after a mapped load of a damaged
    file: the model's check is then the newer one and the damaged file's, which still speaks for the
    skipped layer's weights; its failure shows in `result()` and poisons the model if asked."""

    damaged, other = tmp_path / "damaged.keras", tmp_path / "other.keras"
    ksf.save_model(_layers_a_and_b(4), damaged, aligned=True)
    ksf.save_model(_layers_a_and_b(5), other, aligned=True)  # layer b of another shape: skipped
    kept = _weights_start(damaged) + _dataset_offset(damaged, "layers/dense_1/vars/0") + 8  # in layer b's kernel
    _flip_in_first_tensor(damaged)  # layer a's kernel, which the partial load replaces...
    with open(damaged, "r+b") as f:  # ...and a byte of layer b's, which it keeps
        f.seek(kept)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x55]))
    model = ksf.load_model(damaged, mmap=True)
    earlier = ksf.verification(model)
    with pytest.warns(UserWarning, match="could not be loaded"):
        ksf.load_weights(model, other, skip_mismatch=True, mmap=True)
    newest = ksf.verification(model)
    assert newest is not earlier
    with pytest.raises(zipfile.BadZipFile, match=f"{damaged}.*Bad CRC-32"):
        newest.result(60)
    newest.poison_on_failure()
    assert np.isnan(model.get_layer("b").kernel.numpy()).all()


def test_checks_that_passed_leave_the_chain_of_partial_loads(tmp_path):
    """Many partial mapped loads of sound files after one of a damaged file: the model's check is
    the newest one with the damaged file's (those that passed are dropped), and asking it to poison
    works however many loads came before (it recursed once per load)."""

    damaged, sound = tmp_path / "damaged.keras", tmp_path / "sound.keras"
    ksf.save_model(_layers_a_and_b(4), damaged, aligned=True)
    ksf.save_model(_layers_a_and_b(5), sound, aligned=True)  # layer b of another shape: skipped, so kept from damaged
    _flip_in_first_tensor(damaged)
    model = ksf.load_model(damaged, mmap=True)
    assert ksf.verification(model).wait(60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stock's warning of the skipped layer, once per load
        for _ in range(300):
            ksf.load_weights(model, sound, skip_mismatch=True, mmap=True)
            assert ksf.verification(model).wait(60)
    assert len(ksf.verification(model)._chain()) == 2
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(250)  # below the 300 loads
    try:
        ksf.verification(model).poison_on_failure()
    finally:
        sys.setrecursionlimit(limit)
    assert np.isnan(model.get_layer("b").kernel.numpy()).all()


def _dataset_offset(path, name: str) -> int:
    with zipfile.ZipFile(path) as zf, h5py.File(io.BytesIO(zf.read(keras_zip.WEIGHTS))) as h5:
        return h5[name].id.get_offset()


def _replacing_during_build(monkeypatch, action):
    real_build = keras_zip.keras3_state.build_model

    def build_then_replace(*args, **kwargs):
        built = real_build(*args, **kwargs)
        action()
        return built

    monkeypatch.setattr(keras_zip.keras3_state, "build_model", build_then_replace)


def test_a_file_replaced_during_a_mapped_load_is_refused(model_zoo, tmp_path, monkeypatch):
    model = model_zoo("optimizer_adam")
    path, other = tmp_path / "m.keras", tmp_path / "other.keras"
    ksf.save_model(model, path, aligned=True)
    ksf.save_model(model, other, aligned=True)
    _replacing_during_build(monkeypatch, lambda: os.replace(other, path))
    with pytest.raises(ksf.KerasSaveError, match=f"{path}.*changed while it was being loaded"):
        ksf.load_model(path, mmap=True)


def test_a_file_written_in_place_during_a_mapped_load_is_refused(model_zoo, tmp_path, monkeypatch):
    path = tmp_path / "m.keras"
    ksf.save_model(model_zoo("optimizer_adam"), path, aligned=True)
    _replacing_during_build(monkeypatch, lambda: _flip_in_first_tensor(path))
    # This model's tensors lie within pages read for the HDF5 metadata: the map disagrees with
    # them (refused, and the CRC then blames the file), else the file's times give it away.
    with pytest.raises(ksf.KerasSaveError, match=r"changed while it was being loaded|Bad CRC-32"):
        ksf.load_model(path, mmap=True, verify=False)


def test_weights_files_written_in_place_during_a_mapped_load_are_refused(model_zoo, tmp_path, monkeypatch):
    model = model_zoo("optimizer_adam")
    path = tmp_path / "m.weights.h5"
    ksf.save_weights(model, path, aligned=True)
    from kerassave_fast.keras3 import state

    real = state.load_model_state

    def load_then_touch(*args, **kwargs):
        real(*args, **kwargs)
        os.utime(path, ns=(0, 0))

    monkeypatch.setattr(state, "load_model_state", load_then_touch)
    with pytest.raises(ksf.KerasSaveError, match="changed while it was being loaded"):
        ksf.load_weights(model, path, mmap=True)


def test_arguments_are_checked(model_zoo, tmp_path):
    model = model_zoo("seed_example")
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    with pytest.raises(TypeError, match="mmap"):
        ksf.load_model(path, mmap="yes")
    with pytest.raises(ValueError, match="verify"):
        ksf.load_model(path, mmap=True, verify="later")
    with pytest.raises(ValueError, match="applies to `mmap=True` loads"):
        ksf.load_model(path, verify=False)
    with pytest.raises(ValueError, match="mmap=True"):
        ksf.load_model(tmp_path / "dir", mmap=True)  # not a file we read: stock's
    with pytest.raises(TypeError, match="aligned"):
        ksf.save_model(model, path, aligned=1)
    with pytest.raises(ValueError, match="`aligned` applies"):
        ksf.save_weights(model, "ram://m.weights.h5", aligned=True)  # remote: stock's


def test_an_unaligned_save_is_still_stock_byte_for_byte(model_zoo, tmp_path):
    """Alignment is opt-in: the default layout stays stock's exactly (the interop tests' oracle)."""
    model = model_zoo("optimizer_adam")
    keras.saving.save_model(model, tmp_path / "stock.keras")
    ksf.save_model(model, tmp_path / "ours.keras")
    ksf.save_model(model, tmp_path / "aligned.keras", aligned=True)
    from conftest import members_but_date

    assert members_but_date(tmp_path / "ours.keras") == members_but_date(tmp_path / "stock.keras")
    assert members_but_date(tmp_path / "aligned.keras") != members_but_date(tmp_path / "stock.keras")
    assert state_of(ksf.load_model(tmp_path / "aligned.keras"))
