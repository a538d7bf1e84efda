"""Small tf_keras models for the tf_keras tests (tests/test_tf_checkpoint.py, tests/test_tf_saved_model.py):
seeded, trained with deterministic ops, so building one twice gives bitwise the same model."""

from __future__ import annotations

import numpy as np
import tf_keras


def batch(model, seed=0):
    rng = np.random.default_rng(seed)
    shape = (4, *model.inputs[0].shape[1:])
    if "int" in model.inputs[0].dtype.name:
        x = rng.integers(0, 30, size=shape).astype("int32")
    else:
        x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=(4, *model.outputs[0].shape[1:])).astype("float32")
    return x, y


def dense_adam():
    return tf_keras.Sequential([tf_keras.layers.Dense(8, input_shape=(5,)), tf_keras.layers.Dense(3)]), "adam"


def convnet_batchnorm():
    layers = tf_keras.layers
    m = tf_keras.Sequential(
        [
            layers.Conv2D(4, 3, input_shape=(8, 8, 3)),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(2),
        ]
    )
    return m, tf_keras.optimizers.SGD(0.01, momentum=0.9)


def embedding_lstm():
    layers = tf_keras.layers
    inputs = tf_keras.Input((7,), dtype="int32")
    outputs = layers.Dense(2)(layers.LSTM(5)(layers.Embedding(30, 6)(inputs)))
    return tf_keras.Model(inputs, outputs), "rmsprop"


def mixed_precision():
    """float16 compute on float32 variables (AutoCastVariable), bfloat16 variables, a loss scale."""
    layers = tf_keras.layers
    inputs = tf_keras.Input((6,))
    h = layers.Dense(8, dtype="mixed_float16")(inputs)
    h = layers.Dense(4, dtype="bfloat16")(h)
    outputs = layers.Dense(2, dtype="float32")(h)
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.Adam())
    return tf_keras.Model(inputs, outputs), optimizer


MODELS = [dense_adam, convnet_batchnorm, embedding_lstm, mixed_precision]


def compiled(make):
    tf_keras.utils.set_random_seed(7)
    model, optimizer = make()
    model.compile(optimizer=optimizer, loss="mse")
    return model


def trained(make):
    model = compiled(make)
    model.train_on_batch(*batch(model))
    return model


def state(model):
    return [v.numpy() for v in model.weights], [v.numpy() for v in model.optimizer.variables]


def assert_same_state(a, b):
    for x, y in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.name)
    for x, y in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=x.name)
