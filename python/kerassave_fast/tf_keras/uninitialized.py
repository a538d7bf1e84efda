"""Building a tf_keras model whose weights a file is about to replace, without computing their
initial values (random ones, for the most part): in the bench, stock's build of 4 x Dense(4096)
costs about as much as reading the whole file, Adam's state included.

Keras 3 has deferred initialization of its own (keras3/state.py); tf_keras has none. Here a weight
of one of the stock layers listed below starts over uninitialized memory (TensorFlow's `Empty`: its
pages are never touched) and adopts the buffer of its first assignment; any weight the file did not
assign gets its initializer's value before the load returns. The initializers' side effects (their
seeds drawn from Keras' or Python's random streams, their reuse warnings) happen as the variables
are made, as in stock's build. Weights of other layers (subclasses, or stock layers whose `build`
or `finalize_state` reads a weight) or with other initializers, and all weights of a model whose
config names a custom object or an optimizer with `use_ema` (whose build, at compile time, copies
the weights), are initialized as stock does.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import tensorflow as tf

from . import custom_objects_in_scope

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
# Stock tf_keras initializers whose call has no side effect but these: a random one marks itself
# used (`_warn_reuse`, which warns when an unseeded one is used twice) and draws its seed once,
# from Keras' seed generator or Python's `random` (`RandomGenerator._maybe_init`), then computes
# its values statelessly from that seed. Replaying both when the variable is created leaves every
# random stream where stock's build leaves it; a leftover's values are then stock's, too.
_PLAIN_INITIALIZERS = ("Zeros", "Ones")
_RANDOM_INITIALIZERS = (
    "RandomUniform",
    "RandomNormal",
    "TruncatedNormal",
    "VarianceScaling",
    "GlorotUniform",
    "GlorotNormal",
    "LecunUniform",
    "LecunNormal",
    "HeUniform",
    "HeNormal",
    "Orthogonal",
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


@functools.cache
def _initializer_types() -> tuple[frozenset, frozenset]:
    from tf_keras.src.initializers import initializers

    def types(names):
        return frozenset(getattr(initializers, name) for name in names if hasattr(initializers, name))

    return types(_PLAIN_INITIALIZERS), types(_RANDOM_INITIALIZERS)


def _deferrable(initial_value, shape, dtype):
    """The stock initializer `initial_value` calls, if its call can be put off (see
    `_RANDOM_INITIALIZERS`) and would raise no error for this shape and dtype; else None."""
    if not isinstance(initial_value, functools.partial) or set(initial_value.keywords) != {"dtype"}:
        return None
    initializer, (plain, random) = initial_value.func, _initializer_types()
    if type(initializer) in plain:
        return initializer
    generator = getattr(initializer, "_random_generator", None)
    if (
        type(initializer) in random
        and dtype.is_floating
        and (shape.rank >= 2 or type(initializer).__name__ != "Orthogonal")
        and getattr(generator, "_rng_type", None) == getattr(generator, "RNG_STATELESS", "")
    ):
        return initializer
    return None


def _replay_side_effects(initializer) -> None:
    """What calling `initializer` does besides computing values: see `_RANDOM_INITIALIZERS`."""
    if type(initializer) in _initializer_types()[1]:
        initializer._warn_reuse()
        initializer._random_generator._maybe_init()


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


def _dicts(config):
    """Every dict in a model config (a JSON tree), iteratively: a config can be deep."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _reads_weights_when_compiled(config) -> bool:
    """Whether a model config's compile config asks for an optimizer with `use_ema`: building it
    (stock does at compile time, before the weights are loaded) copies every trainable weight."""
    compile_config = config.get("compile_config") if isinstance(config, dict) else None
    return any(d.get("use_ema") is True for d in _dicts(compile_config))


def _names_any(config, custom_objects: dict) -> bool:
    """Whether a model config names any of `custom_objects` (a class or function of the user's)."""
    return bool(custom_objects) and any(
        isinstance(name, str) and name in custom_objects
        for d in _dicts(config)
        for name in (d.get("class_name"), d.get("registered_name"))
    )


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
            and (initializer := _deferrable(initial_value, shape, dtype)) is not None
        ):
            _replay_side_effects(initializer)
            kwargs["initial_value"] = functools.partial(tf.raw_ops.Empty, shape=shape, dtype=dtype, init=False)
            variable = next_creator(**kwargs)
            self._pending[id(variable)] = (variable, initial_value)
            # Its first `assign` (stock's loaders assign whole weights) ends its uninitialized life.
            variable.assign = functools.partial(self._first_assignment, variable)
            return variable
        return next_creator(**kwargs)

    def _first_assignment(self, variable, *args, **kwargs):
        if not tf.executing_eagerly():  # traced while the model is built (a layer's call): no value yet
            return type(variable).assign(variable, *args, **kwargs)
        del variable.assign
        self._pending.pop(id(variable), None)
        return variable.assign(*args, **kwargs)

    def initialize_leftovers(self) -> None:
        """Variables no one assigned get their initializers' values, as in a stock build."""
        pending, self._pending = self._pending, {}
        for variable, initial_value in pending.values():
            del variable.assign
            if type(initial_value.func) in _initializer_types()[1]:
                initial_value.func._used = False  # its reuse warning was given (or not) when the variable was made
            variable.assign(initial_value())


@contextlib.contextmanager
def building(config, custom_objects: dict | None):
    """While the tf_keras model of `config` is built in this thread, the weights of listed layers
    start uninitialized; the caller must call `initialize_leftovers()` once it has assigned the
    file's. Not if the config names a custom object (the user's code -- a layer tying its weights to
    another's, a model's `from_config` -- may read a weight while the model is built), nor if it
    compiles an optimizer with `use_ema` (built at compile time, it copies the weights)."""
    in_scope = custom_objects_in_scope(custom_objects)
    uninitialized = Uninitialized(enabled=not _names_any(config, in_scope) and not _reads_weights_when_compiled(config))
    with tf.variable_creator_scope(uninitialized.create):
        yield uninitialized
