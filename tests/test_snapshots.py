"""Snapshots of variables for saving (tensors.py): `snapshots` reads runs of variables with one
batched op each; what it returns must be what `snapshot` returns for each value alone."""

from __future__ import annotations

import gc
import weakref

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import kerassave_fast as ksf
from kerassave_fast import tensors


def _values():
    """Runs of one dtype, dtypes and kinds mixed between them, scalars included."""
    rng = np.random.default_rng(0)
    return [
        *(keras.Variable(rng.normal(size=(3, 4)).astype("float32")) for _ in range(5)),
        keras.Variable(np.array(7, np.int64)),
        keras.Variable(np.float32(2.5)),
        *(keras.Variable(rng.normal(size=(6,)).astype(ml_dtypes.bfloat16), dtype="bfloat16") for _ in range(3)),
        keras.Variable(np.array(1.5, ml_dtypes.bfloat16), dtype="bfloat16"),
        keras.Variable(np.array(2.5, ml_dtypes.bfloat16), dtype="bfloat16"),
        tf.Variable(rng.normal(size=(2, 2)).astype("float16")),
        tf.Variable(rng.normal(size=(2, 2)).astype("float16")),
        np.arange(4, dtype="int32"),  # not a variable: converted as `snapshot` converts it
        tf.constant([1.0, 2.0]),
        *(keras.Variable(rng.normal(size=(2,)).astype("float64")) for _ in range(4)),
    ]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("batch", [512, 3])  # 3: runs cut at batch ends
def test_snapshots_are_each_values_snapshot(monkeypatch, batch):
    monkeypatch.setattr(tensors, "_READ_BATCH", batch)
    values = _values()
    taken = list(tensors.snapshots(values))
    assert len(taken) == len(values)
    for value, array in zip(values, taken, strict=True):
        assert _same(array, tensors.snapshot(value))
        assert array.flags.c_contiguous


def test_runs_of_variables_are_read_by_one_op(monkeypatch):
    """No single ReadVariableOp for a run of variables of one dtype (the batched read is used)."""
    context, execute, read_variable_op, plain = tensors._tensorflow_reads()
    single = []

    def counted(*args, **kwargs):
        single.append(args)
        return read_variable_op(*args, **kwargs)

    monkeypatch.setattr(tensors, "_tensorflow_reads", lambda: (context, execute, counted, plain))
    values = [keras.Variable(np.full((4,), i, "float32")) for i in range(10)]
    taken = list(tensors.snapshots(values))
    assert not single
    assert [a[0] for a in taken] == list(range(10))


def test_a_snapshot_keeps_its_bytes_when_the_variable_changes():
    values = [keras.Variable(np.full((1000,), i, "float32")) for i in range(4)]
    taken = list(tensors.snapshots(values))
    for v in values:
        v.assign(np.zeros((1000,), "float32"))
        v.assign_add(np.ones((1000,), "float32"))
    assert [float(a[0]) for a in taken] == [0.0, 1.0, 2.0, 3.0]
    assert all(not a.flags.writeable for a in taken)


def test_a_failed_batched_read_reads_one_by_one(monkeypatch):
    """A batched read TensorFlow refuses (a device it cannot run on, an op it no longer has) falls
    back to single reads, which raise what they raise."""
    context, _, read_variable_op, plain = tensors._tensorflow_reads()

    class Refusing:
        @staticmethod
        def execute(*args, **kwargs):
            raise tf.errors.InvalidArgumentError(None, None, "refused")

    monkeypatch.setattr(tensors, "_tensorflow_reads", lambda: (context, Refusing, read_variable_op, plain))
    values = _values()
    for value, array in zip(values, tensors.snapshots(values), strict=True):
        assert _same(array, tensors.snapshot(value))


@pytest.mark.parametrize(
    ("flavour", "name"),
    [(f, n) for f in ("keras3", "tf_keras") for n in ("m.keras", "m.h5")]
    + [("keras3", "w.weights.h5"), ("tf_keras", "w.h5")],  # each flavour's weights file
)
def test_no_snapshot_outlives_its_save(tmp_path, monkeypatch, flavour, name):
    """Each snapshot shares its variable's buffer: kept alive after the save (by a reference cycle
    waiting for the GC, as a legacy `.h5` plan once was), training would copy every variable it
    changes. GC is off here, so only references count."""
    if flavour == "keras3":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    else:
        import tf_keras

        model = tf_keras.Sequential([tf_keras.layers.Dense(3, input_shape=(4,)), tf_keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.train_on_batch(np.ones((2, 4), "float32"), np.ones((2, 2), "float32"))
    taken = []
    read_only = tensors._read_only

    def recorded(tensor):
        array = read_only(tensor)
        taken.append(weakref.ref(array))
        return array

    monkeypatch.setattr(tensors, "_read_only", recorded)
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):  # a first save, and one replaying it
            if name.startswith("w."):
                ksf.save_weights(model, tmp_path / name)
            else:
                ksf.save_model(model, tmp_path / name)
        assert taken and not [r for r in taken if r() is not None]
    finally:
        gc.enable()
