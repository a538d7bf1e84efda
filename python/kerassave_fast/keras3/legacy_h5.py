"""Keras 3 glue for legacy `.h5` files: what `keras/src/legacy/saving/legacy_h5_format.py` stores,
with the variables themselves in place of the copies stock makes of them."""

from __future__ import annotations

import copy

import numpy as np
from absl import logging
from keras.src import backend, optimizers
from keras.src.backend.common import global_state
from keras.src.legacy.saving import json_utils, legacy_h5_format, saving_options, saving_utils
from keras.src.saving import object_registration
from keras.src.saving.saving_lib import safe_get_h5_dataset, safe_get_h5_group
from keras.src.saving.serialization_lib import SafeModeScope

from ..formats.legacy_h5 import LegacyH5Contents, NamedVariables, encode_metadata, text_attribute, weights_contents
from ..formats.weights_h5 import ReadAhead, consistent
from ..tensors import bfloat16_where_expected
from . import state

# Stock's deprecation message for `.h5` saves (keras/src/saving/saving_api.py).
H5_SAVE_WARNING = (
    "You are saving your model as an HDF5 file via `model.save()` or `keras.saving.save_model(model)`. "
    "This file format is considered legacy. We recommend using instead the native Keras format, "
    "e.g. `model.save('my_model.keras')` or `keras.saving.save_model(model, 'my_model.keras')`. "
)


def _named(variables) -> NamedVariables:
    return [(str(v.path).encode("utf8"), v) for v in variables]


def model_contents(model, include_optimizer: bool = True) -> LegacyH5Contents:
    """`save_model_to_hdf5(model, ..., include_optimizer)`, as what it would write."""
    from keras.src import __version__ as keras_version

    with saving_options.keras_option_scope(use_legacy_config=True):
        metadata = saving_utils.model_metadata(model, include_optimizer)
        root = encode_metadata(metadata, json_utils.get_json_type)
        optimizer = None
        if include_optimizer and hasattr(model, "optimizer"):
            if isinstance(model.optimizer, optimizers.Optimizer):
                optimizer = _named(model.optimizer.variables)
            else:
                optimizer = _named(model.optimizer.weights)
        contents = weights_contents(
            model,
            legacy_h5_format,
            backend.backend(),
            keras_version,
            lambda v: str(v.path),
            [v for v in model._trainable_variables + model._non_trainable_variables if v in model.weights],
        )
        contents.root_attributes, contents.optimizer = root, optimizer
        return contents


# --- loading ------------------------------------------------------------------------------------


def _only_strings(config) -> bool:
    if isinstance(config, str):
        return True
    if isinstance(config, dict):
        return all(_only_strings(v) for v in config.values())
    return isinstance(config, list | tuple) and all(_only_strings(v) for v in config)


def _compile_args(training_config: dict, custom_objects: dict) -> dict:
    """Stock's `compile_args_from_training_config`, except that losses saved by name ("mse") go to
    `compile` as those names: Keras 3.15.1 cannot deserialize its own aliases ("Could not
    deserialize 'keras.metrics.mse'")."""
    try:  # on a copy: deserializing consumes parts of the config (LossScaleOptimizer's "inner_optimizer")
        return saving_utils.compile_args_from_training_config(copy.deepcopy(training_config), custom_objects)
    except ValueError:
        loss = training_config.get("loss")
        if loss is None or not _only_strings(loss):
            raise
        args = saving_utils.compile_args_from_training_config(
            {**copy.deepcopy(training_config), "loss": None}, custom_objects
        )
        args["loss"] = loss
        return args


