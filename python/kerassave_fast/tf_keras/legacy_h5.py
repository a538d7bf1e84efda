"""tf_keras glue for legacy `.h5` files: what `tf_keras/src/saving/legacy/hdf5_format.py` stores,
with the variables themselves in place of the copies stock makes of them."""

from __future__ import annotations

import os

from ..formats import legacy_h5
from ..formats.legacy_h5 import LegacyH5Contents, NamedVariables, encode_metadata
from ..formats.weights_h5 import ReadAhead, consistent
from ..tensors import BFLOAT16, adoptable, adoptable_tensor, bfloat16_bits, bfloat16_where_expected
from . import custom_objects_in_scope

SAVE_KWARGS = frozenset({"include_optimizer", "signatures", "options", "save_traces"})
# Stock's deprecation message for `.h5` saves (tf_keras/src/saving/saving_api.py).
H5_SAVE_WARNING = (
    "You are saving your model as an HDF5 file via `model.save()`. This file format is considered "
    "legacy. We recommend using instead the native TF-Keras format, e.g. "
    "`model.save('my_model.keras')`."
)


def _named(variables) -> NamedVariables:
    return [(v.name.encode("utf8"), v) for v in variables]


def can_save_model_fast(model, path: str | None, save_format, kwargs: dict) -> bool:
    """Whether `save_model(model, path, save_format=save_format, **kwargs)` writes a legacy `.h5`
    file that this module describes as stock would write it."""
    import tensorflow as tf
    from tf_keras.src.engine import sequential
    from tf_keras.src.saving import saving_api

    if path is None or not set(kwargs) <= SAVE_KWARGS or not tf.executing_eagerly():
        return False
    try:
        if saving_api.get_save_format(path, save_format) != "h5":  # a "tf" format `.h5` path: stock's
            return False
    except ValueError:  # stock's error for an unknown format
        return False
    # Stock refuses subclassed models (NotImplementedError): in its words.
    return model._is_graph_network or isinstance(model, sequential.Sequential)


def can_save_weights_fast(path: str | None, save_format) -> bool:
    """Whether tf_keras' `save_weights(model, path, save_format=save_format)` writes a legacy `.h5`
    weights file (legacy save.py's rule; `.weights.h5` is the v3 format, stock's)."""
    import tensorflow as tf
    from tf_keras.src.saving.legacy import saving_utils

    if path is None or path.endswith(".weights.h5") or not tf.executing_eagerly():
        return False
    if save_format is None:
        return saving_utils.is_hdf5_filepath(path)
    return isinstance(save_format, str) and save_format.lower().strip() in ("hdf5", "h5", "keras")


def weights_file_contents(model) -> LegacyH5Contents:
    """`save_weights(model, "w.h5")`: `save_weights_to_hdf5_group` at the file's root."""
    from tf_keras.src import __version__ as keras_version
    from tf_keras.src import backend
    from tf_keras.src.saving.legacy import hdf5_format

    return legacy_h5.weights_contents(
        model,
        hdf5_format,
        backend.backend(),
        keras_version,
        lambda v: v.name,
        model._trainable_weights + model._non_trainable_weights,
    )


def model_contents(model, include_optimizer: bool = True) -> LegacyH5Contents:
    """`save_model_to_hdf5(model, ..., include_optimizer)`, as what it would write (its warnings
    and its side effects on the model included)."""
    from tensorflow.python.platform import tf_logging as logging
    from tf_keras.src.optimizers import optimizer as optimizer_base
    from tf_keras.src.optimizers import optimizer_v1
    from tf_keras.src.saving.legacy import saving_utils
    from tf_keras.src.saving.legacy.saved_model import json_utils

    saving_utils.try_build_compiled_arguments(model)  # legacy save.py, before any format
    model.use_legacy_config = True
    try:
        if len(model.weights) != len(model._undeduplicated_weights):
            logging.warning(
                "Found duplicated `Variable`s in Model's `weights`. This is usually caused by `Variable`s "
                "being shared by Layers in the Model. These `Variable`s will be treated as separate "
                "`Variable`s when the Model is restored. To avoid this, please save with "
                '`save_format="tf"`.'
            )
        metadata = saving_utils.model_metadata(model, include_optimizer)
        contents = weights_file_contents(model)
        contents.root_attributes = encode_metadata(metadata, json_utils.get_json_type)
        optimizer = model.optimizer
        if include_optimizer and optimizer and not isinstance(optimizer, optimizer_v1.TFOptimizer):
            contents.optimizer = _named(
                optimizer.variables if isinstance(optimizer, optimizer_base.Optimizer) else optimizer.weights
            )
        return contents
    finally:
        delattr(model, "use_legacy_config")


# --- loading ------------------------------------------------------------------------------------


