"""tf_keras models built for a load (legacy `.h5` and tf_keras `.keras`): the weights of stock layers
the file replaces start uninitialized (tf_keras/uninitialized.py), and no one can see the difference:
code reading weights while the model is built sees stock's initial values, a weight no one assigned
gets its initializer's value, and models built elsewhere meanwhile are stock's."""

from __future__ import annotations

import random
import threading

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


class ReadsItsDense(tf_keras.layers.Layer):
    """A custom layer that reads the kernel of a stock Dense it holds while it is built."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = tf_keras.layers.Dense(3, kernel_initializer="ones")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.kernel_at_build = self.dense.kernel.numpy()
        super().build(input_shape)

    def call(self, x):
        return self.dense(x)


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
def test_a_model_naming_a_custom_object_is_initialized_as_stocks(tmp_path, monkeypatch, suffix):
    """The user's code may read a stock layer's weight while the model is built."""
    inputs = tf_keras.Input((4,))
    model = _trained(tf_keras.Model(inputs, ReadsItsDense()(tf_keras.layers.Dense(4)(inputs))))
    path = tmp_path / f"m{suffix}"
    ksf.save_model(model, path)
    names = _spy_on_uninitialized(monkeypatch)
    loaded = ksf.load_model_as("tf_keras", path, custom_objects={"ReadsItsDense": ReadsItsDense})
    assert names == []
    assert np.array_equal(loaded.layers[-1].kernel_at_build, np.ones((4, 3), np.float32))
    for a, b in zip(model.weights, loaded.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.name


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_random_streams_after_a_load_are_where_stocks_load_leaves_them(tmp_path, suffix):
    """Stock's build calls each initializer, which draws its seed from Keras' seed generator (or
    Python's `random`): what is drawn next (a new model's weights, a Dropout) must not change."""
    layers = tf_keras.layers
    model = _trained(tf_keras.Sequential([layers.Dense(4, input_shape=(3,)), layers.Dropout(0.5), layers.Dense(2)]))
    path = tmp_path / f"m{suffix}"
    ksf.save_model(model, path)
    drawn = {}
    for who, load in (("stock", tf_keras.models.load_model), ("ours", lambda p: ksf.load_model_as("tf_keras", p))):
        tf_keras.utils.set_random_seed(0)
        loaded = load(path)
        loaded.train_on_batch(np.ones((8, 3), np.float32), np.zeros((8, 2), np.float32))  # Dropout draws
        fresh = tf_keras.Sequential([layers.Dense(3, input_shape=(3,))])
        drawn[who] = ([v.numpy() for v in loaded.weights], fresh.layers[0].kernel.numpy(), random.random())
    for a, b in zip(drawn["stock"][0], drawn["ours"][0], strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(drawn["stock"][1], drawn["ours"][1]) and drawn["stock"][2] == drawn["ours"][2]


def test_a_compiled_untrained_model_with_ema_keeps_stocks_averages(tmp_path):
    """Adam(use_ema=True) copies every trainable weight when stock builds it at compile time, which a
    `.keras` load does before the weights are loaded; an untrained optimizer's file holds no averages."""
    layers = tf_keras.layers
    model = tf_keras.Sequential(
        [layers.Dense(8, kernel_initializer="ones", input_shape=(4,)), layers.Dense(2, kernel_initializer="zeros")]
    )
    model.compile(optimizer=tf_keras.optimizers.Adam(use_ema=True), loss="mse")
    path = tmp_path / "m.keras"
    model.save(path)
    stock, ours = tf_keras.models.load_model(path), ksf.load_model_as("tf_keras", path)
    pairs = zip(stock.optimizer.variables, ours.optimizer.variables, strict=True)
    averages = [(a, b) for a, b in pairs if "average" in a.name]
    assert len(averages) == 4
    for a, b in averages:
        assert np.array_equal(a.numpy(), b.numpy()), a.name


def _build_uninitialized(layers):
    """A model of `layers` built as a load builds it (its config names no custom object)."""
    with uninitialized.building({}, None) as built:
        model = tf_keras.Sequential([tf_keras.Input((4,)), *layers])
    return model, built


def test_a_subclass_reading_its_weights_while_built_sees_stocks_values():
    model, built = _build_uninitialized([tf_keras.layers.Dense(4), ReadingDense(3, kernel_initializer="ones")])
    assert set(built._pending) == {id(v) for v in model.layers[0].weights}  # the stock Dense only
    assert np.array_equal(model.layers[1].kernel_at_build, np.ones((4, 3), np.float32))
    built.initialize_leftovers()


def test_a_random_weight_no_one_assigned_gets_the_value_stocks_build_gives_it():
    tf_keras.utils.set_random_seed(3)
    stock = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(5), tf_keras.layers.Dense(2)])
    tf_keras.utils.set_random_seed(3)
    model, built = _build_uninitialized([tf_keras.layers.Dense(5), tf_keras.layers.Dense(2)])
    assert len(built._pending) == 4
    model.layers[0].kernel.assign(stock.layers[0].kernel)  # its seed was drawn all the same
    built.initialize_leftovers()
    for a, b in zip(stock.weights, model.weights, strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), a.name


def test_weights_no_one_assigned_get_their_initializers_values():
    model, built = _build_uninitialized([tf_keras.layers.Dense(3, kernel_initializer="ones"), tf_keras.layers.Dense(2)])
    model.layers[1].kernel.assign(np.full((3, 2), 7.0, np.float32))
    built.initialize_leftovers()
    assert np.array_equal(model.layers[0].kernel.numpy(), np.ones((4, 3), np.float32))
    assert np.array_equal(model.layers[0].bias.numpy(), np.zeros(3, np.float32))
    assert np.array_equal(model.layers[1].kernel.numpy(), np.full((3, 2), 7.0, np.float32))
    assert not any("assign" in vars(v) for v in model.weights)


def test_an_assignment_traced_while_the_model_is_built_leaves_the_weight_uninitialized():
    """A layer's call traced into a graph (as functional construction does) may assign a weight
    symbolically: that gives it no value, so it still gets its initializer's if the file has none."""
    import tensorflow as tf

    model, built = _build_uninitialized([tf_keras.layers.Dense(3, kernel_initializer="ones")])
    kernel = model.layers[0].kernel
    tf.function(lambda: kernel.assign(tf.zeros((4, 3)))).get_concrete_function()  # traced, never run
    assert id(kernel) in built._pending
    built.initialize_leftovers()
    assert np.array_equal(kernel.numpy(), np.ones((4, 3), np.float32))


def test_a_model_built_on_another_thread_meanwhile_is_initialized():
    built = {}

    def build():
        built["model"] = tf_keras.Sequential([tf_keras.layers.Dense(3, kernel_initializer="ones", input_shape=(4,))])

    with uninitialized.building({}, None) as pending:
        thread = threading.Thread(target=build)
        thread.start()
        thread.join()
    assert not pending._pending
    pending.initialize_leftovers()
    assert np.array_equal(built["model"].layers[0].kernel.numpy(), np.ones((4, 3), np.float32))
