"""tf_keras TF-format weights and SavedModel: stock vs kerassave_fast vs raw I/O of the same bytes.

    python benches/tf_keras_bundle.py [--units 4096] [--dir /dev/shm] [--repeats 3]

Model: 4 x Dense(units) + Adam after one training step (tf_keras). Each repeat runs every case once,
in a shuffled order; the table shows medians (and the spread). "graph only" is TensorFlow's
`save_and_return_nodes(..., experimental_skip_checkpoint=True)` inside tf_keras' SavedModel save:
the floor for a SavedModel save whose variables cost nothing. Loads go into a trained copy of the
model (its optimizer built, so every tensor is restored at once).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf_keras

import kerassave_fast as ksf


def dense_model(units: int):
    model = tf_keras.Sequential(
        [tf_keras.layers.Dense(units, input_shape=(units,))] + [tf_keras.layers.Dense(units) for _ in range(3)]
    )
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(0)
    model.train_on_batch(rng.normal(size=(8, units)).astype("float32"), rng.normal(size=(8, units)).astype("float32"))
    return model


def graph_only_save(model, path: str) -> None:
    """tf_keras' SavedModel save with TensorFlow's checkpoint writer skipped."""
    from tensorflow.python.saved_model import save as save_lib

    real = save_lib.save_and_return_nodes

    def skipping(obj, export_dir, signatures=None, options=None):
        return real(obj, export_dir, signatures, options, experimental_skip_checkpoint=True)

    save_lib.save_and_return_nodes = skipping
    try:
        model.save(path, save_format="tf")
    finally:
        save_lib.save_and_return_nodes = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, default=4096)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    work = os.path.join(args.dir, "ksf_tf_keras_bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    model = dense_model(args.units)
    target = dense_model(args.units)
    arrays = [np.asarray(v.value()) for v in model.weights + model.optimizer.variables]
    nbytes = sum(a.nbytes for a in arrays)
    model.save_weights(os.path.join(work, "ref", "w"))  # for the loads
    ksf.save_model(model, os.path.join(work, "ref_sm"))

    def raw_write():
        with open(os.path.join(work, "raw"), "wb") as f:
            for a in arrays:
                f.write(a)

    def raw_read():
        buffer = np.empty(nbytes, np.uint8)
        with open(os.path.join(work, "raw"), "rb", buffering=0) as f:
            f.readinto(buffer)

    def fresh(name: str) -> str:
        path = os.path.join(work, name)
        shutil.rmtree(path, ignore_errors=True)
        return path

    cases = {
        "raw write": raw_write,
        "raw read": raw_read,
        "save_weights stock": lambda: model.save_weights(os.path.join(fresh("sw_stock"), "w")),
        "save_weights ours": lambda: ksf.save_weights(model, os.path.join(fresh("sw_ours"), "w")),
        "load_weights stock": lambda: target.load_weights(os.path.join(work, "ref", "w")),
        "load_weights ours": lambda: ksf.load_weights(target, os.path.join(work, "ref", "w")),
        "SavedModel graph only": lambda: graph_only_save(model, fresh("sm_graph")),
        "SavedModel save stock": lambda: model.save(fresh("sm_stock"), save_format="tf"),
        "SavedModel save ours": lambda: ksf.save_model(model, fresh("sm_ours"), save_format="tf"),
        "SavedModel load_model stock (of ours)": lambda: tf_keras.models.load_model(os.path.join(work, "ref_sm")),
    }
    raw_write()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        order = list(cases)
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - start)
    print(f"tf_keras 4 x Dense({args.units}) + Adam, {nbytes / 1e6:.0f} MB, {args.dir}, TF {tf.__version__}")
    print(f"medians of {args.repeats} (min-max)\n")
    print("| case | s | min-max |")
    print("|---|--:|--:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {min(ts):.3f}-{max(ts):.3f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
