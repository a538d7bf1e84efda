"""Shared fixtures: a zoo of small trained models, and bitwise comparisons of model state.

Stock Keras is the oracle: files are compared with what `keras.saving.save_model` writes, and
loaded state with what `keras.saving.load_model` restores.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf

tf.config.experimental.enable_op_determinism()
keras.utils.set_random_seed(1234)

# Stock's own saving suites run on request only, with their own config (tests/stock_suites/README.md).
collect_ignore = ["stock_suites"]


@keras.saving.register_keras_serializable(package="ksf_tests")
class Scale(keras.layers.Layer):
    """A custom layer with its own weight, registered with Keras."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="scale")

    def call(self, x):
        return x * self.scale


class Shift(keras.layers.Layer):
    """A custom layer that is NOT registered: loading needs `custom_objects`."""

    def build(self, input_shape):
        self.shift = self.add_weight(shape=(input_shape[-1],), initializer="random_normal", name="shift")

    def call(self, x):
        return x + self.shift


def _trained(model: keras.Model, x, y, optimizer="adam", loss="mse", steps: int = 2) -> keras.Model:
    model.compile(optimizer=optimizer, loss=loss)
    for _ in range(steps):
        model.train_on_batch(x, y)
    return model


def _batch(model: keras.Model, seed: int = 0):
    """A fixed (x, y) batch shaped for `model`."""
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    shape = (4, *spec.shape[1:])
    if "int" in str(spec.dtype):
        x = rng.integers(0, 40, size=shape).astype("int32")
    else:
        x = rng.normal(size=shape).astype("float32")
    y = rng.normal(size=(4, *model.outputs[0].shape[1:])).astype("float32")
    return x, y


def seed_example():
    """The example from stock's `save_model` docstring: Dense + Softmax."""
    m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5), keras.layers.Softmax()])
    return _trained(m, *_batch(m))


def convnet():
    """A keras.applications convnet with BatchNorm, small input."""
    m = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=4)
    return _trained(m, *_batch(m), steps=1)


def embedding_lstm():
    m = keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(50, 8),
            keras.layers.LSTM(4),
            keras.layers.Dense(2),
        ]
    )
    return _trained(m, *_batch(m))


def custom_layers():
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3)(Shift()(Scale()(inputs)))
    m = keras.Model(inputs, outputs)
    return _trained(m, *_batch(m))


def low_precision():
    """bfloat16 and float16 variables (and their optimizer slots)."""
    m = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(7, dtype="bfloat16"),
            keras.layers.Dense(3, dtype="float16"),
            keras.layers.Dense(3),
        ]
    )
    return _trained(m, *_batch(m))


def with_optimizer(name: str):
    optimizers = {
        "adam": lambda: keras.optimizers.Adam(1e-3),
        "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.01),
        "sgd_momentum": lambda: keras.optimizers.SGD(1e-2, momentum=0.9),
        "rmsprop": lambda: keras.optimizers.RMSprop(1e-3),
    }
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])
    return _trained(m, *_batch(m), optimizer=optimizers[name](), steps=3)


MODELS = {
    "seed_example": seed_example,
    "convnet": convnet,
    "embedding_lstm": embedding_lstm,
    "custom_layers": custom_layers,
    "low_precision": low_precision,
    **{f"optimizer_{n}": (lambda n=n: with_optimizer(n)) for n in ("adam", "adamw", "sgd_momentum", "rmsprop")},
}

CUSTOM_OBJECTS = {"Shift": Shift}


@pytest.fixture(scope="session")
def model_zoo():
    """Each model built once per session, on demand."""
    cache: dict[str, keras.Model] = {}

    def get(name: str) -> keras.Model:
        if name not in cache:
            cache[name] = MODELS[name]()
        compile_config = getattr(cache[name], "_compile_config", None)
        # Stock's `.h5` save pops it, and every later save of the shared model would lose its optimizer.
        assert compile_config is None or "optimizer" in compile_config.config, (
            f"an earlier test saved the shared {name!r} with keras.saving's .h5 save: use test_legacy_h5.stock_save"
        )
        return cache[name]

    return get


def state_of(model: keras.Model) -> list[tuple[str, np.ndarray]]:
    """Every weight and optimizer variable, in order, as (path, raw bytes view)."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return [(v.path, np.atleast_1d(np.asarray(v.numpy())).reshape(-1).view(np.uint8)) for v in variables]


def assert_same_state(expected: keras.Model, actual: keras.Model) -> None:
    """Weights and optimizer state (iterations included) are bitwise equal, variable by variable."""
    a, b = state_of(expected), state_of(actual)
    assert len(a) == len(b), f"{len(a)} variables expected, {len(b)} found"
    for (path_a, bytes_a), (path_b, bytes_b) in zip(a, b, strict=True):
        assert np.array_equal(bytes_a, bytes_b), f"variable {path_a} (loaded as {path_b}) differs"


def member(path, name: str) -> bytes:
    with zipfile.ZipFile(path) as zf:
        return zf.read(name)


def members_but_date(path) -> dict[str, bytes]:
    """A `.keras` zip's members, each one's bytes, but the save's date (in `metadata.json` and the
    zip's own timestamps): what two saves of the same model at different times share."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    metadata = json.loads(members["metadata.json"])
    assert metadata.pop("date_saved")
    members["metadata.json"] = json.dumps(metadata).encode()
    return members


def h5_tree(data: bytes) -> dict:
    """{path: (kind, shape, dtype, attrs)} of an HDF5 file's every group and dataset."""
    import h5py

    tree = {}
    with h5py.File(io.BytesIO(data), "r") as f:

        def visit(name, obj):
            attrs = {k: str(v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                tree[name] = ("dataset", obj.shape, str(obj.dtype), attrs)
            else:
                tree[name] = ("group", None, None, attrs)

        f.visititems(visit)
    return tree
