"""Tensor bytes in and out of TensorFlow without copies.

Saving reads each variable through a read-only view of its buffer (`v.numpy()` would copy it);
loading reads file bytes into 64-byte-aligned arrays that TensorFlow then adopts through DLPack.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator

import ml_dtypes
import numpy as np

# TensorFlow's EIGEN_MAX_ALIGN_BYTES: it aborts the process on a less aligned buffer it adopted.
ALIGNMENT = 64
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an `ALIGNMENT` boundary."""
    dtype = np.dtype(dtype)
    raw = np.empty(math.prod(shape) * dtype.itemsize + ALIGNMENT, np.uint8)
    return np.ndarray(shape, dtype, buffer=raw, offset=-raw.ctypes.data % ALIGNMENT)


def as_bytes(array: np.ndarray) -> np.ndarray:
    """The array's memory as a flat uint8 view (any dtype, bfloat16 included)."""
    return array.reshape(-1).view(np.uint8)


@functools.cache
def _tensorflow_reads():
    """TensorFlow's eager context, its op executor, ReadVariableOp, and the variable types it reads
    directly: plain resource variables, and those made inside a `tf.function` (Keras 3's optimizer
    slots). Imported once (a model of 6,000 variables snapshots them all at each save)."""
    from tensorflow.python.eager import context, execute
    from tensorflow.python.eager.polymorphic_function.polymorphic_function import UnliftedInitializerVariable
    from tensorflow.python.ops.gen_resource_variable_ops import read_variable_op
    from tensorflow.python.ops.resource_variable_ops import ResourceVariable

    return context, execute, read_variable_op, (ResourceVariable, UnliftedInitializerVariable)


def _plain_variable(value, plain: tuple):
    """The TensorFlow resource variable ReadVariableOp reads for `value` (itself, or a Keras 3
    variable's backing one), or None."""
    inner = getattr(value, "_value", None)
    if type(inner) in plain:
        return inner
    return value if type(value) in plain else None


def _read_only(tensor) -> np.ndarray:
    """A read tensor's own buffer as a read-only array."""
    array = tensor._numpy()
    if not isinstance(array, np.ndarray):  # a 0-d tensor's comes as a numpy scalar: a copy
        try:
            array = np.asarray(tensor)  # the tensor's own buffer
        except ValueError:  # TensorFlow refuses a bfloat16 scalar this way: the copy it is
            array = np.asarray(array)
    array.flags.writeable = False
    return array


def snapshot(value) -> np.ndarray:
    """A C-contiguous array of `value`'s current bytes, sharing the variable's buffer when it can.

    For a TensorFlow variable the view stays valid and unchanged even if the variable is assigned
    afterwards: TensorFlow copies on write while a reader holds the buffer.
    """
    context, _, read_variable_op, plain = _tensorflow_reads()
    variable = _plain_variable(value, plain)
    if variable is not None and context.executing_eagerly():
        # One ReadVariableOp and the tensor's own buffer: a fifth of `np.asarray(v.value())`'s
        # cost, which decides saves of models with thousands of small variables.
        return _read_only(read_variable_op(variable.handle, variable.dtype))
    return _converted(value)


# Variables read by one op: each batch is handed on (to a writing thread) while the next is read.
_READ_BATCH = 512


def snapshots(values: list) -> Iterator[np.ndarray]:
    """`snapshot` of each of `values`, in order, taken batch by batch as the iterator advances.

    Runs of plain variables of one dtype on one device are read by one `_ReadVariablesOp` each:
    TensorFlow's batched ReadVariableOp (the same shared lock and buffer per variable, copy on
    read included), a third of the cost of reading them one by one. If a batched read fails (an
    uninitialized variable, a device it cannot run on), its variables are read one by one, which
    raises the error a single read does.
    """
    context, execute, _, plain = _tensorflow_reads()
    eager = context.executing_eagerly()
    for start in range(0, len(values), _READ_BATCH):
        batch = values[start : start + _READ_BATCH]
        variables = [_plain_variable(v, plain) if eager else None for v in batch]
        read: dict[int, np.ndarray] = {}
        for kind, run in itertools.groupby(enumerate(variables), key=_run_kind):
            run = list(run)
            if kind is not None and len(run) > 1:  # a single one is read by `snapshot`, as it always was
                arrays = _read_together([v for _, v in run], kind[0], context, execute)
                if arrays is not None:
                    read.update(zip((i for i, _ in run), arrays, strict=True))
        for i, value in enumerate(batch):
            array = read.get(i)
            yield array if array is not None else snapshot(value)