class _Tensors:
    """The file's tensors as read ahead, each served once (a second request reads its own copy),
    by name within an h5py group, as stock's `safe_get_h5_dataset` would find them."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def get(self, group, name: str) -> np.ndarray:
        # Read-ahead tensors are listed under their hard-link paths: the same textual path means
        # the same dataset, reached through hard links only, as stock requires.
        array = self.arrays.pop(f"{group.name}/{name}", None)
        return array if array is not None else np.asarray(consistent(safe_get_h5_dataset(group, name)))

    def of_group(self, group) -> list[np.ndarray]:
        """`load_subset_weights_from_hdf5_group`."""
        names = legacy_h5_format.load_attributes_from_hdf5_group(group, "weight_names")
        return [self.get(group, name) for name in names]


def _bfloat16_where_expected(values: list[np.ndarray], variables) -> list[np.ndarray]:
    """Stock writes bfloat16 tensors as 2-byte opaque data without a mark, which it cannot load
    back ("No cast function available"); loaded into a bfloat16 variable, they are its bits."""
    return bfloat16_where_expected(values, [backend.standardize_dtype(v.dtype) == "bfloat16" for v in variables])


def _load_weights(group, model, tensors: _Tensors, skip_mismatch: bool = False) -> None:
    """Stock's `load_weights_from_hdf5_group` (topological loading; same checks, same errors),
    the tensors taken from those read ahead."""
    filtered_layers = [layer for layer in model.layers if legacy_h5_format._legacy_weights(layer)]
    layer_names = [
        name
        for name in legacy_h5_format.load_attributes_from_hdf5_group(group, "layer_names")
        if legacy_h5_format.load_attributes_from_hdf5_group(safe_get_h5_group(group, name), "weight_names")
    ]
    if len(layer_names) != len(filtered_layers):
        raise ValueError(
            "Layer count mismatch when loading weights from file. "
            f"Model expected {len(filtered_layers)} layers, found {len(layer_names)} saved layers."
        )
    for k, name in enumerate(layer_names):
        layer = filtered_layers[k]
        symbolic_weights = legacy_h5_format._legacy_weights(layer)
        weight_values = _bfloat16_where_expected(tensors.of_group(safe_get_h5_group(group, name)), symbolic_weights)
        if len(weight_values) != len(symbolic_weights):
            raise ValueError(
                f"Weight count mismatch for layer #{k} (named {layer.name} in the current model, {name} in "
                f"the save file). Layer expects {len(symbolic_weights)} weight(s). Received "
                f"{len(weight_values)} saved weight(s)"
            )
        legacy_h5_format._set_weights(
            layer, symbolic_weights, weight_values, name=f"layer #{k} (named {layer.name})", skip_mismatch=skip_mismatch
        )
    if "top_level_model_weights" in group:
        symbolic_weights = [
            v for v in model._trainable_variables + model._non_trainable_variables if v in model.weights
        ]
        weight_values = _bfloat16_where_expected(
            tensors.of_group(safe_get_h5_group(group, "top_level_model_weights")), symbolic_weights
        )
        if len(weight_values) != len(symbolic_weights):
            raise ValueError(
                "Weight count mismatch for top-level weights when loading weights from file. "
                f"Model expects {len(symbolic_weights)} top-level weight(s). "
                f"Received {len(weight_values)} saved top-level weight(s)"
            )
        legacy_h5_format._set_weights(
            model, symbolic_weights, weight_values, name="top-level model", skip_mismatch=skip_mismatch
        )


def _restore_optimizer(model, h5, tensors: _Tensors) -> None:
    """Stock's optimizer restore, building the optimizer on `model.trainable_variables`: stock
    builds it on `model._trainable_variables` (a Sequential's or Functional's own, none), so the
    saved state is dropped and the next training step fails ("Unknown variable")."""
    optimizer = model.optimizer
    built = state.BuiltModel(model)
    try:
        if isinstance(optimizer, optimizers.Optimizer):
            built = state.build_optimizer(model)  # slots left for the saved values to initialize
        else:
            optimizer._create_all_weights(model.trainable_variables)
    except (NotImplementedError, AttributeError):
        logging.warning(
            "Error when creating the weights of optimizer {}, making it impossible to restore the saved "
            "optimizer state. As a result, your model is starting with a freshly initialized optimizer."
        )
    values = _bfloat16_where_expected(tensors.of_group(safe_get_h5_group(h5, "optimizer_weights")), optimizer.variables)
    with state.initializing(built, values):
        try:
            _set_optimizer_weights(optimizer, values)
        except ValueError:
            logging.warning(
                "Error in loading the saved optimizer state. As a result, your model is starting with a "
                "freshly initialized optimizer."
            )


def _set_optimizer_weights(optimizer, values: list) -> None:
    """`optimizer.set_weights(values)` over every variable the save wrote (`optimizer.variables`):
    a LossScaleOptimizer's `set_weights` covers only its own, leaving its inner optimizer's state."""
    if not isinstance(optimizer, optimizers.Optimizer) or not optimizer.built:
        optimizer.set_weights(values)  # stock's own (and its error for an optimizer not built)
        return
    for variable, value in zip(optimizer.variables, values, strict=False):  # as stock: the shorter list
        if variable.shape != value.shape:
            raise ValueError(
                f"Optimizer variable {optimizer._var_key(variable)} has shape {variable.shape} not compatible "
                f"with provided weight shape {value.shape}."
            )
        variable.assign(value)


def load_model(opened: ReadAhead, filepath: str, custom_objects=None, compile: bool = True, safe_mode: bool = True):
    """Stock's `load_model_from_hdf5`, except that the variables adopt the tensors read ahead (none
    is first initialized only to be overwritten), and that a compiled model gets its optimizer
    state back (see `_compile_args`, `_restore_optimizer`)."""
    h5 = opened.h5
    custom_objects = {
        **(custom_objects or {}),
        **object_registration.GLOBAL_CUSTOM_OBJECTS,
        **global_state.get_global_attribute("custom_objects_scope_dict", {}),
    }
    model_config = text_attribute(h5, "model_config")
    if model_config is None:
        raise ValueError(f"No model config found in the file at {filepath}.")
    with saving_options.keras_option_scope(use_legacy_config=True), SafeModeScope(safe_mode):
        # Decoded for each attempt: a build that gives up (to build the stock way) has consumed its config.
        built = state.build_model_with(
            lambda: saving_utils.model_from_config(json_utils.decode(model_config), custom_objects=custom_objects)
        )
        model = built.model
        tensors = _Tensors(opened.tensors)
        with state.initializing(built, tensors.arrays.values()):
            _load_weights(safe_get_h5_group(h5, "model_weights"), model, tensors)
    if not compile:
        return model
    training_config = text_attribute(h5, "training_config")
    if training_config is None:
        logging.warning(
            "No training configuration found in the save file, so the model was *not* compiled. Compile it manually."
        )
        return model
    model.compile(**_compile_args(json_utils.decode(training_config), custom_objects))
    saving_utils.try_build_compiled_arguments(model)
    if "optimizer_weights" in h5:
        _restore_optimizer(model, h5, tensors)
    return model


def load_weights(opened: ReadAhead, model, skip_mismatch: bool = False) -> None:
    """Stock's `load_weights` of a legacy `.h5` (topological, a model's file or a weights file),
    the variables adopting the tensors read ahead."""
    h5 = opened.h5
    group = h5
    if "layer_names" not in h5.attrs and "model_weights" in h5:
        group = safe_get_h5_group(h5, "model_weights")
    tensors = _Tensors(opened.tensors)
    with state.initializing(state.BuiltModel(model), tensors.arrays.values()):
        _load_weights(group, model, tensors, skip_mismatch)
