"""TF-format weights of tf_keras models (`save_weights(model, prefix)` / `load_weights`): a TF checkpoint
written and read by the Rust tensor-bundle path, with stock tf_keras / TensorFlow as the oracle."""

from __future__ import annotations

import contextlib
import filecmp
import io
import os
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow as tf

import kerassave_fast as ksf
from kerassave_fast import KerasSaveError, _core

tf_keras = pytest.importorskip("tf_keras")

from tf_keras_models import MODELS, assert_same_state, batch, compiled, dense_adam, state, trained  # noqa: E402

FILES = ("w.index", "w.data-00000-of-00001", "checkpoint")


@contextlib.contextmanager
def _stock_forbidden():
    """Fails if TensorFlow's own checkpoint writer or reader runs for the call (the fast path must)."""

    def refuse(*args, **kwargs):
        raise AssertionError("stock's checkpoint path ran")

    from tensorflow.python.checkpoint import functional_saver

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf.train.Checkpoint, "write", refuse)
        mp.setattr(tf.train.Checkpoint, "read", refuse)
        mp.setattr(functional_saver.MultiDeviceSaver, "save", refuse)
        mp.setattr(functional_saver.MultiDeviceSaver, "restore", refuse)
        yield


@pytest.fixture(scope="module", params=MODELS, ids=lambda f: f.__name__)
def saved(request, tmp_path_factory):
    """A trained model, and the checkpoints stock and we wrote of it: (make, model, stock dir, our dir)."""
    model = trained(request.param)
    base = tmp_path_factory.mktemp(request.param.__name__)
    model.save_weights(str(base / "stock" / "w"))
    with _stock_forbidden():
        assert ksf.save_weights(model, base / "ours" / "w") is None
    return request.param, model, base / "stock", base / "ours"


def test_files_are_byte_identical_to_stocks(saved):
    _, _, stock_dir, ours_dir = saved
    assert sorted(os.listdir(ours_dir)) == sorted(os.listdir(stock_dir)) == sorted(FILES)
    for name in FILES:
        assert filecmp.cmp(stock_dir / name, ours_dir / name, shallow=False), name


def test_tensorflow_reads_ours(saved):
    _, _, stock_dir, ours_dir = saved
    ours, theirs = tf.train.load_checkpoint(str(ours_dir / "w")), tf.train.load_checkpoint(str(stock_dir / "w"))
    assert ours.get_variable_to_dtype_map() == theirs.get_variable_to_dtype_map()
    for key in theirs.get_variable_to_shape_map():
        a, b = np.asarray(ours.get_tensor(key)), np.asarray(theirs.get_tensor(key))
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes(), key
    assert tf.train.latest_checkpoint(str(ours_dir)) == str(ours_dir / "w")


def test_loads_cross_over_and_train_on_identically(saved):
    """Stock loads ours and we load stock's into fresh compiled models (optimizer slots are
    restored when the optimizer creates them, as in stock): same weights, and after one more
    training step the same weights and optimizer state as the original's."""
    make, model, stock_dir, ours_dir = saved
    by_stock, by_us = compiled(make), compiled(make)
    stock_status = by_stock.load_weights(str(ours_dir / "w"))
    with _stock_forbidden():
        our_status = ksf.load_weights(by_us, stock_dir / "w")
    assert type(our_status) is type(stock_status)
    our_status.assert_existing_objects_matched()
    for x, a, b in zip(model.weights, by_stock.weights, by_us.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), x.numpy())
        np.testing.assert_array_equal(b.numpy(), x.numpy())
    original = trained(make)  # the same model again (seeded, deterministic ops), to step on
    assert_same_state(original, model)
    step = batch(model, seed=1)
    for m in (original, by_stock, by_us):
        m.train_on_batch(*step)
    assert_same_state(original, by_stock)
    assert_same_state(original, by_us)
    our_status.assert_consumed()  # every value in the checkpoint found its variable


def test_load_into_a_built_optimizer_restores_slots_at_once(saved):
    make, model, _, ours_dir = saved
    target = trained(make)
    target.train_on_batch(*batch(target, seed=2))  # different values everywhere, slots built
    with _stock_forbidden():
        ksf.load_weights(target, ours_dir / "w").assert_consumed()
    assert_same_state(model, target)


def test_saved_weights_are_a_snapshot_of_the_save_time(tmp_path):
    model = trained(dense_adam)
    before = state(model)
    ksf.save_weights(model, tmp_path / "w")
    model.train_on_batch(*batch(model, seed=3))
    reader = tf.train.load_checkpoint(str(tmp_path / "w"))
    kernel = reader.get_tensor("layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE")
    np.testing.assert_array_equal(kernel, before[0][0])


