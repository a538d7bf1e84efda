"""Run by tests/test_distribute.py in a fresh process: TensorFlow's logical devices (and a
multi-worker cluster's TF_CONFIG) must be set before TensorFlow starts.

    python distribute_worker.py mirrored OUT_DIR
    python distribute_worker.py multi_worker OUT_DIR   (TF_CONFIG set by the caller)
"""

from __future__ import annotations

import json
import os
import sys
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

MEMBERS_COMPARED = ("config.json", "model.weights.h5")


def _logical_cpus(n: int) -> list[str]:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    return [d.name for d in tf.config.list_logical_devices("CPU")]


def _batch():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")


def _keras3_model():
    import keras

    keras.utils.set_random_seed(1)
    layers = keras.layers
    model = keras.Sequential(
        [keras.Input((6,), name="x"), layers.Dense(8, name="hidden"), layers.Dense(2, name="out")], name="net"
    )
    model.compile(keras.optimizers.Adam(name="adam"), "mse")
    return model


def _tf_keras_model():
    import tf_keras

    tf_keras.utils.set_random_seed(1)
    layers = tf_keras.layers
    model = tf_keras.Sequential(
        [layers.Dense(8, input_shape=(6,), name="hidden"), layers.Dense(2, name="out")], name="net"
    )
    model.compile(tf_keras.optimizers.Adam(name="adam"), "mse")
    return model


def _state(model) -> list[bytes]:
    return [np.asarray(v.numpy()).tobytes() for v in list(model.weights) + list(model.optimizer.variables)]


def _weights(model) -> list[bytes]:
    return [w.numpy().tobytes() for w in model.weights]


def _members(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in MEMBERS_COMPARED}


def mirrored(out: str) -> dict:
    """Keras 3 and tf_keras models trained under a two-device MirroredStrategy: saved by us and by
    stock, loaded by us and by stock, inside and outside the strategy's scope."""
    import keras
    import tf_keras

    import kerassave_fast as ksf

    strategy = tf.distribute.MirroredStrategy(_logical_cpus(2))
    results: dict = {"replicas": strategy.num_replicas_in_sync}
    with strategy.scope():
        model = _keras3_model()
    model.fit(*_batch(), batch_size=8, epochs=1, verbose=0)
    ksf.save_model(model, f"{out}/ours.keras")
    keras.saving.save_model(model, f"{out}/stock.keras")
    ksf.save_weights(model, f"{out}/ours.weights.h5")
    model.save_weights(f"{out}/stock.weights.h5")  # stock's (not installed)
    results["keras3 .keras members equal"] = _members(f"{out}/ours.keras") == _members(f"{out}/stock.keras")
    with open(f"{out}/ours.weights.h5", "rb") as a, open(f"{out}/stock.weights.h5", "rb") as b:
        results["keras3 .weights.h5 equal"] = a.read() == b.read()
    expected = _state(model)
    with strategy.scope():
        in_scope = ksf.load_model(f"{out}/ours.keras")
    results["keras3 load in scope"] = _state(in_scope) == expected
    results["keras3 load in scope is mirrored"] = isinstance(in_scope.weights[0].value, tf.distribute.DistributedValues)
    results["keras3 load outside scope"] = _state(ksf.load_model(f"{out}/stock.keras")) == expected
    in_scope.fit(*_batch(), batch_size=8, epochs=1, verbose=0)  # it trains on both replicas
    model.fit(*_batch(), batch_size=8, epochs=1, verbose=0)
    results["keras3 next step equal"] = _state(in_scope) == _state(model)

    with strategy.scope():
        tf_model = _tf_keras_model()
    tf_model.fit(*_batch(), batch_size=8, epochs=1, verbose=0)
    expected = _state(tf_model)
    for suffix, kwargs in ((".keras", {}), (".h5", {}), ("_sm", {"save_format": "tf"})):
        ksf.save_model(tf_model, f"{out}/tf_ours{suffix}", **kwargs)
        tf_keras.models.save_model(tf_model, f"{out}/tf_stock{suffix}", **kwargs)
        with strategy.scope():
            ours_in_scope = ksf.load_model_as("tf_keras", f"{out}/tf_ours{suffix}")
        stock = tf_keras.models.load_model(f"{out}/tf_ours{suffix}")
        weights = [np.asarray(w).tobytes() for w in tf_model.get_weights()]
        results[f"tf_keras {suffix}: stock loads ours"] = _weights(stock) == weights
        results[f"tf_keras {suffix}: ours loads ours in scope"] = _weights(ours_in_scope) == weights
        stock_file = ksf.load_model_as("tf_keras", f"{out}/tf_stock{suffix}")
        results[f"tf_keras {suffix}: ours loads stock's"] = _weights(stock_file) == weights
    results["tf_keras state unchanged by saving"] = _state(tf_model) == expected
    return results


def multi_worker(out: str) -> dict:
    """One worker of a two-worker MultiWorkerMirroredStrategy cluster (TF_CONFIG) training a tf_keras
    model with stock's ModelCheckpoint and ours side by side: the chief writes both checkpoints of
    each epoch, the other worker writes into temporary directories that are removed after each save."""
    import tf_keras

    from kerassave_fast.callbacks import TFKerasAsyncModelCheckpoint

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = _tf_keras_model()
    callbacks = [
        tf_keras.callbacks.ModelCheckpoint(f"{out}/stock-{{epoch}}.h5"),
        TFKerasAsyncModelCheckpoint(f"{out}/ours-{{epoch}}.h5"),
        tf_keras.callbacks.ModelCheckpoint(f"{out}/stock-{{epoch}}.keras"),
        TFKerasAsyncModelCheckpoint(f"{out}/ours-{{epoch}}.keras"),
    ]
    x, y = _batch()
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=callbacks)
    return {"chief": strategy.extended.should_checkpoint, "task": strategy.extended._task_id}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    results = {"mirrored": mirrored, "multi_worker": multi_worker}[mode](out)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
