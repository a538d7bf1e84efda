"""Zero-copy hand-over: views for saving, 64-byte-aligned buffers adopted by TensorFlow for loading."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kerassave_fast as ksf
from conftest import assert_same_state
from kerassave_fast import tensors
from kerassave_fast.formats import keras_zip
from kerassave_fast.keras3 import state


def _buffer_address(variable) -> int:
    return np.asarray(variable._value.value()).ctypes.data


def test_snapshot_is_a_view_that_survives_assignment():
    v = keras.Variable(np.arange(12, dtype="float32").reshape(3, 4))
    view = tensors.snapshot(v)
    assert view.ctypes.data == _buffer_address(v), "snapshot copied the variable"
    v.assign(np.zeros((3, 4), "float32"))
    np.testing.assert_array_equal(view, np.arange(12, dtype="float32").reshape(3, 4))


@pytest.mark.parametrize("shape, dtype", [((3, 5), "float16"), ((7,), "bfloat16"), ((), "int64"), ((0, 4), "float32")])
def test_aligned_empty(shape, dtype):
    array = tensors.aligned_empty(shape, np.dtype(tensors.BFLOAT16 if dtype == "bfloat16" else dtype))
    assert array.shape == shape and array.flags.c_contiguous and array.flags.writeable
    assert array.ctypes.data % tensors.ALIGNMENT == 0


def test_loaded_variables_adopt_the_read_buffers(model_zoo, tmp_path, monkeypatch):
    model = model_zoo("low_precision")
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    read = {}

    def capture(*args, **kwargs):
        reading = keras_zip.read_weights.__wrapped__(*args, **kwargs)
        reading.add_done_callback(lambda f: read.update(f.result().arrays))
        return reading

    capture.__wrapped__ = keras_zip.read_weights
    monkeypatch.setattr(keras_zip, "read_weights", capture)
    loaded = ksf.load_model(path)
    assert_same_state(model, loaded)
    addresses = {a.ctypes.data for a in read.values()}
    variables = [v for v in loaded.weights + loaded.optimizer.variables if np.prod(v.shape) > 0]
    for v in variables:
        assert _buffer_address(v) % tensors.ALIGNMENT == 0, v.path
    adopted = [v.path for v in variables if _buffer_address(v) in addresses]
    assert len(adopted) == len(variables), f"copied instead of adopted: {set(v.path for v in variables) - set(adopted)}"


def test_build_skips_initializers(model_zoo, tmp_path):
    model = model_zoo("optimizer_adamw")
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    built = state.build_model(keras_zip.KerasArchive(str(path)).read("config.json"), None, True, True)
    assert built.uninitialized and all(v._value is None for v in built.uninitialized)
    assert built.optimizer_to_build is not None and not built.optimizer_to_build.built


def test_misaligned_and_odd_sized_buffers_never_abort(tmp_path):
    """TensorFlow aborts the process on a misaligned adopted buffer: run it where an abort is visible."""
    script = textwrap.dedent(
        f"""
        import os
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
        import numpy as np, keras, tensorflow as tf
        import kerassave_fast as ksf
        from kerassave_fast import tensors
        raw = np.zeros(1000, np.uint8)
        for start in range(1, 9):  # misaligned on purpose: must be copied, not adopted
            view = raw[start:start + 30].view(np.float16)
            t = tensors.adoptable_tensor(view)
            v = tf.Variable(t)
            v.assign_add(tf.ones_like(v))
            assert float(tf.reduce_sum(v)) == 15.0
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5, dtype="float16"),
                              keras.layers.Dense(7, dtype="bfloat16"), keras.layers.Dense(1)])
        m.compile(optimizer="adam", loss="mse")
        m.train_on_batch(np.ones((2, 3)), np.ones((2, 1)))
        ksf.save_model(m, r"{tmp_path / "odd.keras"}")
        loaded = ksf.load_model(r"{tmp_path / "odd.keras"}")
        for _ in range(3):
            loaded.train_on_batch(np.ones((2, 3)), np.ones((2, 1)))
        loaded.predict(np.ones((4, 3)), verbose=0)
        print("survived")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "survived" in run.stdout, run.stderr[-3000:]


@keras.saving.register_keras_serializable(package="ksf_tests")
class TwinKernel(keras.layers.Layer):
    """Loads one saved tensor into two variables, as an EMA copy might."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 3), name="kernel")
        self.ema = self.add_weight(shape=(input_shape[-1], 3), name="ema", trainable=False)

    def call(self, x):
        return x @ self.kernel

    def save_own_variables(self, store):
        store["0"] = self.kernel

    def load_own_variables(self, store):
        self.kernel.assign(store["0"])
        self.ema.assign(store["0"])


def test_one_tensor_loaded_into_two_variables_gives_two_buffers(tmp_path):
    model = keras.Sequential([keras.Input((4,)), TwinKernel()])
    path = tmp_path / "twin.keras"
    ksf.save_model(model, path)
    loaded = ksf.load_model(path)
    layer = loaded.layers[0]
    np.testing.assert_array_equal(layer.kernel.numpy(), model.layers[0].kernel.numpy())
    np.testing.assert_array_equal(layer.ema.numpy(), model.layers[0].kernel.numpy())
    assert _buffer_address(layer.kernel) != _buffer_address(layer.ema)
    layer.kernel.assign_add(np.ones((4, 3), "float32"))
    np.testing.assert_array_equal(layer.ema.numpy(), model.layers[0].kernel.numpy())


@keras.saving.register_keras_serializable(package="ksf_tests")
class HalvesAfterLoading(keras.layers.Layer):
    """Custom loading code that keeps and modifies what the store gave it, as user code may."""

    def build(self, input_shape):
        self.k = self.add_weight(shape=(input_shape[-1], 3), name="k")

    def call(self, x):
        return x @ self.k

    def load_own_variables(self, store):
        w = store["0"]
        self.k.assign(w)
        w *= 0.5  # stock hands out an independent array: this must not reach `k`


def test_arrays_handed_to_custom_code_do_not_alias_variables(tmp_path):
    model = keras.Sequential([keras.Input((4,)), HalvesAfterLoading()])
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    for load in (ksf.load_model, keras.saving.load_model):
        np.testing.assert_array_equal(load(path).layers[0].k.numpy(), model.layers[0].k.numpy())
    fresh = keras.Sequential([keras.Input((4,)), HalvesAfterLoading()])
    ksf.load_weights(fresh, path)
    np.testing.assert_array_equal(fresh.layers[0].k.numpy(), model.layers[0].k.numpy())