def can_load_model_fast(path: str | None, kwargs: dict) -> bool:
    """Whether tf_keras' `load_model(path, **kwargs)` reads `path` as a legacy HDF5 model file, in
    eager mode (in a TF1-style graph, variables take values through stock's placeholders)."""
    import zipfile

    import h5py
    import tensorflow as tf

    if path is None or set(kwargs) - {"options"} or kwargs.get("options") is not None:
        return False
    if not tf.executing_eagerly():
        return False
    if not os.path.isfile(path) or (path.endswith(".keras") and zipfile.is_zipfile(path)):
        return False
    return h5py.is_hdf5(path)


def can_load_weights_fast(model, path: str | None, kwargs: dict, skip_mismatch: bool) -> bool:
    """Whether tf_keras' `load_weights(path, **kwargs)` reads `path` as a legacy HDF5 weights (or
    model) file topologically, in eager mode: not `by_name` (nor `skip_mismatch`, which stock
    refuses without it), not a `.weights.h5` (tf_keras' v3 layout) or `.keras` zip, no TPU strategy."""
    import h5py
    import tensorflow as tf
    from tf_keras.src import backend

    if path is None or set(kwargs) - {"by_name", "options"} or kwargs.get("by_name") or skip_mismatch:
        return False
    if not path.endswith((".h5", ".hdf5")) or path.endswith(".weights.h5") or not tf.executing_eagerly():
        return False
    if backend.is_tpu_strategy(model._distribution_strategy):
        return False
    return os.path.isfile(path) and h5py.is_hdf5(path)


def check_weights_loadable(model) -> None:
    """Stock's checks in `load_weights` before it opens an HDF5 file (same errors)."""
    if not model._is_graph_network and not model.built:
        raise ValueError(
            "Unable to load weights saved in HDF5 format into a subclassed Model which has not created its "
            "variables yet. Call the Model first, then load the weights."
        )
    model._assert_weights_created()


def load_weights(opened: ReadAhead, model) -> None:
    """Stock's `load_weights` of an HDF5 file (saving/legacy/save.py), topological: the weights of a
    `save_weights` file, or the `model_weights` of a whole model's; tensors read ahead by the Rust core."""
    f = opened.h5
    if "layer_names" not in f.attrs and "model_weights" in f:
        f = f["model_weights"]
    _load_weights(f, model, opened.tensors)
    for layer in model.layers:
        layer.finalize_state()


def _subset(group, arrays: dict) -> list:
    """Stock's `load_subset_weights_from_hdf5_group`, each tensor taken from those read ahead
    (each served once), or else read by h5py after `consistent`'s checks."""
    from tf_keras.src.saving.legacy.hdf5_format import load_attributes_from_hdf5_group

    names = load_attributes_from_hdf5_group(group, "weight_names")
    return [_take(group, name, arrays) for name in names]


def _take(group, name: str, arrays: dict):
    import numpy as np

    array = arrays.pop(f"{group.name}/{name}", None)
    return array if array is not None else np.asarray(consistent(group[name]))


def _set_values(pairs) -> None:
    """Stock's `backend.batch_set_value` (eager), each variable adopting its array's buffer where
    it can instead of copying it: the array was read into memory of its own for this load."""
    import numpy as np
    from tf_keras.src import backend

    for variable, value in pairs:
        dtype = backend.dtype_numpy(variable)
        if dtype == BFLOAT16:  # stock fails here on its own unmarked bfloat16 ("No cast function available")
            value = bfloat16_bits(np.asarray(value))
        value = np.asarray(value, dtype=dtype)
        variable.assign(adoptable_tensor(value))


def _load_weights(f, model, arrays: dict) -> None:
    """Stock's `load_weights_from_hdf5_group` (topological; same checks, same errors)."""
    from tf_keras.src.saving.legacy.hdf5_format import (
        _legacy_weights,
        load_attributes_from_hdf5_group,
        preprocess_weights_for_loading,
    )

    def attribute(name, default):
        value = f.attrs[name] if name in f.attrs else default
        return value.decode("utf8") if hasattr(value, "decode") else value

    original_keras_version, original_backend = attribute("keras_version", "1"), attribute("backend", None)
    filtered_layers = [layer for layer in model.layers if _legacy_weights(layer)]
    layer_names = [
        name
        for name in load_attributes_from_hdf5_group(f, "layer_names")
        if load_attributes_from_hdf5_group(f[name], "weight_names")
    ]
    if len(layer_names) != len(filtered_layers):
        raise ValueError(
            "Layer count mismatch when loading weights from file. "
            f"Model expected {len(filtered_layers)} layers, found {len(layer_names)} saved layers."
        )
    pairs = []
    for k, name in enumerate(layer_names):
        layer = filtered_layers[k]
        symbolic_weights = _legacy_weights(layer)
        weight_values = preprocess_weights_for_loading(
            layer, _subset(f[name], arrays), original_keras_version, original_backend
        )
        if len(weight_values) != len(symbolic_weights):
            raise ValueError(
                f"Weight count mismatch for layer #{k} (named {layer.name} in the current model, {name} in "
                f"the save file). Layer expects {len(symbolic_weights)} weight(s). Received "
                f"{len(weight_values)} saved weight(s)"
            )
        pairs += zip(symbolic_weights, weight_values, strict=True)
    if "top_level_model_weights" in f:
        symbolic_weights = model._trainable_weights + model._non_trainable_weights
        weight_values = _subset(f["top_level_model_weights"], arrays)
        if len(weight_values) != len(symbolic_weights):
            raise ValueError(
                "Weight count mismatch for top-level weights when loading weights from file. "
                f"Model expects {len(symbolic_weights)} top-level weight(s). "
                f"Received {len(weight_values)} saved top-level weight(s)"
            )
        pairs += zip(symbolic_weights, weight_values, strict=True)
    _set_values(pairs)
    for layer in model._flatten_layers():
        layer.finalize_state()


