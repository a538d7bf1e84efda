"""tf_keras glue for legacy `.h5` files: what `tf_keras/src/saving/legacy/hdf5_format.py` stores,
with the variables themselves in place of the copies stock makes of them."""

from __future__ import annotations

import os

from ..formats import legacy_h5
from ..formats.legacy_h5 import LegacyH5Contents, NamedVariables, encode_metadata

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
    """Whether tf_keras' `load_model(path, **kwargs)` reads `path` as a legacy HDF5 model file."""
    import zipfile

    import h5py

    if path is None or set(kwargs) - {"options"} or kwargs.get("options") is not None:
        return False
    if not os.path.isfile(path) or (path.endswith(".keras") and zipfile.is_zipfile(path)):
        return False
    return h5py.is_hdf5(path)


def load_model(h5, custom_objects=None, compile: bool = True):
    """Stock's legacy `load_model` (saving/legacy/save.py) for an HDF5 file, given to stock's reader
    open through HDF5's own driver instead of through TensorFlow's GFile, whose reads took 2.7 s
    of a 5 s load of 768 MiB in a profile here."""
    import tensorflow as tf
    from tf_keras.src.saving import object_registration
    from tf_keras.src.saving.legacy import hdf5_format, serialization
    from tf_keras.src.saving.legacy.saved_model.utils import keras_option_scope

    with serialization.SharedObjectLoadingScope():
        custom_objects = {
            **(custom_objects or {}),
            **object_registration._THREAD_LOCAL_CUSTOM_OBJECTS.__dict__,
            **object_registration._GLOBAL_CUSTOM_OBJECTS,
        }
        with (
            object_registration.CustomObjectScope(custom_objects),
            keras_option_scope(save_traces=False, in_tf_saved_model_scope=True),
            tf.__internal__.load_context(None),
        ):
            return hdf5_format.load_model_from_hdf5(h5, custom_objects, compile)