def _run_kind(indexed: tuple[int, object]):
    """What variables read by one op share (dtype, device); None for a value that is not one."""
    _, variable = indexed
    return None if variable is None else (variable.dtype, variable.device)


def _read_together(variables: list, dtype, context, execute) -> list[np.ndarray] | None:
    """`variables` (all of `dtype`) read by one `_ReadVariablesOp`, or None if it failed."""
    try:
        tensors = execute.execute(
            "_ReadVariablesOp",
            num_outputs=len(variables),
            inputs=[v.handle for v in variables],
            attrs=("N", len(variables), "dtypes", [dtype.as_datatype_enum] * len(variables)),
            ctx=context.context(),
        )
        return [_read_only(t) for t in tensors]  # inside: an async executor reports errors here
    except Exception:  # read one by one by the caller, raising what a single read raises
        return None


def _converted(value) -> np.ndarray:
    """`snapshot` of anything other than a plain variable read eagerly (copies where it must)."""
    import tensorflow as tf
    from keras.src import backend

    inner = getattr(value, "_value", None)  # a Keras 3 variable's backing variable
    if isinstance(inner, tf.Variable):
        value = inner
    if isinstance(value, tf.Variable):
        value = value.value()
    if isinstance(value, tf.Tensor) and hasattr(value, "numpy"):
        array = np.asarray(value)
    else:
        array = np.asarray(backend.convert_to_numpy(value))
    return array if array.flags.c_contiguous else np.ascontiguousarray(array).reshape(array.shape)


def unmarked_bfloat16(dtype: np.dtype) -> bool:
    """Whether values of `dtype` are untagged 2-byte opaque ("|V2"): how h5py stores ml_dtypes'
    bfloat16 when no `dtype` mark says so (the legacy `.h5` writers, tf_keras' `.keras`). Stock
    cannot load those back ("No cast function available"); they are bfloat16 bits."""
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.fields is None


def bfloat16_bits(array: np.ndarray) -> np.ndarray:
    """`array` viewed as bfloat16 if it holds unmarked bfloat16 (see `unmarked_bfloat16`)."""
    return array.view(BFLOAT16) if unmarked_bfloat16(array.dtype) else array


def bfloat16_where_expected(values: list, bfloat16: list[bool]) -> list:
    """`values`, each one meant for a bfloat16 variable (`bfloat16[i]`) taken as bfloat16 bits;
    values past the end of `bfloat16` as they are."""
    return [bfloat16_bits(v) if i < len(bfloat16) and bfloat16[i] else v for i, v in enumerate(values)]


def adoptable(array: np.ndarray) -> bool:
    """Whether `adoptable_tensor` can hand TensorFlow this array's memory (numbers, bfloat16)."""
    return array.dtype.kind in "biufc" or array.dtype == BFLOAT16


def adoptable_tensor(array: np.ndarray):
    """A TensorFlow tensor over `array`'s memory (no copy) when it is aligned, else a copy."""
    import tensorflow as tf

    if array.nbytes and array.ctypes.data % ALIGNMENT:
        return tf.convert_to_tensor(array)
    if array.dtype == BFLOAT16:  # DLPack has no bfloat16: move the bits as uint16, relabel in place
        return tf.bitcast(tf.experimental.dlpack.from_dlpack(array.view(np.uint16).__dlpack__()), tf.bfloat16)
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