def _restore_optimizer(model, f, arrays: dict) -> None:
    """Stock's optimizer restore in `load_model_from_hdf5`, same warnings."""
    from absl import logging
    from tf_keras.src.optimizers import optimizer as optimizer_base

    try:
        if isinstance(model.optimizer, optimizer_base.Optimizer):
            model.optimizer.build(model.trainable_variables)
        else:
            model.optimizer._create_all_weights(model.trainable_variables)
    except (NotImplementedError, AttributeError):
        logging.warning(
            "Error when creating the weights of optimizer {}, making it impossible to restore the saved "
            "optimizer state. As a result, your model is starting with a freshly initialized optimizer."
        )
    values = _subset(f["optimizer_weights"], arrays)
    new_optimizer = isinstance(model.optimizer, optimizer_base.Optimizer)
    targets = model.optimizer.variables if new_optimizer else model.optimizer.weights  # `set_weights`' order
    values = bfloat16_where_expected(values, [t.dtype.name == "bfloat16" for t in targets])
    if new_optimizer:  # its `set_weights` assigns them one by one
        values = [adoptable_tensor(v) if adoptable(v) else v for v in values]
    try:
        model.optimizer.set_weights(values)
    except ValueError:
        logging.warning(
            "Error in loading the saved optimizer state. As a result, your model is starting with a "
            "freshly initialized optimizer."
        )


def _load_model_from_hdf5(opened: ReadAhead, custom_objects: dict, compile: bool):
    """Stock's `load_model_from_hdf5`, the tensors read ahead while the model is built."""
    from absl import logging
    from tf_keras.src.saving.legacy import model_config as model_config_lib
    from tf_keras.src.saving.legacy import saving_utils
    from tf_keras.src.saving.legacy.saved_model import json_utils

    from . import uninitialized

    f = opened.h5
    custom_objects = custom_objects_in_scope(custom_objects)
    model_config = legacy_h5.text_attribute(f, "model_config")
    if model_config is None:
        raise ValueError(f"No model config found in the file at {f}.")
    config = json_utils.decode(model_config)
    with uninitialized.building(config, custom_objects) as built_uninitialized:
        model = model_config_lib.model_from_config(config, custom_objects=custom_objects)
    arrays = opened.tensors  # each popped as it is served: no two variables share a buffer
    _load_weights(f["model_weights"], model, arrays)
    built_uninitialized.initialize_leftovers()
    if compile:
        training_config = legacy_h5.text_attribute(f, "training_config")
        if training_config is None:
            logging.warning(
                "No training configuration found in the save file, so the model was *not* compiled. "
                "Compile it manually."
            )
            return model
        model.compile(
            **saving_utils.compile_args_from_training_config(json_utils.decode(training_config), custom_objects),
            from_serialized=True,
        )
        saving_utils.try_build_compiled_arguments(model)
        if "optimizer_weights" in f:
            _restore_optimizer(model, f, arrays)
    return model


def load_model(opened: ReadAhead, custom_objects=None, compile: bool = True):
    """Stock's legacy `load_model` (saving/legacy/save.py) for an HDF5 file: stock's reader
    (`load_model_from_hdf5`, followed step by step) with the tensors read ahead by the Rust core
    in parallel while the model is built, each variable adopting its tensor's buffer (stock reads
    through TensorFlow's GFile and copies every tensor twice)."""
    import tensorflow as tf
    from tf_keras.src.saving import object_registration
    from tf_keras.src.saving.legacy import serialization
    from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope

    with serialization.SharedObjectLoadingScope():
        custom_objects = custom_objects_in_scope(custom_objects)
        with (
            object_registration.CustomObjectScope(custom_objects),
            keras_option_scope(save_traces=False, in_tf_saved_model_scope=True),
            tf.__internal__.load_context(None),
        ):
            return _load_model_from_hdf5(opened, custom_objects, compile)