def _corrupted(tmp_path, name, how):
    model = trained(dense_adam)
    ksf.save_weights(model, tmp_path / "w")
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x10
    path.write_bytes(bytes(data))
    return model


@pytest.mark.parametrize("name", ["w.index", "w.data-00000-of-00001"])
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_files_raise_a_clear_error_naming_the_file(tmp_path, name, how):
    _corrupted(tmp_path, name, how)
    target = trained(dense_adam)
    target.train_on_batch(*batch(target, seed=4))
    before = state(target)
    with pytest.raises(KerasSaveError, match=name.replace(".", r"\.")):
        ksf.load_weights(target, tmp_path / "w")
    for a, b in zip(before[0], state(target)[0], strict=True):  # nothing restored from a bad file
        np.testing.assert_array_equal(a, b)


def test_missing_data_file_is_an_os_error(tmp_path):
    model = trained(dense_adam)
    ksf.save_weights(model, tmp_path / "w")
    os.unlink(tmp_path / "w.data-00000-of-00001")
    with pytest.raises(FileNotFoundError) as e:
        ksf.load_weights(compiled(dense_adam), tmp_path / "w")
    assert e.value.filename.endswith("w.data-00000-of-00001")


def test_overwrite_false(tmp_path, monkeypatch):
    model = trained(dense_adam)
    (tmp_path / "w.index").write_bytes(b"previous")
    (tmp_path / "w.data-00000-of-00001").write_bytes(b"previous")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(ksf.OverwriteRefused) as e:
        ksf.save_weights(model, tmp_path / "w", overwrite=False)
    assert e.value.filename == str(tmp_path / "w.index")
    assert isinstance(e.value, EOFError)
    assert (tmp_path / "w.index").read_bytes() == b"previous"
    assert not (tmp_path / "checkpoint").exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "n")  # stock: answered no, nothing written
    assert ksf.save_weights(model, tmp_path / "w", overwrite=False) is None
    assert (tmp_path / "w.index").read_bytes() == b"previous"
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    ksf.save_weights(model, tmp_path / "w", overwrite=False)
    assert tf.train.load_checkpoint(str(tmp_path / "w")).has_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
    ksf.save_weights(model, tmp_path / "fresh", overwrite=False)  # nothing there: no question
    assert (tmp_path / "fresh.index").exists()


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = trained(dense_adam)
    ksf.save_weights(model, tmp_path / "w")
    previous = {name: (tmp_path / name).read_bytes() for name in FILES}
    from kerassave_fast.formats import tensor_bundle

    class FullDisk:
        def __init__(self, *files):
            pass

        def add(self, *args):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensor_bundle, "TensorBundleWriter", FullDisk)
    model.train_on_batch(*batch(model, seed=5))
    with pytest.raises(OSError, match="No space"):
        ksf.save_weights(model, tmp_path / "w")
    assert sorted(os.listdir(tmp_path)) == sorted(FILES)  # no temporary files left behind
    for name, data in previous.items():
        assert (tmp_path / name).read_bytes() == data


