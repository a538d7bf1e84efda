"""tf_keras models built for a load (legacy `.h5` and tf_keras `.keras`): the weights of stock layers
the file replaces start uninitialized (tf_keras/uninitialized.py), and no one can see the difference:
code reading weights while the model is built sees stock's initial values, a weight the file does
not provide gets its initializer's value, and models built elsewhere meanwhile are stock's."""

from __future__ import annotations

import threading
import types

import numpy as np
import pytest
import tf_keras

import kerassave_fast as ksf
from kerassave_fast.tf_keras import uninitialized

SUFFIXES = [".h5", ".keras"]


class ReadingDense(tf_keras.layers.Dense):
    """A subclass of a listed layer that reads its kernel while it is built."""

    def build(self, input_shape):
        super().build(input_shape)
        self.kernel_at_build = self.kernel.numpy()


class HidesADense(tf_keras.layers.Layer):
    """A custom layer holding a Dense where tf_keras does not track it: no file holds its weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = types.SimpleNamespace(dense=tf_keras.layers.Dense(3, kernel_initializer="ones"))

    def build(self, input_shape):
        self.hidden.dense.build(input_shape)
        super().build(input_shape)

    def call(self, x):
        return self.hidden.dense(x)


def _spy_on_uninitialized(monkeypatch) -> list:
    """The names of the variables each load built uninitialized."""
    names = []
    create = uninitialized.Uninitialized.create

    def spying(self, next_creator, **kwargs):
        variable = create(self, next_creator, **kwargs)
        if id(variable) in self._pending:
            names.append(variable.name)
        return variable

    monkeypatch.setattr(uninitialized.Uninitialized, "create", spying)
    return names


def _trained(model):
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *model.inputs[0].shape[1:])).astype("float32")
    model.train_on_batch(x, rng.normal(size=(4, *model.outputs[0].shape[1:])).astype("float32"))
    return model


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_stock_layers_start_uninitialized_and_take_the_files_weights(tmp_path, monkeypatch, suffix):
    layers = tf_keras.layers
    model = _trained(
        tf_keras.Sequential(
            [
                layers.Conv2D(4, 3, input_shape=(6, 6, 2)),
                layers.BatchNormalization(),
                layers.Flatten(),
                layers.Dense(5),
            ]
        )
    )
    path = tmp_path / f"m{suffix}"
    ksf.save_model(model, path)
    names = _spy_on_uninitialized(monkeypatch)
    loaded = ksf.load_model_as("tf_keras", path)
    assert len(names) == len(model.weights)  # every weight of these stock layers
    for a, b in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.name
    assert not any("assign" in vars(v) for v in loaded.weights)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_layer_reading_its_weights_while_built_sees_stocks_values(tmp_path, monkeypatch, suffix):
    """A subclass of a listed layer may read a weight in `build`: its weights are initialized as stock's."""
    inputs = tf_keras.Input((4,))
    outputs = ReadingDense(3, kernel_initializer="ones")(tf_keras.layers.Dense(4)(inputs))
    model = _trained(tf_keras.Model(inputs, outputs))
    path = tmp_path / f"m{suffix}"
    ksf.save_model(model, path)
    names = _spy_on_uninitialized(monkeypatch)
    loaded = ksf.load_model_as("tf_keras", path, custom_objects={"ReadingDense": ReadingDense})
    reading = loaded.layers[-1]
    assert names == [v.name for v in loaded.layers[1].weights]  # the stock Dense only
    assert np.array_equal(reading.kernel_at_build, np.ones((4, 3), np.float32))
    for a, b in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.name


def test_weights_the_file_does_not_assign_get_their_initializers_values(tmp_path):
    inputs = tf_keras.Input((4,))
    model = tf_keras.Model(inputs, HidesADense()(inputs))
    model.layers[-1].hidden.dense.kernel.assign(np.full((4, 3), 7.0, np.float32))  # saved by no one
    path = tmp_path / "m.keras"
    ksf.save_model(model, path)
    loaded = ksf.load_model_as("tf_keras", path, custom_objects={"HidesADense": HidesADense})
    kernel = loaded.layers[-1].hidden.dense.kernel
    assert np.array_equal(kernel.numpy(), np.ones((4, 3), np.float32))
    assert "assign" not in vars(kernel)


def test_a_model_built_on_another_thread_meanwhile_is_initialized(tmp_path):
    built = {}

    def build():
        built["model"] = tf_keras.Sequential([tf_keras.layers.Dense(3, kernel_initializer="ones", input_shape=(4,))])

    with uninitialized.building() as pending:
        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
    assert not pending._pending
    pending.initialize_leftovers()
    assert np.array_equal(built["model"].layers[0].kernel.numpy(), np.ones((4, 3), np.float32))
