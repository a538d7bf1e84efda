"""Saves a model over and over until killed; test_faults.py kills it at chosen moments.

Usage: python kill_worker.py PATH [EVENT]
PATH ending in `.keras`, `.h5` or `.weights.h5`: a Keras 3 model saved there; any other PATH: a
tf_keras model saved there as a SavedModel directory (time-chosen kills only, no EVENT).
Prints "ready" once the model is built and PATH holds a complete save. Without EVENT it then saves
forever (the test kills it at a moment of its choosing); with EVENT=N it kills itself with SIGKILL
just before the N-th write-level step of the next save (a zip member, the tensors, the central
directory, the rename), so every step boundary is hit.
"""

from __future__ import annotations

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import kerassave_fast as ksf
from kerassave_fast import files
from kerassave_fast.formats import keras_zip, weights_h5


def is_saved_model(path: str) -> bool:
    return not path.endswith((".keras", ".h5"))


def model(flavour=keras) -> keras.Model:
    flavour.utils.set_random_seed(7)
    m = flavour.Sequential([flavour.Input((256,))] + [flavour.layers.Dense(256) for _ in range(6)])
    m.compile(optimizer="adam", loss="mse")
    m.train_on_batch(np.ones((2, 256), "float32"), np.ones((2, 256), "float32"))
    return m


def save(m, path: str) -> None:
    if path.endswith(".weights.h5"):
        ksf.save_weights(m, path)
    elif is_saved_model(path):
        ksf.save_model(m, path, save_format="tf")
    else:
        ksf.save_model(m, path)


def die_at(event: int) -> None:
    """Counts the steps that write, and kills the process before the `event`-th."""
    count = [0]

    def step(function):
        def counted(*args, **kwargs):
            count[0] += 1
            if count[0] == event:
                os.kill(os.getpid(), signal.SIGKILL)
            return function(*args, **kwargs)

        return counted

    class CountingZipWriter:
        def __init__(self, *args):
            self._inner = real_zip_writer(*args)

        def __getattr__(self, name):
            return step(getattr(self._inner, name))

    real_zip_writer = keras_zip.ZipWriter
    keras_zip.ZipWriter = CountingZipWriter
    keras_zip.write_layout = step(keras_zip.write_layout)
    weights_h5.write_weights_file = step(weights_h5.write_weights_file)  # .weights.h5 and legacy .h5
    files.os.replace = step(os.replace)


def main() -> None:
    path, event = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None
    if is_saved_model(path):
        import tf_keras

        m = model(tf_keras)
    else:
        m = model()
    save(m, path)
    print("ready", flush=True)
    if event is not None:
        die_at(event)
        save(m, path)
        print("finished", flush=True)  # fewer steps than `event`: the save completed
        return
    while True:
        save(m, path)


if __name__ == "__main__":
    main()