def _checkpoint_values(prefix) -> dict[str, bytes]:
    reader = tf.train.load_checkpoint(str(prefix))  # TensorFlow checks each tensor's CRC against the index
    return {k: reader.get_tensor(k).tobytes() for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


@pytest.mark.parametrize("shards", [None, 100], ids=["one data shard", "data shards of 100 bytes"])
def test_an_interrupt_as_the_files_are_renamed_leaves_one_whole_checkpoint(tmp_path, shards):
    """A `KeyboardInterrupt` raised as soon as a rename returns (by a profile hook, where a signal's
    handler would run) finds the checkpoint whole: all the new files, not a new data shard beside
    the old index."""
    model = trained(dense_adam)
    ksf.save_weights(model, tmp_path / "w", max_shard_size=shards)
    before = _checkpoint_values(tmp_path / "w")
    model.train_on_batch(*batch(model, seed=5))

    def interrupt_after_a_rename(frame, event, arg):
        if event == "c_return" and (arg is os.replace or arg is _core.rename_all):
            sys.setprofile(None)
            raise KeyboardInterrupt

    sys.setprofile(interrupt_after_a_rename)
    try:
        with pytest.raises(KeyboardInterrupt):
            ksf.save_weights(model, tmp_path / "w", max_shard_size=shards)
    finally:
        sys.setprofile(None)
    after = _checkpoint_values(tmp_path / "w")
    ksf.save_weights(model, tmp_path / "ref" / "w", max_shard_size=shards)
    assert after == _checkpoint_values(tmp_path / "ref" / "w") != before  # renamed before the interrupt
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_saves_to_one_prefix_on_two_threads_leave_one_whole_checkpoint(tmp_path):
    """Each save renames its data shard and index under a lock: the other's cannot come between,
    even when a thread is held up right after a rename (by a profile hook)."""
    models = [trained(dense_adam) for _ in range(2)]
    models[1].train_on_batch(*batch(models[1], seed=7))
    barrier, errors = threading.Barrier(2), []

    def held_up_after_a_rename(frame, event, arg):
        if event == "c_return" and (arg is os.replace or arg is _core.rename_all):
            time.sleep(0.05)

    def save(model):
        barrier.wait()
        try:
            ksf.save_weights(model, tmp_path / "w")
        except BaseException as e:
            errors.append(e)

    for _ in range(3):
        threads = [threading.Thread(target=save, args=(m,)) for m in models]
        threading.setprofile(held_up_after_a_rename)
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            threading.setprofile(None)
        assert not errors
        _checkpoint_values(tmp_path / "w")  # raises on a data shard of one save beside the other's index


def test_a_prefix_tensorflow_cannot_encode_is_refused_as_stock_before_anything_is_written(tmp_path):
    """TensorFlow refuses a prefix that is not UTF-8: the save fails as stock's does, and the files
    already at that prefix are left as they were."""
    model = trained(dense_adam)
    prefix = os.path.join(tmp_path, os.fsdecode(b"w\xe9\xff"))
    previous = {name: os.urandom(64) for name in (".index", ".data-00000-of-00001")}
    for name, data in previous.items():
        with open(prefix + name, "wb") as f:
            f.write(data)
    errors = {}
    for who, save in (("stock", model.save_weights), ("ours", lambda p: ksf.save_weights(model, p))):
        with pytest.raises(Exception) as raised:
            save(prefix)
        errors[who] = (type(raised.value), str(raised.value))
        assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(prefix) + n for n in previous)
        for name, data in previous.items():
            with open(prefix + name, "rb") as f:
                assert f.read() == data
    assert errors["ours"] == errors["stock"]


def test_a_prefix_under_a_regular_file_fails_as_stocks(tmp_path):
    model = trained(dense_adam)
    errors = {}
    for who, save in (("stock", model.save_weights), ("ours", lambda p: ksf.save_weights(model, p))):
        (tmp_path / who).mkdir()
        (tmp_path / who / "afile").write_text("x")
        with pytest.raises(Exception) as raised:
            save(str(tmp_path / who / "afile" / "ckpt"))
        errors[who] = (type(raised.value), str(raised.value).replace(f"/{who}/", "/"))
    assert errors["ours"] == errors["stock"]
    assert errors["ours"][0] is tf.errors.FailedPreconditionError


def test_options_and_stock_only_cases_go_to_stock(tmp_path):
    model = trained(dense_adam)
    ksf.save_weights(model, tmp_path / "opt" / "w", options=tf.train.CheckpointOptions())
    model.save_weights(str(tmp_path / "stock" / "w"))
    for name in FILES:
        assert filecmp.cmp(tmp_path / "opt" / name, tmp_path / "stock" / name, shallow=False)
    target = compiled(dense_adam)
    status = ksf.load_weights(target, tmp_path / "opt" / "w", options=tf.train.CheckpointOptions())
    status.assert_existing_objects_matched()
    for a, b in zip(model.weights, target.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_load_weights_from_a_saved_model_directory(tmp_path):
    model = trained(dense_adam)
    model.save(str(tmp_path / "sm"), save_format="tf")
    target = compiled(dense_adam)
    with _stock_forbidden():
        ksf.load_weights(target, tmp_path / "sm")
    for a, b in zip(model.weights, target.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_float8_variable_loads_as_in_stock(tmp_path):
    """TensorFlow cannot take a float8 buffer without a copy (DLPack): it is copied, as stock does."""
    import ml_dtypes

    def holding_float8(values):
        model = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
        model.f8 = tf.Variable(tf.constant(np.array(values, ml_dtypes.float8_e4m3fn)))
        return model

    model = holding_float8([1.5, -2.0, 0.25, 3.0])
    ksf.save_weights(model, str(tmp_path / "ours" / "w"))
    model.save_weights(str(tmp_path / "stock" / "w"))
    for directory in ("ours", "stock"):
        loaded = holding_float8([0.0] * 4)
        ksf.load_weights(loaded, str(tmp_path / directory / "w"))
        np.testing.assert_array_equal(loaded.f8.numpy(), model.f8.numpy())
        for a, b in zip(model.weights, loaded.weights, strict=True):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
