"""`make bench`: stock Keras 3 vs kerassave_fast vs raw I/O of the same bytes, in one run.

Default: 4 x Dense(4096) + Adam after one training step (~0.8 GB of weights and optimizer state)
and ResNet50(weights=None) + Adam (~750 variables) as `.keras`, each in /dev/shm and in a disk
directory; the dense model as a legacy `.h5` of Keras 3 and of tf_keras, in /dev/shm.
`--units 8192 --models dense --dirs DISK_DIR` is the 3.2 GB case. Writes benches/results/.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import report
from measure import H5, KERAS, Result, run, save_json, tf_keras_h5, tf_keras_keras, weights_only

HERE = os.path.dirname(os.path.abspath(__file__))


def dense_model(units: int) -> keras.Model:
    """4 x Dense(units) + Adam after one training step (weights + 2 Adam slots = 3 copies)."""
    model = keras.Sequential([keras.Input((units,))] + [keras.layers.Dense(units) for _ in range(4)])
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32"))
    return model


def resnet_model(loss="sparse_categorical_crossentropy") -> keras.Model:
    """ResNet50(weights=None) + Adam after one step: many small tensors."""
    model = keras.applications.ResNet50(weights=None)
    model.compile(optimizer="adam", loss=loss)
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(2, 224, 224, 3)).astype("float32"), np.array([1, 2]))
    return model


def dense_h5_model(units: int) -> keras.Model:
    """The dense model for Keras 3's legacy `.h5`, its loss an object: stock Keras 3.15.1 cannot
    load the `.h5` of a model compiled with `loss="mse"`."""
    model = keras.Sequential([keras.Input((units,))] + [keras.layers.Dense(units) for _ in range(4)])
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32"))
    return model


def tf_keras_dense_model(units: int):
    """The dense model in tf_keras (Keras 2), for its legacy `.h5`."""
    import tf_keras

    model = tf_keras.Sequential([tf_keras.layers.Dense(units, input_shape=(units,))])
    for _ in range(3):
        model.add(tf_keras.layers.Dense(units))
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32"))
    return model


def many_arrays_model(_units: int, loss=None) -> keras.Model:
    """1,000 parallel Dense(64) + Adam: 6,002 small arrays (50 MB), where per-array costs decide.
    The optimizer is built directly: a first training step would trace a graph of 1,000 branches
    for minutes; the arrays saved are the same."""
    inputs = keras.Input((32,))
    outputs = keras.layers.Concatenate()([keras.layers.Dense(64)(inputs) for _ in range(1000)])
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=loss or "mse")
    model.optimizer.build(model.trainable_variables)
    return model


def many_arrays_h5_model(units: int) -> keras.Model:
    """The many-array model for `.h5`, its loss an object (see dense_h5_model)."""
    return many_arrays_model(units, keras.losses.MeanSquaredError())


MODELS = {
    # name: (make(units), label(units), format(model), only in the first directory)
    "dense": (dense_model, "dense{}", lambda _: KERAS, False),
    "resnet50": (lambda _: resnet_model(), "resnet50", lambda _: KERAS, False),
    "dense-h5": (dense_h5_model, "dense{} .h5", lambda _: H5, True),
    # Keras 3's legacy `.h5` of ResNet50, its loss an object (see dense_h5_model): --models resnet50-h5
    "resnet50-h5": (
        lambda _: resnet_model(keras.losses.SparseCategoricalCrossentropy()),
        "resnet50 .h5",
        lambda _: H5,
        True,
    ),
    "tf_keras-dense-h5": (tf_keras_dense_model, "tf_keras dense{} .h5", lambda _: tf_keras_h5(), True),
    "tf_keras-dense-keras": (tf_keras_dense_model, "tf_keras dense{} .keras", lambda _: tf_keras_keras(), True),
    # Not in the default run (stock takes ~20 s per load): --models many,many-h5,many-weights --repeats 3
    "many": (many_arrays_model, "1000xDense(64)", lambda _: KERAS, True),
    "many-h5": (many_arrays_h5_model, "1000xDense(64) .h5", lambda _: H5, True),
    "many-weights": (many_arrays_model, "1000xDense(64) .weights.h5", weights_only, True),
    # Weights only, in shards of 0.1 GB (8 for the default model): --models dense-sharded
    "dense-sharded": (dense_model, "dense{} .weights.json", lambda model: weights_only(model, 0.1), True),
}
DEFAULT_MODELS = ("dense", "resnet50", "dense-h5", "tf_keras-dense-h5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from: {', '.join(MODELS)} (all but dense and resnet50 in the first directory only)",
    )
    parser.add_argument("--units", type=int, default=4096, help="width of the dense model (8192: 3.2 GB)")
    parser.add_argument(
        "--dirs",
        default=f"/dev/shm,{os.path.join(HERE, 'scratch')}",
        help="comma-separated directories to save into (default: /dev/shm and a disk directory)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--name", default="latest", help="basename of the files written to --out")
    args = parser.parse_args()

    directories = [d for d in args.dirs.split(",") if d]
    for d in directories:
        os.makedirs(d, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    log = report.log

    results: list[Result] = []
    for name in args.models.split(","):
        log(f"building {name}")
        make, label, fmt, first_only = MODELS[name]
        model, label = make(args.units), label.format(args.units)
        for directory in directories[:1] if first_only else directories:
            log(f"measuring {label} in {directory}")
            results.append(run(label, model, directory, args.repeats, log, fmt(model)))
        del model
        keras.backend.clear_session()

    info = report.machine(directories)
    table = report.markdown(results, info, args.repeats)
    base = os.path.join(args.out, args.name)
    with open(base + ".md", "w") as f:
        f.write(table)
    save_json(results, info, base + ".json")
    report.plot(results, base + ".png")
    print(table)
    log(f"wrote {base}.md, .json and .png")


if __name__ == "__main__":
    main()
