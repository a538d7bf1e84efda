"""`export_saved_model`: the inference SavedModel of `model.export(path)` (Keras 3 and tf_keras) with
the variables written by the Rust core; stock's `export` is the oracle."""

from __future__ import annotations

import filecmp
import os
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerassave_fast as ksf

VARIABLES = ("variables/variables.index", "variables/variables.data-00000-of-00001")


def keras3_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="relu")(inputs))
    h = keras.layers.Dense(4, dtype="bfloat16")(h)
    model = keras.Model(inputs, keras.layers.Dense(3, dtype="float32")(h))
    model.compile("adam", "mse")
    model.train_on_batch(np.ones((4, 5), "float32"), np.ones((4, 3), "float32"))
    return model


def _inputs(seed=1):
    return np.random.default_rng(seed).normal(size=(2, 5)).astype("float32")


def test_keras3_export_is_stocks_with_identical_variables(tmp_path, monkeypatch):
    from tensorflow.python.checkpoint import checkpoint

    model = keras3_model()
    model.export(str(tmp_path / "stock"), format="tf_saved_model", verbose=False)
    monkeypatch.setattr(checkpoint.TrackableSaver, "save", lambda *a, **k: pytest.fail("stock's writer ran"))
    assert ksf.export_saved_model(model, tmp_path / "ours", verbose=False) is None
    for name in VARIABLES:
        assert filecmp.cmp(tmp_path / "stock" / name, tmp_path / "ours" / name, shallow=False), name
    assert sorted(os.listdir(tmp_path / "ours")) == sorted(os.listdir(tmp_path / "stock"))
    served = tf.saved_model.load(str(tmp_path / "ours"))
    x = _inputs()
    np.testing.assert_array_equal(served.serve(x).numpy(), model(x, training=False).numpy())
    np.testing.assert_array_equal(
        served.signatures["serving_default"](tf.constant(x))["output_0"].numpy(), model(x, training=False).numpy()
    )
    assert sorted(os.listdir(tmp_path)) == ["ours", "stock"]  # nothing left beside it


def test_export_options_stock_keeps_and_other_threads_untouched(tmp_path):
    """`input_signature` and `verbose` pass through; `tf.saved_model.save` called by others, or on
    another thread while ours runs, is TensorFlow's."""
    model = keras3_model()
    spec = [keras.InputSpec(shape=(None, 5), dtype="float32")]
    ksf.export_saved_model(model, tmp_path / "ours", verbose=False, input_signature=spec)
    x = _inputs(2)
    served = tf.saved_model.load(str(tmp_path / "ours"))
    np.testing.assert_array_equal(served.serve(x).numpy(), model(x, training=False).numpy())
    from tensorflow.python.checkpoint import checkpoint

    stock_save = checkpoint.TrackableSaver.save
    writers = []

    def recording(self, *args, **kwargs):
        writers.append(threading.get_ident())
        return stock_save(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint.TrackableSaver, "save", recording)
        module = tf.Module()
        module.v = tf.Variable([1.0, 2.0])
        tf.saved_model.save(module, str(tmp_path / "plain"))
        assert writers == [threading.get_ident()]
        ksf.export_saved_model(model, tmp_path / "ours", verbose=False)
        assert len(writers) == 1


def test_tf_keras_export_is_stocks_with_identical_variables(tmp_path, monkeypatch):
    from tensorflow.python.checkpoint import checkpoint

    tf_keras = pytest.importorskip("tf_keras")
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.layers.Dense(4, input_shape=(3,)), tf_keras.layers.Dense(2)])
    model.export(str(tmp_path / "stock"))
    monkeypatch.setattr(checkpoint.TrackableSaver, "save", lambda *a, **k: pytest.fail("stock's writer ran"))
    ksf.export_saved_model(model, tmp_path / "ours")
    for name in VARIABLES:
        assert filecmp.cmp(tmp_path / "stock" / name, tmp_path / "ours" / name, shallow=False), name
    x = np.ones((2, 3), "float32")
    served = tf.saved_model.load(str(tmp_path / "ours"))
    np.testing.assert_array_equal(served.serve(x).numpy(), model(x).numpy())


@pytest.mark.parametrize("option", [{"compression": "gzip"}, {"checksum": True}])
def test_compression_options_are_refused_rather_than_dropped(tmp_path, option):
    with pytest.raises(ValueError, match="apply to local"):
        ksf.export_saved_model(keras3_model(), tmp_path / "sm", verbose=False, **option)
    assert not (tmp_path / "sm").exists()


def test_keras3_save_format_tf_keeps_stocks_error(tmp_path):
    model = keras3_model()
    with pytest.raises(ValueError) as stock:
        keras.saving.save_model(model, str(tmp_path / "a"), save_format="tf")
    with pytest.raises(type(stock.value)) as ours:
        ksf.save_model(model, tmp_path / "b", save_format="tf")
    assert str(ours.value) == str(stock.value)


def test_a_failed_export_leaves_the_previous_one(tmp_path, monkeypatch):
    model = keras3_model()
    ksf.export_saved_model(model, tmp_path / "sm", verbose=False)
    before = {p.relative_to(tmp_path / "sm"): p.read_bytes() for p in (tmp_path / "sm").rglob("*") if p.is_file()}
    from tensorflow.python.saved_model import fingerprinting_utils

    def fail(export_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fingerprinting_utils, "write_fingerprint", fail)
    with pytest.raises(OSError, match="No space"):
        ksf.export_saved_model(model, tmp_path / "sm", verbose=False)
    after = {p.relative_to(tmp_path / "sm"): p.read_bytes() for p in (tmp_path / "sm").rglob("*") if p.is_file()}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["sm"]
