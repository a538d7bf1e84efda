"""Building a tf_keras model whose weights a file is about to replace, without computing their
initial values: a Dense(4096)'s random kernel costs about as much as reading it from the page cache.

Keras 3 has deferred initialization of its own (keras3/state.py); tf_keras has none. Here a weight
of one of the stock layers listed below starts over uninitialized memory (TensorFlow's `Empty`: its
pages are never touched) and adopts the buffer of its first assignment; any weight the file did not
assign gets its initializer's value before the load returns. Weights of other layers (subclasses,
or stock layers whose `build` or `finalize_state` reads a weight), and all weights of a model
whose config names a custom object, are initialized as stock does.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import tensorflow as tf

# Stock tf_keras layers whose `build` creates weights from initializers and reads none of them.
_LAYERS = (
    "Dense",
    "EinsumDense",
    "Embedding",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "BatchNormalization",
    "LayerNormalization",
    "GroupNormalization",
    "LSTMCell",
    "GRUCell",
    "SimpleRNNCell",
    "PReLU",
)
_FRAMES_TO_ADD_WEIGHT = 16  # add_weight -> Trackable -> make_variable -> tf.Variable's creator chain -> us


@functools.cache
def _layer_types() -> frozenset:
    import tf_keras

    return frozenset(getattr(tf_keras.layers, name) for name in _LAYERS if hasattr(tf_keras.layers, name))


@functools.cache
def _add_weight_code():
    from tf_keras.src.engine import base_layer

    return base_layer.Layer.add_weight.__code__


def _adding_layer():
    """The layer whose `add_weight` is creating the variable now, or None."""
    frame, code = sys._getframe(2), _add_weight_code()
    for _ in range(_FRAMES_TO_ADD_WEIGHT):
        if frame is None:
            return None
        if frame.f_code is code:
            return frame.f_locals.get("self")
        frame = frame.f_back
    return None


def _names_any(config, custom_objects: dict) -> bool:
    """Whether a model config names any of `custom_objects` (a class or function of the user's)."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            names = (item.get("class_name"), item.get("registered_name"))
            if any(isinstance(name, str) and name in custom_objects for name in names):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class Uninitialized:
    """The variables built over uninitialized memory, each with the initial value stock gives it."""

    def __init__(self, enabled: bool):
        self._enabled = enabled
        self._pending: dict[int, tuple] = {}  # id(variable) -> (variable, initial value callable)

    def create(self, next_creator, **kwargs):
        """A `tf.variable_creator_scope` creator: a listed layer's weight starts uninitialized."""
        initial_value, shape = kwargs.get("initial_value"), kwargs.get("shape")
        dtype = tf.as_dtype(kwargs["dtype"]) if kwargs.get("dtype") is not None else None
        if (
            self._enabled
            and callable(initial_value)
            and shape is not None
            and shape.is_fully_defined()
            and dtype is not None
            and (dtype.is_floating or dtype.is_integer)
            and tf.compat.v1.executing_eagerly_outside_functions()
            and not tf.distribute.has_strategy()
            and type(_adding_layer()) in _layer_types()
        ):
            kwargs["initial_value"] = functools.partial(tf.raw_ops.Empty, shape=shape, dtype=dtype, init=False)
            variable = next_creator(**kwargs)
            self._pending[id(variable)] = (variable, initial_value)
            # Its first `assign` (stock's loaders assign whole weights) ends its uninitialized life.
            variable.assign = functools.partial(self._first_assignment, variable)
            return variable
        return next_creator(**kwargs)

    def _first_assignment(self, variable, *args, **kwargs):
        del variable.assign
        self._pending.pop(id(variable), None)
        return variable.assign(*args, **kwargs)

    def initialize_leftovers(self) -> None:
        """Variables no one assigned get their initializers' values, as in a stock build."""
        pending, self._pending = self._pending, {}
        for variable, initial_value in pending.values():
            del variable.assign
            variable.assign(initial_value())


@contextlib.contextmanager
def building(config, custom_objects: dict | None):
    """While the tf_keras model of `config` is built in this thread, the weights of listed layers
    start uninitialized; the caller must call `initialize_leftovers()` once it has assigned the
    file's. Not if the config names a custom object: the user's code (a layer tying its weights to
    another's, a model's `from_config`) may read a weight while the model is built."""
    from tf_keras.src.saving import object_registration

    in_scope = {
        **(custom_objects or {}),
        **object_registration._THREAD_LOCAL_CUSTOM_OBJECTS.__dict__,
        **object_registration._GLOBAL_CUSTOM_OBJECTS,
    }
    uninitialized = Uninitialized(enabled=not _names_any(config, in_scope))
    with tf.variable_creator_scope(uninitialized.create):
        yield uninitialized
